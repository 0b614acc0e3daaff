"""The rank-k correction: how much must be added to the scalar rescale to reach a 10% residual.

For each (L, h) and anchor layer a, the scalar fit leaves a difference, and the best rank-k
correction of that difference is added back; k is the smallest number of corrections that brings
the relative residual below the threshold (0.10, the "supported" line of the verdict). Spectral
level: the difference of the spectra, its k largest entries fixed. Operator level: the truncated
SVD of M_L - T M_a (rank <= 2 d_head, singular values from the factors). ``param_ratio``: what the
anchor layers plus the corrections cost, relative to storing everything in full.
The method in full: see docs/method/rank_k.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkspectra.analysis.factors import Factors, as_factors
from qkspectra.analysis.operator_fit import OperatorFitter
from qkspectra.analysis.seed import TINY, Anchor, scalar_rescale
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry

DEFAULT_THRESHOLD = 0.10


def tail_residual_curve(values: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Relative residual after keeping the k largest-magnitude entries, for k = 0..R.

    values: (..., R) the difference's entries (or singular values); norm: (...) the reference norm.
    Returns (..., R + 1): sqrt(sum of the squares of all but the k largest) / norm; 0 where norm <= 1e-20.
    """
    squares = -np.sort(-(values**2), axis=-1)  # (..., R) descending
    tail = np.cumsum(squares[..., ::-1], axis=-1)[..., ::-1]  # (..., R): sum from k to the end
    tail = np.concatenate([tail, np.zeros(tail.shape[:-1] + (1,))], axis=-1)  # (..., R + 1)
    norm = norm[..., None]  # (..., 1)
    return np.divide(np.sqrt(tail), norm, out=np.zeros_like(tail), where=norm > TINY)


def smallest_rank(curve: np.ndarray, threshold: float) -> np.ndarray:
    """The smallest k with curve[..., k] < threshold: (..., R + 1) -> (...) int.

    The curves of ``tail_residual_curve`` end in 0, so with threshold > 0 such a k always exists.
    """
    return (curve < threshold).argmax(axis=-1)


def spectral_correction_curve(sigma: np.ndarray, anchor: Anchor) -> np.ndarray:
    """sigma: (L, H, K) -> (L, H, K + 1) residual after k spectral corrections, k = 0..K."""
    anchor_sigma = sigma[anchor.layers]  # (L, H, K)
    T, _ = scalar_rescale(sigma, anchor_sigma)  # (L, H)
    difference = sigma - T[..., None] * anchor_sigma  # (L, H, K)
    return tail_residual_curve(difference, np.sqrt(np.einsum("lhk,lhk->lh", sigma, sigma)))


def operator_correction_curve(fitter: OperatorFitter, anchor: Anchor) -> np.ndarray:
    """(L, H, r + 1) residual of M_L - T M_a after its best rank-k correction, k = 0..r (r = rank bound of D)."""
    fits = fitter.fit_all(anchor.layers)
    singvals = np.stack([fit.difference_singvals for fit in fits])  # (L, H, r)
    return tail_residual_curve(singvals, np.sqrt(fitter.norm_sq))


def operator_param_ratio(k: np.ndarray, anchor: Anchor, d_model: int, d_head: int) -> float:
    """Parameters of anchor factors + per-head (T, k rank-one terms) over the full W_Q, W_K (see module doc)."""
    L, H = k.shape
    full_head = 2 * d_model * d_head
    fitted = anchor.layers != np.arange(L)  # (L,) layers not fitted to themselves
    stored = len(np.unique(anchor.layers)) * H * full_head
    stored += int((1 + k[fitted] * (2 * d_model + 1)).sum())
    return stored / (L * H * full_head)


def spectral_param_ratio(k: np.ndarray, anchor: Anchor, K: int) -> float:
    """Values of anchor spectra + per-head (T, k position/value pairs) over all L * H * K singular values."""
    L, H = k.shape
    fitted = anchor.layers != np.arange(L)  # (L,)
    stored = len(np.unique(anchor.layers)) * H * K + int((1 + 2 * k[fitted]).sum())
    return stored / (L * H * K)


def _fitted_mean(k: np.ndarray, anchor: Anchor) -> float | None:
    """Mean of k (L, H) over the layers fitted to another layer; None when there is none."""
    return float(k[anchor.fitted].mean()) if anchor.fitted.any() else None


def _pad_curve(mean_curve: np.ndarray, length: int) -> list[float]:
    """A mean residual curve (R + 1,) extended to ``length`` entries with its last value (0 after full rank)."""
    return np.concatenate([mean_curve, np.full(length - mean_curve.size, mean_curve[-1])]).tolist()


def rank_k_evidence(geometry: Geometry, anchors: dict[str, Anchor], factors: Factors | str | dict | None = None, *,
                    threshold: float = DEFAULT_THRESHOLD, fitter: OperatorFitter | None = None) -> dict[str, Any]:
    """The ``rank_k`` section: per anchor strategy, the rank of the correction needed to reach ``threshold``.

    geometry: supplies the spectra (L, H, K); factors (or ``fitter``, which carries them): the operator
    level, None to skip it ("operator" is then None and the curve has no operator residuals).
    Returns {strategy: {"spectral": {"k": [L][H], "mean_k", "mean_k_fitted", "param_ratio"}, "operator": {...} | None,
    "curve": {"k": [0..kmax], "spectral_mean_residual": [...], "operator_mean_residual": [...] | None}}}.
    ``mean_k`` is over all (L, h), anchor layers (k = 0) included; ``mean_k_fitted`` over the fitted
    layers only (None when every layer is an anchor layer); the curve's mean residuals are over the
    fitted layers (over all layers, all 0, when every layer is an anchor layer).
    """
    if not 0 < threshold < 1:
        raise QkspectraError(f"rank-k threshold must lie between 0 and 1, got {threshold}")
    if fitter is None and factors is not None:
        fitter = OperatorFitter(as_factors(factors, geometry))
    sigma = geometry.singular_values  # (L, H, K)
    K = sigma.shape[-1]
    section = {}
    for name, anchor in anchors.items():
        spectral_curve = spectral_correction_curve(sigma, anchor)  # (L, H, K + 1)
        spectral_k = smallest_rank(spectral_curve, threshold)  # (L, H)
        entry: dict[str, Any] = {
            "spectral": {
                "k": spectral_k.tolist(),
                "mean_k": float(spectral_k.mean()),
                "mean_k_fitted": _fitted_mean(spectral_k, anchor),
                "param_ratio": spectral_param_ratio(spectral_k, anchor, K),
            },
            "operator": None,
        }
        layers = anchor.fitted if anchor.fitted.any() else slice(None)  # the curve is over the fitted layers
        curves = [spectral_curve[layers].mean(axis=(0, 1))]  # (K + 1,)
        if fitter is not None:
            operator_curve = operator_correction_curve(fitter, anchor)  # (L, H, r + 1)
            operator_k = smallest_rank(operator_curve, threshold)  # (L, H)
            f = fitter.factors
            entry["operator"] = {
                "k": operator_k.tolist(),
                "mean_k": float(operator_k.mean()),
                "mean_k_fitted": _fitted_mean(operator_k, anchor),
                "param_ratio": operator_param_ratio(operator_k, anchor, f.d_model, f.d_head),
            }
            curves.append(operator_curve[layers].mean(axis=(0, 1)))  # (r + 1,)
        length = max(c.size for c in curves)
        entry["curve"] = {
            "k": list(range(length)),
            "spectral_mean_residual": _pad_curve(curves[0], length),
            "operator_mean_residual": _pad_curve(curves[1], length) if fitter is not None else None,
        }
        section[name] = entry
    return section
