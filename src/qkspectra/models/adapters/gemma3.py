"""Gemma 3 (``gemma3_text``): per-head q/k RMSNorm, gains applied as 1 + w, two rotary bases.

Every RMSNorm gain is stored as w and applied as 1 + w; the logit scale is
``query_pre_attn_scalar`` ** -0.5; sliding-window layers alternate with global ones
(``layer_types``), each kind with its own rotary base. Otherwise read as Qwen3 (``qwen3``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import AttentionLayer, rotary_from_config
from qkspectra.models.adapters.qwen3 import Qwen3Adapter
from qkspectra.models.tensors import TensorSource


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
