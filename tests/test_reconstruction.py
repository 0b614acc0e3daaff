"""Functional test: reconstructions written into tiny models; the control and planted rescale change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkspectra.analysis.seed import Anchor
from qkspectra.errors import QkspectraError
from qkspectra.analysis.reconstruction.evidence import reconstruction_effects
from qkspectra.analysis.reconstruction.layers import model_factors
from qkspectra.analysis.reconstruction.targets import rank_k_target, spectral_target
from qkspectra.analysis.factors import make_factors
from qkspectra.factored import head_singular_values
from qkspectra.analysis.rank_k import rank_k_evidence

TOKENS = np.random.default_rng(0)
WINDOWS = [TOKENS.integers(0, 60, 12).tolist() for _ in range(2)] + [TOKENS.integers(0, 60, 7).tolist()]


def last_anchor(L: int) -> dict[str, Anchor]:
    return {"last": Anchor("last", np.full(L, L - 1), ((0, L),))}


def spectra_geometry(factors):
    from qkspectra.geometry import parse_geometry

    sv = head_singular_values(factors.W_Q, factors.W_K)
    return parse_geometry({"num_layers": sv.shape[0], "num_heads": sv.shape[1],
                           "static": [{"metric_singvals_per_head": s.tolist()} for s in sv]})


def effects(model, fold_ln: bool):
    factors = model_factors(model, fold_ln=fold_ln)
    geometry = spectra_geometry(factors)
    anchors = last_anchor(factors.num_layers)
    rank_k = rank_k_evidence(geometry, anchors, factors)
    return reconstruction_effects(model, WINDOWS, geometry.singular_values, anchors, rank_k, fold_ln=fold_ln)


def sharpen(model):
    """Random-init weights (std 0.02) give near-uniform attention; larger ones make heads matter."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                parameter.normal_(0, 0.3)
    return model


def tiny_llama():
    """Built with eager attention (for its maps); the functional test runs any implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=64, bos_token_id=0, eos_token_id=0,
                         attn_implementation="eager")
    return sharpen(LlamaForCausalLM(config).eval())


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    config = BertConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                        vocab_size=64, attn_implementation="eager")
    model = sharpen(BertModel(config).eval())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:
                parameter.uniform_(0.5, 1.5)  # gains and biases that folding must undo
    return model


def tiny_gemma3():
    """Per-head q/k norms, (1 + w) gains, one key head, sliding-window and global layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    config = Gemma3TextConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                              head_dim=8, intermediate_size=64, vocab_size=64, sliding_window=5,
                              query_pre_attn_scalar=8, attn_implementation="eager",
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = sharpen(Gemma3ForCausalLM(config).eval())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(-0.5, 0.5)  # gains 1 + w that the writer must divide out
    return model


def tiny_gemma3_with_zero_gains():
    """As tiny_gemma3, with some q/k norm gains 1 + w exactly 0 (as in the real gemma-3-270m): those
    coordinates add nothing to the logit, and the writer keeps their original weights."""
    model = tiny_gemma3()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter[::3] = -1.0
    return model


def tiny_generic(model_type: str, **extra):
    """A causal LM read by the generic reader (OLMo: clipped queries and keys, LayerNorm without parameters;
    HunYuan: q/k norms after the rotary embedding, with gains unequal on each rotary pair)."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    torch.manual_seed(4)
    config = CONFIG_MAPPING[model_type](num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        hidden_size=32, intermediate_size=64, vocab_size=64, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0, **extra)
    model = sharpen(AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("query_layernorm.weight", "key_layernorm.weight")):
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("fold_ln", [True, False])
@pytest.mark.parametrize("make_model", [
    tiny_llama, tiny_bert, tiny_gemma3, tiny_gemma3_with_zero_gains,
    lambda: tiny_generic("olmo", clip_qkv=1.0), lambda: tiny_generic("hunyuan_v1_dense", head_dim=8)],
    ids=["llama-gqa-rope", "bert-encoder", "gemma3-qk-norm", "gemma3-zero-gains", "olmo-clip", "hunyuan-qk-norm-after-rope"])
def test_control_changes_nothing_and_reconstructions_do(make_model, fold_ln):
    section = effects(make_model(), fold_ln)
    control = section["control"]
    assert abs(control["delta_loss"]) < 1e-6
    assert abs(control["mean_kl"]) < 1e-6 and np.max(np.abs(control["per_head_kl"])) < 1e-6
    assert abs(control["mean_entropy_shift"]) < 1e-6
    last = section["last"]
    assert np.array(last["operator"]["per_head_kl"]).shape == (3, 4)
    assert last["operator"]["mean_kl"] > 1e-3  # random layers are not rescales of the last one
    assert last["operator_rank_k"]["mean_kl"] < last["operator"]["mean_kl"]
    expected_kind = "final_hidden_cosine_distance" if make_model is tiny_bert else "next_token_cross_entropy"
    assert last["operator"]["loss_kind"] == expected_kind


def test_planted_rescale_reconstructs_without_change():
    """Shared attention weights with scale 1/(layer + 1): T * M_anchor is every layer's own operator."""
    from test_operator_fit import shared_gpt2

    model = shared_gpt2(num_layers=3)
    with torch.no_grad():
        for block in model.transformer.h[1:]:  # the other weights may differ freely
            block.mlp.c_fc.weight.normal_(0, 0.3)
    section = effects(model, fold_ln=True)
    for kind in ("spectral", "operator", "operator_rank_k"):
        result = section["last"][kind]
        assert abs(result["delta_loss"]) < 1e-5 and abs(result["relative_delta_loss"]) < 1e-5
        assert result["mean_kl"] < 1e-6


def test_spectral_target_keeps_the_frame_and_sets_singular_values():
    rng = np.random.default_rng(5)
    factors = make_factors({"W_Q": rng.standard_normal((2, 2, 10, 3)), "W_K": rng.standard_normal((2, 2, 10, 3))})
    own = head_singular_values(factors.W_Q, factors.W_K)
    X, Y = spectral_target(factors, own)
    np.testing.assert_allclose(X, factors.W_Q, atol=1e-12)
    np.testing.assert_allclose(Y, factors.W_K, atol=1e-12)
    new = own[..., :2] * np.array([2.0, 0.5])  # K = 2 < d_head: the third becomes 0
    X, Y = spectral_target(factors, new)
    np.testing.assert_allclose(head_singular_values(X, Y), np.sort(np.concatenate([new, np.zeros((2, 2, 1))], -1))[..., ::-1],
                               atol=1e-10)


def test_rank_k_target_with_full_correction_is_the_layer_itself():
    rng = np.random.default_rng(6)
    factors = make_factors({"W_Q": rng.standard_normal((2, 1, 10, 3)), "W_K": rng.standard_normal((2, 1, 10, 3))})
    anchor_layers, T = np.array([1, 1]), np.array([[0.3], [1.0]])
    X, Y = rank_k_target(factors, anchor_layers, T, np.array([[6], [0]]))
    np.testing.assert_allclose(X[0] @ np.swapaxes(Y[0], -1, -2), factors.W_Q[0] @ np.swapaxes(factors.W_K[0], -1, -2),
                               atol=1e-10)
    np.testing.assert_array_equal(X[1], factors.W_Q[1])  # k = 0: the anchor's own factors


def test_rank_k_correction_a_few_heads_at_a_time_equals_all_at_once(monkeypatch):
    from qkspectra.analysis.reconstruction import targets as functional

    rng = np.random.default_rng(7)
    A, B, C, D = (rng.standard_normal((3, 5, 12, 3)) for _ in range(4))  # (L, H, d_model, d_head)
    k = rng.integers(0, 7, (3, 5))
    chunked = functional.rank_k_correction(A, B, C, D, k)  # 15 heads, 4 at a time
    monkeypatch.setattr(functional, "HEADS_PER_CORRECTION", 15)
    whole = functional.rank_k_correction(A, B, C, D, k)
    for x, y in zip(chunked, whole):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(chunked[0][k == 0], C[k == 0])


def test_refused_models_and_bad_rank_k_section():
    from transformers import AlbertConfig, AlbertModel

    albert = AlbertModel(AlbertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                                      embedding_size=8, vocab_size=64))
    with pytest.raises(QkspectraError, match="share one set of weights"):
        reconstruction_effects(albert, WINDOWS, np.ones((2, 2, 8)), last_anchor(2), None)
    model = tiny_bert()
    sv = head_singular_values(*(lambda f: (f.W_Q, f.W_K))(model_factors(model)))
    with pytest.raises(QkspectraError, match="no operator-level k"):
        reconstruction_effects(model, WINDOWS, sv, last_anchor(3), {"last": {"operator": None}})


@pytest.mark.slow
def test_minilm_functional_evidence(minilm_source):
    from qkspectra.analysis.seed import analyze_all
    from qkspectra.extract.spectra import static_spectra
    from qkspectra.analysis.reconstruction.evidence import functional_evidence
    from qkspectra.extract.extraction import ExtractOptions
    from qkspectra.geometry import parse_geometry
    from qkspectra.models.adapters import adapter_for
    from qkspectra.models.tensors import open_tensors

    static = static_spectra(adapter_for(minilm_source.config), open_tensors(minilm_source.folder), fold_ln=True)
    geometry = parse_geometry({"num_layers": 6, "num_heads": 12, "static": static.rows})
    anchors = {"last": analyze_all(geometry)["last"].anchor}
    rank_k = rank_k_evidence(geometry, anchors, static.factors)
    section = functional_evidence("minilm", geometry, anchors, rank_k, ExtractOptions(seq_len=128, quiet=True), max_tokens=512)
    assert abs(section["control"]["delta_loss"]) < 1e-6 and abs(section["control"]["mean_kl"]) < 1e-6
    last = section["last"]
    assert last["operator"]["mean_kl"] > last["operator_rank_k"]["mean_kl"]
    assert last["operator"]["delta_loss"] > 0.01  # 1 - cosine of the final hidden states


@pytest.mark.parametrize("kernel", ["fused", "blocked"])
def test_fast_path_equals_float64_attention_maps(kernel, monkeypatch):
    """The SDPA path's figures (float32; KL and entropy from the fused CPU kernel, or from blocks of
    logits as on other devices) against the float64 eager maps of the original and the
    operator-reconstructed model, computed densely here."""
    import copy

    import qkspectra.extract.streamed_entropy
    import qkspectra.analysis.reconstruction.divergence

    if kernel == "blocked":
        for module in (qkspectra.extract.streamed_entropy, qkspectra.analysis.reconstruction.divergence):
            monkeypatch.setattr(module, "FUSED_KERNEL_DEVICES", ())
        monkeypatch.setattr(qkspectra.extract.streamed_entropy, "KEYS_PER_BLOCK", 4)

    from qkspectra.analysis.reconstruction.layers import factors_of_layers, model_layers
    from qkspectra.analysis.reconstruction.targets import operator_target
    from qkspectra.analysis.reconstruction.writing import expand_kv_heads_in_place, write_reconstruction
    from qkspectra.models.adapters import adapter_for
    from qkspectra.analysis.operator_fit import OperatorFitter

    model = tiny_llama()
    fast_model = copy.deepcopy(model)
    fast_model.set_attn_implementation("sdpa")
    section = effects(fast_model, fold_ln=True)
    _, layers = model_layers(model)
    factors = factors_of_layers(layers, fold_ln=True)
    a = np.full(factors.num_layers, factors.num_layers - 1)
    T = np.stack([fit.T for fit in OperatorFitter(factors).fit_all(a)])
    original = model.to(torch.float64)
    rebuilt = copy.deepcopy(original)
    expand_kv_heads_in_place(rebuilt)
    write_reconstruction(rebuilt, adapter_for(rebuilt.config), layers, *operator_target(factors, a, T), fold_ln=True)
    kl = shift = 0.0
    loss = {id(original): 0.0, id(rebuilt): 0.0}
    with torch.no_grad():
        for window in WINDOWS:
            ids = torch.tensor([window])
            outputs = {id(m): m(input_ids=ids, labels=ids, output_attentions=True) for m in (original, rebuilt)}
            p0 = torch.stack(outputs[id(original)].attentions)[:, 0]  # (L, H, query_pos, key_pos) float64
            p = torch.stack(outputs[id(rebuilt)].attentions)[:, 0]
            kl = kl + (torch.xlogy(p0, p0) - torch.xlogy(p0, p)).sum(-1).sum(-1)  # (L, H)
            shift = shift + (torch.xlogy(p0, p0) - torch.xlogy(p, p)).sum(-1).sum(-1)
            for m in (original, rebuilt):
                loss[id(m)] += float(outputs[id(m)].loss) * (len(window) - 1)
    tokens, predicted = sum(map(len, WINDOWS)), sum(len(w) - 1 for w in WINDOWS)
    fast = section["last"]["operator"]
    np.testing.assert_allclose(fast["per_head_kl"], (kl / tokens).numpy(), atol=2e-5)
    np.testing.assert_allclose(fast["mean_entropy_shift"], float((shift / tokens).mean()), atol=2e-5)
    np.testing.assert_allclose(fast["delta_loss"], (loss[id(rebuilt)] - loss[id(original)]) / predicted, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_bundled_models_figures_equal_the_float64_eager_path(name, minilm_source, smollm2_source):
    """The fast path's figures against those of the float64 eager-map path it replaced, recorded in
    tests/data/functional_float64_<name>.json (the last-layer anchor, 512 tokens in 128-token windows),
    to within a few times the fast path's own control (its rounding) plus a small relative margin."""
    import json
    from pathlib import Path

    from qkspectra.analysis.seed import analyze_all
    from qkspectra.extract.spectra import static_spectra
    from qkspectra.analysis.reconstruction.evidence import functional_evidence
    from qkspectra.extract.extraction import ExtractOptions
    from qkspectra.geometry import parse_geometry
    from qkspectra.models.adapters import adapter_for
    from qkspectra.models.tensors import open_tensors

    source = {"minilm": minilm_source, "smollm2": smollm2_source}[name]
    adapter = adapter_for(source.config)
    static = static_spectra(adapter, open_tensors(source.folder), fold_ln=True)
    geometry = parse_geometry({"num_layers": adapter.num_layers, "num_heads": adapter.num_heads, "static": static.rows})
    anchors = {"last": analyze_all(geometry)["last"].anchor}
    rank_k = rank_k_evidence(geometry, anchors, static.factors)
    section = functional_evidence(name, geometry, anchors, rank_k, ExtractOptions(seq_len=128, quiet=True), max_tokens=512)
    expected = json.loads((Path(__file__).parent / "data" / f"functional_float64_{name}.json").read_text())
    control = section["control"]
    for kind in ("spectral", "operator", "operator_rank_k"):
        # where the eager maps' probabilities underflowed to 0 their KL was inf (SmolLM2's rank-k
        # reconstruction, 30 heads); the log-sum-exp path gives the finite value (9 to 95 nats there)
        kl, old_kl = np.array(section["last"][kind]["per_head_kl"]), np.array(expected[kind]["per_head_kl"])
        finite = np.isfinite(old_kl)
        assert np.isfinite(kl).all() and (kl[~finite] > 1).all()
        np.testing.assert_allclose(kl[finite], old_kl[finite], atol=5 * np.abs(control["per_head_kl"]).max() + 1e-5,
                                   rtol=1e-3)
        for figure in ("delta_loss", "mean_kl", "mean_entropy_shift"):
            if not np.isfinite(expected[kind][figure]):
                continue
            tolerance = 5 * abs(control[figure]) + 1e-3 * abs(expected[kind][figure]) + 1e-5
            assert abs(section["last"][kind][figure] - expected[kind][figure]) <= tolerance, (kind, figure)
