"""Functional test: run the model with every head's QK operator replaced by its reconstruction.

Each reconstruction is written into the model as new query/key weights, and the model is run on
the corpus. Compared with the unmodified model:
- ``delta_loss``: next-token cross-entropy (reconstructed minus original) for causal language
  models; for encoders without a language-model head, 1 - cosine between the final hidden states
  of the two models, mean over real tokens (the original's own value is 0, so no relative change);
- ``per_head_kl``: KL(original || reconstructed) of each head's attention distribution, mean over
  real queries; ``mean_kl`` its mean over (L, h);
- ``mean_entropy_shift``: mean over (L, h) of the change of the mean attention entropy (nats).

Reconstructions, for anchor layer a = anchor.layers[L], in the space of the geometry (norm gains
folded or not, as ``fold_ln`` says):
- ``spectral``: the head's own singular vectors with T * sigma_a^h as singular values (T the
  spectral fit, sigma from the geometry);
- ``operator``: T * M_a^h (T the operator fit to the same head);
- ``operator_rank_k``: T * M_a^h plus the best rank-k correction of M_L^h - T M_a^h, k from the
  ``rank_k`` section. The sum can have rank d_head + k, more than a head holds, so it is truncated
  to its best rank-d_head approximation; that at most doubles its distance to M_L^h
  (heads with k = 0 keep the operator reconstruction);
- ``control``: each head's own operator, through the same path; it must change nothing.
Each strategy's entry also says how many layers it replaced (``replaced_layers``: the layers whose
anchor is another layer; an anchor layer gets its own weights back) and its ``num_anchor_layers``:
the verdict compares strategies at the same number of replaced layers (see ``verdict``).

Writing a target back. A target is given as factors (X, Y) with X Y^T = target (s included):
the spectral reconstruction rescales the head's own factors along its singular directions
(W_Q -> Q_1 U diag(sqrt r) U^T R_1, r = new / old singular value), the operator one uses the
anchor's factors (T W_Q^a, W_K^a), and a truncated target its SVD factors. So the control and
the anchor layers get back exactly their own weights. The factors are divided by sqrt(s) (the
model applies s) and, with folding, by the norm gain g (a gain entry of 0 is refused).
Biases: of the bias terms of the logit only b_Q . (W_K^T y) varies with the key (the others are
constant over keys and drop out of the softmax); the head's own term W_K b_Q is kept, by least
squares on the new W_K (exact when the span is unchanged), and likewise W_Q b_K. With folding,
the norm bias beta is pushed back out (b = b_hat - beta W). Models without q/k biases get none.

Positions. Rotary models rotate q and k after projection; the reconstructions replace the
pre-rotary factors W_Q, W_K, so positions act on the new factors as on the old. The spectral,
operator and control reconstructions keep a head's (or the anchor's) own coordinate frame, so
for them the positional coupling is the original one; a truncated rank-k target is written in
its singular basis and then moved to the frame closest to the head's own (least squares,
``align_frame``), so that a nearly complete correction also restores the positional coupling.
Rotary models with q/k biases are refused (there b_K does not drop out of the softmax).

Grouped-query attention: one key head serves several query heads, which need different keys
once reconstructed, so the key/value projections are expanded to one per query head first
(the model computes the same function); fused projections (Falcon, GPT-BigCode, Phi-3) are rebuilt
with one key and value head per query head, and written through the rows their adapter reads.
ALBERT is refused: its layers share one set of weights, which cannot hold per-layer reconstructions.

Query/key norms with a gain of exactly 0 (the real gemma-3-270m has some): such a coordinate adds
nothing to the logit, so the writer keeps its original weight there; a target in another layer's
frame (operator, rank-k) that is non-zero there cannot be written, and that part of it is dropped.

Precision. In float32 the control measures the path's rounding; in bfloat16 (the default on a GPU)
writing a head's own weights back is exact, so the control reads 0 while the reconstructions also
carry bfloat16's rounding of their new weights: pass --dtype float32 for a control that bounds it.

Speed. The model runs with its fast (SDPA) attention in the chosen dtype and device (float32 on the
CPU by default). ``AttentionCapture`` hands over each layer's own queries and keys; the
original's are kept (linear in the tokens). KL divergence and entropy never form an attention
map: on the CPU they come from torch's fused attention kernel (``attention_change``: the
reconstruction's log-sum-exp and keys-weighted mean, and the original attention with the new
keys as values), elsewhere from blocks of logits with an online log-sum-exp (``logit_kl``).
The control (each head's own operator written back) measures the rounding of this path, so
changes within a few times the control's are no change (``verdict``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from qkspectra.analysis.seed import TINY, Anchor, scalar_rescale
from qkspectra.errors import QkspectraError
from qkspectra.extract.corpus import DEFAULT_FUNCTIONAL_TOKENS
from qkspectra.extract.capture import AttentionCall, AttentionCapture, VisibleKeys
from qkspectra.models.modules import attention_modules
from qkspectra.extract.entropy import (
    _HIDDEN,
    _START,
    FUSED_KERNEL_DEVICES,
    KEYS_PER_BLOCK,
    LOGITS_PER_BLOCK,
    call_entropy,
    centred,
    forward_inputs,
    pad_windows,
    softmax_moments,
    split_for_sliding_window,
    window_batches,
)
from qkspectra.extract.linearised_norm import NormRMS, delinearise, isotropic_layer_rms, linearise
from qkspectra.extract.spectra import fold_norm
from qkspectra.geometry import Geometry
from qkspectra.models.adapters import AttentionAdapter, AttentionLayer, adapter_for
from qkspectra.models.device import Placement
from qkspectra.models.supported import ENCODER_MODEL_TYPES
from qkspectra.models.tensors import StateDictSource
from qkspectra._threads import single_blas_thread
from qkspectra.analysis.operator_fit import Factors, LayerFactors, OperatorFitter, _FactorsShape, check_against_geometry

if TYPE_CHECKING:
    from qkspectra.models.in_memory import InMemoryModel

DEFAULT_MAX_TOKENS = DEFAULT_FUNCTIONAL_TOKENS
KINDS = ("spectral", "operator", "operator_rank_k")
REFUSED_MODEL_TYPES = {"albert": "its layers share one set of weights, which cannot hold per-layer reconstructions"}
LOSS_KINDS = {True: "next_token_cross_entropy", False: "final_hidden_cosine_distance"}


# ----------------------------------------------------------------------------
# The model's own factors
# ----------------------------------------------------------------------------


def model_layers(model: nn.Module) -> tuple[AttentionAdapter, list[AttentionLayer]]:
    """The adapter for ``model`` and its layers as stored (no folding), float64, one key factor per query head."""
    adapter, layers = original_layers(model, rewritten=False)
    return adapter, [layers[index] for index in range(len(layers))]


def writable_check(model_type: str, *, rewritten: bool = True) -> Callable[[int, AttentionLayer], None]:
    """check(index, layer): QkspectraError (one line) for what the functional test cannot write into a
    ``model_type`` model (raised at once for a refused model type); ``rewritten``: also refuse what a
    rewritten model would compute wrongly (rotary positions with query/key biases)."""
    if model_type in REFUSED_MODEL_TYPES:
        raise QkspectraError(f"the functional test does not support {model_type}: {REFUSED_MODEL_TYPES[model_type]}")

    def check(index: int, layer: AttentionLayer) -> None:
        for norm in (layer.q_norm, layer.k_norm):
            if norm is not None and (norm.centred or norm.bias is not None):
                raise QkspectraError(f"the functional test does not support {model_type}: its query/key norms "
                                     "centre their input, which a reconstruction cannot be written through")
            if norm is not None and norm.over == "projection" and layer.kv_group_size > 1:
                raise QkspectraError(f"the functional test does not support {model_type}: a key norm over the "
                                     "whole projection of grouped key heads cannot hold one key per query head")
        if rewritten and layer.rotary is not None and layer.b_Q is not None:
            raise QkspectraError("the functional test does not support rotary models with query/key biases")

    return check


def original_layers(model: nn.Module, *, rewritten: bool = True) -> tuple[AttentionAdapter, ModelLayers]:
    """The adapter for ``model`` and a snapshot of its layers (``ModelLayers.snapshot``), each checked
    by ``writable_check``."""
    check = writable_check(model.config.model_type, rewritten=rewritten)
    adapter = adapter_for(copy.deepcopy(model.config))  # its own config: expanding kv heads edits the model's
    return adapter, ModelLayers.snapshot(model, adapter, check)


def linearised_layers(layers: list[AttentionLayer], norm_rms: NormRMS | None) -> list[AttentionLayer]:
    """Layers with q/k norms replaced by their linearised metric (``extract.qk_norm``), as the geometry has them.

    norm_rms: the typical RMS the geometry's extraction used (its metadata); None: isotropic input.
    """
    return [linearise(layer, None if norm_rms is None else _layer_rms(norm_rms, index, layer))
            for index, layer in enumerate(layers)]


def _layer_rms(norm_rms: NormRMS, index: int, layer: AttentionLayer) -> tuple[np.ndarray, np.ndarray]:
    """(query (H,), key (H,)) RMS of layer ``index``, key heads repeated for the query heads that share them."""
    key = norm_rms.key[index]
    return norm_rms.query[index], np.repeat(key, layer.W_Q.shape[0] // key.shape[0])


def geometry_norm_rms(geometry: Geometry) -> NormRMS | None:
    """The q/k norm RMS recorded in the geometry's metadata, or None."""
    qk_norm = geometry.metadata.get("qk_norm") or {}
    if "rms_query" not in qk_norm:
        return None
    return NormRMS(query=np.asarray(qk_norm["rms_query"], dtype=float), key=np.asarray(qk_norm["rms_key"], dtype=float))


def layer_factors(layer: AttentionLayer, *, fold_ln: bool) -> LayerFactors:
    """One layer's float64 factors with sqrt(s) in each, norms folded if ``fold_ln`` (the factors-file convention)."""
    if fold_ln:
        layer = fold_norm(layer)
    root = np.sqrt(layer.scale)
    return LayerFactors(*(None if getattr(layer, name) is None else root * getattr(layer, name)
                          for name in ("W_Q", "W_K", "b_Q", "b_K")))


def factors_of_layers(layers: list[AttentionLayer], *, fold_ln: bool) -> Factors:
    """Stacked float64 factors with sqrt(s) in each, norms folded if ``fold_ln`` (the factors-file convention)."""
    per_layer = [layer_factors(layer, fold_ln=fold_ln) for layer in layers]
    arrays = {name: np.stack([getattr(f, name) for f in per_layer])  # (L, H, ...)
              for name in ("W_Q", "W_K", "b_Q", "b_K") if getattr(per_layer[0], name) is not None}
    return Factors(arrays["W_Q"], arrays["W_K"], arrays.get("b_Q"), arrays.get("b_K"), fold_ln, "<model>")


class ModelLayers:
    """A model's attention layers, each formed (float64, one key factor per query head, unfolded) when
    asked for from a tensor source, the last ``cache_size`` kept. ``len`` and indexing as for a list.

    A checkpoint's files are unmapped after each layer (their pages are not left resident beside a
    loaded model's). ``check(index, layer)``, if given, sees each layer as stored when it is read.
    """

    def __init__(self, adapter: AttentionAdapter, tensors, cache_size: int = 1,
                 check: Callable[[int, AttentionLayer], None] | None = None):
        self.adapter = adapter
        self.tensors = tensors
        self.check = check
        self.read = functools.lru_cache(maxsize=cache_size)(self._read)

    @classmethod
    def snapshot(cls, model: nn.Module, adapter: AttentionAdapter,
                 check: Callable[[int, AttentionLayer], None] | None = None) -> ModelLayers:
        """The model's layers as they are now, whatever is later written into it: the parameters the
        adapter reads (query/key projections, biases, norms; a fused layout's whole fused projection)
        are copied once, in the model's dtype (a small part of the weights). ``check(index, layer)`` sees each layer as stored on the way."""
        state = model.state_dict()
        recorder = _RecordingSource(StateDictSource(state))
        for index in range(adapter.num_layers):
            layer = adapter.layer(recorder, index)  # one layer's float64 arrays at a time, dropped at once
            if check is not None:
                check(index, layer)
        return cls(adapter, StateDictSource({name: state[name].detach().clone() for name in recorder.read}))

    def _read(self, index: int) -> AttentionLayer:
        layer = self.adapter.layer(self.tensors, index)
        if hasattr(self.tensors, "close"):
            self.tensors.close()
        if self.check is not None:
            self.check(index, layer)
        return layer.per_query_head()

    def __len__(self) -> int:
        return self.adapter.num_layers

    def __getitem__(self, index: int) -> AttentionLayer:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.read(index)


class _RecordingSource:
    """A tensor source that remembers the names read through it."""

    def __init__(self, source: StateDictSource):
        self.source = source
        self.read: set[str] = set()

    def names(self) -> frozenset[str]:
        return self.source.names()

    def get(self, name: str) -> np.ndarray:
        self.read.add(name)
        return self.source.get(name)

    def dtype(self, name: str) -> str:
        return self.source.dtype(name)


class LayerwiseFactors(_FactorsShape):
    """The factors of a sequence of layers (``ModelLayers`` or a list), formed one layer at a time.

    Linearised with ``norm_rms`` (None: isotropic input) and folded as ``fold_ln`` says, as the
    geometry has them; one key factor per query head; the last ``cache_size`` kept (a layer and its
    anchor). Usable wherever the operator fits take factors.
    """

    def __init__(self, layers, *, fold_ln: bool, norm_rms: NormRMS | None = None, source: str = "<model>",
                 cache_size: int = 2):
        self.layers = layers
        self.fold_ln = fold_ln
        self.norm_rms = norm_rms
        self.source = source
        self.layer = functools.lru_cache(maxsize=cache_size)(self._layer)
        first = self.layer(0)
        self._shape = (len(layers),) + first.W_Q.shape
        self._kv_heads = first.W_K.shape[0]

    def _layer(self, index: int) -> LayerFactors:
        raw = self.layers[index]
        rms = None if self.norm_rms is None else _layer_rms(self.norm_rms, index, raw)
        return layer_factors(linearise(raw, rms), fold_ln=self.fold_ln)


def model_factors(model: nn.Module, *, fold_ln: bool = True) -> Factors:
    """The query/key factors of a loaded model, as the extraction would write them but in float64."""
    return factors_of_layers(linearised_layers(model_layers(model)[1], None), fold_ln=fold_ln)


# ----------------------------------------------------------------------------
# Reconstruction targets, as factors (X, Y) with X Y^T = target; arrays (L, H, d_model, width)
# ----------------------------------------------------------------------------


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
    k: (...,) int. Heads with k = 0 keep (C, D) untouched. Formed ``HEADS_PER_CORRECTION`` heads at a
    time: a head's QR and SVD temporaries are about 24 times its factors.
    """
    lead, (d_model, d_head) = A.shape[:-2], A.shape[-2:]
    flat = [x.reshape(-1, d_model, d_head) for x in (A, B, C, D)]  # (N, d_model, d_head) each
    k_flat = np.broadcast_to(k, lead).reshape(-1)  # (N,)
    parts = [_rank_k_correction(*(x[start:start + HEADS_PER_CORRECTION] for x in flat),
                                k_flat[start:start + HEADS_PER_CORRECTION])
             for start in range(0, k_flat.size, HEADS_PER_CORRECTION)]
    return (np.concatenate([x for x, _ in parts]).reshape(A.shape),
            np.concatenate([y for _, y in parts]).reshape(A.shape))


HEADS_PER_CORRECTION = 4


def _rank_k_correction(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray, k: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``rank_k_correction`` for (N, d_model, d_head) factors and k (N,)."""
    d_head = A.shape[-1]
    Qx, Rx = np.linalg.qr(np.concatenate([A, -C], axis=-1))  # (N, d_model, r), (N, r, 2 d_head)
    Qy, Ry = np.linalg.qr(np.concatenate([B, D], axis=-1))
    U, S, Vt = np.linalg.svd(Rx @ np.swapaxes(Ry, -1, -2))  # (N, r, r), (N, r), (N, r, r)
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


# ----------------------------------------------------------------------------
# Writing factors into the model
# ----------------------------------------------------------------------------


def _linear_weight(per_head: np.ndarray) -> np.ndarray:
    """(H, d_model, d_head) -> nn.Linear weight (H d_head, d_model)."""
    return per_head.transpose(0, 2, 1).reshape(-1, per_head.shape[1])


def _separate_projections(attention: str, query: str, key: str) -> Callable:
    """The writer for separate query and key nn.Linear layers; ``attention`` is formatted with the layer index."""

    def write(params: _Parameters, index: int, W_Q, W_K, b_Q, b_K) -> None:
        prefix = attention.format(index=index)
        for part, W, b in ((query, W_Q, b_Q), (key, W_K, b_K)):
            params.set(f"{prefix}.{part}.weight", _linear_weight(W))
            if b is not None:
                params.set(f"{prefix}.{part}.bias", b.reshape(-1))

    return write


_write_bert = _separate_projections("encoder.layer.{index}.attention.self", "query", "key")
_write_llama = _separate_projections("layers.{index}.self_attn", "q_proj", "k_proj")


def _writer_for(adapter: AttentionAdapter) -> Callable | None:
    """The weight writer of a model type; a generic adapter's from its layout."""
    layout = getattr(adapter, "layout", None)
    if layout is not None:
        return _separate_projections(layout.attention.replace("{}", "{index}"), layout.query, layout.key)
    return WRITERS.get(adapter.model_type)


def _write_gpt2(params: _Parameters, index: int, W_Q, W_K, b_Q, b_K) -> None:
    name = f"h.{index}.attn.c_attn"
    d = W_Q.shape[1]
    weight = params.get(f"{name}.weight")  # (d_model, 3 d_model): x @ W
    weight[:, :d] = W_Q.transpose(1, 0, 2).reshape(d, -1)
    weight[:, d : 2 * d] = W_K.transpose(1, 0, 2).reshape(d, -1)
    params.set(f"{name}.weight", weight)
    if b_Q is not None:
        bias = params.get(f"{name}.bias")  # (3 d_model,)
        bias[:d], bias[d : 2 * d] = b_Q.reshape(-1), b_K.reshape(-1)
        params.set(f"{name}.bias", bias)


def _write_gpt_neox(params: _Parameters, index: int, W_Q, W_K, b_Q, b_K) -> None:
    name = f"layers.{index}.attention.query_key_value"
    H, d_model, d_head = W_Q.shape
    weight = params.get(f"{name}.weight").reshape(H, 3, d_head, d_model)  # rows head by head: q, k, v
    weight[:, 0], weight[:, 1] = W_Q.transpose(0, 2, 1), W_K.transpose(0, 2, 1)
    params.set(f"{name}.weight", weight.reshape(3 * H * d_head, d_model))
    if b_Q is not None:
        bias = params.get(f"{name}.bias").reshape(H, 3, d_head)
        bias[:, 0], bias[:, 1] = b_Q, b_K
        params.set(f"{name}.bias", bias.reshape(-1))


def _write_fused(params: _Parameters, index: int, W_Q, W_K, b_Q, b_K) -> None:
    """A fused projection read by a ``FusedAdapter`` (Falcon, GPT-BigCode, Phi-3): the query and key rows
    are those the adapter's ``split`` cuts out, found by splitting the row numbers themselves.

    Needs one key head per query head (``expand_kv_heads_in_place`` first).
    """
    adapter = params.adapter
    name = adapter.fused.format(index)
    query_rows, key_rows = adapter.split(np.arange(adapter.fused_rows()))  # (H, d_head), (H_kv, d_head) row numbers
    if key_rows.shape[0] != W_K.shape[0]:
        raise QkspectraError(f"cannot write {name}: {key_rows.shape[0]} key heads for {W_K.shape[0]} query heads "
                             "(expand the key/value heads first)")
    weight = params.get(f"{name}.weight")  # (fused_rows, d_model)
    weight[query_rows], weight[key_rows] = W_Q.transpose(0, 2, 1), W_K.transpose(0, 2, 1)  # (H, d_head, d_model)
    params.set(f"{name}.weight", weight)
    if b_Q is not None or b_K is not None:
        bias = params.get(f"{name}.bias")  # (fused_rows,)
        if b_Q is not None:
            bias[query_rows] = b_Q  # (H, d_head)
        if b_K is not None:
            bias[key_rows] = b_K
        params.set(f"{name}.bias", bias)


WRITERS: dict[str, Callable] = {
    "bert": _write_bert,
    "roberta": _write_bert,
    "xlm-roberta": _write_bert,
    "electra": _write_bert,
    "distilbert": _separate_projections("transformer.layer.{index}.attention", "q_lin", "k_lin"),
    "gpt2": _write_gpt2,
    "gpt_neox": _write_gpt_neox,
    "llama": _write_llama,
    "mistral": _write_llama,
    "qwen2": _write_llama,
    "qwen3": _write_llama,
    "olmo2": _write_llama,
    "gemma3_text": _write_llama,
    "falcon": _write_fused,
    "gpt_bigcode": _write_fused,
    "phi3": _write_fused,
    "persimmon": _write_fused,  # without q/k LayerNorms (which centre, and are refused)
}


class _Parameters:
    """Read and overwrite a model's parameters by their checkpoint names (prefix found by the adapter)."""

    def __init__(self, model: nn.Module, adapter: AttentionAdapter):
        self.parameters = dict(model.named_parameters())
        self.adapter = adapter
        self.tensors = StateDictSource(self.parameters)

    def get(self, name: str) -> np.ndarray:
        return self.tensors.get(self.adapter.prefixed(self.tensors, name))

    def set(self, name: str, value: np.ndarray) -> None:
        parameter = self.parameters[self.adapter.prefixed(self.tensors, name)]
        if parameter.shape != value.shape:
            raise QkspectraError(f"cannot write {name}: shape {value.shape}, the model has {tuple(parameter.shape)}")
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def expand_kv_heads_in_place(model: nn.Module) -> None:
    """Give every query head its own key/value head (repeat_kv done in the weights); same function.

    Separate ``k_proj``/``v_proj`` are repeated head by head. Fused projections with shared key/value
    heads are rebuilt with one key and value head per query head: Falcon's grouped (new decoder
    architecture) and multi-query layouts and GPT-BigCode's multi-query one become head by head
    [q, k, v]; Phi-3 keeps [all q, all k, all v] with H key heads. The modules' head counts and the
    config follow, so the adapter reads the new layout.
    """
    expand_fused = _FUSED_EXPANSIONS.get(model.config.model_type)
    if expand_fused is not None:
        expand_fused(model)
        return
    H = model.config.num_attention_heads
    for module in attention_modules(model):
        groups = getattr(module, "num_key_value_groups", 1)
        if groups == 1:
            continue
        if not (hasattr(module, "k_proj") and hasattr(module, "v_proj")):
            raise QkspectraError(f"cannot give each query head its own key head in {type(module).__name__}: "
                                 "no separate k_proj/v_proj")
        for name in ("k_proj", "v_proj"):
            old = getattr(module, name)
            d_head = old.out_features // (H // groups)
            with torch.device("meta"):  # no initial weights: the repeated ones are the only new memory
                new = nn.Linear(old.in_features, H * d_head, bias=old.bias is not None, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight = nn.Parameter(old.weight.view(-1, d_head, old.in_features).repeat_interleave(groups, 0)
                                          .reshape(-1, old.in_features), requires_grad=old.weight.requires_grad)
                if old.bias is not None:
                    new.bias = nn.Parameter(old.bias.view(-1, d_head).repeat_interleave(groups, 0).reshape(-1),
                                            requires_grad=old.bias.requires_grad)
            setattr(module, name, new)
        module.num_key_value_groups = 1
    if getattr(model.config, "num_key_value_heads", None) is not None:
        model.config.num_key_value_heads = H


def _regroup_rows(linear: nn.Linear, regroup: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace a linear map's weight (out, d_model) and bias (out,) by regroup(rows), rows on the first axis.

    The module keeps its class (Falcon's own ``FalconLinear``) and its hooks; only the rows change.
    """
    with torch.no_grad():
        linear.weight = nn.Parameter(regroup(linear.weight), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            linear.bias = nn.Parameter(regroup(linear.bias), requires_grad=linear.bias.requires_grad)
    linear.out_features = linear.weight.shape[0]


def _shared_kv_heads(rows: torch.Tensor, H: int, H_kv: int,
                     grouped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused rows ((H + 2 H_kv) d_head, ...) -> q, k, v each (H, d_head, ...), key/value head g repeated
    for the H / H_kv query heads that read it.

    grouped: per kv group its query heads, then its key and value head (Falcon's new decoder architecture);
    otherwise all query heads, then the H_kv key heads, then the H_kv value heads.
    """
    rest, group, d_head = rows.shape[1:], H // H_kv, rows.shape[0] // (H + 2 * H_kv)
    if grouped:
        heads = rows.reshape(H_kv, group + 2, d_head, *rest)  # (H_kv, group + 2, d_head, ...)
        q, k, v = heads[:, :group].reshape(H, d_head, *rest), heads[:, group], heads[:, group + 1]
    else:
        q, k, v = (part.reshape(-1, d_head, *rest) for part in rows.split([H * d_head, H_kv * d_head, H_kv * d_head]))
    return q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (H, d_head, ...) each


def _head_by_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v (H, d_head, ...) -> rows head by head [q, k, v] (3 H d_head, ...)."""
    return torch.stack([q, k, v], dim=1).flatten(0, 2)


def _expand_falcon(model: nn.Module) -> None:
    """Falcon: grouped -> groups of one query head (rows head by head [q, k, v]); multi-query -> multi-head."""
    config = model.config
    H, grouped = config.num_attention_heads, bool(config.new_decoder_architecture)
    H_kv = config.num_kv_heads if grouped else (1 if config.multi_query else H)
    if H_kv == H:
        return
    for module in attention_modules(model):
        _regroup_rows(module.query_key_value,
                      lambda rows: _head_by_head(*_shared_kv_heads(rows, H, H_kv, grouped)))
        module.num_kv_heads = H
        if not grouped:
            module.multi_query = False
    config.num_kv_heads = H
    if not grouped:
        config.multi_query = False


def _expand_gpt_bigcode(model: nn.Module) -> None:
    """GPT-BigCode: multi-query [all q, k, v] -> multi-head, rows head by head [q, k, v]."""
    config = model.config
    if not config.multi_query:
        return
    H = config.n_head
    for module in attention_modules(model):
        _regroup_rows(module.c_attn, lambda rows: _head_by_head(*_shared_kv_heads(rows, H, 1, False)))
        module.multi_query, module.kv_heads, module.kv_dim, module.num_key_value_groups = False, H, module.embed_dim, 1
    if hasattr(model.base_model, "multi_query"):
        model.base_model.multi_query = False
    config.multi_query, config.num_key_value_heads = False, H


def _expand_phi3(model: nn.Module) -> None:
    """Phi-3: [all q, H_kv k, H_kv v] -> [all q, H k, H v]."""
    config = model.config
    H, H_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if H_kv == H:
        return
    for module in attention_modules(model):
        _regroup_rows(module.qkv_proj, lambda rows: torch.cat(_shared_kv_heads(rows, H, H_kv, False)).flatten(0, 1))
        module.num_key_value_heads, module.num_key_value_groups = H, 1
    config.num_key_value_heads = H


_FUSED_EXPANSIONS: dict[str, Callable[[nn.Module], None]] = {
    "falcon": _expand_falcon,
    "gpt_bigcode": _expand_gpt_bigcode,
    "phi3": _expand_phi3,
}


def _kept_bias(bias: np.ndarray | None, old: np.ndarray, new: np.ndarray) -> np.ndarray | None:
    """b' with new @ b' closest to old @ b (least squares): old, new (H, d_model, d_head), bias (H, d_head)."""
    if bias is None:
        return None
    wanted = np.einsum("hmd,hd->hm", old, bias)  # (H, d_model)
    return np.einsum("hdm,hm->hd", np.linalg.pinv(new), wanted)  # (H, d_head)


def write_reconstruction(model: nn.Module, adapter: AttentionAdapter, layers, X, Y, *, fold_ln: bool,
                         norm_rms: NormRMS | None = None) -> None:
    """Write the targets X Y^T (L, H, d_model, d_head factors, s included, in the folded space if ``fold_ln``).

    ``layers``: the model's original layers as stored (unfolded, a list or ``ModelLayers``), for
    the scales, norms and biases. Models with q/k norms: the targets are linearised metrics (with the
    RMS ``norm_rms``, None: isotropic input); the weights written are those the norms turn back into them.
    """
    writer = LayerWriter(model, adapter, fold_ln=fold_ln, norm_rms=norm_rms)
    for index in range(len(layers)):
        writer.write(index, layers[index], X[index], Y[index])


class LayerWriter:
    """Writes one layer's target factors into the model (see ``write_reconstruction``)."""

    def __init__(self, model: nn.Module, adapter: AttentionAdapter, *, fold_ln: bool, norm_rms: NormRMS | None):
        self.writer = _writer_for(adapter)
        if self.writer is None:
            raise QkspectraError(f"the functional test cannot write weights of {adapter.model_type} models")
        self.params = _Parameters(model, adapter)
        self.fold_ln = fold_ln
        self.norm_rms = norm_rms

    def write(self, index: int, raw: AttentionLayer, X: np.ndarray, Y: np.ndarray) -> None:
        """raw: the layer as stored; X, Y: (H, d_model, d_head) its target factors."""
        norm_rms = self.norm_rms
        flat = linearise(raw, None if norm_rms is None else _layer_rms(norm_rms, index, raw))
        space = fold_norm(flat) if self.fold_ln else flat
        root = np.sqrt(raw.scale)
        W_Q, W_K = X / root, Y / root  # (H, d_model, d_head) in the chosen space
        b_Q, b_K = _kept_bias(space.b_Q, space.W_K, W_K), _kept_bias(space.b_K, space.W_Q, W_Q)
        if self.fold_ln and raw.norm_gain is not None:
            if np.any(raw.norm_gain == 0):
                raise QkspectraError(f"layer {index}: the norm gain has zero entries, so folded factors cannot be unfolded")
            W_Q, W_K = W_Q / raw.norm_gain[None, :, None], W_K / raw.norm_gain[None, :, None]
            if raw.norm_bias is not None:
                b_Q = None if b_Q is None else b_Q - np.einsum("m,hmd->hd", raw.norm_bias, W_Q)
                b_K = None if b_K is None else b_K - np.einsum("m,hmd->hd", raw.norm_bias, W_K)
        if raw.has_qk_norm:
            rms = _layer_rms(norm_rms, index, raw) if norm_rms is not None else isotropic_layer_rms(raw)
            W_Q, b_Q = delinearise(W_Q, b_Q, raw.q_norm, rms[0], raw.W_Q, raw.b_Q)
            W_K, b_K = delinearise(W_K, b_K, raw.k_norm, rms[1], raw.W_K, raw.b_K)
        if raw.b_Q is None:
            b_Q = None
        if raw.b_K is None:
            b_K = None
        self.writer(self.params, index, W_Q, W_K, b_Q, b_K)


# ----------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------


@dataclass
class _Batch:
    inputs: dict  # forward keyword arguments, (B, seq) tensors
    query_weight: torch.Tensor  # (B, query_pos) float64, 1 for real tokens
    first_key: torch.Tensor  # (B,) index of each window's first real token
    calls: list[AttentionCall]  # per layer, the original's queries and keys (the model's dtype)
    query_entropy: list[torch.Tensor]  # per layer (B, H, query_pos) float32, the original's entropy per query
    entropy: torch.Tensor  # (L, H) float64, sum over real queries of the original's entropy
    loss_sum: float  # original: summed next-token cross-entropy (causal) or 0
    hidden: torch.Tensor | None  # (B, seq, d_model) original final hidden states (encoders)


@dataclass(frozen=True)
class Effects:
    """One reconstruction against the original model."""

    delta_loss: float
    relative_delta_loss: float | None
    loss_kind: str
    per_head_kl: np.ndarray  # (L, H)
    entropy_shift: np.ndarray  # (L, H)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delta_loss": self.delta_loss,
            "loss_kind": self.loss_kind,
            "relative_delta_loss": self.relative_delta_loss,
            "mean_kl": float(self.per_head_kl.mean()),
            "per_head_kl": self.per_head_kl.tolist(),
            "mean_entropy_shift": float(self.entropy_shift.mean()),
        }


def logit_kl(reference: tuple[torch.Tensor, torch.Tensor], changed: tuple[torch.Tensor, torch.Tensor],
             visible: VisibleKeys) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p0 || p) and the entropy of p, p0 = softmax(q0 . k0) and p = softmax(q . k), one block of logits at a time.

    reference, changed: (queries (B, H, query_pos, d_head), keys (B, H, key_pos, d_head)) float32, scale included
    returns kl (B, H, query_pos), entropy (B, H, query_pos), float32; 0 for queries that see no key

    Online over key blocks (see ``extract.entropy``): for p0 the running max m0 and sum l0, and
    a = sum_j exp(s0_j - m0)(s0_j - s_j) (rescaled by exp(-d) when m0 grows by d); for p the
    running m, l, u of the entropy. Then KL = a / l0 - (m0 + log l0) + (m + log l).
    """
    (q0, k0), (q, k) = reference, changed
    B, H, num_queries, _ = q.shape
    num_keys = k.shape[2]
    key_block = min(num_keys, KEYS_PER_BLOCK)
    query_block = max(1, min(num_queries, LOGITS_PER_BLOCK // max(1, 2 * B * H * key_block)))
    state = q.new_zeros((6, B, H, num_queries))
    m0, l0, a, m, l, u = state
    m0.fill_(_START)
    m.fill_(_START)
    for q_start in range(0, num_queries, query_block):
        rows = slice(q_start, min(q_start + query_block, num_queries))
        for k_start in range(0, num_keys, key_block):
            cols = slice(k_start, min(k_start + key_block, num_keys))
            mask = visible.block(rows.start, rows.stop, cols.start, cols.stop)
            if mask is False:
                continue
            s0 = q0[..., rows, :] @ k0[..., cols, :].transpose(-1, -2)  # (B, H, bq, bk)
            s = q[..., rows, :] @ k[..., cols, :].transpose(-1, -2)
            if mask is not True:
                mask = mask[:, :, 0]  # (B|1, 1, bq, bk)
                s0.masked_fill_(~mask, _HIDDEN)
                s.masked_fill_(~mask, _HIDDEN)
            m0_new = torch.maximum(m0[..., rows], s0.amax(-1))
            m_new = torch.maximum(m[..., rows], s.amax(-1))
            grown0, grown = m0_new - m0[..., rows], m_new - m[..., rows]
            w0 = torch.exp(s0 - m0_new.unsqueeze(-1))  # exp(s0 - m0)
            a[..., rows] = torch.exp(-grown0) * a[..., rows] + (w0 * (s0 - s)).sum(-1)
            l0[..., rows] = torch.exp(-grown0) * l0[..., rows] + w0.sum(-1)
            s.sub_(m_new.unsqueeze(-1))
            w = torch.exp(s)
            decay = torch.exp(-grown)
            u[..., rows] = decay * (u[..., rows] - grown * l[..., rows]) + s.mul_(w).sum(-1)
            l[..., rows] = decay * l[..., rows] + w.sum(-1)
            m0[..., rows], m[..., rows] = m0_new, m_new
    seen = (l0 > 0) & (l > 0)
    safe_l0, safe_l = torch.where(seen, l0, 1.0), torch.where(seen, l, 1.0)
    kl = torch.where(seen, a / safe_l0 - (m0 + torch.log(safe_l0)) + (m + torch.log(safe_l)), 0.0)
    entropy = torch.where(seen, torch.log(safe_l) - u / safe_l, 0.0)
    return kl, entropy


# float32 logits converted at a time when the loss is summed (16 MiB, and as much for the cross-entropy's
# log-softmax): small beside the model's own logits
LOSS_LOGITS_PER_BLOCK = 2**22
# Bytes of float32 logits over the vocabulary one batch of a causal LM may produce (the loss needs them
# all, and the cross-entropy a copy): a 262k-token vocabulary (Gemma 3) makes 1 GB per 1024 tokens.
LOGITS_MEMORY_BUDGET = 512 * 2**20


class _Runner:
    """Runs the model (its fast attention) on fixed batches, handing over each layer's queries and keys."""

    def __init__(self, model: nn.Module, adapter: AttentionAdapter, windows: list[list[int]]):
        self.model = model
        self.adapter = adapter
        self.causal = model.get_output_embeddings() is not None and model.config.model_type not in ENCODER_MODEL_TYPES
        self.modules = attention_modules(model)
        self.device = next(model.parameters()).device
        pad_id = model.config.pad_token_id if isinstance(getattr(model.config, "pad_token_id", None), int) else 0
        H = model.config.num_attention_heads
        batch_size = None
        if self.causal:  # windows per batch: at most LOGITS_MEMORY_BUDGET of logits
            vocab = model.get_output_embeddings().weight.shape[0]
            batch_size = max(1, LOGITS_MEMORY_BUDGET // (4 * vocab * max(map(len, windows))))
        self.batches = []
        batches = split_for_sliding_window(windows, window_batches(windows, H, batch_size),
                                           getattr(model.config, "sliding_window", None))
        for batch in batches:
            input_ids, attention_mask = pad_windows([windows[i] for i in batch], pad_id, "right")
            self.batches.append(forward_inputs(model, input_ids.to(self.device), attention_mask.to(self.device)))
        self.num_queries = sum(len(w) for w in windows)
        self.num_predicted = sum(len(w) - 1 for w in windows)

    def _forward(self, inputs: dict, on_call: Callable[[AttentionCall], None]) -> Any:
        """One forward pass; on_call(call) for each layer's attention call, in order."""
        with torch.inference_mode(), AttentionCapture(self.model, on_call) as capture:
            capture.begin(inputs["attention_mask"])
            output = self.model(**inputs)
            capture.end()
        return output

    def _loss_sum(self, inputs: dict, output: Any) -> float:
        """Summed next-token cross-entropy over pairs of real tokens, in float32, a block of positions at a
        time (the float32 logits and their log-softmax of one block, not of the whole batch)."""
        targets = inputs["input_ids"][:, 1:]  # (B, seq - 1)
        real = (inputs["attention_mask"][:, 1:] * inputs["attention_mask"][:, :-1]).bool()
        predicting = output.logits[:, :-1]  # (B, seq - 1, vocab) a view: position i predicts token i + 1
        vocab = predicting.shape[-1]
        step = max(1, LOSS_LOGITS_PER_BLOCK // (vocab * targets.shape[0]))
        total = 0.0
        for start in range(0, targets.shape[1], step):
            block = slice(start, start + step)
            logits = predicting[:, block].float()  # (B, step, vocab)
            losses = nn.functional.cross_entropy(logits.reshape(-1, vocab), targets[:, block].reshape(-1),
                                                 reduction="none").view(targets[:, block].shape)  # (B, step)
            total += float(losses[real[:, block]].double().sum())
        return total

    def reference(self, progress: Callable[[int], None]) -> list[_Batch]:
        batches = []
        for inputs in self.batches:
            weight = inputs["attention_mask"].cpu().to(torch.float64)  # (B, query_pos), sums on the CPU
            first_key = inputs["attention_mask"].argmax(dim=-1)  # (B,)
            calls: list[AttentionCall] = []
            query_entropy: list[torch.Tensor] = []
            entropy = torch.zeros(self.adapter.num_layers, self.model.config.num_attention_heads, dtype=torch.float64)

            def keep(call: AttentionCall) -> None:
                calls.append(call)
                h, _ = call_entropy(call, first_key)  # (B, H, query_pos)
                query_entropy.append(h)
                entropy[call.layer] = torch.einsum("bhq,bq->h", h.cpu().double(), weight)
                release_freed_memory()  # this layer's temporaries, freed across threads' arenas

            output = self._forward(inputs, keep)
            release_freed_memory()  # the forward's activations, before the loss's blocks of logits
            batches.append(_Batch(
                inputs, weight, first_key, calls, query_entropy, entropy,
                self._loss_sum(inputs, output) if self.causal else 0.0,
                None if self.causal else output.last_hidden_state.float(),
            ))
            del output
            release_freed_memory()
            progress(int(inputs["attention_mask"].sum()))
        return batches

    def compare(self, reference: list[_Batch], original_loss: float, progress: Callable[[int], None]) -> Effects:
        L, H = self.adapter.num_layers, self.model.config.num_attention_heads
        kl_sum = torch.zeros(L, H, dtype=torch.float64)
        entropy_shift = torch.zeros(L, H, dtype=torch.float64)
        loss_sum = 0.0
        for batch in reference:

            def compare_layer(call: AttentionCall) -> None:
                original = batch.calls[call.layer]
                kl, entropy = attention_change(original, batch.query_entropy[call.layer], call)  # (B, H, query_pos)
                kl_sum[call.layer] += torch.einsum("bhq,bq->h", kl.cpu().double(), batch.query_weight)
                entropy_shift[call.layer] += torch.einsum("bhq,bq->h", entropy.cpu().double(), batch.query_weight)
                release_freed_memory()

            output = self._forward(batch.inputs, compare_layer)
            release_freed_memory()
            entropy_shift -= batch.entropy
            if self.causal:
                loss_sum += self._loss_sum(batch.inputs, output)
            else:
                cosine = nn.functional.cosine_similarity(output.last_hidden_state.float(), batch.hidden, dim=-1)
                loss_sum += float(((1 - cosine.double()) * batch.query_weight).sum())  # (B, seq) summed
            del output
            release_freed_memory()
            progress(int(batch.inputs["attention_mask"].sum()))
        if self.causal:
            delta = loss_sum / self.num_predicted - original_loss
            relative = delta / original_loss if original_loss > TINY else None
        else:
            delta, relative = loss_sum / self.num_queries, None
        return Effects(delta, relative, LOSS_KINDS[self.causal], (kl_sum / self.num_queries).numpy(),
                       (entropy_shift / self.num_queries).numpy())


def release_freed_memory() -> None:
    """Hand memory freed by numpy and torch back to the system (glibc's malloc_trim; elsewhere nothing).

    The fits and the layer-by-layer writes free many float64 arrays from several threads, and each
    forward pass its activations and logits; glibc keeps them in its arenas (0.6 GB of resident
    memory on a 0.85 GB model after the fits), which the next phase would find resident on top of its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def attention_change(original: AttentionCall, original_entropy: torch.Tensor,
                     changed: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p0 || p) and the entropy of p (B, H, query_pos) float32, p0 the original call's attention, p the changed one's.

    original_entropy: (B, H, query_pos) the entropy of p0. On the CPU from torch's fused attention
    kernel: with s0, s the two calls' logits, KL = sum_j p0_j (s0_j - s_j) - lse0 + lse
    = -H(p0) - E_p0[s] + lse, E_p0[s] = scale q . (sum_j p0_j k_j) (the original attention with
    the changed keys as values), and lse, H(p) as in ``extract.entropy.flash_entropy``; elsewhere
    from blocks of logits (``logit_kl``). Both calls' keys are centred (``centred``), the changed
    ones alike as keys and as values, which leaves KL and entropy unchanged. 0 for queries that see no key.
    """
    if changed.queries.device.type not in FUSED_KERNEL_DEVICES:
        return logit_kl((original.scaled_queries(), original.keys_per_query_head()),
                        (changed.scaled_queries(), changed.keys_per_query_head()), changed.visible)
    queries, keys = changed.queries.to(torch.float32), centred(changed.keys_per_query_head())
    _, original_mean_key = softmax_moments(original.queries.to(torch.float32), centred(original.keys_per_query_head()),
                                           keys, original.scale, original.visible)  # (B, H, query_pos, d_head)
    lse, mean_key = softmax_moments(queries, keys, keys, changed.scale, changed.visible)
    entropy = torch.linalg.vecdot(queries, mean_key).mul_(-changed.scale).add_(lse).clamp_(min=0.0)
    kl = (lse - original_entropy).sub_(torch.linalg.vecdot(queries, original_mean_key).mul_(changed.scale))
    seen = (changed.visible.count() > 0).to(kl.device)[:, None, :]  # (B|1, 1, query_pos)
    return torch.where(seen, kl, 0.0), torch.where(seen, entropy, 0.0)


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def reconstruction_effects(model: nn.Module, windows: list[list[int]], singular_values: np.ndarray,
                           anchors: dict[str, Anchor], rank_k_section: dict[str, Any] | None, *,
                           fold_ln: bool = True, norm_rms: NormRMS | None = None,
                           progress: bool = False, layers: ModelLayers | None = None) -> dict[str, Any]:
    """The ``functional`` section for a loaded model and token windows.

    The model runs in its own dtype, on its own device, with transformers' SDPA attention (switched
    to for each pass by ``AttentionCapture``). It is modified in place: key/value heads expanded, query/key weights overwritten
    (the original's outputs are recorded first).
    singular_values: (L, H, K) the geometry's spectra (spectral reconstruction and spectral T).
    rank_k_section: the ``rank_k`` section, for each strategy's operator-level k; None skips
    ``operator_rank_k`` (then None in the output). norm_rms: the q/k norm RMS the geometry's
    linearised metric used (its metadata), for models with q/k norms; None: isotropic input.
    layers: the model's layers as stored, read from its checkpoint with ``writable_check``
    (``functional_evidence``); None: a snapshot of the model's own (``original_layers``).
    Returns {strategy: {"spectral": R, "operator": R, "operator_rank_k": R}, "control": R}.
    """
    from tqdm.auto import tqdm

    if layers is None:
        _, layers = original_layers(model)
    factors = LayerwiseFactors(layers, fold_ln=fold_ln, norm_rms=norm_rms)
    L, H = factors.num_layers, factors.num_heads
    if singular_values.shape[:2] != (L, H):
        raise QkspectraError(f"the geometry has {singular_values.shape[:2]} layers x heads, the model {(L, H)}")
    model.eval()
    expand_kv_heads_in_place(model)
    adapter = adapter_for(model.config)
    writer = LayerWriter(model, adapter, fold_ln=fold_ln, norm_rms=norm_rms)

    runner = _Runner(model, adapter, windows)
    passes = 2 + len(anchors) * (2 + (rank_k_section is not None))  # at most: duplicates are run once
    with tqdm(total=passes * runner.num_queries, unit="tok", desc="functional test", disable=not progress,
              leave=False) as bar:
        # every strategy's operator T first: the fitter's layers are not held through the passes
        fitter = OperatorFitter(factors)
        operator_Ts = {name: np.stack([fit.T for fit in fitter.fit_all(anchor.layers)]) for name, anchor in anchors.items()}
        del fitter
        release_freed_memory()
        reference = runner.reference(bar.update)
        original_loss = sum(batch.loss_sum for batch in reference) / max(runner.num_predicted, 1)

        cache: dict[tuple, dict] = {}

        def effects_of(key: tuple, target: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> dict:
            """target(layer) -> that layer's (X, Y) (H, d_model, d_head); written one layer at a time."""
            if key not in cache:
                with single_blas_thread():
                    for index in range(L):
                        writer.write(index, layers[index], *target(index))
                release_freed_memory()
                cache[key] = runner.compare(reference, original_loss, bar.update).as_dict()
            else:
                bar.update(runner.num_queries)
            return cache[key]

        def own(index: int) -> tuple[np.ndarray, np.ndarray]:
            return factors.layer(index).W_Q, factors.layer(index).W_K

        section: dict[str, Any] = {"control": effects_of(("control",), own)}
        for name, anchor in anchors.items():
            a = anchor.layers  # (L,)
            spectral_T, _ = scalar_rescale(singular_values, singular_values[a])  # (L, H)
            operator_T = operator_Ts[name]  # (L, H)

            def spectral(index: int) -> tuple[np.ndarray, np.ndarray]:
                return spectral_target(factors.layer(index), spectral_T[index, :, None] * singular_values[a[index]])

            def operator(index: int) -> tuple[np.ndarray, np.ndarray]:
                anchor_layer = factors.layer(a[index])
                return operator_T[index, :, None, None] * anchor_layer.W_Q, anchor_layer.W_K

            entry = {
                "spectral": effects_of(("spectral", a.tobytes()), spectral),
                "operator": effects_of(("operator", a.tobytes()), operator),
                "operator_rank_k": None,
                "num_anchor_layers": anchor.num_anchor_layers,
                "replaced_layers": anchor.num_fitted_layers,
            }
            if rank_k_section is not None:
                k = _operator_k(rank_k_section, name, (L, H))

                def rank_k(index: int) -> tuple[np.ndarray, np.ndarray]:
                    own_layer = factors.layer(index)
                    return rank_k_correction(own_layer.W_Q, own_layer.W_K, *operator(index), k[index])

                entry["operator_rank_k"] = effects_of(("operator_rank_k", a.tobytes(), k.tobytes()), rank_k)
            section[name] = entry
    return section


def _operator_k(rank_k_section: dict[str, Any], strategy: str, shape: tuple[int, int]) -> np.ndarray:
    entry = rank_k_section.get(strategy) or {}
    operator = entry.get("operator")
    if operator is None:
        raise QkspectraError(f"the rank_k section has no operator-level k for anchor {strategy!r}")
    k = np.asarray(operator["k"], dtype=int)
    if k.shape != shape:
        raise QkspectraError(f"rank_k.{strategy}.operator.k has shape {k.shape}, expected {shape}")
    return k


def load_functional_model(model_name_or_path: str | InMemoryModel, *, progress: bool = False,
                          placement: Placement = Placement("cpu", "float32")):
    """(model, tokenizer): a causal LM with its head, or the bare encoder, SDPA attention, in ``placement``.

    A model in memory gives a copy (the test rewrites its weights), in its own dtype and attention.
    """
    if not isinstance(model_name_or_path, str):
        from qkspectra.models.in_memory import functional_copy

        return functional_copy(model_name_or_path)
    from qkspectra.models import load_model, resolve_model

    source = resolve_model(model_name_or_path, progress=progress)
    causal = source.config.model_type not in ENCODER_MODEL_TYPES + tuple(REFUSED_MODEL_TYPES)
    return load_model(source, attn_implementation="sdpa", progress=progress, placement=placement,
                      model_class="AutoModelForCausalLM" if causal else "AutoModel")


def functional_evidence(model_name_or_path: str | InMemoryModel, geometry: Geometry, anchors: dict[str, Anchor],
                        rank_k_section: dict[str, Any] | None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                        fold_ln: bool = True, corpus: str | None = None, seq_len: int | None = None,
                        progress: bool = False, device: str = "auto", dtype: str | None = None) -> dict[str, Any]:
    """The ``functional`` section: load the model, cut the corpus into windows, compare reconstructions.

    geometry must come from this model with the same ``fold_ln`` (its spectra are checked against the
    checkpoint's); anchors as for ``operator_evidence``; rank_k_section from ``rank_k_evidence`` with
    factors. device, dtype: where and in what precision the model runs (``models.device``).
    """
    from qkspectra.extract.extraction import open_source, source_tensors
    from qkspectra.extract.corpus import default_seq_len, load_windows
    from qkspectra.models.device import resolve_placement

    placement = resolve_placement(device, dtype)
    release_freed_memory()  # what the analysis before freed, before the model comes in
    source = open_source(model_name_or_path, progress=progress)
    adapter = adapter_for(source.config)
    norm_rms = geometry_norm_rms(geometry)
    # the checkpoint, not its cast, one layer at a time: checked against the geometry and for what can be
    # written, then the original layers of the test (no copy of the model's beside it)
    layers = ModelLayers(adapter, source_tensors(source), check=writable_check(source.config.model_type))
    check_against_geometry(LayerwiseFactors(layers, fold_ln=fold_ln, norm_rms=norm_rms, cache_size=1), geometry)
    model, tokenizer = load_functional_model(model_name_or_path, progress=progress, placement=placement)
    windows = load_windows(tokenizer, corpus=corpus, seq_len=seq_len or default_seq_len(model),
                           max_tokens=max_tokens, window_per_line=False).windows
    return reconstruction_effects(model, windows, geometry.singular_values, anchors, rank_k_section, fold_ln=fold_ln,
                                  norm_rms=norm_rms, progress=progress, layers=layers)
