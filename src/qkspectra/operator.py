"""Operator-level test of the rescale hypothesis, from the per-head factors.

The spectral test compares singular values only. Here the operators themselves are compared:
M_L^h = W_Q^h (W_K^h)^T with the factors of the ``<stem>.factors.safetensors`` file (sqrt(s) already
in each factor, norms folded as in the geometry). A d_model x d_model matrix is never formed:

- inner products through d_head-sized Gram matrices,
  <A B^T, C D^T>_F = trace((A^T C)(D^T B)) = sum_ij (A^T C)_ij (B^T D)_ij;
- T = <M_L, M_a>_F / ||M_a||_F^2, the least-squares scalar (it may be negative);
- the residual ||M_L - T M_a||_F / ||M_L||_F from the singular values of the difference,
  D = [A, -T C] [B, D]^T: thin QR of both (d_model, 2 d_head) factors and the SVD of the small
  core R_1 R_2^T. (Expanding ||M_L||^2 - <M_L, M_a>^2 / ||M_a||^2 instead would lose half the
  digits to cancellation: a residual of 1e-16 would come out as 1e-8.)

Head order within a layer is arbitrary, so every head of layer L is also fitted to its best
match among the heads of the anchor layer: the one-to-one assignment maximising the total
|cosine| between operators (Hungarian algorithm on the (H, H) |cosine| matrix).

Principal angles: between the top-k left singular subspaces of M_L^h and M_a^h, and between
the top-k right ones (k = ``subspace_dim``, default 8, at most d_head); reported as the mean of
those 2k angles in degrees (0: same subspaces, 90: orthogonal).

Guards as in the spectral fit: an anchor operator with ||M_a||^2 < 1e-20 gives T = 0 and
residual 1; an all-zero M_L has residual 0.

The batched factorisations run with one BLAS thread: OpenBLAS threads even its calls on
384 x 32 matrices, and on a busy two-core machine that made them 10 to 100 times slower.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from qkspectra._threads import single_blas_thread
from qkspectra.analysis import NO_FITTED_LAYER, TINY, Anchor
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry

DEFAULT_SUBSPACE_DIM = 8
FACTOR_NAMES = ("W_Q", "W_K")
BIAS_NAMES = ("b_Q", "b_K")


# ----------------------------------------------------------------------------
# The factors file
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Factors:
    """Per-head query/key factors with M[l, h] = W_Q[l, h] @ W_K[l, h].T (the scale s included).

    W_Q, W_K: (L, H, d_model, d_head) float64; b_Q, b_K: (L, H, d_head) float64 or None.
    fold_ln: whether the norm gains were folded in (None when the file does not say).
    """

    W_Q: np.ndarray
    W_K: np.ndarray
    b_Q: np.ndarray | None = None
    b_K: np.ndarray | None = None
    fold_ln: bool | None = None
    source: str = "<memory>"

    @property
    def num_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def num_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_Q.shape[2]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]


def make_factors(arrays: dict[str, np.ndarray], *, fold_ln: bool | None = None, source: str = "<memory>",
                 geometry: Geometry | None = None) -> Factors:
    """Validate arrays named W_Q, W_K (and optionally b_Q, b_K) and build ``Factors`` (float64)."""
    for name in FACTOR_NAMES:
        if name not in arrays:
            raise QkspectraError(f"{source}: no {name} tensor in the factors")
    W_Q, W_K = (np.asarray(arrays[name], dtype=np.float64) for name in FACTOR_NAMES)
    if W_Q.ndim != 4:
        raise QkspectraError(f"{source}: W_Q has shape {W_Q.shape}, expected (L, H, d_model, d_head)")
    if W_K.shape != W_Q.shape:
        raise QkspectraError(f"{source}: W_K has shape {W_K.shape} but W_Q has {W_Q.shape}")
    biases = {}
    for name in BIAS_NAMES:
        if name in arrays:
            bias = np.asarray(arrays[name], dtype=np.float64)
            if bias.shape != W_Q.shape[:2] + W_Q.shape[3:]:
                raise QkspectraError(f"{source}: {name} has shape {bias.shape}, expected {W_Q.shape[:2] + W_Q.shape[3:]}")
            biases[name] = bias
    for name, array in (("W_Q", W_Q), ("W_K", W_K), *biases.items()):
        if not np.all(np.isfinite(array)):
            raise QkspectraError(f"{source}: {name} holds non-finite values")
    factors = Factors(W_Q, W_K, biases.get("b_Q"), biases.get("b_K"), fold_ln, source)
    if geometry is not None:
        check_against_geometry(factors, geometry)
    return factors


def load_factors(path: str | os.PathLike, geometry: Geometry | None = None) -> Factors:
    """Read a ``.factors.safetensors`` file; QkspectraError if missing, corrupt or inconsistent with ``geometry``."""
    path = Path(path)
    if not path.is_file():
        raise QkspectraError(f"{path}: no such factors file")
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        raw = path.read_bytes()
        arrays = load(raw)
    except (OSError, SafetensorError, ValueError) as e:
        raise QkspectraError(f"{path}: not a readable safetensors file ({e})") from None
    fold_ln = _file_fold_ln(raw)
    return make_factors(arrays, fold_ln=fold_ln, source=str(path), geometry=geometry)


def _file_fold_ln(raw: bytes) -> bool | None:
    """The ``fold_ln`` entry of a safetensors header's metadata, or None."""
    import json

    header_size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + header_size]).get("__metadata__") or {}
    value = metadata.get("fold_ln")
    return None if value is None else value == "true"


def check_against_geometry(factors: Factors, geometry: Geometry) -> None:
    """QkspectraError unless the factors have the geometry's layers and heads and reproduce its spectra."""
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
    with single_blas_thread():
        sigma = head_singular_values(factors.W_Q, factors.W_K)[..., : geometry.max_rank]  # (L, H, K)
    expected = geometry.singular_values  # (L, H, K)
    worst = np.abs(sigma - expected).max() / max(np.abs(expected).max(), TINY)
    if worst > 1e-3:
        raise QkspectraError(
            f"{factors.source}: the factors do not reproduce the spectra of {geometry.source} "
            f"(largest relative difference {worst:.2g}); were they extracted with the same model and norm folding?"
        )


def factors_path_for(geometry: Geometry) -> Path | None:
    """The factors file the geometry's metadata names (beside the geometry file), or None.

    None also when the name is not a plain file name (a path elsewhere is not "beside").
    """
    name = geometry.metadata.get("factors_file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or geometry.source.startswith("<"):
        return None
    return Path(geometry.source).with_name(name)


# ----------------------------------------------------------------------------
# Factored linear algebra (batched over any leading axes)
# ----------------------------------------------------------------------------


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


class OperatorFitter:
    """Fits layers to anchor layers, sharing the per-layer work (norms, bases) and caching (L, a) pairs.

    map: how the missing layer pairs of ``fit_pairs`` and ``fit_all`` are fitted, ``map(func, pairs)``;
    the builtin by default, ``cluster.cluster_map(client)`` for tasks on a Dask cluster (same numbers).
    """

    def __init__(self, factors: Factors, subspace_dim: int = DEFAULT_SUBSPACE_DIM, *,
                 map: Callable[[Callable, Iterable], Iterable] = map):
        if subspace_dim < 1:
            raise QkspectraError(f"subspace dimension must be at least 1, got {subspace_dim}")
        self.factors = factors
        self.subspace_dim = min(subspace_dim, factors.d_head, factors.d_model)
        W_Q, W_K = factors.W_Q, factors.W_K  # (L, H, d_model, d_head)
        self.norm_sq = frobenius_inner(W_Q, W_K, W_Q, W_K)  # (L, H)
        with single_blas_thread():
            self.left, self.right = top_singular_bases(W_Q, W_K, self.subspace_dim)  # (L, H, d_model, k) each
        self._fits: dict[tuple[int, int], LayerFit] = {}
        self._map = map

    def __getstate__(self) -> dict[str, Any]:  # what a task on another process needs: no cache, no map
        return {k: v for k, v in self.__dict__.items() if k not in ("_fits", "_map")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _fits={}, _map=map)

    def fit(self, layer: int, anchor: int) -> LayerFit:
        key = (layer, anchor)
        if key not in self._fits:
            with single_blas_thread():
                self._fits[key] = self._fit(layer, anchor)
        return self._fits[key]

    def _scalar_fit(self, layer: int, anchor: int, heads: np.ndarray, inner: np.ndarray):
        """T and residual of each head h of ``layer`` against head heads[h] of ``anchor``; inner (H,)."""
        f = self.factors
        anchor_sq = self.norm_sq[anchor, heads]  # (H,)
        fits = anchor_sq >= TINY
        T = np.divide(inner, anchor_sq, out=np.zeros_like(inner), where=fits)  # (H,)
        singvals = difference_singular_values(
            f.W_Q[layer], f.W_K[layer], f.W_Q[anchor, heads], f.W_K[anchor, heads], T
        )  # (H, r)
        residual = relative_residual(singvals, np.sqrt(self.norm_sq[layer]), fits)  # (H,)
        return T, residual, singvals

    def _fit(self, layer: int, anchor: int) -> LayerFit:
        from scipy.optimize import linear_sum_assignment

        f = self.factors
        inner = pairwise_frobenius_inner(f.W_Q[layer], f.W_K[layer], f.W_Q[anchor], f.W_K[anchor])  # (H, H)
        norms = np.sqrt(self.norm_sq[layer][:, None] * self.norm_sq[anchor][None, :])  # (H, H)
        abs_cos = np.divide(np.abs(inner), norms, out=np.zeros_like(inner), where=norms > TINY)  # (H, H)
        _, matched = linear_sum_assignment(abs_cos, maximize=True)  # (H,) row h -> column matched[h]
        heads = np.arange(f.num_heads)
        T, residual, singvals = self._scalar_fit(layer, anchor, heads, inner[heads, heads])
        matched_T, matched_residual, _ = self._scalar_fit(layer, anchor, matched, inner[heads, matched])
        angles = np.concatenate(
            [principal_angles_deg(self.left[layer], self.left[anchor]),
             principal_angles_deg(self.right[layer], self.right[anchor])],
            axis=-1,
        )  # (H, 2k)
        return LayerFit(T, residual, matched, matched_T, matched_residual, angles.mean(axis=-1), singvals)

    def _fit_pair(self, pair: tuple[int, int]) -> LayerFit:
        with single_blas_thread():
            return self._fit(*pair)

    def fit_pairs(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Fit every (layer, anchor) pair not yet fitted, through ``map``."""
        missing = list(dict.fromkeys(p for p in pairs if p not in self._fits))
        if missing:
            self._fits.update(zip(missing, self._map(self._fit_pair, missing)))

    def fit_all(self, anchor_layers: np.ndarray) -> list[LayerFit]:
        """One fit per layer, layer L against anchor_layers[L] (shape (L,))."""
        pairs = [(layer, int(a)) for layer, a in enumerate(anchor_layers)]
        self.fit_pairs(pairs)
        return [self._fits[pair] for pair in pairs]


def as_factors(factors: Factors | str | os.PathLike | dict[str, np.ndarray], geometry: Geometry | None = None) -> Factors:
    """A ``Factors`` from itself, a factors file path, or a dict of arrays (W_Q, W_K, [b_Q, b_K])."""
    if isinstance(factors, Factors):
        if geometry is not None:
            check_against_geometry(factors, geometry)
        return factors
    if isinstance(factors, dict):
        return make_factors(factors, geometry=geometry)
    return load_factors(factors, geometry)


def operator_evidence(factors: Factors | str | os.PathLike | dict[str, np.ndarray], anchors: dict[str, Anchor], *,
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
    layers only (None, with ``fitted_reason``, when every layer is an anchor layer).
    """
    if fitter is None:
        fitter = OperatorFitter(as_factors(factors), subspace_dim)
    section = {}
    if all(len(anchor.layers) == fitter.factors.num_layers for anchor in anchors.values()):  # every pair in one round
        fitter.fit_pairs((layer, int(a)) for anchor in anchors.values() for layer, a in enumerate(anchor.layers))
    for name, anchor in anchors.items():
        if len(anchor.layers) != fitter.factors.num_layers:
            raise QkspectraError(
                f"anchor {name!r} covers {len(anchor.layers)} layers, the factors have {fitter.factors.num_layers}"
            )
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
