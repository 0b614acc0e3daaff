"""Finding, loading and reading models: bundled names, local folders, GGUF files (cached).

``resolve_model(MODEL)`` gives a ``ModelSource`` (local folder + config); ``load_model`` the torch
model and tokenizer; ``open_tensors`` reads single tensors lazily from its safetensors; the
``adapters`` map each architecture's tensors to per-head query/key factors.
"""

from qkspectra.models.bundled import BUNDLED_MODELS, DEFAULT_MODEL
from qkspectra.models.gguf_cache import CACHE_ENV_VAR, model_cache_root
from qkspectra.models.loading import load_model
from qkspectra.models.source import ModelSource, resolve_model

__all__ = [
    "BUNDLED_MODELS",
    "CACHE_ENV_VAR",
    "DEFAULT_MODEL",
    "ModelSource",
    "load_model",
    "model_cache_root",
    "resolve_model",
]
