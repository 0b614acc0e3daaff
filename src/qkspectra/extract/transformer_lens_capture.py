"""Attention entropy of a TransformerLens model from its own queries and keys, never its attention maps.

The model runs on the corpus windows (right-padded batches, no attention mask: under causal
attention a real query never sees the padding after its window), its queries and keys taken at
``blocks.{l}.attn.hook_q`` / ``hook_k`` (B, pos, H or H_kv, d_head), or after rotary positions at
``hook_rot_q`` / ``hook_rot_k`` where the attention fires them; TransformerLens's native attention
rotates inside its module, so its queries and keys are turned by that module's own rotary function.
A grouped-query HookedTransformer set to ``ungroup_grouped_query_attention`` fires its key heads
repeated for each query head; one of each group is taken.
Each layer's pair is handed to the same streamed kernel and accumulator as a transformers model's
(``extract.entropy``) as soon as the next layer starts, so one layer's queries and keys are held at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from qkspectra.errors import QkspectraError, option
from qkspectra.extract.capture import AttentionCall, VisibleKeys
from qkspectra.extract.corpus import Corpus
from qkspectra.extract.entropy import EntropyAccumulator, EntropyStats, pad_windows, position_bucket, window_batches
from qkspectra.models.transformer_lens import TransformerLensAdapter, native_rope

HOOKS = ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k")


class _LayerQueue:
    """The hooked tensors of the layer running now; a layer is handed on when the next one starts, or at the end."""

    def __init__(self, model: Any, adapter: TransformerLensAdapter, on_call):
        self.model, self.adapter, self.on_call = model, adapter, on_call
        self.rotary = model.cfg.positional_embedding_type == "rotary"
        self.layer: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def hook(self, layer: int, name: str):
        def keep(tensor: torch.Tensor, hook: Any = None) -> None:
            if self.layer != layer:
                self.flush()
                self.layer = layer
            self.tensors[name] = tensor.detach()

        return keep

    def flush(self) -> None:
        if self.layer is None:
            return
        layer, tensors = self.layer, self.tensors
        self.layer, self.tensors = None, {}
        self.on_call(self._call(layer, tensors))

    def _call(self, layer: int, tensors: dict[str, torch.Tensor]) -> AttentionCall:
        where = f"{type(self.model).__name__} block {layer}"
        if self.rotary and "hook_rot_q" in tensors and "hook_rot_k" in tensors:
            queries, keys = tensors["hook_rot_q"], tensors["hook_rot_k"]
        elif "hook_q" in tensors and "hook_k" in tensors:
            queries, keys = tensors["hook_q"], tensors["hook_k"]
        else:
            raise QkspectraError(f"{where}: hook_q and hook_k did not fire; cannot take its queries and keys")
        if queries.ndim != 4 or keys.ndim != 4:
            raise QkspectraError(f"{where}: queries of shape {tuple(queries.shape)}, expected (batch, pos, heads, d_head)")
        queries, keys = queries.transpose(1, 2), keys.transpose(1, 2)  # (B, H, pos, d_head), (B, H_kv, pos, d_head)
        if self.rotary and "hook_rot_q" not in tensors:
            rope = native_rope(self.model.blocks[layer].attn)
            if rope is None:
                raise QkspectraError(f"{where}: a rotary attention that fires no hook_rot_q/hook_rot_k is not supported")
            queries, keys = rope(queries, keys)
        H, H_kv = self.adapter.num_heads, self.adapter.num_kv_heads
        if keys.shape[1] == H != H_kv and getattr(self.model.cfg, "ungroup_grouped_query_attention", False):
            keys = keys[:, ::H // H_kv]  # an ungrouped HookedTransformer fires its key heads repeated
        if queries.shape[1] != H or keys.shape[1] != H_kv:
            raise QkspectraError(f"{where}: {queries.shape[1]} query and {keys.shape[1]} key heads, expected {H} and {H_kv}")
        visible = VisibleKeys(None, True, queries.shape[-2], keys.shape[-2], queries.device)
        return AttentionCall(layer, queries, keys, self.adapter.scale(layer), visible)


def transformer_lens_entropy(model: Any, corpus: Corpus, adapter: TransformerLensAdapter, *,
                             batch_size: int | None = None, progress: bool = True) -> EntropyStats:
    """Mean attention entropy, normalised entropy and sink mass per (layer, head) of a TransformerLens model.

    The model runs where it is, in its own dtype, in evaluation mode and without gradients
    (its modes are put back after); the statistics are those of ``extract.entropy.attention_entropy``.
    """
    if batch_size is not None and batch_size < 1:
        raise QkspectraError(f"{option('batch_size')} must be at least 1, got {batch_size}")
    if not corpus.windows:
        raise QkspectraError(f"corpus {corpus.description} has no windows")
    L, H = adapter.num_layers, adapter.num_heads
    accumulator = EntropyAccumulator(L, H, num_buckets=position_bucket(max(map(len, corpus.windows))) + 1)
    hooks, queue = layer_hooks(model, adapter, accumulator.add)
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0
    device = next(model.parameters()).device
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks), \
                tqdm(total=corpus.num_tokens, unit="tok", desc="attention entropy", disable=not progress,
                     leave=False) as bar:
            for batch in window_batches(corpus.windows, H, batch_size):
                input_ids, attention_mask = pad_windows([corpus.windows[i] for i in batch], pad_id, "right")
                accumulator.begin_batch(attention_mask.to(device))
                model(input_ids.to(device), return_type=None)
                queue.flush()
                accumulator.end_batch()
                bar.update(int(attention_mask.sum()))
    finally:
        for module, training in modes:
            module.training = training
    return accumulator.stats(num_windows=len(corpus.windows))


def layer_hooks(model: Any, adapter: TransformerLensAdapter, on_call) -> tuple[list[tuple[str, Any]], _LayerQueue]:
    """(forward hooks for ``model.hooks``, the queue): on_call(AttentionCall) receives each layer's queries and
    keys (key/value heads as the model holds them) while the model runs; ``queue.flush()`` after a forward hands on the last."""
    queue = _LayerQueue(model, adapter, on_call)
    hooks = [(f"blocks.{layer}.attn.{name}", queue.hook(layer, name)) for layer in range(adapter.num_layers)
             for name in HOOKS if name.startswith("hook_rot") <= _has_hook(model, layer, name)]
    return hooks, queue


def _has_hook(model: Any, layer: int, name: str) -> bool:
    return isinstance(getattr(model.blocks[layer].attn, name, None), torch.nn.Module)
