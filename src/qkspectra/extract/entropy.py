"""Mean attention entropy per layer and head over a corpus: the dynamic half of ``extract``.

Per (layer, head), token-weighted means over the real query positions of H_i, of H_i / log n_i
(n_i the keys query i sees), of the sink mass p_i0, of H_i by log2-spaced position bucket, and of
H'_i, the entropy over the visible keys other than the window's first (overall and by bucket, over
the queries that see at least two keys). The per-query statistics come from ``streamed_entropy``,
which never forms an attention map; this module batches the windows and sums in float64.

The method in full: docs/method/entropy.md.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qkspectra.errors import QkspectraError, option
from qkspectra.extract.corpus import Corpus
from qkspectra.extract.capture import AttentionCall, AttentionCapture, VisibleKeys, mask_positions
from qkspectra.extract.streamed_entropy import call_statistics

# Tokens per forward pass (bounds the activations, which grow linearly with it), and the bytes of
# boolean attention masks a batch may need (a padded batch's 4-D mask has B x seq^2 entries).
MAX_TOKENS_PER_BATCH = 16384
MASK_MEMORY_BUDGET = 256 * 2**20


@dataclass(frozen=True)
class EntropyStats:
    """Attention statistics per layer and head, each a float64 array of shape (L, H) unless said."""

    mean_entropy: np.ndarray  # (L, H) nats
    mean_normalized_entropy: np.ndarray  # (L, H) entropy / log(visible keys), queries seeing >= 2 keys
    mean_sink_mass: np.ndarray  # (L, H) probability on the window's first token
    entropy_by_position: np.ndarray  # (L, H, buckets) mean entropy of the queries at positions [2^b, 2^(b+1))
    log_keys_by_position: np.ndarray  # (L, buckets) mean log(number of visible keys) of those queries
    queries_by_position: np.ndarray  # (buckets,) int: real queries counted in each bucket
    # (L, H) nats: entropy over the visible keys other than the window's first, renormalised, over the
    # queries that see at least two keys (NaN for a layer without any)
    mean_entropy_without_first: np.ndarray
    entropy_without_first_by_position: np.ndarray  # (L, H, buckets) the same by bucket; NaN for a bucket without any
    num_windows: int
    num_tokens: int  # real query positions counted


def attention_entropy(model: nn.Module, corpus: Corpus, *, batch_size: int | None = None, progress: bool = True,
                      padding_side: Literal["left", "right"] = "right", adapter=None) -> EntropyStats:
    """Mean attention entropy, normalised entropy and sink mass per (layer, head) over the corpus windows.

    model:        a transformers model in any dtype and on any device; it runs with transformers' SDPA
                  attention during the pass (``AttentionCapture``), which hands over its own queries and keys
    batch_size:   windows per forward pass; None: as many as MAX_TOKENS_PER_BATCH and MASK_MEMORY_BUDGET allow
    padding_side: where padding goes in a batch; the results do not depend on it (padding is
                  masked out and positions are counted from the attention mask)
    adapter:      the model's, when the caller has it (see ``AttentionCapture``)
    """
    if batch_size is not None and batch_size < 1:
        raise QkspectraError(f"{option('batch_size')} must be at least 1, got {batch_size}")
    if not corpus.windows:
        raise QkspectraError(f"corpus {corpus.description} has no windows")
    longest = max(map(len, corpus.windows))
    accumulator = EntropyAccumulator(model.config.num_hidden_layers, model.config.num_attention_heads,
                                      num_buckets=position_bucket(longest) + 1)
    body = model.base_model  # the layers without a language-model head: no (B, seq, vocab) logits
    pad_id = model.config.pad_token_id if isinstance(getattr(model.config, "pad_token_id", None), int) else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), AttentionCapture(model, accumulator.add, adapter) as capture, \
                tqdm(total=corpus.num_tokens, unit="tok", desc="attention entropy", disable=not progress,
                     leave=False) as bar:
            batches = split_for_sliding_window(
                corpus.windows, window_batches(corpus.windows, model.config.num_attention_heads, batch_size),
                getattr(model.config, "sliding_window", None))
            for batch in batches:
                input_ids, attention_mask = pad_windows([corpus.windows[i] for i in batch], pad_id, padding_side)
                inputs = forward_inputs(body, input_ids.to(device), attention_mask.to(device))
                accumulator.begin_batch(inputs["attention_mask"])
                capture.begin(inputs["attention_mask"])
                body(**inputs)
                capture.end()
                accumulator.end_batch()
                bar.update(int(attention_mask.sum()))
    finally:
        model.train(was_training)
    return accumulator.stats(num_windows=len(corpus.windows))


def position_bucket(position: int) -> int:
    """The bucket of the query at 1-based position n: floor(log2 n) (1 -> 0, 2-3 -> 1, 4-7 -> 2, ...)."""
    return int(position).bit_length() - 1


def forward_inputs(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Keyword arguments for one forward pass over a padded batch (B, seq).

    Positions are counted from the attention mask (``mask_positions``), so left padding does not
    shift them; no key/value cache is built.
    """
    parameters = inspect.signature(body.forward).parameters
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in parameters:
        inputs["position_ids"] = mask_positions(attention_mask)
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return inputs


def window_batches(windows: list[list[int]], num_heads: int, batch_size: int | None) -> list[list[int]]:
    """Window indices grouped into batches, longest windows first (so little padding).

    With batch_size None, a batch grows while its tokens fit MAX_TOKENS_PER_BATCH and its 4-D boolean
    mask MASK_MEMORY_BUDGET; a window alone always makes a batch.
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
    return count * seq_len <= MAX_TOKENS_PER_BATCH and count * seq_len * seq_len <= MASK_MEMORY_BUDGET


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


class _MaskWeights(NamedTuple):
    """Per-query weights of one batch under one attention mask (float64, on the CPU)."""

    normalized: torch.Tensor  # (B, query_pos) 1 / log(n_i) for real queries seeing n_i >= 2 keys, else 0
    means: torch.Tensor  # (3, B, query_pos) of (entropy, sink mass, entropy without the first): real
    #                      queries, real queries, real queries seeing >= 2 keys
    by_position: torch.Tensor  # (2, B, query_pos, buckets) of (entropy, entropy without the first): one-hot buckets
    several_count: float  # the number of real queries seeing >= 2 keys
    several_by_bucket: torch.Tensor  # (buckets,) their number in each position bucket
    log_keys: torch.Tensor  # (buckets,) the sum of log(n_i) over the real queries of each position bucket


class EntropyAccumulator:
    """Float64 sums per (layer, head), fed by the attention calls of one batch at a time."""

    def __init__(self, num_layers: int, num_heads: int, num_buckets: int):
        L, H = num_layers, num_heads
        self.entropy_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.normalized_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.sink_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.without_first_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.bucket_sum = torch.zeros(L, H, num_buckets, dtype=torch.float64)  # (L, H, buckets)
        self.without_first_bucket_sum = torch.zeros(L, H, num_buckets, dtype=torch.float64)  # (L, H, buckets)
        self.bucket_count = torch.zeros(num_buckets, dtype=torch.float64)  # (buckets,)
        self.several_bucket_count = torch.zeros(L, num_buckets, dtype=torch.float64)  # (L, buckets)
        self.log_keys_sum = torch.zeros(L, num_buckets, dtype=torch.float64)  # (L, buckets)
        self.normalized_count = torch.zeros(L, dtype=torch.float64)  # (L,) queries seeing >= 2 keys
        self.num_tokens = 0

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """attention_mask: (B, seq) 1 for real tokens."""
        self.first_key = attention_mask.argmax(dim=-1)  # (B,) index of each window's first real token
        attention_mask = attention_mask.cpu()  # the sums are float64, on the CPU (MPS has no float64)
        self.query_weight = attention_mask.to(torch.float64)  # (B, query_pos)
        positions = attention_mask.cumsum(-1).clamp(min=1)  # (B, query_pos) 1-based position of real tokens
        bucket = torch.floor(torch.log2(positions.to(torch.float64))).long()  # (B, query_pos)
        self.bucket_weight = (torch.nn.functional.one_hot(bucket, self.bucket_count.shape[0]).to(torch.float64)
                              * self.query_weight[..., None])  # (B, query_pos, buckets)
        self.weights_by_mask: dict[tuple, tuple] = {}

    def end_batch(self) -> None:
        self.num_tokens += int(self.query_weight.sum())
        self.bucket_count += self.bucket_weight.sum(dim=(0, 1))
        self.weights_by_mask = {}

    def _mask_weights(self, visible: VisibleKeys) -> _MaskWeights:
        """The query weights under ``visible``'s mask, computed once per mask and batch."""
        cache_key = (id(visible.source), visible.causal)
        if cache_key not in self.weights_by_mask:
            num_visible = visible.count()  # (B|1, query_pos)
            several = self.query_weight * (num_visible > 1)  # (B, query_pos)
            several_by_position = self.bucket_weight * (num_visible > 1)[..., None]  # (B, query_pos, buckets)
            log_keys = torch.einsum("bq,bqn->n", num_visible.clamp(min=1).log().expand_as(self.query_weight),
                                    self.bucket_weight)  # (buckets,)
            weights = _MaskWeights(several / num_visible.clamp(min=2).log(),
                                   torch.stack([self.query_weight, self.query_weight, several]),
                                   torch.stack([self.bucket_weight, several_by_position]),
                                   float(several.sum()), several_by_position.sum(dim=(0, 1)), log_keys)
            # the mask is held so that its id stays unique while it is cached
            self.weights_by_mask[cache_key] = (visible.source, weights)
        return self.weights_by_mask[cache_key][1]

    def add(self, call: AttentionCall) -> None:
        """One layer's attention call of the current batch."""
        layer = call.layer
        if call.queries.shape[1] != self.entropy_sum.shape[1]:
            raise QkspectraError(f"layer {layer} has {call.queries.shape[1]} heads, expected {self.entropy_sum.shape[1]}")
        # (3, B, H, query_pos): entropy, sink mass, entropy without the first
        stacked = call_statistics(call, self.first_key).stacked.cpu().to(torch.float64)
        weights = self._mask_weights(call.visible)
        means = torch.einsum("sbhq,sbq->sh", stacked, weights.means)  # (3, H)
        by_position = torch.einsum("sbhq,sbqn->shn", stacked[0::2], weights.by_position)  # (2, H, buckets)
        self.entropy_sum[layer] += means[0]
        self.sink_sum[layer] += means[1]
        self.without_first_sum[layer] += means[2]
        self.normalized_sum[layer] += torch.einsum("bhq,bq->h", stacked[0], weights.normalized)
        self.bucket_sum[layer] += by_position[0]
        self.without_first_bucket_sum[layer] += by_position[1]
        self.normalized_count[layer] += weights.several_count
        self.several_bucket_count[layer] += weights.several_by_bucket
        self.log_keys_sum[layer] += weights.log_keys

    def stats(self, num_windows: int) -> EntropyStats:
        return EntropyStats(
            mean_entropy=(self.entropy_sum / self.num_tokens).numpy(),
            # NaN for a layer where no query sees two keys, and for a bucket without such queries (0 / 0)
            mean_normalized_entropy=(self.normalized_sum / self.normalized_count[:, None]).numpy(),
            mean_sink_mass=(self.sink_sum / self.num_tokens).numpy(),
            entropy_by_position=(self.bucket_sum / self.bucket_count).numpy(),
            log_keys_by_position=(self.log_keys_sum / self.bucket_count).numpy(),
            queries_by_position=self.bucket_count.numpy().astype(np.int64),
            mean_entropy_without_first=(self.without_first_sum / self.normalized_count[:, None]).numpy(),
            entropy_without_first_by_position=(self.without_first_bucket_sum
                                               / self.several_bucket_count[:, None, :]).numpy(),
            num_windows=num_windows,
            num_tokens=self.num_tokens,
        )
