"""ALBERT: BERT-like post-norm encoder whose layers share weights.

Layer i runs the shared layer group int(i / (num_hidden_layers / num_hidden_groups)), so
with one group (the usual case) every layer has the same W_Q, W_K and the same spectra.

Norm folding is not applied to ALBERT, in any layer. Layers i >= 1 read the output LayerNorm
of the group that ran before them (``full_layer_layer_norm``), but layer 0 does not read a
LayerNorm output: the embeddings (size ``embedding_size``) are normalised and then projected by
``embedding_hidden_mapping_in`` to ``hidden_size``, x = P (g * e_hat + beta) + c, and folding g
there would mean folding P too (a metric on another space, of another shape). Folding layers
i >= 1 alone would make layer 0 differ from the layers that share its weights for a reason that
has nothing to do with depth (where a norm sits), which is exactly what a depth-wise analysis
must not see. So every layer reports ``norm_gain`` None: with one group, every layer has the
same spectra whether folding is asked for or not, and the output records no layer as folded.
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

    def separate_projections(self) -> tuple[str, str, str] | None:
        return None  # the shared weights cannot hold per-layer query/key weights

    def group_of(self, index: int) -> int:
        return int(index / (self.config.num_hidden_layers / self.config.num_hidden_groups))

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        group = "encoder.albert_layer_groups.{}.albert_layers.0"
        return self.self_attention(tensors, f"{group.format(self.group_of(index))}.attention", None)  # never folded
