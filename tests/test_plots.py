"""Figures: what each shows, labels and titles, the plots left out without a geometry, PNG bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qkspectra.geometry import load_geometry, parse_geometry
from qkspectra.analysis.document import AnalysisOptions, build_analysis_document
from qkspectra.report.plots import head_spread, png_bytes, report_figures, schedule_figure

GOLDEN = Path(__file__).parent / "data" / "golden"
TITLE = "minilm_like · 6 layers × 12 heads"


@pytest.fixture(scope="module")
def golden():
    geometry = load_geometry(GOLDEN / "minilm_like.json")
    return build_analysis_document(geometry), geometry


def visible_axes(fig):
    """The panels (not colour bars) that are shown."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_subplotspec() is not None]


def test_every_figure_with_a_geometry_labelled_and_titled(golden):
    document, geometry = golden
    figures = report_figures(document, geometry, title=TITLE)
    assert list(figures.figures) == [
        "evidence", "schedule", "temperature_heatmap", "residual_heatmap", "spectral_shapes", "entropy_scatter",
        "entropy_descriptors", "cross_head",
    ]
    assert figures.skipped == {"context_slopes": document["context"]["reason"]}  # no position keys in the golden file
    for name, fig in figures.figures.items():
        assert TITLE in fig.get_suptitle(), name
        for ax in visible_axes(fig):
            spec = ax.get_subplotspec()
            if spec.is_last_row():
                assert ax.get_xlabel(), name
            if spec.is_first_col():
                assert ax.get_ylabel(), name


def test_schedule_draws_each_strategy_mean_T(golden):
    document, geometry = golden
    fig = report_figures(document, geometry, title=TITLE).figures["schedule"]
    ax_t = fig.axes[0]
    labels = [line.get_label() for line in ax_t.get_lines()]
    for name in ("last", "middle", "best", "group"):
        (line,) = [ln for ln in ax_t.get_lines() if ln.get_label().startswith(f"anchor: {name} ")]
        np.testing.assert_allclose(line.get_ydata(), document["strategies"][name]["rescale"]["per_layer"]["mean_T"], rtol=1e-12)
    assert "anchor: group (L=2,3)" in labels


def test_entropy_scatter_titles_carry_the_correlations(golden):
    document, geometry = golden
    fig = report_figures(document, geometry, title=TITLE).figures["entropy_scatter"]
    titles = [ax.get_title() for ax in visible_axes(fig)]
    corr = document["strategies"]["middle"]["entropy"]["corr_T_entropy"]
    assert any("anchor: middle" in t and f"r = {corr:+.3f}" in t for t in titles)
    assert any(t.startswith("op-norm") for t in titles)


def test_without_geometry_the_per_head_plots_are_left_out_with_a_reason(golden):
    document, _ = golden
    figures = report_figures(document, None, title=TITLE)
    assert set(figures.skipped) == {"spectral_shapes", "entropy_scatter", "entropy_descriptors", "context_slopes"}
    assert all("geometry file" in reason for name, reason in figures.skipped.items() if name != "context_slopes")
    assert "schedule" in figures.figures


def test_static_only_geometry_has_no_entropy_plot():
    geometry = load_geometry(GOLDEN / "no_dynamic.json")
    figures = report_figures(build_analysis_document(geometry), geometry, title="x")
    no_dynamic = "the geometry has no dynamic (entropy) section"
    assert figures.skipped == {"entropy_scatter": no_dynamic, "entropy_descriptors": no_dynamic, "context_slopes": no_dynamic}


@pytest.mark.parametrize("name", ["one_layer", "one_head", "zero_heads"])
def test_degenerate_geometries_still_plot(name):
    geometry = load_geometry(GOLDEN / f"{name}.json")
    figures = report_figures(build_analysis_document(geometry), geometry, title=name)
    assert "schedule" in figures.figures and "cross_head" in figures.figures
    assert png_bytes(figures.figures["cross_head"]).startswith(b"\x89PNG")


def test_a_deep_wide_model_plots_with_readable_axes():
    """80 layers x 64 heads (a 70B-class shape): every figure renders; narrow heatmap panels keep <= 8 head labels."""
    rng = np.random.default_rng(0)
    L, H, K = 80, 64, 8
    sigma = -np.sort(-rng.lognormal(0.0, 0.5, (L, H, K)), axis=-1)  # (L, H, K)
    geometry = parse_geometry({
        "num_layers": L, "num_heads": H,
        "static": [{"metric_singvals_per_head": layer.tolist()} for layer in sigma],
        "dynamic": [{"mean_attention_entropy_per_head": layer.tolist()} for layer in rng.uniform(1, 4, (L, H))],
    })
    document = build_analysis_document(geometry, AnalysisOptions(nulls=None, bootstrap=None))
    figures = report_figures(document, geometry, title="deep")
    assert figures.skipped == {"context_slopes": document["context"]["reason"]}
    for name, fig in figures.figures.items():
        assert png_bytes(fig).startswith(b"\x89PNG"), name
    heatmap = figures.figures["temperature_heatmap"]
    panels = visible_axes(heatmap)
    assert len(panels) == 4
    for ax in panels:
        assert len(ax.get_xticks()) <= 8 and len(ax.get_yticks()) <= 16
        assert ax.get_images()[0].get_array().shape == (L, H)


def test_rank_k_curve_plotted_when_present(golden):
    document, geometry = golden
    curve = {"k": [0, 1, 2, 4], "spectral_mean_residual": [0.2, 0.1, 0.05, 0.01], "operator_mean_residual": [0.5, 0.3, 0.2, 0.1]}
    document = dict(document, rank_k={"last": {"spectral": {}, "operator": {}, "curve": curve}})
    fig = report_figures(document, geometry, title=TITLE).figures["rank_k"]
    spectral, operator = visible_axes(fig)
    assert (spectral.get_title(), operator.get_title()) == ("spectral level", "operator level")
    (line,) = [ln for ln in operator.get_lines() if ln.get_label() == "last"]
    np.testing.assert_allclose(line.get_ydata(), curve["operator_mean_residual"])
    assert operator.get_xlabel().startswith("rank k")


def test_png_has_no_software_stamp_and_is_reproducible():
    def figure():
        band = head_spread(np.array([[1.0, 1.2], [0.9, 1.1], [1.0, 1.0]]))  # (L=3, H=2)
        return schedule_figure({"last": band}, {"last": np.array([0.1, 0.05, 0.0])}, {"last": [2]}, "t")

    first, second = png_bytes(figure()), png_bytes(figure())
    assert first == second
    assert b"matplotlib" not in first.lower() and b"Software" not in first


def test_head_spread_is_mean_and_interquartile_range():
    x = np.arange(12, dtype=float).reshape(2, 6)  # (L=2, H=6)
    band = head_spread(x)
    np.testing.assert_allclose(band.mean, [2.5, 8.5])
    np.testing.assert_allclose(band.low, [1.25, 7.25])
    np.testing.assert_allclose(band.high, [3.75, 9.75])


def test_entropy_by_position_figure_has_a_panel_per_layer():
    from qkspectra.report.plots import entropy_by_position_figure

    rng = np.random.default_rng(3)
    log_keys = np.log(np.array([1.0, 2.4, 5.4, 11.4]))[None].repeat(7, 0)  # (L, buckets)
    fig = entropy_by_position_figure(rng.uniform(0, 1, (7, 3, 4)) * log_keys[:, None], log_keys, TITLE)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 7 and visible[6].get_title() == "layer 6"
    assert len(visible[0].lines) == 3 + 2  # heads, their mean, log(visible keys)


def test_schedule_residual_leaves_out_the_anchor_layers(golden):
    """Anchor layers fit themselves (residual 0): the curve is over the fitted layers, NaN at the anchors."""
    document, geometry = golden
    ax_r = report_figures(document, geometry, title=TITLE).figures["schedule"].axes[1]
    for name, s in document["strategies"].items():
        (line,) = [ln for ln in ax_r.get_lines() if ln.get_label() == name]
        y = np.asarray(line.get_ydata(), dtype=float)  # (L,)
        anchors = np.asarray(s["anchor"]["layers"]) == np.arange(y.size)
        assert anchors.any() and np.isnan(y[anchors]).all()
        np.testing.assert_allclose(y[~anchors], np.asarray(s["rescale"]["per_layer"]["mean_residual"])[~anchors], rtol=1e-12)
        assert np.nanmean(y) > 0 and s["anchor"]["num_fitted_layers"] == int((~anchors).sum())
