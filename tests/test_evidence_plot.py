"""The evidence at a glance: first of the report's figures, each layer's deciding figure as the verdict decides it,
coloured by the layer's code, n/a layers with their reason, from the analysis document alone."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from qkspectra.analysis.document import AnalysisOptions, build_analysis_document
from qkspectra.analysis.nulls import NullOptions
from qkspectra.analysis.seed import PARTIAL_BELOW, SUPPORTED_BELOW
from qkspectra.analysis.verdict import LAYERS, THRESHOLDS, functional_layer, operator_layer
from qkspectra.geometry import Geometry, load_geometry
from qkspectra.report.evidence_plot import VERDICT_COLOURS, evidence_figure, evidence_panels
from qkspectra.report.plots import png_bytes, report_figures
from qkspectra.report.run_page import render_markdown
from qkspectra.report.sections import report_sections

GOLDEN = Path(__file__).parent / "data" / "golden"
COSINE = "final_hidden_cosine_distance"


def noisy_factors(L: int = 5, H: int = 3, d_model: int = 12, d_head: int = 4) -> tuple[Geometry, dict]:
    """A shared operator per head, rescaled per layer, plus per-layer noise: imperfect at every level."""
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(2, H, d_model, d_head))
    root_t = np.sqrt(np.linspace(0.5, 2.0, L))[:, None, None, None]  # (L, 1, 1, 1)
    noise = 0.25 * rng.normal(size=(2, L, H, d_model, d_head))
    factors = {"W_Q": root_t * (A[None] + noise[0]), "W_K": root_t * (B[None] + noise[1])}  # (L, H, d_model, d_head) each
    sigma = np.linalg.svd(factors["W_Q"] @ np.swapaxes(factors["W_K"], -1, -2), compute_uv=False)[..., :d_head]
    return Geometry(sigma, rng.uniform(0.5, 3.0, (L, H)), metadata={"d_model": d_model, "d_head": d_head}), factors


def change(value: float, anchors: int = 1, replaced: int = 4) -> dict:
    return {"operator": {"delta_loss": value, "loss_kind": COSINE, "relative_delta_loss": None},
            "num_anchor_layers": anchors, "replaced_layers": replaced}


# the group anchor changes the model least, but it has more anchor layers: the verdict compares the others
FUNCTIONAL = {"control": {"delta_loss": 1e-9, "loss_kind": COSINE, "relative_delta_loss": None},
              "last": change(0.05), "middle": change(0.03), "best": change(0.04), "group": change(0.001, 2, 3)}


@pytest.fixture(scope="module")
def full():
    geometry, factors = noisy_factors()
    options = AnalysisOptions(nulls=NullOptions(shuffle_draws=60, gaussian_draws=60), bootstrap=None)
    document = build_analysis_document(geometry, options, factors=factors, functional=FUNCTIONAL)
    return document, report_figures(document, None, title="noisy").figures["evidence"]


@pytest.fixture(scope="module")
def bare():
    """No nulls, no operators, no functional test."""
    document = build_analysis_document(load_geometry(GOLDEN / "minilm_like.json"), AnalysisOptions(nulls=None, bootstrap=None))
    return document, report_figures(document, None, title="bare").figures["evidence"]


def by_gid(fig, gid: str):
    found = [a for a in fig.findobj() if a.get_gid() == gid]
    assert len(found) == 1, (gid, len(found))
    return found[0]


def number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


def test_evidence_is_the_first_figure_and_in_the_verdict_section(full):
    document, _ = full
    names = list(report_figures(document, None, title="x").figures)
    assert names[0] == "evidence"
    verdict = report_sections(document, names)[0]
    plots = [block.name for section in report_sections(document, names) for block in section.blocks if hasattr(block, "name")]
    assert verdict.title == "Verdict" and plots[0] == "evidence" and plots.count("evidence") == 1
    assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", render_markdown(document, names))[0] == "plots/evidence.png"


def test_panels_in_verdict_order_with_the_recorded_codes(full):
    document, fig = full
    panels = evidence_panels(document)
    layers = document["verdict"]["layers"]
    assert [p.layer for p in panels] == list(LAYERS)
    assert [p.code for p in panels] == [layers[name]["code"] for name in LAYERS]
    assert "n/a" not in [p.code for p in panels]  # every layer has its figure here
    assert document["verdict"]["overall"].upper() in fig.get_suptitle() and "noisy" in fig.get_suptitle()


def test_spectral_panel_is_the_primary_strategys_fitted_residual(full):
    document, fig = full
    gauge = evidence_panels(document)[0].gauge
    assert gauge.value == document["rescale"]["mean_residual_fitted"]
    assert (gauge.supported_below, gauge.partial_below) == (SUPPORTED_BELOW, PARTIAL_BELOW)
    evidence = document["verdict"]["layers"]["spectral"]["evidence"]
    assert f"{number(evidence, r'spectra ([0-9.]+) over'):.3f}" == by_gid(fig, "value:spectral").get_text() == f"{gauge.value:.3f}"
    assert gauge.seed_figure == document["rescale"]["mean_residual"]


def test_operator_panel_is_the_verdicts_lowest_residual(full):
    document, fig = full
    gauge = evidence_panels(document)[2].gauge
    evidence = document["verdict"]["layers"]["operator"]["evidence"]
    assert operator_layer(document["operator"]).evidence == evidence
    strategy = re.search(r"\((\w+) anchor", evidence).group(1)
    assert f"({strategy} anchor" in gauge.title and strategy != "group"
    assert by_gid(fig, "value:operator").get_text() == f"{gauge.value:.3f}" == f"{number(evidence, r'residual ([0-9.]+) [(]'):.3f}"
    assert (gauge.supported_below, gauge.partial_below) == (THRESHOLDS.operator_supported, THRESHOLDS.operator_partial)


def test_functional_panel_is_the_verdicts_smallest_change_with_the_control(full):
    document, fig = full
    gauge = evidence_panels(document)[3].gauge
    evidence = document["verdict"]["layers"]["functional"]["evidence"]
    assert functional_layer(FUNCTIONAL).evidence == evidence
    assert gauge.value == 0.03 and "(middle anchor" in gauge.title  # not group's 0.001: it has more anchor layers
    assert number(evidence, r"cosine distance of ([0-9.]+)") == pytest.approx(gauge.value, abs=5e-5)
    assert by_gid(fig, "value:functional").get_text() == "0.03"
    assert gauge.log and (gauge.supported_below, gauge.partial_below) == (THRESHOLDS.functional_supported, THRESHOLDS.functional_partial)
    assert gauge.control == 1e-9 and by_gid(fig, "control:functional").get_xdata()[0] == 1e-9


def test_a_change_within_the_controls_rounding_counts_as_none():
    functional = {"control": {"relative_delta_loss": 1e-6}, "last": {"operator": {"relative_delta_loss": 3e-6},
                                                                      "num_anchor_layers": 1, "replaced_layers": 4}}
    document = build_analysis_document(load_geometry(GOLDEN / "minilm_like.json"), AnalysisOptions(nulls=None, bootstrap=None),
                                       functional=functional)
    gauge = evidence_panels(document)[3].gauge
    assert document["verdict"]["layers"]["functional"]["code"] == "supported"
    assert (gauge.value, gauge.measured) == (0.0, 3e-6)
    fig = evidence_figure(evidence_panels(document), "partial", "rounding")
    assert by_gid(fig, "value:functional").get_text().startswith("0 (measured 3e-06")
    assert by_gid(fig, "deciding:functional").get_xdata()[0] == 3e-6


def test_null_panel_shows_the_deciding_figures_of_each_null(full):
    document, fig = full
    panel = evidence_panels(document)[1]
    evidence = document["verdict"]["layers"]["spectral_vs_null"]["evidence"]
    assert [f.label for f in panel.nulls] == ["shape cosine", "residual (last, fitted layers)"]
    for figure, key in zip(panel.nulls, ("shape_invariance_mean", "mean_residual_fitted.last")):
        for row in figure.rows:
            stored = document["null"][{"Gaussian": "gaussian", "shuffle": "shuffle"}[row.null]]["figures"][key]
            assert (row.real, row.null_mean, row.null_std, row.p_value) == (
                stored["real"], stored["null_mean"], stored["null_std"], stored["p_value"])
            text = by_gid(fig, f"p:spectral_vs_null:{row.null}:{figure.label}").get_text()
            assert text == f"p = {row.p_value:.3g}" and text in evidence
        assert by_gid(fig, f"real:spectral_vs_null:{figure.label}").get_xdata()[0] == figure.rows[0].real
    beaten = list(panel.beaten.values())
    assert panel.code == ("supported" if all(beaten) else "partial" if any(beaten) else "rejected")


def test_colours_follow_the_codes(full, bare):
    for document, fig in (full, bare):
        for panel in evidence_panels(document):
            strong, light = VERDICT_COLOURS[panel.code]
            frame = by_gid(fig, f"panel:{panel.layer}")
            assert frame.get_facecolor() == to_rgba(light) and frame.get_edgecolor() == to_rgba(strong)
            label = by_gid(fig, f"code:{panel.layer}")
            assert label.get_text() == f"{panel.layer}\n{panel.code.upper()}" and to_rgba(label.get_color()) == to_rgba(strong)
            if panel.gauge is not None:
                assert to_rgba(by_gid(fig, f"deciding:{panel.layer}").get_color()) == to_rgba(strong)


def test_missing_sections_are_na_panels_with_their_reasons(bare):
    document, fig = bare
    panels = evidence_panels(document)
    assert [p.code for p in panels[1:]] == ["n/a", "n/a", "n/a"]
    for panel in panels[1:]:
        assert by_gid(fig, f"reason:{panel.layer}").get_text().replace("\n", " ") == document["verdict"]["layers"][panel.layer]["evidence"]
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_a_document_without_a_layered_verdict_leaves_the_figure_out(bare):
    document, _ = bare
    old = {k: v for k, v in document.items() if k != "verdict"} | {"verdict": {"code": "partial", "text": "seed"}}
    figures = report_figures(old, None, title="old")
    assert "evidence" not in figures.figures and "layered verdict" in figures.skipped["evidence"]
    partial = dict(document, verdict=dict(document["verdict"], layers={"spectral": document["verdict"]["layers"]["spectral"]}))
    panels = evidence_panels(partial)  # layers the document lacks are n/a
    assert [p.code for p in panels[1:]] == ["n/a"] * 3 and panels[0].gauge is not None


def test_colours_are_the_reports_verdict_colours():
    from qkspectra.report.typeset import CSS

    for code in ("supported", "partial", "rejected"):
        strong, light = VERDICT_COLOURS[code]
        assert re.search(rf"p\.verdict-{code} {{ background: {light}; border-color: {strong}; }}", CSS), code
