"""Per-query attention statistics of one attention call, streamed: no attention map is ever formed.

For each query i: the entropy H_i of its attention, the sink mass p_i0 (its probability on the
window's first real token) and H'_i, the entropy of its attention renormalised over the visible keys
other than that first one. Both routes accumulate the softmax over the visible keys with the first
one hidden, and merge the first key in at the end as the second part of a two-part mixture
(``with_first_key``), so that 1 - p_i0 is itself a log-sum-exp, never 1 minus a probability: on the
CPU from torch's fused attention kernel (``flash_statistics``), elsewhere from blocks of logits with
an online log-sum-exp (``logit_statistics``). Queries and keys are reduced in float32.

The method in full: docs/method/entropy.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.functional import logsigmoid

from qkspectra.errors import QkspectraError
from qkspectra.extract.capture import AttentionCall, VisibleKeys

# Logits per block of logit_statistics (16 MiB of float32): large enough that the per-block costs of
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
# Devices whose attention statistics come from the fused kernel (the rest take the blocked path).
FUSED_KERNEL_DEVICES = ("cpu",)
_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class QueryStatistics:
    """One attention call's statistics per query, float32, stacked in one tensor (the pass sums them at once)."""

    stacked: torch.Tensor  # (3, B, H, query_pos): entropy, sink mass, entropy without the first

    @property
    def entropy(self) -> torch.Tensor:
        """(B, H, query_pos) H_i in nats; 0 for a query that sees no key."""
        return self.stacked[0]

    @property
    def sink_mass(self) -> torch.Tensor:
        """(B, H, query_pos) p_i0, the probability on the window's first real token; 0 where not visible."""
        return self.stacked[1]

    @property
    def entropy_without_first(self) -> torch.Tensor:
        """(B, H, query_pos) H'_i over the visible keys other than the first, renormalised; 0 for a query
        that sees no other key."""
        return self.stacked[2]


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


def first_key_visibility(visible: VisibleKeys, first_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, query_pos) bool each, on first_key's device: whether each query sees its window's first key
    ``first_key[b]`` (B,) int64, and whether it sees any other key."""
    sees_first = visible.sees(first_key)  # (B, query_pos)
    others = visible.count() - sees_first.cpu().to(torch.float64)  # (B, query_pos), counted on the CPU
    return sees_first, (others > 0).to(sees_first.device)


def with_first_key(lse_other: torch.Tensor, entropy_other: torch.Tensor, first_logit: torch.Tensor,
                   out: torch.Tensor, sees: tuple[torch.Tensor, torch.Tensor] | None = None,
                   first_scale: float = 1.0) -> None:
    """The statistics of the whole softmax from those of the softmax over the keys other than the first.

    lse_other:     (B, H, q) log sum_{j != first} exp(s_ij) over the visible keys other than the first
    entropy_other: (B, H, q) H'_i, the entropy of the softmax over those keys
    first_logit:   (B, H, q) s_i0 / first_scale, the first key's logit
    out:           (3, B, H, q) float32, written: H_i, p_i0, H'_i (``QueryStatistics``)
    sees:          None when every query sees both the first key and another one; else (sees_first,
                   sees_other), (B, q) bool (``first_key_visibility``): where False, the matching inputs
                   above may be anything (e.g. the fused kernel's output for a row it saw nothing of)

    The first key joins as the second part of a two-part mixture. With d_i = lse'_i - s_i0:
    log(1 - p_i0) = logsigmoid(d_i), log p_i0 = logsigmoid(-d_i), both exact in float32 whatever p_i0
    (no 1 - p_i0 is ever formed), and H_i = p_i0 (-log p_i0) + (1 - p_i0) (H'_i - log(1 - p_i0)),
    a sum of terms >= 0. A query that sees no first key gets d_i = +1e30 (p_i0 = 0, H_i = H'_i), one that
    sees only the first d_i = -1e30 (p_i0 = 1, H_i = 0); every term stays finite (0 x 1e30 = 0).
    Few whole-size operations: each costs a pass over B H q values, and a thread synchronisation.
    """
    entropy, first, without_first = out  # (B, H, q) each
    torch.clamp(entropy_other, min=0.0, out=without_first)
    gap = torch.sub(lse_other, first_logit, alpha=first_scale)  # d_i
    if sees is not None:
        sees_first, sees_other = sees
        without_first.masked_fill_(~sees_other[:, None], 0.0)
        alone = torch.where(sees_first, START_LOGIT, -START_LOGIT)[:, None]  # (B, 1, q) d_i where a part is missing
        gap = torch.where((sees_first & sees_other)[:, None], gap, alone)
    log_other = logsigmoid(gap)  # log(1 - p_i0)
    log_first = logsigmoid(gap.neg_())  # log p_i0
    torch.exp(log_first, out=first)
    torch.sub(without_first, log_other, out=entropy).mul_(log_other.exp_()).addcmul_(first, log_first, value=-1.0)


def logit_statistics(queries: torch.Tensor, keys: torch.Tensor, visible: VisibleKeys,
                     first_key: torch.Tensor) -> QueryStatistics:
    """The statistics of softmax(queries . keys) over the visible keys, one block of logits at a time.

    queries:   (B, H, query_pos, d_head) float32, the logit scale included
    keys:      (B, H_kv, key_pos, d_head) float32, H_kv divides H (query head h reads key head h // (H / H_kv))
    visible:   which keys each query sees
    first_key: (B,) int64, each window's first real token: the sink

    Each key block b, the first key's column hidden, gives its own log-sum-exp lse_b and the entropy
    H_b of its own softmax; the running (lse, H) merges with them as a two-part mixture. The first
    key joins at the end (``with_first_key``).
    """
    B, H, num_queries, d_head = queries.shape
    H_kv, num_keys = keys.shape[1], keys.shape[2]
    group = H // H_kv
    # contiguous once (the projections leave heads strided): each block's product reads them directly
    grouped = queries.contiguous().view(B, H_kv, group, num_queries, d_head)  # (B, H_kv, G, query_pos, d_head)
    keys = keys.contiguous()
    keys_t = keys.transpose(-1, -2)  # (B, H_kv, d_head, key_pos)
    lse = queries.new_full((B, H_kv, group, num_queries), START_LOGIT)  # over the other keys so far
    entropy = queries.new_zeros((B, H_kv, group, num_queries))  # of the softmax over those keys
    one_block = num_keys <= KEYS_PER_BLOCK  # then each block's own softmax is the whole one: no merging
    first_keys = first_key.tolist()
    for rows, key_blocks in logit_blocks(num_queries, num_keys, visible, B * H):
        bq = rows.stop - rows.start
        q = grouped[..., rows, :].reshape(B, H_kv, group * bq, d_head)  # (B, H_kv, G bq, d_head)
        for cols, mask in key_blocks:
            logits = (q @ keys_t[..., cols]).view(B, H_kv, group, bq, cols.stop - cols.start)
            if mask is not True:
                logits.masked_fill_(~mask, HIDDEN_LOGIT)
            _hide_first_keys(logits, first_keys, cols)
            top = logits.amax(dim=-1)  # (B, H_kv, G, bq)
            log_p = torch.log_softmax(logits, dim=-1)  # log of the block's own softmax
            block_entropy = -torch.einsum("bkgqn,bkgqn->bkgq", torch.exp(log_p), log_p)  # (B, H_kv, G, bq)
            block_lse = top - log_p.amax(dim=-1)  # (B, H_kv, G, bq)
            if one_block:
                lse[..., rows], entropy[..., rows] = block_lse, block_entropy
                continue
            merged = torch.logaddexp(lse[..., rows], block_lse)
            log_before, log_block = lse[..., rows] - merged, block_lse - merged  # log of each part's share
            entropy[..., rows] = (torch.exp(log_before) * (entropy[..., rows] - log_before)
                                  + torch.exp(log_block) * (block_entropy - log_block))
            lse[..., rows] = merged
    first_keys_per_head = keys[torch.arange(B, device=keys.device), :, first_key]  # (B, H_kv, d_head)
    first_logit = torch.einsum("bkgqd,bkd->bkgq", grouped, first_keys_per_head)  # (B, H_kv, G, query_pos)
    shape = (B, H, num_queries)
    out = queries.new_empty((3,) + shape)
    with_first_key(lse.reshape(shape), entropy.reshape(shape), first_logit.reshape(shape), out,
                   first_key_visibility(visible, first_key))
    return QueryStatistics(out)


def _hide_first_keys(logits: torch.Tensor, first_keys: list[int], cols: slice) -> None:
    """Hide, in place, each window's first key (``first_keys[b]``) from a block of logits (B, H_kv, G, bq, bk)."""
    windows = [b for b, key in enumerate(first_keys) if cols.start <= key < cols.stop]
    if windows:
        columns = [first_keys[b] - cols.start for b in windows]
        logits[torch.tensor(windows, device=logits.device), ..., torch.tensor(columns, device=logits.device)] = HIDDEN_LOGIT


def softmax_moments(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                    visible: VisibleKeys, hidden_key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's log-sum-exp of its logits and the softmax-weighted mean of the values, on the CPU.

    queries:    (B, H, query_pos, d) float32; keys, values: (B, H, key_pos, d) float32; logits scale * q . k
    hidden_key: (B,) int64, one key per window left out as if the mask hid it; None: none
    returns     lse (B, H, query_pos) = log sum_j exp(scale q_i . k_j) over the visible keys, and
                (B, H, query_pos, d) sum_j softmax_j(scale q_i . k_j) v_j; garbage for a query that sees no key

    torch's fused CPU attention kernel (the one SDPA uses: blocks of logits with an online
    softmax, never a whole map), which also returns the log-sum-exp. A mask is handed to it as
    an additive float mask a block of query rows at a time, so at most LOGITS_PER_BLOCK entries.
    """
    num_queries, num_keys = queries.shape[-2], keys.shape[-2]
    if visible.mask is None and hidden_key is not None:
        visible = _explicit(visible)
    if visible.mask is None:
        if visible.causal and visible.offset != 0:
            raise QkspectraError("a causal attention call with more keys than queries needs an explicit mask")
        weighted, lse = _flash_attention(queries, keys, values, 0.0, is_causal=visible.causal, scale=scale)
        return lse, weighted
    B = queries.shape[0]
    batch = visible.mask.shape[0]
    if hidden_key is not None and batch == 1 and not bool((hidden_key == hidden_key[0]).all()):
        batch = B  # one mask for all windows, but their hidden keys differ
    rows = max(1, LOGITS_PER_BLOCK // (batch * num_keys))
    lse = queries.new_empty(queries.shape[:-1])
    weighted = queries.new_empty(queries.shape[:-1] + values.shape[-1:])
    for start in range(0, num_queries, rows):
        block = slice(start, min(start + rows, num_queries))
        allowed = visible.mask[..., block, :]  # (B|1, 1, rows, key_pos)
        additive = torch.zeros((batch,) + allowed.shape[1:], dtype=queries.dtype).masked_fill_(~allowed, float("-inf"))
        if hidden_key is not None and batch == 1:
            additive[..., int(hidden_key[0])] = float("-inf")
        elif hidden_key is not None:
            additive[torch.arange(B), 0, :, hidden_key] = float("-inf")
        weighted[..., block, :], lse[..., block] = _flash_attention(queries[..., block, :], keys, values, 0.0,
                                                                    attn_mask=additive, scale=scale)
    return lse, weighted


def _explicit(visible: VisibleKeys) -> VisibleKeys:
    """The same visibility with its (1, 1, query_pos, key_pos) mask written out."""
    num_queries = visible.num_keys - visible.offset
    mask = torch.ones(num_queries, visible.num_keys, dtype=torch.bool, device=visible.device)
    if visible.causal:
        mask = mask.tril(visible.offset)
    return VisibleKeys(mask[None, None], False, num_queries, visible.num_keys, visible.device)


def centred(keys: torch.Tensor) -> torch.Tensor:
    """(B, H, key_pos, d) keys minus their mean over positions: each query's logits shift alike, its softmax
    is unchanged, and the log-sum-exp loses the common offset (see ``flash_statistics``)."""
    return keys - keys.mean(dim=-2, keepdim=True)


def flash_statistics(queries: torch.Tensor, keys: torch.Tensor, scale: float, visible: VisibleKeys,
                     first_key: torch.Tensor) -> QueryStatistics:
    """The statistics of softmax(scale queries . keys) over the visible keys, from the fused CPU kernel.

    queries:   (B, H, query_pos, d_head) float32; keys: (B, H, key_pos, d_head) float32
    first_key: (B,) int64, each window's first real token: the sink

    One fused call over the visible keys other than the first (its column hidden), with the keys as
    values, gives lse'_i and kbar'_i = sum_{j != first} p'_ij k_j, so H'_i = lse'_i - scale q_i . kbar'_i;
    the first key joins at the end (``with_first_key``). The keys are first centred (their mean over
    positions subtracted): every logit of a query moves by the same amount, so p is unchanged, and
    lse'_i and scale q_i . kbar'_i lose their common offset (a key bias adds one), which float32 would
    otherwise cancel at the expense of the entropy. Without a mask, and the first key at 0 in every
    window, the first key is sliced off rather than masked: a causal call then runs on queries 1..
    and keys 1.. (query 0 sees the first key alone: H = 0, p_i0 = 1, H' = 0).
    """
    keys = centred(keys)  # (B, H, key_pos, d_head)
    batch = torch.arange(queries.shape[0], device=queries.device)
    first_logit = torch.linalg.vecdot(queries, keys[batch, :, first_key].unsqueeze(-2))  # (B, H, query_pos) / scale
    out = queries.new_empty((3,) + queries.shape[:-1])  # (3, B, H, query_pos)
    if visible.mask is not None or bool(first_key.any()) or keys.shape[-2] < 2:
        lse, mean_key = softmax_moments(queries, keys, keys, scale, visible, hidden_key=first_key)
        entropy = torch.sub(lse, torch.linalg.vecdot(queries, mean_key), alpha=scale)  # (B, H, query_pos)
        with_first_key(lse, entropy, first_logit, out, first_key_visibility(visible, first_key), scale)
        return QueryStatistics(out)
    if visible.causal and visible.offset != 0:
        raise QkspectraError("a causal attention call with more keys than queries needs an explicit mask")
    start = 1 if visible.causal else 0  # the first query that sees a key other than the first
    covered = queries[..., start:, :]
    mean_key, lse = _flash_attention(covered, keys[..., 1:, :], keys[..., 1:, :], 0.0, is_causal=visible.causal,
                                     scale=scale)  # (B, H, query_pos - start, d_head), (B, H, query_pos - start)
    entropy = torch.sub(lse, torch.linalg.vecdot(covered, mean_key), alpha=scale)
    with_first_key(lse, entropy, first_logit[..., start:], out[..., start:], None, scale)
    out[..., :start] = torch.tensor([0.0, 1.0, 0.0])[:, None, None, None]  # query 0 of a causal call
    return QueryStatistics(out)


def flash_entropy(queries: torch.Tensor, keys: torch.Tensor, scale: float, visible: VisibleKeys,
                  sink_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and sink mass (B, H, query_pos) float32 from one fused CPU call over all the visible keys.

    H_i = lse_i - scale q_i . kbar_i, p_i0 = exp(scale q_i . k_0 - lse_i), keys centred as in
    ``flash_statistics``; 0 for a query that sees no key. The functional test's route
    (``call_entropy``): its KL shares this lse and kbar with the changed call's, so the control is exactly 0.
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


def call_statistics(call: AttentionCall, first_key: torch.Tensor) -> QueryStatistics:
    """Entropy, sink mass and entropy without the first key, each (B, H, query_pos) float32, of one attention call.

    first_key: (B,) int64, each window's first real token. On the CPU from torch's fused attention
    kernel (``flash_statistics``); elsewhere from blocks of logits (``logit_statistics``).
    """
    if call.queries.device.type in FUSED_KERNEL_DEVICES:
        return flash_statistics(call.queries.to(torch.float32), call.keys_per_query_head(), call.scale, call.visible,
                                first_key)
    return logit_statistics(call.scaled_queries(), call.keys.to(torch.float32), call.visible, first_key)


def call_entropy(call: AttentionCall, sink_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and sink mass (B, H, query_pos) float32 of one attention call, the functional test's route.

    On the CPU from one fused call over all the visible keys (``flash_entropy``), whose log-sum-exp and
    mean key the functional test's KL reuses; elsewhere as ``call_statistics``.
    """
    if call.queries.device.type in FUSED_KERNEL_DEVICES:
        return flash_entropy(call.queries.to(torch.float32), call.keys_per_query_head(), call.scale, call.visible,
                             sink_key)
    statistics = logit_statistics(call.scaled_queries(), call.keys.to(torch.float32), call.visible, sink_key)
    return statistics.entropy, statistics.sink_mass
