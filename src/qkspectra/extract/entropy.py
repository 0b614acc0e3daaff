"""Mean attention entropy per layer and head over a corpus: the dynamic half of ``extract``.

For each real (non-padding) query position i of every window, and each layer and head, the
model's own eager attention probabilities p_ij give

    H_i = -sum_j p_ij log p_ij   (nats, 0 log 0 = 0)

over every key j the model lets query i see, special tokens included (the BERTology
convention): keys 0..i for causal models, all keys for encoders, minus padding (and minus
whatever else the model's own attention mask hides, e.g. outside a sliding window). The
visible keys are read from the 4-D mask the model hands its attention modules.

Reported per (layer, head), each a token-weighted mean over all real query positions:
- ``mean_entropy``: H_i;
- ``mean_normalized_entropy``: H_i / log(n_i), n_i the number of keys query i sees (1 for
  uniform attention, 0 for one-hot); queries that see a single key are left out of this mean;
- ``mean_sink_mass``: p_i0, the probability on the window's first token (BOS / [CLS]).

The probabilities are captured with forward hooks on the modules whose output transformers
itself records for ``output_attentions`` (the model's ``_can_record_outputs["attentions"]``),
reduced to these per-query numbers inside the hook and dropped at once: only one layer's
attention map exists at any time. ``output_attentions`` is never set (in transformers 5 it makes
the model keep every layer's map). Sums are accumulated in float64.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qkspectra.errors import QkspectraError, option
from qkspectra.extract.corpus import Corpus

# Transient memory the attention maps of one batch may take, and a cap on tokens per batch
# (which bounds the other activations).
ATTENTION_MEMORY_BUDGET = 512 * 2**20
MAX_TOKENS_PER_BATCH = 16384
# float32 bytes per attention-map entry alive at the peak of one eager attention call: two maps
# while the mask is added or the softmax is taken, plus a third for margin.
_BYTES_PER_MAP_ENTRY = 12
# Attention-map entries reduced per step by entropy_from_probs (16 MiB of float32): no copy of a
# whole map is made, and the steps are few (each torch operation has a fixed cost, which grows
# when other processes compete for the cores).
_ENTRIES_PER_STEP = 2**22


@dataclass(frozen=True)
class EntropyStats:
    """Attention statistics per layer and head, each a float64 array of shape (L, H)."""

    mean_entropy: np.ndarray  # (L, H) nats
    mean_normalized_entropy: np.ndarray  # (L, H) entropy / log(visible keys), queries seeing >= 2 keys
    mean_sink_mass: np.ndarray  # (L, H) probability on the window's first token
    num_windows: int
    num_tokens: int  # real query positions counted


def entropy_from_probs(probs: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Shannon entropy in nats of each query's attention distribution, 0 log 0 = 0.

    probs:    (B, H, query_pos, key_pos) attention probabilities
    key_mask: bool, broadcastable to probs, True where the query sees the key; None: all keys
    returns   (B, H, query_pos)

    Works through a block of query rows at a time, so the temporaries stay small (no copy of the
    map); not differentiable (it writes into a buffer).
    """
    entropy = probs.new_empty(probs.shape[:-1])  # (B, H, query_pos)
    rows_per_step = max(1, _ENTRIES_PER_STEP // max(1, probs[..., 0, :].numel()))
    buffer = probs.new_empty(probs[..., :rows_per_step, :].shape)  # (B, H, rows, key_pos), reused
    tiny = torch.finfo(probs.dtype).tiny
    for start in range(0, probs.shape[-2], rows_per_step):
        rows = slice(start, start + rows_per_step)
        chunk = probs[..., rows, :]  # (B, H, rows, key_pos)
        terms = buffer[..., :chunk.shape[-2], :]
        torch.clamp_min(chunk, tiny, out=terms).log_().mul_(chunk)  # p log p, exactly 0 at p = 0
        if key_mask is not None:
            terms.masked_fill_(~key_mask[..., rows, :], 0.0)
        entropy[..., rows] = terms.sum(dim=-1)
    return entropy.neg_()


def attention_entropy(model: nn.Module, corpus: Corpus, *, batch_size: int | None = None, progress: bool = True,
                      padding_side: Literal["left", "right"] = "right") -> EntropyStats:
    """Mean attention entropy, normalised entropy and sink mass per (layer, head) over the corpus windows.

    model:        a transformers model loaded with attn_implementation="eager"
    batch_size:   windows per forward pass; None: as many as fit ATTENTION_MEMORY_BUDGET
    padding_side: where padding goes in a batch; the results do not depend on it (padding is
                  masked out and positions are counted from the attention mask)
    """
    if getattr(model.config, "_attn_implementation", None) != "eager":
        raise QkspectraError("attention entropy needs the model loaded with attn_implementation='eager'")
    if batch_size is not None and batch_size < 1:
        raise QkspectraError(f"{option('batch_size')} must be at least 1, got {batch_size}")
    if not corpus.windows:
        raise QkspectraError(f"corpus {corpus.description} has no windows")
    accumulator = _EntropyAccumulator(num_layers=model.config.num_hidden_layers)
    handles = [module.register_forward_hook(accumulator.hook(module), with_kwargs=True)
               for module in attention_modules(model)]
    body = model.base_model  # the layers without a language-model head: no (B, seq, vocab) logits
    pad_id = model.config.pad_token_id if isinstance(getattr(model.config, "pad_token_id", None), int) else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=corpus.num_tokens, unit="tok", desc="attention entropy",
                                          disable=not progress, leave=False) as bar:
            batches = split_for_sliding_window(
                corpus.windows, window_batches(corpus.windows, model.config.num_attention_heads, batch_size),
                getattr(model.config, "sliding_window", None))
            for batch in batches:
                input_ids, attention_mask = pad_windows([corpus.windows[i] for i in batch], pad_id, padding_side)
                inputs = forward_inputs(body, input_ids.to(device), attention_mask.to(device))
                accumulator.begin_batch(inputs["attention_mask"])
                body(**inputs)
                accumulator.end_batch(type(model).__name__)
                bar.update(int(attention_mask.sum()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return accumulator.stats(num_windows=len(corpus.windows))


def forward_inputs(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Keyword arguments for one forward pass over a padded batch (B, seq).

    Positions are counted from the attention mask, so left padding does not shift them; no
    key/value cache is built.
    """
    parameters = inspect.signature(body.forward).parameters
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in parameters:
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return inputs


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules whose output transformers records as ``attentions``.

    Usually one per layer; a model that shares its layers (ALBERT) has one module run once per layer.
    """
    specs = getattr(model, "_can_record_outputs", None) or {}
    specs = specs.get("attentions")
    if specs is None:
        raise QkspectraError(f"{type(model).__name__} does not say which modules compute its attention maps")
    specs = specs if isinstance(specs, list) else [specs]
    modules = [module for name, module in model.named_modules()
               if any(_matches(spec, name, module) for spec in specs)]
    if not modules:
        raise QkspectraError(f"{type(model).__name__}: found no attention modules")
    return modules


def _matches(spec: object, name: str, module: nn.Module) -> bool:
    """Whether a transformers output-recording spec (a class, a class-name suffix or an OutputRecorder) selects module."""
    if isinstance(spec, type):
        return isinstance(module, spec)
    if isinstance(spec, str):
        return name.endswith(spec)
    if getattr(spec, "index", 1) != 1:
        return False
    target, class_name, layer_name = (getattr(spec, key, None) for key in ("target_class", "class_name", "layer_name"))
    selected = (target is not None and isinstance(module, target)) or (class_name is not None and name.endswith(class_name))
    if selected and layer_name is not None:
        return f".{layer_name.strip('.')}." in f".{name}."
    return selected


def window_batches(windows: list[list[int]], num_heads: int, batch_size: int | None) -> list[list[int]]:
    """Window indices grouped into batches, longest windows first (so little padding).

    With batch_size None, a batch grows while its attention maps fit ATTENTION_MEMORY_BUDGET and its
    tokens MAX_TOKENS_PER_BATCH; a window alone always makes a batch.
    """
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    batches: list[list[int]] = []
    for index in order:
        if batches and _fits(len(batches[-1]) + 1, len(windows[batches[-1][0]]), num_heads, batch_size):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def split_for_sliding_window(windows: list[list[int]], batches: list[list[int]],
                             sliding_window: int | None) -> list[list[int]]:
    """Batches cut so that no window is padded by ``sliding_window`` tokens or more.

    A padding query that far past its window's end sees only padding keys; eager attention gives it
    NaN probabilities, which reach every real token of the next layer through its values (0 * NaN).
    batches: window indices, longest first (``window_batches``).
    """
    if not isinstance(sliding_window, int):
        return batches
    cut: list[list[int]] = []
    for batch in batches:
        group = [batch[0]]
        for index in batch[1:]:
            if len(windows[group[0]]) - len(windows[index]) >= sliding_window:
                cut.append(group)
                group = [index]
            else:
                group.append(index)
        cut.append(group)
    return cut


def _fits(count: int, seq_len: int, num_heads: int, batch_size: int | None) -> bool:
    if batch_size is not None:
        return count <= batch_size
    map_bytes = count * num_heads * seq_len * seq_len * _BYTES_PER_MAP_ENTRY
    return map_bytes <= ATTENTION_MEMORY_BUDGET and count * seq_len <= MAX_TOKENS_PER_BATCH


def pad_windows(windows: list[list[int]], pad_id: int,
                padding_side: Literal["left", "right"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, seq) int64, padded to the longest window."""
    longest = max(map(len, windows))
    input_ids = torch.full((len(windows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), longest), dtype=torch.long)
    for row, window in enumerate(windows):
        span = slice(0, len(window)) if padding_side == "right" else slice(longest - len(window), longest)
        input_ids[row, span] = torch.tensor(window, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


@dataclass
class _VisibleKeys:
    """What a query sees under one 4-D attention mask, for the current batch."""

    key_mask: torch.Tensor | None  # (B|1, 1, query_pos, key_pos) bool, None: every key
    normalized_weight: torch.Tensor  # (B, query_pos) float64: 1 / log(n_i) for real queries seeing n_i >= 2 keys
    num_normalized: float  # number of such queries


class _EntropyAccumulator:
    """Float64 sums per (layer, head), fed by the attention hooks one batch at a time.

    The layer of a hook call is its rank among the attention calls of the current forward pass.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.entropy_sum: torch.Tensor | None = None  # (L, H) float64
        self.normalized_sum: torch.Tensor | None = None  # (L, H)
        self.sink_sum: torch.Tensor | None = None  # (L, H)
        self.normalized_count = torch.zeros(num_layers, dtype=torch.float64)  # (L,)
        self.num_tokens = 0

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """attention_mask: (B, seq) 1 for real tokens."""
        self.query_weight = attention_mask.to(torch.float64)  # (B, query_pos)
        self.first_key = attention_mask.argmax(dim=-1)  # (B,) index of each window's first real token
        self.visible_by_mask: dict[int, tuple[torch.Tensor | None, _VisibleKeys]] = {}
        self.calls = 0

    def end_batch(self, model_name: str) -> None:
        if self.calls != self.num_layers:
            raise QkspectraError(f"{model_name}: attention ran {self.calls} times in one forward pass, "
                                 f"expected once per layer ({self.num_layers})")
        self.num_tokens += int(self.query_weight.sum())
        self.visible_by_mask = {}

    def hook(self, module: nn.Module) -> Callable:
        signature = inspect.signature(module.forward)

        def record(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise QkspectraError(f"{type(module).__name__} returned no attention probabilities; "
                                     "load the model with attn_implementation='eager'")
            mask = signature.bind(*args, **kwargs).arguments.get("attention_mask")
            self.add(probs, self._visible_keys(mask, probs, getattr(module, "is_causal", False)))

        return record

    def _visible_keys(self, mask: torch.Tensor | None, probs: torch.Tensor, is_causal: bool) -> _VisibleKeys:
        """mask: the model's 4-D mask (B|1, 1, query_pos, key_pos), additive float or bool, or None."""
        cache_key = id(mask)
        if cache_key in self.visible_by_mask:
            return self.visible_by_mask[cache_key][1]
        num_queries, num_keys = probs.shape[-2:]
        if mask is None and is_causal:
            key_mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=probs.device).tril(num_keys - num_queries)
            key_mask = key_mask[None, None]
        elif mask is None:
            key_mask = None
        elif mask.dtype == torch.bool:
            key_mask = mask[..., :num_keys]
        else:
            key_mask = mask[..., :num_keys] > torch.finfo(mask.dtype).min / 2
        if key_mask is None:
            num_visible = self.query_weight.new_full(self.query_weight.shape, float(num_keys))
        else:
            num_visible = key_mask.sum(dim=-1, dtype=torch.float64).amax(dim=1)  # (B|1, query_pos)
        real_and_several = self.query_weight * (num_visible > 1)  # (B, query_pos)
        normalized_weight = real_and_several / num_visible.clamp(min=2).log()
        visible = _VisibleKeys(key_mask, normalized_weight, float(real_and_several.sum()))
        self.visible_by_mask[cache_key] = (mask, visible)  # the mask is held so its id stays unique
        return visible

    def add(self, probs: torch.Tensor, visible: _VisibleKeys) -> None:
        """probs: (B, H, query_pos, key_pos) the next layer's attention probabilities."""
        layer = self.calls
        self.calls += 1
        if layer >= self.num_layers:
            raise QkspectraError(f"attention ran more than once per layer ({self.num_layers} layers)")
        if probs.dtype not in (torch.float32, torch.float64):
            probs = probs.float()
        # Keys the model hides already have probability exactly 0 (its softmax adds the dtype's
        # minimum or -inf to their scores), so they add nothing and need no mask here.
        entropy = entropy_from_probs(probs, None).to(torch.float64)  # (B, H, query_pos)
        batch = torch.arange(probs.shape[0], device=probs.device)
        sink = probs[batch, :, :, self.first_key].to(torch.float64)  # (B, H, query_pos)
        if self.entropy_sum is None:
            shape = (self.num_layers, probs.shape[1])
            self.entropy_sum, self.normalized_sum, self.sink_sum = (torch.zeros(shape, dtype=torch.float64)
                                                                    for _ in range(3))
        if probs.shape[1] != self.entropy_sum.shape[1]:
            raise QkspectraError(f"layer {layer} has {probs.shape[1]} heads, layer 0 {self.entropy_sum.shape[1]}")
        self.entropy_sum[layer] += torch.einsum("bhq,bq->h", entropy, self.query_weight).cpu()
        self.normalized_sum[layer] += torch.einsum("bhq,bq->h", entropy, visible.normalized_weight).cpu()
        self.sink_sum[layer] += torch.einsum("bhq,bq->h", sink, self.query_weight).cpu()
        self.normalized_count[layer] += visible.num_normalized

    def stats(self, num_windows: int) -> EntropyStats:
        return EntropyStats(
            mean_entropy=(self.entropy_sum / self.num_tokens).numpy(),
            # NaN for a layer where no query sees two keys
            mean_normalized_entropy=(self.normalized_sum / self.normalized_count[:, None]).numpy(),
            mean_sink_mass=(self.sink_sum / self.num_tokens).numpy(),
            num_windows=num_windows,
            num_tokens=self.num_tokens,
        )
