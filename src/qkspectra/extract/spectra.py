"""The static pass: per-head singular values of the QK metric s * W_Q^h (W_K^h)^T, from its factors.

Each layer is read, its q/k norms linearised (``extract.linearised_norm``), its input norm folded if
asked, and the singular values of every head's metric computed from the small core s * R_Q R_K^T of
thin-QR triangles (``factored.metric_singular_values``: CholeskyQR, Householder QR where that is not
accurate); the d_model x d_model matrix is never formed. The layer's factors go to a factor sink.
The method in full: see docs/method/spectra.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qkspectra.threads import single_blas_thread, single_threaded_torch
from qkspectra.errors import QkspectraError
from qkspectra.extract.factors_file import FactorSink
from qkspectra.extract.linearised_norm import NormRMS, isotropic_layer_rms, linearise
from qkspectra.models.adapters.base import fold_norm
from qkspectra.factored import NonFiniteFactor, metric_singular_values
from qkspectra.models.adapters import AttentionAdapter, AttentionLayer
from qkspectra.models.tensors import TensorSource


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

    Heads with query/key norms are replaced by their linearised metric (``extract.linearised_norm``), with
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
