"""Bootstrap confidence intervals for the correlations with attention entropy.

Method: the (layer, head) pairs are resampled with replacement (all L*H of them per
draw, one index set per draw shared by every correlation, so the intervals of
different strategies are comparable), the Pearson correlation is recomputed on each
resample, and the interval is the percentile interval of those correlations. Each
head's T is held at its fitted value: the interval reflects which heads were
observed, not the refit of the anchor. A resample on which a variable is constant
gives no correlation and is left out; the number left out is reported.

Axes: B draws, N = L*H (layer, head) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkspectra.analysis.seed import Analysis
from qkspectra.errors import QkspectraError

METHOD = "percentile interval of the Pearson correlation over resamples of the (layer, head) pairs with replacement"


@dataclass(frozen=True)
class BootstrapOptions:
    draws: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise QkspectraError(f"bootstrap draws must be at least 1, got {self.draws}")
        if not 0 < self.confidence < 1:
            raise QkspectraError(f"bootstrap confidence must lie strictly between 0 and 1, got {self.confidence}")


@dataclass(frozen=True)
class Interval:
    """A correlation and its bootstrap interval; all None when the correlation is undefined.

    degenerate: resamples on which the correlation was undefined (left out).
    """

    estimate: float | None
    low: float | None
    high: float | None
    degenerate: int = 0


@dataclass(frozen=True)
class BootstrapResult:
    draws: int
    confidence: float
    method: str
    corr_T_entropy: dict[str, Interval]
    corr_opnorm_entropy: dict[str, Interval]


def resample_indices(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """Indices of ``draws`` resamples of n items with replacement: (B, n)."""
    return rng.integers(0, n, size=(draws, n))


def resampled_pearson(x: np.ndarray, y: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Pearson correlation of x and y on each resample.

    x, y: (N,); indices: (B, N). Returns (B,), nan where x or y is constant on the resample.
    """
    xs, ys = x[indices], y[indices]  # (B, N)
    xs = xs - xs.mean(axis=1, keepdims=True)
    ys = ys - ys.mean(axis=1, keepdims=True)
    cov = np.einsum("bn,bn->b", xs, ys)  # (B,)
    var = np.einsum("bn,bn->b", xs, xs) * np.einsum("bn,bn->b", ys, ys)  # (B,)
    ok = var > 0
    out = np.full(cov.shape, np.nan)
    np.divide(cov, np.sqrt(var, where=ok, out=np.ones_like(var)), out=out, where=ok)
    return out


def percentile_interval(estimate: float | None, samples: np.ndarray, confidence: float) -> Interval:
    """Percentile interval of the finite samples (B,) around the full-sample estimate."""
    finite = samples[np.isfinite(samples)]
    degenerate = int(samples.size - finite.size)
    if estimate is None or finite.size == 0:
        return Interval(None, None, None, degenerate)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), degenerate)


def bootstrap_correlations(analyses: dict[str, Analysis], options: BootstrapOptions = BootstrapOptions()) -> BootstrapResult | None:
    """Intervals for corr(T, entropy) per strategy and corr(op-norm, entropy); None without entropy."""
    geometry = next(iter(analyses.values())).geometry
    if geometry.entropy is None:
        return None
    entropy = geometry.entropy.ravel()  # (N,)
    op_norm = geometry.singular_values.max(axis=-1).ravel()  # (N,)
    indices = resample_indices(np.random.default_rng(options.seed), entropy.size, options.draws)  # (B, N)
    op_interval = percentile_interval(
        next(iter(analyses.values())).corr_opnorm_entropy.pearson,
        resampled_pearson(op_norm, entropy, indices),
        options.confidence,
    )
    corr_T = {
        name: percentile_interval(
            a.corr_T_entropy.pearson, resampled_pearson(a.rescale.T.ravel(), entropy, indices), options.confidence
        )
        for name, a in analyses.items()
    }
    return BootstrapResult(
        options.draws, options.confidence, METHOD, corr_T, {name: op_interval for name in analyses}
    )
