"""Checkpoints whose tensor names transformers renames (or fuses) on load are read as transformers loads them.

Each case writes one tiny random model twice: with its modules' names, and in a legacy layout written here
by hand (the inverse of what transformers maps on load). transformers must load the legacy folder to the
same weights (so the layout is one it really maps), and qkspectra's static extraction must give the same
spectra and factors from both folders, bit for bit.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CONFIG_MAPPING, AutoModel, BertConfig

from qkspectra.errors import QkspectraError
from qkspectra.extract.extraction import ExtractOptions, run_extraction
from qkspectra.models.adapters import adapter_for
from qkspectra.models.tensors import SafetensorsSource
from test_adapters import tiny_model

TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, vocab_size=96,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
STATIC = ExtractOptions(static_only=True, quiet=True)


def exaone_legacy(state: dict) -> dict:
    """EXAONE 3's original layout (GPT-2-like names under ``transformer.``)."""
    renames = [(r"^embed_tokens\.", "transformer.wte."), (r"^norm\.", "transformer.ln_f."),
               (r"^layers\.", "transformer.h."), (r"\.self_attn\.o_proj\.", ".attn.attention.out_proj."),
               (r"\.self_attn\.", ".attn.attention."), (r"\.input_layernorm\.", ".ln_1."),
               (r"\.post_attention_layernorm\.", ".ln_2."), (r"\.mlp\.gate_proj\.", ".mlp.c_fc_0."),
               (r"\.mlp\.up_proj\.", ".mlp.c_fc_1."), (r"\.mlp\.down_proj\.", ".mlp.c_proj.")]
    legacy = {}
    for name, tensor in state.items():
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        legacy[name] = tensor
    return legacy


def bert_legacy(state: dict) -> dict:
    """A TensorFlow-era BERT checkpoint: ``bert.`` prefix, LayerNorm ``gamma``/``beta``."""
    return {"bert." + name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
            tensor for name, tensor in state.items()}


def fused_legacy(state: dict, fused: str, renames: list, prefix: str = "") -> dict:
    """``state`` in a legacy layout: each layer's q, k and v projections stacked by rows into one tensor ``fused``
    (in place of ``self_attn.q_proj``), then every name renamed by ``renames`` and given ``prefix``."""
    legacy = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            parts = [state[name.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj")]
            name, tensor = name.replace("self_attn.q_proj", fused), torch.cat(parts)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        for old, new in renames:
            name = name.replace(old, new)
        legacy[prefix + name] = tensor
    return legacy


def nomic_bert_legacy(state: dict) -> dict:
    """nomic-bert's original layout: one fused ``attn.Wqkv`` per layer (q, k, v stacked by rows)."""
    return fused_legacy(state, "attn.Wqkv", [
        ("layers.", "encoder.layers."), ("embeddings.LayerNorm", "emb_ln"), ("self_attn.o_proj", "attn.out_proj"),
        ("mlp.up_proj", "mlp.fc11"), ("mlp.gate_proj", "mlp.fc12"), ("mlp.down_proj", "mlp.fc2"),
        ("post_attention_layernorm", "norm1"), ("post_mlp_layernorm", "norm2")])


def sarvam_moe_legacy(state: dict) -> dict:
    """Sarvam's original layout: ``model.`` prefix, one fused ``attention.query_key_value`` per layer (grouped-query,
    so q, k and v rows of different sizes), its own norm names."""
    return fused_legacy(state, "attention.query_key_value", [
        ("embed_tokens.", "word_embeddings."), ("self_attn.o_proj", "attention.dense"),
        ("self_attn.q_norm", "attention.query_layernorm"), ("self_attn.k_norm", "attention.key_layernorm")],
        prefix="model.")


CASES = {
    "exaone": (lambda: CONFIG_MAPPING["exaone"](num_key_value_heads=2, **TINY), exaone_legacy),
    "bert": (lambda: BertConfig(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
             bert_legacy),
    "nomic_bert": (lambda: CONFIG_MAPPING["nomic_bert"](**TINY), nomic_bert_legacy),
    "sarvam_moe": (lambda: CONFIG_MAPPING["sarvam_moe"](num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=16, **TINY), sarvam_moe_legacy),
}


def write_folders(tmp_path, config, legacy):
    """The model saved with its modules' names (``modern``) and in the legacy layout (``legacy``)."""
    model = tiny_model(config)
    model.save_pretrained(tmp_path / "modern")
    model.save_pretrained(tmp_path / "legacy")  # config.json
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(legacy(state), tmp_path / "legacy" / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("case", CASES)
def test_legacy_layout_reads_as_transformers_loads_it(tmp_path, case):
    make_config, legacy = CASES[case]
    model = write_folders(tmp_path, make_config(), legacy)
    with pytest.raises(QkspectraError):  # read by its own names, the layer is not there
        adapter_for(model.config).layer(SafetensorsSource(tmp_path / "legacy"), 1)

    loaded = AutoModel.from_pretrained(tmp_path / "legacy", local_files_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    modern = run_extraction(str(tmp_path / "modern"), options=STATIC)
    renamed = run_extraction(str(tmp_path / "legacy"), options=STATIC)
    assert renamed.geometry["static"] == modern.geometry["static"]
    assert sorted(renamed.factors) == sorted(modern.factors)
    for name, factor in modern.factors.items():
        np.testing.assert_array_equal(renamed.factors[name], factor)


def test_unrelated_names_are_refused_in_one_line(tmp_path):
    write_folders(tmp_path, CASES["exaone"][0](), lambda state: {
        f"blocks.{i}.weight": tensor for i, tensor in enumerate(state.values())})
    with pytest.raises(QkspectraError) as refusal:
        run_extraction(str(tmp_path / "legacy"), options=STATIC)
    message = str(refusal.value)
    assert "\n" not in message and "no tensor named like 'layers.0.self_attn.q_proj.weight'" in message


def test_fused_tensor_that_does_not_split_is_refused_in_one_line(tmp_path):
    def without_values(state):  # q and k rows only: not the sizes the model's q, k and v projections take
        return {name: tensor[: 48 + 24] if "query_key_value" in name else tensor
                for name, tensor in sarvam_moe_legacy(state).items()}

    write_folders(tmp_path, CASES["sarvam_moe"][0](), without_values)
    with pytest.raises(QkspectraError) as refusal:
        run_extraction(str(tmp_path / "legacy"), options=STATIC)
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith("cannot make tensor 'model.layers.0.self_attn.q_proj.weight' from "
                              "'model.layers.0.attention.query_key_value.weight' as transformers does on load (Split)")
