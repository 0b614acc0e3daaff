"""Static part: per-head singular values of the QK metric, computed from its factors.

For head h of layer L the metric is M = s * W_Q^h (W_K^h)^T (d_model x d_model, rank <= d_head),
so that x^T M y is the pre-softmax logit before biases and positions. Its singular values are
those of the small core s * R_Q R_K^T, where W_Q^h = Q_Q R_Q and W_K^h = Q_K R_K are thin QR
factorisations (Q_Q, Q_K have orthonormal columns). Everything is float64 and batched over
heads; the d_model x d_model matrix is never formed.

The triangular factor R of a well-conditioned factor W is computed as CholeskyQR does it: the
Cholesky factor of the d_head x d_head Gram matrix W^T W = R^T R, which is the R of Householder
QR up to the signs of its rows (signs that leave the core's singular values unchanged). One
matrix product replaces a Householder sweep. Forming the Gram matrix squares the condition
number, so a factor whose estimated condition number exceeds ``GRAM_CONDITION_LIMIT``, whose
Gram matrix is not numerically positive definite (rank-deficient heads) or overflows, is
factorised by Householder QR instead. On the bundled models the largest estimated condition
is 1.3e3 (SmolLM2, folded), and both routes give the same singular values to 2e-15 of each
head's largest (measured, folded and raw). ``benchmarks/bench_static.py`` times the pass both ways.

Norm folding (on by default): if a norm with gain g (and bias beta) feeds the block, x = g * x_hat
+ beta with x_hat the normalised vector, and the logit in terms of x_hat has the factors
diag(g) W_Q, diag(g) W_K and the biases b_Q + beta W_Q, b_K + beta W_K.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.linalg.lapack import dtrcon

from qkspectra._threads import single_blas_thread
from qkspectra.errors import QkspectraError
from qkspectra.extract.factors_file import FactorSink
from qkspectra.extract.linearised_norm import NormRMS, isotropic_layer_rms, linearise
from qkspectra.models.adapters import AttentionAdapter, AttentionLayer
from qkspectra.models.tensors import TensorSource


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch on one thread: the per-head factorisations are small, and on a busy machine
    a second spinning thread makes them many times slower rather than faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fold_norm(layer: AttentionLayer) -> AttentionLayer:
    """The same layer seen from the normalised vector x_hat (norm gain and bias folded in).

    A layer with no norm feeding it is returned unchanged.
    """
    if layer.norm_gain is None:
        return layer
    g = layer.norm_gain[None, :, None]  # (1, d_model, 1)

    def folded_bias(bias: np.ndarray | None, W: np.ndarray) -> np.ndarray | None:
        if layer.norm_bias is None:
            return bias
        shift = np.einsum("d,hde->he", layer.norm_bias, W)  # (H, d_head)
        return shift if bias is None else bias + shift

    return replace(
        layer,
        W_Q=g * layer.W_Q,
        W_K=g * layer.W_K,
        b_Q=folded_bias(layer.b_Q, layer.W_Q),
        b_K=folded_bias(layer.b_K, layer.W_K),
        norm_gain=None,
        norm_bias=None,
    )


# Largest condition number of W (LAPACK's 1-norm estimate for R, ``trcon``) for which R is
# taken from the Gram matrix. Measured on Kahan-type factors (576 x 64) against a dense SVD,
# the Gram route's error grows like eps * condition: 6e-15 of the top singular value at
# condition 3e3, 8e-14 at 1e5, 4e-12 at 3e6. The bundled models' factors reach 1.3e3.
GRAM_CONDITION_LIMIT = 1e4


class NonFiniteFactor(ValueError):
    """A query or key factor holds NaN or infinite entries."""


def r_factors(W: np.ndarray) -> np.ndarray:
    """Triangular factors of thin QR, batched: (..., d_model, d_head) -> (..., k, d_head), k = min(d_model, d_head).

    CholeskyQR for factors the Gram route handles accurately, Householder QR for the rest
    (see the module's documentation); rows of R may differ in sign between the two.
    Raises NonFiniteFactor if W is not finite.
    """
    W = np.asarray(W, dtype=np.float64)
    d_model, d_head = W.shape[-2:]
    if d_model < d_head or W.size == 0:
        return householder_r_factors(W)
    with np.errstate(over="ignore", invalid="ignore"):  # such factors go to Householder below
        gram = np.matmul(W.swapaxes(-1, -2), W)  # (..., d_head, d_head)
    # Every entry of W enters one diagonal entry of its Gram matrix as a square, so NaN or inf
    # in W (or squares beyond float64's range) shows in that diagonal.
    finite = np.isfinite(np.diagonal(gram, axis1=-2, axis2=-1)).all(-1)  # (...,)
    R, info = torch.linalg.cholesky_ex(torch.from_numpy(np.where(finite[..., None, None], gram, 1.0)), upper=True)
    R = R.numpy()  # (..., d_head, d_head)
    householder = ~finite | (info.numpy() != 0)  # (...,)
    flat_R, flat_householder = R.reshape(-1, d_head, d_head), householder.reshape(-1)
    for i in np.flatnonzero(~flat_householder):
        reciprocal_condition = dtrcon(flat_R[i], norm="1", uplo="U")[0]
        flat_householder[i] = not reciprocal_condition * GRAM_CONDITION_LIMIT >= 1.0  # NaN-safe
    householder = flat_householder.reshape(householder.shape)
    if householder.any():
        R[householder] = householder_r_factors(W[householder])
    return R


def householder_r_factors(W: np.ndarray) -> np.ndarray:
    """Triangular factors of thin QR by Householder reflections: (..., d_model, d_head) -> (..., k, d_head).

    Raises NonFiniteFactor if W is not finite.
    """
    if not np.isfinite(W).all():
        raise NonFiniteFactor("not all finite")
    return np.linalg.qr(W, mode="r")


def metric_singular_values(W_Q: np.ndarray, W_K: np.ndarray, scale: float) -> np.ndarray:
    """Singular values of scale * W_Q[h] @ W_K[h // g].T per query head h, descending.

    W_Q: (H, d_model, d_head); W_K: (H_kv, d_model, d_head) with H_kv dividing H, g = H / H_kv
    (grouped-query attention: each key factor is factorised once for its g query heads).
    Returns (H, k) float64, k = min(d_model, d_head). Raises NonFiniteFactor if a factor is not finite.
    """
    R_Q = r_factors(W_Q)  # (H, k, d_head)
    R_K = r_factors(W_K)  # (H_kv, k, d_head)
    H, k = R_Q.shape[:2]
    core = np.matmul(R_Q.reshape(R_K.shape[0], -1, k, R_Q.shape[-1]), R_K[:, None].swapaxes(-1, -2))  # (H_kv, g, k, k)
    return scale * np.linalg.svd(core.reshape(H, k, k), compute_uv=False)


def spectrum_statistics(singvals: np.ndarray) -> dict[str, np.ndarray]:
    """Per-spectrum summaries of singular values (..., k) sorted descending -> arrays of shape (...).

    operator_norm:  s_0
    frobenius_norm: sqrt(sum s_i^2)
    stable_rank:    ||M||_F^2 / ||M||_2^2
    effective_rank: exp(-sum p_i log p_i), p_i = s_i / sum s (0 log 0 = 0)
    An all-zero spectrum has stable and effective rank 0.
    """
    operator_norm = singvals[..., 0]
    frobenius_sq = np.sum(singvals**2, axis=-1)
    nonzero = operator_norm > 0
    stable_rank = np.divide(frobenius_sq, operator_norm**2, out=np.zeros_like(frobenius_sq), where=nonzero)
    total = np.sum(singvals, axis=-1, keepdims=True)
    p = np.divide(singvals, total, out=np.zeros_like(singvals), where=total > 0)
    plogp = p * np.log(p, out=np.zeros_like(p), where=p > 0)
    effective_rank = np.where(nonzero, np.exp(-np.sum(plogp, axis=-1)), 0.0)
    return {
        "operator_norm": operator_norm,
        "frobenius_norm": np.sqrt(frobenius_sq),
        "stable_rank": stable_rank,
        "effective_rank": effective_rank,
    }


@dataclass(frozen=True, eq=False)
class StaticSpectra:
    """Result of the static pass over all layers.

    rows:             per layer, the geometry's static row (lists, JSON-ready)
    scales:           (L,) the logit scale s of each layer
    norm_folded:      (L,) whether a norm gain was folded into that layer
    factors:          W_Q (L, H, d_model, d_head), W_K (L, H_kv, d_model, d_head) float32 with sqrt(s)
                      in each, so that W_Q[l, h] @ W_K[l, h // (H / H_kv)].T is the metric; b_Q (L, H, d_head),
                      b_K (L, H_kv, d_head) likewise
                      times sqrt(s), when the model has them. None when they went to a factor sink.
    checkpoint_dtype: stored dtype of the query weights
    qk_biases:        whether the checkpoint has query and key biases: {"query": bool, "key": bool}
                      (as stored; folding a LayerNorm's bias adds bias factors even where it has none)
    norm_rms:         the typical RMS before the q/k norms the linearised metric used; None without q/k norms
    """

    rows: list[dict]
    scales: list[float]
    norm_folded: list[bool]
    factors: dict[str, np.ndarray] | None
    checkpoint_dtype: str
    qk_biases: dict[str, bool]
    norm_rms: NormRMS | None = None


def layer_factors(layer: AttentionLayer) -> dict[str, np.ndarray]:
    """The layer's factors with sqrt(s) in each, float32, each key/value head once.

    W_Q (H, d_model, d_head), W_K (H_kv, d_model, d_head), b_Q (H, d_head), b_K (H_kv, d_head);
    query head h reads key head h // (H / H_kv).
    """
    root_scale = np.sqrt(layer.scale)
    factors = {"W_Q": layer.W_Q, "W_K": layer.W_K, "b_Q": layer.b_Q, "b_K": layer.b_K}
    with np.errstate(over="ignore"):  # written straight into C order: the checkpoint's layout is transposed
        scaled = {name: np.multiply(factor, root_scale, out=np.empty(factor.shape, np.float32), casting="same_kind")
                  for name, factor in factors.items() if factor is not None}
    if not all(np.isfinite(factor).all() for factor in scaled.values()):
        raise NonFiniteFactor("beyond float32's range")
    return scaled


class FactorCollector:
    """A factor sink that stacks every layer's factors (``layer_factors``) in memory: (L, ...) per name."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.factors: dict[str, np.ndarray] = {}

    def __call__(self, index: int, layer: AttentionLayer) -> None:
        for name, factor in layer_factors(layer).items():
            if name not in self.factors:
                self.factors[name] = np.empty((self.num_layers, *factor.shape), dtype=np.float32)
            self.factors[name][index] = factor


def static_spectra(
    adapter: AttentionAdapter,
    tensors: TensorSource,
    *,
    fold_ln: bool = True,
    on_layer: Callable[[int], None] | None = None,
    factor_sink: FactorSink | None = None,
    norm_rms: NormRMS | None = None,
) -> StaticSpectra:
    """Read each layer's query/key tensors, fold norms if asked, and compute its spectra.

    Heads with query/key norms are replaced by their linearised metric (``extract.qk_norm``), with
    the typical RMS ``norm_rms`` measured on a corpus, or for isotropic unit-RMS input when None.

    Layers are read one at a time; only the current layer is held in float64. Each layer, as
    used for the spectra (folded if asked), goes to ``factor_sink(index, layer)`` if given (e.g.
    a file being streamed), else its ``layer_factors`` are gathered into ``StaticSpectra.factors``.
    ``on_layer(index)`` is called after each layer (progress reporting).
    """
    collector = FactorCollector(adapter.num_layers) if factor_sink is None else None
    sink = collector if collector is not None else factor_sink
    rows, scales, norm_folded = [], [], []
    used_rms: list[tuple] = []
    qk_biases = {"query": False, "key": False}
    with single_threaded_torch(), single_blas_thread():
        for index in range(adapter.num_layers):
            layer = adapter.layer(tensors, index)
            if index == 0:
                qk_biases = {"query": layer.b_Q is not None, "key": layer.b_K is not None}
            norm_folded.append(fold_ln and layer.norm_gain is not None)
            if layer.has_qk_norm:
                rms = isotropic_layer_rms(layer) if norm_rms is None else (norm_rms.query[index], norm_rms.key[index])
                used_rms.append(rms)
                layer = linearise(layer, rms)
            if fold_ln:
                layer = fold_norm(layer)
            try:
                if not all(np.isfinite(b).all() for b in (layer.b_Q, layer.b_K) if b is not None):
                    raise NonFiniteFactor("biases not all finite")
                singvals = metric_singular_values(layer.W_Q, layer.W_K, layer.scale)  # (H, k)
            except NonFiniteFactor:
                raise QkspectraError(f"layer {index}: the checkpoint's query/key weights are not all finite") from None
            stats = spectrum_statistics(singvals)
            rows.append(
                {
                    "metric_singvals_per_head": singvals.tolist(),
                    **{f"{name}_per_head": values.tolist() for name, values in stats.items()},
                }
            )
            scales.append(layer.scale)
            try:
                sink(index, layer)
            except NonFiniteFactor:
                raise QkspectraError(f"layer {index}: the query/key factors exceed float32's range (about 3.4e38), "
                                     "the factors file's type") from None
            if on_layer is not None:
                on_layer(index)
    query_name = adapter.prefixed(tensors, adapter.anchor_tensor())
    return StaticSpectra(rows, scales, norm_folded, None if collector is None else collector.factors,
                         tensors.dtype(query_name), qk_biases, _stacked_rms(used_rms))


def _stacked_rms(used: list[tuple]) -> NormRMS | None:
    """The per-layer (query, key) RMS the linearisation used, stacked; None for models without q/k norms."""
    if not used:
        return None
    def side(i: int) -> np.ndarray:
        return np.stack([np.full(1, np.nan) if rms[i] is None else rms[i] for rms in used])
    return NormRMS(query=side(0), key=side(1))
