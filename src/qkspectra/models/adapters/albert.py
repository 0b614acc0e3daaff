"""ALBERT: BERT-like post-norm encoder whose layers share weights.

Layer i runs the shared layer group int(i / (num_hidden_layers / num_hidden_groups)), so
with one group (the usual case) every layer has the same W_Q, W_K and the same spectra.

Norm folding. Layers i >= 1 read the output LayerNorm of the group that ran before them
(``full_layer_layer_norm``), so its gain is folded as for BERT. Layer 0 does not read a
LayerNorm output: the embeddings (size ``embedding_size``) are normalised and then projected
by ``embedding_hidden_mapping_in`` to ``hidden_size``, x = P (g * e_hat + beta) + c. Folding g
there would mean folding the projection P too, giving a metric on the embedding_size space,
a different operator with a different shape. Layer 0 is therefore reported unfolded
(``norm_gain`` None), even when folding is on; the output records which layers were folded.
"""

from __future__ import annotations

from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import AttentionAdapter, AttentionLayer, heads_from_bias, heads_from_linear
from qkspectra.models.tensors import TensorSource


class AlbertAdapter(AttentionAdapter):
    model_type = "albert"

    def __init__(self, config: Any):
        super().__init__(config)
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise QkspectraError(
                f"albert config sets position_embedding_type={position_type!r}; relative position terms change "
                "the attention logit and only 'absolute' is supported"
            )
        if config.inner_group_num != 1:
            raise QkspectraError(
                f"albert config sets inner_group_num={config.inner_group_num}; only one layer per group is supported"
            )
        self.num_layers = config.num_hidden_layers
        self.num_heads = self.num_kv_heads = config.num_attention_heads
        self.d_model = config.hidden_size
        self.d_head = config.hidden_size // config.num_attention_heads

    def anchor_tensor(self) -> str:
        return "encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight"

    def group_of(self, index: int) -> int:
        return int(index / (self.config.num_hidden_layers / self.config.num_hidden_groups))

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        attention = f"encoder.albert_layer_groups.{self.group_of(index)}.albert_layers.0.attention"
        if index == 0:
            norm_gain = norm_bias = None
        else:
            norm = f"encoder.albert_layer_groups.{self.group_of(index - 1)}.albert_layers.0.full_layer_layer_norm"
            norm_gain = self.read(tensors, f"{norm}.weight")
            norm_bias = self.read_optional(tensors, f"{norm}.bias")
        return AttentionLayer(
            W_Q=heads_from_linear(self.read(tensors, f"{attention}.query.weight"), self.num_heads),
            W_K=heads_from_linear(self.read(tensors, f"{attention}.key.weight"), self.num_heads),
            b_Q=heads_from_bias(self.read_optional(tensors, f"{attention}.query.bias"), self.num_heads),
            b_K=heads_from_bias(self.read_optional(tensors, f"{attention}.key.bias"), self.num_heads),
            scale=self.d_head**-0.5,
            norm_gain=norm_gain,
            norm_bias=norm_bias,
            rotary=None,
        )
