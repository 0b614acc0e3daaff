"""The text the attention-entropy pass reads, cut into token windows.

A corpus is a ``.txt`` file, a folder of them, a ``.jsonl`` file or the bundled default; it is
cut into fixed windows of ``seq_len`` tokens (the default) or one window per line, within a
budget of ``max_tokens``. Reading is deterministic, and ``sha256`` identifies the bytes read.

The method in full: docs/method/corpus.md.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import orjson

from qkspectra.errors import QkspectraError, option

DEFAULT_MAX_TOKENS = 32768
DEFAULT_FUNCTIONAL_TOKENS = 2048  # the functional test's corpus budget (each reconstruction is one pass over it)
DEFAULT_SEQ_LEN_CAP = 512
# Tokenizers without a known maximum report a huge ``model_max_length`` (about 1e30).
_UNKNOWN_MAX_LENGTH = 1_000_000_000


@dataclass(frozen=True)
class Corpus:
    """Token windows ready for a forward pass.

    windows:     token ids per window, special tokens included; lengths vary (pad when batching)
    description: one line saying where the text came from and how it was cut
    sha256:      hex digest of the corpus bytes as read
    num_tokens:  total number of tokens over all windows
    """

    windows: list[list[int]]
    description: str
    sha256: str
    num_tokens: int


@dataclass(frozen=True)
class _Documents:
    texts: list[str]  # one per document, in reading order
    label: str  # e.g. "default corpus", "notes.txt", "folder docs/ (3 .txt files)"
    sha256: str


def default_seq_len(model_or_tokenizer: object) -> int:
    """The default window length: the lesser of 512 and the model's (or tokenizer's) maximum length."""
    max_length = model_max_length(model_or_tokenizer)
    return DEFAULT_SEQ_LEN_CAP if max_length is None else min(DEFAULT_SEQ_LEN_CAP, max_length)


def model_max_length(model_or_tokenizer: object) -> int | None:
    """The longest sequence a model takes (its position table), or a tokenizer's maximum; None if unknown."""
    config = getattr(model_or_tokenizer, "config", None)
    if config is None:
        return tokenizer_max_length(model_or_tokenizer)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenizer_max_length(tokenizer: object) -> int | None:
    """The tokenizer's maximum sequence length, or None when it does not know one."""
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _UNKNOWN_MAX_LENGTH:
        return value
    return None


def load_windows(tokenizer, *, corpus: str | None, seq_len: int | None, max_tokens: int,
                 window_per_line: bool, max_length: int | None = None) -> Corpus:
    """Read a corpus and cut it into token windows (see the module docstring for the rules).

    seq_len: window length (fixed windows; unused with ``window_per_line``).
    max_length: the model's maximum length, where lines are truncated with ``window_per_line``
    (None: the tokenizer's maximum, if it states one).
    Raises QkspectraError for a missing path, an empty corpus, a bad ``.jsonl`` line,
    ``seq_len < 2`` or ``max_tokens < seq_len``.
    """
    if not window_per_line:
        if seq_len is None or seq_len < 2:
            raise QkspectraError(f"{option('seq_len')} must be at least 2, got {seq_len}")
        if max_tokens < seq_len:
            raise QkspectraError(f"{option('max_tokens')} ({max_tokens}) must be at least {option('seq_len')} ({seq_len})")
    documents = _read_documents(corpus)
    if not any(text.strip() for text in documents.texts):
        raise QkspectraError(f"corpus {documents.label} holds no text")
    if window_per_line:
        windows = _line_windows(tokenizer, documents, max_tokens,
                                tokenizer_max_length(tokenizer) if max_length is None else max_length)
        how = "one window per line"
    else:
        windows = _fixed_windows(tokenizer, documents, seq_len, max_tokens)
        how = f"windows of {seq_len} tokens"
    num_tokens = sum(len(w) for w in windows)
    description = f"{documents.label}: {len(windows)} {how}, {num_tokens} tokens"
    return Corpus(windows=windows, description=description, sha256=documents.sha256, num_tokens=num_tokens)


def _read_documents(corpus: str | None) -> _Documents:
    if corpus is None:
        data = (importlib.resources.files("qkspectra") / "data" / "default_corpus.txt").read_bytes()
        return _Documents([_decode(data, "default corpus")], "default corpus (Python standard library docstrings)",
                          hashlib.sha256(data).hexdigest())
    path = Path(corpus)
    if not path.exists():
        raise QkspectraError(f"corpus not found: {corpus}")
    digest = hashlib.sha256()
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise QkspectraError(f"corpus folder {corpus} holds no .txt files")
        texts = []
        for file in files:
            data = file.read_bytes()
            digest.update(data)
            texts.append(_decode(data, str(file)))
        return _Documents(texts, f"{corpus} ({len(files)} .txt files)", digest.hexdigest())
    data = path.read_bytes()
    digest.update(data)
    if path.suffix.lower() == ".jsonl":
        texts = _jsonl_texts(_decode(data, corpus), corpus)
        return _Documents(texts, f"{corpus} ({len(texts)} records)", digest.hexdigest())
    return _Documents([_decode(data, corpus)], corpus, digest.hexdigest())


def corpus_files(path: Path) -> list[Path]:
    """The files a corpus path is read from: itself, or a folder's .txt files in name order."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QkspectraError(f"{where}: not UTF-8 text (byte {e.start})") from None


def _jsonl_texts(text: str, where: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise QkspectraError(f"{where}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise QkspectraError(f'{where}:{number}: no "text" string field')
        texts.append(record["text"])
    return texts


def _special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence, e.g. ([CLS], [SEP])."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe)["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start:start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare):]
    raise QkspectraError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens")


def _fixed_windows(tokenizer, documents: _Documents, seq_len: int, max_tokens: int) -> list[list[int]]:
    prefix, suffix = _special_token_frame(tokenizer)
    n_special = len(prefix) + len(suffix)
    chunk_len = seq_len - n_special
    if chunk_len < 1:
        raise QkspectraError(f"{option('seq_len')} {seq_len} leaves no room for text after the tokenizer's "
                             f"{n_special} special tokens")
    needed = (max_tokens // seq_len + 1) * chunk_len  # content tokens enough to fill the budget
    stream: list[int] = []
    for text in documents.texts:
        if text.strip():
            stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(stream) >= needed:
            break
    if not stream:
        raise QkspectraError(f"corpus {documents.label} holds no tokens")
    windows = []
    budget = max_tokens
    position = 0
    while position < len(stream) and budget > n_special:
        take = min(chunk_len, budget - n_special)
        windows.append(prefix + stream[position:position + take] + suffix)
        position += take
        budget -= len(windows[-1])
    return windows


def _line_windows(tokenizer, documents: _Documents, max_tokens: int, max_length: int | None) -> list[list[int]]:
    special_ids = set(tokenizer.all_special_ids)
    windows = []
    total = 0
    for text in documents.texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            ids = tokenizer(line, truncation=max_length is not None, max_length=max_length)["input_ids"]
            if all(i in special_ids for i in ids):  # nothing but special tokens: no text the tokenizer knows
                continue
            if total + len(ids) > max_tokens:
                if not windows:
                    raise QkspectraError(f"the first line of corpus {documents.label} has {len(ids)} tokens, "
                                         f"more than {option('max_tokens')} {max_tokens}")
                return windows
            windows.append(ids)
            total += len(ids)
    if not windows:
        raise QkspectraError(f"corpus {documents.label} has no line with tokens")
    return windows
