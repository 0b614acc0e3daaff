"""Llama-layout decoders whose queries and keys are normalised after projection.

Qwen3:  per-head RMSNorm ``self_attn.q_norm`` / ``k_norm`` (d_head gains shared by the heads),
        pre-norm ``input_layernorm``, optional sliding-window layers (``layer_types``).
OLMo 2: RMSNorm over the whole query (key) projection, gains (H * d_head,); the block is
        post-norm, so no norm feeds attention and nothing is folded.
Gemma 3 (``gemma3_text``): per-head RMSNorm, every RMSNorm gain stored as w and applied as 1 + w,
        logit scale ``query_pre_attn_scalar`` ** -0.5, sliding-window layers alternating with
        global ones (``layer_types``), each kind with its own rotary base.
The logit is scale * n_Q(q) . n_K(k) (see ``base.QKNorm``); the static pass turns such heads into
their linearised metric (``extract.qk_norm``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import AttentionLayer, QKNorm, qk_norm_from_tensors, rotary_from_config
from qkspectra.models.adapters.llama import LlamaAdapter
from qkspectra.models.tensors import TensorSource


class Qwen3Adapter(LlamaAdapter):
    model_type = "qwen3"
    qk_norm_over = "head"
    gain_offset = 0.0  # stored gain w is applied as gain_offset + w

    def layer_type(self, index: int) -> str | None:
        layer_types = getattr(self.config, "layer_types", None)
        return layer_types[index] if layer_types else None

    def sliding_window(self, index: int) -> int | None:
        return self.config.sliding_window if self.layer_type(index) == "sliding_attention" else None

    def qk_norm(self, tensors: TensorSource, name: str, num_heads: int) -> QKNorm:
        width = self.d_head if self.qk_norm_over == "head" else num_heads * self.d_head
        gain = self.read(tensors, f"{name}.weight", (width,)) + self.gain_offset
        return qk_norm_from_tensors(gain, None, num_heads, eps=self.config.rms_norm_eps, over=self.qk_norm_over)

    def input_norm(self, index: int) -> str | None:
        return f"layers.{index}.input_layernorm"

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        layer = self.attention_layer(tensors, index, self.input_norm(index))
        attention = f"layers.{index}.self_attn"
        return replace(
            layer,
            q_norm=self.qk_norm(tensors, f"{attention}.q_norm", self.num_heads),
            k_norm=self.qk_norm(tensors, f"{attention}.k_norm", self.num_kv_heads),
            sliding_window=self.sliding_window(index),
        )


class Olmo2Adapter(Qwen3Adapter):
    model_type = "olmo2"
    qk_norm_over = "projection"

    def input_norm(self, index: int) -> str | None:
        return None  # post-norm block: attention reads the residual stream itself

    def sliding_window(self, index: int) -> int | None:
        return None


class Gemma3TextAdapter(Qwen3Adapter):
    model_type = "gemma3_text"
    handled_fields = ("query_pre_attn_scalar",)
    gain_offset = 1.0

    def __init__(self, config: Any):
        super().__init__(config)
        if getattr(config, "use_bidirectional_attention", False):
            raise QkspectraError("gemma3_text config sets use_bidirectional_attention=True, whose sliding windows "
                                 "are not modelled by qkspectra")
        self.rotary_by_type = {kind: rotary_from_config(config, self.d_head, kind) for kind in set(config.layer_types)}
        self.rotary = None  # one per layer type (see describe_positions)

    def describe_positions(self) -> str:
        kinds = ", ".join(f"{kind}: base {rotary.base:g}" for kind, rotary in sorted(self.rotary_by_type.items()))
        return f"rotary on {self.d_head} of {self.d_head} head dimensions ({kinds})"

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        layer = super().layer(tensors, index)
        return replace(layer, norm_gain=layer.norm_gain + 1.0, scale=float(self.config.query_pre_attn_scalar) ** -0.5,
                       rotary=self.rotary_by_type[self.layer_type(index)])
