"""Turn the MODEL argument into a local Hugging Face folder and its config.

MODEL is one of
  * the name of a bundled model (``minilm``, the default, ``smollm2`` or ``gemma3``; see ``bundled``),
  * a local Hugging Face model folder (``config.json`` plus safetensors weights,
    single-file or sharded with ``model.safetensors.index.json``, plus tokenizer files),
  * a local ``.gguf`` file: its header checked and its config read from the metadata at once; its tensors
    read one at a time, dequantised on demand (``gguf_tensors``), for the static pass; dequantised whole
    into the cache described in ``gguf_cache`` (in the run's dtype) only when a run loads the model.
Nothing is ever fetched from the Hugging Face hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.bundled import BUNDLED_MODELS, bundled_model_path, bundled_model_version
from qkspectra.models.gguf_cache import cached_gguf_folder


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the Hugging Face folder, or the .gguf file
    model_id: str  # what the user named: bundled name, folder or .gguf path
    kind: str  # "bundled", "folder" or "gguf"
    description: str  # one human-readable line
    config: Any = field(repr=False, compare=False)  # transformers PretrainedConfig
    progress: bool = field(default=True, repr=False, compare=False)  # progress bars while a GGUF is converted

    @property
    def gguf_file(self) -> Path | None:
        """The .gguf file the model is read from, or None for a folder."""
        return self.path if self.path.suffix.lower() == ".gguf" else None

    @property
    def folder(self) -> Path:
        """The Hugging Face folder of the whole model (for a GGUF, the float32 cache entry, converted on first use)."""
        return self.weights_folder()

    def weights_folder(self, dtype: str = "float32") -> Path:
        """The Hugging Face folder to load the whole model from in ``dtype``: the folder itself, or for a
        GGUF the cache entry dequantised into ``dtype`` (converted on first use)."""
        if self.gguf_file is None:
            return self.path
        return cached_gguf_folder(self.path, dtype=dtype, progress=self.progress)


def resolve_model(name_or_path: str, *, progress: bool = True) -> ModelSource:
    """Resolve MODEL (bundled name, folder or .gguf file); converts and caches a GGUF on first use."""
    if name_or_path in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[name_or_path]
        path = bundled_model_path(name_or_path)
        version = bundled_model_version(name_or_path)
        package = f"{bundled.distribution} {version}" if version else bundled.distribution
        description = f"bundled model {bundled.name}: {bundled.upstream} (package {package})"
        if path.suffix == ".gguf":
            description += f", {path.name} dequantised to float32"
            return ModelSource(path, name_or_path, "bundled", description, gguf_config(path), progress)
        return ModelSource(path, name_or_path, "bundled", description, load_config(path))
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(BUNDLED_MODELS)
        raise QkspectraError(f"model {name_or_path!r} is neither a bundled model ({known}) nor an existing path")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise QkspectraError(f"{path} is a file but not a .gguf file; give a model folder or a .gguf file")
        description = f"GGUF file {path.resolve()} dequantised to float32"
        return ModelSource(path, name_or_path, "gguf", description, gguf_config(path), progress)
    description = f"model folder {path.resolve()}"
    return ModelSource(path, name_or_path, "folder", description, load_config(path))


def model_input_paths(name_or_path: str) -> list[Path]:
    """The files MODEL is read from, as named by the user (none for a bundled name).

    A .gguf file itself; in a folder, its config, weights, shard index and tokenizer files.
    """
    if name_or_path in BUNDLED_MODELS:
        return []
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    from qkspectra.models.offline import TOKENIZER_FILES
    from qkspectra.models.tensors import SHARD_INDEX, SINGLE_FILE

    named = ["config.json", "generation_config.json", "special_tokens_map.json", SINGLE_FILE, SHARD_INDEX,
             *TOKENIZER_FILES]
    try:  # the shards, as the index names them
        shards = set(json.loads((path / SHARD_INDEX).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = set()
    return [path / name for name in named] + [path / shard for shard in sorted(shards) if isinstance(shard, str)]


def gguf_config(path: Path) -> Any:
    """The transformers config of the GGUF file ``path``, from its metadata (the file checked for truncation first)."""
    from qkspectra.models.gguf_tensors import read_gguf

    return read_gguf(path).config


def load_config(folder: Path) -> Any:
    """The transformers config of ``folder``; QkspectraError if missing, unreadable or of an unknown type."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise QkspectraError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QkspectraError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise QkspectraError(f"{config_file} has no model_type")
    from transformers import AutoConfig

    from qkspectra.models.offline import transformers_quiet

    try:
        with transformers_quiet(progress=False):
            return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers validates configs with its own error types
        from qkspectra.models.adapters import supported_model_types
        from qkspectra.errors import first_line

        detail = first_line(e).rstrip(":") or type(e).__name__
        supported = "" if raw["model_type"] in supported_model_types() else (
            f" (supported model types: {', '.join(supported_model_types())})")
        raise QkspectraError(
            f"{config_file}: cannot read the config of model type {raw['model_type']!r}: {detail}{supported}"
        ) from e
