"""Every attention call's queries and keys, as the model itself forms them, during its fast forward pass.

Models whose attention goes through transformers' attention interface (the model class says
``_supports_attention_backend``) are switched, inside ``AttentionCapture``, to an attention
function registered here under ``CAPTURE``: it runs transformers' own SDPA attention unchanged
(the model's outputs are those of ``attn_implementation="sdpa"``) and hands the call's queries,
keys, logit scale and mask to a callback. Nothing is recomputed: the queries and keys are the
model's own, after its projections, biases, query/key norms and rotary positions. Models that
call attention their own way (Falcon, GPT-Neo) get a forward hook on each attention module instead,
which rebuilds the queries and keys from the block's input with the adapter's pieces
(``queries_and_keys``, proven equal to the model's own by the adapters' reproduction tests) and
adds the layer's sliding window to the mask the module is handed (GPT-Neo applies its own inside).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from qkspectra.errors import QkspectraError
from qkspectra.models.modules import attention_modules

CAPTURE = "qkspectra_capture"
_RECORD = "_qkspectra_record"  # attribute set on each attention module while a capture is active


def within_window(mask: torch.Tensor | None, causal: bool, num_queries: int, num_keys: int, window: int,
                  device: torch.device) -> torch.Tensor:
    """(B|1, 1, query_pos, key_pos) bool: the model's mask (as ``VisibleKeys`` reads it; None: every key, or
    the causal ones) and the layer's sliding window, a query seeing only keys fewer than ``window`` places
    from it (``attention.visible_keys``), counted in the padded sequence as the model's own window is."""
    query = torch.arange(num_queries, device=device)[:, None] + num_keys - num_queries  # (query_pos, 1)
    distance = query - torch.arange(num_keys, device=device)[None, :]  # (query_pos, key_pos)
    band = (distance >= 0) & (distance < window) if causal else distance.abs() < window
    if mask is None:
        return band[None, None]
    mask = mask[..., -num_queries:, :num_keys]
    return (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2) & band


@dataclass(frozen=True)
class AttentionCall:
    """One layer's attention call: logit_ij = scale * queries[i] . keys[j] over the visible keys."""

    layer: int
    queries: torch.Tensor  # (B, H, query_pos, d_head), the model's dtype
    keys: torch.Tensor  # (B, H_kv, key_pos, d_head); query head h reads key head h // (H / H_kv)
    scale: float
    visible: VisibleKeys

    def scaled_queries(self) -> torch.Tensor:
        """(B, H, query_pos, d_head) float32 queries with the scale folded in."""
        return self.queries.to(torch.float32) * self.scale

    def keys_per_query_head(self) -> torch.Tensor:
        """(B, H, key_pos, d_head) float32 keys, a shared key head repeated for the query heads reading it."""
        keys = self.keys.to(torch.float32)
        group = self.queries.shape[1] // keys.shape[1]
        return keys if group == 1 else keys.repeat_interleave(group, dim=1)


class VisibleKeys:
    """Which keys each query sees under the mask the model hands one attention call.

    mask: the model's 4-D mask (B|1, 1, query_pos, key_pos), boolean (True: visible) or additive
    float (visible where above half the dtype's minimum), or None: every key, or with ``causal``
    keys j <= i + (key_pos - query_pos).
    """

    def __init__(self, mask: torch.Tensor | None, causal: bool, num_queries: int, num_keys: int,
                 device: torch.device):
        self.device = device
        self.source = mask  # the model's own mask object (its identity keys per-batch caches)
        self.causal = mask is None and causal
        self.offset = num_keys - num_queries
        self.num_keys = num_keys
        if mask is not None:
            mask = mask[..., -num_queries:, :num_keys]
            mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            if mask.shape[1] != 1:
                raise QkspectraError(f"attention mask of shape {tuple(mask.shape)}: expected one mask for all heads")
            mask = mask.expand(mask.shape[0], 1, num_queries, num_keys)  # a view: a padding-only mask has one row
        self.mask = mask  # (B|1, 1, query_pos, key_pos) bool or None

    def block(self, q_start: int, q_stop: int, k_start: int, k_stop: int) -> torch.Tensor | bool:
        """True if every query of the block sees every key of it, False if none sees any, else the
        (B|1, 1, 1, bq, bk) boolean mask (broadcast over kv heads and their query groups)."""
        if self.mask is None:
            if not self.causal or k_stop - 1 <= q_start + self.offset:
                return True
            if k_start > q_stop - 1 + self.offset:
                return False
            query = torch.arange(q_start, q_stop, device=self.device).unsqueeze(-1) + self.offset  # (bq, 1)
            return (torch.arange(k_start, k_stop, device=self.device) <= query)[None, None, None]
        block = self.mask[..., q_start:q_stop, k_start:k_stop]  # (B|1, 1, bq, bk)
        if bool(block.all()):
            return True
        if not bool(block.any()):
            return False
        return block.unsqueeze(2)

    def count(self) -> torch.Tensor:
        """(B|1, query_pos) float64 on the CPU (devices such as MPS have no float64): the keys each query sees."""
        if self.mask is not None:
            return self.mask.sum(dim=-1)[:, 0].cpu().to(torch.float64)
        num_queries = self.num_keys - self.offset
        if not self.causal:
            return torch.full((1, num_queries), float(self.num_keys), dtype=torch.float64)
        count = torch.arange(num_queries, dtype=torch.float64) + self.offset + 1
        return count.clamp(max=self.num_keys)[None]

    def sees(self, key: torch.Tensor) -> torch.Tensor:
        """(B, query_pos) bool: whether each query of window b sees its key ``key[b]`` (key: (B,) int64)."""
        num_queries = self.num_keys - self.offset
        if self.mask is not None:
            rows = self.mask[:, 0].expand(key.shape[0], -1, -1)  # (B, query_pos, key_pos)
            return rows[torch.arange(key.shape[0], device=key.device), :, key]
        query = torch.arange(num_queries, device=key.device) + self.offset
        if not self.causal:
            return torch.ones(key.shape[0], num_queries, dtype=torch.bool, device=key.device)
        return key[:, None] <= query[None, :]


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, seq) int64: each token's position counted from its window's first real token (padding: 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def layer_as_torch(layer, dtype: torch.dtype, device: torch.device):
    """An adapter's ``AttentionLayer`` with every array field as a torch tensor of ``dtype`` on ``device``."""
    return replace(layer, **{
        field.name: torch.as_tensor(getattr(layer, field.name), dtype=dtype, device=device)
        for field in fields(layer) if isinstance(getattr(layer, field.name), np.ndarray)
    })


def _capturing_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, unchanged, that also hands its inputs to the module's active capture."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    record = getattr(module, _RECORD, None)
    if record is not None:
        for term in ("position_bias", "s_aux", "sinks", "softcap"):
            if kwargs.get(term) is not None:  # the adapters refuse such models; never a quiet wrong entropy
                raise QkspectraError(f"{type(module).__name__} adds {term} to its logits, which is not modelled")
        is_causal = kwargs.get("is_causal")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        scaling = kwargs.get("scaling")
        record(query, key, query.shape[-1] ** -0.5 if scaling is None else float(scaling), attention_mask, causal)
    return output


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if CAPTURE not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(CAPTURE, _capturing_attention)
        AttentionMaskInterface.register(CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])


class AttentionCapture:
    """Calls ``on_call(AttentionCall)`` for every attention call of the model's forward passes.

    with AttentionCapture(model, on_call) as capture:
        for batch in batches:
            capture.begin(attention_mask)  # (B, seq) of the forward pass about to run
            model(...)
            capture.end()                  # checks that every layer ran attention once

    On leaving, the model's attention implementation and modules are as they were.
    """

    def __init__(self, model: nn.Module, on_call: Callable[[AttentionCall], None], adapter=None):
        """adapter: the model's (``adapter_for(model.config)`` when None), used only by models that call
        attention their own way."""
        from qkspectra.models.adapters import adapter_for

        self.model = model
        self.on_call = on_call
        self.modules = attention_modules(model)
        self.num_layers = model.config.num_hidden_layers
        self.through_interface = bool(getattr(model, "_supports_attention_backend", False))
        self.adapter = None if self.through_interface else adapter or adapter_for(model.config)
        self.positions: torch.Tensor | None = None
        self.calls = 0

    def __enter__(self) -> AttentionCapture:
        if self.through_interface:
            _register()
            self.previous = self.model.config._attn_implementation
            self.model.set_attn_implementation(CAPTURE)
            for module in self.modules:
                setattr(module, _RECORD, self._record_for(module))
        else:
            from qkspectra.models.tensors import StateDictSource

            tensors = StateDictSource(self.model.state_dict())
            device = next(self.model.parameters()).device
            self.layers = [layer_as_torch(self.adapter.layer(tensors, index), torch.float32, device)
                           for index in range(self.adapter.num_layers)]
            self.handles = [module.register_forward_hook(self._hook_for(module), with_kwargs=True)
                            for module in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        if self.through_interface:
            try:
                self.model.set_attn_implementation(self.previous)
            finally:
                for module in self.modules:
                    if hasattr(module, _RECORD):
                        delattr(module, _RECORD)
        else:
            for handle in self.handles:
                handle.remove()

    def begin(self, attention_mask: torch.Tensor) -> None:
        self.positions = mask_positions(attention_mask)
        self.calls = 0

    def end(self) -> None:
        if self.calls != self.num_layers:
            raise QkspectraError(f"{type(self.model).__name__}: attention ran {self.calls} times in one forward pass, "
                                 f"expected once per layer ({self.num_layers})")

    def _next_layer(self) -> int:
        layer = self.calls
        self.calls += 1
        if layer >= self.num_layers:
            raise QkspectraError(f"attention ran more than once per layer ({self.num_layers} layers)")
        return layer

    def _record_for(self, module: nn.Module) -> Callable:
        def record(query, key, scale, mask, causal) -> None:
            visible = VisibleKeys(mask, causal, query.shape[-2], key.shape[-2], query.device)
            self.on_call(AttentionCall(self._next_layer(), query, key, scale, visible))

        return record

    def _hook_for(self, module: nn.Module) -> Callable:
        from qkspectra.models.adapters.attention import queries_and_keys

        signature = inspect.signature(module.forward)

        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            arguments = signature.bind(*args, **kwargs).arguments
            arguments = {**arguments.pop("kwargs", {}), **arguments}
            layer = self._next_layer()
            hidden = arguments["hidden_states"]
            queries, keys = queries_and_keys(self.layers[layer], hidden.to(torch.float32), self.positions)
            causal, mask = getattr(module, "is_causal", False), arguments.get("attention_mask")
            if self.layers[layer].sliding_window is not None:  # the module may apply it beyond its mask (GPT-Neo)
                mask = within_window(mask, causal, queries.shape[-2], keys.shape[-2],
                                     self.layers[layer].sliding_window, hidden.device)
            visible = VisibleKeys(mask, causal, queries.shape[-2], keys.shape[-2], hidden.device)
            self.on_call(AttentionCall(layer, queries, keys, 1.0, visible))

        return record
