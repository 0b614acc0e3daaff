"""The generic reader: model types without a hand-written adapter, read only once proved on a tiny model.

Each case is a small random checkpoint of a current family that transformers ships. The reader must
verify itself on its own tiny model of the same config class, and then its layers (weights, biases,
scale, norms, positions, windows) must reproduce this checkpoint's own eager attention to 1e-5.
Refusals are one line naming the model type and what is not modelled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CONFIG_MAPPING

from qkspectra.errors import QkspectraError
from qkspectra.extract.spectra import static_spectra
from qkspectra.models.adapters import ADAPTERS, adapter_for
from qkspectra.models.adapters.attention import attention_probabilities, queries_and_keys
from qkspectra.models.adapters.generic import generic_adapter
from qkspectra.models.supported import VERIFIED_GENERIC_TYPES, replace_models_section
from qkspectra.models.tensors import StateDictSource
from test_adapters import tiny_model

TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
            vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
SEQ_LEN = 10

# model type -> extra config options; what each covers is in VERIFIED_GENERIC_TYPES (the list in docs/models.md)
GENERIC_CASES = {
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 12},
    "exaone4": {"head_dim": 12},
    "gemma": {"head_dim": 12},
    "granite": {"attention_multiplier": 1.0},
    "phi": {"partial_rotary_factor": 0.5},
    "stablelm": {"partial_rotary_factor": 0.5, "use_qkv_bias": True},
    "glm": {"head_dim": 12, "partial_rotary_factor": 0.5},
    "cohere": {},
    # Command R7B / Command A: rope only on the windowed layers, inside the forward code (no use_rope)
    "cohere2": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "helium": {"head_dim": 12},
    "starcoder2": {"sliding_window": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 16},
    "smollm3": {},
    "seed_oss": {"head_dim": 12, "attention_bias": True},
    "arcee": {},
    "apertus": {"head_dim": 12},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "attention_multiplier": 0.3},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "gptj": {"rotary_dim": 6},
    "olmo": {"clip_qkv": 0.5},
    "hunyuan_v1_dense": {"head_dim": 12},
}
# HunYuan dense checkpoints' rope: "dynamic" with a fixed NTK alpha (their config's rope_scaling, factor 1)
HUNYUAN_NTK_ALPHA = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
# case -> (model type, extra config options): more options of a verified type, proved and read as above
GENERIC_VARIANTS = {
    "stablelm-qk_layernorm": ("stablelm", {"partial_rotary_factor": 0.5, "use_qkv_bias": True, "qk_layernorm": True}),
    "hunyuan_v1_dense-ntk_alpha": ("hunyuan_v1_dense", {"head_dim": 12, "rope_parameters": HUNYUAN_NTK_ALPHA}),
    # no_rope_layers from the default no_rope_layer_interval 4: [1, 1, 1, 0, 1, 1, 1, 0], layers 3 and 7 unrotated
    "smollm3-no_rope_layers": ("smollm3", {"num_hidden_layers": 8}),
    # EXAONE 4.0 hybrid: windowed layers rotated, global ones not (its forward code, no use_rope); every module keeps
    # the config's sliding_window, only is_sliding says which are windowed
    "exaone4-hybrid": ("exaone4", {"head_dim": 12, "sliding_window": 4,
                                   "layer_types": ["sliding_attention", "full_attention"]}),
}


def tiny_checkpoint(model_type: str, **extra):
    return tiny_model(CONFIG_MAPPING[model_type](**{**TINY, **extra}))


def assert_reproduces_own_attention(model, adapter, seq_len=SEQ_LEN):
    """The adapter's layers, read from the checkpoint's tensors, give the model's own eager attention."""
    modules = dict(model.named_modules())
    inputs = []
    handles = [modules[adapter.layout.attention.format(i)].register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
        for i in range(adapter.num_layers)]
    input_ids = torch.randint(3, 96, (2, seq_len), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        attentions = model(input_ids=input_ids, output_attentions=True).attentions
    for handle in handles:
        handle.remove()
    tensors = StateDictSource(model.state_dict())
    for index, x in enumerate(inputs):
        ours = attention_probabilities(adapter.layer(tensors, index), x.double(), causal=adapter.layout.causal)
        np.testing.assert_allclose(ours.numpy(), attentions[index].double().numpy(), atol=1e-5)


@pytest.mark.parametrize(("model_type", "extra"), [*GENERIC_CASES.items(), *GENERIC_VARIANTS.values()],
                         ids=[*GENERIC_CASES, *GENERIC_VARIANTS])
def test_generic_reader_proves_itself_and_reads_the_checkpoint(model_type, extra):
    assert model_type not in ADAPTERS
    model = tiny_checkpoint(model_type, **extra)
    adapter = adapter_for(model.config)
    assert adapter.describe() == f"generic, verified on a tiny {model_type}"
    assert_reproduces_own_attention(model, adapter)
    static = static_spectra(adapter, StateDictSource(model.state_dict()))
    assert np.isfinite(np.array([row["metric_singvals_per_head"] for row in static.rows])).all()


def test_the_cases_cover_the_attention_options_the_issue_names():
    layers = {}
    for model_type in ("olmoe", "qwen3_moe", "granitemoe", "granite", "phi"):
        model = tiny_checkpoint(model_type, **GENERIC_CASES[model_type])
        adapter = adapter_for(model.config)
        layers[model_type] = adapter.layer(StateDictSource(model.state_dict()), 0)
    assert layers["olmoe"].q_norm.over == "projection" and layers["qwen3_moe"].q_norm.over == "head"
    assert layers["granitemoe"].scale == 0.3  # attention_multiplier, not 1/sqrt(d_head)
    assert layers["granite"].scale == 1.0
    assert layers["phi"].rotary.rotary_dim == 6  # half of d_head 12


def test_gpt_neo_and_gpt_j_positions_windows_and_scales():
    neo = tiny_checkpoint("gpt_neo", **GENERIC_CASES["gpt_neo"])
    gptj = tiny_checkpoint("gptj", **GENERIC_CASES["gptj"])
    neo_layers = [adapter_for(neo.config).layer(StateDictSource(neo.state_dict()), i) for i in range(2)]
    gptj_layer = adapter_for(gptj.config).layer(StateDictSource(gptj.state_dict()), 0)
    assert [layer.sliding_window for layer in neo_layers] == [None, 4]  # "global", then "local" over 4 keys
    assert [layer.scale for layer in neo_layers] == [1.0, 1.0]  # GPT-Neo's logit is q . k, unscaled
    assert (gptj_layer.rotary.rotary_dim, gptj_layer.rotary.interleaved) == (6, True)  # rotate_every_two on 6 of 12
    assert gptj_layer.scale == gptj.h[0].attn.scaling


@pytest.mark.parametrize("model_type", ["gpt_neo", "gptj"])
def test_spectra_equal_a_dense_computation_from_the_models_own_modules(model_type):
    """Singular values of s diag(g) W_Q^h W_K^h^T diag(g), from q_proj/k_proj and the ln_1 gain g, in float64."""
    model = tiny_checkpoint(model_type, **GENERIC_CASES[model_type])
    static = static_spectra(adapter_for(model.config), StateDictSource(model.state_dict()))  # folds ln_1's gain
    assert static.norm_folded == [True, True]
    for index, block in enumerate(model.h):
        attention = block.attn.attention if model_type == "gpt_neo" else block.attn
        scale = 1.0 if model_type == "gpt_neo" else attention.scaling  # GPT-Neo multiplies by nothing
        gain = block.ln_1.weight.detach().double()  # (d_model,)
        heads = attention.num_heads if model_type == "gpt_neo" else attention.num_attention_heads
        W_Q = attention.q_proj.weight.detach().double().unflatten(0, (heads, -1))  # (H, d_head, d_model)
        W_K = attention.k_proj.weight.detach().double().unflatten(0, (heads, -1))  # (H, d_head, d_model)
        metric = scale * (gain[:, None] * W_Q.transpose(1, 2)) @ (W_K * gain)  # (H, d_model, d_model)
        dense = torch.linalg.svdvals(metric)[:, :W_Q.shape[1]]  # (H, d_head)
        np.testing.assert_allclose(static.rows[index]["metric_singvals_per_head"], dense.numpy(), rtol=1e-10)


def test_norms_without_parameters_clips_and_norms_after_rotary_are_read_in_the_models_order():
    """OLMo's LayerNorm has no parameters (gain 1, its code's eps 1e-5); clip_qkv clamps queries and keys after
    the projection (OLMo) or after the q/k norms (OLMoE); HunYuan normalises the rotated queries and keys.
    Each reproduces its own attention only in its own order, and the clips are reached."""
    from dataclasses import replace

    olmo = tiny_checkpoint("olmo")
    adapter = adapter_for(olmo.config)
    layer = adapter.layer(StateDictSource(olmo.state_dict()), 0)
    assert (layer.norm_gain == 1).all() and layer.norm_bias is None and adapter.input_norm.eps == 1e-5
    assert layer.clip is None
    assert_reproduces_own_attention(olmo, adapter)
    for model_type, extra, wrong in (
            ("olmo", {"clip_qkv": 0.5}, {"clip": None}),
            ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 0.5}, {"clip_after_qk_norm": False}),
            ("hunyuan_v1_dense", {"head_dim": 12}, {"qk_norm_after_rotary": False})):
        model = tiny_checkpoint(model_type, **extra)
        adapter = adapter_for(model.config)
        layer = adapter.layer(StateDictSource(model.state_dict()), 0)
        assert all(getattr(layer, field) != value for field, value in wrong.items())
        assert_reproduces_own_attention(model, adapter)
        if "clip_qkv" in extra:
            unclipped = replace(layer, clip=None)
            x = torch.randn(1, SEQ_LEN, adapter.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            q, _ = queries_and_keys(unclipped, x, torch.arange(SEQ_LEN)[None])
            assert (q.abs() > 0.5 * layer.scale).double().mean() > 0.1  # the clip is reached
        with pytest.raises(AssertionError):  # the other order does not reproduce it
            assert_reproduces_own_attention(model, _with_layers(adapter, **wrong))


def _with_layers(adapter, **fields):
    """The adapter with ``fields`` replaced in every layer it reads."""
    from dataclasses import replace

    class Changed(type(adapter)):
        def layer(self, tensors, index):
            return replace(super().layer(tensors, index), **fields)

    changed = object.__new__(Changed)
    changed.__dict__.update(adapter.__dict__)
    return changed


@pytest.mark.parametrize("model_type", ["olmo", "hunyuan_v1_dense", "cohere2"])
def test_static_spectra_are_those_of_the_dense_metric_of_the_models_own_modules(model_type):
    """float64 singular values of M_h = s * A W_Q[h] diag(g_q g_k / (r_Q r_K)) W_K[h]^T A, formed densely from
    the modules' weights: A the input norm's gain (1 for OLMo's LayerNorm), r the RMS of queries and keys
    for isotropic unit-RMS input to the norm's output (1 without q/k norms), any clip left out."""
    model = tiny_checkpoint(model_type, **GENERIC_CASES[model_type])
    rows = static_spectra(adapter_for(model.config), StateDictSource(model.state_dict())).rows
    for index, block in enumerate(model.layers):
        attention = block.self_attn
        d_head, heads = attention.head_dim, model.config.num_attention_heads
        gain = getattr(block.input_layernorm, "weight", None)
        A = np.diag(np.ones(model.config.hidden_size) if gain is None else gain.detach().double().numpy())
        W_Q = (A @ attention.q_proj.weight.detach().double().numpy().T).reshape(-1, heads, d_head)  # (d, H, d_head)
        W_K = (A @ attention.k_proj.weight.detach().double().numpy().T).reshape(A.shape[0], -1, d_head)
        W_K = np.repeat(W_K, heads // W_K.shape[1], axis=1)  # (d, H, d_head) one key head per query head
        norms = [getattr(attention, name, None) for name in ("query_layernorm", "key_layernorm")]
        g = np.ones(d_head) if norms[0] is None else \
            norms[0].weight.detach().double().numpy() * norms[1].weight.detach().double().numpy()  # (d_head,)
        r_Q = np.sqrt((W_Q**2).sum((0, 2)) / d_head) if norms[0] is not None else np.ones(heads)  # (H,)
        r_K = np.sqrt((W_K**2).sum((0, 2)) / d_head) if norms[1] is not None else np.ones(heads)
        for h in range(heads):
            M = attention.scaling * (W_Q[:, h] * g) @ W_K[:, h].T / (r_Q[h] * r_K[h])  # (d_model, d_model)
            dense = np.linalg.svd(M, compute_uv=False)[:d_head]
            np.testing.assert_allclose(rows[index]["metric_singvals_per_head"][h], dense, rtol=1e-10)


def _with_layer_norms(adapter, reorder):
    """The adapter with each layer's q/k norm gain rows (heads, d_head) replaced by ``reorder(rows)``."""
    from dataclasses import replace

    class Changed(type(adapter)):
        def layer(self, tensors, index):
            layer = super().layer(tensors, index)
            return replace(layer, q_norm=replace(layer.q_norm, gain=reorder(layer.q_norm.gain)),
                           k_norm=replace(layer.k_norm, gain=reorder(layer.k_norm.gain)))

    changed = object.__new__(Changed)
    changed.__dict__.update(adapter.__dict__)
    return changed


def test_a_norm_module_per_head_is_read_as_one_gain_row_per_head():
    """StableLM's qk_layernorm holds one LayerNorm (weight, no bias) per head in ``norms``: the layer's q/k norms
    are those weights row by row, centred over each head's coordinates; rows in another order do not reproduce it."""
    model_type, extra = GENERIC_VARIANTS["stablelm-qk_layernorm"]
    model = tiny_checkpoint(model_type, **extra)
    adapter = adapter_for(model.config)
    tensors = StateDictSource(model.state_dict())
    for index, block in enumerate(model.layers):
        layer = adapter.layer(tensors, index)
        for norm, module in ((layer.q_norm, block.self_attn.q_layernorm), (layer.k_norm, block.self_attn.k_layernorm)):
            assert all(member.bias is None for member in module.norms)
            rows = torch.stack([member.weight for member in module.norms]).detach().double().numpy()  # (heads, d_head)
            assert (norm.over, norm.centred, norm.bias, norm.eps) == ("head", True, None, model.config.layer_norm_eps)
            np.testing.assert_array_equal(norm.gain, rows)
        assert layer.q_norm.gain.shape == (4, 12) and layer.k_norm.gain.shape == (2, 12)  # H, H_kv rows
    assert_reproduces_own_attention(model, adapter)
    with pytest.raises(AssertionError):
        assert_reproduces_own_attention(model, _with_layer_norms(adapter, lambda rows: rows[::-1].copy()))


def test_a_per_head_norm_container_is_learned_only_if_it_applies_norm_h_to_head_h():
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

    from qkspectra.models.adapters.generic.norms import norm_recipe

    class Reversed(StableLmLayerNormPerHead):  # norm h applied to head H - 1 - h
        def forward(self, hidden_states):  # (B, H, T, d_head)
            return super().forward(hidden_states.flip(1)).flip(1)

    config = CONFIG_MAPPING["stablelm"](**TINY)
    name = "layers.{}.self_attn.q_layernorm"
    for cls in (StableLmLayerNormPerHead, Reversed):
        module = cls(12, 4, eps=1e-5)
        with torch.no_grad():
            for member in module.norms:
                member.weight.normal_(1.0, 0.2)
        recipe = norm_recipe(module, name, config)
        if cls is StableLmLayerNormPerHead:
            assert (recipe.per_head, recipe.centred, recipe.has_bias, recipe.offset, recipe.eps) == \
                ("norms", True, False, 0.0, 1e-5)
        else:
            assert recipe == f"norm {name} (Reversed) does not apply its norm h to head h"


def test_stablelm_per_head_qk_norm_spectra_equal_a_dense_computation_from_the_models_own_modules():
    """float64 singular values of M_h = s * A W_Q[h] P diag(g_q[h] g_k[h'] / (r_Q r_K)) P W_K[h']^T A, with A the
    input LayerNorm's gain, P the centring of a head's coordinates, g the per-head norms' weights, h' = h's key head
    and r the RMS of the centred queries/keys (input LayerNorm bias and q/k biases included) for isotropic unit-RMS
    input to that norm's output."""
    model_type, extra = GENERIC_VARIANTS["stablelm-qk_layernorm"]
    model = tiny_checkpoint(model_type, **extra)
    rows = static_spectra(adapter_for(model.config), StateDictSource(model.state_dict())).rows
    for index, block in enumerate(model.layers):
        attention, ln = block.self_attn, block.input_layernorm
        H, d_head = model.config.num_attention_heads, attention.head_dim
        H_kv = model.config.num_key_value_heads
        A = np.diag(ln.weight.detach().double().numpy())  # (d, d)
        beta = ln.bias.detach().double().numpy()  # (d,)
        P = np.eye(d_head) - 1.0 / d_head  # (d_head, d_head) centring

        def side(proj, norm, heads):  # -> (heads, d, d_head) centred factors divided by r, times g
            W = proj.weight.detach().double().numpy().reshape(heads, d_head, -1).transpose(0, 2, 1)  # (heads, d, dh)
            b = proj.bias.detach().double().numpy().reshape(heads, d_head) + np.einsum("d,hde->he", beta, W)
            W, b = A @ W @ P, b @ P  # (heads, d, d_head), (heads, d_head)
            r = np.sqrt(((W ** 2).sum((1, 2)) + (b ** 2).sum(1)) / d_head)  # (heads,)
            g = np.stack([member.weight.detach().double().numpy() for member in norm.norms])  # (heads, d_head)
            return W * (g / r[:, None])[:, None, :]

        Q, K = side(attention.q_proj, attention.q_layernorm, H), side(attention.k_proj, attention.k_layernorm, H_kv)
        for h in range(H):
            M = attention.scaling * Q[h] @ K[h // (H // H_kv)].T  # (d_model, d_model)
            dense = np.linalg.svd(M, compute_uv=False)[:d_head]  # the last ~0: centring takes one dimension
            np.testing.assert_allclose(rows[index]["metric_singvals_per_head"][h], dense, rtol=1e-10, atol=1e-14)


def test_hunyuan_ntk_alpha_frequencies_are_those_of_its_own_rotary_embedding():
    """HunYuan's "dynamic" rope with a fixed alpha stretches the base to base * alpha ** (d / (d - 2)) at every
    length; the config's plain base does not reproduce the model."""
    from dataclasses import replace

    model_type, extra = GENERIC_VARIANTS["hunyuan_v1_dense-ntk_alpha"]
    model = tiny_checkpoint(model_type, **extra)
    adapter = adapter_for(model.config)
    rotary = adapter.layer(StateDictSource(model.state_dict()), 0).rotary
    stretched = 10000.0 * 1000.0 ** (12 / 10)
    np.testing.assert_allclose(rotary.inv_freq, stretched ** (-np.arange(0, 12, 2) / 12), rtol=1e-6)
    assert adapter.frequency_limit is None and "ntk_alpha frequencies" in adapter.describe_positions()
    assert_reproduces_own_attention(model, adapter, seq_len=40)
    with pytest.raises(AssertionError):
        assert_reproduces_own_attention(model, _with_layers(adapter, rotary=replace(rotary, inv_freq=None)))


def test_dynamic_rope_is_read_within_the_position_table_and_longer_windows_are_refused():
    """Dynamic NTK rope keeps the plain frequencies up to max_position_embeddings and recomputes them beyond:
    within it the reader reproduces the model; beyond it the model's attention changes, so it refuses."""
    model = tiny_checkpoint("smollm3", max_position_embeddings=12,
                            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    adapter = adapter_for(model.config)
    assert adapter.frequency_limit == 12
    assert_reproduces_own_attention(model, adapter, seq_len=12)
    adapter.check_sequence_length(12)
    with pytest.raises(AssertionError):  # the model's own frequencies moved
        assert_reproduces_own_attention(model, adapter, seq_len=16)
    with pytest.raises(QkspectraError, match="^smollm3 uses dynamic rope, whose frequencies change beyond 12 tokens"):
        adapter.check_sequence_length(13)


def test_layers_whose_module_skips_the_rotary_embedding_are_read_without_it():
    """SmolLM3 skips rope on every fourth layer (``use_rope`` from ``no_rope_layers``): those layers, and only
    they, have no rotary embedding, and the reader reproduces every layer, over a window long enough that
    reading a no-rope layer with rotary would differ."""
    model_type, extra = GENERIC_VARIANTS["smollm3-no_rope_layers"]
    model = tiny_checkpoint(model_type, **extra)
    assert model.config.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    adapter = adapter_for(model.config)
    layers = [adapter.layer(StateDictSource(model.state_dict()), index) for index in range(8)]
    assert [layer.rotary is None for layer in layers] == [not m.self_attn.use_rope for m in model.layers]
    assert [index for index, layer in enumerate(layers) if layer.rotary is None] == [3, 7]
    assert adapter.rotary is None and adapter.describe_positions().endswith("no rotary embedding on layers 3, 7")
    assert_reproduces_own_attention(model, adapter, seq_len=24)


@pytest.mark.parametrize("case", ["exaone4-hybrid", "cohere2"])
def test_layer_types_whose_forward_code_skips_the_rotary_embedding_are_learned_and_read_without_it(case):
    """EXAONE 4.0 (hybrid) and Cohere 2 rotate only their windowed layers, in their forward code, with no module
    attribute saying so: the proof learns that "full_attention" layers are unrotated, the real model's global layers
    are read with no rotary embedding and its windowed ones with it, and every layer reproduces the model's own
    attention over 16 tokens (beyond the window of 4); rotating the global layers would not."""
    model_type, extra = GENERIC_VARIANTS[case] if case in GENERIC_VARIANTS else (case, GENERIC_CASES[case])
    model = tiny_checkpoint(model_type, **{**extra, "num_hidden_layers": 4,
                                           "layer_types": ["sliding_attention", "full_attention"] * 2})
    adapter = adapter_for(model.config)
    assert adapter.layout.rotary_layers == (None,) * 4 and adapter.unrotated_types == ("full_attention",)
    layers = [adapter.layer(StateDictSource(model.state_dict()), index) for index in range(4)]
    assert [layer.rotary is None for layer in layers] == [False, True] * 2
    assert [layer.sliding_window for layer in layers] == [4, None] * 2
    assert layers[0].rotary.interleaved == (model_type == "cohere2")  # Cohere's rotate_half pairs neighbours
    assert adapter.describe_positions().endswith("no rotary embedding on layers 1, 3")
    assert_reproduces_own_attention(model, adapter, seq_len=16)
    with pytest.raises(AssertionError):
        assert_reproduces_own_attention(model, _with_layers(adapter, rotary=layers[0].rotary), seq_len=16)


def test_the_proof_names_the_first_layer_failing_under_the_most_plausible_order(monkeypatch):
    """Were a layer type's rotation not learnable (here: its layers said to be rotated by their modules), the
    refusal names the first global layer of the tiny Cohere 2 (layer 1) under the order that reproduced layer 0,
    not layer 0 under the last order tried."""
    from qkspectra.models.adapters.generic import layout as layout_module, reader

    monkeypatch.setattr(layout_module, "rotary_switch", lambda module: True)
    monkeypatch.setattr(reader, "_VERIFIED", {})
    monkeypatch.setattr(reader, "_LAYOUTS", {})
    config = CONFIG_MAPPING["cohere2"](**{**TINY, **GENERIC_CASES["cohere2"]})
    with pytest.raises(QkspectraError, match=r"^model type 'cohere2' cannot be read: the generic reader does not "
                       r"reproduce a tiny cohere2's own attention \(layer 1: largest difference ") as error:
        generic_adapter(config)
    assert "\n" not in str(error.value)


def test_the_tiny_model_has_a_layer_of_each_per_layer_kind_of_the_real_one():
    """A real SmolLM3 (36 layers, no_rope_layers derived from the interval 4) gives a tiny config with a rope
    and a no-rope layer, twice; a config whose per-layer lists agree on every layer gives two layers."""
    from qkspectra.models.adapters.generic import tiny_config
    from qkspectra.models.adapters.generic.layout import meta_model, read_layout

    real = CONFIG_MAPPING["smollm3"](num_hidden_layers=36)
    tiny = tiny_config(real)
    assert (tiny.num_hidden_layers, tiny.no_rope_layers) == (4, [1, 0, 1, 0])
    assert tiny.layer_types == ["full_attention"] * 4
    assert set(read_layout(meta_model(tiny)).kinds()) == set(read_layout(meta_model(real)).kinds()) == {
        ("full_attention", False, True), ("full_attention", False, False)}
    windowed = CONFIG_MAPPING["smollm3"](num_hidden_layers=8, use_sliding_window=True, sliding_window=64)
    assert list(zip(tiny_config(windowed).layer_types, tiny_config(windowed).no_rope_layers)) == [
        ("full_attention", 1), ("sliding_attention", 0)] * 2  # SmolLM3 windows its no-rope layers
    assert tiny_config(CONFIG_MAPPING["smollm3"](num_hidden_layers=3)).num_hidden_layers == 2


def test_a_real_layer_of_a_kind_the_tiny_model_lacks_is_refused(monkeypatch):
    """Were the tiny config to drop the per-layer lists, its two layers would all be rotated: the real model's
    no-rope layers would be misread, so the reader refuses it naming the first such layer."""
    from qkspectra.models.adapters.generic import proof, reader

    def without_per_layer_lists(config):
        return CONFIG_MAPPING["smollm3"](**{**TINY, "hidden_size": 64, "head_dim": 16, "vocab_size": 128})

    monkeypatch.setattr(reader, "tiny_config", without_per_layer_lists)
    monkeypatch.setattr(proof, "tiny_config", without_per_layer_lists)
    monkeypatch.setattr(reader, "_VERIFIED", {})
    config = CONFIG_MAPPING["smollm3"](**{**TINY, "num_hidden_layers": 4})
    with pytest.raises(QkspectraError, match="^model type 'smollm3' cannot be read: its layer 3 "
                       r"\(full_attention, not windowed, without rotary embedding\) is of a kind its tiny model "
                       "lacks") as error:
        generic_adapter(config)
    assert "\n" not in str(error.value)


def test_a_rotary_embedding_that_rescales_cos_and_sin_is_refused():
    from transformers.models.helium.modeling_helium import HeliumRotaryEmbedding

    from qkspectra.models.adapters.generic.rotary import model_rotary

    class Scaled(HeliumRotaryEmbedding):
        def __init__(self, config):
            super().__init__(config)
            self.attention_scaling = 1.2

    config = CONFIG_MAPPING["helium"](**TINY, head_dim=12)
    assert model_rotary(config, HeliumRotaryEmbedding, 12, None)[0].inv_freq is None  # the plain formula's
    with pytest.raises(QkspectraError, match="^helium Scaled multiplies cos and sin by attention_scaling=1.2 ") as e:
        model_rotary(config, Scaled, 12, None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_type", ["qwen3", "olmo2", "gemma3_text", "llama", "mistral", "qwen2"])
def test_generic_reader_agrees_with_the_hand_written_adapters(model_type):
    extra = {"head_dim": 12} if model_type in ("qwen3", "gemma3_text", "llama", "mistral") else {}
    if model_type == "gemma3_text":
        extra.update(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    model = tiny_checkpoint(model_type, **extra)
    tensors = StateDictSource(model.state_dict())
    generic, hand_written = generic_adapter(model.config), adapter_for(model.config)
    assert_reproduces_own_attention(model, generic)
    for ours, theirs in zip(static_spectra(generic, tensors).rows, static_spectra(hand_written, tensors).rows):
        np.testing.assert_allclose(ours["metric_singvals_per_head"], theirs["metric_singvals_per_head"], rtol=1e-12)


@pytest.mark.parametrize(("model_type", "extra", "message"), [
    ("gemma2", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 (soft-capping of the attention logits)"),
    ("bloom", {}, "adds ALiBi position biases"),
    ("mpt", {"attn_config": {"alibi": True}}, "attn_config.alibi=True (ALiBi position biases)"),
    ("falcon", {"alibi": True}, "falcon config sets alibi=True"),
    ("t5", {}, "relative-position terms"),
    ("deberta", {"relative_attention": True}, "relative_attention=True (relative-position terms)"),
    ("gpt_oss", {}, "learned attention sinks"),
], ids=["gemma2-softcap", "bloom-alibi", "mpt-alibi", "falcon-alibi", "t5-relative", "deberta-relative", "gpt_oss-sinks"])
def test_what_changes_the_logit_beyond_a_scaled_dot_product_is_refused(model_type, extra, message):
    config = CONFIG_MAPPING[model_type](**extra)
    prefix = f"{model_type} config" if model_type in ADAPTERS else f"model type '{model_type}' cannot be read: "
    with pytest.raises(QkspectraError, match=f"^{prefix}") as error:
        adapter_for(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_layout_it_cannot_see_is_refused_naming_what_failed():
    config = CONFIG_MAPPING["codegen"](n_embd=32, n_layer=2, n_head=4, vocab_size=96)
    with pytest.raises(QkspectraError, match="^model type 'codegen' cannot be read: "):
        adapter_for(config)


def test_a_config_of_several_parts_is_refused_in_one_line_naming_them():
    """A multimodal config (text, vision, audio) has no layer count of its own: one line, never an AttributeError."""
    config = CONFIG_MAPPING["muse_spark"]()
    with pytest.raises(QkspectraError, match="^model type 'muse_spark' cannot be read: its config has no "
                                             "num_hidden_layers \\(a model of several parts: text_config") as error:
        adapter_for(config)
    assert "\n" not in str(error.value)


def test_the_models_page_lists_the_registry_and_these_verified_types():
    from pathlib import Path

    assert set(GENERIC_CASES) == set(VERIFIED_GENERIC_TYPES)
    page = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert page == replace_models_section(page), "run scripts/update_model_docs.py"
