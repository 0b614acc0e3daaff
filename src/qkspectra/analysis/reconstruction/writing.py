"""Writing reconstruction targets into a loaded model as new query/key weights and biases.

A target's factors (X, Y) carry sqrt(s) and live in the geometry's space (norm gains folded or not,
q/k norms linearised); ``LayerWriter`` takes them back to the weights the model applies, keeps the
head's own bias terms by least squares, and hands them to the adapter, which knows where its
architecture keeps them (``AttentionAdapter.write_query_key``). See docs/method/functional_test.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qkspectra.analysis.reconstruction.layers import layer_rms
from qkspectra.errors import QkspectraError
from qkspectra.extract.linearised_norm import delinearise, isotropic_layer_rms, linearise, NormRMS
from qkspectra.models.adapters import AttentionAdapter, AttentionLayer, adapter_for
from qkspectra.models.adapters.base import fold_norm
from qkspectra.models.tensors import StateDictSource


class ModelParameters:
    """Read and overwrite a model's parameters by their checkpoint names (prefix found by the adapter).

    Copy on write: the first write to a parameter puts a copy of it (same dtype, device and
    ``requires_grad``) in its module's place and writes there; the original tensor is never changed,
    so whoever holds it (the caller of a model in memory, ``in_memory.rewritten_in_place``) keeps it
    bit for bit. Only the parameters written are copied.
    """

    def __init__(self, model: nn.Module, adapter: AttentionAdapter):
        from qkspectra.models.transformer_lens import is_transformer_lens

        self.model = model
        # a TransformerLens bridge names its parameters after the model it wraps: written by its own module paths
        self.parameters = dict(nn.Module.named_parameters(model, remove_duplicate=False) if is_transformer_lens(model)
                               else model.named_parameters())
        self.adapter = adapter
        self.tensors = StateDictSource(self.parameters)
        self.copied: set[str] = set()

    def get(self, name: str) -> np.ndarray:
        return self.tensors.get(self.adapter.prefixed(self.tensors, name))

    def set(self, name: str, value: np.ndarray) -> None:
        full = self.adapter.prefixed(self.tensors, name)
        parameter = self.parameters[full]
        if parameter.shape != value.shape:
            raise QkspectraError(f"cannot write {name}: shape {value.shape}, the model has {tuple(parameter.shape)}")
        if full not in self.copied:
            parameter = self._own_copy(full, parameter)
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def _own_copy(self, full: str, original: nn.Parameter) -> nn.Parameter:
        """A copy of ``original`` put in its place in the model (its module's parameter ``full``)."""
        module_name, _, leaf = full.rpartition(".")
        copy = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
        setattr(self.model.get_submodule(module_name), leaf, copy)
        self.parameters[full] = copy
        self.copied.add(full)
        return copy


def expand_kv_heads_in_place(model: nn.Module, adapter: AttentionAdapter | None = None) -> AttentionAdapter:
    """Give every query head its own key/value head (repeat_kv done in the weights); same function.

    The model's adapter (``adapter_for(model.config)`` when None) says how (``AttentionAdapter.expand_kv_heads_in_place``:
    separate k_proj/v_proj repeated head by head, fused projections rebuilt); the modules' head counts and the
    config follow. Returns the adapter of the expanded model: ``adapter`` itself when nothing was shared, the
    one the adapter returns (a TransformerLens model's), else that of the new config.
    """
    adapter = adapter_for(model.config) if adapter is None else adapter
    if adapter.num_kv_heads == adapter.num_heads:
        return adapter
    expanded = adapter.expand_kv_heads_in_place(model)
    return expanded if expanded is not None else adapter_for(model.config)  # one key head per query head


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
        if not adapter.can_write_query_key():
            raise QkspectraError(f"the functional test cannot write weights of {adapter.model_type} models")
        self.adapter = adapter
        self.params = ModelParameters(model, adapter)
        self.fold_ln = fold_ln
        self.norm_rms = norm_rms

    def write(self, index: int, raw: AttentionLayer, X: np.ndarray, Y: np.ndarray) -> None:
        """raw: the layer as stored; X, Y: (H, d_model, d_head) its target factors."""
        norm_rms = self.norm_rms
        flat = linearise(raw, None if norm_rms is None else layer_rms(norm_rms, index, raw))
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
            rms = layer_rms(norm_rms, index, raw) if norm_rms is not None else isotropic_layer_rms(raw)
            W_Q, b_Q = delinearise(W_Q, b_Q, raw.q_norm, rms[0], raw.W_Q, raw.b_Q)
            W_K, b_K = delinearise(W_K, b_K, raw.k_norm, rms[1], raw.W_K, raw.b_K)
        if raw.b_Q is None:
            b_Q = None
        if raw.b_K is None:
            b_K = None
        self.adapter.write_query_key(self.params, index, W_Q, W_K, b_Q, b_K)
