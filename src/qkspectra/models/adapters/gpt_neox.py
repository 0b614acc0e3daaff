"""GPT-NeoX / Pythia: pre-norm decoder, partial rotary embedding, per-head interleaved qkv.

``attention.query_key_value`` is an nn.Linear with 3*d_model outputs laid out head by head:
for head h, rows [h*3*d_head, (h+1)*3*d_head) hold its query, key and value blocks in that
order. Rotary acts on the first ``partial_rotary_factor * d_head`` coordinates (``rotary_pct``
in older configs). The norm feeding attention is ``input_layernorm`` whether or not the
residual is parallel. Logit scale 1/sqrt(d_head).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkspectra.models.adapters.base import AttentionAdapter, AttentionLayer, ParameterAccess, rotary_from_config
from qkspectra.models.tensors import TensorSource


class GPTNeoXAdapter(AttentionAdapter):
    model_type = "gpt_neox"

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_layers = config.num_hidden_layers
        self.num_heads = self.num_kv_heads = config.num_attention_heads
        self.d_model = config.hidden_size
        self.d_head = config.hidden_size // config.num_attention_heads
        self.rotary = rotary_from_config(config, self.d_head)

    def anchor_tensor(self) -> str:
        return "layers.0.attention.query_key_value.weight"

    def describe_positions(self) -> str:
        return f"rotary on {self.rotary.rotary_dim} of {self.d_head} head dimensions"

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        H, dh, d = self.num_heads, self.d_head, self.d_model
        weight = self.read(tensors, f"layers.{index}.attention.query_key_value.weight", (3 * d, d))
        per_head = weight.reshape(H, 3, dh, d).transpose(1, 0, 3, 2)  # (3, H, d_model, d_head)
        bias = self.read_optional(tensors, f"layers.{index}.attention.query_key_value.bias", (3 * d,))
        bias_per_head = None if bias is None else bias.reshape(H, 3, dh)  # (H, 3, d_head)
        return AttentionLayer(
            W_Q=per_head[0],
            W_K=per_head[1],
            b_Q=None if bias_per_head is None else bias_per_head[:, 0],
            b_K=None if bias_per_head is None else bias_per_head[:, 1],
            scale=dh**-0.5,
            norm_gain=self.read(tensors, f"layers.{index}.input_layernorm.weight", (d,)),
            norm_bias=self.read_optional(tensors, f"layers.{index}.input_layernorm.bias", (d,)),
            rotary=self.rotary,
        )

    def can_write_query_key(self) -> bool:
        return True

    def write_query_key(self, parameters: ParameterAccess, index: int, W_Q: np.ndarray, W_K: np.ndarray,
                        b_Q: np.ndarray | None, b_K: np.ndarray | None) -> None:
        name = f"layers.{index}.attention.query_key_value"
        H, d_model, d_head = W_Q.shape
        weight = parameters.get(f"{name}.weight").reshape(H, 3, d_head, d_model)  # rows head by head: q, k, v
        weight[:, 0], weight[:, 1] = W_Q.transpose(0, 2, 1), W_K.transpose(0, 2, 1)
        parameters.set(f"{name}.weight", weight.reshape(3 * H * d_head, d_model))
        if b_Q is not None:
            bias = parameters.get(f"{name}.bias").reshape(H, 3, d_head)
            bias[:, 0], bias[:, 1] = b_Q, b_K
            parameters.set(f"{name}.bias", bias.reshape(-1))
