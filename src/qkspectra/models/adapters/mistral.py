"""Mistral: the Llama layout (grouped-query attention, no q/k biases) with a sliding window.

With ``sliding_window`` set, a query sees only the last ``sliding_window`` keys. That leaves the
metric alone but changes the attention maps once sequences are longer than the window, so a
corpus pass with longer windows is refused.
"""

from __future__ import annotations

from qkspectra.errors import QkspectraError, option
from qkspectra.models.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    model_type = "mistral"

    def check_sequence_length(self, seq_len: int) -> None:
        window = getattr(self.config, "sliding_window", None)
        if window is not None and window < seq_len:
            raise QkspectraError(
                f"mistral config sets sliding_window={window}, shorter than the sequence length {seq_len}; "
                f"use {option('seq_len')} {window} or less"
            )
