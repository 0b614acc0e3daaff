"""A dense float64 reference for the operator-level fits, in numpy alone (nothing from qkspectra).

Per head, M = W_Q W_K^T is formed as a d_model x d_model matrix (the factors carry sqrt(s)), and every
figure of docs/method/operator_fits.md is computed from it directly:
- T = <M_L, M_a>_F / ||M_a||_F^2 (0 where ||M_a||^2 < 1e-20, residual then 1);
- residual = ||M_L - T M_a||_F / ||M_L||_F (0 where ||M_L|| <= 1e-20), from the singular values of the
  dense difference (the first min(d_model, 2 d_head) of them are reported);
- matched heads: the one-to-one assignment of the anchor's heads maximising the total |cosine| between
  operators, found here by dynamic programming over subsets of the anchor's heads (exact), and the
  same T and residual against the matched head;
- the mean of the 2k principal angles (degrees) between the top-k left singular subspaces of M_L^h and
  M_a^h and between the top-k right ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TINY = 1e-20


@dataclass(frozen=True)
class ReferenceFit:
    T: np.ndarray  # (H,)
    residual: np.ndarray
    matched_head: np.ndarray
    matched_T: np.ndarray
    matched_residual: np.ndarray
    angles_deg_mean: np.ndarray
    difference_singvals: np.ndarray  # (H, min(d_model, 2 d_head))


def best_assignment(score: np.ndarray) -> np.ndarray:
    """The permutation p maximising sum_h score[h, p[h]] (square score), by DP over subsets of the columns."""
    n = score.shape[0]
    best = {0: (0.0, ())}  # columns used (bit mask) -> (total of rows 0..popcount-1, their columns)
    for row in range(n):
        following = {}
        for used, (total, columns) in best.items():
            for column in range(n):
                if used >> column & 1:
                    continue
                candidate = (total + float(score[row, column]), columns + (column,))
                key = used | 1 << column
                if key not in following or candidate[0] > following[key][0]:
                    following[key] = candidate
        best = following
    return np.array(best[(1 << n) - 1][1])


def principal_angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles (degrees) between the column spans of orthonormal A, B (d, k)."""
    cosines = np.linalg.svd(A.T @ B, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


class ReferenceFitter:
    """W_Q, W_K: (L, H, d_model, d_head) float64, one key factor per query head."""

    def __init__(self, W_Q: np.ndarray, W_K: np.ndarray, subspace_dim: int = 8):
        self.W_Q, self.W_K = W_Q, W_K
        self.k = min(subspace_dim, W_Q.shape[-1], W_Q.shape[-2])
        self.r = min(W_Q.shape[-2], 2 * W_Q.shape[-1])
        self._held: dict[int, tuple] = {}  # the layers of the last fit
        self._anchor = -1
        self.norm_sq = np.stack([np.einsum("hmn,hmn->h", M, M) for M in map(self.operators, range(W_Q.shape[0]))])

    def operators(self, layer: int) -> np.ndarray:
        """(H, d_model, d_model) the layer's dense operators."""
        return np.einsum("hmd,hnd->hmn", self.W_Q[layer], self.W_K[layer])

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The layer's operators and their top-k left and right singular bases (H, d_model, k)."""
        if layer not in self._held:
            M = self.operators(layer)
            U, _, Vt = np.linalg.svd(M)
            self._held = {key: value for key, value in self._held.items() if key == self._anchor}  # at most two
            self._held[layer] = (M, U[..., : self.k], np.swapaxes(Vt, -1, -2)[..., : self.k])
        return self._held[layer]

    def _against(self, M_L: np.ndarray, M_a: np.ndarray, heads: np.ndarray):
        """T, residual and difference singular values of each head h of M_L (H, d_model, d_model) against
        head heads[h] of M_a."""
        H = heads.size
        T, residual, singvals = np.zeros(H), np.zeros(H), np.zeros((H, self.r))
        for h, g in enumerate(heads):
            ours, theirs = M_L[h], M_a[g]
            anchor_sq = np.sum(theirs * theirs)
            T[h] = np.sum(ours * theirs) / anchor_sq if anchor_sq >= TINY else 0.0
            singvals[h] = np.linalg.svd(ours - T[h] * theirs, compute_uv=False)[: self.r]
            norm = np.sqrt(np.sum(ours * ours))
            if anchor_sq < TINY:
                residual[h] = 1.0
            elif norm > TINY:
                residual[h] = np.sqrt(np.sum(singvals[h] ** 2)) / norm
        return T, residual, singvals

    def fit(self, layer: int, anchor: int) -> ReferenceFit:
        self._anchor = anchor
        M_a, left_a, right_a = self.layer(anchor)
        M_L, left_L, right_L = self.layer(layer)
        H = M_L.shape[0]
        inner = np.einsum("hmn,gmn->hg", M_L, M_a)  # (H, H)
        norms = np.sqrt(self.norm_sq[layer][:, None] * self.norm_sq[anchor][None, :])
        abs_cos = np.divide(np.abs(inner), norms, out=np.zeros_like(inner), where=norms > TINY)
        matched = best_assignment(abs_cos)
        heads = np.arange(H)
        T, residual, singvals = self._against(M_L, M_a, heads)
        matched_T, matched_residual, _ = self._against(M_L, M_a, matched)
        angles = np.array([np.concatenate([principal_angles(left_L[h], left_a[h]),
                                           principal_angles(right_L[h], right_a[h])]).mean()
                           for h in range(H)])
        return ReferenceFit(T, residual, matched, matched_T, matched_residual, angles, singvals)
