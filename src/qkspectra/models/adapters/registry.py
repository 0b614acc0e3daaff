"""The registry of hand-written adapters, keyed by ``config.model_type``.

Model types not in ``ADAPTERS`` go to the generic reader (``generic``); see ``choose.adapter_for``.
"""

from __future__ import annotations

from qkspectra.models.adapters.albert import AlbertAdapter
from qkspectra.models.adapters.base import AttentionAdapter
from qkspectra.models.adapters.bert import BertAdapter, ElectraAdapter, RobertaAdapter, XLMRobertaAdapter
from qkspectra.models.adapters.distilbert import DistilBertAdapter
from qkspectra.models.adapters.fused import FalconAdapter, GPTBigCodeAdapter, PersimmonAdapter, Phi3Adapter
from qkspectra.models.adapters.gemma3 import Gemma3TextAdapter
from qkspectra.models.adapters.gpt2 import GPT2Adapter
from qkspectra.models.adapters.gpt_neox import GPTNeoXAdapter
from qkspectra.models.adapters.llama import LlamaAdapter
from qkspectra.models.adapters.mistral import MistralAdapter
from qkspectra.models.adapters.olmo2 import Olmo2Adapter
from qkspectra.models.adapters.qwen2 import Qwen2Adapter
from qkspectra.models.adapters.qwen3 import Qwen3Adapter

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
    """The model types with a hand-written adapter, sorted."""
    return sorted(ADAPTERS)
