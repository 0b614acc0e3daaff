"""Mean attention entropy per layer and head over a corpus: the dynamic half of ``extract``.

Per (layer, head), token-weighted means over the real query positions of H_i, of H_i / log n_i
(n_i the keys query i sees), of the sink mass p_i0, and of H_i by log2-spaced position bucket.
No attention map is formed: H_i = lse_i - s q_i . kbar_i, with lse_i and kbar_i = sum_j p_ij k_j
from torch's fused attention kernel on the CPU (``flash_entropy``) or from blocks of logits with
an online log-sum-exp elsewhere (``logit_entropy``); queries and keys are reduced in float32.

The method in full: docs/method/entropy.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qkspectra.errors import QkspectraError, option
from qkspectra.extract.corpus import Corpus
from qkspectra.extract.capture import AttentionCall, AttentionCapture, VisibleKeys, mask_positions

# Tokens per forward pass (bounds the activations, which grow linearly with it), and the bytes of
# boolean attention masks a batch may need (a padded batch's 4-D mask has B x seq^2 entries).
MAX_TOKENS_PER_BATCH = 16384
MASK_MEMORY_BUDGET = 256 * 2**20
# Logits per block of logit_entropy (16 MiB of float32): large enough that the per-block costs of
# the torch calls vanish, small enough to stay in a few caches' worth of memory.
LOGITS_PER_BLOCK = 2**22
KEYS_PER_BLOCK = 1024
# Attention-map entries reduced per step by entropy_from_probs (16 MiB of float32).
_ENTRIES_PER_STEP = 2**22
# Hidden logits are filled with HIDDEN_LOGIT, below the running log-sum-exp's start START_LOGIT:
# exp(HIDDEN_LOGIT - x) is exactly 0 for every x >= START_LOGIT, and every term stays finite (no inf - inf,
# no 0 * inf).
START_LOGIT = -1e30
HIDDEN_LOGIT = -2e30


@dataclass(frozen=True)
class EntropyStats:
    """Attention statistics per layer and head, each a float64 array of shape (L, H) unless said."""

    mean_entropy: np.ndarray  # (L, H) nats
    mean_normalized_entropy: np.ndarray  # (L, H) entropy / log(visible keys), queries seeing >= 2 keys
    mean_sink_mass: np.ndarray  # (L, H) probability on the window's first token
    entropy_by_position: np.ndarray  # (L, H, buckets) mean entropy of the queries at positions [2^b, 2^(b+1))
    log_keys_by_position: np.ndarray  # (L, buckets) mean log(number of visible keys) of those queries
    queries_by_position: np.ndarray  # (buckets,) int: real queries counted in each bucket
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


def logit_blocks(num_queries: int, num_keys: int, visible: VisibleKeys, logits_per_query: int
                 ) -> Iterator[tuple[slice, Iterator[tuple[slice, torch.Tensor | bool]]]]:
    """The blocks of logits an online log-sum-exp goes through: (rows, key blocks) per block of query rows,
    each key block (cols, mask) with ``mask`` as ``VisibleKeys.block`` gives it; key blocks no query sees are skipped.

    Key blocks of KEYS_PER_BLOCK keys; query blocks of as many rows as keep a block's logits within
    LOGITS_PER_BLOCK, with ``logits_per_query`` logits per query row and key (e.g. B H).
    """
    key_block = min(num_keys, KEYS_PER_BLOCK)
    query_block = max(1, min(num_queries, LOGITS_PER_BLOCK // max(1, logits_per_query * key_block)))
    for q_start in range(0, num_queries, query_block):
        rows = slice(q_start, min(q_start + query_block, num_queries))
        yield rows, _visible_key_blocks(rows, num_keys, key_block, visible)


def _visible_key_blocks(rows: slice, num_keys: int, key_block: int, visible: VisibleKeys
                        ) -> Iterator[tuple[slice, torch.Tensor | bool]]:
    for k_start in range(0, num_keys, key_block):
        cols = slice(k_start, min(k_start + key_block, num_keys))
        mask = visible.block(rows.start, rows.stop, cols.start, cols.stop)  # (B|1, 1, 1, bq, bk), True: all, False: none
        if mask is not False:
            yield cols, mask


def logit_entropy(queries: torch.Tensor, keys: torch.Tensor, visible: VisibleKeys,
                  sink_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and sink mass of softmax(queries . keys) over the visible keys, one block of logits at a time.

    queries:  (B, H, query_pos, d_head) float32, the logit scale included
    keys:     (B, H_kv, key_pos, d_head) float32, H_kv divides H (query head h reads key head h // (H / H_kv))
    visible:  which keys each query sees
    sink_key: (B,) int64, the key whose probability is the sink mass (each window's first real token)
    returns   entropy (B, H, query_pos) in nats and sink mass (B, H, query_pos), float32; 0 for a
              query that sees no key
    """
    B, H, num_queries, d_head = queries.shape
    H_kv, num_keys = keys.shape[1], keys.shape[2]
    group = H // H_kv
    # contiguous once (the projections leave heads strided): each block's product reads them directly
    grouped = queries.contiguous().view(B, H_kv, group, num_queries, d_head)  # (B, H_kv, G, query_pos, d_head)
    keys = keys.contiguous()
    keys_t = keys.transpose(-1, -2)  # (B, H_kv, d_head, key_pos)
    lse = queries.new_full((B, H_kv, group, num_queries), START_LOGIT)  # log sum_j exp(s_ij) over the keys so far
    entropy = queries.new_zeros((B, H_kv, group, num_queries))  # entropy of the softmax over those keys
    one_block = num_keys <= KEYS_PER_BLOCK  # then each block's own softmax is the whole one: no merging
    if one_block:
        sink = queries.new_zeros((B, H_kv, group, num_queries))
        sink_index = sink_key.view(B, 1, 1, 1, 1).expand(B, H_kv, group, num_queries, 1)
    for rows, key_blocks in logit_blocks(num_queries, num_keys, visible, B * H):
        bq = rows.stop - rows.start
        q = grouped[..., rows, :].reshape(B, H_kv, group * bq, d_head)  # (B, H_kv, G bq, d_head)
        for cols, mask in key_blocks:
            logits = (q @ keys_t[..., cols]).view(B, H_kv, group, bq, cols.stop - cols.start)
            if mask is not True:
                logits.masked_fill_(~mask, HIDDEN_LOGIT)
            top = None if one_block else logits.amax(dim=-1)  # (B, H_kv, G, bq)
            log_p = torch.log_softmax(logits, dim=-1)  # log of the block's own softmax
            block_entropy = -torch.einsum("bkgqn,bkgqn->bkgq", torch.exp(log_p), log_p)  # (B, H_kv, G, bq)
            if one_block:
                entropy[..., rows] = block_entropy
                sink[..., rows] = torch.exp(log_p.gather(-1, sink_index[..., :bq, :]).squeeze(-1))
                continue
            block_lse = top - log_p.amax(dim=-1)  # (B, H_kv, G, bq)
            merged = torch.logaddexp(lse[..., rows], block_lse)
            log_before, log_block = lse[..., rows] - merged, block_lse - merged  # log of each part's share
            entropy[..., rows] = (torch.exp(log_before) * (entropy[..., rows] - log_before)
                                  + torch.exp(log_block) * (block_entropy - log_block))
            lse[..., rows] = merged
    if one_block:
        seen = (visible.count() > 0).to(entropy.device)[:, None, None, :]  # (B|1, 1, 1, query_pos)
    else:
        seen = lse > START_LOGIT / 2  # (B, H_kv, G, query_pos)
        sink_keys = keys[torch.arange(B, device=keys.device), :, sink_key]  # (B, H_kv, d_head)
        sink_logit = torch.einsum("bkgqd,bkd->bkgq", grouped, sink_keys)
        sink = torch.exp((sink_logit - lse).clamp(max=0))
    entropy = torch.where(seen, entropy, 0.0)  # (B, H_kv, G, query_pos)
    sink = torch.where(seen & visible.sees(sink_key)[:, None, None, :], sink, 0.0)
    return entropy.reshape(B, H, num_queries), sink.reshape(B, H, num_queries)


_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# Devices whose attention statistics come from the fused kernel (the rest take the blocked path).
FUSED_KERNEL_DEVICES = ("cpu",)


def softmax_moments(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                    visible: VisibleKeys) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's log-sum-exp of its logits and the softmax-weighted mean of the values, on the CPU.

    queries: (B, H, query_pos, d) float32; keys, values: (B, H, key_pos, d) float32; logits scale * q . k
    returns  lse (B, H, query_pos) = log sum_j exp(scale q_i . k_j) over the visible keys, and
             (B, H, query_pos, d) sum_j softmax_j(scale q_i . k_j) v_j; garbage for a query that sees no key

    torch's fused CPU attention kernel (the one SDPA uses: blocks of logits with an online
    softmax, never a whole map), which also returns the log-sum-exp. A mask is handed to it as
    an additive float mask a block of query rows at a time, so at most LOGITS_PER_BLOCK entries.
    """
    if visible.mask is None:
        if visible.causal and visible.offset != 0:
            raise QkspectraError("a causal attention call with more keys than queries needs an explicit mask")
        weighted, lse = _flash_attention(queries, keys, values, 0.0, is_causal=visible.causal, scale=scale)
        return lse, weighted
    num_queries, num_keys = queries.shape[-2], keys.shape[-2]
    rows = max(1, LOGITS_PER_BLOCK // (visible.mask.shape[0] * num_keys))
    lse = queries.new_empty(queries.shape[:-1])
    weighted = queries.new_empty(queries.shape[:-1] + values.shape[-1:])
    for start in range(0, num_queries, rows):
        block = slice(start, min(start + rows, num_queries))
        allowed = visible.mask[..., block, :]  # (B|1, 1, rows, key_pos)
        additive = torch.zeros(allowed.shape, dtype=queries.dtype).masked_fill_(~allowed, float("-inf"))
        weighted[..., block, :], lse[..., block] = _flash_attention(queries[..., block, :], keys, values, 0.0,
                                                                    attn_mask=additive, scale=scale)
    return lse, weighted


def centred(keys: torch.Tensor) -> torch.Tensor:
    """(B, H, key_pos, d) keys minus their mean over positions: each query's logits shift alike, its softmax
    is unchanged, and the log-sum-exp loses the common offset (see ``flash_entropy``)."""
    return keys - keys.mean(dim=-2, keepdim=True)


def flash_entropy(queries: torch.Tensor, keys: torch.Tensor, scale: float, visible: VisibleKeys,
                  sink_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and sink mass of softmax(scale queries . keys) over the visible keys, from the fused CPU kernel.

    queries: (B, H, query_pos, d_head) float32; keys: (B, H, key_pos, d_head) float32
    sink_key: (B,) int64, the key whose probability is the sink mass
    returns   entropy (B, H, query_pos) in nats and sink mass (B, H, query_pos), float32; 0 for a
              query that sees no key

    With s_ij = scale q_i . k_j and p = softmax(s): H_i = lse_i - sum_j p_ij s_ij = lse_i - scale q_i . kbar_i,
    kbar_i = sum_j p_ij k_j, the attention output with the keys as values; p_i0 = exp(s_i0 - lse_i).
    The keys are first centred (their mean over positions subtracted): every logit of a query moves
    by the same amount, so p is unchanged, and lse_i and s q_i . kbar_i lose their common offset
    (a key bias adds one), which float32 would otherwise cancel at the expense of the entropy.
    """
    keys = centred(keys)  # (B, H, key_pos, d_head)
    lse, mean_key = softmax_moments(queries, keys, keys, scale, visible)  # (B, H, query_pos), (..., d_head)
    entropy = torch.linalg.vecdot(queries, mean_key).mul_(-scale).add_(lse).clamp_(min=0.0)
    batch = torch.arange(queries.shape[0], device=queries.device)
    sink_logit = torch.linalg.vecdot(queries, keys[batch, :, sink_key].unsqueeze(-2))  # (B, H, query_pos)
    sink = torch.exp(sink_logit.mul_(scale).sub_(lse).clamp_(max=0.0))
    seen = (visible.count() > 0).to(entropy.device)[:, None, :]  # (B|1, 1, query_pos)
    entropy = torch.where(seen, entropy, 0.0)
    sink = torch.where(seen & visible.sees(sink_key)[:, None, :], sink, 0.0)
    return entropy, sink


def call_entropy(call: AttentionCall, sink_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and sink mass (B, H, query_pos) float32 of one attention call, reduced in float32.

    On the CPU from torch's fused attention kernel (``flash_entropy``); elsewhere from blocks of
    logits with an online log-sum-exp (``logit_entropy``).
    """
    if call.queries.device.type in FUSED_KERNEL_DEVICES:
        return flash_entropy(call.queries.to(torch.float32), call.keys_per_query_head(), call.scale, call.visible,
                             sink_key)
    return logit_entropy(call.scaled_queries(), call.keys.to(torch.float32), call.visible, sink_key)


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


class EntropyAccumulator:
    """Float64 sums per (layer, head), fed by the attention calls of one batch at a time."""

    def __init__(self, num_layers: int, num_heads: int, num_buckets: int):
        L, H = num_layers, num_heads
        self.entropy_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.normalized_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.sink_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.bucket_sum = torch.zeros(L, H, num_buckets, dtype=torch.float64)  # (L, H, buckets)
        self.bucket_count = torch.zeros(num_buckets, dtype=torch.float64)  # (buckets,)
        self.log_keys_sum = torch.zeros(L, num_buckets, dtype=torch.float64)  # (L, buckets)
        self.normalized_count = torch.zeros(L, dtype=torch.float64)  # (L,)
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
        self.counts_by_mask: dict[tuple, tuple] = {}

    def end_batch(self) -> None:
        self.num_tokens += int(self.query_weight.sum())
        self.bucket_count += self.bucket_weight.sum(dim=(0, 1))
        self.counts_by_mask = {}

    def _normalized_weight(self, visible: VisibleKeys) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(B, query_pos) float64: 1 / log(n_i) for real queries seeing n_i >= 2 keys; their number; and
        (buckets,) the sum of log(n_i) over the real queries of each position bucket."""
        cache_key = (id(visible.source), visible.causal)
        if cache_key not in self.counts_by_mask:
            num_visible = visible.count()  # (B|1, query_pos)
            real_and_several = self.query_weight * (num_visible > 1)  # (B, query_pos)
            weight = real_and_several / num_visible.clamp(min=2).log()
            log_keys = torch.einsum("bq,bqn->n", num_visible.clamp(min=1).log().expand_as(self.query_weight),
                                    self.bucket_weight)  # (buckets,)
            # the mask is held so that its id stays unique while it is cached
            self.counts_by_mask[cache_key] = (visible.source, weight, float(real_and_several.sum()), log_keys.cpu())
        return self.counts_by_mask[cache_key][1:]

    def add(self, call: AttentionCall) -> None:
        """One layer's attention call of the current batch."""
        layer = call.layer
        if call.queries.shape[1] != self.entropy_sum.shape[1]:
            raise QkspectraError(f"layer {layer} has {call.queries.shape[1]} heads, expected {self.entropy_sum.shape[1]}")
        entropy, sink = call_entropy(call, self.first_key)  # (B, H, query_pos) each
        entropy, sink = entropy.cpu().to(torch.float64), sink.cpu().to(torch.float64)
        normalized_weight, num_normalized, log_keys = self._normalized_weight(call.visible)
        self.log_keys_sum[layer] += log_keys
        self.entropy_sum[layer] += torch.einsum("bhq,bq->h", entropy, self.query_weight)
        self.normalized_sum[layer] += torch.einsum("bhq,bq->h", entropy, normalized_weight)
        self.sink_sum[layer] += torch.einsum("bhq,bq->h", sink, self.query_weight)
        self.bucket_sum[layer] += torch.einsum("bhq,bqn->hn", entropy, self.bucket_weight)
        self.normalized_count[layer] += num_normalized

    def stats(self, num_windows: int) -> EntropyStats:
        return EntropyStats(
            mean_entropy=(self.entropy_sum / self.num_tokens).numpy(),
            # NaN for a layer where no query sees two keys
            mean_normalized_entropy=(self.normalized_sum / self.normalized_count[:, None]).numpy(),
            mean_sink_mass=(self.sink_sum / self.num_tokens).numpy(),
            entropy_by_position=(self.bucket_sum / self.bucket_count).numpy(),
            log_keys_by_position=(self.log_keys_sum / self.bucket_count).numpy(),
            queries_by_position=self.bucket_count.numpy().astype(np.int64),
            num_windows=num_windows,
            num_tokens=self.num_tokens,
        )
