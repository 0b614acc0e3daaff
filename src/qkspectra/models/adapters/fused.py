"""Fused query/key/value projections, which the generic reader cannot cut: GPT-BigCode, Falcon, Phi-3, Persimmon.

GPT-BigCode: ``c_attn`` (an nn.Linear) holds, with ``multi_query``, all query heads then one key
    head and one value head; without it, head by head [q, k, v] (as GPT-NeoX). Pre-norm ``ln_1``.
Falcon: ``query_key_value`` holds, in the new decoder architecture (grouped-query), per key/value
    group its query heads, then its key and value heads; with ``multi_query`` all query heads then
    one key and one value head; otherwise head by head [q, k, v]. ALiBi is refused (base config check).
Phi-3: ``qkv_proj`` holds all query heads, then the key heads, then the value heads.
Persimmon: ``query_key_value`` head by head [q, k, v] (as GPT-NeoX), per-head q/k LayerNorms
    (with bias) when ``qk_layernorm``, partial rotary.
Query/key weights are written back into the rows ``split`` reads; shared key/value heads are expanded
by rebuilding the fused projection with one key and value head per query head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import (
    AttentionAdapter,
    AttentionLayer,
    ParameterAccess,
    qk_norm_from_tensors,
    rotary_from_config,
)
from qkspectra.models.tensors import TensorSource

if TYPE_CHECKING:
    import torch
    from torch import nn


class FusedAdapter(AttentionAdapter):
    """Query and key heads cut out of one fused projection: subclasses give ``split`` and the tensor names."""

    fused: str  # fused projection's name, with {} for the layer index
    norm: str  # name of the norm feeding attention, with {}

    def anchor_tensor(self) -> str:
        return f"{self.fused.format(0)}.weight"

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fused rows (out_features, ...) -> query rows (H, d_head, ...), key rows (H_kv, d_head, ...)."""
        raise NotImplementedError

    def fused_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.d_head

    def scale(self) -> float:
        return self.d_head**-0.5

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        d = self.d_model
        q, k = self.split(self.read(tensors, f"{self.fused.format(index)}.weight", (self.fused_rows(), d)))
        bias = self.read_optional(tensors, f"{self.fused.format(index)}.bias", (self.fused_rows(),))
        b_Q, b_K = (None, None) if bias is None else self.split(bias)
        return AttentionLayer(
            W_Q=q.transpose(0, 2, 1), W_K=k.transpose(0, 2, 1), b_Q=b_Q, b_K=b_K, scale=self.scale(),
            norm_gain=self.read(tensors, f"{self.norm.format(index)}.weight", (d,)),
            norm_bias=self.read_optional(tensors, f"{self.norm.format(index)}.bias", (d,)),
            rotary=self.rotary,
        )

    def can_write_query_key(self) -> bool:
        return True

    def write_query_key(self, parameters: ParameterAccess, index: int, W_Q: np.ndarray, W_K: np.ndarray,
                        b_Q: np.ndarray | None, b_K: np.ndarray | None) -> None:
        """The query and key rows are those ``split`` cuts out, found by splitting the row numbers themselves.

        Needs one key head per query head (``expand_kv_heads_in_place`` first).
        """
        name = self.fused.format(index)
        query_rows, key_rows = self.split(np.arange(self.fused_rows()))  # (H, d_head), (H_kv, d_head) row numbers
        if key_rows.shape[0] != W_K.shape[0]:
            raise QkspectraError(f"cannot write {name}: {key_rows.shape[0]} key heads for {W_K.shape[0]} query heads "
                                 "(expand the key/value heads first)")
        weight = parameters.get(f"{name}.weight")  # (fused_rows, d_model)
        weight[query_rows], weight[key_rows] = W_Q.transpose(0, 2, 1), W_K.transpose(0, 2, 1)  # (H, d_head, d_model)
        parameters.set(f"{name}.weight", weight)
        if b_Q is not None or b_K is not None:
            bias = parameters.get(f"{name}.bias")  # (fused_rows,)
            if b_Q is not None:
                bias[query_rows] = b_Q  # (H, d_head)
            if b_K is not None:
                bias[key_rows] = b_K
            parameters.set(f"{name}.bias", bias)


def per_head_qkv(rows: np.ndarray, num_heads: int, d_head: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows laid out head by head [q, k, v]: (3 H d_head, ...) -> q, k each (H, d_head, ...)."""
    per_head = rows.reshape(num_heads, 3, d_head, *rows.shape[1:])
    return per_head[:, 0], per_head[:, 1]


def _regroup_rows(linear: nn.Linear, regroup: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace a linear map's weight (out, d_model) and bias (out,) by regroup(rows), rows on the first axis.

    The module keeps its class (Falcon's own ``FalconLinear``) and its hooks; only the rows change.
    """
    import torch
    from torch import nn

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
    import torch

    return torch.stack([q, k, v], dim=1).flatten(0, 2)


class GPTBigCodeAdapter(FusedAdapter):
    model_type = "gpt_bigcode"
    fused, norm = "h.{}.attn.c_attn", "h.{}.ln_1"

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_layers, self.num_heads, self.d_model = config.n_layer, config.n_head, config.n_embd
        self.num_kv_heads = 1 if config.multi_query else config.n_head
        self.d_head = config.n_embd // config.n_head

    def scale(self) -> float:
        return self.d_head**-0.5 if self.config.scale_attn_weights else 1.0

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, dh = self.num_heads, self.d_head
        if not self.config.multi_query:
            return per_head_qkv(rows, H, dh)
        return rows[:H * dh].reshape(H, dh, *rows.shape[1:]), rows[H * dh:(H + 1) * dh].reshape(1, dh, *rows.shape[1:])

    def expand_kv_heads_in_place(self, model: nn.Module) -> None:
        """Multi-query [all q, k, v] -> multi-head, rows head by head [q, k, v]."""
        from qkspectra.models.modules import attention_modules

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


class FalconAdapter(FusedAdapter):
    model_type = "falcon"
    fused = "h.{}.self_attention.query_key_value"

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_layers, self.num_heads, self.d_model = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
        self.d_head = config.hidden_size // config.num_attention_heads
        if config.new_decoder_architecture:
            self.num_kv_heads = config.num_kv_heads
        else:
            self.num_kv_heads = 1 if config.multi_query else config.num_attention_heads
        self.rotary = rotary_from_config(config, self.d_head)
        two_norms = config.new_decoder_architecture and config.parallel_attn and config.num_ln_in_parallel_attn in (None, 2)
        self.norm = "h.{}.ln_attn" if two_norms else "h.{}.input_layernorm"

    def describe_positions(self) -> str:
        return f"rotary on {self.rotary.rotary_dim} of {self.d_head} head dimensions"

    def fused_rows(self) -> int:
        if not self.config.new_decoder_architecture and not self.config.multi_query:
            return 3 * self.d_model
        return super().fused_rows()

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, H_kv, dh, rest = self.num_heads, self.num_kv_heads, self.d_head, rows.shape[1:]
        if self.config.new_decoder_architecture:
            groups = rows.reshape(H_kv, H // H_kv + 2, dh, *rest)  # per kv group: its query heads, key, value
            return groups[:, :-2].reshape(H, dh, *rest), groups[:, -2]
        if self.config.multi_query:
            heads = rows.reshape(H + 2, dh, *rest)
            return heads[:H], heads[H:H + 1]
        return per_head_qkv(rows, H, dh)

    def expand_kv_heads_in_place(self, model: nn.Module) -> None:
        """Grouped -> groups of one query head (rows head by head [q, k, v]); multi-query -> multi-head."""
        from qkspectra.models.modules import attention_modules

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


class Phi3Adapter(FusedAdapter):
    model_type = "phi3"
    fused, norm = "layers.{}.self_attn.qkv_proj", "layers.{}.input_layernorm"
    heads_tile_d_model = False

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_layers, self.num_heads, self.d_model = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = rotary_from_config(config, self.d_head)

    def describe_positions(self) -> str:
        return f"rotary on {self.rotary.rotary_dim} of {self.d_head} head dimensions"

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, H_kv, dh, rest = self.num_heads, self.num_kv_heads, self.d_head, rows.shape[1:]
        return rows[:H * dh].reshape(H, dh, *rest), rows[H * dh:(H + H_kv) * dh].reshape(H_kv, dh, *rest)

    def expand_kv_heads_in_place(self, model: nn.Module) -> None:
        """[all q, H_kv k, H_kv v] -> [all q, H k, H v]."""
        import torch

        from qkspectra.models.modules import attention_modules

        config = model.config
        H, H_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if H_kv == H:
            return
        for module in attention_modules(model):
            _regroup_rows(module.qkv_proj, lambda rows: torch.cat(_shared_kv_heads(rows, H, H_kv, False)).flatten(0, 1))
            module.num_key_value_heads, module.num_key_value_groups = H, 1
        config.num_key_value_heads = H

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        from dataclasses import replace

        return replace(super().layer(tensors, index), sliding_window=getattr(self.config, "sliding_window", None))


class PersimmonAdapter(FusedAdapter):
    model_type = "persimmon"
    handled_fields = ("qk_layernorm",)
    fused, norm = "layers.{}.self_attn.query_key_value", "layers.{}.input_layernorm"

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_layers, self.num_heads, self.d_model = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
        self.num_kv_heads = self.num_heads
        self.d_head = config.hidden_size // config.num_attention_heads
        self.rotary = rotary_from_config(config, self.d_head)

    def describe_positions(self) -> str:
        return f"rotary on {self.rotary.rotary_dim} of {self.d_head} head dimensions"

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return per_head_qkv(rows, self.num_heads, self.d_head)

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        from dataclasses import replace

        layer = super().layer(tensors, index)
        if not self.config.qk_layernorm:
            return layer
        norms = {}
        for side in ("q", "k"):
            name = f"layers.{index}.self_attn.{side}_layernorm"
            gain = self.read(tensors, f"{name}.weight", (self.d_head,))
            bias = self.read_optional(tensors, f"{name}.bias", (self.d_head,))
            norms[side] = qk_norm_from_tensors(gain, bias, self.num_heads, eps=self.config.layer_norm_eps, over="head",
                                               centred=True)
        return replace(layer, q_norm=norms["q"], k_norm=norms["k"])

