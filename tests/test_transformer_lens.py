"""TransformerLens models in memory (a ``TransformerBridge``): spectra and entropies against TransformerLens itself.

The singular values of TransformerLens's ``model.QK`` factored matrices times the logit scale must
equal qkspectra's, and the mean entropy of its ``hook_pattern`` maps qkspectra's (computed from the
model's queries and keys, never from those maps) to 1e-5, on TransformerLens's native random models
of its standard, rotary and grouped-query kinds, on a bridge of a transformers Llama before and after
``enable_compatibility_mode()``, and on SmolLM2 through a bridge.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformer_lens = pytest.importorskip("transformer_lens")

import qkspectra  # noqa: E402
from qkspectra import QkspectraError  # noqa: E402

SMALL = {"max_tokens": 96, "seq_len": 32, "quiet": True}


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_source.folder)


def native_bridge(tokenizer, position: str, kv_heads: int | None, norm: str):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    config = TransformerBridgeConfig(d_model=32, d_head=8, n_heads=4, n_layers=3, n_ctx=64, d_vocab=tokenizer.vocab_size,
                                     act_fn="gelu", positional_embedding_type=position, n_key_value_heads=kv_heads,
                                     normalization_type=norm, seed=0)
    bridge = TransformerBridge.boot_native(config, tokenizer=tokenizer)
    with torch.no_grad():  # norm gains and biases that are not 1 and 0, and sharp heads
        for name, parameter in bridge.named_parameters():
            if name.endswith(("ln1.weight", "ln1.w")):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(("attn.q.weight", "attn.k.weight")):
                parameter.normal_(0, 0.5)
    return bridge


def tiny_llama(tokenizer):
    """A random grouped-query transformers Llama (4 query, 2 key/value heads), the same each time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def llama_bridge(tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_llama(tokenizer), tokenizer=tokenizer)


def transformer_lens_spectra(bridge, scale: float) -> np.ndarray:
    """(L, H, d_head) singular values of TransformerLens's QK factored matrices times the logit scale."""
    return bridge.QK.S.detach().double().numpy() * scale


def transformer_lens_entropy(bridge, windows: list[list[int]]) -> np.ndarray:
    """(L, H) mean entropy over every query of the windows, from TransformerLens's hook_pattern maps."""
    L = bridge.cfg.n_layers
    total, count = np.zeros((L, bridge.cfg.n_heads)), 0
    with torch.no_grad():
        for window in windows:
            _, cache = bridge.run_with_cache(torch.tensor([window]), names_filter=lambda name: name.endswith("hook_pattern"))
            for layer in range(L):
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()  # (H, query_pos, key_pos)
                total[layer] += (-(pattern * pattern.clamp_min(1e-300).log()).sum(-1)).sum(-1).numpy()
            count += len(window)
    return total / count


def windows_of(tokenizer, n_ctx: int) -> list[list[int]]:
    from qkspectra.extract.corpus import load_windows

    return load_windows(tokenizer, corpus=None, seq_len=SMALL["seq_len"], max_tokens=SMALL["max_tokens"],
                        window_per_line=False, max_length=n_ctx).windows


def state(bridge) -> dict:
    return {"weights": {name: p.detach().clone() for name, p in bridge.named_parameters()},
            "training": {name: m.training for name, m in bridge.named_modules()},
            "requires_grad": {name: p.requires_grad for name, p in bridge.named_parameters()}}


def assert_same_state(bridge, before: dict) -> None:
    after = state(bridge)
    assert after["training"] == before["training"] and after["requires_grad"] == before["requires_grad"]
    assert all(torch.equal(after["weights"][name], w) for name, w in before["weights"].items())


def assert_equals_transformer_lens(bridge, tokenizer, *, fold_ln: bool):
    before = state(bridge)
    geometry = qkspectra.extract_geometry(bridge, tokenizer, fold_ln=fold_ln, **SMALL)
    assert_same_state(bridge, before)
    theirs = transformer_lens_spectra(bridge, geometry.metadata["scale"])
    ours = geometry.singular_values
    K = bridge.cfg.d_head
    assert ours.shape[:2] == theirs.shape[:2] == (bridge.cfg.n_layers, bridge.cfg.n_heads)
    assert np.abs(ours[..., :K] - theirs[..., :K]).max() <= 1e-5 * theirs.max()  # TransformerLens's SVD is float32
    assert np.abs(ours[..., K:]).max(initial=0) <= 1e-9 * theirs.max()
    entropy = transformer_lens_entropy(bridge, windows_of(tokenizer, bridge.cfg.n_ctx))
    np.testing.assert_allclose(geometry.entropy, entropy, rtol=0, atol=1e-5)
    assert geometry.metadata["num_kv_heads"] == (bridge.cfg.n_key_value_heads or bridge.cfg.n_heads)
    return geometry


@pytest.mark.parametrize("position, kv_heads, norm", [
    ("standard", None, "LN"),
    ("standard", 2, "RMS"),
    ("rotary", None, "RMS"),
    ("rotary", 2, "LN"),
    ("rotary", 1, "RMS"),
])
def test_native_models_equal_transformer_lens(tokenizer, position, kv_heads, norm):
    bridge = native_bridge(tokenizer, position, kv_heads, norm)
    geometry = assert_equals_transformer_lens(bridge, tokenizer, fold_ln=False)  # TransformerLens's QK is unfolded
    metadata = geometry.metadata
    assert metadata["model_type"] == "transformer_lens" and metadata["adapter"] == "transformer_lens (TransformerBridge)"
    assert metadata["transformer_lens"]["weights_processed"] is False
    assert not metadata["transformer_lens"]["norm_folded_by_transformer_lens"]
    assert (metadata["rotary"] is None) == (position == "standard")


def test_a_bridge_of_a_transformers_llama_before_and_after_compatibility_mode(tokenizer):
    bridge = llama_bridge(tokenizer)
    raw = assert_equals_transformer_lens(bridge, tokenizer, fold_ln=False)
    folded_here = qkspectra.extract_geometry(bridge, tokenizer, fold_ln=True, static_only=True, quiet=True)
    assert raw.metadata["transformer_lens"]["weights_processed"] is False
    bridge.enable_compatibility_mode(disable_warnings=True)  # folds the norms into W_Q and W_K
    processed = assert_equals_transformer_lens(bridge, tokenizer, fold_ln=True)
    assert processed.metadata["transformer_lens"]["weights_processed"] is True
    assert processed.metadata["transformer_lens"]["norm_folded_by_transformer_lens"] is True
    # the gains TransformerLens folded are not folded again: the same spectra as folding them here
    np.testing.assert_allclose(processed.singular_values, folded_here.singular_values, rtol=1e-6, atol=1e-7)
    assert not np.allclose(raw.singular_values, folded_here.singular_values)


@pytest.mark.slow
def test_smollm2_through_a_bridge(tokenizer, smollm2_source):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_source.folder)
    bridge = TransformerBridge.boot_transformers("smollm2", hf_model=model, tokenizer=tokenizer)
    geometry = assert_equals_transformer_lens(bridge, tokenizer, fold_ln=False)
    assert geometry.singular_values.shape[:2] == (30, 9) and geometry.metadata["num_kv_heads"] == 3


def test_the_tokenizer_defaults_to_the_bridge_s_own(tokenizer):
    bridge = native_bridge(tokenizer, "rotary", 2, "RMS")
    with_own = qkspectra.extract_geometry(bridge, **SMALL)
    given = qkspectra.extract_geometry(bridge, bridge.tokenizer, **SMALL)  # as TransformerLens configured it
    np.testing.assert_array_equal(with_own.entropy, given.entropy)
    assert with_own.metadata["model_source"].startswith("TransformerLens model in memory: TransformerBridge, float32 on cpu")


def test_run_without_the_functional_test(tokenizer):
    bridge = native_bridge(tokenizer, "rotary", 2, "RMS")
    result = qkspectra.run(bridge, tokenizer, functional=False, **SMALL)
    assert result.verdict.layers["functional"].code == "n/a"
    assert result.geometry.metadata["model_type"] == "transformer_lens"


def test_what_is_not_modelled_is_refused_in_one_line(tokenizer):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    config = TransformerBridgeConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=64, d_vocab=tokenizer.vocab_size,
                                     act_fn="gelu", attn_scores_soft_cap=30.0, seed=0)
    bridge = TransformerBridge.boot_native(config, tokenizer=tokenizer)
    with pytest.raises(QkspectraError, match=r"^TransformerBridge: cfg.attn_scores_soft_cap=30.0 changes the attention "
                                             r"logit and is not modelled for TransformerLens models$"):
        qkspectra.extract_geometry(bridge, tokenizer, **SMALL)
