"""TransformerLens 3's ``HookedTransformer``: spectra, entropies and the functional test against TransformerLens itself.

The counterparts of the bridge tests (test_transformer_lens.py, test_transformer_lens_functional.py)
on small random ``HookedTransformer`` models built from a ``HookedTransformerConfig`` (no download;
a character tokenizer of 98 tokens made in memory), of standard (LayerNorm, absolute positions, query/key
biases) and rotary (RMSNorm) kinds with 4, 2 and 1 key/value heads for 4 query heads, as built and after
TransformerLens's own ``process_weights_`` (norms folded, writing weights and unembedding centred).

The extra installs TransformerLens 4, which has no ``HookedTransformer``: these tests skip unless
TransformerLens 3 is installed in its place (``pip install transformer-lens==3.0.0``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

HookedTransformer = pytest.importorskip("transformer_lens").__dict__.get("HookedTransformer")
if HookedTransformer is None:
    pytest.skip("TransformerLens 3 (HookedTransformer) is not installed; the transformerlens extra installs 4.x",
                allow_module_level=True)

import qkspectra  # noqa: E402
from test_transformer_lens import (SMALL, assert_equals_transformer_lens, assert_same_state, state,  # noqa: E402
                                   transformer_lens_entropy, windows_of)
from test_transformer_lens_functional import FAST, functional_windows, patterns_and_losses  # noqa: E402

KINDS = [  # (positions, key/value heads, norm)
    ("standard", None, "LN"),
    ("standard", 2, "LN"),
    ("rotary", None, "RMS"),
    ("rotary", 2, "RMS"),
    ("rotary", 1, "LN"),
]


@pytest.fixture(scope="module")
def tokenizer():
    """A character tokenizer (printable ASCII, newline and tab, [UNK]) made in memory: no file, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(characters)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", pad_token="[UNK]")


def hooked_transformer(tokenizer, position: str, kv_heads: int | None, norm: str, *, biases: bool = True):
    """A random HookedTransformer with norm gains (and biases) that are not 1 (and 0), and sharp heads; query/key
    biases where positions are absolute (unless ``biases`` is False). The same each time."""
    from transformer_lens import HookedTransformerConfig

    config = HookedTransformerConfig(d_model=32, d_head=8, n_heads=4, n_layers=3, n_ctx=64, d_vocab=len(tokenizer),
                                     act_fn="gelu", positional_embedding_type=position, n_key_value_heads=kv_heads,
                                     normalization_type=norm, seed=0)
    model = HookedTransformer(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("ln1.w"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif name.endswith("ln1.b"):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith(("attn.W_Q", "attn.W_K", "attn._W_K")):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith(("attn.b_Q", "attn.b_K", "attn._b_K")) and position == "standard" and biases:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def processed(model):
    """A copy processed by TransformerLens as ``from_pretrained`` does by default: norms folded into the weights
    (and W_Q, W_K centred over d_model after a LayerNorm), writing weights and unembedding centred."""
    model = copy.deepcopy(model)
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model


def centred_folded_spectra(model, scale: float) -> np.ndarray:
    """(L, H, d_head) singular values of s P G W_Q W_K^T G P of the unprocessed model: the gains G folded and, after
    a LayerNorm, the centring P = I - 1 1^T / d_model that TransformerLens's fold_ln applies to W_Q and W_K."""
    D = model.cfg.d_model
    P = np.eye(D) - 1.0 / D if model.cfg.normalization_type == "LN" else np.eye(D)
    spectra = []
    for block in model.blocks:
        gain = block.ln1.w.detach().double().numpy()[None, :, None]
        W_Q = P @ (gain * block.attn.W_Q.detach().double().numpy())  # (H, d_model, d_head)
        W_K = P @ (gain * block.attn.W_K.detach().double().numpy())  # key heads repeated per query head
        spectra.append(np.linalg.svd(W_Q @ W_K.transpose(0, 2, 1), compute_uv=False)[:, :model.cfg.d_head] * scale)
    return np.array(spectra)


@pytest.mark.parametrize("position, kv_heads, norm", KINDS)
def test_hooked_transformers_equal_transformer_lens(tokenizer, position, kv_heads, norm):
    model = hooked_transformer(tokenizer, position, kv_heads, norm)
    raw = assert_equals_transformer_lens(model, tokenizer, fold_ln=False)  # TransformerLens's QK is unfolded
    metadata = raw.metadata
    assert metadata["model_type"] == "transformer_lens"
    assert metadata["adapter"] == "transformer_lens (HookedTransformer)"
    assert metadata["scale"] == pytest.approx(1 / np.sqrt(8))
    assert metadata["transformer_lens"]["object"] == "HookedTransformer"
    assert metadata["transformer_lens"]["normalization_type"] == norm
    assert not metadata["transformer_lens"]["norm_folded_by_transformer_lens"]
    assert (metadata["rotary"] is None) == (position == "standard")


@pytest.mark.parametrize("position, kv_heads, norm", KINDS)
def test_weights_processed_by_transformer_lens_are_not_folded_twice(tokenizer, position, kv_heads, norm):
    model = hooked_transformer(tokenizer, position, kv_heads, norm)
    folded_here = qkspectra.extract_geometry(model, tokenizer, fold_ln=True, **SMALL)
    by_transformer_lens = processed(model)
    ours = assert_equals_transformer_lens(by_transformer_lens, tokenizer, fold_ln=True)  # gains of 1: nothing to fold
    unfolded = qkspectra.extract_geometry(by_transformer_lens, tokenizer, fold_ln=False, static_only=True, quiet=True)
    np.testing.assert_array_equal(ours.singular_values, unfolded.singular_values)
    metadata = ours.metadata["transformer_lens"]
    assert metadata["normalization_type"] == norm + "Pre" and metadata["norm_folded_by_transformer_lens"] is True
    scale = ours.metadata["scale"]
    # TransformerLens's fold is qkspectra's (the gains) plus, after a LayerNorm, centring W_Q and W_K over d_model
    expected = centred_folded_spectra(model, scale)
    K = model.cfg.d_head
    assert np.abs(ours.singular_values[..., :K] - expected).max() <= 1e-5 * expected.max()
    if norm == "RMS":
        np.testing.assert_allclose(ours.singular_values, folded_here.singular_values, rtol=0,
                                   atol=1e-5 * expected.max())
    else:
        assert np.abs(ours.singular_values - folded_here.singular_values).max() > 1e-3 * expected.max()
    # the same function: the entropies of the processed model are those of the model as built
    np.testing.assert_allclose(ours.entropy, folded_here.entropy, rtol=0, atol=1e-5)


def test_grouped_query_keys_taken_ungrouped_are_read_once_per_key_head(tokenizer):
    model = hooked_transformer(tokenizer, "rotary", 2, "RMS")
    grouped = qkspectra.extract_geometry(model, tokenizer, fold_ln=False, **SMALL)
    model.set_ungroup_grouped_query_attention(True)  # hook_k now fires with the key heads repeated
    ungrouped = assert_equals_transformer_lens(model, tokenizer, fold_ln=False)
    np.testing.assert_allclose(ungrouped.entropy, grouped.entropy, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ungrouped.singular_values, grouped.singular_values)


def test_the_tokenizer_defaults_to_the_model_s_own(tokenizer):
    model = hooked_transformer(tokenizer, "standard", None, "LN")
    with pytest.raises(qkspectra.QkspectraError, match="needs the model's tokenizer"):
        qkspectra.extract_geometry(model, **SMALL)
    model.tokenizer = tokenizer
    np.testing.assert_array_equal(qkspectra.extract_geometry(model, **SMALL).entropy,
                                  qkspectra.extract_geometry(model, tokenizer, **SMALL).entropy)
    source = qkspectra.extract_geometry(model, static_only=True, quiet=True).metadata["model_source"]
    assert source.startswith("TransformerLens model in memory: HookedTransformer, float32 on cpu")


def parts(model) -> dict:
    """The model's module and parameter objects by path (identity, not values), and its key/value head counts."""
    return {"modules": {name: id(m) for name, m in model.named_modules(remove_duplicate=False)},
            "parameters": {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)},
            "kv_heads": [model.cfg.n_key_value_heads] + [getattr(block.attn, "repeat_kv_heads", None)
                                                         for block in model.blocks]}


def operator_reference(model, tokenizer, anchor_layers: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-head KL (L, H), delta loss) of writing T * W_Q[a] and W_K[a] (unfolded) into a copy of a model without
    query/key biases by hand, from TransformerLens's own attention maps and losses. Key heads stay shared: the
    anchor's share alike."""
    windows = functional_windows(tokenizer)
    rewritten = copy.deepcopy(model)
    with torch.no_grad():
        for layer, anchor in enumerate(anchor_layers):
            attention, source = rewritten.blocks[layer].attn, model.blocks[anchor].attn
            attention.W_Q.copy_(torch.from_numpy(T[layer])[:, None, None].float() * source.W_Q)
            key = "_W_K" if "_W_K" in attention._parameters else "W_K"  # key heads as held (grouped or not)
            getattr(attention, key).copy_(getattr(source, key))
    original, original_loss = patterns_and_losses(model, windows)
    changed, changed_loss = patterns_and_losses(rewritten, windows)
    kl = sum((torch.xlogy(p0, p0) - torch.xlogy(p0, p)).sum((-1, -2)) for p0, p in zip(original, changed))  # (L, H)
    tokens, predicted = sum(map(len, windows)), sum(len(w) - 1 for w in windows)
    return kl.numpy() / tokens, float((changed_loss.sum() - original_loss.sum()) / predicted)


@pytest.mark.parametrize("position, kv_heads, norm", [("rotary", 2, "RMS"), ("standard", None, "LN")])
def test_the_functional_test_equals_the_model_s_own_attention_maps_rewritten_by_hand(tokenizer, position, kv_heads,
                                                                                      norm):
    model = hooked_transformer(tokenizer, position, kv_heads, norm, biases=False)
    before, identity = state(model), parts(model)
    result = qkspectra.run(model, tokenizer, fold_ln=False, functional=True, **SMALL, **FAST)
    assert_same_state(model, before)
    assert parts(model) == identity
    document = result.document
    functional = document["functional"]
    assert abs(functional["control"]["delta_loss"]) < 1e-6 and np.abs(functional["control"]["per_head_kl"]).max() < 1e-6
    anchor_layers = np.array(document["strategies"]["last"]["anchor"]["layers"])
    ours = functional["last"]["operator"]
    kl, delta_loss = operator_reference(model, tokenizer, anchor_layers, np.array(document["operator"]["last"]["T"]))
    np.testing.assert_allclose(ours["per_head_kl"], kl, rtol=0, atol=1e-5)
    assert abs(ours["delta_loss"] - delta_loss) < 1e-5
    assert result.verdict.layers["functional"].code != "n/a"


def test_the_functional_test_of_a_processed_model_with_biases_leaves_it_bit_for_bit(tokenizer):
    model = processed(hooked_transformer(tokenizer, "standard", 2, "LN"))  # ln1's bias folded into b_Q and b_K
    before, identity = state(model), parts(model)
    functional = qkspectra.run(model, tokenizer, functional=True, **SMALL, **FAST).document["functional"]
    assert_same_state(model, before)
    assert parts(model) == identity
    assert abs(functional["control"]["delta_loss"]) < 1e-6 and np.abs(functional["control"]["per_head_kl"]).max() < 1e-6


def test_a_functional_test_failing_midway_leaves_the_model_exactly_as_it_was(tokenizer, fail_on_the_second_call):
    from qkspectra.analysis.reconstruction.transformer_lens_passes import TransformerLensPasses

    model = hooked_transformer(tokenizer, "rotary", 2, "RMS")
    before, identity = state(model), parts(model)
    calls = fail_on_the_second_call(TransformerLensPasses, "compare")
    with pytest.raises(RuntimeError, match="interrupted"):
        qkspectra.run(model, tokenizer, **SMALL, **FAST)
    assert len(calls) == 2
    assert_same_state(model, before)
    assert parts(model) == identity
    assert model.cfg.n_key_value_heads == 2 and all(block.attn.repeat_kv_heads == 2 for block in model.blocks)
