"""The evidence at a glance: each layer of the verdict, its deciding figure against its thresholds.

Built from the analysis document alone (``analysis.json``; no geometry), so that it renders from
a JSON file and in every run folder of a sweep. Two parts, kept apart as in ``plots``:

* ``evidence_panels(document)`` reads the figure each layer of the verdict is decided on, chosen by
  the verdict's own functions (``verdict.best_operator_residual``, ``smallest_functional_change``,
  ``deciding_null_figures``, ...), and the layer's code as the document records it;
* ``evidence_figure(panels, overall, title)`` draws them, one row per layer in ``verdict.LAYERS`` order.

The nulls store their mean, std and p-value, not their draws: a null shows as mean ± 1 and ± 2 std.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from qkspectra.analysis.nulls import NULL_LABELS, SHAPE_INVARIANCE, FigureNull, NullBaseline
from qkspectra.analysis.seed import PARTIAL_BELOW, SUPPORTED_BELOW
from qkspectra.analysis.verdict import (
    LAYERS,
    THRESHOLDS,
    beats_null,
    best_operator_residual,
    deciding_null_figures,
    null_figure_labels,
    smallest_functional_change,
)

# (strong, light) per code: report.html's verdict boxes (typeset.CSS: border, background)
VERDICT_COLOURS = {
    "supported": ("#2e9a4d", "#e8f6ec"),
    "partial": ("#e09b1a", "#fff5e0"),
    "rejected": ("#cc3b30", "#fdeceb"),
    "n/a": ("#8a93a3", "#f0f2f5"),
}
NO_LAYERED_VERDICT = "the document has no layered verdict (it was written before qkspectra gave one)"


# ----------------------------------------------------------------------------
# From the document to panels (no matplotlib)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Gauge:
    """One deciding figure against its layer's two thresholds (lower is better).

    value: what the verdict grades; title: which figure it is and whose (strategy, layers); axis: its quantity.
    measured, control, control_tolerance: the functional layer only (the measured change when the
    verdict counts it as 0, being within the control's rounding; the control's change; the control's
    change above which the layer is n/a).
    """

    value: float
    title: str
    axis: str
    supported_below: float
    partial_below: float
    log: bool = False
    seed_figure: float | None = None  # spectral only: the seed's mean over all layers, anchor layers' zeros included
    measured: float | None = None
    control: float | None = None
    control_tolerance: float | None = None


@dataclass(frozen=True)
class NullRow:
    """One real figure against one null: the null's mean, std and p-value (None: that null is unavailable)."""

    null: str  # its label
    draws: int
    real: float | None
    null_mean: float | None
    null_std: float | None
    p_value: float | None
    reason: str | None = None  # why the null is unavailable


@dataclass(frozen=True)
class NullFigure:
    """One figure the null layer compares with chance: its label and one row per null."""

    label: str
    higher_is_alike: bool
    rows: tuple[NullRow, ...]


@dataclass(frozen=True)
class Panel:
    """One layer of the verdict: its code, its sentence, and what to draw (neither: the layer is n/a)."""

    layer: str
    code: str
    evidence: str
    gauge: Gauge | None = None
    nulls: tuple[NullFigure, ...] = ()
    beaten: dict[str, bool] | None = None  # null label -> beaten (spectral_vs_null only)
    alpha: float | None = None


def null_baselines(document: Mapping[str, Any]) -> dict[str, NullBaseline] | None:
    """The document's ``null`` section as the verdict's ``NullBaseline``s (None when not computed)."""
    nulls = document.get("null")
    if not nulls:
        return None
    return {
        name: NullBaseline(
            name, bool(null.get("available")), null.get("reason"), int(null.get("draws") or 0), null.get("seed"),
            {figure: FigureNull(f.get("real"), f.get("null_mean"), f.get("null_std"), f.get("p_value"))
             for figure, f in (null.get("figures") or {}).items()},
        )
        for name, null in nulls.items()
    }


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def spectral_gauge(document: Mapping[str, Any]) -> Gauge | None:
    """The primary strategy's mean scalar-rescale residual over its fitted layers (the seed's thresholds)."""
    rescale, anchor = document.get("rescale") or {}, document.get("anchor") or {}
    fitted = rescale.get("mean_residual_fitted")
    if not isinstance(fitted, (int, float)):
        return None
    return Gauge(
        float(fitted),
        f"mean scalar-rescale residual of the spectra over the fitted layers ({anchor.get('strategy')} anchor, "
        f"{_count(anchor.get('num_fitted_layers'), 'fitted layer')}; the seed's thresholds)",
        "mean rescale residual ||σ − Tσ_anchor|| / ||σ||, fitted layers",
        SUPPORTED_BELOW, PARTIAL_BELOW, seed_figure=rescale.get("mean_residual"),
    )


def null_comparison(document: Mapping[str, Any]) -> tuple[tuple[NullFigure, ...], dict[str, bool]]:
    """The figures the null layer decides on, per null, and which nulls the real spectra beat."""
    nulls = null_baselines(document) or {}
    strategy = str((document.get("anchor") or {}).get("strategy"))  # the primary strategy, as the verdict's
    deciding = deciding_null_figures(nulls, strategy)
    figures = []
    for figure, label in null_figure_labels(strategy).items():
        rows = []
        for name, null in nulls.items():
            if not null.available:
                rows.append(NullRow(NULL_LABELS.get(name, name), null.draws, None, None, None, None, null.reason or "unavailable"))
            elif figure in deciding.get(name, {}):
                f = deciding[name][figure]
                rows.append(NullRow(NULL_LABELS.get(name, name), null.draws, f.real, f.null_mean, f.null_std, f.p_value))
        if rows:
            figures.append(NullFigure(label, figure == SHAPE_INVARIANCE, tuple(rows)))
    beaten = {NULL_LABELS.get(name, name): beats_null(f, THRESHOLDS) for name, f in deciding.items()}
    return tuple(figures), beaten


def operator_gauge(document: Mapping[str, Any]) -> Gauge | None:
    """The lowest operator residual among the strategies the verdict chooses from."""
    operator = document.get("operator")
    best = None if not isinstance(operator, Mapping) else best_operator_residual(dict(operator))
    if best is None:
        return None
    value, name, kind = best
    t = THRESHOLDS
    layers = operator[name].get("num_fitted_layers")
    return Gauge(value, f"lowest mean operator residual among the strategies the verdict compares ({name} anchor, {kind}, "
                        f"{_count(layers, 'fitted layer')})", "mean operator residual, fitted layers",
                 t.operator_supported, t.operator_partial)


def functional_gauge(document: Mapping[str, Any]) -> Gauge | None:
    """The smallest change of the model among the strategies the verdict chooses from, and the control's."""
    functional = document.get("functional")
    best = None if not isinstance(functional, Mapping) else smallest_functional_change(dict(functional))
    if best is None:
        return None
    entry = functional[best.strategy]
    cosine = (entry.get("operator") or {}).get("loss_kind") == "final_hidden_cosine_distance"
    axis = "cosine distance of the final hidden states" if cosine else "|relative change of the next-token loss|"
    t = THRESHOLDS
    title = (f"smallest change of the model, operators replaced by the rescaled anchor's ({best.strategy} anchor, "
             f"{_count(entry.get('replaced_layers'), 'layer')} replaced); grey: the control")
    return Gauge(best.counted, title, axis,
                 t.functional_supported, t.functional_partial, log=True, measured=best.measured, control=best.control,
                 control_tolerance=t.control_tolerance)


def evidence_panels(document: Mapping[str, Any]) -> tuple[Panel, ...]:
    """One panel per layer of the verdict, in ``verdict.LAYERS`` order; codes and sentences as the document records them.

    A layer the verdict graded shows its deciding figure; an n/a layer (or one the document lacks) its reason.
    """
    recorded = (document.get("verdict") or {}).get("layers") or {}
    panels = []
    for layer in LAYERS:
        entry = recorded.get(layer) or {"code": "n/a", "evidence": "Not in the document."}
        code, evidence = str(entry.get("code")), str(entry.get("evidence") or "")
        if code == "n/a":
            panels.append(Panel(layer, code, evidence))
        elif layer == "spectral_vs_null":
            figures, beaten = null_comparison(document)
            panels.append(Panel(layer, code, evidence, nulls=figures, beaten=beaten, alpha=THRESHOLDS.alpha))
        else:
            gauge = {"spectral": spectral_gauge, "operator": operator_gauge, "functional": functional_gauge}[layer](document)
            panels.append(Panel(layer, code, evidence, gauge=gauge))
    return tuple(panels)


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------


def _zones(ax, gauge: Gauge, low: float, high: float) -> None:
    """The three grades as bands along the bottom, threshold lines across."""
    edges = ((low, gauge.supported_below, "supported"), (gauge.supported_below, gauge.partial_below, "partial"),
             (gauge.partial_below, high, "rejected"))
    for start, end, code in edges:
        if end > start:
            ax.axvspan(start, end, ymin=0.0, ymax=0.16, color=VERDICT_COLOURS[code][0], alpha=0.45, linewidth=0)
    for x, code in ((gauge.supported_below, "supported"), (gauge.partial_below, "partial")):
        ax.axvline(x, color=VERDICT_COLOURS[code][0], linewidth=1.0, linestyle="--")
        ax.text(x, 0.19, f" {code} below {x:g} ", color=VERDICT_COLOURS[code][0], fontsize=7.5, ha="right", va="bottom",
                transform=ax.get_xaxis_transform())


MARK = 0.5  # height of a gauge's markers, in axes fraction


def _gauge(ax, gauge: Gauge, code: str, layer: str) -> None:
    strong = VERDICT_COLOURS[code][0]
    shown = gauge.measured if gauge.log and gauge.value == 0 else gauge.value  # a counted 0 sits at the measured change
    points = [v for v in (shown, gauge.supported_below, gauge.partial_below, gauge.seed_figure, gauge.control,
                          gauge.control_tolerance) if v is not None]
    if gauge.log:
        positive = [v for v in points if v > 0]
        low, high = min(positive) / 4, max(positive) * 4
        ax.set_xscale("log")
    else:
        low, high = 0.0, max(points) * 1.18
    ax.set_xlim(low, high)
    ax.set_ylim(0, 1)
    if gauge.log and shown <= 0:
        shown = low  # no change at all: at the axis' left end
    _zones(ax, gauge, low, high)
    if gauge.control is not None:
        if gauge.control_tolerance is not None:
            ax.axvline(gauge.control_tolerance, color="grey", linewidth=0.8, linestyle=":")
            ax.text(gauge.control_tolerance, 0.97, " control tolerance ", fontsize=7, color="grey", ha="right", va="top",
                    transform=ax.get_xaxis_transform())
        if gauge.control > 0:
            ax.plot([gauge.control], [MARK], "o", color="grey", markersize=8, gid=f"control:{layer}")
            ax.annotate(f"control {gauge.control:.2g}", (gauge.control, MARK), xytext=(0, 9), textcoords="offset points",
                        ha="center", fontsize=8, color="dimgrey")
        else:
            ax.text(0.01, MARK, f"control {gauge.control:g}", fontsize=8, color="dimgrey", transform=ax.transAxes, va="center")
    if gauge.seed_figure is not None:
        side = -1 if gauge.seed_figure <= shown else 1  # away from the deciding figure
        ax.plot([gauge.seed_figure], [MARK], "o", markerfacecolor="none", color="grey", markersize=8)
        ax.annotate("over all layers\n(the seed's figure)", (gauge.seed_figure, MARK), xytext=(8 * side, 0),
                    textcoords="offset points", ha="right" if side < 0 else "left", va="center", fontsize=7, color="dimgrey")
    ax.plot([shown], [MARK], "D", color=strong, markersize=13, markeredgecolor="black", markeredgewidth=0.8, gid=f"deciding:{layer}")
    value = f"{gauge.value:.3g}" if gauge.log else f"{gauge.value:.3f}"
    if gauge.log and gauge.value == 0:
        value = f"0 (measured {gauge.measured:.3g}, within {THRESHOLDS.control_multiple:g}× the control's)"
    ax.annotate(value, (shown, MARK), xytext=(0, 11), textcoords="offset points", ha="center", va="bottom", fontsize=10,
                fontweight="bold", color=strong, gid=f"value:{layer}",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0})
    ax.set_yticks([])
    ax.set_title(gauge.title, fontsize=9, loc="left")
    ax.set_xlabel(gauge.axis + (" (log scale)" if gauge.log else ""), fontsize=8)


def _null_axis(ax, figure: NullFigure, panel: Panel, layer: str) -> None:
    """One figure against each null: the null as mean (tick), ± 1 std (dark) and ± 2 std (light); the real figure as a line."""
    rows = figure.rows[::-1]  # first null on top
    y = np.arange(len(rows), dtype=float)  # (nulls,)
    ends = []
    for yi, row in zip(y, rows):
        if row.real is None:
            ax.text(0.5, yi, f"{row.null} null unavailable: {row.reason}", ha="center", va="center", fontsize=7.5,
                    color="dimgrey", transform=ax.get_yaxis_transform())
            continue
        for k, shade in ((2, "#d5d9e0"), (1, "#9aa3b2")):
            ax.barh(yi, 2 * k * row.null_std, left=row.null_mean - k * row.null_std, height=0.42, color=shade, linewidth=0)
        ax.plot([row.null_mean] * 2, [yi - 0.26, yi + 0.26], color="black", linewidth=1.4)
        ends += [row.real, row.null_mean - 2.5 * row.null_std, row.null_mean + 2.5 * row.null_std]
        beaten = row.p_value <= panel.alpha
        ax.annotate(f"p = {row.p_value:.3g}", (1.0, yi), xycoords=("axes fraction", "data"), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8.5, fontweight="bold",
                    color=VERDICT_COLOURS["supported" if beaten else "rejected"][0], gid=f"p:{layer}:{row.null}:{figure.label}")
    reals = {row.real for row in rows if row.real is not None}
    for real in reals:
        ax.axvline(real, color=VERDICT_COLOURS[panel.code][0], linewidth=2.2, gid=f"real:{layer}:{figure.label}")
        ax.annotate(f"real {real:.3f}", (real, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8, color=VERDICT_COLOURS[panel.code][0], fontweight="bold")
    if ends:
        low, high = min(ends), max(ends)
        pad = 0.08 * (high - low or abs(high) or 1.0)
        ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(y, [f"{row.null} null\n{row.draws} draws" for row in rows], fontsize=8)
    ax.set_xlabel(f"{figure.label} ({'higher' if figure.higher_is_alike else 'lower'} = more alike)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7.5)


def _not_available(ax, panel: Panel) -> None:
    reason = panel.evidence or "no figure to show"
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(reason, 100)), ha="center", va="center", fontsize=8.5, color="dimgrey",
            transform=ax.transAxes, gid=f"reason:{panel.layer}")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# Fixed layout, in inches: rows of the same width, their axes aligned from row to row.
WIDTH, TOP, BOTTOM, GAP = 11.0, 0.8, 0.1, 0.1
LABEL_WIDTH, RIGHT = 1.75, 0.3  # the code's column; the right margin
GAUGE_HEIGHT, NULL_HEIGHT, NA_HEIGHT = 1.7, 2.0, 0.95
TICK_LABELS, P_LABELS = 0.95, 0.8  # room left and right of each null axis


def _row_height(panel: Panel) -> float:
    return NULL_HEIGHT if panel.nulls else GAUGE_HEIGHT if panel.gauge is not None else NA_HEIGHT


def _axes(fig: Figure, x0: float, y0: float, x1: float, y1: float, height: float):
    """An axes at [x0, x1] x [y0, y1] inches (y up from the figure's bottom) in a figure ``height`` inches tall."""
    return fig.add_axes((x0 / WIDTH, y0 / height, (x1 - x0) / WIDTH, (y1 - y0) / height))


def evidence_figure(panels: Sequence[Panel], overall: str, title: str) -> Figure:
    """One row per layer of the verdict: its deciding figure against its thresholds (or its nulls), coloured by its code.

    panels: from ``evidence_panels``; overall: the verdict's overall code; title: names the run.
    """
    heights = [_row_height(p) for p in panels]
    height = TOP + sum(heights) + GAP * (len(panels) - 1) + BOTTOM
    fig = Figure(figsize=(WIDTH, height))
    top = height - TOP
    for panel, h in zip(panels, heights):
        bottom = top - h
        strong, light = VERDICT_COLOURS.get(panel.code, VERDICT_COLOURS["n/a"])
        fig.patches.append(Rectangle((0.05 / WIDTH, bottom / height), (WIDTH - 0.1) / WIDTH, h / height, transform=fig.transFigure,
                                     facecolor=light, edgecolor=strong, linewidth=2.0, zorder=-1, gid=f"panel:{panel.layer}"))
        fig.text(0.25 / WIDTH, (bottom + h / 2) / height, f"{panel.layer}\n{panel.code.upper()}", ha="left", va="center",
                 fontsize=10.5, fontweight="bold", color=strong, gid=f"code:{panel.layer}")
        left, right = LABEL_WIDTH, WIDTH - RIGHT
        if panel.nulls:
            verdicts = ", ".join(f"{name} {'beaten' if b else 'not beaten'}" for name, b in (panel.beaten or {}).items())
            fig.text(left / WIDTH, (top - 0.12) / height, f"the real spectra against chance (a null is beaten when both p ≤ "
                     f"{panel.alpha:g}): {verdicts}", fontsize=9, va="top")
            column = (right - left) / len(panel.nulls)
            for i, figure in enumerate(panel.nulls):
                x0 = left + i * column
                ax = _axes(fig, x0 + TICK_LABELS, bottom + 0.5, x0 + column - P_LABELS, top - 0.62, height)
                _null_axis(ax, figure, panel, panel.layer)
        elif panel.gauge is not None:
            _gauge(_axes(fig, left, bottom + 0.52, right, top - 0.36, height), panel.gauge, panel.code, panel.layer)
        else:
            _not_available(_axes(fig, left, bottom + 0.1, right, top - 0.1, height), panel)
        top = bottom - GAP
    fig.suptitle(f"The evidence at a glance: overall {overall.upper()}\n{title}", fontsize=11, y=1 - 0.1 / height, va="top")
    return fig
