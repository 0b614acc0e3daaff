"""Functional test on fused query/key/value layouts (Falcon, GPT-BigCode, Phi-3): key/value heads expanded
without changing the model, reconstructions written into the rows the adapter reads, the control a no-op."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig

from qkspectra.errors import QkspectraError
from qkspectra.analysis.reconstruction.evidence import reconstruction_effects
from qkspectra.analysis.reconstruction.layers import factors_of_layers, linearised_layers, model_layers
from qkspectra.analysis.reconstruction.targets import operator_target
from qkspectra.analysis.reconstruction.writing import expand_kv_heads_in_place, write_reconstruction
from qkspectra.models.adapters import adapter_for
from qkspectra.models.tensors import StateDictSource
from qkspectra.analysis.operator_fit import OperatorFitter
from qkspectra.analysis.rank_k import rank_k_evidence
from test_adapters import VOCAB
from test_reconstruction import last_anchor, spectra_geometry
from test_fused_adapters import CASES, FALCON

TOKENS = np.random.default_rng(7)
WINDOWS = [TOKENS.integers(0, VOCAB, 12).tolist() for _ in range(2)] + [TOKENS.integers(0, VOCAB, 7).tolist()]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: on a busy two-core machine a second torch thread makes each small matmul take ms, not us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def falcon_config(variant: str, bias: bool):
    """Falcon's three layouts: grouped (new decoder architecture), multi-query, multi-head."""
    layouts = {"gqa": dict(new_decoder_architecture=True, num_kv_heads=2),
               "mqa": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
               "mha": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False)}
    return FalconConfig(bias=bias, **layouts[variant], **FALCON)


# Tiny configs (those of test_fused_adapters); Falcon with and without q/k/v biases (rotary models with
# q/k biases are refused by reconstruction_effects, but their biases are written all the same).
CONFIGS = {
    "falcon-gqa": lambda: falcon_config("gqa", bias=False),
    "falcon-mqa": lambda: falcon_config("mqa", bias=False),
    "falcon-mha": lambda: falcon_config("mha", bias=False),
    "falcon-gqa-bias": lambda: falcon_config("gqa", bias=True),
    "falcon-mqa-bias": lambda: falcon_config("mqa", bias=True),
    "falcon-mha-bias": lambda: falcon_config("mha", bias=True),
    "gpt_bigcode-mqa": CASES["gpt_bigcode-mqa"][0],
    "phi3-gqa": CASES["phi3"][0],
    "persimmon-plain": lambda: _without_qk_layernorm(CASES["persimmon"][0]()),  # its fused layout, no q/k norms
}
WITHOUT_QK_BIAS = ["falcon-gqa", "falcon-mqa", "falcon-mha", "gpt_bigcode-mqa", "phi3-gqa"]


def _without_qk_layernorm(config):
    config.qk_layernorm = False
    return config


def tiny_causal_lm(case: str, attn_implementation: str = "sdpa"):
    """A random causal LM with sharp attention (weights std 0.3), norm gains and biases that folding must undo."""
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(CONFIGS[case](), attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.3)
                if module.bias is not None:
                    module.bias.normal_(0, 0.3)
            elif "Norm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.uniform_(-0.5, 0.5)
    return model


def logits(model) -> torch.Tensor:
    """(windows, 7, vocab) logits of the first 7 tokens of each window."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([w[:7] for w in WINDOWS])).logits


def per_query_head_factors(model) -> tuple[np.ndarray, np.ndarray]:
    """(L, H, d_model, d_head) W_Q, W_K as the adapter reads them, a shared key head repeated."""
    _, layers = model_layers(model)
    return np.stack([layer.W_Q for layer in layers]), np.stack([layer.W_K for layer in layers])


@pytest.mark.parametrize("case", list(CONFIGS))
def test_kv_expansion_keeps_the_model(case):
    model = tiny_causal_lm(case)
    H = model.config.num_attention_heads
    before, factors_before = logits(model), per_query_head_factors(model)
    expand_kv_heads_in_place(model)
    assert adapter_for(model.config).num_kv_heads == H
    for module in model.modules():  # the modules' own head counts follow
        for name in ("num_kv_heads", "kv_heads", "num_key_value_heads"):
            assert getattr(module, name, H) == H
        assert getattr(module, "num_key_value_groups", 1) == 1
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    for ours, original in zip(per_query_head_factors(model), factors_before):
        np.testing.assert_array_equal(ours, original)  # the adapter reads the new layout: the same heads


@pytest.mark.parametrize("fold_ln", [True, False])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_control_write_changes_no_weight(case, fold_ln):
    """Each head's own factors written back (the functional test's control): weights and logits unchanged."""
    model = tiny_causal_lm(case)
    _, layers = model_layers(model)
    factors = factors_of_layers(linearised_layers(layers, None), fold_ln=fold_ln)
    expand_kv_heads_in_place(model)
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    before = logits(model)
    write_reconstruction(model, adapter_for(model.config), layers, factors.W_Q, factors.W_K, fold_ln=fold_ln)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), weights[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["falcon-gqa-bias", "falcon-mqa-bias", "falcon-mha-bias", "gpt_bigcode-mqa", "phi3-gqa"])
def test_written_heads_are_read_back_and_values_untouched(case):
    """Random per-head factors written (no folding) are what the adapter reads; value rows and all else stay."""
    model = tiny_causal_lm(case)
    _, layers = model_layers(model)
    L, H = len(layers), model.config.num_attention_heads
    if adapter_for(model.config).num_kv_heads < H:  # shared key heads cannot hold one key per query head
        with pytest.raises(QkspectraError, match="expand the key/value heads first"):
            write_reconstruction(model, adapter_for(model.config), layers, *per_query_head_factors(model),
                                 fold_ln=False)
    expand_kv_heads_in_place(model)
    adapter = adapter_for(model.config)
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    X, Y = np.random.default_rng(8).standard_normal((2, L, H, adapter.d_model, adapter.d_head))  # s included
    write_reconstruction(model, adapter, layers, X, Y, fold_ln=False)
    tensors = StateDictSource(model.state_dict())
    for index in range(L):
        written = adapter.layer(tensors, index)
        np.testing.assert_allclose(np.sqrt(written.scale) * written.W_Q, X[index], atol=1e-5)
        np.testing.assert_allclose(np.sqrt(written.scale) * written.W_K, Y[index], atol=1e-5)
    query_rows, key_rows = adapter.split(np.arange(adapter.fused_rows()))  # (H, d_head) row numbers each
    value_rows = np.setdiff1d(np.arange(adapter.fused_rows()), np.concatenate([query_rows, key_rows]))
    assert value_rows.shape == (H * adapter.d_head,)
    fused = {adapter.prefixed(tensors, f"{adapter.fused.format(i)}.{part}") for i in range(L) for part in ("weight", "bias")}
    for name, parameter in model.named_parameters():
        old, new = weights[name], parameter.detach()
        if name in fused:
            old, new = old[value_rows], new[value_rows]
        torch.testing.assert_close(new, old, atol=0, rtol=0, msg=name)


def effects(model):
    """The functional section (last-layer anchor, rank-k from the factors) and the model's folded factors."""
    factors = factors_of_layers(linearised_layers(model_layers(model)[1], None), fold_ln=True)
    geometry = spectra_geometry(factors)
    anchors = last_anchor(factors.num_layers)
    rank_k = rank_k_evidence(geometry, anchors, factors)
    return reconstruction_effects(model, WINDOWS, geometry.singular_values, anchors, rank_k, fold_ln=True), factors


@pytest.mark.parametrize("case", WITHOUT_QK_BIAS)
def test_functional_test_runs_and_matches_float64_attention_maps(case):
    """The control changes nothing; the operator reconstruction's per-head KL and loss change are those of
    the float64 eager maps of the original model and of the reconstructed one, computed densely here."""
    model = tiny_causal_lm(case, attn_implementation="eager")
    section, factors = effects(copy.deepcopy(model).to(torch.float32))
    control = section["control"]
    assert control["mean_kl"] < 1e-5 and abs(control["delta_loss"]) < 1e-5
    assert abs(control["mean_entropy_shift"]) < 1e-5
    fast = section["last"]["operator"]
    assert fast["mean_kl"] > 1e-3  # random layers are not rescales of the last one
    assert section["last"]["operator_rank_k"]["mean_kl"] < fast["mean_kl"]

    _, layers = model_layers(model)
    a = np.full(factors.num_layers, factors.num_layers - 1)
    T = np.stack([fit.T for fit in OperatorFitter(factors).fit_all(a)])  # (L, H)
    original = model.to(torch.float64)
    rebuilt = copy.deepcopy(original)
    expand_kv_heads_in_place(rebuilt)
    write_reconstruction(rebuilt, adapter_for(rebuilt.config), layers, *operator_target(factors, a, T), fold_ln=True)
    kl, loss = 0.0, {"original": 0.0, "rebuilt": 0.0}
    with torch.no_grad():
        for window in WINDOWS:
            ids = torch.tensor([window])
            outputs = {name: m(input_ids=ids, labels=ids, output_attentions=True)
                       for name, m in (("original", original), ("rebuilt", rebuilt))}
            p0 = torch.stack(outputs["original"].attentions)[:, 0]  # (L, H, query_pos, key_pos) float64
            p = torch.stack(outputs["rebuilt"].attentions)[:, 0]
            kl = kl + (torch.xlogy(p0, p0) - torch.xlogy(p0, p)).sum(-1).sum(-1)  # (L, H)
            for name in loss:
                loss[name] += float(outputs[name].loss) * (len(window) - 1)
    tokens, predicted = sum(map(len, WINDOWS)), sum(len(w) - 1 for w in WINDOWS)
    np.testing.assert_allclose(fast["per_head_kl"], (kl / tokens).numpy(), atol=2e-5)
    np.testing.assert_allclose(fast["delta_loss"], (loss["rebuilt"] - loss["original"]) / predicted, atol=2e-5)


def test_rotary_falcon_with_qk_biases_is_refused():
    model = tiny_causal_lm("falcon-mha-bias")
    with pytest.raises(QkspectraError, match="rotary models with query/key biases"):
        reconstruction_effects(model, WINDOWS, np.ones((2, 4, 8)), last_anchor(2), None)


def test_persimmon_is_refused_for_its_centring_qk_layernorms():
    """Persimmon's q/k LayerNorms subtract their mean: refused in one line before anything is run or written."""
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(CASES["persimmon"][0]()).eval()
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    with pytest.raises(QkspectraError, match="query/key norms centre their input") as refusal:
        reconstruction_effects(model, WINDOWS, np.ones((2, 4, 8)), last_anchor(2), None)
    assert "\n" not in str(refusal.value) and "persimmon" in str(refusal.value)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), weights[name], atol=0, rtol=0)
