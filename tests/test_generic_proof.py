"""The generic reader's tiny-model proof can fail, and does where the reader's model of a block is wrong.

Each case is a model type made here: a Helium (read by the generic reader) whose attention or input
norm does something the reader does not model, registered with transformers under a new model type
name for the test only. Its attention source holds none of the words the class refusal looks for, so
what refuses it is the proof: the reproduction of the tiny model's own attention from each block's
input before its norm. Breaking the proof's norm fold or normalisation makes a plain Helium refused,
so the proof is what lets a model type through.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch import nn
from transformers import CONFIG_MAPPING, MODEL_MAPPING, AutoConfig, AutoModel
from transformers.models.helium.configuration_helium import HeliumConfig
from transformers.models.helium.modeling_helium import HeliumAttention, HeliumModel

import qkspectra.models.adapters.base as adapter_base
from qkspectra.errors import QkspectraError
from qkspectra.models.adapters import ADAPTERS, adapter_for
from qkspectra.models.adapters.generic import norms, proof, reader

TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
            head_dim=12, vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)


class KeyBonusAttention(HeliumAttention):
    """Helium attention that adds a learned bonus per key position to every logit."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.key_bonus = nn.Parameter(torch.zeros(config.max_position_embeddings))  # (positions,)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        bonus = self.key_bonus[:hidden_states.shape[1]]  # (key_pos,), broadcast over (B, H, query_pos, key_pos)
        return super().forward(hidden_states, position_embeddings, attention_mask + bonus, **kwargs)


class OnePlusWeightRMSNorm(nn.Module):
    """An RMSNorm whose gain is 1 + weight (Gemma's convention) where the other layers' gain is the weight."""

    def __init__(self, width, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))  # (width,)
        self.variance_epsilon = eps

    def forward(self, hidden_states):  # (..., width)
        z = hidden_states.float()
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1.0 + self.weight)


class MeanAbsoluteNorm(nn.Module):
    """A norm dividing by the mean absolute value, not the root mean square."""

    def __init__(self, width, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))  # (width,)
        self.variance_epsilon = eps

    def forward(self, hidden_states):  # (..., width)
        return hidden_states / (hidden_states.abs().mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


def key_bonus_attention(model):
    for index, layer in enumerate(model.layers):
        layer.self_attn = KeyBonusAttention(model.config, index)


def one_plus_weight_norm_on_layer_1(model):
    model.layers[1].input_layernorm = OnePlusWeightRMSNorm(model.config.hidden_size, model.config.rms_norm_eps)


def mean_absolute_norms(model):
    for layer in model.layers:
        layer.input_layernorm = MeanAbsoluteNorm(model.config.hidden_size, model.config.rms_norm_eps)


@contextlib.contextmanager
def registered_variant(model_type: str, change):
    """A Helium config and model class, ``change`` applied to each model built, registered as ``model_type``."""
    stem = "".join(part.title() for part in model_type.split("_"))
    config_class = type(f"{stem}Config", (HeliumConfig,), {"model_type": model_type})

    def __init__(self, config):
        HeliumModel.__init__(self, config)
        change(self)

    model_class = type(f"{stem}Model", (HeliumModel,), {"config_class": config_class, "__init__": __init__})
    AutoConfig.register(model_type, config_class)
    AutoModel.register(config_class, model_class)
    try:
        yield config_class(**TINY)
    finally:  # transformers has no unregister: leave its registry as it was
        CONFIG_MAPPING._extra_content.pop(model_type, None)
        MODEL_MAPPING._extra_content.pop(config_class, None)


@pytest.fixture(autouse=True)
def fresh_reader_caches(monkeypatch):
    """The reader's kept layouts and proofs, empty for each test and restored after it."""
    monkeypatch.setattr(reader, "_LAYOUTS", {})
    monkeypatch.setattr(reader, "_VERIFIED", {})


def refusal(config) -> str:
    with pytest.raises(QkspectraError) as error:
        adapter_for(config)
    message = str(error.value)
    assert message.startswith(f"model type '{config.model_type}' cannot be read: ") and "\n" not in message
    return message


@pytest.mark.parametrize(("model_type", "change", "layer"), [
    ("qkspectra_test_key_bonus", key_bonus_attention, 0),
    ("qkspectra_test_layer_1_norm", one_plus_weight_norm_on_layer_1, 1),
], ids=["logit-bias", "norm-differs-on-layer-1"])
def test_a_block_the_reader_does_not_model_is_refused_by_the_proof(model_type, change, layer):
    with registered_variant(model_type, change) as config:
        assert model_type not in ADAPTERS
        message = refusal(config)
    assert f"the generic reader does not reproduce a tiny {model_type}'s own attention (layer {layer}:" in message
    assert model_type not in CONFIG_MAPPING


def test_a_norm_neither_rms_nor_layer_norm_is_refused():
    with registered_variant("qkspectra_test_mean_absolute_norm", mean_absolute_norms) as config:
        message = refusal(config)
    assert "norm layers.{}.input_layernorm (MeanAbsoluteNorm) is neither an RMSNorm nor a LayerNorm" in message


def _no_fold(layer):
    return layer


def _no_normalisation(z, *, centred, eps):
    return z


def _gain_offset_by_one(module, name, config, width=None):
    recipe = norms.norm_recipe(module, name, config, width)
    return dataclasses.replace(recipe, offset=recipe.offset + 1.0)


@pytest.mark.parametrize(("target", "broken"), [
    (adapter_base, {"fold_norm": _no_fold}),
    (proof, {"normalised": _no_normalisation}),
    (proof, {"norm_recipe": _gain_offset_by_one}),
], ids=["norm-gain-not-folded", "block-input-not-normalised", "gain-offset-wrong"])
def test_the_proof_is_what_lets_a_model_type_through(monkeypatch, target, broken):
    config = CONFIG_MAPPING["helium"](**TINY)
    assert adapter_for(config).describe() == "generic, verified on a tiny helium"
    monkeypatch.setattr(reader, "_VERIFIED", {})
    for name, replacement in broken.items():
        monkeypatch.setattr(target, name, replacement)
    assert "the generic reader does not reproduce a tiny helium's own attention" in refusal(config)
