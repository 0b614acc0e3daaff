"""Architecture adapters, chosen by ``config.model_type`` from ``ADAPTERS``.

Each adapter maps one architecture's checkpoint tensors to the common ``AttentionLayer``
layout (see ``base``). Supported: see ``supported_model_types()``.
"""

from __future__ import annotations

from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.albert import AlbertAdapter
from qkspectra.models.adapters.base import AttentionAdapter, AttentionLayer, QKNorm, RotaryEmbedding
from qkspectra.models.adapters.bert import BertAdapter
from qkspectra.models.adapters.fused import (
    DistilBertAdapter,
    ElectraAdapter,
    FalconAdapter,
    GPTBigCodeAdapter,
    PersimmonAdapter,
    Phi3Adapter,
    RobertaAdapter,
    XLMRobertaAdapter,
)
from qkspectra.models.adapters.gpt2 import GPT2Adapter
from qkspectra.models.adapters.gpt_neox import GPTNeoXAdapter
from qkspectra.models.adapters.llama import LlamaAdapter
from qkspectra.models.adapters.mistral import MistralAdapter
from qkspectra.models.adapters.qk_norm import Gemma3TextAdapter, Olmo2Adapter, Qwen3Adapter
from qkspectra.models.adapters.qwen2 import Qwen2Adapter

ADAPTERS: dict[str, type[AttentionAdapter]] = {
    adapter.model_type: adapter
    for adapter in (
        AlbertAdapter,
        BertAdapter,
        DistilBertAdapter,
        ElectraAdapter,
        FalconAdapter,
        Gemma3TextAdapter,
        GPTBigCodeAdapter,
        GPT2Adapter,
        GPTNeoXAdapter,
        LlamaAdapter,
        MistralAdapter,
        Olmo2Adapter,
        PersimmonAdapter,
        Phi3Adapter,
        Qwen2Adapter,
        Qwen3Adapter,
        RobertaAdapter,
        XLMRobertaAdapter,
    )
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config: Any) -> AttentionAdapter:
    """The adapter for ``config.model_type``; QkspectraError naming it if unsupported or misconfigured.

    Model types without a hand-written adapter are read by the generic reader once it has proved
    itself on a tiny random model of the same config class (``generic``), or refused in one line.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        from qkspectra.models.adapters.generic import generic_adapter

        adapter = generic_adapter(config)
        adapter.check_dimensions()
        return adapter
    try:
        adapter = ADAPTERS[model_type](config)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # e.g. a head count that is a string
        raise QkspectraError(f"{model_type} config: cannot read the attention's shapes ({e})") from None
    adapter.check_dimensions()
    return adapter


__all__ = ["ADAPTERS", "AttentionAdapter", "AttentionLayer", "QKNorm", "RotaryEmbedding", "adapter_for", "supported_model_types"]
