"""Forward passes of the functional test: the original model's record, then each rewritten model against it.

``ForwardPasses`` runs the model (its fast SDPA attention) on fixed batches of the corpus windows;
``reference`` keeps the original's queries, keys, entropies and loss, ``compare`` measures a
rewritten model against them (``Effects``). Freed memory is handed back after each layer and pass
(``release_freed_memory``). See docs/method/functional_test.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qkspectra.analysis.reconstruction.divergence import attention_change
from qkspectra.analysis.seed import TINY
from qkspectra.extract.capture import AttentionCall, AttentionCapture
from qkspectra.extract.entropy import forward_inputs, pad_windows, split_for_sliding_window, window_batches
from qkspectra.extract.streamed_entropy import call_entropy
from qkspectra.models.adapters import AttentionAdapter
from qkspectra.models.modules import attention_modules
from qkspectra.models.supported import ENCODER_MODEL_TYPES

LOSS_KINDS = {True: "next_token_cross_entropy", False: "final_hidden_cosine_distance"}


@dataclass
class Batch:
    """The original model's record of one batch of windows, what each rewritten model is compared with."""

    inputs: dict  # forward keyword arguments, (B, seq) tensors
    query_weight: torch.Tensor  # (B, query_pos) float64, 1 for real tokens
    first_key: torch.Tensor  # (B,) index of each window's first real token
    calls: list[AttentionCall]  # per layer, the original's queries and keys (the model's dtype)
    query_entropy: list[torch.Tensor]  # per layer (B, H, query_pos) float32, the original's entropy per query
    entropy: torch.Tensor  # (L, H) float64, sum over real queries of the original's entropy
    loss_sum: float  # original: summed next-token cross-entropy (causal) or 0
    hidden: torch.Tensor | None  # (B, seq, d_model) original final hidden states (encoders)


@dataclass(frozen=True)
class Effects:
    """One reconstruction against the original model."""

    delta_loss: float
    relative_delta_loss: float | None
    loss_kind: str
    per_head_kl: np.ndarray  # (L, H)
    entropy_shift: np.ndarray  # (L, H)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delta_loss": self.delta_loss,
            "loss_kind": self.loss_kind,
            "relative_delta_loss": self.relative_delta_loss,
            "mean_kl": float(self.per_head_kl.mean()),
            "per_head_kl": self.per_head_kl.tolist(),
            "mean_entropy_shift": float(self.entropy_shift.mean()),
        }


# float32 logits converted at a time when the loss is summed (16 MiB, and as much for the cross-entropy's
# log-softmax): small beside the model's own logits
LOSS_LOGITS_PER_BLOCK = 2**22
# Bytes of float32 logits over the vocabulary one batch of a causal LM may produce (the loss needs them
# all, and the cross-entropy a copy): a 262k-token vocabulary (Gemma 3) makes 1 GB per 1024 tokens.
LOGITS_MEMORY_BUDGET = 512 * 2**20


class ForwardPasses:
    """Runs the model (its fast attention) on fixed batches, handing over each layer's queries and keys."""

    def __init__(self, model: nn.Module, adapter: AttentionAdapter, windows: list[list[int]]):
        self.model = model
        self.adapter = adapter
        self.causal = model.get_output_embeddings() is not None and model.config.model_type not in ENCODER_MODEL_TYPES
        self.modules = attention_modules(model)
        self.device = next(model.parameters()).device
        pad_id = model.config.pad_token_id if isinstance(getattr(model.config, "pad_token_id", None), int) else 0
        H = self.num_heads = model.config.num_attention_heads
        batch_size = None
        if self.causal:  # windows per batch: at most LOGITS_MEMORY_BUDGET of logits
            vocab = model.get_output_embeddings().weight.shape[0]
            batch_size = max(1, LOGITS_MEMORY_BUDGET // (4 * vocab * max(map(len, windows))))
        self.batches = []
        batches = split_for_sliding_window(windows, window_batches(windows, H, batch_size),
                                           getattr(model.config, "sliding_window", None))
        for batch in batches:
            input_ids, attention_mask = pad_windows([windows[i] for i in batch], pad_id, "right")
            self.batches.append(forward_inputs(model, input_ids.to(self.device), attention_mask.to(self.device)))
        self.num_queries = sum(len(w) for w in windows)
        self.num_predicted = sum(len(w) - 1 for w in windows)

    def _forward(self, inputs: dict, on_call: Callable[[AttentionCall], None]) -> Any:
        """One forward pass; on_call(call) for each layer's attention call, in order."""
        with torch.inference_mode(), AttentionCapture(self.model, on_call, self.adapter) as capture:
            capture.begin(inputs["attention_mask"])
            output = self.model(**inputs)
            capture.end()
        return output

    def _loss_sum(self, inputs: dict, output: Any) -> float:
        """Summed next-token cross-entropy over pairs of real tokens, in float32, a block of positions at a
        time (the float32 logits and their log-softmax of one block, not of the whole batch)."""
        targets = inputs["input_ids"][:, 1:]  # (B, seq - 1)
        real = (inputs["attention_mask"][:, 1:] * inputs["attention_mask"][:, :-1]).bool()
        predicting = output.logits[:, :-1]  # (B, seq - 1, vocab) a view: position i predicts token i + 1
        vocab = predicting.shape[-1]
        step = max(1, LOSS_LOGITS_PER_BLOCK // (vocab * targets.shape[0]))
        total = 0.0
        for start in range(0, targets.shape[1], step):
            block = slice(start, start + step)
            logits = predicting[:, block].float()  # (B, step, vocab)
            losses = nn.functional.cross_entropy(logits.reshape(-1, vocab), targets[:, block].reshape(-1),
                                                 reduction="none").view(targets[:, block].shape)  # (B, step)
            total += float(losses[real[:, block]].double().sum())
        return total

    def reference(self, progress: Callable[[int], None]) -> list[Batch]:
        batches = []
        for inputs in self.batches:
            weight = inputs["attention_mask"].cpu().to(torch.float64)  # (B, query_pos), sums on the CPU
            first_key = inputs["attention_mask"].argmax(dim=-1)  # (B,)
            calls: list[AttentionCall] = []
            query_entropy: list[torch.Tensor] = []
            entropy = torch.zeros(self.adapter.num_layers, self.num_heads, dtype=torch.float64)

            def keep(call: AttentionCall) -> None:
                calls.append(call)
                h, _ = call_entropy(call, first_key)  # (B, H, query_pos)
                query_entropy.append(h)
                entropy[call.layer] = torch.einsum("bhq,bq->h", h.cpu().double(), weight)
                release_freed_memory()  # this layer's temporaries, freed across threads' arenas

            output = self._forward(inputs, keep)
            release_freed_memory()  # the forward's activations, before the loss's blocks of logits
            batches.append(Batch(
                inputs, weight, first_key, calls, query_entropy, entropy,
                self._loss_sum(inputs, output) if self.causal else 0.0,
                None if self.causal else output.last_hidden_state.float(),
            ))
            del output
            release_freed_memory()
            progress(int(inputs["attention_mask"].sum()))
        return batches

    def compare(self, reference: list[Batch], original_loss: float, progress: Callable[[int], None]) -> Effects:
        L, H = self.adapter.num_layers, self.num_heads
        kl_sum = torch.zeros(L, H, dtype=torch.float64)
        entropy_shift = torch.zeros(L, H, dtype=torch.float64)
        loss_sum = 0.0
        for batch in reference:

            def compare_layer(call: AttentionCall) -> None:
                original = batch.calls[call.layer]
                kl, entropy = attention_change(original, batch.query_entropy[call.layer], call)  # (B, H, query_pos)
                kl_sum[call.layer] += torch.einsum("bhq,bq->h", kl.cpu().double(), batch.query_weight)
                entropy_shift[call.layer] += torch.einsum("bhq,bq->h", entropy.cpu().double(), batch.query_weight)
                release_freed_memory()

            output = self._forward(batch.inputs, compare_layer)
            release_freed_memory()
            entropy_shift -= batch.entropy
            if self.causal:
                loss_sum += self._loss_sum(batch.inputs, output)
            else:
                cosine = nn.functional.cosine_similarity(output.last_hidden_state.float(), batch.hidden, dim=-1)
                loss_sum += float(((1 - cosine.double()) * batch.query_weight).sum())  # (B, seq) summed
            del output
            release_freed_memory()
            progress(int(batch.inputs["attention_mask"].sum()))
        if self.causal:
            delta = loss_sum / self.num_predicted - original_loss
            relative = delta / original_loss if original_loss > TINY else None
        else:
            delta, relative = loss_sum / self.num_queries, None
        return Effects(delta, relative, LOSS_KINDS[self.causal], (kl_sum / self.num_queries).numpy(),
                       (entropy_shift / self.num_queries).numpy())


def release_freed_memory() -> None:
    """Hand memory freed by numpy and torch back to the system (glibc's malloc_trim; elsewhere nothing).

    The fits and the layer-by-layer writes free many float64 arrays from several threads, and each
    forward pass its activations and logits; glibc keeps them in its arenas (0.6 GB of resident
    memory on a 0.85 GB model after the fits), which the next phase would find resident on top of its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
