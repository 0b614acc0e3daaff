"""The model's own query/key layers and factors, as the functional test writes over them.

``ModelLayers`` reads a model's attention layers one at a time (from its checkpoint, or from a
snapshot of a loaded model taken before anything is written into it); ``writable_check`` refuses
what the test cannot write; ``LayerwiseFactors`` gives their float64 factors (sqrt(s) in each,
linearised and folded as the geometry has them) one layer at a time, wherever the operator fits
take factors. See docs/method/functional_test.md.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
from torch import nn

from qkspectra.analysis.factors import Factors, FactorsShape, LayerFactors
from qkspectra.errors import QkspectraError
from qkspectra.extract.linearised_norm import linearise, NormRMS
from qkspectra.models.adapters.base import fold_norm
from qkspectra.geometry import Geometry
from qkspectra.models.adapters import AttentionAdapter, AttentionLayer, adapter_for
from qkspectra.models.tensors import StateDictSource

REFUSED_MODEL_TYPES = {"albert": "its layers share one set of weights, which cannot hold per-layer reconstructions"}


def model_layers(model: nn.Module) -> tuple[AttentionAdapter, list[AttentionLayer]]:
    """The adapter for ``model`` and its layers as stored (no folding), float64, one key factor per query head."""
    adapter, layers = original_layers(model, rewritten=False)
    return adapter, [layers[index] for index in range(len(layers))]


def writable_check(model_type: str, *, rewritten: bool = True) -> Callable[[int, AttentionLayer], None]:
    """check(index, layer): QkspectraError (one line) for what the functional test cannot write into a
    ``model_type`` model (raised at once for a refused model type); ``rewritten``: also refuse what a
    rewritten model would compute wrongly (rotary positions with query/key biases that are not all zero)."""
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
        if rewritten and layer.rotary is not None and layer.b_Q is not None and np.any(layer.b_Q):
            raise QkspectraError("the functional test does not support rotary models with query/key biases")

    return check


def original_layers(model: nn.Module, *, rewritten: bool = True) -> tuple[AttentionAdapter, ModelLayers]:
    """The adapter for ``model`` and a snapshot of its layers (``ModelLayers.snapshot``), each checked
    by ``writable_check``."""
    check = writable_check(model.config.model_type, rewritten=rewritten)
    adapter = adapter_for(copy.deepcopy(model.config))  # its own config: expanding kv heads edits the model's
    return adapter, ModelLayers.snapshot(model, adapter, check)


def linearised_layers(layers: list[AttentionLayer], norm_rms: NormRMS | None) -> list[AttentionLayer]:
    """Layers with q/k norms replaced by their linearised metric (``extract.linearised_norm``), as the geometry has them.

    norm_rms: the typical RMS the geometry's extraction used (its metadata); None: isotropic input.
    """
    return [linearise(layer, None if norm_rms is None else layer_rms(norm_rms, index, layer))
            for index, layer in enumerate(layers)]


def layer_rms(norm_rms: NormRMS, index: int, layer: AttentionLayer) -> tuple[np.ndarray, np.ndarray]:
    """(query (H,), key (H,)) RMS of layer ``index``, key heads repeated for the query heads that share them."""
    key = norm_rms.key[index]
    return norm_rms.query[index], np.repeat(key, layer.W_Q.shape[0] // key.shape[0])


def geometry_norm_rms(geometry: Geometry) -> NormRMS | None:
    """The q/k norm RMS recorded in the geometry's metadata, or None."""
    qk_norm = geometry.metadata.get("qk_norm") or {}
    if "rms_query" not in qk_norm:
        return None
    return NormRMS(query=np.asarray(qk_norm["rms_query"], dtype=float), key=np.asarray(qk_norm["rms_key"], dtype=float))


def factors_of_layer(layer: AttentionLayer, *, fold_ln: bool) -> LayerFactors:
    """One layer's float64 factors with sqrt(s) in each, norms folded if ``fold_ln`` (the factors-file convention).

    W_Q (H, d_model, d_head), W_K (H or H_kv, d_model, d_head), b_Q, b_K (.., d_head) or None.
    """
    if fold_ln:
        layer = fold_norm(layer)
    root = np.sqrt(layer.scale)
    return LayerFactors(*(None if getattr(layer, name) is None else root * getattr(layer, name)
                          for name in ("W_Q", "W_K", "b_Q", "b_K")))


def factors_of_layers(layers: list[AttentionLayer], *, fold_ln: bool) -> Factors:
    """Stacked float64 factors with sqrt(s) in each, norms folded if ``fold_ln`` (the factors-file convention)."""
    per_layer = [factors_of_layer(layer, fold_ln=fold_ln) for layer in layers]
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


class LayerwiseFactors(FactorsShape):
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
        rms = None if self.norm_rms is None else layer_rms(self.norm_rms, index, raw)
        return factors_of_layer(linearise(raw, rms), fold_ln=self.fold_ln)


def model_factors(model: nn.Module, *, fold_ln: bool = True) -> Factors:
    """The query/key factors of a loaded model, as the extraction would write them but in float64."""
    return factors_of_layers(linearised_layers(model_layers(model)[1], None), fold_ln=fold_ln)
