"""What sets a head's temperature: its geometry against its attention entropy, and its entropy against context length.

Axes: L layers, H heads, N = L*H (layer, head) pairs, V variables, B bootstrap draws, P permutations,
b position buckets. The definitions and why: docs/method/entropy_links.md.

(1) The link table: each descriptor of a head (op-norm, Frobenius norm, stable and effective rank of
    its metric spectrum; its temperature T against the last, middle and best anchor) against each
    entropy (mean, normalised, without the first position): Pearson and Spearman over all pairs, a
    percentile bootstrap interval of each (pairs resampled with replacement), a permutation p-value
    of the Spearman correlation, and the within-layer Spearman (each layer's mean subtracted first:
    what is left once depth is taken out) with its own permutation p-value (heads shuffled within
    each layer).
(2) Context: per head, the weighted least-squares slope of the position buckets' mean entropy on
    their mean log(visible keys), weighted by each bucket's number of queries, and its R^2. Uniform
    attention has slope 1, attention to a fixed number of keys slope 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkspectra.analysis.bootstrap import percentile_interval, resample_indices
from qkspectra.analysis.nulls import empirical_p_value
from qkspectra.analysis.seed import _ranks, correlate
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry

SPECTRAL_DESCRIPTORS = ("op_norm", "frobenius_norm", "stable_rank", "effective_rank")
TEMPERATURE_STRATEGIES = ("last", "middle", "best")  # the single-anchor strategies: T_last, T_middle, T_best
DESCRIPTORS = SPECTRAL_DESCRIPTORS + tuple(f"T_{s}" for s in TEMPERATURE_STRATEGIES)
TARGETS = ("entropy", "normalised_entropy", "entropy_without_first")
CONFIDENCE = 0.95
NO_DYNAMIC = "the geometry has no dynamic (entropy) section"
NORMALISED_KEY = "mean_normalized_entropy_per_head"
WITHOUT_FIRST_KEY = "mean_attention_entropy_without_first_per_head"
WITHOUT_FIRST_BY_POSITION_KEY = "entropy_without_first_by_position_per_head"
SAME_CONTEXT = ("every position bucket's queries see the same number of keys (an encoder whose windows all have one "
                "length): there is no context length to read the entropy against")
_BOOTSTRAP_STREAM, _PERMUTATION_STREAM, _WITHIN_STREAM = 11, 12, 13  # nulls.py uses 1 and 2
_BLOCK_ELEMENTS = 1 << 20  # draws are processed in blocks of about this many (draw, pair) elements
_FLAT = 1e-12  # relative: a variance (or within-layer spread) below this counts as none

METHOD = ("Pearson and Spearman over all (layer, head) pairs; intervals: percentile interval over resamples of the "
          "pairs with replacement (Spearman: the full sample's ranks, computed once, correlated on each resample); "
          "p_permutation: two-sided, the Spearman "
          "correlation against the target's heads permuted over all pairs; within_layer_spearman: Spearman of the "
          "two variables after subtracting each layer's mean, its p-value with heads permuted within each layer")


@dataclass(frozen=True)
class LinkOptions:
    """Draws of the link table; seed None: the analysis' bootstrap seed (0 without one)."""

    bootstrap_draws: int = 2000
    permutations: int = 2000
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.bootstrap_draws < 1 or self.permutations < 1:
            raise QkspectraError("entropy links: bootstrap draws and permutations must be at least 1")


# ----------------------------------------------------------------------------
# The variables
# ----------------------------------------------------------------------------


def spectrum_descriptors(sigma: np.ndarray) -> dict[str, np.ndarray]:
    """Descriptors of each metric spectrum sigma (L, H, K), descending, zero-padded -> each (L, H).

    op_norm sigma_1; frobenius_norm sqrt(sum sigma^2); stable_rank sum sigma^2 / sigma_1^2;
    effective_rank exp(-sum p log p), p = sigma / sum sigma (as extract's spectrum statistics;
    0 log 0 = 0; an all-zero spectrum has both ranks 0).
    """
    op = sigma[..., 0]
    fro_sq = np.einsum("...k,...k->...", sigma, sigma)
    stable = np.divide(fro_sq, op**2, out=np.zeros_like(fro_sq), where=op > 0)
    total = sigma.sum(axis=-1, keepdims=True)
    p = np.divide(sigma, total, out=np.zeros_like(sigma), where=total > 0)
    plogp = p * np.log(p, out=np.zeros_like(p), where=p > 0)
    effective = np.where(op > 0, np.exp(-plogp.sum(axis=-1)), 0.0)
    return {"op_norm": op, "frobenius_norm": np.sqrt(fro_sq), "stable_rank": stable, "effective_rank": effective}


def dynamic_per_head(geometry: Geometry, attribute: str, key: str) -> np.ndarray | None:
    """An optional per-head dynamic quantity: ``geometry.<attribute>`` if set, else the dynamic rows' ``key``.

    Returns (L, H, ...) float64, or None when absent or not shaped (L, H, ...) alike in every row.
    """
    value = getattr(geometry, attribute, None)
    if value is not None:
        return np.asarray(value, dtype=np.float64)
    rows = (geometry.document or {}).get("dynamic")
    if not isinstance(rows, list) or len(rows) != geometry.num_layers:
        return None
    if not all(isinstance(row, dict) and key in row for row in rows):
        return None
    try:
        values = np.array([row[key] for row in rows], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values if values.ndim >= 2 and values.shape[1] == geometry.num_heads else None


def entropy_targets(geometry: Geometry) -> dict[str, np.ndarray | str]:
    """Each target's (L, H) values, or the reason it is n/a."""
    if geometry.entropy is None:
        return {name: NO_DYNAMIC for name in TARGETS}
    found = {
        "entropy": geometry.entropy,
        "normalised_entropy": dynamic_per_head(geometry, "normalized_entropy", NORMALISED_KEY),
        "entropy_without_first": dynamic_per_head(geometry, "entropy_without_first", WITHOUT_FIRST_KEY),
    }
    keys = {"normalised_entropy": NORMALISED_KEY, "entropy_without_first": WITHOUT_FIRST_KEY}
    out: dict[str, np.ndarray | str] = {}
    for name, values in found.items():
        if values is None or values.shape != geometry.entropy.shape:
            out[name] = f"the geometry's dynamic rows have no {keys[name]}"
        elif not np.isfinite(values).all():
            out[name] = f"{name} is not finite for every head"
        else:
            out[name] = values
    return out


# ----------------------------------------------------------------------------
# The link table
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One descriptor against one target; None where undefined, with the reason."""

    pearson: float | None
    spearman: float | None
    pearson_ci95: tuple[float, float] | None
    spearman_ci95: tuple[float, float] | None
    p_permutation: float | None
    within_layer_spearman: float | None
    within_layer_p_permutation: float | None
    degenerate_draws: int
    reason: str | None


def _standardise(x: np.ndarray) -> np.ndarray:
    """x (N,) -> (x - mean) / std (N,)."""
    d = x - x.mean()
    return d / np.sqrt(np.mean(d * d))


def within_layer(x: np.ndarray) -> np.ndarray:
    """x (L, H) minus each layer's mean, (L, H); spreads at rounding level (relative 1e-12) become exactly 0."""
    d = x - x.mean(axis=1, keepdims=True)
    d[np.abs(d) <= _FLAT * np.abs(x).max(initial=0.0)] = 0.0
    return d


def _ratio(cov: np.ndarray, var_x: np.ndarray, var_y: np.ndarray) -> np.ndarray:
    """cov / sqrt(var_x var_y) of standardised variables, nan where either variance is (relative 1e-12) none."""
    ok = (var_x > _FLAT) & (var_y > _FLAT)
    return np.where(ok, cov / np.sqrt(np.where(ok, var_x * var_y, 1.0)), np.nan)


def _blocks(total: int, n: int):
    """Sizes of the blocks of draws, about _BLOCK_ELEMENTS (draw, pair) elements each."""
    step = max(1, min(total, _BLOCK_ELEMENTS // max(n, 1)))
    for start in range(0, total, step):
        yield min(step, total - start)


def resampled_correlations(z: np.ndarray, pairs: list[tuple[int, int]], draws: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Pearson correlation of each pair of columns of z on the same resamples of its N rows (with replacement).

    z: (N, V), each column of mean 0 and variance 1 (for Spearman: the standardised ranks, computed once on the
    full sample). pairs: P (column, column). Returns (draws, P), nan where a column is constant on the resample.
    Through each resample's counts, (B, N) @ (N, 2V + P): no per-draw gather.
    """
    n, v = z.shape
    i, j = np.array(pairs).T  # (P,) each
    columns = np.concatenate([z, z * z, z[:, i] * z[:, j]], axis=1)  # (N, 2V + P)
    out = []
    for block in _blocks(draws, n):
        idx = resample_indices(rng, n, block)  # (b, N)
        counts = np.bincount((idx + n * np.arange(block)[:, None]).ravel(), minlength=block * n)
        moments = counts.reshape(block, n).astype(np.float64) @ columns / n  # (b, 2V + P)
        mean, square, cross = moments[:, :v], moments[:, v:2 * v], moments[:, 2 * v:]
        out.append(_ratio(cross - mean[:, i] * mean[:, j], square[:, i] - mean[:, i] ** 2, square[:, j] - mean[:, j] ** 2))
    return np.concatenate(out)


def permutations_of_pairs(rng: np.random.Generator, count: int, L: int, H: int, within: bool) -> np.ndarray:
    """(count, L*H) permutations of the (layer, head) pairs: over all, or of the heads within each layer."""
    if not within:
        return rng.permuted(np.broadcast_to(np.arange(L * H), (count, L * H)), axis=1)
    heads = rng.permuted(np.broadcast_to(np.arange(H), (count, L, H)), axis=2)  # (count, L, H)
    return (heads + H * np.arange(L)[:, None]).reshape(count, L * H)


def permutation_p_values(z: np.ndarray, pairs: list[tuple[int, int]], count: int, rng: np.random.Generator,
                         shape: tuple[int, int], within: bool) -> tuple[np.ndarray, np.ndarray]:
    """Correlation of each pair of columns of z (N, V; standardised) and its two-sided permutation p-value.

    The second column of each pair is permuted (over all pairs, or within layers: shape = (L, H)).
    Returns real (P,), p (P,): (1 + #|permuted| >= |real|) / (1 + count), with nulls.py's tie tolerance.
    """
    n = z.shape[0]
    real = np.array([z[:, a] @ z[:, b] / n for a, b in pairs])  # (P,)
    null = np.empty((count, len(pairs)))  # (count, P)
    by_permuted = {b: [k for k, (_, bb) in enumerate(pairs) if bb == b] for b in dict.fromkeys(b for _, b in pairs)}
    permuted = {b: np.ascontiguousarray(z[:, b]) for b in by_permuted}  # (N,) each
    done = 0
    for block in _blocks(count, n):
        perms = permutations_of_pairs(rng, block, *shape, within)  # (b, N)
        for b, which in by_permuted.items():
            null[done:done + block, which] = permuted[b][perms] @ z[:, [pairs[k][0] for k in which]] / n
        done += block
    p = np.array([empirical_p_value(abs(r), np.abs(null[:, k]), higher_is_alike=True) for k, r in enumerate(real)])
    return real, p


def link_table(descriptors: dict[str, np.ndarray], targets: dict[str, np.ndarray | str],
               options: LinkOptions = LinkOptions(), seed: int = 0) -> dict[str, dict[str, Link]]:
    """Every descriptor (L, H) against every target ((L, H), or the reason it is n/a): descriptor -> target -> Link."""
    L, H = next(iter(descriptors.values())).shape
    estimates, reasons = {}, {}
    for d, x in descriptors.items():
        for t, y in targets.items():
            if isinstance(y, str):
                reasons[d, t] = y
            elif not np.isfinite(x).all():
                reasons[d, t] = f"{d} is not finite for every head"
            else:
                estimates[d, t] = c = correlate(x, y, d, t)
                if c.reason:
                    reasons[d, t] = c.reason
    pairs = [pair for pair in estimates if pair not in reasons]
    names = list(dict.fromkeys(name for pair in pairs for name in pair))  # the V variables in use
    column = {name: k for k, name in enumerate(names)}
    values = {name: descriptors[name] if name in descriptors else targets[name] for name in names}  # (L, H) each
    index = [(column[d], column[t]) for d, t in pairs]
    boot = p_all = None
    if pairs:
        z = np.stack([_standardise(values[name].ravel()) for name in names], axis=1)  # (N, V)
        ranks = np.stack([_standardise(_ranks(values[name].ravel())) for name in names], axis=1)  # (N, V)
        v = len(names)
        rng = np.random.default_rng((seed, _BOOTSTRAP_STREAM))
        boot = resampled_correlations(np.concatenate([z, ranks], axis=1),
                                      index + [(a + v, b + v) for a, b in index], options.bootstrap_draws, rng)
        rng = np.random.default_rng((seed, _PERMUTATION_STREAM))
        _, p_all = permutation_p_values(ranks, index, options.permutations, rng, (L, H), within=False)
    spread = {name: within_layer(x) for name, x in values.items()}  # (L, H) each
    flat = [name for name in names if not spread[name].any()]
    within = [k for k, (d, t) in enumerate(pairs) if d not in flat and t not in flat]
    real_within, p_within = {}, {}
    if within:
        names_w = [name for name in names if name not in flat]
        col_w = {name: k for k, name in enumerate(names_w)}
        ranks_w = np.stack([_standardise(_ranks(spread[name].ravel())) for name in names_w], axis=1)  # (N, V')
        rng = np.random.default_rng((seed, _WITHIN_STREAM))
        real, p = permutation_p_values(ranks_w, [(col_w[pairs[k][0]], col_w[pairs[k][1]]) for k in within],
                                       options.permutations, rng, (L, H), within=True)
        real_within = {pairs[k]: float(r) for k, r in zip(within, real)}
        p_within = {pairs[k]: float(q) for k, q in zip(within, p)}
    table: dict[str, dict[str, Link]] = {d: {} for d in descriptors}
    for d in descriptors:
        for t in targets:
            if (d, t) not in pairs:
                table[d][t] = Link(None, None, None, None, None, None, None, 0, reasons[d, t])
                continue
            k, c = pairs.index((d, t)), estimates[d, t]
            pearson = percentile_interval(c.pearson, boot[:, k], CONFIDENCE)
            spearman = percentile_interval(c.spearman, boot[:, len(pairs) + k], CONFIDENCE)
            why = None
            if (d, t) not in real_within:
                why = ("one head per layer: nothing varies within a layer" if H == 1 else
                       f"{d if d in flat else t} does not vary within any layer")
            table[d][t] = Link(c.pearson, c.spearman, (pearson.low, pearson.high), (spearman.low, spearman.high),
                               float(p_all[k]), real_within.get((d, t)), p_within.get((d, t)), pearson.degenerate, why)
    return table


# ----------------------------------------------------------------------------
# Entropy against context length
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextFit:
    """Per head, entropy ~ a + slope * log(visible keys) over the position buckets (weighted least squares).

    slope, r2: (L, H), nan where undefined (fewer than two usable buckets or one log(keys) value for the
    slope; besides, for R^2, an entropy equal in every usable bucket: nothing to explain).
    buckets_used: (L, H) int, the buckets with a positive weight and finite values.
    """

    slope: np.ndarray
    r2: np.ndarray
    buckets_used: np.ndarray


def context_fit(entropy: np.ndarray, log_keys: np.ndarray, weights: np.ndarray) -> ContextFit:
    """entropy (L, H, b), log_keys (L, b), weights (b,) or (L, b): a bucket's number of queries.

    A bucket with weight 0 or a non-finite value has weight 0. Uniform attention (entropy = log keys in
    every bucket) gives slope 1 and R^2 1; attention spread over a fixed number of keys gives slope 0.
    """
    x = np.broadcast_to(log_keys[:, None, :], entropy.shape)  # (L, H, b)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), log_keys.shape)[:, None, :]  # (L, 1, b)
    usable = np.isfinite(entropy) & np.isfinite(x) & (w > 0)  # (L, H, b)
    w = np.where(usable, w, 0.0)
    x, y = np.where(usable, x, 0.0), np.where(usable, entropy, 0.0)
    total = w.sum(axis=-1)  # (L, H)
    safe = np.where(total > 0, total, 1.0)
    dx = x - ((w * x).sum(axis=-1) / safe)[..., None]  # (L, H, b)
    dy = y - ((w * y).sum(axis=-1) / safe)[..., None]
    sxx, syy, sxy = (w * dx * dx).sum(-1), (w * dy * dy).sum(-1), (w * dx * dy).sum(-1)  # (L, H) each
    used = usable.sum(axis=-1)
    scale_x = np.where(usable, np.abs(x), 0.0).max(axis=-1) ** 2 * safe  # (L, H)
    scale_y = np.where(usable, np.abs(y), 0.0).max(axis=-1) ** 2 * safe
    has_slope = (used >= 2) & (sxx > _FLAT * scale_x)
    slope = np.where(has_slope, sxy / np.where(has_slope, sxx, 1.0), np.nan)
    flat_y = syy <= _FLAT * scale_y
    slope = np.where(has_slope & flat_y, 0.0, slope)  # an entropy the same in every bucket: exactly flat
    has_r2 = has_slope & ~flat_y
    r2 = np.where(has_r2, sxy**2 / np.where(has_r2, sxx * syy, 1.0), np.nan)
    return ContextFit(slope, r2, used)


def queries_per_bucket(metadata: dict, buckets: int) -> tuple[np.ndarray | None, str]:
    """(weights (buckets,) or (L, buckets), how the buckets are weighted); None weights: why they are unusable."""
    counts = metadata.get("queries_by_position")
    if counts is None:
        return np.ones(buckets), "equal (the metadata has no queries_by_position)"
    try:
        counts = np.array(counts, dtype=np.float64)
    except (TypeError, ValueError):
        return None, "metadata.queries_by_position is not a list of numbers"
    if counts.shape[-1:] != (buckets,) or counts.ndim > 2 or not (np.isfinite(counts) & (counts >= 0)).all():
        return None, f"metadata.queries_by_position is not {buckets} counts >= 0 (one per position bucket)"
    return counts, "queries_by_position (each bucket's number of queries)"


def context_fits(geometry: Geometry) -> dict[str, ContextFit | str]:
    """The context fits of ``entropy`` and ``without_first``, or why each is n/a; and ``weighting``."""
    if geometry.entropy is None:
        return {"entropy": NO_DYNAMIC, "without_first": NO_DYNAMIC, "weighting": None}
    if geometry.entropy_by_position is None or geometry.log_keys_by_position is None:
        why = "the geometry's dynamic rows have no entropy_by_position_per_head"
        return {"entropy": why, "without_first": why, "weighting": None}
    log_keys = geometry.log_keys_by_position  # (L, b)
    weights, weighting = queries_per_bucket(geometry.metadata, log_keys.shape[-1])
    if weights is None or (weights.ndim == 2 and weights.shape[0] != geometry.num_layers):
        why = weighting if weights is None else "metadata.queries_by_position has the wrong number of layers"
        return {"entropy": why, "without_first": why, "weighting": None}
    seen = np.isfinite(log_keys) & (np.broadcast_to(weights, log_keys.shape) > 0)  # (L, b)
    spread = np.where(seen, log_keys, -np.inf).max(-1) - np.where(seen, log_keys, np.inf).min(-1)  # (L,)
    if not (spread > _FLAT * np.abs(np.where(seen, log_keys, 0.0)).max(initial=0.0)).any():
        return {"entropy": SAME_CONTEXT, "without_first": SAME_CONTEXT, "weighting": weighting}
    out: dict[str, ContextFit | str | None] = {"weighting": weighting}
    out["entropy"] = context_fit(geometry.entropy_by_position, log_keys, weights)
    without = dynamic_per_head(geometry, "entropy_without_first_by_position", WITHOUT_FIRST_BY_POSITION_KEY)
    if without is None or without.shape != geometry.entropy_by_position.shape:
        out["without_first"] = f"the geometry's dynamic rows have no {WITHOUT_FIRST_BY_POSITION_KEY}"
    else:  # a query that sees one key sees nothing once the first is left out
        out["without_first"] = context_fit(without, log_keys, np.where(log_keys > 0, weights, 0.0))
    return out
