"""The operator-level fits as first written (all layers in memory, Householder QR for every residual):
the oracle the streamed fits are checked against."""

from __future__ import annotations

import numpy as np

from qkspectra.analysis.operator_fit import LayerFit, relative_residual
from qkspectra.analysis.seed import TINY
from qkspectra.factored import (
    difference_singular_values,
    frobenius_inner,
    pairwise_frobenius_inner,
    principal_angles_deg,
    top_singular_bases,
)


class ReferenceFitter:
    """W_Q, W_K: (L, H, d_model, d_head) float64, one key factor per query head."""

    def __init__(self, W_Q: np.ndarray, W_K: np.ndarray, subspace_dim: int = 8):
        self.W_Q, self.W_K = W_Q, W_K
        self.norm_sq = frobenius_inner(W_Q, W_K, W_Q, W_K)  # (L, H)
        self.left, self.right = top_singular_bases(W_Q, W_K, min(subspace_dim, W_Q.shape[-1], W_Q.shape[-2]))

    def _scalar_fit(self, layer, anchor, heads, inner):
        anchor_sq = self.norm_sq[anchor, heads]
        fits = anchor_sq >= TINY
        T = np.divide(inner, anchor_sq, out=np.zeros_like(inner), where=fits)
        singvals = difference_singular_values(self.W_Q[layer], self.W_K[layer], self.W_Q[anchor, heads],
                                              self.W_K[anchor, heads], T)
        return T, relative_residual(singvals, np.sqrt(self.norm_sq[layer]), fits), singvals

    def fit(self, layer: int, anchor: int) -> LayerFit:
        from scipy.optimize import linear_sum_assignment

        inner = pairwise_frobenius_inner(self.W_Q[layer], self.W_K[layer], self.W_Q[anchor], self.W_K[anchor])
        norms = np.sqrt(self.norm_sq[layer][:, None] * self.norm_sq[anchor][None, :])
        abs_cos = np.divide(np.abs(inner), norms, out=np.zeros_like(inner), where=norms > TINY)
        _, matched = linear_sum_assignment(abs_cos, maximize=True)
        heads = np.arange(self.W_Q.shape[1])
        T, residual, singvals = self._scalar_fit(layer, anchor, heads, inner[heads, heads])
        matched_T, matched_residual, _ = self._scalar_fit(layer, anchor, matched, inner[heads, matched])
        angles = np.concatenate([principal_angles_deg(self.left[layer], self.left[anchor]),
                                 principal_angles_deg(self.right[layer], self.right[anchor])], axis=-1)
        return LayerFit(T, residual, matched, matched_T, matched_residual, angles.mean(axis=-1), singvals)
