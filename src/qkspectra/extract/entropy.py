"""Mean attention entropy per layer and head over a corpus: the dynamic half of ``extract``.

For each real (non-padding) query position i of every window, and each layer and head, the
attention probabilities p_ij = softmax_j(s_ij) give

    H_i = -sum_j p_ij log p_ij   (nats, 0 log 0 = 0)

over every key j the model lets query i see, special tokens included (the BERTology
convention): keys 0..i for causal models, all keys for encoders, minus padding (and minus
whatever else the model's own attention mask hides, e.g. outside a sliding window). The
visible keys are read from the 4-D mask the model hands its attention modules.

Reported per (layer, head), each a token-weighted mean over all real query positions:
- ``mean_entropy``: H_i;
- ``mean_normalized_entropy``: H_i / log(n_i), n_i the number of keys query i sees (1 for
  uniform attention, 0 for one-hot); queries that see a single key are left out of this mean;
- ``mean_sink_mass``: p_i0, the probability on the window's first token (BOS / [CLS]);
- ``entropy_by_position``: the mean of H_i over the queries at positions n = i + 1 (counted from
  the window's first real token) in the log2-spaced bucket b = floor(log2 n): 1, 2-3, 4-7, ...

No attention map is ever formed. The model runs with its own (fast, SDPA) attention; a forward
hook on each attention module takes the block's input and rebuilds the layer's queries and keys
from the adapter's pieces (``models.adapters.attention.queries_and_keys``: projections, biases,
query/key norms, each layer's rotary positions, scale), exactly as the model forms its logits
s_ij = q_i . k_j. ``logit_entropy`` then
goes through blocks of queries and, for each, blocks of keys with an online log-sum-exp in
float32: each key block b gives its own log-sum-exp lse_b and the entropy H_b of its own softmax
(one fused log_softmax and one dot product per row); the running (lse, H) over the blocks so far
merges with them as a two-part mixture, lse' = logaddexp(lse, lse_b), w = exp(lse - lse'),
w_b = exp(lse_b - lse'), H' = w (H - log w) + w_b (H_b - log w_b); and p_i0 = exp(s_i0 - lse).
Only one block of logits (and its log-probabilities) exists at a time, whatever the sequence length. Key blocks a causal mask hides
entirely are skipped. Whatever the model's dtype, queries and keys are formed and reduced in
float32; sums over queries are accumulated in float64.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qkspectra.errors import QkspectraError, option
from qkspectra.extract.corpus import Corpus
from qkspectra.models.adapters.attention import queries_and_keys

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
# Hidden logits are filled with _HIDDEN, below the running log-sum-exp's start _START: exp(_HIDDEN - x)
# is exactly 0 for every x >= _START, and every term stays finite (no inf - inf, no 0 * inf).
_START = -1e30
_HIDDEN = -2e30


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
    key_block = min(num_keys, KEYS_PER_BLOCK)
    query_block = max(1, min(num_queries, LOGITS_PER_BLOCK // max(1, B * H * key_block)))
    lse = queries.new_full((B, H_kv, group, num_queries), _START)  # log sum_j exp(s_ij) over the keys so far
    entropy = queries.new_zeros((B, H_kv, group, num_queries))  # entropy of the softmax over those keys
    one_block = key_block == num_keys  # then each block's own softmax is the whole one: no merging
    if one_block:
        sink = queries.new_zeros((B, H_kv, group, num_queries))
        sink_index = sink_key.view(B, 1, 1, 1, 1).expand(B, H_kv, group, query_block, 1)
    for q_start in range(0, num_queries, query_block):
        q_stop = min(q_start + query_block, num_queries)
        rows = slice(q_start, q_stop)
        q = grouped[..., rows, :].reshape(B, H_kv, group * (q_stop - q_start), d_head)  # (B, H_kv, G bq, d_head)
        for k_start in range(0, num_keys, key_block):
            k_stop = min(k_start + key_block, num_keys)
            mask = visible.block(q_start, q_stop, k_start, k_stop)  # (B|1, 1, 1, bq, bk) bool, True: all, False: none
            if mask is False:
                continue
            logits = (q @ keys_t[..., k_start:k_stop]).view(B, H_kv, group, q_stop - q_start, k_stop - k_start)
            if mask is not True:
                logits.masked_fill_(~mask, _HIDDEN)
            top = None if one_block else logits.amax(dim=-1)  # (B, H_kv, G, bq)
            log_p = torch.log_softmax(logits, dim=-1)  # log of the block's own softmax
            block_entropy = -torch.einsum("bkgqn,bkgqn->bkgq", torch.exp(log_p), log_p)  # (B, H_kv, G, bq)
            if one_block:
                entropy[..., rows] = block_entropy
                sink[..., rows] = torch.exp(log_p.gather(-1, sink_index[..., :q_stop - q_start, :]).squeeze(-1))
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
        seen = lse > _START / 2  # (B, H_kv, G, query_pos)
        sink_keys = keys[torch.arange(B, device=keys.device), :, sink_key]  # (B, H_kv, d_head)
        sink_logit = torch.einsum("bkgqd,bkd->bkgq", grouped, sink_keys)
        sink = torch.exp((sink_logit - lse).clamp(max=0))
    entropy = torch.where(seen, entropy, 0.0)  # (B, H_kv, G, query_pos)
    sink = torch.where(seen & visible.sees(sink_key)[:, None, None, :], sink, 0.0)
    return entropy.reshape(B, H, num_queries), sink.reshape(B, H, num_queries)


def attention_entropy(model: nn.Module, corpus: Corpus, *, batch_size: int | None = None, progress: bool = True,
                      padding_side: Literal["left", "right"] = "right") -> EntropyStats:
    """Mean attention entropy, normalised entropy and sink mass per (layer, head) over the corpus windows.

    model:        a transformers model (any attention implementation; SDPA is the fast one) in any
                  dtype and on any device; its queries and keys are rebuilt by its adapter
    batch_size:   windows per forward pass; None: as many as MAX_TOKENS_PER_BATCH and MASK_MEMORY_BUDGET allow
    padding_side: where padding goes in a batch; the results do not depend on it (padding is
                  masked out and positions are counted from the attention mask)
    """
    from qkspectra.models.adapters import adapter_for

    if batch_size is not None and batch_size < 1:
        raise QkspectraError(f"{option('batch_size')} must be at least 1, got {batch_size}")
    if not corpus.windows:
        raise QkspectraError(f"corpus {corpus.description} has no windows")
    adapter = adapter_for(model.config)
    longest = max(map(len, corpus.windows))
    accumulator = _EntropyAccumulator(adapter, model, num_buckets=position_bucket(longest) + 1)
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


def position_bucket(position: int) -> int:
    """The bucket of the query at 1-based position n: floor(log2 n) (1 -> 0, 2-3 -> 1, 4-7 -> 2, ...)."""
    return int(position).bit_length() - 1


def layer_as_torch(layer, dtype: torch.dtype, device: torch.device):
    """An adapter's ``AttentionLayer`` with every array field as a torch tensor of ``dtype`` on ``device``."""
    return replace(layer, **{
        field.name: torch.as_tensor(getattr(layer, field.name), dtype=dtype, device=device)
        for field in fields(layer) if isinstance(getattr(layer, field.name), np.ndarray)
    })


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


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, seq) int64: each token's position counted from its window's first real token (padding: 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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


class VisibleKeys:
    """Which keys each query sees under the mask the model hands one attention call.

    mask: the model's 4-D mask (B|1, 1, query_pos, key_pos), boolean (True: visible) or additive
    float (visible where above half the dtype's minimum), or None: every key, or with ``causal``
    keys j <= i + (key_pos - query_pos).
    """

    def __init__(self, mask: torch.Tensor | None, causal: bool, num_queries: int, num_keys: int,
                 device: torch.device):
        self.device = device
        self.causal = mask is None and causal
        self.offset = num_keys - num_queries
        self.num_keys = num_keys
        if mask is not None:
            mask = mask[..., -num_queries:, :num_keys]
            mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            if mask.shape[1] != 1:
                raise QkspectraError(f"attention mask of shape {tuple(mask.shape)}: expected one mask for all heads")
        self.mask = mask  # (B|1, 1, query_pos, key_pos) bool or None

    def block(self, q_start: int, q_stop: int, k_start: int, k_stop: int) -> torch.Tensor | bool:
        """True if every query of the block sees every key of it, False if none sees any, else the
        (B|1, 1, 1, bq, bk) boolean mask (broadcast over kv heads and their query groups)."""
        if self.mask is None:
            if not self.causal or k_stop - 1 <= q_start + self.offset:
                return True
            if k_start > q_stop - 1 + self.offset:
                return False
            query = torch.arange(q_start, q_stop, device=self.device).unsqueeze(-1) + self.offset  # (bq, 1)
            return (torch.arange(k_start, k_stop, device=self.device) <= query)[None, None, None]
        block = self.mask[..., q_start:q_stop, k_start:k_stop]  # (B|1, 1, bq, bk)
        if bool(block.all()):
            return True
        if not bool(block.any()):
            return False
        return block.unsqueeze(2)

    def count(self) -> torch.Tensor:
        """(B|1, query_pos) float64: the number of keys each query sees."""
        if self.mask is not None:
            return self.mask.sum(dim=-1, dtype=torch.float64)[:, 0]
        num_queries = self.num_keys - self.offset
        if not self.causal:
            return torch.full((1, num_queries), float(self.num_keys), dtype=torch.float64, device=self.device)
        count = torch.arange(num_queries, dtype=torch.float64, device=self.device) + self.offset + 1
        return count.clamp(max=self.num_keys)[None]

    def sees(self, key: torch.Tensor) -> torch.Tensor:
        """(B, query_pos) bool: whether each query of window b sees its key ``key[b]`` (key: (B,) int64)."""
        num_queries = self.num_keys - self.offset
        if self.mask is not None:
            rows = self.mask[:, 0].expand(key.shape[0], -1, -1)  # (B, query_pos, key_pos)
            return rows[torch.arange(key.shape[0], device=key.device), :, key]
        query = torch.arange(num_queries, device=key.device) + self.offset
        if not self.causal:
            return torch.ones(key.shape[0], num_queries, dtype=torch.bool, device=key.device)
        return key[:, None] <= query[None, :]


class _EntropyAccumulator:
    """Float64 sums per (layer, head), fed by the attention hooks one batch at a time.

    The layer of a hook call is its rank among the attention calls of the current forward pass.
    Each layer's pieces are read once from the model's weights by its adapter.
    """

    def __init__(self, adapter, model: nn.Module, num_buckets: int):
        from qkspectra.models.tensors import StateDictSource

        self.adapter = adapter
        self.num_layers = adapter.num_layers
        self.tensors = StateDictSource(model.state_dict())
        self.layers: dict[int, object] = {}
        L, H = adapter.num_layers, adapter.num_heads
        self.entropy_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.normalized_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.sink_sum = torch.zeros(L, H, dtype=torch.float64)  # (L, H)
        self.bucket_sum = torch.zeros(L, H, num_buckets, dtype=torch.float64)  # (L, H, buckets)
        self.bucket_count = torch.zeros(num_buckets, dtype=torch.float64)  # (buckets,)
        self.log_keys_sum = torch.zeros(L, num_buckets, dtype=torch.float64)  # (L, buckets)
        self.normalized_count = torch.zeros(L, dtype=torch.float64)  # (L,)
        self.num_tokens = 0

    def layer(self, index: int, device: torch.device):
        """Layer ``index``'s pieces as float32 tensors on ``device``, read once."""
        if index not in self.layers:
            self.layers[index] = layer_as_torch(self.adapter.layer(self.tensors, index), torch.float32, device)
        return self.layers[index]

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """attention_mask: (B, seq) 1 for real tokens."""
        self.query_weight = attention_mask.to(torch.float64)  # (B, query_pos)
        self.first_key = attention_mask.argmax(dim=-1)  # (B,) index of each window's first real token
        self.positions = mask_positions(attention_mask)  # (B, query_pos) as the model is given them
        positions = attention_mask.cumsum(-1).clamp(min=1)  # (B, query_pos) 1-based position of real tokens
        bucket = torch.floor(torch.log2(positions.to(torch.float64))).long()  # (B, query_pos)
        self.bucket_weight = (torch.nn.functional.one_hot(bucket, self.bucket_count.shape[0]).to(torch.float64)
                              * self.query_weight[..., None])  # (B, query_pos, buckets)
        self.counts_by_mask: dict[int, tuple[torch.Tensor | None, torch.Tensor, float]] = {}
        self.calls = 0

    def end_batch(self, model_name: str) -> None:
        if self.calls != self.num_layers:
            raise QkspectraError(f"{model_name}: attention ran {self.calls} times in one forward pass, "
                                 f"expected once per layer ({self.num_layers})")
        self.num_tokens += int(self.query_weight.sum())
        self.bucket_count += self.bucket_weight.sum(dim=(0, 1)).cpu()
        self.counts_by_mask = {}

    def hook(self, module: nn.Module) -> Callable:
        signature = inspect.signature(module.forward)

        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            arguments = signature.bind(*args, **kwargs).arguments
            arguments = {**arguments.pop("kwargs", {}), **arguments}
            layer_index = self.calls
            self.calls += 1
            if layer_index >= self.num_layers:
                raise QkspectraError(f"attention ran more than once per layer ({self.num_layers} layers)")
            hidden = arguments["hidden_states"]
            layer = self.layer(layer_index, hidden.device)
            queries, keys = queries_and_keys(layer, hidden.to(torch.float32), self.positions)
            mask = arguments.get("attention_mask")
            visible = VisibleKeys(mask, getattr(module, "is_causal", False), queries.shape[-2], keys.shape[-2],
                                  hidden.device)
            self.add(layer_index, queries, keys, visible, mask)

        return record

    def _normalized_weight(self, visible: VisibleKeys, mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(B, query_pos) float64: 1 / log(n_i) for real queries seeing n_i >= 2 keys; their number; and
        (buckets,) the sum of log(n_i) over the real queries of each position bucket."""
        cache_key = id(mask)
        if cache_key not in self.counts_by_mask:
            num_visible = visible.count().to(self.query_weight.device)  # (B|1, query_pos)
            real_and_several = self.query_weight * (num_visible > 1)  # (B, query_pos)
            weight = real_and_several / num_visible.clamp(min=2).log()
            log_keys = torch.einsum("bq,bqn->n", num_visible.clamp(min=1).log().expand_as(self.query_weight),
                                    self.bucket_weight)  # (buckets,)
            # the mask is held so that its id stays unique while it is cached
            self.counts_by_mask[cache_key] = (mask, weight, float(real_and_several.sum()), log_keys.cpu())
        return self.counts_by_mask[cache_key][1:]

    def add(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, visible: VisibleKeys,
            mask: torch.Tensor | None) -> None:
        """queries (B, H, query_pos, d_head), keys (B, H_kv, key_pos, d_head) of the next layer."""
        if queries.shape[1] != self.entropy_sum.shape[1]:
            raise QkspectraError(f"layer {layer} has {queries.shape[1]} heads, expected {self.entropy_sum.shape[1]}")
        entropy, sink = logit_entropy(queries, keys, visible, self.first_key)  # (B, H, query_pos) each
        entropy, sink = entropy.to(torch.float64), sink.to(torch.float64)
        normalized_weight, num_normalized, log_keys = self._normalized_weight(visible, mask)
        self.log_keys_sum[layer] += log_keys
        self.entropy_sum[layer] += torch.einsum("bhq,bq->h", entropy, self.query_weight).cpu()
        self.normalized_sum[layer] += torch.einsum("bhq,bq->h", entropy, normalized_weight).cpu()
        self.sink_sum[layer] += torch.einsum("bhq,bq->h", sink, self.query_weight).cpu()
        self.bucket_sum[layer] += torch.einsum("bhq,bqn->hn", entropy, self.bucket_weight).cpu()
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
