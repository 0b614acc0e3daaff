"""Linear algebra on factored products X Y^T (d_model x d_model, rank <= d_head), never formed.

Used by extraction (the static spectra), the operator-level fits and the reconstructions: thin-QR
triangles by CholeskyQR with a condition check (Householder QR where that is not accurate),
singular values of X Y^T and of differences [A, -T C] [B, D]^T from small cores, Frobenius inner
products from d_head-sized Gram products, singular bases and principal angles. Everything is
float64 and batched over leading axes (heads, layers). numpy only at import: scipy and torch are
imported inside the functions that need them. The derivations: see docs/method/spectra.md and
docs/method/operator_fits.md.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from qkspectra.errors import QkspectraError

# Largest condition number (LAPACK's 1-norm estimate ``trcon`` of the triangle) for which a triangle is
# taken from its Gram matrix (CholeskyQR). Measured on Kahan-type factors (576 x 64) against a dense SVD,
# the Gram route's error grows like eps * condition: 6e-15 of the top singular value at condition 3e3,
# 8e-14 at 1e5, 4e-12 at 3e6. The bundled models' factors reach 1.3e3.
GRAM_CONDITION_LIMIT = 1e4

# Products smaller than this many multiply-adds stay in numpy even with a GPU (the transfers would dominate).
GPU_MIN_PRODUCT = 2**24


class NonFiniteFactor(ValueError):
    """A query or key factor holds NaN or infinite entries."""


# ----------------------------------------------------------------------------
# Triangles of thin QR: CholeskyQR where it is accurate, Householder QR elsewhere
# ----------------------------------------------------------------------------


def well_conditioned(R: np.ndarray) -> bool:
    """Whether the upper triangle R (n, n) is accurate enough from its Gram matrix: LAPACK's estimated
    condition number at most ``GRAM_CONDITION_LIMIT`` (False for NaN)."""
    from scipy.linalg.lapack import dtrcon

    reciprocal_condition, info = dtrcon(R, norm="1", uplo="U")
    return info == 0 and reciprocal_condition * GRAM_CONDITION_LIMIT >= 1.0  # NaN-safe


def r_factors(W: np.ndarray) -> np.ndarray:
    """Triangular factors of thin QR, batched: (..., d_model, d_head) -> (..., k, d_head), k = min(d_model, d_head).

    CholeskyQR (torch's batched Cholesky of W^T W) for factors the Gram route handles accurately,
    Householder QR for the rest; rows of R may differ in sign between the two.
    Raises NonFiniteFactor if W is not finite.
    """
    import torch

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
        flat_householder[i] = not well_conditioned(flat_R[i])
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


def scaled_cholesky_triangle(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(R, s) with gram = diag(s) R^T R diag(s), R (n, n) upper triangular of the column-scaled Gram matrix
    (unit diagonal), s (n,); None where CholeskyQR is not accurate (not positive definite, condition above
    ``GRAM_CONDITION_LIMIT``). gram: (n, n)."""
    from scipy.linalg.lapack import dpotrf

    scale = np.sqrt(np.diagonal(gram))  # (n,)
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        return None
    R, info = dpotrf(gram / np.outer(scale, scale), lower=0, clean=1)
    if info != 0 or not well_conditioned(R):
        return None
    return R, scale


# ----------------------------------------------------------------------------
# Singular values of X Y^T: three routes, by the accuracy each caller needs
# ----------------------------------------------------------------------------


def metric_singular_values(W_Q: np.ndarray, W_K: np.ndarray, scale: float) -> np.ndarray:
    """Singular values of scale * W_Q[h] @ W_K[h // g].T per query head h, descending (``r_factors``: CholeskyQR).

    W_Q: (H, d_model, d_head); W_K: (H_kv, d_model, d_head) with H_kv dividing H, g = H / H_kv
    (grouped-query attention: each key factor is factorised once for its g query heads).
    Returns (H, k) float64, k = min(d_model, d_head). Raises NonFiniteFactor if a factor is not finite.
    """
    R_Q = r_factors(W_Q)  # (H, k, d_head)
    R_K = r_factors(W_K)  # (H_kv, k, d_head)
    H, k = R_Q.shape[:2]
    core = np.matmul(R_Q.reshape(R_K.shape[0], -1, k, R_Q.shape[-1]), R_K[:, None].swapaxes(-1, -2))  # (H_kv, g, k, k)
    return scale * np.linalg.svd(core.reshape(H, k, k), compute_uv=False)


def head_singular_values(W_Q: np.ndarray, W_K: np.ndarray) -> np.ndarray:
    """Singular values of W_Q W_K^T by Householder QR of both factors, descending.

    W_Q, W_K: (..., d_model, d_head), one key factor per query head -> (..., min(d_model, d_head)).
    """
    core = np.linalg.qr(W_Q, mode="r") @ np.swapaxes(np.linalg.qr(W_K, mode="r"), -1, -2)  # (..., k, k)
    return np.linalg.svd(core, compute_uv=False)


def gram_singular_values(W_Q: np.ndarray, W_K: np.ndarray) -> np.ndarray:
    """Singular values of W_Q[h] @ W_K[h // g].T from the Gram matrices (eigenvalues of (A^T A)(B^T B)), descending.

    W_Q: (H, d_model, d_head); W_K: (H_kv, d_model, d_head) -> (H, min(d_model, d_head)). Accurate to about
    sqrt(eps) of the largest: enough to recognise a geometry's spectra, not to compute them.
    """
    num_heads = W_Q.shape[0]
    kv = np.arange(num_heads) // (num_heads // W_K.shape[0])  # (H,)
    gram_Q = np.swapaxes(W_Q, -1, -2) @ W_Q  # (H, d_head, d_head)
    gram_K = np.swapaxes(W_K, -1, -2) @ W_K  # (H_kv, d_head, d_head)
    squares = np.linalg.eigvals(gram_Q @ gram_K[kv]).real  # (H, d_head): eigenvalues of a product of PSD matrices
    values = -np.sort(-np.sqrt(np.clip(squares, 0.0, None)), axis=-1)
    return values[:, : min(W_Q.shape[1], W_Q.shape[2])]


# ----------------------------------------------------------------------------
# Inner products through d_head-sized Gram products; the large ones on a GPU
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def product_device() -> str | None:
    """The torch device of the large products (``large_product``), or None: numpy on the CPU.

    ``QKSPECTRA_OPERATOR_DEVICE``: ``cpu`` (numpy), ``cuda`` / ``cuda:N``, or unset: the first CUDA
    device when torch is installed and sees one. torch is imported only on a machine with an NVIDIA
    device node (or when a device is named), so the analysis needs numpy alone.
    """
    requested = os.environ.get("QKSPECTRA_OPERATOR_DEVICE", "").strip()
    if requested == "cpu":
        return None
    if requested and not (requested == "cuda" or (requested.startswith("cuda:") and requested[5:].isdigit())):
        raise QkspectraError(f"QKSPECTRA_OPERATOR_DEVICE={requested}: expected cpu, cuda or cuda:N")
    if not requested and not os.path.exists("/dev/nvidiactl"):
        return None
    try:
        import torch
    except ImportError:
        if requested:
            raise QkspectraError(f"QKSPECTRA_OPERATOR_DEVICE={requested}: torch is not installed") from None
        return None
    if not torch.cuda.is_available():
        if requested:
            raise QkspectraError(f"QKSPECTRA_OPERATOR_DEVICE={requested}: this machine has no CUDA device")
        return None
    device = requested or "cuda:0"
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise QkspectraError(f"QKSPECTRA_OPERATOR_DEVICE={requested}: this machine has "
                             f"{torch.cuda.device_count()} CUDA devices")
    return device


def large_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64 (numpy broadcasting rules): on ``product_device()`` when there is one and the product is large."""
    device = product_device()
    if device is None or a.shape[-2] * a.shape[-1] * b.shape[-1] * max(1, a.size // (a.shape[-2] * a.shape[-1])) \
            < GPU_MIN_PRODUCT:
        return a @ b
    import torch

    product = torch.from_numpy(np.ascontiguousarray(a)).to(device) @ torch.from_numpy(np.ascontiguousarray(b)).to(device)
    return product.cpu().numpy()


def frobenius_inner(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray) -> np.ndarray:
    """<A B^T, C D^T>_F without forming the products.

    A, B, C, D: (..., d_model, d_head) -> (...); = sum_ij (A^T C)_ij (B^T D)_ij.
    """
    gram_left = np.swapaxes(A, -1, -2) @ C  # (..., d_head, d_head)
    gram_right = np.swapaxes(B, -1, -2) @ D  # (..., d_head, d_head)
    return np.einsum("...ij,...ij->...", gram_left, gram_right)


def pairwise_frobenius_inner(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray) -> np.ndarray:
    """<A_h B_h^T, C_g D_g^T>_F for every pair of heads (h, g).

    A, B: (H, d_model, d_head); C, D: (G, d_model, d_head) -> (H, G).
    """
    def all_pairs_gram(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """X (H, d_model, d_head), Y (G, d_model, d_head) -> (H, d_head, G, d_head), one matrix product."""
        H, d_model, d_head = X.shape
        wide_x = X.transpose(1, 0, 2).reshape(d_model, -1)  # (d_model, H d_head)
        wide_y = Y.transpose(1, 0, 2).reshape(d_model, -1)  # (d_model, G d_head)
        return (wide_x.T @ wide_y).reshape(H, d_head, Y.shape[0], Y.shape[2])

    gram_left = all_pairs_gram(A, C)  # (H, d_head, G, d_head)
    gram_right = all_pairs_gram(B, D)  # (H, d_head, G, d_head)
    return np.einsum("higj,higj->hg", gram_left, gram_right, optimize=True)


def grouped_pairwise_inner(A: np.ndarray, C: np.ndarray, key_gram: np.ndarray) -> np.ndarray:
    """<A_h B_h^T, C_g D_g^T>_F for every pair of query heads (h, g), given the key Gram products.

    A: (H, d_model, d_head), C: (G, d_model, d_head) query factors; key_gram: (H_kv, G_kv, d_head, d_head)
    with key_gram[k, k'] = B_k^T D_k' (query head h reads key head h // (H / H_kv)). -> (H, G).
    = sum_ij (A_h^T C_g)_ij (B^T D)_ij = <A_h (B^T D), C_g>_F: one product A_h (B^T D) per query head of L and
    key head of the anchor (H * G_kv of them), then dot products; with H_kv = H the same cost as A^T C for all pairs.
    """
    H, G = A.shape[0], C.shape[0]
    H_kv, G_kv = key_gram.shape[:2]
    group, anchor_group = H // H_kv, G // G_kv
    inner = np.empty((H, G))
    for k in range(H_kv):  # blocks of query heads sharing a key head: each block a few d_model x d_head products
        rows = slice(k * group, (k + 1) * group)
        for k2 in range(G_kv):
            cols = slice(k2 * anchor_group, (k2 + 1) * anchor_group)
            applied = large_product(A[rows], key_gram[k, k2])  # (group, d_model, d_head)
            inner[rows, cols] = large_product(applied.reshape(group, -1), C[cols].reshape(anchor_group, -1).T)
    return inner


def cross_gram(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """X_i^T Y_j for every pair: X (N, d_model, d), Y (M, d_model, d) -> (N, M, d, d), one matrix product."""
    N, d_model, d = X.shape
    wide = large_product(X.transpose(1, 0, 2).reshape(d_model, -1).T,
                         Y.transpose(1, 0, 2).reshape(d_model, -1))  # (N d, M d)
    return wide.reshape(N, d, Y.shape[0], d).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------
# Singular values of a difference A B^T - T C D^T (rank <= 2 d_head)
# ----------------------------------------------------------------------------


def difference_core(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray, *, bases: bool = False):
    """The core of A B^T - C D^T = [A, -C] [B, D]^T = Q_X (R_X R_Y^T) Q_Y^T, by Householder QR of both sides.

    A, B, C, D: (..., d_model, d_head); r = min(d_model, 2 d_head). Returns the core R_X R_Y^T
    (..., r, r), whose singular values are the difference's; with ``bases``, (Q_X, core, Q_Y), Q (..., d_model, r).
    """
    left = np.concatenate([A, -C], axis=-1)  # (..., d_model, 2 d_head)
    right = np.concatenate([B, D], axis=-1)  # (..., d_model, 2 d_head)
    if not bases:
        return np.linalg.qr(left, mode="r") @ np.swapaxes(np.linalg.qr(right, mode="r"), -1, -2)
    Q_X, R_X = np.linalg.qr(left)
    Q_Y, R_Y = np.linalg.qr(right)
    return Q_X, R_X @ np.swapaxes(R_Y, -1, -2), Q_Y


def difference_singular_values(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray,
                               T: np.ndarray) -> np.ndarray:
    """Singular values of A B^T - T C D^T, descending: A, B, C, D (..., d_model, d_head); T (...) -> (..., r)."""
    return np.linalg.svd(difference_core(A, B, T[..., None, None] * C, D), compute_uv=False)


def gram_difference_singular_values(gram_A: np.ndarray, cross_AC: np.ndarray, gram_C: np.ndarray,
                                    gram_B: np.ndarray, cross_BD: np.ndarray, gram_D: np.ndarray,
                                    T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of A B^T - T C D^T from Gram products alone, where that is accurate.

    gram_A = A^T A, cross_AC = A^T C, gram_C = C^T C, gram_B, cross_BD, gram_D likewise: (H, d, d); T: (H,).
    X = [A, -T C], Y = [B, D]: X^T X and Y^T Y are assembled from the blocks, each column-scaled and
    Cholesky-factorised (``scaled_cholesky_triangle``); the singular values are those of R_X diag(s_X s_Y) R_Y^T.
    Returns (values (H, 2d) descending, accurate (H,) bool): rows where ``accurate`` is False are NaN.
    """
    H, d = gram_A.shape[:2]
    t = T[:, None, None]  # (H, 1, 1)
    gram_X = np.empty((H, 2 * d, 2 * d))
    gram_X[:, :d, :d], gram_X[:, :d, d:], gram_X[:, d:, d:] = gram_A, -t * cross_AC, (t * t) * gram_C
    gram_X[:, d:, :d] = np.swapaxes(gram_X[:, :d, d:], -1, -2)
    gram_Y = np.empty((H, 2 * d, 2 * d))
    gram_Y[:, :d, :d], gram_Y[:, :d, d:], gram_Y[:, d:, d:] = gram_B, cross_BD, gram_D
    gram_Y[:, d:, :d] = np.swapaxes(cross_BD, -1, -2)
    cores = np.full((H, 2 * d, 2 * d), np.nan)
    accurate = np.zeros(H, dtype=bool)
    for h in range(H):  # per head: LAPACK's Cholesky reports failure per matrix
        left, right = scaled_cholesky_triangle(gram_X[h]), scaled_cholesky_triangle(gram_Y[h])
        if left is not None and right is not None:
            (R_X, s_X), (R_Y, s_Y) = left, right
            cores[h] = (R_X * (s_X * s_Y)) @ R_Y.T  # R_X diag(s_X s_Y) R_Y^T
            accurate[h] = True
    values = np.full((H, 2 * d), np.nan)
    if accurate.any():
        values[accurate] = np.linalg.svd(cores[accurate], compute_uv=False)
    return values, accurate


# ----------------------------------------------------------------------------
# Singular subspaces and the angles between them
# ----------------------------------------------------------------------------


def top_singular_bases(W_Q: np.ndarray, W_K: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases of the top-k left and right singular subspaces of W_Q W_K^T.

    W_Q, W_K: (..., d_model, d_head) -> left, right: (..., d_model, k).
    W_Q = Q_1 R_1, W_K = Q_2 R_2, R_1 R_2^T = U S V^T: left = Q_1 U[:, :k], right = Q_2 V[:, :k].
    """
    Q1, R1 = np.linalg.qr(W_Q)  # (..., d_model, d_head), (..., d_head, d_head)
    Q2, R2 = np.linalg.qr(W_K)
    U, _, Vt = np.linalg.svd(R1 @ np.swapaxes(R2, -1, -2))  # (..., d_head, d_head) each
    return Q1 @ U[..., :k], Q2 @ np.swapaxes(Vt, -1, -2)[..., :k]


def grouped_top_singular_bases(W_Q: np.ndarray, W_K: np.ndarray, kv_head: np.ndarray, k: int,
                               chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``top_singular_bases`` of W_Q[h] W_K[kv_head[h]]^T for every query head, ``chunk`` heads at a time.

    W_Q: (H, d_model, d_head); W_K: (H_kv, d_model, d_head); kv_head: (H,) -> left, right: (H, d_model, k).
    The key factors are factorised once per key/value head.
    """
    Q2, R2 = np.linalg.qr(W_K)  # (H_kv, d_model, d_head), (H_kv, d_head, d_head)
    H = W_Q.shape[0]
    left = np.empty((H, W_Q.shape[1], k))
    right = np.empty_like(left)
    for start in range(0, H, chunk):
        heads = slice(start, min(start + chunk, H))
        Q1, R1 = np.linalg.qr(W_Q[heads])  # (c, d_model, d_head), (c, d_head, d_head)
        kv = kv_head[heads]
        U, _, Vt = np.linalg.svd(R1 @ np.swapaxes(R2[kv], -1, -2))  # (c, d_head, d_head) each
        left[heads] = Q1 @ U[..., :k]
        right[heads] = Q2[kv] @ np.swapaxes(Vt, -1, -2)[..., :k]
    return left, right


def principal_angles_deg(basis_1: np.ndarray, basis_2: np.ndarray) -> np.ndarray:
    """Principal angles between the spans of orthonormal bases, in degrees, ascending.

    basis_1, basis_2: (..., d_model, k) -> (..., k); cosines are the singular values of Q_1^T Q_2.
    """
    cosines = np.linalg.svd(np.swapaxes(basis_1, -1, -2) @ basis_2, compute_uv=False)  # (..., k)
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))
