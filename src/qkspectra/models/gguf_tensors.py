"""Read a GGUF file tensor by tensor, dequantising only what is asked for.

``read_layout(path)`` parses the header (metadata and tensor table) with ``struct`` and checks
that every tensor's bytes lie inside the file, so a truncated or damaged file is reported in one
line before anything else reads it. ``GGUFTensorSource`` is a ``TensorSource`` over the
memory-mapped file: ``get(name)`` takes a transformers checkpoint name
(``model.layers.3.self_attn.q_proj.weight``), finds the GGUF tensor transformers would load into
it (``blk.3.attn_q.weight``), dequantises that one tensor with ``gguf.quants.dequantize`` and
applies transformers' own per-architecture tensor processor (Llama's Q/K row permutation
reversed, Gemma's norms stored as ``w + 1``), in float32 as transformers does, so the values equal
those of the whole model dequantised by transformers. The static pass thus touches only the
query/key projections, their biases and the norms, one layer at a time.

The config is the one transformers builds from the GGUF metadata (``load_gguf_checkpoint`` with
``return_tensors=False``); nothing is fetched from the hub.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qkspectra.errors import QkspectraError, first_line

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# fixed-size metadata value types (GGUF spec): type id -> struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorEntry:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # as ggml stores them, fastest-moving first
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    path: Path
    size: int  # bytes in the file
    architecture: str
    tensors: dict[str, GGUFTensorEntry]
    metadata: dict[str, Any]  # scalars, strings, lists of scalars; string arrays as StringArray(count)

    @property
    def needed(self) -> int:
        """Bytes the file must hold for every tensor's data to be inside it."""
        return max((t.start + t.nbytes for t in self.tensors.values()), default=0)


@dataclass(frozen=True)
class _Skipped:
    count: int


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings (a vocabulary, merges), kept only as its length."""

    count: int


class _Cursor:
    def __init__(self, blob, path: Path):
        self.blob, self.pos, self.path = blob, 0, path

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.blob):
            raise EOFError
        values = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += size
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        if self.pos + length > len(self.blob):
            raise EOFError
        raw = bytes(self.blob[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<IQ")
            if item_kind in _SCALARS:
                width = struct.calcsize(_SCALARS[item_kind])
                if count > 64:  # a token-type table: skipped, only its length matters here
                    self.pos += count * width
                    return _Skipped(count)
                return list(self.unpack(f"<{count}{_SCALARS[item_kind][1]}"))
            if item_kind == _STRING:
                for _ in range(count):  # walked, not decoded
                    (length,) = self.unpack("<Q")
                    self.pos += length
                return StringArray(count)
            for _ in range(count):
                self.value(item_kind)
            return _Skipped(count)
        raise ValueError(f"unknown metadata value type {kind}")


def read_layout(path: Path) -> GGUFLayout:
    """The tensor table of the GGUF file ``path``; QkspectraError (one line) if it is not a readable,
    complete GGUF file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    blob = np.memmap(path, mode="r", dtype=np.uint8) if size else b""
    cursor = _Cursor(blob, path)
    try:
        if bytes(blob[:4]) != GGUF_MAGIC:
            raise ValueError("it does not start with the GGUF magic bytes")
        version, tensor_count, kv_count = cursor.unpack("<4xIQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            (kind,) = cursor.unpack("<I")
            metadata[key] = cursor.value(kind)
        architecture, alignment = metadata.get("general.architecture"), metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        raw = []
        for _ in range(tensor_count):
            name = cursor.string()
            (n_dims,) = cursor.unpack("<I")
            dims = cursor.unpack(f"<{n_dims}Q")
            ggml_type, offset = cursor.unpack("<IQ")
            raw.append((name, ggml_type, dims, offset))
    except (EOFError, struct.error):
        raise QkspectraError(f"cannot read GGUF file {path}: truncated or corrupt, its {size} bytes end inside "
                             f"its header") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise QkspectraError(f"cannot read GGUF file {path}: {first_line(e)}") from None
    if cursor.pos > size:
        raise QkspectraError(f"cannot read GGUF file {path}: truncated or corrupt, its {size} bytes end inside "
                             f"its header")
    if not isinstance(architecture, str) or not isinstance(alignment, int) or alignment <= 0:
        raise QkspectraError(f"cannot read GGUF file {path}: no general.architecture in its metadata")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, ggml_type, dims, offset in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise QkspectraError(f"cannot read GGUF file {path}: tensor {name} has unknown ggml type {ggml_type} "
                                 f"(corrupt file?)") from None
        tensors[name] = GGUFTensorEntry(name, ggml_type, tuple(dims), data_start + offset,
                                        int(np.prod(dims, dtype=np.int64)) * type_size // block)
    layout = GGUFLayout(path, size, architecture, tensors, metadata)
    if layout.needed > size:
        raise QkspectraError(f"GGUF file {path} is truncated: {size} bytes, its tensors need {layout.needed} bytes")
    return layout


@dataclass(frozen=True)
class GGUFModel:
    """What the static pass needs from a GGUF file, read once: tensor table, config, name map."""

    layout: GGUFLayout
    config: Any  # transformers PretrainedConfig
    raw_config: dict  # the dict transformers' GGUF reader built (what its tensor processors see)

    @property
    def streamable(self) -> bool:
        """Whether transformers loads this architecture with its per-tensor (legacy) GGUF reader, the
        one ``GGUFTensorSource`` reproduces; others go through the cached whole-model copy."""
        try:
            from transformers.integrations.gguf import GGUF_ARCHS
        except ImportError:  # a transformers 5 from before the packed loader: every architecture is legacy
            return True
        return self.layout.architecture not in GGUF_ARCHS


def read_gguf(path: Path) -> GGUFModel:
    """Layout (checked), transformers config and raw config dict of the GGUF file ``path``."""
    path = Path(path).resolve()
    stat = path.stat()
    return _read_gguf(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_gguf(path: Path, size: int, mtime_ns: int) -> GGUFModel:
    layout = read_layout(path)
    from transformers import CONFIG_MAPPING

    from qkspectra.models.offline import transformers_quiet

    try:
        with transformers_quiet(progress=False):
            raw = _gguf_config_dict(layout)
            config = CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw))  # as AutoConfig does
    except Exception as e:  # transformers' reader fails in its own ways on files it cannot map
        raise QkspectraError(f"cannot read GGUF file {path}: {first_line(e)}") from e
    return GGUFModel(layout, config, dict(raw))


# architectures whose config transformers' GGUF reader builds with extra steps not mirrored below
_SPECIAL_CONFIG = ("t5", "stablelm", "lfm2", "gpt_oss", "gpt-oss", "minimax", "gemma4", "moe")


def _gguf_config_dict(layout: GGUFLayout) -> dict:
    """The config dict as ``PretrainedConfig.get_config_dict`` reads it from a gguf_file."""
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config, read_gguf_metadata
    except ImportError:
        GGUF_CONFIG_ARCHS = ()
    if layout.architecture in GGUF_CONFIG_ARCHS:
        metadata, tensor_names = read_gguf_metadata(str(layout.path))
        return get_gguf_config(metadata, tensor_names)
    if any(part in layout.architecture for part in _SPECIAL_CONFIG):
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        return load_gguf_checkpoint(str(layout.path), return_tensors=False)["config"]
    return legacy_config_dict(layout)


def legacy_config_dict(layout: GGUFLayout) -> dict:
    """``load_gguf_checkpoint(path, return_tensors=False)["config"]`` for the plain decoder architectures,
    from the metadata already parsed: transformers' own reader decodes every token of the vocabulary
    first (tens of seconds for a 150k vocabulary). Tests compare the two."""
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_CONFIG_DEFAULTS_MAPPING,
        GGUF_SUPPORTED_ARCHITECTURES,
        GGUF_TO_TRANSFORMERS_MAPPING,
    )

    metadata, architecture = layout.metadata, layout.architecture
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    name = metadata.get("general.name")
    updated = "mistral" if "llama" in architecture and name == "mistral" else architecture
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and updated not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF model with architecture {architecture} is not supported yet.")
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in layout.tensors or architecture in (
        "falcon", "bloom")}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {}).items():
        config.setdefault(key, value)
    for key, value in metadata.items():
        prefix, _, config_key = key.replace(architecture, updated).partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        renamed = renames.get(prefix, {}).get(config_key, -1)
        if renamed not in (-1, None):
            config[renamed] = value
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and isinstance(metadata.get("tokenizer.ggml.tokens"), StringArray):
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"].count
    return config


# model types whose gguf-py architecture is spelled otherwise (as in transformers' get_gguf_hf_weights_map)
_GGUF_MODEL_TYPE = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3",
                    "gemma4_text": "gemma4", "umt5": "t5", "minimax_m2": "minimax-m2", "gpt_oss": "gpt-oss"}


def gguf_name_map(model: GGUFModel) -> dict[str, str]:
    """``{transformers checkpoint name: GGUF tensor name}`` as transformers maps them on load, for the
    causal-LM model the cached copy is saved from (built on the meta device: no memory).

    The walk of transformers' ``get_gguf_hf_weights_map`` (each module's state-dict names through
    gguf-py's name map, submodules' names added where not yet mapped), with gguf-py's map built once
    rather than once per submodule (seconds each)."""
    import torch
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    from qkspectra.models.offline import transformers_quiet

    with transformers_quiet(progress=False), torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(model.config)
    model_type = hf_model.config.model_type
    model_type = _GGUF_MODEL_TYPE.get(model_type, model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        raise QkspectraError(f"GGUF file {model.layout.path}: gguf-py has no tensor names for model type {model_type!r}")
    name_map = get_tensor_name_map(arch, hf_model.config.num_hidden_layers)
    processor = _processor(model)

    def walk(module, qual_name: str) -> dict[str, str]:
        mapped = {}
        for hf_name in module.state_dict():
            hf_name = processor.preprocess_name(hf_name)
            name, suffix = hf_name, ""
            if hf_name.endswith(".weight") or hf_name.endswith(".bias"):
                name, suffix = hf_name.rsplit(".", 1)
                suffix = "." + suffix
            gguf_name = name_map.get_name(name)
            if gguf_name is None:
                processor.perform_fallback_tensor_mapping(mapped, suffix, qual_name, hf_name)
                continue
            mapped[gguf_name + suffix] = qual_name + hf_name
        for child_name, child in module.named_children():
            for key, value in walk(child, f"{qual_name}{child_name}.").items():
                mapped.setdefault(key, value)
        return mapped

    return {hf: gguf for gguf, hf in walk(hf_model, "").items() if gguf in model.layout.tensors}


def _processor(model: GGUFModel):
    """transformers' tensor processor for the file's architecture (the inverse of llama.cpp's transforms)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(model.layout.architecture, TensorProcessor)(config=model.raw_config)


class GGUFTensorSource:
    """A ``TensorSource`` over a GGUF file: each tensor dequantised to float32 (then float64) when asked for.

    ``dequantised`` lists the GGUF tensors read so far, in order (each read once per ``get``).
    """

    def __init__(self, model: GGUFModel):
        self.model = model
        self._gguf_name = gguf_name_map(model)
        self._processor = _processor(model)
        self._blob = None
        self.dequantised: list[str] = []

    def names(self) -> frozenset[str]:
        return frozenset(self._gguf_name)

    def dtype(self, name: str) -> str:
        self._entry(name)
        return "float32"  # what the dequantised values are, as in the cached copy

    def _entry(self, name: str) -> GGUFTensorEntry:
        if name not in self._gguf_name:
            raise QkspectraError(f"tensor {name!r} not found in GGUF file {self.model.layout.path}")
        return self.model.layout.tensors[self._gguf_name[name]]

    def get(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        weights = dequantised(self._raw(entry), entry.ggml_type)
        self.dequantised.append(entry.name)
        result = self._processor.process(weights=weights, name=entry.name, tensor_key_mapping={},
                                         parsed_parameters={"tensors": {}})
        # transformers copies the processed array into the model's float32 parameter
        return np.asarray(result.weights, dtype=np.float32).astype(np.float64)

    def _raw(self, entry: GGUFTensorEntry) -> np.ndarray:
        """The tensor's bytes as ``GGUFReader`` views them (values for plain types, bytes by row for blocks)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        if self._blob is None:
            self._blob = np.memmap(self.model.layout.path, mode="r", dtype=np.uint8)
        data = self._blob[entry.start:entry.start + entry.nbytes]
        shape = tuple(reversed(entry.dims))
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64}
        kind = GGMLQuantizationType(entry.ggml_type)
        if kind in plain:
            return data.view(plain[kind]).reshape(shape)
        return data.reshape(quant_shape_to_byte_shape(shape, kind))

    def close(self) -> None:
        """Unmap the file (its pages read so far would stay resident)."""
        self._blob = None


def dequantised(data: np.ndarray, ggml_type: int) -> np.ndarray:
    """``gguf.quants.dequantize`` of one tensor as ``_raw`` gives it: float32 of the tensor's shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        return dequantize(data, GGMLQuantizationType(ggml_type))
    except NotImplementedError as e:
        raise QkspectraError(f"cannot dequantise a GGUF tensor: {first_line(e)}") from e
