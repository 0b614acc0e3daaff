"""The report's figures (matplotlib, Agg, no pyplot state).

Two layers, kept apart:

* ``*_figure`` functions take arrays and labels and return a ``Figure``; they compute nothing.
* ``report_figures(document, geometry)`` reads an analysis document (``analysis.json``) and,
  when available, the geometry it came from, derives the arrays and calls them.

Axes: L layers, H heads, K singular values, N points of a rank-k curve.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullLocator

from qkspectra.analysis.seed import PARTIAL_BELOW, SUPPORTED_BELOW, spectral_shape
from qkspectra.geometry import Geometry
from qkspectra.report.entropy_plots import entropy_link_figures
from qkspectra.report.evidence_plot import NO_LAYERED_VERDICT, evidence_figure, evidence_panels
from qkspectra.report.readers import strategies

# colour, marker, line style: strategies sharing an anchor draw on top of each other, so they differ in all three
STRATEGY_STYLES = {
    "last": ("#1f77b4", "o", "-"),
    "middle": ("#ff7f0e", "s", "--"),
    "best": ("#2ca02c", "^", "-."),
    "group": ("#d62728", "D", ":"),
}
DPI = 110


def _style(strategy: str, i: int) -> dict[str, Any]:
    colour, marker, line = STRATEGY_STYLES.get(strategy, (f"C{4 + i}", "v", "-"))
    return {"color": colour, "marker": marker, "linestyle": line, "markersize": 5, "linewidth": 2.2 - 0.35 * i,
            "markerfacecolor": "none" if i % 2 else colour}


@dataclass(frozen=True)
class HeadSpread:
    """A per-layer figure summarised over heads: mean, 25th and 75th percentile, each (L,)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def fitted_residual(residual: np.ndarray, anchor: Mapping[str, Any]) -> np.ndarray:
    """residual: (L, H) -> the mean over heads of each fitted layer, (L,), NaN at the anchor layers.

    anchor: a strategy's ``anchor`` section; ``layers`` (L,) names each layer's anchor layer, and a
    layer is fitted when that is another layer (as ``seed.Anchor.fitted``).
    """
    L = residual.shape[0]
    layers = anchor.get("layers")
    if isinstance(layers, list) and len(layers) == L:
        fitted = np.asarray(layers) != np.arange(L)  # (L,)
    else:  # a document without the per-layer anchors: its anchor layers
        fitted = ~np.isin(np.arange(L), anchor["group_anchors"])
    return np.where(fitted, residual.mean(axis=1), np.nan)


def head_spread(x: np.ndarray) -> HeadSpread:
    """x: (L, H) -> mean and interquartile range over heads, each (L,)."""
    low, high = np.percentile(x, [25, 75], axis=1)
    return HeadSpread(x.mean(axis=1), low, high)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG; no software version or date in the file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


# ----------------------------------------------------------------------------
# Figures from arrays
# ----------------------------------------------------------------------------


def schedule_figure(
    T: Mapping[str, HeadSpread],
    residual: Mapping[str, np.ndarray],
    anchors: Mapping[str, list[int]],
    title: str,
) -> Figure:
    """The temperature schedule over depth, and how well each anchor reconstructs it.

    T: per strategy, T over heads (mean line, interquartile band), each (L,).
    residual: per strategy, the mean rescale residual of each fitted layer, (L,), NaN at its anchor layers
        (they fit themselves, residual 0 by construction; ``fitted_residual``), which the curve leaves out.
    anchors: per strategy, its anchor layer(s), marked on the T curve.
    """
    fig = Figure(figsize=(10, 7.2), layout="constrained")
    ax_t, ax_r = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    for i, (name, band) in enumerate(T.items()):
        layers = np.arange(band.mean.size)
        style = _style(name, i)
        ax_t.fill_between(layers, band.low, band.high, color=style["color"], alpha=0.10, linewidth=0)
        ax_t.plot(layers, band.mean, **style, label=f"anchor: {name} (L={_layers(anchors[name])})")
        marked = sorted({a for a in anchors[name] if 0 <= a < band.mean.size})
        ax_t.plot(marked, band.mean[marked], "*", color=style["color"], markersize=15, markeredgecolor="black", markeredgewidth=0.6)
        ax_r.plot(layers, residual[name], **style, label=name)
    ax_t.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax_t.set_ylabel("temperature T (mean over heads;\nband: 25th-75th percentile)")
    ax_t.legend(fontsize=8, title="★ = anchor layer", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_t.grid(alpha=0.3)
    ax_r.axhline(SUPPORTED_BELOW, color="green", linewidth=0.8, linestyle="--", label=f"supported below {SUPPORTED_BELOW:.2f}")
    ax_r.axhline(PARTIAL_BELOW, color="orange", linewidth=0.8, linestyle="--", label=f"partial below {PARTIAL_BELOW:.2f}")
    ax_r.set_ylabel("mean rescale residual\n||σ - Tσ_anchor|| / ||σ||\n(fitted layers)")
    ax_r.set_xlabel("layer")
    ax_r.set_ylim(bottom=0)
    ax_r.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="anchor layers left out\n(residual 0 by construction)",
                title_fontsize=8)
    ax_r.grid(alpha=0.3)
    ax_r.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"Temperature schedule over depth\n{title}", fontsize=11)
    return fig


def heatmap_figure(
    values: Mapping[str, np.ndarray], quantity: str, title: str, *, cmap: str, vmin: float, vmax: float, log: bool = False
) -> Figure:
    """One layer x head heatmap per strategy, one shared colour scale. values: per strategy (L, H).

    Values outside [vmin, vmax] take the end colours; the colour bar then shows an arrow.
    log: logarithmic colour scale (ratios such as T; needs vmin > 0).
    """
    n = len(values)
    L, H = next(iter(values.values())).shape
    cols = n if L > H else min(n, 2)  # deep models: panels side by side, each tall
    rows = -(-n // cols)
    width = 9.5 if cols <= 2 else min(3.2 * cols + 1.4, 13.0)
    fig = Figure(figsize=(width, 1.0 + rows * min(1.2 + 0.22 * L, 9.0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    norm = LogNorm(vmin, vmax) if log else Normalize(vmin, vmax)
    image = None
    for ax, (name, x) in zip(axes, values.items()):
        image = ax.imshow(x, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"anchor: {name}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(_ticks(H, 8 if cols > 2 else 16))  # narrow panels: fewer head labels
        ax.set_yticks(_ticks(L))
    for ax in axes[n:]:
        ax.set_visible(False)
    below = any(bool((x < vmin).any()) for x in values.values())
    above = any(bool((x > vmax).any()) for x in values.values())
    extend = "both" if below and above else "min" if below else "max" if above else "neither"
    colorbar = fig.colorbar(image, ax=axes[:n].tolist(), label=quantity, shrink=0.9, extend=extend)
    if log:
        colorbar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        colorbar.ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    fig.suptitle(f"{quantity} per head\n{title}", fontsize=11)
    return fig


def spectral_shapes_figure(shape: np.ndarray, title: str) -> Figure:
    """Each head's spectral shape (σ / σ_max) at every layer, coloured by depth; one panel per head.

    shape: (L, H, K), NaN where a spectrum is zero or padded (not drawn on the log axis).
    """
    L, H, K = shape.shape
    cols = min(H, 4 if H <= 16 else 6)
    rows = -(-H // cols)
    width, height = 2.6 * cols + 1.4, 1.9 * rows + 1.2
    fig = Figure(figsize=(width, height))  # fixed margins: constrained layout doubles the drawing time here
    margin_in = {"left": 0.75, "right": 1.1, "top": 1.05, "bottom": 0.55}  # top: two title lines, then head titles
    fig.subplots_adjust(
        left=margin_in["left"] / width, right=1 - margin_in["right"] / width,
        top=1 - margin_in["top"] / height, bottom=margin_in["bottom"] / height, wspace=0.08, hspace=0.3,
    )
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    norm = Normalize(0, max(L - 1, 1))
    cmap = "viridis"
    colours = colormaps[cmap](norm(np.arange(L)))  # (L, 4)
    index = np.arange(1, K + 1)
    for h, ax in enumerate(axes[:H]):
        for layer in range(L):
            ax.plot(index, shape[layer, h], color=colours[layer], linewidth=0.9)
        ax.set_title(f"head {h}", fontsize=8, pad=2)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_minor_locator(NullLocator())
    for ax in axes[H:]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols : H]:
        ax.set_xlabel("singular value index k", fontsize=8)
    for ax in axes[:H:cols]:
        ax.set_ylabel("σ_k / σ_1", fontsize=8)
    colorbar_axes = fig.add_axes((1 - 0.8 / width, 0.2, 0.15 / width, 0.6))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=colorbar_axes, label="layer (depth)")
    fig.suptitle(f"Spectral shape of each head across layers (same shape = lines overlap)\n{title}", fontsize=11,
                 y=1 - 0.12 / height, va="top")
    return fig


def entropy_scatter_figure(
    entropy: np.ndarray,
    xs: Mapping[str, np.ndarray],
    correlations: Mapping[str, tuple[float | None, float | None]],
    title: str,
) -> Figure:
    """T (per strategy) and op-norm against mean attention entropy; points coloured by layer.

    entropy: (L, H) nats. xs: panel label -> (L, H) values. correlations: panel label ->
    (Pearson, Spearman), None where undefined.
    """
    L = entropy.shape[0]
    n = len(xs)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.0 * cols + 1.0, 3.4 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    layer_of = np.broadcast_to(np.arange(L)[:, None], entropy.shape)  # (L, H)
    norm = Normalize(0, max(L - 1, 1))
    points = None
    for ax, (label, x) in zip(axes, xs.items()):
        pearson, spearman = correlations[label]
        points = ax.scatter(x.ravel(), entropy.ravel(), c=layer_of.ravel(), cmap="viridis", norm=norm, s=14, alpha=0.85)
        ax.set_title(f"{label}\nPearson r = {_num(pearson, '+.3f')}, Spearman ρ = {_num(spearman, '+.3f')}", fontsize=9)
        ax.set_xlabel(label.split(" (")[0])
        ax.grid(alpha=0.3)
    for ax in axes[:n:cols]:
        ax.set_ylabel("mean attention entropy (nats)")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(points, ax=axes[:n].tolist(), label="layer", shrink=0.8)
    fig.suptitle(f"Temperature and operator norm against attention entropy (negative r expected)\n{title}", fontsize=11)
    return fig


def entropy_by_position_figure(entropy: np.ndarray, log_keys: np.ndarray, title: str) -> Figure:
    """Per layer, each head's mean attention entropy against query position, beside log(visible keys).

    entropy: (L, H, buckets) nats, bucket b holding the queries at 1-based positions 2^b .. 2^(b+1) - 1.
    log_keys: (L, buckets) the mean log of the number of keys those queries see (uniform attention's entropy).
    """
    L, H, buckets = entropy.shape
    cols = min(L, 6)
    rows = -(-L // cols)
    fig = Figure(figsize=(2.4 * cols + 0.6, 2.0 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    position = 2.0 ** np.arange(buckets)  # (buckets,) each bucket's first position
    for layer, ax in enumerate(axes[:L]):
        ax.plot(position, entropy[layer].T, color="tab:blue", lw=0.6, alpha=0.45)
        ax.plot(position, entropy[layer].mean(axis=0), color="tab:blue", lw=1.8, label="mean over heads")
        ax.plot(position, log_keys[layer], color="black", ls="--", lw=1.0, label="log(visible keys)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[L:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.supxlabel("query position (log2 buckets: 1, 2-3, 4-7, ...)", fontsize=9)
    fig.supylabel("mean attention entropy (nats)", fontsize=9)
    fig.suptitle(f"Attention entropy against position, per layer (thin: heads)\n{title}", fontsize=11)
    return fig


def cross_head_figure(per_layer_cos: np.ndarray | None, single_residual: Mapping[str, np.ndarray], title: str) -> Figure:
    """Cross-head shape similarity per layer, and the residual of one spectrum for all heads.

    per_layer_cos: (L,) mean pairwise shape cosine between heads (None with one head).
    single_residual: per strategy, the per-layer mean residual of the single-spectrum fit, (L,).
    """
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax_c, ax_r = fig.subplots(1, 2)
    if per_layer_cos is None:
        ax_c.text(0.5, 0.5, "n/a: one head per layer", ha="center", va="center", transform=ax_c.transAxes)
    else:
        ax_c.plot(np.arange(per_layer_cos.size), per_layer_cos, "-o", color="black", markersize=4)
    ax_c.set_xlabel("layer")
    ax_c.set_ylabel("mean pairwise cosine of head shapes")
    ax_c.set_title("cross-head shape similarity", fontsize=9)
    ax_c.grid(alpha=0.3)
    for i, (name, r) in enumerate(single_residual.items()):
        ax_r.plot(np.arange(r.size), r, **_style(name, i), label=name)
    ax_r.set_xlabel("layer")
    ax_r.set_ylabel("mean residual")
    ax_r.set_ylim(bottom=0)
    ax_r.set_title("one spectrum (anchor's most typical head) for every head", fontsize=9)
    ax_r.legend(fontsize=8, title="anchor", title_fontsize=8)
    ax_r.grid(alpha=0.3)
    for ax in (ax_c, ax_r):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"Cross-head similarity within each layer\n{title}", fontsize=11)
    return fig


def rank_k_figure(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], title: str) -> Figure:
    """Mean residual against the rank k of the correction; one panel per level.

    curves: per level ("spectral", "operator"), per strategy, (k (N,), mean residual (N,)).
    """
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(curves), squeeze=False).ravel())
    for ax, (level, per_strategy) in zip(axes, curves.items()):
        for i, (name, (k, r)) in enumerate(per_strategy.items()):
            ax.plot(k, r, **_style(name, i), markevery=max(1, k.size // 12), label=name)
        ax.axhline(SUPPORTED_BELOW, color="green", linewidth=0.8, linestyle="--", label="0.10")
        ax.set_title(f"{level} level", fontsize=9)
        ax.set_xlabel("rank k of the correction")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.set_ylabel("mean residual (fitted layers)")
    axes[-1].legend(fontsize=8, title="anchor", title_fontsize=8)
    fig.suptitle(f"Residual against rank k (scalar rescale + rank-k correction)\n{title}", fontsize=11)
    return fig


def _ticks(n: int, most: int = 16) -> np.ndarray:
    """At most ``most`` evenly spaced integer ticks over range(n), starting at 0."""
    step = max(1, -(-n // most))
    return np.arange(0, n, step)


def _layers(layers: list[int]) -> str:
    return ",".join(str(a) for a in layers)


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


# ----------------------------------------------------------------------------
# From an analysis document to figures
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureSet:
    """The rendered figures (name -> Figure, in report order) and why any were left out."""

    figures: dict[str, Figure]
    skipped: dict[str, str]


def report_figures(document: Mapping[str, Any], geometry: Geometry | None, *, title: str) -> FigureSet:
    """Every figure the document (and the geometry, when given) supports; ``title`` names the run.

    The first is the evidence at a glance (``evidence_plot``; from the document alone, skipped when it
    has no layered verdict). The spectral-shape and entropy plots need the per-head spectra and
    entropies of the geometry; without it they are skipped, with the reason. What predicts a head's
    entropy (``entropy_plots``): the descriptor scatter needs the geometry, the context-slope map the
    document's ``context`` alone.
    """
    per = strategies(document)
    figures: dict[str, Figure] = {}
    skipped: dict[str, str] = {}

    verdict = document.get("verdict") or {}
    if verdict.get("layers"):
        figures["evidence"] = evidence_figure(evidence_panels(document), str(verdict.get("overall") or "n/a"), title)
    else:
        skipped["evidence"] = NO_LAYERED_VERDICT

    T = {name: np.asarray(s["rescale"]["T"], dtype=float) for name, s in per.items()}  # (L, H) each
    R = {name: np.asarray(s["rescale"]["residual"], dtype=float) for name, s in per.items()}  # (L, H) each
    figures["schedule"] = schedule_figure(
        {name: head_spread(t) for name, t in T.items()},
        {name: fitted_residual(r, per[name]["anchor"]) for name, r in R.items()},
        {name: list(s["anchor"]["group_anchors"]) for name, s in per.items()},
        title,
    )
    t_all = np.concatenate([t.ravel() for t in T.values()])
    t_low, t_high = np.percentile(t_all, [1, 99])  # a few outlying heads should not wash out the rest
    figures["temperature_heatmap"] = heatmap_figure(
        T, "temperature T", title, cmap="viridis", vmin=float(t_low), vmax=float(max(t_high, t_low * 1.01 + 1e-9)), log=t_low > 0
    )
    r_max = max(float(max(r.max() for r in R.values())), PARTIAL_BELOW)
    figures["residual_heatmap"] = heatmap_figure(R, "rescale residual", title, cmap="magma_r", vmin=0.0, vmax=r_max)

    if geometry is None:
        skipped["spectral_shapes"] = "its geometry file is not beside the analysis file"
    else:
        shape = spectral_shape(geometry.singular_values)  # (L, H, K)
        figures["spectral_shapes"] = spectral_shapes_figure(np.where(shape > 0, shape, np.nan), title)

    if geometry is None:
        skipped["entropy_scatter"] = "its geometry file is not beside the analysis file"
    elif geometry.entropy is None:
        skipped["entropy_scatter"] = "the geometry has no dynamic (entropy) section"
    else:
        xs = {f"T (anchor: {name})": t for name, t in T.items()}
        corr = {f"T (anchor: {name})": (s["entropy"]["corr_T_entropy"], s["entropy"]["spearman_T_entropy"]) for name, s in per.items()}
        first = next(iter(per.values()))["entropy"]
        xs["op-norm σ_1"] = geometry.singular_values[..., 0]
        corr["op-norm σ_1"] = (first["corr_opnorm_entropy"], first["spearman_opnorm_entropy"])
        figures["entropy_scatter"] = entropy_scatter_figure(geometry.entropy, xs, corr, title)

    if geometry is not None and geometry.entropy_by_position is not None:
        figures["entropy_by_position"] = entropy_by_position_figure(
            geometry.entropy_by_position, geometry.log_keys_by_position, title)
    links, left_out = entropy_link_figures(document, geometry, title=title)  # what predicts a head's entropy
    figures.update(links)
    skipped.update(left_out)

    per_layer_cos = next(iter(per.values()))["cross_head"]["per_layer_mean_cos"]
    figures["cross_head"] = cross_head_figure(
        None if per_layer_cos is None else np.asarray(per_layer_cos, dtype=float),
        {name: np.asarray(s["cross_head"]["single_spectrum"]["per_layer_mean_residual"], dtype=float) for name, s in per.items()},
        title,
    )

    rank_k = document.get("rank_k")
    if rank_k:
        curves = {
            level: {
                name: (np.asarray(entry["curve"]["k"], dtype=float), np.asarray(entry["curve"][f"{level}_mean_residual"], dtype=float))
                for name, entry in rank_k.items()
                if isinstance(entry, Mapping) and entry.get("curve", {}).get(f"{level}_mean_residual") is not None
            }
            for level in ("spectral", "operator")
        }
        curves = {level: c for level, c in curves.items() if c}
        if curves:
            figures["rank_k"] = rank_k_figure(curves, title)
    return FigureSet(figures, skipped)
