"""Forward passes of the functional test for a TransformerLens model (``models.transformer_lens``).

The same record and comparison as a transformers model's (``passes.ForwardPasses``: queries, keys,
entropies and next-token loss of the original, then each rewritten model against them); only the run
differs: right-padded batches without an attention mask (under causal attention a real query never
sees the padding after its window), each layer's queries and keys taken at the attention's hooks
(``extract.transformer_lens_capture.layer_hooks``), the logits from ``model(input_ids)``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from qkspectra.analysis.reconstruction.passes import LOGITS_MEMORY_BUDGET, ForwardPasses
from qkspectra.extract.capture import AttentionCall
from qkspectra.extract.entropy import pad_windows, window_batches
from qkspectra.extract.transformer_lens_capture import layer_hooks
from qkspectra.models.transformer_lens import TransformerLensAdapter


class TransformerLensPasses(ForwardPasses):
    """``ForwardPasses`` over a TransformerLens model (causal: ``check_supported`` refuses the rest)."""

    def __init__(self, model: Any, adapter: TransformerLensAdapter, windows: list[list[int]]):
        self.model = model
        self.adapter = adapter
        self.causal = True
        self.num_heads = adapter.num_heads
        self.device = next(model.parameters()).device
        pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        pad_id = pad_id if isinstance(pad_id, int) else 0
        vocab = max(getattr(model.cfg, "d_vocab_out", -1), model.cfg.d_vocab)
        batch_size = max(1, LOGITS_MEMORY_BUDGET // (4 * vocab * max(map(len, windows))))  # logits within budget
        self.batches = []
        for batch in window_batches(windows, self.num_heads, batch_size):
            input_ids, attention_mask = pad_windows([windows[i] for i in batch], pad_id, "right")  # (B, seq) each
            self.batches.append({"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)})
        self.num_queries = sum(len(w) for w in windows)
        self.num_predicted = sum(len(w) - 1 for w in windows)

    def _forward(self, inputs: dict, on_call: Callable[[AttentionCall], None]) -> Any:
        """One forward pass; on_call(call) for each layer's attention call, in order; its logits (B, seq, vocab)."""
        hooks, queue = layer_hooks(self.model, self.adapter, on_call)
        with torch.inference_mode(), self.model.hooks(fwd_hooks=hooks):
            logits = self.model(inputs["input_ids"], return_type="logits")
            queue.flush()
        return SimpleNamespace(logits=logits)
