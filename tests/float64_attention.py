"""Eager attention in float64 throughout, for references: transformers' eager attention (Llama, Qwen3,
Gemma 3, OLMo 2) takes its softmax in float32 whatever the model's dtype, which leaves maps and
activations of a float64 model rounded to about 1e-8. ``float64_eager(monkeypatch, *modules)`` puts this
one in the place of the eager attention of the given ``transformers.models.<name>.modeling_<name>`` modules."""

from __future__ import annotations

import torch


def eager_attention_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """softmax(q k^T * scaling + mask) v with key/value heads repeated; the maps are returned as the eager ones are."""
    if softcap is not None:
        raise NotImplementedError("logit soft-capping")
    group = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)  # in the model's dtype
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def float64_eager(monkeypatch, *modules) -> None:
    for module in modules:
        monkeypatch.setattr(module, "eager_attention_forward", eager_attention_float64)
