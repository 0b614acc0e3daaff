"""OLMo 2: queries and keys RMS-normalised over the whole projection, in a post-norm block.

The q/k norm gains are (H * d_head,) (``qk_norm_over = "projection"``); the block is post-norm, so no
norm feeds attention and nothing is folded. Otherwise read as Qwen3 (``qwen3``).
"""

from __future__ import annotations

from qkspectra.models.adapters.qwen3 import Qwen3Adapter


class Olmo2Adapter(Qwen3Adapter):
    model_type = "olmo2"
    qk_norm_over = "projection"

    def input_norm(self, index: int) -> str | None:
        return None  # post-norm block: attention reads the residual stream itself

    def sliding_window(self, index: int) -> int | None:
        return None
