"""The seed's three experiments, vectorised, with every anchor choice.

Axes: L layers, H heads, K singular values (zero-padded to the longest spectrum).

(1) Spectral shape invariance: each head's spectrum divided by its largest
    value ("shape"); mean pairwise cosine of a head's shapes across layers.
(2) Scalar rescale fit to an anchor layer: T_L^h = <s_L^h, s_a^h> / ||s_a^h||^2,
    residual ||s_L^h - T s_a^h|| / ||s_L^h||; (2b) correlation of T and of the
    operator norm with the mean attention entropy.
(3) Cross-head shape similarity within each layer, and the residual when every
    head is fit to one single spectrum (the anchor layer's most typical head).

The numbers equal the seed analysis' to rounding, including its guards (see
docs/method/seed.md); where the seed would print nan, the figure is None with a reason.
"""

from __future__ import annotations

from typing import Any

import math
import numbers
from dataclasses import dataclass

import numpy as np

from qkspectra.errors import QkspectraError, option
from qkspectra.geometry import Geometry

TINY = 1e-20  # the seed's guard for norms and denominators
TIE = 1e-12  # anchor scores within this relative distance of the best count as equal
STRATEGIES = ("last", "middle", "best", "group")

VERDICT_TEXT = {
    "supported": "HYPOTHESIS SUPPORTED — scalar temperature rescale of a shared operator reconstructs earlier layers to within 10% Frobenius residual.",
    "partial": "PARTIALLY SUPPORTED — scalar rescale captures most of the structure; a low-rank correction on top is likely enough.",
    "rejected": "HYPOTHESIS REJECTED for pure scalar rescale — spectra differ substantially in shape; need full layer-by-layer operators or rank-k delta.",
}


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def spectral_shape(sigma: np.ndarray) -> np.ndarray:
    """Each spectrum divided by its largest value; spectra whose max <= 1e-20 stay as they are.

    sigma: (..., K) -> (..., K)
    """
    top = sigma.max(axis=-1, keepdims=True)  # (..., 1)
    return np.divide(sigma, top, out=sigma.copy(), where=top > TINY)


def pairwise_cosines(x: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of vectors along the second-to-last axis.

    x: (..., N, K) -> (..., N, N); a pair with a norm below 1e-20 has cosine 0.
    """
    norm = np.sqrt(np.einsum("...nk,...nk->...n", x, x))  # (..., N)
    gram = x @ np.swapaxes(x, -1, -2)  # (..., N, N)
    denom = norm[..., :, None] * norm[..., None, :]  # (..., N, N)
    ok = (norm[..., :, None] >= TINY) & (norm[..., None, :] >= TINY)
    return np.divide(gram, denom, out=np.zeros_like(gram), where=ok)


def mean_off_diagonal(cos: np.ndarray) -> np.ndarray | None:
    """Mean over the pairs i < j of a symmetric (..., N, N) matrix -> (...); None when N < 2."""
    n = cos.shape[-1]
    if n < 2:
        return None
    i, j = np.triu_indices(n, k=1)
    return cos[..., i, j].mean(axis=-1)


def first_best(scores: np.ndarray) -> int:
    """Index of the first score within 1e-12 (relative) of the highest. scores: (N,)."""
    return int(first_best_index(scores))


def first_best_index(scores: np.ndarray) -> np.ndarray:
    """first_best along the last axis: scores (..., N) -> int indices (...)."""
    best = scores.max(axis=-1, keepdims=True)  # (..., 1)
    return np.argmax(scores >= best - TIE * np.abs(best), axis=-1)


def typicality_scores(cos: np.ndarray) -> np.ndarray:
    """Total cosine of each member to all others: cos (..., N, N) -> (..., N), diagonal excluded."""
    off_diagonal = ~np.eye(cos.shape[-1], dtype=bool)  # (N, N)
    return np.where(off_diagonal, cos, 0.0).sum(axis=-1)


def scalar_rescale(sigma: np.ndarray, anchor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best scalar T with sigma ~ T * anchor, and the relative residual.

    sigma, anchor: (..., K) -> T (...), residual (...)
    T = <sigma, anchor> / ||anchor||^2 (0 when ||anchor||^2 < 1e-20, residual then 1);
    residual = ||sigma - T anchor|| / ||sigma|| (0 when ||sigma|| <= 1e-20).
    """
    denom = np.einsum("...k,...k->...", anchor, anchor)  # (...)
    dot = np.einsum("...k,...k->...", sigma, anchor)  # (...)
    fit = denom >= TINY
    T = np.divide(dot, denom, out=np.zeros_like(dot), where=fit)  # (...)
    diff = sigma - T[..., None] * anchor  # (..., K)
    rn = np.sqrt(np.einsum("...k,...k->...", diff, diff))  # (...)
    xn = np.sqrt(np.einsum("...k,...k->...", sigma, sigma))  # (...)
    residual = np.divide(rn, xn, out=np.zeros_like(rn), where=xn > TINY)
    return T, np.where(fit, residual, 1.0)


@dataclass(frozen=True)
class Correlation:
    """A correlation over all (L, h), or None with the reason it is undefined."""

    pearson: float | None
    spearman: float | None
    reason: str | None = None


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based. x: (N,) -> (N,)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # (U,)
    return (ends - (counts - 1) / 2.0)[inverse]


def correlate(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> Correlation:
    """Pearson (as numpy's corrcoef) and Spearman correlation of two equally shaped arrays."""
    x, y = x.ravel(), y.ravel()  # (N,)
    for values, name in ((x, x_name), (y, y_name)):
        if values.size < 2:
            return Correlation(None, None, "fewer than two heads in all")
        if np.all(values == values[0]):
            return Correlation(None, None, f"{name} is the same for every head")
    with np.errstate(all="ignore"):
        pearson = float(np.corrcoef(x, y)[0, 1])
        spearman = float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])
    if not math.isfinite(pearson):
        return Correlation(None, None, f"{x_name} or {y_name} has no spread")
    return Correlation(pearson, spearman)


# ----------------------------------------------------------------------------
# Anchors
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """Which layer each layer is fit to.

    strategy: "last", "middle", "best", "group" or "index".
    layers: ndarray of shape (L,), int: the anchor layer of each layer.
    groups: contiguous layer groups [(start, stop), ...] (one group unless "group").
    scores: ndarray of shape (L,): each layer's total shape cosine to the other layers
        of its group (the "best" rule's score), or None when the rule was not used.
    """

    strategy: str
    layers: np.ndarray
    groups: tuple[tuple[int, int], ...]
    scores: np.ndarray | None = None

    @property
    def layer(self) -> int:
        """The anchor layer; in group mode, that of the deepest group."""
        return int(self.layers[-1])

    @property
    def group_anchors(self) -> list[int]:
        return [int(self.layers[start]) for start, _ in self.groups]

    @property
    def fitted(self) -> np.ndarray:
        """(L,) bool: the layers fitted to another layer (an anchor layer fits itself, residual 0)."""
        return self.layers != np.arange(len(self.layers))

    @property
    def num_anchor_layers(self) -> int:
        return len(np.unique(self.layers))

    @property
    def num_fitted_layers(self) -> int:
        return int(self.fitted.sum())


def default_group_count(num_layers: int) -> int:
    """Groups chosen automatically: round(sqrt(L)), so that groups hold about sqrt(L) layers."""
    return max(1, round(math.sqrt(num_layers)))


def choose_anchor(layer_cos: np.ndarray, strategy: str | int, groups: int | None = None) -> Anchor:
    """Pick the anchor layer(s).

    layer_cos: (H, L, L) cosine of each head's shapes between layers.
    strategy: "last" | "middle" | "best" | "group" | an int layer index (negative counts from the end).
    groups: number of contiguous groups for "group" (default: round(sqrt(L))).
    """
    layers, spans, scores = anchor_layers(layer_cos, strategy, groups)
    return Anchor("index" if isinstance(strategy, int) else strategy, layers, spans, scores)


def anchor_layers(
    layer_cos: np.ndarray, strategy: str | int, groups: int | None = None
) -> tuple[np.ndarray, tuple[tuple[int, int], ...], np.ndarray | None]:
    """The anchor rule of :func:`choose_anchor`, batched over leading axes.

    layer_cos: (..., H, L, L). Returns the anchor layer of each layer (..., L) int, the
    contiguous groups [(start, stop), ...], and the typicality scores (..., L) of the
    "best" and "group" rules (None for the others).
    """
    L = layer_cos.shape[-1]
    batch = layer_cos.shape[:-3]
    total = layer_cos.sum(axis=-3)  # (..., L, L) summed over heads
    whole = ((0, L),)
    if isinstance(strategy, int):
        if not -L <= strategy < L:
            raise QkspectraError(f"{option('anchor')} {strategy}: the geometry has {L} layers (valid indices {-L} to {L - 1})")
        return np.full((*batch, L), strategy % L), whole, None
    if strategy == "last":
        return np.full((*batch, L), L - 1), whole, None
    if strategy == "middle":
        return np.full((*batch, L), L // 2), whole, None
    if strategy == "best":
        scores = typicality_scores(total)  # (..., L)
        best = first_best_index(scores)  # (...)
        return np.broadcast_to(best[..., None], (*batch, L)).copy(), whole, scores
    if strategy == "group":
        n = default_group_count(L) if groups is None else groups
        if not 1 <= n <= L:
            raise QkspectraError(f"{option('groups')} {n}: must be between 1 and the number of layers ({L})")
        bounds = np.linspace(0, L, n + 1).round().astype(int)  # (n + 1,)
        spans = tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]))
        layers = np.empty((*batch, L), dtype=int)
        scores = np.empty((*batch, L))
        for start, stop in spans:  # one iteration per group, not per layer pair
            s = typicality_scores(total[..., start:stop, start:stop])  # (..., group size)
            scores[..., start:stop] = s
            layers[..., start:stop] = start + first_best_index(s)[..., None]
        return layers, spans, scores
    raise QkspectraError(f"{option('anchor')} {strategy!r}: choose last, middle, best, group, all or a layer index")


# ----------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeInvariance:
    """Experiment (1). per_head_mean_cos: (H,), or None with one layer."""

    per_head_mean_cos: np.ndarray | None
    reason: str | None = None

    @property
    def mean(self) -> float | None:
        return None if self.per_head_mean_cos is None else float(self.per_head_mean_cos.mean())

    @property
    def label(self) -> str | None:
        m = self.mean
        if m is None:
            return None
        return "very stable" if m > 0.98 else "approximately stable" if m > 0.9 else "not stable"


NO_FITTED_LAYER = "every layer is an anchor layer: no layer is fitted to another"


@dataclass(frozen=True)
class Rescale:
    """Experiment (2). T, residual: (L, H); fitted: (L,) bool, the layers fitted to another layer.

    The seed's figures (mean_residual, max_residual, frac_below) are over every (L, h), anchor
    layers included; an anchor layer fits itself with residual 0, so they flatter a strategy with
    more anchors. The ``*_fitted`` companions are over the fitted layers only (None when there is
    none, with the reason NO_FITTED_LAYER).
    """

    T: np.ndarray
    residual: np.ndarray
    fitted: np.ndarray

    @property
    def mean_residual(self) -> float:
        return float(self.residual.mean())

    @property
    def max_residual(self) -> float:
        return float(self.residual.max())

    def frac_below(self, threshold: float) -> float:
        return float((self.residual < threshold).mean())

    @property
    def mean_residual_fitted(self) -> float | None:
        return float(self.residual[self.fitted].mean()) if self.fitted.any() else None

    def frac_below_fitted(self, threshold: float) -> float | None:
        return float((self.residual[self.fitted] < threshold).mean()) if self.fitted.any() else None


@dataclass(frozen=True)
class CrossHead:
    """Experiment (3).

    per_layer_mean_cos: (L,) mean pairwise shape cosine between heads, None with one head.
    typical_head: (L,) the most typical head of each layer's anchor layer.
    single_spectrum_residual: (L, H) residual of fitting every head to that one spectrum.
    """

    per_layer_mean_cos: np.ndarray | None
    typical_head: np.ndarray
    single_spectrum_residual: np.ndarray
    reason: str | None = None


@dataclass(frozen=True)
class Analysis:
    """Everything the seed's experiments compute for one anchor strategy.

    verdict: qkspectra's layered verdict as far as the spectra alone can judge it (its spectral layer;
    the others n/a with what they need), set by ``qkspectra.analyze``; None from the seed's own path.
    verdict_code, verdict_text: the seed's verdict, kept to reproduce the seed; not qkspectra's.
    """

    geometry: Geometry
    shape_invariance: ShapeInvariance
    anchor: Anchor
    rescale: Rescale
    corr_T_entropy: Correlation | None
    corr_opnorm_entropy: Correlation | None
    cross_head: CrossHead
    verdict: Any = None  # an analysis.verdict.LayeredVerdict, set by qkspectra.analyze

    @property
    def verdict_code(self) -> str:
        return seed_rule(self.rescale.mean_residual)

    @property
    def verdict_text(self) -> str:
        return VERDICT_TEXT[self.verdict_code]

    def _summary(self) -> list[tuple[str, str]]:
        """(what, value) pairs of the short displays: no arrays."""
        g, a, rs = self.geometry, self.anchor, self.rescale
        fitted = rs.mean_residual_fitted
        anchors = ", ".join(map(str, a.group_anchors))
        return [
            ("model", str(g.metadata.get("model") or g.source)),
            ("layers × heads", f"{g.num_layers} × {g.num_heads}"),
            ("anchor", f"{a.strategy}: layer{'s' if len(a.group_anchors) > 1 else ''} {anchors}"),
            ("mean residual (fitted layers)", "n/a" if fitted is None else f"{fitted:.4g} over {a.num_fitted_layers} layers"),
            ("mean residual (all layers, the seed's)", f"{rs.mean_residual:.4g}"),
            ("entropy", "yes" if g.entropy is not None else "no (static only)"),
            ("verdict", "n/a" if self.verdict is None else f"{self.verdict.overall} (spectral layer only)"),
        ]

    def __repr__(self) -> str:
        model, shape, anchor, fitted, every, _, code = (value for _, value in self._summary())
        return f"<Analysis {model} ({shape}), anchor {anchor}: mean residual {fitted} (all layers {every}); verdict {code}>"

    def _repr_html_(self) -> str:
        """Jupyter's display: the anchor and the headline figures as a small table."""
        from html import escape

        body = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td style='text-align:left'>{escape(v)}</td></tr>"
                       for k, v in self._summary())
        return f"<div><b>qkspectra Analysis</b><table>{body}</table></div>"


SUPPORTED_BELOW, PARTIAL_BELOW = 0.1, 0.3  # the seed's thresholds on a mean rescale residual


def seed_rule(mean_residual: float) -> str:
    """The seed's verdict on a mean rescale residual: below 0.10 supported, below 0.30 partial, else rejected."""
    return "supported" if mean_residual < SUPPORTED_BELOW else "partial" if mean_residual < PARTIAL_BELOW else "rejected"


@dataclass(frozen=True)
class _Shared:
    """What every anchor strategy reuses. shape (L, H, K); layer_cos (H, L, L); head_cos (L, H, H)."""

    shape: np.ndarray
    layer_cos: np.ndarray
    head_cos: np.ndarray


def _shared(geometry: Geometry) -> _Shared:
    shape = spectral_shape(geometry.singular_values)  # (L, H, K)
    layer_cos = pairwise_cosines(np.swapaxes(shape, 0, 1))  # (H, L, L)
    head_cos = pairwise_cosines(shape)  # (L, H, H)
    return _Shared(shape, layer_cos, head_cos)


def analyze(geometry: Geometry, anchor: str | int = "last", *, groups: int | None = None) -> Analysis | dict[str, Analysis]:
    """Run the seed's experiments with one anchor strategy.

    anchor: "last" | "middle" | "best" | "group" | a layer index (negative counts from the end),
        or "all": every strategy, as ``analyze_all`` ({"last": Analysis, "middle": ..., ...}).
    groups: number of contiguous layer groups for anchor="group" (and "all").
    """
    if isinstance(anchor, numbers.Integral) and not isinstance(anchor, bool):
        anchor = int(anchor)  # numpy integers too
    if groups is not None and anchor not in ("group", "all"):
        raise QkspectraError(f"{option('groups')} goes with {option('anchor')} group or {option('anchor')} all")
    if anchor == "all":
        return analyze_all(geometry, groups=groups)
    return _analyze(geometry, _shared(geometry), anchor, groups)


def analyze_all(geometry: Geometry, *, groups: int | None = None) -> dict[str, Analysis]:
    """Every strategy (last, middle, best, group), sharing the anchor-independent work."""
    shared = _shared(geometry)
    return {name: _analyze(geometry, shared, name, groups) for name in STRATEGIES}


def _analyze(geometry: Geometry, shared: _Shared, strategy: str | int, groups: int | None) -> Analysis:
    sigma = geometry.singular_values  # (L, H, K)
    L, H, _ = sigma.shape

    if L < 2:
        shape_inv = ShapeInvariance(None, "one layer: no pair of layers to compare")
    else:
        shape_inv = ShapeInvariance(mean_off_diagonal(shared.layer_cos))  # (H,)

    anchor = choose_anchor(shared.layer_cos, strategy, groups)
    T, residual = scalar_rescale(sigma, sigma[anchor.layers])  # (L, H) each
    rescale = Rescale(T, residual, anchor.fitted)

    corr_T = corr_op = None
    if geometry.entropy is not None:
        corr_T = correlate(T, geometry.entropy, "T", "entropy")
        corr_op = correlate(sigma.max(axis=-1), geometry.entropy, "op_norm", "entropy")

    head_scores = typicality_scores(shared.head_cos)  # (L, H)
    typical = np.array([first_best(head_scores[a]) for a in anchor.layers])  # (L,)
    single = sigma[anchor.layers, typical]  # (L, K): each layer's one reference spectrum
    _, single_residual = scalar_rescale(sigma, single[:, None, :])  # (L, H)
    per_layer_cos = mean_off_diagonal(shared.head_cos)  # (L,) or None
    cross = CrossHead(
        per_layer_cos,
        typical,
        single_residual,
        None if per_layer_cos is not None else "one head per layer: no pair of heads to compare",
    )
    return Analysis(geometry, shape_inv, anchor, rescale, corr_T, corr_op, cross)
