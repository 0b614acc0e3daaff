"""DistilBERT: ``transformer.layer.{i}.attention.q_lin`` / ``k_lin``, post-norm.

Layer i reads the previous layer's ``output_layer_norm`` (the embeddings' LayerNorm for layer 0).
"""

from __future__ import annotations

from typing import Any

from qkspectra.models.adapters.base import AttentionAdapter, AttentionLayer, heads_from_bias, heads_from_linear
from qkspectra.models.adapters.bert import BertAdapter
from qkspectra.models.tensors import TensorSource


class DistilBertAdapter(BertAdapter):
    model_type = "distilbert"

    def __init__(self, config: Any):
        AttentionAdapter.__init__(self, config)
        self.num_layers = config.n_layers
        self.num_heads = self.num_kv_heads = config.n_heads
        self.d_model = config.dim
        self.d_head = config.dim // config.n_heads

    def anchor_tensor(self) -> str:
        return "transformer.layer.0.attention.q_lin.weight"

    def separate_projections(self) -> tuple[str, str, str] | None:
        return "transformer.layer.{}.attention", "q_lin", "k_lin"

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        H, d = self.num_heads, self.d_model
        attention = f"transformer.layer.{index}.attention"
        norm = "embeddings.LayerNorm" if index == 0 else f"transformer.layer.{index - 1}.output_layer_norm"
        return AttentionLayer(
            W_Q=heads_from_linear(self.read(tensors, f"{attention}.q_lin.weight", (d, d)), H),
            W_K=heads_from_linear(self.read(tensors, f"{attention}.k_lin.weight", (d, d)), H),
            b_Q=heads_from_bias(self.read_optional(tensors, f"{attention}.q_lin.bias", (d,)), H),
            b_K=heads_from_bias(self.read_optional(tensors, f"{attention}.k_lin.bias", (d,)), H),
            scale=self.d_head**-0.5,
            norm_gain=self.read(tensors, f"{norm}.weight", (d,)),
            norm_bias=self.read_optional(tensors, f"{norm}.bias", (d,)),
            rotary=None,
        )
