"""The rotary frequencies a model uses, taken from its own rotary embedding module built from the config.

``rotary_from_config`` reads the rotated width, base and rope type from the config, computing the
frequencies as the RoPE formula (or transformers' ``ROPE_INIT_FUNCTIONS``) says. A model may compute
them its own way (HunYuan's checkpoints label "dynamic" a fixed NTK ``alpha`` that stretches the base to
base * alpha ** (d / (d - 2))), so the generic reader builds the model's rotary embedding class from the
config on the CPU (no weights: only its frequency buffers), takes its ``inv_freq`` where it differs from
the formula, and refuses a module whose ``attention_scaling`` multiplies cos and sin (it rescales every
logit). A rope type containing "dynamic" recomputes its frequencies in the forward pass for sequences
longer than the module's ``max_seq_len_cached`` (``frequency_limit``), so longer windows are refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from qkspectra.errors import QkspectraError, first_line
from qkspectra.models.adapters.attention import inverse_frequencies
from qkspectra.models.adapters.base import RotaryEmbedding, rotary_from_config

# Relative difference below which the module's float32 frequencies are the formula's (float32 powers of a
# base up to ~1e9 round to ~1e-6); a rope type that rescales frequencies moves some by far more.
SAME_FREQUENCIES_RTOL = 1e-5


def model_rotary(config: Any, rotary_class: type | None, d_head: int,
                 layer_type: str | None) -> tuple[RotaryEmbedding, int | None]:
    """The rotary embedding of layers of kind ``layer_type`` and the longest sequence its frequencies hold for
    (None: any), from the config and the model's rotary class; QkspectraError (one line) if it rescales logits."""
    rotary = rotary_from_config(config, d_head, layer_type)
    if rotary_class is None:  # no rotary module (GPT-J forms its table in the attention): the config's formula
        return rotary, None
    import torch

    try:
        with torch.device("cpu"):
            module = rotary_class(config)
    except Exception as e:  # each class takes its config in its own way
        raise QkspectraError(f"{config.model_type}: cannot build its rotary embedding {rotary_class.__name__} "
                             f"from the config ({first_line(e)})") from e
    prefix = f"{layer_type}_" if layer_type is not None and hasattr(module, f"{layer_type}_inv_freq") else ""
    inv_freq = getattr(module, f"{prefix}inv_freq", None)  # (rotary_dim // 2,) float32
    scaling = getattr(module, f"{prefix}attention_scaling", 1.0)
    rope_type = getattr(module, "rope_type", rotary.rope_type)
    rope_type = rope_type.get(layer_type, rotary.rope_type) if isinstance(rope_type, dict) else rope_type
    where = f"{config.model_type} {rotary_class.__name__}" + (f" ({layer_type} layers)" if prefix else "")
    if not torch.is_tensor(inv_freq):
        raise QkspectraError(f"{where} holds no inv_freq frequencies")
    if float(scaling) != 1.0:
        raise QkspectraError(f"{where} multiplies cos and sin by attention_scaling={float(scaling):g} "
                             f"(rope_type {rope_type!r}), which rescales the logits")
    frequencies = inv_freq.detach().double().numpy()  # (rotary_dim // 2,)
    if frequencies.shape != (rotary.rotary_dim // 2,):
        raise QkspectraError(f"{where} has {frequencies.size} frequencies, but the config rotates "
                             f"{rotary.rotary_dim} of {d_head} head coordinates")
    limit = int(module.max_seq_len_cached) if "dynamic" in str(rope_type) and \
        isinstance(getattr(module, "max_seq_len_cached", None), int) else None
    if "dynamic" in str(rope_type) and limit is None:
        raise QkspectraError(f"{where} recomputes its frequencies with the sequence length ({rope_type!r}) "
                             "and says from which length on")
    if np.allclose(frequencies, inverse_frequencies(rotary), rtol=SAME_FREQUENCIES_RTOL, atol=0.0):
        return rotary, limit  # the formula's frequencies, kept in float64
    return replace(rotary, rope_type=str(rope_type), inv_freq=tuple(float(f) for f in frequencies)), limit
