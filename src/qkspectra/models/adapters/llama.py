"""Llama (and SmolLM2): pre-RMSNorm decoder, rotary embedding, grouped-query attention.

``q_proj`` has H*d_head outputs, ``k_proj`` H_kv*d_head; query head h reads key head
h // (H / H_kv), and W_K keeps one factor per key head. q/k biases exist when
``attention_bias`` is set and are kept. The norm feeding attention is ``input_layernorm``
(RMSNorm: a gain, no bias). Logit scale 1/sqrt(head_dim). Mistral and Qwen2 reuse this
layout and add their sliding-window checks.
"""

from __future__ import annotations

from typing import Any

from qkspectra.models.adapters.base import (
    AttentionAdapter,
    AttentionLayer,
    heads_from_bias,
    heads_from_linear,
    rotary_from_config,
)
from qkspectra.models.tensors import TensorSource


class LlamaAdapter(AttentionAdapter):
    model_type = "llama"
    heads_tile_d_model = False  # head_dim may be set on its own

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.d_model = config.hidden_size
        self.d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = rotary_from_config(config, self.d_head)

    def anchor_tensor(self) -> str:
        return "layers.0.self_attn.q_proj.weight"

    def separate_projections(self) -> tuple[str, str, str] | None:
        return "layers.{}.self_attn", "q_proj", "k_proj"

    def describe_positions(self) -> str:
        return f"rotary on {self.rotary.rotary_dim} of {self.d_head} head dimensions"

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        return self.attention_layer(tensors, index, f"layers.{index}.input_layernorm")

    def attention_layer(self, tensors: TensorSource, index: int, norm: str | None) -> AttentionLayer:
        """Layer ``index``'s q_proj / k_proj, fed by the RMSNorm ``norm`` (None: no norm feeds the block)."""
        attention = f"layers.{index}.self_attn"
        H, H_kv, dh, d = self.num_heads, self.num_kv_heads, self.d_head, self.d_model
        return AttentionLayer(
            W_Q=heads_from_linear(self.read(tensors, f"{attention}.q_proj.weight", (H * dh, d)), H),
            W_K=heads_from_linear(self.read(tensors, f"{attention}.k_proj.weight", (H_kv * dh, d)), H_kv),
            b_Q=heads_from_bias(self.read_optional(tensors, f"{attention}.q_proj.bias", (H * dh,)), H),
            b_K=heads_from_bias(self.read_optional(tensors, f"{attention}.k_proj.bias", (H_kv * dh,)), H_kv),
            scale=self.d_head**-0.5,
            norm_gain=None if norm is None else self.read(tensors, f"{norm}.weight", (d,)),
            norm_bias=None,
            rotary=self.rotary,
        )
