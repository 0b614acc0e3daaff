"""Static part: per-head singular values of the QK metric, computed from its factors.

For head h of layer L the metric is M = s * W_Q^h (W_K^h)^T (d_model x d_model, rank <= d_head),
so that x^T M y is the pre-softmax logit before biases and positions. Its singular values are
those of the small core s * R_Q R_K^T, where W_Q^h = Q_Q R_Q and W_K^h = Q_K R_K are thin QR
factorisations (Q_Q, Q_K have orthonormal columns). Everything is float64 and batched over
heads; the d_model x d_model matrix is never formed.

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

from qkspectra.errors import QkspectraError
from qkspectra.extract.factors_file import FactorSink
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


def r_factors(W: np.ndarray) -> torch.Tensor:
    """Triangular factors of thin QR, batched: (..., d_model, d_head) -> (..., k, d_head), k = min(d_model, d_head)."""
    return torch.linalg.qr(torch.as_tensor(W, dtype=torch.float64), mode="r").R


def metric_singular_values(W_Q: np.ndarray, W_K: np.ndarray, scale: float, *, kv_group_size: int = 1) -> np.ndarray:
    """Singular values of scale * W_Q[h] @ W_K[h].T per head, descending.

    W_Q, W_K: (H, d_model, d_head). With ``kv_group_size`` g > 1, consecutive groups of g heads
    share one key factor (grouped-query attention) and each is factorised only once.
    Returns (H, k) float64, k = min(d_model, d_head).
    """
    R_Q = r_factors(W_Q)  # (H, k, d_head)
    R_K = torch.repeat_interleave(r_factors(W_K[::kv_group_size]), kv_group_size, dim=0)  # (H, k, d_head)
    core = R_Q @ R_K.mT  # (H, k, k)
    return (scale * torch.linalg.svdvals(core)).numpy()


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
    factors:          W_Q, W_K (L, H, d_model, d_head) float32 with sqrt(s) in each, so that
                      W_Q[l, h] @ W_K[l, h].T is the metric; b_Q, b_K (L, H, d_head) likewise
                      times sqrt(s), when the model has them. None when they went to a factor sink.
    checkpoint_dtype: stored dtype of the query weights
    """

    rows: list[dict]
    scales: list[float]
    norm_folded: list[bool]
    factors: dict[str, np.ndarray] | None
    checkpoint_dtype: str


def layer_factors(layer: AttentionLayer) -> dict[str, np.ndarray]:
    """The layer's factors with sqrt(s) in each, float32: W_Q, W_K (H, d_model, d_head), b_Q, b_K (H, d_head)."""
    root_scale = np.sqrt(layer.scale)
    factors = {"W_Q": layer.W_Q, "W_K": layer.W_K, "b_Q": layer.b_Q, "b_K": layer.b_K}
    return {name: np.multiply(factor, root_scale, dtype=np.float32)
            for name, factor in factors.items() if factor is not None}


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
) -> StaticSpectra:
    """Read each layer's query/key tensors, fold norms if asked, and compute its spectra.

    Layers are read one at a time; only the current layer is held in float64. Each layer, as
    used for the spectra (folded if asked), goes to ``factor_sink(index, layer)`` if given (e.g.
    a file being streamed), else its ``layer_factors`` are gathered into ``StaticSpectra.factors``.
    ``on_layer(index)`` is called after each layer (progress reporting).
    """
    collector = FactorCollector(adapter.num_layers) if factor_sink is None else None
    sink = collector if collector is not None else factor_sink
    kv_group_size = adapter.num_heads // adapter.num_kv_heads
    rows, scales, norm_folded = [], [], []
    with single_threaded_torch():
        for index in range(adapter.num_layers):
            layer = adapter.layer(tensors, index)
            norm_folded.append(fold_ln and layer.norm_gain is not None)
            if fold_ln:
                layer = fold_norm(layer)
            if not all(np.isfinite(a).all() for a in (layer.W_Q, layer.W_K, layer.b_Q, layer.b_K) if a is not None):
                raise QkspectraError(f"layer {index}: the checkpoint's query/key weights are not all finite")
            singvals = metric_singular_values(layer.W_Q, layer.W_K, layer.scale, kv_group_size=kv_group_size)  # (H, k)
            stats = spectrum_statistics(singvals)
            rows.append(
                {
                    "metric_singvals_per_head": singvals.tolist(),
                    **{f"{name}_per_head": values.tolist() for name, values in stats.items()},
                }
            )
            scales.append(layer.scale)
            sink(index, layer)
            if on_layer is not None:
                on_layer(index)
    query_name = adapter.prefixed(tensors, adapter.anchor_tensor())
    return StaticSpectra(rows, scales, norm_folded, None if collector is None else collector.factors,
                         tensors.dtype(query_name))
