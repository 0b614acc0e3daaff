"""Architecture adapters, chosen by ``config.model_type`` from ``ADAPTERS``.

Each adapter maps one architecture's checkpoint tensors to the common ``AttentionLayer``
layout (see ``base``). Supported: see ``supported_model_types()``.
"""

from qkspectra.models.adapters.base import AttentionAdapter, AttentionLayer, QKNorm, RotaryEmbedding
from qkspectra.models.adapters.choose import adapter_for
from qkspectra.models.adapters.registry import ADAPTERS, supported_model_types

__all__ = ["ADAPTERS", "AttentionAdapter", "AttentionLayer", "QKNorm", "RotaryEmbedding", "adapter_for", "supported_model_types"]
