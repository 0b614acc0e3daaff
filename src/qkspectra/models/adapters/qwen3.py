"""Qwen3: a Llama-layout decoder whose queries and keys are normalised per head after projection.

Per-head RMSNorm ``self_attn.q_norm`` / ``k_norm`` (d_head gains shared by the heads), pre-norm
``input_layernorm``, optional sliding-window layers (``layer_types``). The logit is
scale * n_Q(q) . n_K(k) (see ``base.QKNorm``); the static pass turns such heads into their
linearised metric (``extract.linearised_norm``). OLMo 2 and Gemma 3 derive from this adapter.
"""

from __future__ import annotations

from dataclasses import replace

from qkspectra.models.adapters.base import AttentionLayer, QKNorm, qk_norm_from_tensors
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
