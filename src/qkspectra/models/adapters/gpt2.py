"""GPT-2: pre-norm decoder, learned absolute positions, fused ``c_attn`` Conv1D.

``c_attn.weight`` has shape (d_model, 3*d_model) and computes x @ W + b, with the query,
key and value blocks side by side and heads contiguous inside each. The logit scale is
1/sqrt(d_head) if ``scale_attn_weights`` (else 1), divided by (layer + 1) if
``scale_attn_by_inverse_layer_idx``. ``reorder_and_upcast_attn`` only changes the order and
precision of the same product, so it is accepted. The norm feeding attention is ``ln_1``.
Query/key weights are written back into the query and key blocks of ``c_attn``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkspectra.models.adapters.base import AttentionAdapter, AttentionLayer, ParameterAccess
from qkspectra.models.tensors import TensorSource


class GPT2Adapter(AttentionAdapter):
    model_type = "gpt2"

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_layers = config.n_layer
        self.num_heads = self.num_kv_heads = config.n_head
        self.d_model = config.n_embd
        self.d_head = config.n_embd // config.n_head

    def anchor_tensor(self) -> str:
        return "h.0.attn.c_attn.weight"

    def scale(self, index: int) -> float:
        scale = self.d_head**-0.5 if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            scale /= index + 1
        return scale

    def _split(self, block: np.ndarray) -> np.ndarray:
        """(d_model, d_model) Conv1D block -> (H, d_model, d_head)."""
        return block.reshape(self.d_model, self.num_heads, self.d_head).transpose(1, 0, 2)

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        d = self.d_model
        weight = self.read(tensors, f"h.{index}.attn.c_attn.weight", (d, 3 * d))  # Conv1D: x @ weight
        bias = self.read_optional(tensors, f"h.{index}.attn.c_attn.bias", (3 * d,))
        return AttentionLayer(
            W_Q=self._split(weight[:, :d]),
            W_K=self._split(weight[:, d : 2 * d]),
            b_Q=None if bias is None else bias[:d].reshape(self.num_heads, self.d_head),
            b_K=None if bias is None else bias[d : 2 * d].reshape(self.num_heads, self.d_head),
            scale=self.scale(index),
            norm_gain=self.read(tensors, f"h.{index}.ln_1.weight", (d,)),
            norm_bias=self.read_optional(tensors, f"h.{index}.ln_1.bias", (d,)),
            rotary=None,
        )

    def can_write_query_key(self) -> bool:
        return True

    def write_query_key(self, parameters: ParameterAccess, index: int, W_Q: np.ndarray, W_K: np.ndarray,
                        b_Q: np.ndarray | None, b_K: np.ndarray | None) -> None:
        name = f"h.{index}.attn.c_attn"
        d = W_Q.shape[1]
        weight = parameters.get(f"{name}.weight")  # (d_model, 3 d_model): x @ W
        weight[:, :d] = W_Q.transpose(1, 0, 2).reshape(d, -1)
        weight[:, d : 2 * d] = W_K.transpose(1, 0, 2).reshape(d, -1)
        parameters.set(f"{name}.weight", weight)
        if b_Q is not None:
            bias = parameters.get(f"{name}.bias")  # (3 d_model,)
            bias[:d], bias[d : 2 * d] = b_Q.reshape(-1), b_K.reshape(-1)
            parameters.set(f"{name}.bias", bias)
