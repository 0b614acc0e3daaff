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
from qkspectra.models.adapters.base import AttentionLayer
from qkspectra.models.adapters.bert import BertAdapter
from qkspectra.models.tensors import TensorSource


class AlbertAdapter(BertAdapter):
    """BERT's attention and post-norm layout, with the layer groups' shared weights."""

    model_type = "albert"

    def __init__(self, config: Any):
        super().__init__(config)
        if config.inner_group_num != 1:
            raise QkspectraError(
                f"albert config sets inner_group_num={config.inner_group_num}; only one layer per group is supported"
            )

    def anchor_tensor(self) -> str:
        return "encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight"

    def group_of(self, index: int) -> int:
        return int(index / (self.config.num_hidden_layers / self.config.num_hidden_groups))

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        group = "encoder.albert_layer_groups.{}.albert_layers.0"
        norm = None if index == 0 else f"{group.format(self.group_of(index - 1))}.full_layer_layer_norm"
        return self.self_attention(tensors, f"{group.format(self.group_of(index))}.attention", norm)
