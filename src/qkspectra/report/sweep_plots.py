"""The sweep's figures (matplotlib, Agg, no pyplot state), as ``plots`` does for one run.

* ``*_figure`` functions take arrays and labels and return a ``Figure``; they compute nothing.
* ``sweep_figures(document)`` reads ``sweep.json``'s document (through ``sweep_readers``) and calls them.

Axes: M models (those that ran), L layers of one model, F key figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from qkspectra.report.sweep_readers import (
    HEADLINE,
    TEXT_HEADLINE,
    VERDICT_COLUMNS,
    headline_figures,
    numeric_labels,
    plot_name,
    verdict_codes,
)

CODE_VALUES = {"rejected": 0, "partial": 1, "supported": 2, "n/a": 3}
CODE_COLOURS = ("#e8a09a", "#f5cf85", "#8fd19e", "#e6e9ee")  # in CODE_VALUES order, as report.html's verdict boxes


def schedules_figure(schedules: Mapping[str, np.ndarray], title: str) -> Figure:
    """Mean T over heads against relative depth layer / (L - 1), one line per model; schedules: name -> (L,)."""
    fig = Figure(figsize=(9, 5.2), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    for i, (name, mean_T) in enumerate(schedules.items()):
        depth = np.linspace(0.0, 1.0, mean_T.size) if mean_T.size > 1 else np.zeros(1)  # (L,)
        colour = cmap(i / max(len(schedules) - 1, 1))
        ax.plot(depth, mean_T, marker="o", markersize=3, linewidth=1.6, color=colour, label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("relative depth  layer / (L - 1)")
    ax.set_ylabel("temperature T (mean over heads)")
    ax.grid(alpha=0.3)
    if len(schedules) <= 24:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Temperature schedules (anchor: last layer)\n{title}", fontsize=11)
    return fig


def verdict_grid_figure(models: Sequence[str], columns: Sequence[str], codes: Sequence[Sequence[str]], title: str) -> Figure:
    """Models (rows) by verdict layers (columns), each cell coloured and labelled by its code; codes: (M, C)."""
    values = np.array([[CODE_VALUES.get(code, 3) for code in row] for row in codes], dtype=float).reshape(len(models), len(columns))
    fig = Figure(figsize=(1.6 * len(columns) + 3, 0.38 * len(models) + 1.8), layout="constrained")
    ax = fig.subplots()
    ax.imshow(values, cmap=ListedColormap(CODE_COLOURS), vmin=-0.5, vmax=3.5, aspect="auto")
    for (row, column), code in np.ndenumerate(np.array(codes, dtype=object).reshape(values.shape)):
        ax.text(column, row, code, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), [c.replace("_", " ") for c in columns], fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title(f"Layered verdict per model\n{title}", fontsize=11)
    return fig


def figures_against_label_figure(label: str, x: np.ndarray, figures: Mapping[str, np.ndarray], title: str) -> Figure:
    """Each key figure against one numeric label, a panel per figure; x: (M,), figures: name -> (M,), NaN where absent."""
    order = np.argsort(x, kind="stable")
    columns = min(len(figures), 3)
    rows = -(-len(figures) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (name, y) in zip(axes, figures.items()):
        shown = order[np.isfinite(y[order])]
        ax.plot(x[shown], y[shown], marker="o", markersize=4, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if not shown.size:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[len(figures):]:
        ax.set_visible(False)
    fig.suptitle(f"Key figures against {label}\n{title}", fontsize=11)
    return fig


# ----------------------------------------------------------------------------
# From the sweep document
# ----------------------------------------------------------------------------


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else np.nan


def sweep_figures(document: Mapping[str, Any], *, title: str) -> dict[str, Figure]:
    """Every sweep figure, name -> Figure: the schedules, the verdicts, and the models table's headline
    figures against each numeric label (``sweep_readers.numeric_labels``); ``title`` names the sweep."""
    ran = [m for m in document["models"] if m["status"] == "ok"]
    if not ran:
        return {}
    scalars = {m["name"]: headline_figures(m) for m in ran}  # model name -> headline figure -> value
    figures = {
        "sweep_schedules": schedules_figure(
            {m["name"]: np.asarray(m["figures"]["schedule"]["mean_T"], dtype=float) for m in ran}, title
        ),
        "sweep_verdicts": verdict_grid_figure([m["name"] for m in ran], VERDICT_COLUMNS, [verdict_codes(m) for m in ran], title),
    }
    for label in numeric_labels(document):
        x = np.array([_number(m["labels"].get(label)) for m in ran])  # (M,)
        keep = np.isfinite(x)
        if not keep.any():
            continue
        values = {name: np.array([_number(scalars[m["name"]][name]) for m in ran])[keep]
                  for name in HEADLINE if name not in TEXT_HEADLINE}  # (M',) each
        figures[plot_name(label)] = figures_against_label_figure(label, x[keep], values, title)
    return figures
