"""What predicts a head's entropy, shown: the report section, its figures, the tables' columns, the sweep's key figures."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest

from qkspectra.analysis.document import AnalysisOptions, build_analysis_document
from qkspectra.geometry import load_geometry, parse_geometry
from qkspectra.report.entropy_plots import entropy_link_figures, head_descriptors
from qkspectra.report.entropy_section import LINK_COLUMNS, entropy_links_section, link_rows
from qkspectra.report.layout import Paragraph, Plot, Table
from qkspectra.report.plots import png_bytes
from qkspectra.report.run_page import render_markdown
from qkspectra.report.sections import FIGURE_CAPTIONS, report_sections
from qkspectra.report.sweep_readers import headline_figures
from qkspectra.workflow.sweep import key_figures

GOLDEN = Path(__file__).parent / "data" / "golden"
FAST = AnalysisOptions(nulls=None, bootstrap=None)
L, H, B = 4, 5, 6  # layers, heads, position buckets


def position_geometry() -> object:
    """A decoder-like geometry with every key the section reads: entropy with and without the first position,
    by position bucket, and the sink mass; the heads' slopes differ."""
    rng = np.random.default_rng(3)
    log_keys = np.log(np.array([1.0, 2.5, 5.5, 11.5, 23.5, 47.5]))  # (B,)
    slope = rng.uniform(0.0, 1.0, (L, H))  # (L, H)
    doc = {"num_layers": L, "num_heads": H, "metadata": {"queries_by_position": [1, 2, 4, 8, 16, 32]},
           "static": [{"metric_singvals_per_head": np.sort(rng.uniform(0.5, 3, (H, 6)))[:, ::-1].tolist()} for _ in range(L)],
           "dynamic": []}
    for layer in range(L):
        by_position = slope[layer, :, None] * log_keys + rng.uniform(0, 0.02, (H, B))  # (H, B)
        without = by_position + 0.1
        without[:, 0] = np.nan  # one key: nothing is left once the first is left out
        doc["dynamic"].append({
            "mean_attention_entropy_per_head": by_position.mean(axis=1).tolist(),
            "mean_normalized_entropy_per_head": rng.uniform(0.2, 0.9, H).tolist(),
            "mean_attention_entropy_without_first_per_head": rng.uniform(1, 3, H).tolist(),
            "mean_sink_mass_per_head": rng.uniform(0.0, 0.6, H).tolist(),
            "entropy_by_position_per_head": by_position.tolist(),
            "entropy_without_first_by_position_per_head": [[None if np.isnan(v) else float(v) for v in row] for row in without],
            "log_visible_keys_by_position": log_keys.tolist(),
        })
    return parse_geometry(doc)


@pytest.fixture(scope="module")
def run():
    geometry = position_geometry()
    return build_analysis_document(geometry, FAST), geometry


def section_of(document, figures=("entropy_descriptors", "context_slopes")):
    (section,) = [s for s in report_sections(document, figures) if s.anchor == "entropy-links"]
    return section


def test_the_section_puts_the_strongest_within_layer_descriptor_first_with_the_documents_values(run):
    document, _ = run
    section = section_of(document)
    table = next(b for b in section.blocks if isinstance(b, Table) and b.columns == LINK_COLUMNS)
    within = {name: document["descriptors"][name]["entropy"]["within_layer_spearman"] for name in document["descriptors"]
              if name != "settings"}
    strengths = [abs(within[row[0]]) for row in table.rows]
    assert strengths == sorted(strengths, reverse=True) and len(table.rows) == 7
    best = max(within, key=lambda name: abs(within[name]))
    assert table.rows[0][0] == best
    for row in table.rows:
        cell = document["descriptors"][row[0]]["entropy"]
        assert row[1] == format(cell["within_layer_spearman"], "+.3f") and row[3] == format(cell["spearman"], "+.3f")
        assert row[6] == format(cell["pearson"], "+.3f")
        assert row[4] == "[{:+.3f}, {:+.3f}]".format(*cell["spearman_ci95"])
        assert row[7] == format(document["descriptors"][row[0]]["entropy_without_first"]["within_layer_spearman"], "+.3f")
    assert any(isinstance(b, Paragraph) and b.text.startswith(f"Strongest within-layer link: {best},") for b in section.blocks)
    assert [b.name for b in section.blocks if isinstance(b, Plot)] == ["entropy_descriptors", "context_slopes"]
    context = document["context"]
    assert any(f"Median slope over heads {context['median_slope']:.3f}" in b.text for b in section.blocks
               if isinstance(b, Paragraph))
    per_layer = next(b for b in section.blocks if isinstance(b, Table) and b.columns[0] == "layer")
    assert [row[1] for row in per_layer.rows] == [format(v, ".3f") for v in context["per_layer"]["median_slope"]]


def test_the_section_comes_after_the_seeds_entropy_section_in_html_and_markdown(run):
    document, _ = run
    titles = [s.title for s in report_sections(document, [])]
    assert titles.index("What predicts a head's entropy") == titles.index("(2b) Temperature against attention entropy") + 1
    md = render_markdown(document, ["entropy_descriptors", "context_slopes"])
    assert "## What predicts a head's entropy" in md and "![context_slopes](plots/context_slopes.png)" in md
    assert {"entropy_descriptors", "context_slopes"} <= set(FIGURE_CAPTIONS)


def test_context_n_a_says_why_in_place_of_the_figure():
    geometry = load_geometry(GOLDEN / "minilm_like.json")  # no position keys: context n/a
    document = build_analysis_document(geometry, FAST)
    figures, skipped = entropy_link_figures(document, geometry, title="x")
    assert list(figures) == ["entropy_descriptors"] and skipped == {"context_slopes": document["context"]["reason"]}
    section = section_of(document, list(figures))
    assert [b.name for b in section.blocks if isinstance(b, Plot)] == ["entropy_descriptors"]
    assert any(f"n/a: {document['context']['reason']}." in b.text for b in section.blocks if isinstance(b, Paragraph))
    # the golden geometry has no entropy without the first position: one row of panels, and the reason in the section
    assert len([ax for ax in figures["entropy_descriptors"].axes if ax.get_subplotspec() is not None]) == 7
    assert any("entropy_without_first:" in b.text for b in section.blocks if isinstance(b, Paragraph))


def test_without_the_sections_there_is_no_section_and_no_figure(run):
    document, geometry = run
    old = {k: v for k, v in document.items() if k not in ("descriptors", "context")}
    assert entropy_links_section(old, []) is None
    figures, skipped = entropy_link_figures(old, geometry, title="x")
    assert figures == {} and set(skipped) == {"entropy_descriptors", "context_slopes"}
    figures, skipped = entropy_link_figures(document, None, title="x")
    assert list(figures) == ["context_slopes"] and "geometry file" in skipped["entropy_descriptors"]


def test_the_figures_draw_the_documents_order_and_the_heads(run):
    document, geometry = run
    figures, skipped = entropy_link_figures(document, geometry, title="t")
    assert skipped == {}
    scatter = figures["entropy_descriptors"]
    panels = [ax for ax in scatter.axes if ax.get_subplotspec() is not None]
    assert len(panels) == 14  # with and without the sink, 7 descriptors each
    order = [row[0] for row in link_rows(document)]
    assert [ax.get_title().split("\n")[0] for ax in panels[:7]] == order
    values = head_descriptors(document, geometry)
    offsets = panels[0].collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], values[order[0]].ravel())
    np.testing.assert_allclose(offsets[:, 1], geometry.entropy.ravel())
    np.testing.assert_allclose(values["T_last"], document["strategies"]["last"]["rescale"]["T"])
    assert panels[7].get_ylabel().startswith("entropy without")
    slopes = figures["context_slopes"]
    maps = [ax for ax in slopes.axes if ax.get_images()]
    assert [ax.get_title() for ax in maps] == ["all keys", "without the first position"]
    expected = np.array(document["context"]["entropy_slope_per_head"], dtype=float)
    np.testing.assert_allclose(maps[0].get_images()[0].get_array().filled(np.nan), expected)
    for fig in figures.values():
        assert png_bytes(fig).startswith(b"\x89PNG") and "t" in fig.get_suptitle()


def test_tables_carry_the_new_columns(run):
    pytest.importorskip("pandas")
    from qkspectra.tables import head_table, layer_table

    document, geometry = run
    heads, layers = head_table(document, geometry), layer_table(document, geometry)
    np.testing.assert_allclose(heads["context_slope"].to_numpy().reshape(L, H),
                               np.array(document["context"]["entropy_slope_per_head"], dtype=float))
    np.testing.assert_allclose(heads["context_r2_without_first"].to_numpy().reshape(L, H),
                               np.array(document["context"]["without_first"]["r2_per_head"], dtype=float))
    without = heads["entropy_without_first"].to_numpy().reshape(L, H)
    np.testing.assert_array_equal(without, geometry.entropy_without_first)
    sink = np.array([row["mean_sink_mass_per_head"] for row in geometry.document["dynamic"]])
    np.testing.assert_array_equal(heads["sink_mass"].to_numpy().reshape(L, H), sink)
    np.testing.assert_allclose(layers["mean_sink_mass"], sink.mean(axis=1))
    np.testing.assert_allclose(layers["mean_entropy_without_first"], np.nanmean(without, axis=1))
    np.testing.assert_allclose(layers["context_median_slope"], document["context"]["per_layer"]["median_slope"])
    assert {"op_norm", "frobenius_norm", "stable_rank", "effective_rank", "context_buckets",
            "context_mean_r2_without_first"} <= {*heads.columns, *layers.columns}
    documented = (Path(__file__).parents[1] / "docs" / "tables.md").read_text()
    for column in [*heads.columns, *layers.columns]:
        assert f"`{re.sub(r'_(last|middle|best|group)$', '_{strategy}', column)}`" in documented, column


def test_key_figures_of_a_sweep(run):
    document, geometry = run
    figures = key_figures(document, geometry)
    best = link_rows(document)[0][0]
    assert figures["entropy_link_best"] == {
        "descriptor": best, "target": "entropy",
        "within_layer_spearman": document["descriptors"][best]["entropy"]["within_layer_spearman"]}
    assert figures["median_context_slope"] == document["context"]["median_slope"]
    sink = np.array([row["mean_sink_mass_per_head"] for row in geometry.document["dynamic"]])
    assert figures["mean_sink_mass"] == pytest.approx(sink.mean(), rel=1e-12)
    headline = headline_figures({"figures": figures})
    assert headline["strongest within-layer descriptor of entropy"] == best
    assert headline["mean sink mass"] == figures["mean_sink_mass"]
    # without the geometry, or from a document before the sections: null, never an error
    bare = key_figures({k: v for k, v in document.items() if k not in ("descriptors", "context")})
    assert (bare["entropy_link_best"], bare["median_context_slope"], bare["mean_sink_mass"]) == (None, None, None)
    older = copy.deepcopy(figures)
    for key in ("entropy_link_best", "median_context_slope", "mean_sink_mass"):
        del older[key]
    assert headline_figures({"figures": older})["median context slope"] is None
