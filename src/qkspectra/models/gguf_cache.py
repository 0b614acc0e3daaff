"""Dequantise a GGUF checkpoint once and keep a safetensors copy in a per-user cache.

Cache folder: ``$QKSPECTRA_CACHE`` if that environment variable is set, else
``~/.cache/qkspectra/models``. Each GGUF file gets its own subfolder
``<gguf stem>-<key>`` (``<gguf stem>-<key>-<dtype>`` for a bfloat16 or float16 copy), where ``key`` is the first 16 hex digits of the sha256 of the
file's absolute path, size and modification time; editing or replacing the GGUF file
therefore produces a new entry. The subfolder is an ordinary Hugging Face model folder
(``config.json``, ``model.safetensors`` in the run's dtype, float32 by default: a bfloat16 run
stores half the bytes; tokenizer files) plus
``qkspectra_source.json`` saying where it came from. It is written to a temporary folder
beside it and renamed into place, so an interrupted conversion leaves no half-written
entry; later runs load it in about a second. Delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from qkspectra.errors import QkspectraError

CACHE_ENV_VAR = "QKSPECTRA_CACHE"
SOURCE_RECORD = "qkspectra_source.json"
_PATCHING = threading.Lock()  # one conversion at a time swaps the gguf/transformers functions


def model_cache_root() -> Path:
    """``$QKSPECTRA_CACHE`` if set, else ``~/.cache/qkspectra/models``."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "qkspectra" / "models"


def gguf_cache_folder(gguf_path: Path, dtype: str = "float32") -> Path:
    """The cache subfolder for ``gguf_path`` dequantised to ``dtype`` (which may not exist yet)."""
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return model_cache_root() / (f"{gguf_path.stem}-{key}" if dtype == "float32" else f"{gguf_path.stem}-{key}-{dtype}")


def is_complete(folder: Path) -> bool:
    return (folder / SOURCE_RECORD).is_file() and (folder / "config.json").is_file()


def cached_gguf_folder(gguf_path: Path, *, dtype: str = "float32", progress: bool = True) -> Path:
    """Hugging Face folder holding ``gguf_path`` dequantised to ``dtype``, converting it on first use."""
    folder = gguf_cache_folder(gguf_path, dtype)
    if is_complete(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as e:
        raise QkspectraError(f"cannot use the model cache {folder.parent} (set by QKSPECTRA_CACHE or the default "
                             f"~/.cache/qkspectra/models): {e.strerror or e}") from None
    try:
        _convert(gguf_path.resolve(), staging, dtype=dtype, progress=progress)
        try:
            os.rename(staging, folder)
        except OSError:
            if not is_complete(folder):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert(gguf_path: Path, out: Path, *, dtype: str = "float32", progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qkspectra.errors import first_line
    from qkspectra.models.gguf_tensors import read_layout
    from qkspectra.models.offline import transformers_quiet

    read_layout(gguf_path)  # a truncated or damaged file said in one line, before transformers' reader fails on it
    with transformers_quiet(progress=progress), _shared_gguf_parsing():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=getattr(torch, dtype), local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        except Exception as e:  # the gguf reader fails in its own ways on damaged files (struct.error, ...)
            raise QkspectraError(f"cannot read GGUF file {gguf_path}: {first_line(e)}") from e
        # A GGUF-loaded model refuses save_pretrained while it still looks quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    stat = gguf_path.stat()
    record = {"gguf_file": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": dtype}
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")



@contextmanager
def _shared_gguf_parsing():
    """While it lasts, ``gguf.GGUFReader`` and ``gguf.get_tensor_name_map`` return one object per argument,
    and transformers' metadata-only ``load_gguf_checkpoint(path)`` a copy of its first answer.

    transformers' GGUF loaders each build their own reader (the model's config, its tensors, the
    tokenizer's config: three for one conversion), and the reader makes a numpy view per vocabulary
    token, ~20 s for gemma-3's 262k tokens; the two config reads then decode every token again; the
    tensor-name map is rebuilt for every module of the model (~400 for SmolLM2, each ~0.02 s). All
    are only read from (the callers get a deep copy of the metadata), so sharing them leaves the
    converted files unchanged; they are rebuilt by each conversion, never kept beyond it. Conversions
    in several threads of one process take turns (the functions are module attributes).
    """
    import copy

    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    readers, name_maps, metadata = {}, {}, {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    def shared_name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    def shared_metadata(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return checkpoint(path, return_tensors, **kwargs)
        key = os.path.realpath(os.fspath(path))
        if key not in metadata:
            metadata[key] = checkpoint(path, return_tensors=False)
        return copy.deepcopy(metadata[key])

    with _PATCHING:  # the originals read while no other conversion has them swapped
        reader, name_map, checkpoint = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint
        gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_name_map
        gguf_utils.load_gguf_checkpoint = shared_metadata
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
            gguf_utils.load_gguf_checkpoint = checkpoint
