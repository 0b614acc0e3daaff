"""Reconstruction targets as factors (X, Y) with X Y^T = target: spectral, operator and rank-k (numpy only).

Each target is given in a frame a head can hold: the spectral one rescales the head's own factors
along its singular directions, the operator one uses the anchor's (T W_Q[a], W_K[a]), a truncated
rank-k one its SVD factors moved to the frame closest to the head's own (``align_frame``). Arrays are
(L, H, d_model, width) for all layers or (H, d_model, width) for one. See docs/method/functional_test.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qkspectra.factored import difference_core

if TYPE_CHECKING:
    from qkspectra.analysis.factors import Factors, LayerFactors

# Heads whose rank-k correction is formed at a time: a head's QR and SVD temporaries are about 24 times its factors.
HEADS_PER_CORRECTION = 4


def spectral_target(factors: Factors | LayerFactors, singular_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each head's own singular vectors with new singular values, in the head's own frame.

    factors: all layers' (W_Q (L, H, d_model, d_head)) or one layer's (H, d_model, d_head);
    singular_values: (L, H, K) or (H, K), K <= d_head (missing ones are 0). With W_Q = Q_1 R_1, W_K = Q_2 R_2,
    R_1 R_2^T = U S V^T and r = new / S (0 where S <= 1e-12 S_max): X = Q_1 U diag(sqrt r) U^T R_1,
    Y = Q_2 V diag(sqrt r) V^T R_2, so X Y^T = Q_1 U diag(r S) V^T Q_2^T, and r = 1 gives back W_Q, W_K.
    """
    Q1, R1 = np.linalg.qr(factors.W_Q)  # (L, H, d_model, d_head), (L, H, d_head, d_head)
    Q2, R2 = np.linalg.qr(factors.W_K)
    U, S, Vt = np.linalg.svd(R1 @ np.swapaxes(R2, -1, -2))  # (L, H, d_head, d_head), (L, H, d_head), ...
    target = np.zeros_like(S)  # (L, H, d_head)
    target[..., : singular_values.shape[-1]] = singular_values
    significant = S > 1e-12 * S[..., :1]
    root_ratio = np.sqrt(np.divide(target, S, out=np.zeros_like(S), where=significant))  # (L, H, d_head)
    V = np.swapaxes(Vt, -1, -2)
    X = Q1 @ (U * root_ratio[..., None, :]) @ np.swapaxes(U, -1, -2) @ R1
    Y = Q2 @ (V * root_ratio[..., None, :]) @ Vt @ R2
    return X, Y


def operator_target(factors: Factors, anchor_layers: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T * M_a in the anchor's own frame: X = T W_Q[a], Y = W_K[a]. anchor_layers (L,), T (L, H)."""
    return T[..., None, None] * factors.W_Q[anchor_layers], factors.W_K[anchor_layers]


def best_rank(X: np.ndarray, Y: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors of the best rank-``rank`` approximation of X Y^T: (..., d_model, w) -> (..., d_model, rank)."""
    Qx, Rx = np.linalg.qr(X)  # (..., d_model, w'), (..., w', w)
    Qy, Ry = np.linalg.qr(Y)
    U, S, Vt = np.linalg.svd(Rx @ np.swapaxes(Ry, -1, -2))  # (..., w', w'), (..., w'), (..., w', w')
    width = min(rank, S.shape[-1])
    root = np.sqrt(S[..., :width])[..., None, :]  # (..., 1, width)
    X_r = Qx @ U[..., :width] * root
    Y_r = Qy @ np.swapaxes(Vt, -1, -2)[..., :width] * root
    pad = [(0, 0)] * (X.ndim - 1) + [(0, rank - width)]
    return np.pad(X_r, pad), np.pad(Y_r, pad)


def rank_k_target(factors: Factors, anchor_layers: np.ndarray, T: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T * M_a plus the best rank-k correction of D = M_L - T M_a, truncated to rank d_head. k: (L, H) int.

    D = [W_Q, -T W_Q[a]] [W_K, W_K[a]]^T = Q_x (U S V^T) Q_y^T; its rank-k part is Q_x U_k S_k V_k^T Q_y^T.
    Heads with k = 0 keep the operator target (anchor frame) untouched.
    """
    return rank_k_correction(factors.W_Q, factors.W_K, *operator_target(factors, anchor_layers, T), k)


def rank_k_correction(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray, k: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Factors of C D^T plus the best rank-k part of A B^T - C D^T, truncated to rank d_head, in A's frame.

    A, B: (..., d_model, d_head) a head's own factors; C, D: its operator target's (T W_Q[a], W_K[a]);
    k: (...,) int. Heads with k = 0 keep (C, D) untouched. Formed ``HEADS_PER_CORRECTION`` heads at a time.
    """
    lead, (d_model, d_head) = A.shape[:-2], A.shape[-2:]
    flat = [x.reshape(-1, d_model, d_head) for x in (A, B, C, D)]  # (N, d_model, d_head) each
    k_flat = np.broadcast_to(k, lead).reshape(-1)  # (N,)
    parts = [_difference_core_correction(*(x[start:start + HEADS_PER_CORRECTION] for x in flat),
                                         k_flat[start:start + HEADS_PER_CORRECTION])
             for start in range(0, k_flat.size, HEADS_PER_CORRECTION)]
    return (np.concatenate([x for x, _ in parts]).reshape(A.shape),
            np.concatenate([y for _, y in parts]).reshape(A.shape))


def _difference_core_correction(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray, k: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray]:
    """``rank_k_correction`` for (N, d_model, d_head) factors and k (N,), through the [A, -C][B, D] difference core."""
    d_head = A.shape[-1]
    Qx, core, Qy = difference_core(A, B, C, D, bases=True)  # (N, d_model, r), (N, r, r), (N, d_model, r)
    U, S, Vt = np.linalg.svd(core)  # (N, r, r), (N, r), (N, r, r)
    kept = np.where(np.arange(S.shape[-1]) < k[..., None], S, 0.0)  # (N, r): the k largest
    X = np.concatenate([C, Qx @ (U * kept[..., None, :])], axis=-1)  # (N, d_model, d_head + r)
    Y = np.concatenate([D, Qy @ np.swapaxes(Vt, -1, -2)], axis=-1)
    X_t, Y_t = align_frame(*best_rank(X, Y, d_head), A)  # (N, d_model, d_head)
    corrected = (k > 0)[..., None, None]
    return np.where(corrected, X_t, C), np.where(corrected, Y_t, D)


def align_frame(X: np.ndarray, Y: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-express factors in the frame of ``own`` without changing X Y^T: X G, Y G^-T with G = argmin ||X G - own||.

    X, Y, own: (..., d_model, d_head). Heads whose G is ill-conditioned (cond > 1e8) keep their factors.
    Matters for rotary models only, where positions act in the d_head coordinates.
    """
    G = np.linalg.pinv(X) @ own  # (..., d_head, d_head)
    well_conditioned = (np.linalg.cond(G) < 1e8)[..., None, None]
    safe_G = np.where(well_conditioned, G, np.eye(G.shape[-1]))
    return X @ safe_G, Y @ np.swapaxes(np.linalg.inv(safe_G), -1, -2)
