"""What predicts a head's entropy: the report's figures of ``descriptors`` and ``context``.

Two layers, as in ``plots``:

* ``descriptor_scatter_figure`` and ``context_slope_figure`` take arrays and return a ``Figure``;
* ``entropy_link_figures(document, geometry)`` reads them from ``analysis.json`` (the descriptors'
  correlations, their order, the context slopes) and the geometry (each head's descriptors and
  entropies), and says why a figure is left out.

Axes: L layers, H heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qkspectra.analysis.entropy_links import TEMPERATURE_STRATEGIES, spectrum_descriptors
from qkspectra.geometry import Geometry
from qkspectra.report.readers import ranked_descriptors, strategies

NO_GEOMETRY = "its geometry file is not beside the analysis file"
NO_DYNAMIC = "the geometry has no dynamic (entropy) section"
NO_DESCRIPTORS = "the analysis file has no descriptors section (written before qkspectra computed it)"
NO_CONTEXT = "the analysis file has no context section (written before qkspectra computed it)"
WITH_SINK, WITHOUT_SINK = "entropy", "entropy_without_first"  # the rows of the descriptor scatter
ROW_LABELS = {WITH_SINK: "mean attention entropy (nats)", WITHOUT_SINK: "entropy without the\nfirst position (nats)"}
_LOG_SPREAD = 20.0  # a positive descriptor spanning more than this factor is drawn on a log axis


def _num(x: float | None) -> str:
    return "n/a" if x is None else format(x, "+.3f")


def descriptor_scatter_figure(
    descriptors: Mapping[str, np.ndarray],
    entropies: Mapping[str, np.ndarray],
    correlations: Mapping[tuple[str, str], tuple[float | None, float | None]],
    title: str,
    note: str = "",
) -> Figure:
    """Each entropy (a row) against each descriptor (a column), heads coloured by layer.

    descriptors: name -> (L, H), in column order. entropies: row key (``WITH_SINK``, ``WITHOUT_SINK``)
    -> (L, H) nats, NaN where undefined (not drawn). correlations: (descriptor, row key) -> (Spearman
    over all heads, within-layer Spearman), None where undefined. note: a line under the title.
    """
    L = next(iter(entropies.values())).shape[0]
    cols, rows = len(descriptors), len(entropies)
    fig = Figure(figsize=(2.5 * cols + 1.2, 2.5 * rows + 1.3), layout="constrained")
    axes = fig.subplots(rows, cols, sharex="col", sharey="row", squeeze=False)
    layer_of = np.broadcast_to(np.arange(L)[:, None], next(iter(entropies.values())).shape)  # (L, H)
    norm = Normalize(0, max(L - 1, 1))
    for r, (target, y) in enumerate(entropies.items()):
        for c, (name, x) in enumerate(descriptors.items()):
            ax = axes[r, c]
            ax.scatter(x.ravel(), y.ravel(), c=layer_of.ravel(), cmap="viridis", norm=norm, s=9, alpha=0.8, linewidths=0)
            spearman, within = correlations.get((name, target), (None, None))
            ax.set_title(f"{name}\nρ {_num(spearman)}, within layers {_num(within)}", fontsize=8)
            finite = x[np.isfinite(x)]
            if finite.size and finite.min() > 0 and finite.max() > _LOG_SPREAD * finite.min():
                ax.set_xscale("log")
            if r == rows - 1:
                ax.set_xlabel(name, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[r, 0].set_ylabel(ROW_LABELS.get(target, target), fontsize=8)
    colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=axes.ravel().tolist(), label="layer", shrink=0.8)
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("What predicts a head's entropy: each descriptor, strongest within-layer link first "
                 f"(ρ: Spearman)\n{title}" + (f"\n{note}" if note else ""), fontsize=11)
    return fig


def context_slope_figure(slopes: Mapping[str, np.ndarray], title: str) -> Figure:
    """A layers x heads map of each head's context slope, one panel per fit, one shared colour scale.

    slopes: panel label -> (L, H), NaN where undefined (grey). The scale spans at least [0, 1]
    (0: attention over a fixed number of keys, 1: uniform attention), more where the 1st-99th
    percentiles reach further.
    """
    L, H = next(iter(slopes.values())).shape
    finite = np.concatenate([s[np.isfinite(s)] for s in slopes.values()])
    low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    norm = Normalize(min(0.0, float(low)), max(1.0, float(high)))
    cmap = colormaps["viridis"].with_extremes(bad="#d0d0d0")
    n = len(slopes)
    fig = Figure(figsize=(4.8 * n + 1.4, 1.2 + min(1.2 + 0.22 * L, 9.0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False).ravel())
    image = None
    for ax, (label, s) in zip(axes, slopes.items()):
        image = ax.imshow(np.ma.masked_invalid(s), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(np.arange(0, H, max(1, -(-H // 16))))
        ax.set_yticks(np.arange(0, L, max(1, -(-L // 16))))
    below, above = bool((finite < norm.vmin).any()), bool((finite > norm.vmax).any())
    extend = "both" if below and above else "min" if below else "max" if above else "neither"
    fig.colorbar(image, ax=axes.tolist(), shrink=0.9, extend=extend,
                 label="entropy slope on log(visible keys)\n(1: uniform, 0: fixed number of keys)")
    fig.suptitle(f"Entropy against context length, per head (grey: undefined)\n{title}", fontsize=11)
    return fig


# ----------------------------------------------------------------------------
# From the document and the geometry
# ----------------------------------------------------------------------------


def head_descriptors(document: Mapping[str, Any], geometry: Geometry) -> dict[str, np.ndarray]:
    """Each head's descriptors, (L, H) each: the spectrum's from the geometry, T_{strategy} from the document."""
    values = spectrum_descriptors(np.asarray(geometry.singular_values, dtype=np.float64))
    per = strategies(document)
    for name in TEMPERATURE_STRATEGIES:
        if name in per:
            values[f"T_{name}"] = np.asarray(per[name]["rescale"]["T"], dtype=np.float64)
    return values


def _descriptor_scatter(document: Mapping[str, Any], geometry: Geometry | None, title: str) -> Figure | str:
    if geometry is None:
        return NO_GEOMETRY
    if geometry.entropy is None:
        return NO_DYNAMIC
    ranked = ranked_descriptors(document)
    if not ranked:
        return NO_DESCRIPTORS
    values = head_descriptors(document, geometry)
    columns = {name: values[name] for name, _ in ranked if name in values}
    entropies = {WITH_SINK: np.asarray(geometry.entropy, dtype=np.float64)}
    note = ""
    if geometry.entropy_without_first is not None:
        entropies[WITHOUT_SINK] = np.asarray(geometry.entropy_without_first, dtype=np.float64)
    else:
        note = "(the geometry has no entropy without the first position: one row)"
    table = document["descriptors"]
    correlations = {(name, target): (table[name][target].get("spearman"), table[name][target].get("within_layer_spearman"))
                    for name in columns for target in entropies if isinstance(table[name].get(target), Mapping)}
    return descriptor_scatter_figure(columns, entropies, correlations, title, note)


def context_slopes(document: Mapping[str, Any]) -> dict[str, np.ndarray] | str:
    """Panel label -> (L, H) slopes (NaN where null) of ``context`` and ``context.without_first``, or why n/a."""
    context = document.get("context")
    if not isinstance(context, Mapping):
        return NO_CONTEXT
    out = {}
    for label, fit in (("all keys", context), ("without the first position", context.get("without_first") or {})):
        slope = fit.get("entropy_slope_per_head")
        if slope is not None:
            out[label] = np.array([[np.nan if v is None else v for v in row] for row in slope], dtype=np.float64)
    if not out:
        return str(context.get("reason") or "no head has a context slope")
    if not any(np.isfinite(s).any() for s in out.values()):
        return "no head has a defined context slope (" + str(context.get("reason")) + ")"
    return out


def entropy_link_figures(document: Mapping[str, Any], geometry: Geometry | None, *, title: str
                         ) -> tuple[dict[str, Figure], dict[str, str]]:
    """(name -> Figure, name -> why left out) for ``entropy_descriptors`` and ``context_slopes``."""
    figures: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    scatter = _descriptor_scatter(document, geometry, title)
    if isinstance(scatter, str):
        skipped["entropy_descriptors"] = scatter
    else:
        figures["entropy_descriptors"] = scatter
    slopes = context_slopes(document)
    if isinstance(slopes, str):
        skipped["context_slopes"] = slopes
    else:
        figures["context_slopes"] = context_slope_figure(slopes, title)
    return figures, skipped
