"""The layered verdict, and how it reaches the document, the JSON and the text report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qkspectra.analysis.seed import analyze, analyze_all
from qkspectra.cli import main
from qkspectra.geometry import Geometry, load_geometry
from qkspectra.analysis.nulls import FigureNull, NullBaseline, NullOptions, gaussian_spectra, null_baselines
from qkspectra.analysis.document import AnalysisOptions, build_analysis_document
from qkspectra.analysis.results import result_document
from qkspectra.report.text import NO_NULL_LINE, SEED_HEADING, render_report
from qkspectra.analysis.verdict import (
    stability_against_nulls,
    THRESHOLDS,
    Layer,
    functional_layer,
    layered_verdict,
    null_layer,
    operator_layer,
    overall_code,
)

GOLDEN = Path(__file__).parent / "data" / "golden"
FEW = NullOptions(shuffle_draws=60, gaussian_draws=60)


def gaussian_geometry(seed: int, L: int = 6, H: int = 12, d_model: int = 384, d_head: int = 32) -> Geometry:
    """Independent random layers with MiniLM's shapes (no shared operator at all)."""
    rng = np.random.default_rng(seed)
    sigma = gaussian_spectra([rng], L, H, d_model, d_head, H)[0]  # (L, H, d_head)
    return Geometry(sigma, rng.uniform(0.5, 3.0, (L, H)), metadata={"d_model": d_model, "d_head": d_head})


def planted_geometry() -> Geometry:
    alpha = np.linspace(0.3, 3.0, 5)  # (H,)
    base = np.arange(1, 9)[None, :] ** -alpha[:, None]  # (H, K)
    t = np.linspace(0.4, 2.0, 6)  # (L,)
    return Geometry(t[:, None, None] * base[None], None, metadata={"d_model": 64, "d_head": 8})


def operator_results(residual: float, matched: float | None = None) -> dict:
    """Part B's operator results: {strategy: {"mean_residual_fitted", "matched_mean_residual_fitted", counts}}
    for 6 layers; group (2 anchors) has the lowest figures, which must not decide the verdict."""
    out = {}
    for i, s in enumerate(("last", "middle", "best")):
        out[s] = {"mean_residual_fitted": residual + 0.01 * i, "matched_mean_residual_fitted": matched,
                  "num_anchor_layers": 1, "num_fitted_layers": 5}
    out["group"] = {"mean_residual_fitted": residual / 10, "matched_mean_residual_fitted": residual / 10,
                    "num_anchor_layers": 2, "num_fitted_layers": 4}
    return out


def functional_results(change: float, kind: str = "next_token_cross_entropy", control: float = 1e-13) -> dict:
    """Part B's functional results: {strategy: {variant: effects}, "control": effects}."""

    def effects(x):
        if kind == "next_token_cross_entropy":
            return {"delta_loss": 2.0 * x, "relative_delta_loss": x, "loss_kind": kind}
        return {"delta_loss": x, "relative_delta_loss": None, "loss_kind": kind}

    counts = {"num_anchor_layers": 1, "replaced_layers": 5}
    return {
        "control": effects(control),
        "last": {"spectral": effects(0.5), "operator": effects(change), "operator_rank_k": None, **counts},
        "best": {"spectral": effects(0.5), "operator": effects(change * 3), "operator_rank_k": effects(change / 2), **counts},
        "group": {"spectral": effects(0.5), "operator": effects(change / 10), "operator_rank_k": None,
                  "num_anchor_layers": 2, "replaced_layers": 4},
    }


# ---------------------------------------------------------------- layers


def test_operator_layer_thresholds_and_the_matched_residual():
    assert THRESHOLDS.operator_supported == 0.10 and THRESHOLDS.operator_partial == 0.30
    assert operator_layer(operator_results(0.05)).code == "supported"
    assert operator_layer(operator_results(0.2)).code == "partial"
    assert operator_layer(operator_results(0.9)).code == "rejected"
    layer = operator_layer(operator_results(0.9, matched=0.08))
    assert layer.code == "supported" and "matched heads" in layer.evidence and "0.080" in layer.evidence
    assert operator_layer(None).code == "n/a" and "no factors file beside the geometry" in operator_layer(None).evidence
    assert "group" not in operator_layer(operator_results(0.9)).evidence  # more anchors never decide
    assert "5 fitted layers" in operator_layer(operator_results(0.9)).evidence


def test_a_strategy_that_fits_no_layer_is_never_chosen():
    nothing_fitted = {"mean_residual_fitted": None, "matched_mean_residual_fitted": None,
                      "num_anchor_layers": 6, "num_fitted_layers": 0}
    assert operator_layer({"group": nothing_fitted}).code == "n/a"
    assert "no layer is fitted" in operator_layer({"group": nothing_fitted}).evidence
    only_group = operator_results(0.9)
    del only_group["last"], only_group["middle"], only_group["best"]
    assert operator_layer(only_group).code == "supported"  # the fewest anchors available: group itself


def test_functional_layer_uses_the_change_of_the_operator_reconstruction():
    assert functional_layer(functional_results(0.005)).code == "supported"
    assert functional_layer(functional_results(0.05)).code == "partial"
    layer = functional_layer(functional_results(0.25))
    assert layer.code == "rejected" and "25.00%" in layer.evidence and "last anchor" in layer.evidence
    assert "in 5 layers" in layer.evidence  # group replaced fewer layers, so it is not compared
    encoder = functional_layer(functional_results(0.004, kind="final_hidden_cosine_distance"))
    assert encoder.code == "supported" and "cosine distance of 0.0040" in encoder.evidence
    missing = functional_layer(None)
    assert missing.code == "n/a" and "functional test not run" in missing.evidence


def test_changes_within_a_few_times_the_control_are_no_change():
    assert functional_layer(functional_results(0.02, control=1e-5)).code == "partial"
    layer = functional_layer(functional_results(4e-5, control=1e-5))
    assert layer.code == "supported" and "0.00%" in layer.evidence


def test_a_control_that_moves_the_model_makes_the_functional_test_unreliable():
    layer = functional_layer(functional_results(0.001, control=1e-3))
    assert layer.code == "n/a" and "control" in layer.evidence


def test_a_null_is_beaten_only_when_both_figures_are_below_alpha():
    def null(name, p_shape, p_residual, available=True):
        figures = {"shape_invariance_mean": FigureNull(0.9, 0.8, 0.01, p_shape), "mean_residual_fitted.last": FigureNull(0.1, 0.2, 0.01, p_residual)}
        return NullBaseline(name, available, None if available else "why", 100, 0, figures)

    assert null_layer({"shuffle": null("shuffle", 0.01, 0.02)}, "last").code == "supported"
    assert null_layer({"shuffle": null("shuffle", 0.01, 0.2)}, "last").code == "rejected"  # one figure is not enough
    both = {"gaussian": null("gaussian", 0.5, 0.9), "shuffle": null("shuffle", 0.01, 0.02)}
    assert null_layer(both, "last").code == "partial"
    lone = null_layer({"gaussian": null("gaussian", 0.01, 0.01, available=False), "shuffle": null("shuffle", 0.01, 0.01)}, "last")
    assert lone.code == "supported" and "Gaussian null unavailable" in lone.evidence
    assert null_layer(None, "last").code == "n/a"


def test_one_layer_has_nothing_to_compare_with_chance():
    g = Geometry(planted_geometry().singular_values[:1], None, metadata={"d_model": 64, "d_head": 8})
    analyses = analyze_all(g)
    layer = null_layer(null_baselines(g, analyses, FEW), "last")
    assert layer.code == "n/a" and "One layer" in layer.evidence


def test_overall_needs_every_available_layer_and_a_test_against_chance():
    def layers(**codes):
        return {name: Layer(codes.get(name, "n/a"), "") for name in ("spectral", "spectral_vs_null", "operator", "functional")}

    assert overall_code(layers(spectral="supported")) == "partial"  # the spectral fit alone proves nothing
    assert overall_code(layers(spectral="supported", spectral_vs_null="supported")) == "supported"
    assert overall_code(layers(spectral="supported", spectral_vs_null="supported", operator="partial")) == "partial"
    assert overall_code(layers(spectral="supported", spectral_vs_null="supported", functional="rejected")) == "rejected"
    assert overall_code(layers(spectral="rejected", operator="supported")) == "rejected"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_independent_random_layers_never_give_an_overall_supported(seed):
    g = gaussian_geometry(seed)
    analyses = analyze_all(g)
    assert analyses["last"].verdict_code == "supported"  # the seed is fooled
    nulls = null_baselines(g, analyses, FEW)
    for operator in (None, operator_results(0.98, matched=0.9)):
        for with_nulls in (None, nulls):
            v = layered_verdict(analyses["last"], with_nulls, operator)
            assert v.overall != "supported"
    v = layered_verdict(analyses["last"], nulls)
    assert v.layers["spectral"].code == "supported" and v.layers["spectral_vs_null"].code != "supported"


def test_planted_schedule_is_supported_with_every_layer():
    g = planted_geometry()
    analyses = analyze_all(g)
    v = layered_verdict(analyses["last"], null_baselines(g, analyses, FEW), operator_results(0.02), functional_results(0.004))
    assert {layer.code for layer in v.layers.values()} == {"supported"} and v.overall == "supported"
    assert v.summary.startswith("The scalar rescale of the spectra fits") and "Taken together, the evidence supports" in v.summary


def test_summary_names_what_was_not_run_and_says_but_for_weaker_evidence():
    g = gaussian_geometry(0)
    analyses = analyze_all(g)
    v = layered_verdict(analyses["last"], null_baselines(g, analyses, FEW))
    assert ", but the spectra are no more alike" in v.summary or ", but the spectra are more alike than some" in v.summary
    assert "p = " in v.summary
    assert "The full operators were not compared and the functional test was not run." in v.summary
    alone = layered_verdict(analyses["last"])
    assert alone.layers["spectral_vs_null"].code == "n/a" and "cannot tell a shared operator from chance" in alone.summary


# ---------------------------------------------------------------- the document


def planted_factors(L: int = 4, H: int = 3, d_model: int = 12, d_head: int = 4) -> tuple[Geometry, dict]:
    """W_Q = sqrt(t_L) A^h, W_K = sqrt(t_L) B^h: every layer's operators are t_L A^h (B^h)^T."""
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(2, H, d_model, d_head))
    root_t = np.sqrt(np.linspace(0.5, 2.0, L))[:, None, None, None]  # (L, 1, 1, 1)
    factors = {"W_Q": root_t * A[None], "W_K": root_t * B[None]}  # (L, H, d_model, d_head) each
    sigma = np.linalg.svd(factors["W_Q"] @ np.swapaxes(factors["W_K"], -1, -2), compute_uv=False)[..., :d_head]
    entropy = rng.uniform(0.5, 3.0, (L, H))
    return Geometry(sigma, entropy, metadata={"d_model": d_model, "d_head": d_head}), factors


def test_document_carries_nulls_bootstrap_operators_and_layers():
    g, factors = planted_factors()
    doc = build_analysis_document(g, AnalysisOptions(nulls=FEW), factors=factors, rank_k={"k": [1, 2]})
    assert set(doc["null"]) == {"gaussian", "shuffle"}
    for null in doc["null"].values():
        assert null["available"] and set(null) == {"available", "reason", "draws", "seed", "figures"}
        for figure in null["figures"].values():
            assert set(figure) == {"real", "null_mean", "null_std", "p_value"}
    assert doc["null"]["shuffle"]["draws"] == 60
    assert doc["null"]["shuffle"]["figures"]["mean_residual.group"]["real"] == doc["strategies"]["group"]["rescale"]["mean_residual"]
    b = doc["bootstrap"]
    assert b["draws"] == 1000 and b["confidence"] == 0.95 and b["method"]
    assert set(b["corr_T_entropy"]) == {"last", "middle", "best", "group"}
    assert {"estimate", "low", "high"} <= set(b["corr_opnorm_entropy"]["best"])
    assert doc["operator"]["last"]["mean_residual"] < 1e-9 and doc["rank_k"] == {"k": [1, 2]}
    computed = build_analysis_document(g, AnalysisOptions(nulls=None, bootstrap=None), factors=factors)["rank_k"]
    assert computed["last"]["operator"] is not None and computed["last"]["spectral"]["mean_k"] == 0
    layers = doc["verdict"]["layers"]
    assert list(layers) == ["spectral", "spectral_vs_null", "operator", "functional"]
    assert all(set(layer) == {"code", "evidence"} for layer in layers.values())
    assert [layer["code"] for layer in layers.values()] == ["supported", "supported", "supported", "n/a"]
    assert doc["verdict"]["overall"] == "supported"
    seed_doc = result_document(analyze_all(g), "last")
    assert doc["verdict"]["code"] == seed_doc["verdict"]["code"] and doc["verdict"]["text"] == seed_doc["verdict"]["text"]
    assert doc["verdict"]["summary"].endswith("Taken together, the evidence supports a shared operator rescaled by a per-layer temperature.")


def test_unavailable_gaussian_null_and_an_unused_factors_file(tmp_path):
    g = load_geometry(GOLDEN / "minilm_like.json")
    doc = build_analysis_document(g, AnalysisOptions(nulls=FEW, bootstrap=None))
    assert doc["null"]["gaussian"]["available"] is False and "d_model" in doc["null"]["gaussian"]["reason"]
    assert "no factors file beside the geometry" in doc["verdict"]["layers"]["operator"]["evidence"]
    (tmp_path / "g.factors.safetensors").write_bytes(b"")
    beside = Geometry(g.singular_values, None, metadata={"factors_file": "g.factors.safetensors"}, source=str(tmp_path / "g.json"))
    doc = build_analysis_document(beside, AnalysisOptions(nulls=None, bootstrap=None))
    assert "operator test not requested" in doc["verdict"]["layers"]["operator"]["evidence"]


def test_document_without_nulls_or_entropy():
    g = Geometry(planted_geometry().singular_values, None)
    doc = build_analysis_document(g, AnalysisOptions(nulls=None, bootstrap=None))
    assert doc["null"] is None and doc["bootstrap"] is None
    assert doc["verdict"]["layers"]["spectral_vs_null"]["code"] == "n/a"
    assert build_analysis_document(g, AnalysisOptions(nulls=FEW))["bootstrap"] is None  # no entropy, no correlation


# ---------------------------------------------------------------- the command


def _run(capsys, *args):
    main(["analyze", *map(str, args)])
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_analyze_without_null_ends_with_how_to_get_one(capsys):
    text = _run(capsys, GOLDEN / "minilm_like.json")
    assert text.rstrip("\n").splitlines()[-1] == NO_NULL_LINE
    assert "null (" not in text
    verdict = text.split("=== Layered verdict ===")[1]  # the one verdict comes last, after the seed's reproduction
    assert "spectral_vs_null  n/a        No null baseline was computed." in verdict and "HYPOTHESIS" not in verdict
    assert text.index(SEED_HEADING) < text.index("HYPOTHESIS") < text.index("=== Layered verdict ===")


def test_analyze_with_null_keeps_every_seed_line_and_adds_nulls(tmp_path, capsys):
    path = GOLDEN / "minilm_like.json"
    out = tmp_path / "a.json"
    text = _run(capsys, path, "--null", "--null-draws", 40, "--anchor", "all", "--json", out)
    seed_lines = render_report(analyze(load_geometry(path), "last")).splitlines()
    remaining = iter(text.splitlines())
    assert all(line in remaining for line in seed_lines)  # every line unchanged, in order
    assert "    null (shuffle, 40 draws): mean " in text and ", p = " in text
    assert "95% bootstrap interval" in text and "=== Layered verdict ===" in text
    assert "Gaussian null unavailable: the geometry's metadata lacks d_model and d_head" in text
    assert "mean residual over the fitted layers against the null baselines:" in text
    doc = json.loads(out.read_text())
    assert doc["null"]["shuffle"]["draws"] == 40 and set(doc["null"]["shuffle"]["figures"]) >= {"mean_residual.group", "mean_residual_fitted.group"}
    assert doc["verdict"]["layers"]["spectral_vs_null"]["code"] in ("supported", "partial", "rejected")


def test_analyze_with_null_and_an_index_anchor(tmp_path, capsys):
    g = gaussian_geometry(0, L=4, H=3, d_model=32, d_head=6)
    doc = {
        "num_layers": 4,
        "num_heads": 3,
        "static": [{"metric_singvals_per_head": s.tolist()} for s in g.singular_values],
        "metadata": g.metadata,
    }
    path, out = tmp_path / "g.json", tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    text = _run(capsys, path, "--null", "--null-draws", 30, "--anchor", "1", "--json", out)
    assert "null (Gaussian, 30 draws)" in text
    figures = json.loads(out.read_text())["null"]["gaussian"]["figures"]
    assert set(figures) == {"shape_invariance_mean", "cross_head_mean_cos", "mean_residual.index", "mean_residual_fitted.index"}


@pytest.mark.parametrize("option", [("--null-draws", "0"), ("--seed", "-1")])
def test_bad_null_draws_is_one_line_and_status_2(capsys, option):
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(GOLDEN / "minilm_like.json"), "--null", *option])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and " ".join(option) in err


def test_null_baselines_need_numpy_alone():
    script = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'scipy', 'matplotlib', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "from qkspectra.cli import main\n"
        "main(['analyze', sys.argv[1], '--null', '--null-draws', '20', '--anchor', 'all', '--quiet'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(GOLDEN / "minilm_like.json")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_every_layer_its_own_anchor_is_never_judged_better_than_one_anchor():
    """--anchor group --groups L: every layer fits itself with residual 0; that must not win anything."""
    from qkspectra.factored import head_singular_values
    from qkspectra.report.readers import best_strategy

    rng = np.random.default_rng(3)
    L, H, d_model, d_head = 4, 3, 16, 4
    W_Q, W_K = rng.standard_normal((2, L, H, d_model, d_head))
    g = Geometry(head_singular_values(W_Q, W_K), rng.uniform(0.5, 3.0, (L, H)), metadata={"d_model": d_model, "d_head": d_head})
    doc = build_analysis_document(g, AnalysisOptions(groups=L, nulls=FEW, bootstrap=None), factors={"W_Q": W_Q, "W_K": W_K})

    group = doc["strategies"]["group"]
    assert group["anchor"]["num_anchor_layers"] == L and group["anchor"]["num_fitted_layers"] == 0
    assert group["rescale"]["mean_residual"] == 0 and group["rescale"]["mean_residual_fitted"] is None
    assert group["rescale"]["fitted_reason"] and group["rescale"]["frac_below_0_10_fitted"] is None
    assert doc["operator"]["group"]["mean_residual"] < 1e-12 and doc["operator"]["group"]["mean_residual_fitted"] is None
    assert doc["rank_k"]["group"]["operator"]["mean_k_fitted"] is None
    assert doc["null"]["shuffle"]["figures"]["mean_residual_fitted.group"]["p_value"] is None
    assert best_strategy(doc["strategies"]) != "group"
    layers = doc["verdict"]["layers"]
    assert "group" not in layers["operator"]["evidence"] and layers["operator"]["code"] == "rejected"
    assert doc["verdict"]["overall"] != "supported"
    for name in ("last", "middle", "best"):  # one anchor: L - 1 fitted layers, figures over them
        s = doc["strategies"][name]
        assert (s["anchor"]["num_anchor_layers"], s["anchor"]["num_fitted_layers"]) == (1, L - 1)
        fitted = np.array(s["rescale"]["residual"])[np.arange(L) != s["anchor"]["layer"]]
        assert s["rescale"]["mean_residual_fitted"] == pytest.approx(fitted.mean(), rel=1e-12)
        operator = np.array(doc["operator"][name]["matched_residual"])[np.arange(L) != s["anchor"]["layer"]]
        assert doc["operator"][name]["matched_mean_residual_fitted"] == pytest.approx(operator.mean(), rel=1e-12)


def test_the_seeds_stability_label_is_held_against_chance():
    assert stability_against_nulls([]) is None  # no null: the label stands alone, as the seed prints it
    beaten = stability_against_nulls([("Gaussian", 0.95, 0.01), ("shuffle", 0.90, 0.0)])
    assert "more alike across layers than every null" in beaten
    mixed = stability_against_nulls([("Gaussian", 1.0, 1.0), ("shuffle", 0.90, 0.0)])
    assert "some nulls but not all" in mixed and "Gaussian 1.000 (p = 1)" in mixed
    assert "no more alike across layers than chance" in stability_against_nulls([("Gaussian", 1.0, 1.0)])


def test_analyze_with_null_holds_the_stability_label_against_it(capsys):
    text = _run(capsys, GOLDEN / "minilm_like.json", "--null", "--null-draws", 20)
    label = next(i for i, line in enumerate(text.splitlines()) if line.startswith("  spectral shape is "))
    assert text.splitlines()[label + 1].startswith("    against the nulls' shape cosine, shuffle ")
