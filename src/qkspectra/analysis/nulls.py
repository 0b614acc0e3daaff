"""Null baselines: what the spectral figures look like when there is no shared operator.

Each qualified figure of the seed's experiments is recomputed on seeded draws of a null
geometry (``gaussian``: independent Gaussian heads; ``shuffle``: the model's own spectra with
their (layer, head) labels permuted), giving a null mean, std and empirical p-value.
Axes: B draws, L layers, H heads, K singular values.

The method in full: docs/method/nulls.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from qkspectra.analysis.seed import (
    Analysis,
    anchor_layers,
    mean_off_diagonal,
    pairwise_cosines,
    scalar_rescale,
    spectral_shape,
)
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry

NULL_LABELS = {"gaussian": "Gaussian", "shuffle": "shuffle"}  # for prose
SHAPE_INVARIANCE = "shape_invariance_mean"
CROSS_HEAD = "cross_head_mean_cos"
RESIDUAL_PREFIX = "mean_residual."  # over every (L, h), as the seed
RESIDUAL_FITTED_PREFIX = "mean_residual_fitted."  # over the fitted layers only (anchor layers left out)
RELATIVE_TIE = 1e-9  # a null figure this close (relative) to the real one counts as equally alike
ABSOLUTE_TIE = 1e-12
CHUNK_BYTES = 64 * 2**20  # memory for one chunk of draws' intermediate arrays
_GAUSSIAN_STREAM, _SHUFFLE_STREAM = 1, 2


MAX_NULL_DRAWS = 100_000  # far beyond any p-value resolution a report needs; bounds the memory asked for


@dataclass(frozen=True)
class NullOptions:
    """How the nulls are drawn.

    gaussian_budget bounds draws * L * H * d_head**3 (the cost of the Gaussian null's
    SVDs, about a second per 1e9 on one core); above it the Gaussian null takes fewer
    draws, but never fewer than min_gaussian_draws (so that p can reach 1/21 < 0.05).
    """

    shuffle_draws: int = 200
    gaussian_draws: int = 200
    seed: int = 0
    gaussian_budget: float = 2e9
    min_gaussian_draws: int = 20

    def __post_init__(self) -> None:
        for name in ("shuffle_draws", "gaussian_draws", "min_gaussian_draws"):
            if getattr(self, name) < 1:
                raise QkspectraError(f"null draws: {name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class FigureNull:
    """One real figure against its null distribution (all None where the figure is undefined)."""

    real: float | None
    null_mean: float | None
    null_std: float | None
    p_value: float | None


@dataclass(frozen=True)
class NullBaseline:
    """One null's draws and every qualified figure against them.

    reason: why the null is unavailable, or a note on how it was drawn (fewer draws), else None.
    """

    name: str
    available: bool
    reason: str | None
    draws: int
    seed: int
    figures: dict[str, FigureNull]


# ----------------------------------------------------------------------------
# The seed's figures, batched over draws
# ----------------------------------------------------------------------------


def anchor_rules(analyses: dict[str, Analysis]) -> dict[str, tuple[str | int, int | None]]:
    """Each strategy's anchor rule as (strategy or layer index, number of groups)."""
    rules = {}
    for name, a in analyses.items():
        if a.anchor.strategy == "index":
            rules[name] = (int(a.anchor.layers[0]), None)
        else:
            rules[name] = (a.anchor.strategy, len(a.anchor.groups) if a.anchor.strategy == "group" else None)
    return rules


def batched_figures(sigma: np.ndarray, rules: dict[str, tuple[str | int, int | None]]) -> dict[str, np.ndarray | None]:
    """The qualified figures of every draw at once.

    sigma: (B, L, H, K). Returns {figure name: (B,)}, None where the figure is undefined
    (one layer: no shape cosine across layers; one head: no cross-head cosine; every layer an
    anchor: no residual over fitted layers).
    """
    shape = spectral_shape(sigma)  # (B, L, H, K)
    layer_cos = pairwise_cosines(np.swapaxes(shape, -3, -2))  # (B, H, L, L)
    head_cos = pairwise_cosines(shape)  # (B, L, H, H)
    per_head = mean_off_diagonal(layer_cos)  # (B, H) or None
    per_layer = mean_off_diagonal(head_cos)  # (B, L) or None
    out: dict[str, np.ndarray | None] = {
        SHAPE_INVARIANCE: None if per_head is None else per_head.mean(axis=-1),
        CROSS_HEAD: None if per_layer is None else per_layer.mean(axis=-1),
    }
    for name, (rule, groups) in rules.items():
        layers, _, _ = anchor_layers(layer_cos, rule, groups)  # (B, L)
        anchor = np.take_along_axis(sigma, layers[:, :, None, None], axis=1)  # (B, L, H, K)
        _, residual = scalar_rescale(sigma, anchor)  # (B, L, H)
        out[RESIDUAL_PREFIX + name] = residual.mean(axis=(-2, -1))
        fitted = layers != np.arange(layers.shape[-1])  # (B, L)
        count = fitted.sum(axis=-1) * residual.shape[-1]  # (B,) fitted (L, h) of each draw
        total = np.einsum("blh,bl->b", residual, fitted)  # (B,)
        out[RESIDUAL_FITTED_PREFIX + name] = (
            np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0) if count.any() else None
        )
    return out


def real_figures(analyses: dict[str, Analysis]) -> dict[str, float | None]:
    """The same figures as :func:`batched_figures`, read from the analyses of the real geometry."""
    first = next(iter(analyses.values()))
    per_layer = first.cross_head.per_layer_mean_cos
    out = {
        SHAPE_INVARIANCE: first.shape_invariance.mean,
        CROSS_HEAD: None if per_layer is None else float(per_layer.mean()),
    }
    for name, a in analyses.items():
        out[RESIDUAL_PREFIX + name] = a.rescale.mean_residual
        out[RESIDUAL_FITTED_PREFIX + name] = a.rescale.mean_residual_fitted
    return out


def higher_is_more_alike(figure: str) -> bool:
    """Cosines: higher is more alike; residuals: lower is."""
    return not figure.startswith((RESIDUAL_PREFIX, RESIDUAL_FITTED_PREFIX))


def empirical_p_value(real: float, null: np.ndarray, higher_is_alike: bool) -> float:
    """(1 + #null at least as alike as real) / (1 + draws). null: (B,)."""
    tie = RELATIVE_TIE * abs(real) + ABSOLUTE_TIE
    alike = null >= real - tie if higher_is_alike else null <= real + tie  # (B,)
    return float((1 + np.count_nonzero(alike)) / (1 + null.size))


def compare(real: dict[str, float | None], null: dict[str, np.ndarray | None]) -> dict[str, FigureNull]:
    """Every real figure against its null draws."""
    out = {}
    for name, value in real.items():
        draws = null[name]
        if draws is not None:
            draws = draws[~np.isnan(draws)]  # (B',) the draws where the figure is defined
        if value is None or draws is None or draws.size == 0:
            out[name] = FigureNull(value, None, None, None)
        else:
            p = empirical_p_value(value, draws, higher_is_more_alike(name))
            out[name] = FigureNull(value, float(draws.mean()), float(draws.std()), p)
    return out


def _chunked_figures(
    sample: Callable[[int, int], np.ndarray], draws: int, per_draw_bytes: int, rules: dict
) -> dict[str, np.ndarray | None]:
    """batched_figures over draws [0, draws) in chunks; sample(start, stop) -> (stop - start, L, H, K).

    Chunks run on every core (threads, one BLAS thread each: a threaded BLAS on a busy machine made
    the Gaussian null's SVDs 25 times slower); the draws do not depend on the chunking.
    """
    from concurrent.futures import ThreadPoolExecutor

    from qkspectra.threads import single_blas_thread, worker_count

    step = max(1, CHUNK_BYTES // max(per_draw_bytes, 1))
    workers = worker_count()
    step = max(1, min(step, -(-draws // workers)))  # at least one chunk per core

    def figures(start: int) -> dict[str, np.ndarray | None]:
        return batched_figures(sample(start, min(start + step, draws)), rules)

    with single_blas_thread(), ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(figures, range(0, draws, step)))
    return {name: None if any(p[name] is None for p in parts) else np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _figure_bytes(L: int, H: int, K: int) -> int:
    """Rough memory of one draw inside batched_figures."""
    return 8 * (6 * L * H * K + 2 * H * L * L + 2 * L * H * H)


# ----------------------------------------------------------------------------
# Gaussian null
# ----------------------------------------------------------------------------


def sample_bartlett_factor(rng: np.random.Generator, size: tuple[int, ...], d_model: int, d_head: int) -> np.ndarray:
    """Triangular QR factors of Gaussian d_model x d_head matrices, sampled directly.

    Returns (*size, d_head, d_head), upper triangular: diagonal i ~ chi(d_model - i),
    strictly upper entries N(0, 1), all independent (Bartlett decomposition).
    """
    R = np.zeros((*size, d_head, d_head))
    i = np.arange(d_head)
    R[..., i, i] = np.sqrt(rng.chisquare(d_model - i, size=(*size, d_head)))  # (*size, d_head)
    upper_rows, upper_cols = np.triu_indices(d_head, k=1)
    R[..., upper_rows, upper_cols] = rng.standard_normal((*size, upper_rows.size))  # (*size, d_head (d_head - 1) / 2)
    return R


def gaussian_spectra(
    rngs: Iterable[np.random.Generator], num_layers: int, num_heads: int, d_model: int, d_head: int, num_kv_heads: int
) -> np.ndarray:
    """Singular values of W_Q^h (W_K^h)^T for independent Gaussian factors, one draw per generator.

    Query head h uses kv head h // (H / H_kv). Returns (B, L, H, d_head), descending.
    """
    group = num_heads // num_kv_heads
    R_Q, R_K = [], []
    for rng in rngs:
        R_Q.append(sample_bartlett_factor(rng, (num_layers, num_heads), d_model, d_head))  # (L, H, d_head, d_head)
        R_K.append(sample_bartlett_factor(rng, (num_layers, num_kv_heads), d_model, d_head))  # (L, H_kv, d_head, d_head)
    R_Q = np.stack(R_Q)  # (B, L, H, d_head, d_head)
    R_K = np.stack(R_K)  # (B, L, H_kv, d_head, d_head)
    if group > 1:
        R_K = np.repeat(R_K, group, axis=2)  # (B, L, H, d_head, d_head)
    return np.linalg.svd(R_Q @ np.swapaxes(R_K, -1, -2), compute_uv=False)  # (B, L, H, d_head)


def draw_generators(seed: int, stream: int, start: int, stop: int) -> list[np.random.Generator]:
    return [np.random.default_rng((seed, stream, i)) for i in range(start, stop)]


def gaussian_shapes(geometry: Geometry) -> tuple[int, int, int] | str:
    """(d_model, d_head, num_kv_heads) from the geometry's metadata, or why the Gaussian null cannot run."""
    meta, H, K = geometry.metadata, geometry.num_heads, geometry.max_rank
    missing = [key for key in ("d_model", "d_head") if key not in meta]
    if missing:
        return f"the geometry's metadata lacks {' and '.join(missing)} (extraction writes them)"
    values = {key: meta.get(key) for key in ("d_model", "d_head", "num_kv_heads")}
    for key, value in values.items():
        if value is not None and (type(value) is not int or value < 1):
            return f"metadata {key} is {value!r}, not a positive whole number"
    d_model, d_head = values["d_model"], values["d_head"]
    kv = H if values["num_kv_heads"] is None else values["num_kv_heads"]
    if d_head > d_model:
        return f"metadata d_head {d_head} exceeds d_model {d_model}"
    if H % kv:
        return f"metadata num_kv_heads {kv} does not divide the {H} heads"
    if K > d_head:
        return f"the spectra hold {K} values but metadata d_head is {d_head}"
    return d_model, d_head, kv


def gaussian_null(
    geometry: Geometry, analyses: dict[str, Analysis], options: NullOptions = NullOptions()
) -> NullBaseline:
    """Independent Gaussian heads with the model's shapes (see the module docstring)."""
    real = real_figures(analyses)
    shapes = gaussian_shapes(geometry)
    if isinstance(shapes, str):
        empty = {name: FigureNull(value, None, None, None) for name, value in real.items()}
        return NullBaseline("gaussian", False, shapes, 0, options.seed, empty)
    d_model, d_head, kv = shapes
    L, H, K = geometry.singular_values.shape
    draws, note = options.gaussian_draws, None
    per_draw_work = L * H * d_head**3
    if draws * per_draw_work > options.gaussian_budget:
        draws = max(min(options.min_gaussian_draws, draws), int(options.gaussian_budget // per_draw_work))
        note = (
            f"draws reduced from {options.gaussian_draws} to {draws} to bound the work "
            f"({L * H} heads of d_head {d_head})"
        )

    def sample(start: int, stop: int) -> np.ndarray:
        rngs = draw_generators(options.seed, _GAUSSIAN_STREAM, start, stop)
        return gaussian_spectra(rngs, L, H, d_model, d_head, kv)[..., :K]  # (B, L, H, K)

    per_draw = max(_figure_bytes(L, H, K), 8 * 4 * L * H * d_head * d_head)
    null = _chunked_figures(sample, draws, per_draw, anchor_rules(analyses))
    return NullBaseline("gaussian", True, note, draws, options.seed, compare(real, null))


# ----------------------------------------------------------------------------
# Shuffle null
# ----------------------------------------------------------------------------


def shuffled_spectra(sigma: np.ndarray, permutations: np.ndarray) -> np.ndarray:
    """The spectra with (layer, head) labels permuted.

    sigma: (L, H, K); permutations: (B, L*H) each a permutation of range(L*H). Returns (B, L, H, K).
    """
    L, H, K = sigma.shape
    return sigma.reshape(L * H, K)[permutations].reshape(-1, L, H, K)


def shuffle_null(geometry: Geometry, analyses: dict[str, Analysis], options: NullOptions = NullOptions()) -> NullBaseline:
    """The model's own spectra with the (layer, head) labels permuted (see the module docstring)."""
    sigma = geometry.singular_values  # (L, H, K)
    L, H, K = sigma.shape
    draws = options.shuffle_draws
    rng = np.random.default_rng((options.seed, _SHUFFLE_STREAM))
    permutations = np.argsort(rng.random((draws, L * H)), axis=1)  # (B, L*H)
    null = _chunked_figures(
        lambda start, stop: shuffled_spectra(sigma, permutations[start:stop]), draws, _figure_bytes(L, H, K), anchor_rules(analyses)
    )
    return NullBaseline("shuffle", True, None, draws, options.seed, compare(real_figures(analyses), null))


def null_baselines(
    geometry: Geometry, analyses: dict[str, Analysis], options: NullOptions = NullOptions()
) -> dict[str, NullBaseline]:
    """Both nulls for the figures of ``analyses`` (the strategies of the document)."""
    return {
        "gaussian": gaussian_null(geometry, analyses, options),
        "shuffle": shuffle_null(geometry, analyses, options),
    }
