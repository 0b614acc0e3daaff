"""Qwen2: the Llama layout with q/k biases (always present) and optional sliding windows.

Layers listed as ``"sliding_attention"`` in ``layer_types`` (set when ``use_sliding_window``)
see only the last ``sliding_window`` keys; a corpus pass with longer sequences is refused.
"""

from __future__ import annotations

from qkspectra.errors import QkspectraError, option
from qkspectra.models.adapters.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    model_type = "qwen2"

    def check_sequence_length(self, seq_len: int) -> None:
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None) or []
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        if window is not None and sliding and window < seq_len:
            raise QkspectraError(
                f"qwen2 config uses a sliding window of {window} tokens in layers {sliding[0]}..{sliding[-1]}, "
                f"shorter than the sequence length {seq_len}; use {option('seq_len')} {window} or less"
            )
