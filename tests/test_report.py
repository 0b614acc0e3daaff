"""report.html and report.md: same numbers, self-contained, escaped, optional sections; `report` and `plot`."""

from __future__ import annotations

import base64
import copy
import re
import shutil
from pathlib import Path

import pytest

from qkspectra.atomic import atomic_write_json
from qkspectra.cli import main
from qkspectra.geometry import load_geometry
from qkspectra.analysis.document import build_analysis_document
from qkspectra.report.layout import fmt
from qkspectra.report.run_page import render_html, render_markdown, render_summary
from qkspectra.report.sections import report_sections

GOLDEN = Path(__file__).parent / "data" / "golden"
# a 1 x 1 PNG: the renderers only embed bytes, so the layout tests need no real plot
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNk+A8AAQUBAScY42YAAAAASUVORK5CYII=")
PLOT_NAMES = ("evidence", "schedule", "temperature_heatmap", "residual_heatmap", "spectral_shapes", "entropy_scatter",
              "entropy_descriptors", "cross_head")
OPTIONAL_TITLES = ("Null baselines", "Bootstrap confidence intervals", "Operator-level reconstruction", "Rank-k correction",
                   "Functional reconstruction")


@pytest.fixture(scope="module")
def document():
    return build_analysis_document(load_geometry(GOLDEN / "minilm_like.json"))


def grid(value: float, L: int = 6, H: int = 12) -> list[list[float]]:
    return [[value] * H for _ in range(L)]


def seed_only(document: dict) -> dict:
    """The document without anything beyond the seed's figures."""
    doc = {k: v for k, v in document.items() if k not in ("null", "bootstrap", "operator", "rank_k", "functional")}
    doc["verdict"] = {"code": document["verdict"]["code"], "text": document["verdict"]["text"]}
    return doc


def beyond_seed(document: dict) -> dict:
    """The document with every optional key of the schema, values chosen to be recognisable."""
    doc = copy.deepcopy(seed_only(document))
    figures = {"shape_invariance_mean": {"real": 0.981, "null_mean": 0.5, "null_std": 0.01, "p_value": 0.004975}}
    doc["null"] = {
        "gaussian": {"available": True, "reason": None, "draws": 200, "figures": figures},
        "shuffle": {"available": False, "reason": "one head per layer: nothing to shuffle", "draws": 0, "figures": {}},
    }
    doc["bootstrap"] = {"draws": 1000, "confidence": 0.95,
                        "corr_T_entropy": {"last": {"estimate": -0.333, "low": -0.5123, "high": -0.1}},
                        "corr_opnorm_entropy": {"last": {"estimate": -0.7, "low": -0.8, "high": -0.6}}}
    doc["operator"] = {"last": {"T": grid(1.0), "residual": grid(0.4), "mean_residual": 0.4321, "matched_residual": grid(0.3),
                                "matched_mean_residual": 0.3123, "matched_head": grid(0), "principal_angles_deg_mean": grid(61.25),
                                "mean_residual_fitted": 0.4765, "matched_mean_residual_fitted": 0.3456,
                                "num_anchor_layers": 1, "num_fitted_layers": 5}}
    level = {"k": grid(2), "mean_k": 2.5, "mean_k_fitted": 2.75, "param_ratio": 0.0781}
    doc["rank_k"] = {"last": {"spectral": level, "operator": level,
                              "curve": {"k": [0, 1], "spectral_mean_residual": [0.1, 0.0], "operator_mean_residual": [0.4, 0.2]}}}
    effect = {"delta_loss": 0.0567, "loss_kind": "masked LM", "mean_kl": 0.0123, "mean_entropy_shift": -0.02}
    doc["functional"] = {"last": {"spectral": effect, "operator": effect, "operator_rank_k": effect, "num_anchor_layers": 1,
                                  "replaced_layers": 5}, "control": effect}
    doc["verdict"].update(
        overall="partial",
        layers={"spectral": {"code": "supported", "evidence": "mean residual 0.089"},
                "operator": {"code": "rejected", "evidence": "operator residual 0.43 > 0.30"}},
        summary="The spectra fit but the operators do not <b>match</b>.",
    )
    return doc


def images() -> dict[str, bytes]:
    return {name: PIXEL for name in PLOT_NAMES}


def test_html_is_self_contained(document):
    page = render_html(document, images())
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "url(" not in page and "@import" not in page
    assert "default-src 'none'; img-src data:" in page  # the page may not fetch anything
    assert re.findall(r'<img src="([^"]{0,22})', page) == ["data:image/png;base64,"] * len(PLOT_NAMES)


def test_html_and_markdown_carry_the_same_numbers(document):
    page, md = render_html(document, images()), render_markdown(document, PLOT_NAMES)
    for s in document["strategies"].values():
        for figure in (fmt(s["rescale"]["mean_residual"]), fmt(s["entropy"]["corr_T_entropy"], 3, signed=True)):
            assert figure in page and figure in md
    for layer_T in document["strategies"]["group"]["rescale"]["per_layer"]["mean_T"]:
        assert fmt(layer_T, 3) in page and fmt(layer_T, 3) in md
    assert document["verdict"]["text"] in page and document["verdict"]["text"] in md


def test_markdown_references_the_plot_files(document):
    md = render_markdown(document, PLOT_NAMES)
    assert sorted(re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)) == sorted(f"plots/{name}.png" for name in PLOT_NAMES)


def test_verdict_comes_first(document):
    sections = report_sections(beyond_seed(document), PLOT_NAMES)
    assert sections[0].title == "Verdict"
    assert sections[0].blocks[0].text.startswith("Overall: PARTIAL.")
    page = render_html(beyond_seed(document), images())
    assert page.index("Overall: PARTIAL") < page.index("Anchor strategies side by side</h2>")


def test_optional_sections_rendered_when_present(document):
    doc = beyond_seed(document)
    page, md = render_html(doc, images()), render_markdown(doc, PLOT_NAMES)
    for text in (*OPTIONAL_TITLES, "0.0050", "one head per layer: nothing to shuffle", "-0.512", "0.4321", "0.3123", "0.4765", "0.3456", "2.75", "61.2",
                 "0.078", "0.0567", "masked LM", "control", "operator residual 0.43 &gt; 0.30"):
        assert text in page, text
    for text in (*OPTIONAL_TITLES, "0.0050", "0.4321", "0.0567", "operator residual 0.43 > 0.30"):
        assert text in md, text


def test_optional_sections_left_out_when_absent(document):
    doc = seed_only(document)
    page, md = render_html(doc, images()), render_markdown(doc, PLOT_NAMES)
    for title in OPTIONAL_TITLES:
        assert title not in page and title not in md
    assert "Overall:" not in page


def test_all_text_is_escaped(document):
    doc = beyond_seed(document)
    doc["input"] = dict(doc["input"], metadata={"model": "<script>alert(1)</script>", "corpus": 'a "quoted" & <b>bold</b>'})
    page = render_html(doc, images(), notes=["<img src=x onerror=alert(2)>"])
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>" not in page and "&lt;b&gt;match&lt;/b&gt;" in page
    assert "<img src=x" not in page
    assert page.count("<script>") == 1  # the page's own image check


def test_summary_prints_the_table_and_the_one_verdict(document):
    text = render_summary(beyond_seed(document))
    assert "=== Anchor strategies side by side ===" in text and "=== Verdict ===" in text
    assert re.search(r"^  group\s+2, 3\s+2\s+4\s+0\.1129\s+0\.0753", text, re.M)  # anchors, fitted layers, fitted, all
    assert "Overall: PARTIAL." in text and document["verdict"]["text"] not in text  # the seed's is not a second verdict


def test_the_seeds_verdicts_stand_apart_headed_as_not_the_verdict(document):
    sections = report_sections(beyond_seed(document), PLOT_NAMES)
    seed = next(s for s in sections if s.title == "Reproducing the seed")
    assert seed.blocks[0].text.startswith("Not qkspectra's verdict")
    text = " ".join(getattr(block, "text", "") for block in seed.blocks)
    table = next(block for block in seed.blocks if not hasattr(block, "text"))  # each strategy's code by the seed's rule
    assert [row[0] for row in table.rows] == list(document["strategies"]) and table.columns[-1] == "the seed's rule"
    comparison = next(s for s in sections if s.title == "Anchor strategies side by side")
    assert not any("verdict" in column for column in comparison.blocks[0].columns)  # one verdict: not per strategy
    assert "best anchor strategy by mean residual over the layers it fits, last" in text  # not group: it has more anchors
    assert document["verdict"]["text"] in text
    verdict = sections[0]
    assert not any(document["verdict"]["text"] in getattr(block, "text", "") for block in verdict.blocks)


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def analysis_folder(tmp_path_factory, document):
    folder = tmp_path_factory.mktemp("analysis")
    atomic_write_json(folder / "analysis.json", document)
    return folder


def test_report_command_without_geometry_leaves_out_the_per_head_plots(analysis_folder, tmp_path, capsys):
    main(["report", str(analysis_folder / "analysis.json"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "plot spectral_shapes left out: its geometry file is not beside the analysis file" in err
    assert sorted(p.stem for p in (tmp_path / "plots").iterdir()) == [
        "cross_head", "evidence", "residual_heatmap", "schedule", "temperature_heatmap"]
    page = (tmp_path / "report.html").read_text()
    assert "plot entropy_scatter left out" in page and page.count("<img ") == 5
    assert "![schedule](plots/schedule.png)" in (tmp_path / "report.md").read_text()


def test_plot_command_with_geometry_beside(tmp_path, document, capsys):
    shutil.copy(GOLDEN / "minilm_like.json", tmp_path / "geometry.json")
    atomic_write_json(tmp_path / "analysis.json", document)
    main(["plot", str(tmp_path / "analysis.json"), "--quiet"])
    assert capsys.readouterr().err == ""
    assert sorted(p.stem for p in (tmp_path / "plots").iterdir()) == sorted(PLOT_NAMES)
    assert not (tmp_path / "report.html").exists()


def test_plot_command_finds_the_geometry_the_analysis_names(tmp_path, capsys):
    """`analyze big.json --json a.json` then `plot a.json`: the per-head plots come from big.json."""
    shutil.copy(GOLDEN / "minilm_like.json", tmp_path / "my_model.json")
    main(["analyze", str(tmp_path / "my_model.json"), "--anchor", "all", "--json", str(tmp_path / "a.json"), "--quiet"])
    main(["plot", str(tmp_path / "a.json"), "--quiet"])
    assert capsys.readouterr().err == ""
    assert {"spectral_shapes", "entropy_scatter"} <= {p.stem for p in (tmp_path / "plots").iterdir()}


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), (b"{nope", "not valid JSON"), (b'{"num_layers": 1}', "not an analysis document"),
     (b'{"input": 1, "rescale": 2, "anchor": 3}', "not an analysis document"),
     (b'{"input": {"num_layers": 1}, "rescale": {}, "anchor": {"strategy": "last"}}', "input.num_heads: missing"),
     (b'{"input": {"num_layers": 1, "num_heads": 2}, "rescale": {"T": [[1, "x"]], "residual": [[0, 0]]}, '
      b'"anchor": {"group_anchors": [0]}, "cross_head": {}}', 'rescale.T[0][1]: expected a finite number, found \'x\''),
     (b'{"input": {"num_layers": 1, "num_heads": 2}, "rescale": {}, "anchor": {}, "strategies": {"last": {'
      b'"rescale": {"T": [[1, 2]], "residual": [[0]]}}}}', "strategies.last.rescale.residual: expected 1 x 2 numbers, found shape (1, 1)")],
)
def test_report_command_rejects_bad_input_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "analysis.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_report_command_rejects_a_geometry_of_another_shape_beside(tmp_path, document, capsys):
    shutil.copy(GOLDEN / "deep.json", tmp_path / "geometry.json")
    atomic_write_json(tmp_path / "analysis.json", document)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "analysis.json"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the geometry of this analysis" in err
    assert not (tmp_path / "out").exists()


def test_a_single_strategy_document_from_analyze_renders(tmp_path):
    import orjson

    main(["analyze", str(GOLDEN / "deep.json"), "--anchor", "2", "--json", str(tmp_path / "analysis.json"), "--quiet"])
    doc = orjson.loads((tmp_path / "analysis.json").read_bytes())
    page, md = render_html(doc, {"schedule": PIXEL}), render_markdown(doc, ["schedule"])
    for text in (doc["verdict"]["text"], fmt(doc["rescale"]["mean_residual"])):
        assert text in page and text in md
    assert "| index | 2 |" in md


def test_the_run_line_names_model_and_options():
    from qkspectra.report.readers import describe_run

    metadata = {"model": "smollm2", "model_type": "llama", "fold_ln": False, "corpus": "notes.txt: 4 windows of 64 tokens, 256 tokens",
                "seq_len": 64, "max_tokens": 256, "num_windows": 4, "window_per_line": True}
    document = {"input": {"file": "geometry.json", "num_layers": 30, "num_heads": 9, "has_entropy": True, "metadata": metadata}}
    assert describe_run(document) == (
        "smollm2 · llama, 30 layers × 9 heads · norm not folded · corpus notes.txt · seq_len 64 · max_tokens 256 · "
        "num_windows 4 · window per line"
    )
    document["input"].update(has_entropy=False, metadata={})
    assert describe_run(document) == "geometry.json · 30 layers × 9 heads · static only"


def test_report_takes_a_run_folder(tmp_path, document):
    import json as _json

    from qkspectra.cli import main

    (tmp_path / "analysis.json").write_text(_json.dumps(document))
    main(["report", str(tmp_path), "-q"])  # the folder's analysis.json
    assert (tmp_path / "report.html").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
