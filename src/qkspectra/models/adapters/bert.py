"""BERT (and its distillations such as MiniLM), RoBERTa, XLM-RoBERTa, ELECTRA: post-norm encoders, absolute positions.

The vector entering layer i's attention is the output of a LayerNorm: the embeddings'
LayerNorm for layer 0, the previous layer's output LayerNorm after that. Logit scale
1/sqrt(d_head). ELECTRA's layer 0 reads a projection of its embeddings when ``embedding_size``
differs from ``hidden_size``, so that layer is not folded.
"""

from __future__ import annotations

from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import AttentionAdapter, AttentionLayer, heads_from_bias, heads_from_linear
from qkspectra.models.tensors import TensorSource


class BertAdapter(AttentionAdapter):
    model_type = "bert"

    def __init__(self, config: Any):
        super().__init__(config)
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise QkspectraError(
                f"{self.model_type} config sets position_embedding_type={position_type!r}; relative position "
                "terms change the attention logit and only 'absolute' is supported"
            )
        self.num_layers = config.num_hidden_layers
        self.num_heads = self.num_kv_heads = config.num_attention_heads
        self.d_model = config.hidden_size
        self.d_head = config.hidden_size // config.num_attention_heads

    def anchor_tensor(self) -> str:
        return "encoder.layer.0.attention.self.query.weight"

    def separate_projections(self) -> tuple[str, str, str] | None:
        return "encoder.layer.{}.attention.self", "query", "key"

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        norm = "embeddings.LayerNorm" if index == 0 else f"encoder.layer.{index - 1}.output.LayerNorm"
        return self.self_attention(tensors, f"encoder.layer.{index}.attention.self", norm)

    def self_attention(self, tensors: TensorSource, attention: str, norm: str | None) -> AttentionLayer:
        """The layer with ``{attention}.query`` and ``.key`` linears, fed by the LayerNorm ``norm`` (None: not folded)."""
        H, d = self.num_heads, self.d_model
        return AttentionLayer(
            W_Q=heads_from_linear(self.read(tensors, f"{attention}.query.weight", (d, d)), H),
            W_K=heads_from_linear(self.read(tensors, f"{attention}.key.weight", (d, d)), H),
            b_Q=heads_from_bias(self.read_optional(tensors, f"{attention}.query.bias", (d,)), H),
            b_K=heads_from_bias(self.read_optional(tensors, f"{attention}.key.bias", (d,)), H),
            scale=self.d_head**-0.5,
            norm_gain=None if norm is None else self.read(tensors, f"{norm}.weight", (d,)),
            norm_bias=None if norm is None else self.read_optional(tensors, f"{norm}.bias", (d,)),
            rotary=None,
        )


class RobertaAdapter(BertAdapter):
    model_type = "roberta"


class XLMRobertaAdapter(BertAdapter):
    model_type = "xlm-roberta"


class ElectraAdapter(BertAdapter):
    model_type = "electra"

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        if index == 0 and self.config.embedding_size != self.config.hidden_size:  # read through embeddings_project
            return self.self_attention(tensors, "encoder.layer.0.attention.self", None)
        return super().layer(tensors, index)
