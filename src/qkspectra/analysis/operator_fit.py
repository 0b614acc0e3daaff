"""The operator-level fits: each head's operator M_L^h = W_Q^h (W_K^h)^T fitted as a scalar times an anchor layer's.

Per (layer, anchor layer) pair and head: the least-squares scalar T = <M_L, M_a>_F / ||M_a||_F^2, the
relative residual ||M_L - T M_a||_F / ||M_L||_F (from the difference's singular values, never from
an expansion that cancels), the same for the best one-to-one matching of heads (Hungarian algorithm
on |cosine|), and the mean principal angle between top-k singular subspaces. Nothing d_model x d_model
is formed (``factored``); layers are read one at a time from the factors (``analysis.factors``) and
layer pairs are fitted on every core. The method in full: see docs/method/operator_fits.md.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qkspectra.threads import Mapper, thread_map, worker_count
from qkspectra.analysis.factors import AnyFactors, FactorsFile, LayerFactors, as_factors
from qkspectra.analysis.seed import NO_FITTED_LAYER, TINY, Anchor
from qkspectra.errors import QkspectraError
from qkspectra.factored import (
    cross_gram,
    difference_singular_values,
    gram_difference_singular_values,
    grouped_pairwise_inner,
    grouped_top_singular_bases,
    principal_angles_deg,
)

DEFAULT_SUBSPACE_DIM = 8

# Progress of a stage: on_step(stage, done, total), called after each unit of work.
StepCallback = Callable[[str, int, int], None]


def layer_cache_size() -> int:
    """Layers a fitter holds at once: two per worker thread and one more, at most 9 (on a many-core
    machine the cache would otherwise hold a whole model's layers in float64)."""
    return min(2 * worker_count() + 1, 9)


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
        with thread_map(self.map) as mapper:
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
        bases = np.stack(grouped_top_singular_bases(layer.W_Q, layer.W_K, self.kv_head,
                                                    self.subspace_dim))  # (2, H, d_model, k)
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
        layer = self._layers.get(index)
        return np.stack(grouped_top_singular_bases(layer.W_Q, layer.W_K, self.kv_head, self.subspace_dim))

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
    with thread_map(map) as mapper:
        for done, fit in enumerate(mapper(functools.partial(_fit_one_pair, fitter), pairs), 1):
            results.append(fit)
            if on_step is not None:
                on_step("fitting layer pairs", done, len(pairs))
    return results


def _fit_one_pair(fitter: OperatorFitter, pair: tuple[int, int]) -> LayerFit:
    return fitter.fit_pair(*pair)


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
