"""Operator-level test of the rescale hypothesis, from the per-head factors.

The spectral test compares singular values only. Here the operators themselves are compared:
M_L^h = W_Q^h (W_K^h)^T with the factors of the ``<stem>.factors.safetensors`` file (sqrt(s) already
in each factor, norms folded as in the geometry; each key/value head stored once). A d_model x d_model
matrix is never formed:

- inner products through d_head-sized Gram matrices,
  <A B^T, C D^T>_F = trace((A^T C)(D^T B)) = sum_ij (A^T C)_ij (B^T D)_ij;
- T = <M_L, M_a>_F / ||M_a||_F^2, the least-squares scalar (it may be negative);
- the residual ||M_L - T M_a||_F / ||M_L||_F from the singular values of the difference,
  D = [A, -T C] [B, D]^T = X Y^T: its singular values are those of the small core R_X R_Y^T, R_X and
  R_Y the triangles of thin QR of X and Y (d_model x 2 d_head). (Expanding ||M_L||^2 - <M_L, M_a>^2 / ||M_a||^2
  instead would lose half the digits to cancellation: a residual of 1e-16 would come out as 1e-8.)
  The triangles come from the Gram matrices X^T X, Y^T Y, assembled from d_head-sized Gram products
  the fit has anyway (CholeskyQR, each column scaled to unit norm first), and from Householder QR of
  X and Y only where that is not accurate: a Gram matrix that is not numerically positive definite or
  whose scaled triangle's estimated condition exceeds ``GRAM_CONDITION_LIMIT`` (a head fitted to a
  near copy of itself, rank-deficient heads). A layer fitted to itself is exact: T = 1, residual 0.

Head order within a layer is arbitrary, so every head of layer L is also fitted to its best
match among the heads of the anchor layer: the one-to-one assignment maximising the total
|cosine| between operators (Hungarian algorithm on the (H, H) |cosine| matrix). With grouped-query
attention the (H, H) inner products cost H * H_kv products of d_head-wide blocks, not H * H: the key
Gram product of each pair of key/value heads is formed once and applied to the query factors.

Principal angles: between the top-k left singular subspaces of M_L^h and M_a^h, and between
the top-k right ones (k = ``subspace_dim``, default 8, at most d_head); reported as the mean of
those 2k angles in degrees (0: same subspaces, 90: orthogonal).

Guards as in the spectral fit: an anchor operator with ||M_a||^2 < 1e-20 gives T = 0 and
residual 1; an all-zero M_L has residual 0.

GPU: the large products of a layer-pair fit (the cross Gram products over d_model, the grouped inner
products) run on a CUDA GPU in float64 when torch is installed and sees one (``product_device``;
``QKSPECTRA_OPERATOR_DEVICE=cpu`` keeps them in numpy, ``cuda:N`` picks a device); everything else,
and every reduction that decides a figure (Cholesky, QR, SVD, the assignment), stays in numpy float64.

Memory: the factors are read one layer at a time (from the file, lazily); all that is kept for every
layer are per-head summaries (Gram matrices, norms) and the top-k singular bases (in scratch files
when the factors come from a file). A layer-pair fit holds its two layers. Layer pairs are fitted on
every core (threads, one BLAS thread each: OpenBLAS threads even its calls on 384 x 32 matrices,
and on a busy two-core machine that made them 10 to 100 times slower).
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qkspectra._threads import single_blas_thread
from qkspectra.analysis.seed import NO_FITTED_LAYER, TINY, Anchor
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry

DEFAULT_SUBSPACE_DIM = 8
FACTOR_NAMES = ("W_Q", "W_K")
BIAS_NAMES = ("b_Q", "b_K")
# Largest estimated condition number (LAPACK's 1-norm estimate) of the column-scaled triangle for which
# a difference's triangle is taken from its Gram matrix; as in the static pass (extract.spectra), where
# the Gram route's error was measured to grow like eps * condition (6e-15 of the top singular value at 3e3).
GRAM_CONDITION_LIMIT = 1e4

# Products smaller than this many multiply-adds stay in numpy even with a GPU (the transfers would dominate).
GPU_MIN_PRODUCT = 2**24

# A ``map``-like callable: map(function, items) -> iterable of results, in order.
Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]
# Progress of a stage: on_step(stage, done, total), called after each unit of work.
StepCallback = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------
# The factors: in memory, or read layer by layer from the factors file
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerFactors:
    """One layer's factors, float64: M^h = W_Q[h] @ W_K[h // (H / H_kv)].T.

    W_Q: (H, d_model, d_head); W_K: (H_kv, d_model, d_head); b_Q: (H, d_head) or None; b_K: (H_kv, d_head) or None.
    """

    W_Q: np.ndarray
    W_K: np.ndarray
    b_Q: np.ndarray | None = None
    b_K: np.ndarray | None = None


class _FactorsShape:
    """Sizes shared by in-memory and file-backed factors (``_shape`` = W_Q's, ``_kv_heads`` = W_K's head count)."""

    _shape: tuple[int, int, int, int]
    _kv_heads: int

    @property
    def num_layers(self) -> int:
        return self._shape[0]

    @property
    def num_heads(self) -> int:
        return self._shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self._kv_heads

    @property
    def d_model(self) -> int:
        return self._shape[2]

    @property
    def d_head(self) -> int:
        return self._shape[3]

    @property
    def kv_head(self) -> np.ndarray:
        """(H,) the key/value head each query head reads."""
        return np.arange(self.num_heads) // (self.num_heads // self.num_kv_heads)


@dataclass(frozen=True, eq=False)
class Factors(_FactorsShape):
    """Per-head query/key factors in memory, M[l, h] = W_Q[l, h] @ W_K[l, h // (H / H_kv)].T (the scale s included).

    W_Q: (L, H, d_model, d_head) float64; W_K: (L, H_kv, d_model, d_head), H_kv dividing H (H_kv = H: one key
    factor per query head); b_Q: (L, H, d_head), b_K: (L, H_kv, d_head) float64 or None.
    fold_ln: whether the norm gains were folded in (None when the file does not say).
    """

    W_Q: np.ndarray
    W_K: np.ndarray
    b_Q: np.ndarray | None = None
    b_K: np.ndarray | None = None
    fold_ln: bool | None = None
    source: str = "<memory>"

    @property
    def _shape(self) -> tuple[int, int, int, int]:
        return self.W_Q.shape

    @property
    def _kv_heads(self) -> int:
        return self.W_K.shape[1]

    def layer(self, index: int) -> LayerFactors:
        return LayerFactors(self.W_Q[index], self.W_K[index],
                            None if self.b_Q is None else self.b_Q[index], None if self.b_K is None else self.b_K[index])


def _check_shapes(source: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """QkspectraError unless W_Q is (L, H, d_model, d_head), W_K (L, H_kv, d_model, d_head) with H_kv dividing H,
    and the biases (L, H, d_head), (L, H_kv, d_head)."""
    for name in FACTOR_NAMES:
        if name not in shapes:
            raise QkspectraError(f"{source}: no {name} tensor in the factors")
    q, k = shapes["W_Q"], shapes["W_K"]
    if len(q) != 4:
        raise QkspectraError(f"{source}: W_Q has shape {q}, expected (L, H, d_model, d_head)")
    if len(k) != 4 or (k[0], k[2], k[3]) != (q[0], q[2], q[3]) or k[1] < 1 or q[1] % k[1]:
        raise QkspectraError(f"{source}: W_K has shape {k} but W_Q has {q} "
                             "(expected (L, H_kv, d_model, d_head), H_kv dividing H)")
    for name, heads in zip(BIAS_NAMES, (q[1], k[1])):
        if name in shapes and shapes[name] != (q[0], heads, q[3]):
            raise QkspectraError(f"{source}: {name} has shape {shapes[name]}, expected {(q[0], heads, q[3])}")


def make_factors(arrays: dict[str, np.ndarray], *, fold_ln: bool | None = None, source: str = "<memory>",
                 geometry: Geometry | None = None) -> Factors:
    """Validate arrays named W_Q, W_K (and optionally b_Q, b_K) and build ``Factors`` (float64)."""
    _check_shapes(source, {name: np.shape(array) for name, array in arrays.items()})
    converted = {name: np.asarray(arrays[name], dtype=np.float64) for name in FACTOR_NAMES + BIAS_NAMES
                 if name in arrays}
    for name, array in converted.items():
        if not np.all(np.isfinite(array)):
            raise QkspectraError(f"{source}: {name} holds non-finite values")
    factors = Factors(converted["W_Q"], converted["W_K"], converted.get("b_Q"), converted.get("b_K"), fold_ln, source)
    if geometry is not None:
        check_against_geometry(factors, geometry)
    return factors


class FactorsFile(_FactorsShape):
    """The factors of a ``.factors.safetensors`` file, read one layer at a time (float64) by ``layer(index)``.

    The file of an earlier layout, with W_K repeated for every query head (L, H, d_model, d_head), reads
    as it is: each key factor then simply serves one query head.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.source = str(self.path)
        if not self.path.is_file():
            raise QkspectraError(f"{self.path}: no such factors file")
        try:
            with safe_open(self.path, framework="numpy") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
                dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
                metadata = f.metadata() or {}
        except (OSError, SafetensorError, ValueError) as e:
            raise QkspectraError(f"{self.path}: not a readable safetensors file ({e})") from None
        _check_shapes(self.source, shapes)
        for name in FACTOR_NAMES + BIAS_NAMES:
            if name in dtypes and dtypes[name] not in ("F32", "F64"):
                raise QkspectraError(f"{self.path}: {name} is {dtypes[name]}, expected F32 (extract again)")
        self._shape = shapes["W_Q"]
        self._kv_heads = shapes["W_K"][1]
        self._names = [name for name in FACTOR_NAMES + BIAS_NAMES if name in shapes]
        value = metadata.get("fold_ln")
        self.fold_ln = None if value is None else value == "true"

    def layer(self, index: int) -> LayerFactors:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path, framework="numpy") as f:  # memory-mapped: only this layer's slices are read
                arrays = {name: np.asarray(f.get_slice(name)[index], dtype=np.float64) for name in self._names}
        except (OSError, SafetensorError, ValueError) as e:
            raise QkspectraError(f"{self.path}: layer {index} cannot be read ({e})") from None
        for name, array in arrays.items():
            if not np.all(np.isfinite(array)):
                raise QkspectraError(f"{self.path}: layer {index}: {name} holds non-finite values")
        return LayerFactors(arrays["W_Q"], arrays["W_K"], arrays.get("b_Q"), arrays.get("b_K"))


AnyFactors = Factors | FactorsFile


def load_factors(path: str | os.PathLike, geometry: Geometry | None = None) -> FactorsFile:
    """Open a ``.factors.safetensors`` file (read lazily, layer by layer); QkspectraError if missing, corrupt
    or inconsistent with ``geometry``."""
    factors = FactorsFile(path)
    if geometry is not None:
        check_against_geometry(factors, geometry)
    return factors


def layer_singular_values(layer: LayerFactors, num_heads: int) -> np.ndarray:
    """(H, min(d_model, d_head)) singular values of each head's metric, descending, from the d_head-sized
    Gram matrices (eigenvalues of (A^T A)(B^T B)): accurate to about sqrt(eps) of the largest, enough to
    recognise a geometry's spectra."""
    kv = np.arange(num_heads) // (num_heads // layer.W_K.shape[0])  # (H,)
    gram_Q = np.swapaxes(layer.W_Q, -1, -2) @ layer.W_Q  # (H, d_head, d_head)
    gram_K = np.swapaxes(layer.W_K, -1, -2) @ layer.W_K  # (H_kv, d_head, d_head)
    squares = np.linalg.eigvals(gram_Q @ gram_K[kv]).real  # (H, d_head): eigenvalues of a product of PSD matrices
    values = -np.sort(-np.sqrt(np.clip(squares, 0.0, None)), axis=-1)
    return values[:, : min(layer.W_Q.shape[1], layer.W_Q.shape[2])]


def check_against_geometry(factors: AnyFactors, geometry: Geometry, *, map: Mapper | None = None) -> None:
    """QkspectraError unless the factors have the geometry's layers and heads and reproduce its spectra.

    Reads one layer at a time (through ``map``, default: every core)."""
    L, H = geometry.num_layers, geometry.num_heads
    if (factors.num_layers, factors.num_heads) != (L, H):
        raise QkspectraError(
            f"{factors.source}: factors for {factors.num_layers} layers x {factors.num_heads} heads, "
            f"but the geometry {geometry.source} has {L} x {H}"
        )
    if geometry.max_rank > min(factors.d_model, factors.d_head):
        raise QkspectraError(
            f"{factors.source}: spectra of length {geometry.max_rank} in {geometry.source} "
            f"exceed the factors' rank {min(factors.d_model, factors.d_head)}"
        )
    expected = geometry.singular_values  # (L, H, K)
    scale = max(np.abs(expected).max(), TINY)

    def worst(index: int) -> float:
        sigma = layer_singular_values(factors.layer(index), H)[:, : geometry.max_rank]  # (H, K)
        return float(np.abs(sigma - expected[index]).max() / scale)

    with _mapping(map) as mapper:
        difference = max(mapper(worst, range(L)))
    if difference > 1e-3:
        raise QkspectraError(
            f"{factors.source}: the factors do not reproduce the spectra of {geometry.source} "
            f"(largest relative difference {difference:.2g}); were they extracted with the same model and norm folding?"
        )


def factors_path_for(geometry: Geometry) -> Path | None:
    """The factors file the geometry's metadata names (beside the geometry file), or None.

    None also when the name is not a plain file name (a path elsewhere is not "beside").
    """
    name = geometry.metadata.get("factors_file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or geometry.source.startswith("<"):
        return None
    return Path(geometry.source).with_name(name)


def layer_cache_size() -> int:
    """Layers a fitter holds at once: two per worker thread and one more, at most 9 (on a many-core
    machine the cache would otherwise hold a whole model's layers in float64)."""
    return min(2 * worker_count() + 1, 9)


def worker_count() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _mapping(map: Mapper | None) -> Iterator[Mapper]:
    """``map`` itself, or a thread pool's map over every core with BLAS on one thread per call."""
    if map is not None:
        yield map
        return
    with single_blas_thread(), ThreadPoolExecutor(worker_count()) as pool:
        yield pool.map


# ----------------------------------------------------------------------------
# Factored linear algebra (batched over any leading axes)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def product_device() -> str | None:
    """The torch device of the operator fits' large products, or None: numpy on the CPU.

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


def head_singular_values(W_Q: np.ndarray, W_K: np.ndarray) -> np.ndarray:
    """Singular values of W_Q W_K^T, descending: (..., d_model, d_head) x 2 -> (..., min(d_model, d_head))."""
    core = np.linalg.qr(W_Q, mode="r") @ np.swapaxes(np.linalg.qr(W_K, mode="r"), -1, -2)  # (..., k, k)
    return np.linalg.svd(core, compute_uv=False)


def difference_singular_values(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray,
                               T: np.ndarray) -> np.ndarray:
    """Singular values of A B^T - T C D^T (rank <= 2 d_head), descending.

    A, B, C, D: (..., d_model, d_head); T: (...) -> (..., min(d_model, 2 d_head)).
    D = [A, -T C] [B, D]^T = Q_1 (R_1 R_2^T) Q_2^T, so its singular values are the core's.
    """
    left = np.concatenate([A, -T[..., None, None] * C], axis=-1)  # (..., d_model, 2 d_head)
    right = np.concatenate([B, D], axis=-1)  # (..., d_model, 2 d_head)
    core = np.linalg.qr(left, mode="r") @ np.swapaxes(np.linalg.qr(right, mode="r"), -1, -2)  # (..., r, r)
    return np.linalg.svd(core, compute_uv=False)


def top_singular_bases(W_Q: np.ndarray, W_K: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases of the top-k left and right singular subspaces of W_Q W_K^T.

    W_Q, W_K: (..., d_model, d_head) -> left, right: (..., d_model, k).
    W_Q = Q_1 R_1, W_K = Q_2 R_2, R_1 R_2^T = U S V^T: left = Q_1 U[:, :k], right = Q_2 V[:, :k].
    """
    Q1, R1 = np.linalg.qr(W_Q)  # (..., d_model, d_head), (..., d_head, d_head)
    Q2, R2 = np.linalg.qr(W_K)
    U, _, Vt = np.linalg.svd(R1 @ np.swapaxes(R2, -1, -2))  # (..., d_head, d_head) each
    return Q1 @ U[..., :k], Q2 @ np.swapaxes(Vt, -1, -2)[..., :k]


def principal_angles_deg(basis_1: np.ndarray, basis_2: np.ndarray) -> np.ndarray:
    """Principal angles between the spans of orthonormal bases, in degrees, ascending.

    basis_1, basis_2: (..., d_model, k) -> (..., k); cosines are the singular values of Q_1^T Q_2.
    """
    cosines = np.linalg.svd(np.swapaxes(basis_1, -1, -2) @ basis_2, compute_uv=False)  # (..., k)
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


def relative_residual(difference_singvals: np.ndarray, norm: np.ndarray, anchor_fits: np.ndarray) -> np.ndarray:
    """||D||_F / ||M_L||_F from D's singular values (..., r); 0 where ||M_L|| <= 1e-20, 1 where the anchor is zero."""
    residual_norm = np.sqrt(np.einsum("...r,...r->...", difference_singvals, difference_singvals))  # (...)
    residual = np.divide(residual_norm, norm, out=np.zeros_like(residual_norm), where=norm > TINY)
    return np.where(anchor_fits, residual, 1.0)


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


def _scaled_triangle(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(R, s) with gram = diag(s) R^T R diag(s), R upper triangular of a column-scaled Gram matrix (unit diagonal),
    or None where CholeskyQR is not accurate (not positive definite, condition estimate above the limit)."""
    from scipy.linalg.lapack import dpotrf, dtrcon

    scale = np.sqrt(np.diagonal(gram))  # (n,)
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        return None
    R, info = dpotrf(gram / np.outer(scale, scale), lower=0, clean=1)
    if info != 0:
        return None
    reciprocal_condition, info = dtrcon(R, norm="1", uplo="U")
    if info != 0 or not reciprocal_condition * GRAM_CONDITION_LIMIT >= 1.0:  # NaN-safe
        return None
    return R, scale


def gram_difference_singular_values(gram_A: np.ndarray, cross_AC: np.ndarray, gram_C: np.ndarray,
                                    gram_B: np.ndarray, cross_BD: np.ndarray, gram_D: np.ndarray,
                                    T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of A B^T - T C D^T from Gram products alone, where that is accurate.

    gram_A = A^T A, cross_AC = A^T C, gram_C = C^T C, gram_B, cross_BD, gram_D likewise: (H, d, d); T: (H,).
    X = [A, -T C], Y = [B, D]: X^T X and Y^T Y are assembled from the blocks, each column-scaled and
    Cholesky-factorised (``_scaled_triangle``); the singular values are those of R_X diag(s_X s_Y) R_Y^T.
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
        left, right = _scaled_triangle(gram_X[h]), _scaled_triangle(gram_Y[h])
        if left is not None and right is not None:
            (R_X, s_X), (R_Y, s_Y) = left, right
            cores[h] = (R_X * (s_X * s_Y)) @ R_Y.T  # R_X diag(s_X s_Y) R_Y^T
            accurate[h] = True
    values = np.full((H, 2 * d), np.nan)
    if accurate.any():
        values[accurate] = np.linalg.svd(cores[accurate], compute_uv=False)
    return values, accurate


def layer_bases(layer: LayerFactors, kv_head: np.ndarray, k: int, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``top_singular_bases`` of every query head of one layer, computed ``chunk`` heads at a time.

    -> left, right: (H, d_model, k). The key factors are factorised once per key/value head.
    """
    Q2, R2 = np.linalg.qr(layer.W_K)  # (H_kv, d_model, d_head), (H_kv, d_head, d_head)
    H = layer.W_Q.shape[0]
    left = np.empty((H, layer.W_Q.shape[1], k))
    right = np.empty_like(left)
    for start in range(0, H, chunk):
        heads = slice(start, min(start + chunk, H))
        Q1, R1 = np.linalg.qr(layer.W_Q[heads])  # (c, d_model, d_head), (c, d_head, d_head)
        kv = kv_head[heads]
        U, _, Vt = np.linalg.svd(R1 @ np.swapaxes(R2[kv], -1, -2))  # (c, d_head, d_head) each
        left[heads] = Q1 @ U[..., :k]
        right[heads] = Q2[kv] @ np.swapaxes(Vt, -1, -2)[..., :k]
    return left, right


# ----------------------------------------------------------------------------
# Fits of one layer to one anchor layer
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerFit:
    """Layer L fitted to anchor layer a. Every array has shape (H,).

    T, residual:                  same head (h of L to h of a)
    matched_head:                 the head of a assigned to h of L
    matched_T, matched_residual:  fit to that head
    angles_deg_mean:              mean principal angle (top-k left and right subspaces), same head
    difference_singvals:          (H, r) singular values of M_L^h - T M_a^h (same head)
    """

    T: np.ndarray
    residual: np.ndarray
    matched_head: np.ndarray
    matched_T: np.ndarray
    matched_residual: np.ndarray
    angles_deg_mean: np.ndarray
    difference_singvals: np.ndarray


@dataclass(frozen=True, eq=False)
class LayerSummary:
    """What every fit needs of a layer, kept for all layers (d_head-sized, per head).

    gram_Q: (H, d_head, d_head) W_Q^T W_Q; gram_K: (H_kv, d_head, d_head) W_K^T W_K; norm_sq: (H,) ||M^h||_F^2.
    """

    gram_Q: np.ndarray
    gram_K: np.ndarray
    norm_sq: np.ndarray


class _LayerCache:
    """The few layers being fitted (least recently used dropped first), read once each, shared by threads."""

    def __init__(self, factors: AnyFactors, capacity: int):
        self.factors, self.capacity = factors, capacity
        self._layers: OrderedDict[int, LayerFactors] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, index: int) -> LayerFactors:
        with self._lock:
            if index in self._layers:
                self._layers.move_to_end(index)
                return self._layers[index]
            layer = self.factors.layer(index)
            self._layers[index] = layer
            while len(self._layers) > self.capacity:
                self._layers.popitem(last=False)
            return layer


class OperatorFitter:
    """Fits layers to anchor layers, sharing the per-layer work (Gram matrices, norms, bases) and caching (L, a) pairs.

    factors: in memory (``Factors``) or a factors file read layer by layer (``FactorsFile``).
    map: how layers and layer pairs are spread over workers (``map(function, items)``, results in order);
    default: a thread per core. on_step(stage, done, total): progress, after each layer or layer pair.
    """

    def __init__(self, factors: AnyFactors, subspace_dim: int = DEFAULT_SUBSPACE_DIM, *, map: Mapper | None = None,
                 on_step: StepCallback | None = None):
        if subspace_dim < 1:
            raise QkspectraError(f"subspace dimension must be at least 1, got {subspace_dim}")
        self.factors = factors
        self.subspace_dim = min(subspace_dim, factors.d_head, factors.d_model)
        self.map = map
        self.on_step = on_step
        self.kv_head = factors.kv_head  # (H,)
        self._layers = _LayerCache(factors, layer_cache_size())
        L = factors.num_layers
        # Every layer's left and right bases (2, H, d_model, k): in memory for factors in memory, else one
        # file per layer in a scratch folder (all layers' bases would be a sizeable part of the factors).
        self._scratch = tempfile.TemporaryDirectory(prefix="qkspectra-") if isinstance(factors, FactorsFile) else None
        self._bases_dir = None if self._scratch is None else Path(self._scratch.name)
        self._bases: list[np.ndarray | None] = [None] * L
        self.summaries: list[LayerSummary] = []
        for index, (summary, bases) in enumerate(self._each("summarising layers", self._summarise, range(L))):
            self.summaries.append(summary)
            if self._bases_dir is None:
                self._bases[index] = bases
            else:
                np.save(self._bases_file(index), bases)
        self.norm_sq = np.stack([summary.norm_sq for summary in self.summaries])  # (L, H)
        self._fits: dict[tuple[int, int], LayerFit] = {}

    def _each(self, stage: str, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        with _mapping(self.map) as mapper:
            for done, result in enumerate(mapper(function, items), 1):
                if self.on_step is not None:
                    self.on_step(stage, done, len(items))
                yield result

    def _summarise(self, index: int) -> tuple[LayerSummary, np.ndarray]:
        """The layer's summary and its bases (2, H, d_model, k); pure, so that it may run in another process."""
        layer = self._layers.get(index)
        gram_Q = np.swapaxes(layer.W_Q, -1, -2) @ layer.W_Q  # (H, d_head, d_head)
        gram_K = np.swapaxes(layer.W_K, -1, -2) @ layer.W_K  # (H_kv, d_head, d_head)
        norm_sq = np.einsum("hij,hij->h", gram_Q, gram_K[self.kv_head])  # (H,)
        bases = np.stack(layer_bases(layer, self.kv_head, self.subspace_dim))  # (2, H, d_model, k)
        return LayerSummary(gram_Q, gram_K, norm_sq), bases

    def _bases_file(self, index: int) -> Path:
        return self._bases_dir / f"bases-{index}.npy"

    def bases(self, index: int) -> np.ndarray:
        """(2, H, d_model, k): the left and right top-k singular bases of every head of layer ``index``."""
        if self._bases[index] is not None:
            return self._bases[index]
        if self._bases_dir is not None and self._bases_file(index).is_file():
            return np.load(self._bases_file(index))
        # a worker process that cannot see this fitter's scratch folder (another machine): the same computation
        return np.stack(layer_bases(self._layers.get(index), self.kv_head, self.subspace_dim))

    def __getstate__(self) -> dict[str, Any]:
        """What a layer-pair task on another process needs (``cluster.cluster_map``): no layer cache and its lock,
        no fitted pairs, no map or progress callback, and the scratch folder by path only (it stays the owner's)."""
        skip = ("_layers", "_fits", "map", "on_step", "_scratch")
        return {key: value for key, value in self.__dict__.items() if key not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, map=None, on_step=None, _scratch=None, _fits={})
        self._layers = _LayerCache(self.factors, layer_cache_size())

    def drop_layers(self) -> None:
        """Forget the layers' factors held for the fits (their summaries, bases and the fits stay); a later fit
        reads its layers again."""
        self._layers = _LayerCache(self.factors, self._layers.capacity)

    def fit(self, layer: int, anchor: int) -> LayerFit:
        self.fit_pairs([(layer, anchor)])
        return self._fits[(layer, anchor)]

    def fit_all(self, anchor_layers: np.ndarray) -> list[LayerFit]:
        """One fit per layer, layer L against anchor_layers[L] (shape (L,))."""
        pairs = [(layer, int(a)) for layer, a in enumerate(anchor_layers)]
        self.fit_pairs(pairs)
        return [self._fits[pair] for pair in pairs]

    def fit_pairs(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Fit every (layer, anchor) pair not fitted yet (``fit_layer_pairs`` through this fitter's map)."""
        todo = sorted(set(pairs) - set(self._fits), key=lambda pair: (pair[1], pair[0]))  # an anchor's pairs together
        if todo:
            self._fits.update(zip(todo, fit_layer_pairs(self, todo, map=self.map, on_step=self.on_step)))

    def fit_pair(self, layer: int, anchor: int) -> LayerFit:
        """Layer ``layer`` fitted to layer ``anchor``, both read (or found among the layers held)."""
        from scipy.optimize import linear_sum_assignment

        X, Y = self._layers.get(layer), self._layers.get(anchor)
        sx, sy = self.summaries[layer], self.summaries[anchor]
        key_gram = cross_gram(X.W_K, Y.W_K)  # (H_kv, H_kv, d_head, d_head)
        inner = grouped_pairwise_inner(X.W_Q, Y.W_Q, key_gram)  # (H, H)
        norms = np.sqrt(sx.norm_sq[:, None] * sy.norm_sq[None, :])  # (H, H)
        abs_cos = np.divide(np.abs(inner), norms, out=np.zeros_like(inner), where=norms > TINY)  # (H, H)
        _, matched = linear_sum_assignment(abs_cos, maximize=True)  # (H,) row h -> column matched[h]
        heads = np.arange(self.factors.num_heads)
        T, residual, singvals = self._scalar_fit(layer, anchor, X, Y, key_gram, heads, inner[heads, heads])
        if np.array_equal(matched, heads):
            matched_T, matched_residual = T, residual
        else:
            matched_T, matched_residual, _ = self._scalar_fit(layer, anchor, X, Y, key_gram, matched,
                                                              inner[heads, matched])
        ours, theirs = self.bases(layer), self.bases(anchor)  # (2, H, d_model, k) each
        angles = np.concatenate([principal_angles_deg(ours[0], theirs[0]), principal_angles_deg(ours[1], theirs[1])],
                                axis=-1)  # (H, 2k)
        return LayerFit(T, residual, matched, matched_T, matched_residual, angles.mean(axis=-1), singvals)

    def _scalar_fit(self, layer: int, anchor: int, X: LayerFactors, Y: LayerFactors, key_gram: np.ndarray,
                    heads: np.ndarray, inner: np.ndarray):
        """T, residual and difference singular values of each head h of ``layer`` against head heads[h] of
        ``anchor``; inner (H,) their inner products."""
        sx, sy = self.summaries[layer], self.summaries[anchor]
        kv, anchor_kv = self.kv_head, self.kv_head[heads]  # (H,) each
        anchor_sq = sy.norm_sq[heads]  # (H,)
        fits = anchor_sq >= TINY
        norm = np.sqrt(sx.norm_sq)  # (H,)
        r = min(self.factors.d_model, 2 * self.factors.d_head)
        if layer == anchor and np.array_equal(heads, np.arange(heads.size)):  # each head against itself: exact
            T = np.where(fits, 1.0, 0.0)
            singvals = np.zeros((heads.size, r))
            return T, relative_residual(singvals, norm, fits), singvals
        T = np.divide(inner, anchor_sq, out=np.zeros_like(inner), where=fits)  # (H,)
        accurate = np.zeros(heads.size, dtype=bool)
        singvals = np.full((heads.size, r), np.nan)
        if self.factors.d_model >= 2 * self.factors.d_head:
            cross_AC = np.stack([X.W_Q[h].T @ Y.W_Q[g] for h, g in enumerate(heads)])  # (H, d_head, d_head), no copy of C
            singvals, accurate = gram_difference_singular_values(
                sx.gram_Q, cross_AC, sy.gram_Q[heads], sx.gram_K[kv], key_gram[kv, anchor_kv], sy.gram_K[anchor_kv], T)
        if not accurate.all():  # Householder QR of the explicit factors where the Gram route is not accurate
            rest = np.flatnonzero(~accurate)
            singvals[rest] = difference_singular_values(
                X.W_Q[rest], X.W_K[kv[rest]], Y.W_Q[heads[rest]], Y.W_K[anchor_kv[rest]], T[rest])
        residual = relative_residual(singvals, norm, fits)  # (H,)
        return T, residual, singvals


def fit_layer_pairs(fitter: OperatorFitter, pairs: list[tuple[int, int]], *, map: Mapper | None = None,
                    on_step: StepCallback | None = None) -> list[LayerFit]:
    """The layer-pair loop: ``fitter.fit_pair(layer, anchor)`` for every pair, through ``map`` (default: a thread
    per core, BLAS on one thread each). Results in the order of ``pairs``; on_step("fitting layer pairs", done, total)."""
    results = []
    with _mapping(map) as mapper:
        for done, fit in enumerate(mapper(functools.partial(_fit_one_pair, fitter), pairs), 1):
            results.append(fit)
            if on_step is not None:
                on_step("fitting layer pairs", done, len(pairs))
    return results


def _fit_one_pair(fitter: OperatorFitter, pair: tuple[int, int]) -> LayerFit:
    return fitter.fit_pair(*pair)


def as_factors(factors: AnyFactors | str | os.PathLike | dict[str, np.ndarray], geometry: Geometry | None = None) -> AnyFactors:
    """Factors from themselves, a factors file path (read lazily), or a dict of arrays (W_Q, W_K, [b_Q, b_K])."""
    if isinstance(factors, (Factors, FactorsFile)):
        if geometry is not None:
            check_against_geometry(factors, geometry)
        return factors
    if isinstance(factors, dict):
        return make_factors(factors, geometry=geometry)
    return load_factors(factors, geometry)


def operator_evidence(factors: AnyFactors | str | os.PathLike | dict[str, np.ndarray], anchors: dict[str, Anchor], *,
                      subspace_dim: int = DEFAULT_SUBSPACE_DIM, fitter: OperatorFitter | None = None) -> dict[str, Any]:
    """The ``operator`` section: per anchor strategy, the operator-level fits of every (L, h).

    factors: ``Factors``, a ``.factors.safetensors`` path, or a dict of arrays.
    anchors: strategy name -> ``Anchor`` (e.g. {name: a.anchor for name, a in analyze_all(g).items()}).
    fitter:  reuse an ``OperatorFitter`` (and its cache) built on the same factors.
    Returns {strategy: {"T": [L][H], "residual": [L][H], "mean_residual", "matched_T", "matched_residual",
    "matched_mean_residual", "matched_head": [L][H], "principal_angles_deg_mean": [L][H], "subspace_dim",
    "mean_residual_fitted", "matched_mean_residual_fitted", "num_anchor_layers", "num_fitted_layers",
    "fitted_reason"}}; ``mean_residual`` and ``matched_mean_residual`` are over all (L, h), the anchor
    layer(s) included (each fits itself with residual 0); the ``*_fitted`` means are over the fitted
    layers only (None, with ``fitted_reason``, when every layer is an anchor layer). Every strategy's
    layer pairs are fitted together.
    """
    if fitter is None:
        fitter = OperatorFitter(as_factors(factors), subspace_dim)
    for name, anchor in anchors.items():
        if len(anchor.layers) != fitter.factors.num_layers:
            raise QkspectraError(
                f"anchor {name!r} covers {len(anchor.layers)} layers, the factors have {fitter.factors.num_layers}"
            )
    fitter.fit_pairs((layer, int(a)) for anchor in anchors.values() for layer, a in enumerate(anchor.layers))
    section = {}
    for name, anchor in anchors.items():
        fits = fitter.fit_all(anchor.layers)
        stack = {key: np.stack([getattr(fit, key) for fit in fits]) for key in
                 ("T", "residual", "matched_head", "matched_T", "matched_residual", "angles_deg_mean")}  # (L, H) each
        fitted = anchor.fitted  # (L,)
        fitted_mean = (lambda x: float(x[fitted].mean())) if fitted.any() else (lambda x: None)
        section[name] = {
            "T": stack["T"].tolist(),
            "residual": stack["residual"].tolist(),
            "mean_residual": float(stack["residual"].mean()),
            "matched_T": stack["matched_T"].tolist(),
            "matched_residual": stack["matched_residual"].tolist(),
            "matched_mean_residual": float(stack["matched_residual"].mean()),
            "matched_head": stack["matched_head"].astype(int).tolist(),
            "principal_angles_deg_mean": stack["angles_deg_mean"].tolist(),
            "subspace_dim": fitter.subspace_dim,
            "mean_residual_fitted": fitted_mean(stack["residual"]),
            "matched_mean_residual_fitted": fitted_mean(stack["matched_residual"]),
            "num_anchor_layers": anchor.num_anchor_layers,
            "num_fitted_layers": anchor.num_fitted_layers,
            "fitted_reason": None if fitted.any() else NO_FITTED_LAYER,
        }
    return section
