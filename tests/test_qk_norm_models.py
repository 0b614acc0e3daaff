"""Models that normalise queries and keys: exact reproduction of their attention, and the linearised metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma3TextConfig, Olmo2Config, Qwen3Config

from qkspectra.extract.linearised_norm import isotropic_rms, linearise
from qkspectra.models.adapters.base import fold_norm
from qkspectra.extract.spectra import static_spectra
from qkspectra.models.adapters import adapter_for
from qkspectra.models.adapters.attention import attention_probabilities, queries_and_keys
from qkspectra.models.tensors import StateDictSource
from test_adapters import SEQ_LEN, VOCAB, normalise, tiny_model

COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
              head_dim=8, max_position_embeddings=64)
CASES = {
    "qwen3": lambda: Qwen3Config(num_key_value_heads=2, **COMMON),
    "qwen3-sliding": lambda: Qwen3Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=1, **COMMON),
    "olmo2": lambda: Olmo2Config(num_key_value_heads=2, **COMMON),
    "gemma3_text": lambda: Gemma3TextConfig(
        num_key_value_heads=1, query_pre_attn_scalar=12, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **COMMON),
}


def block_inputs(model, num_layers: int):
    """Eager attention maps and, per layer, the attention block's input and the normalised input of its norm."""
    layers = model.layers
    inputs, normed = [], []
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True) for layer in layers]
    handles += [layer.input_layernorm.register_forward_hook(lambda m, args, out: normed.append(args[0]))
                for layer in layers if hasattr(layer, "input_layernorm")]
    input_ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        attentions = model(input_ids=input_ids, output_attentions=True).attentions
    for handle in handles:
        handle.remove()
    x_hat = [normalise(layer.input_layernorm, h) if hasattr(layer, "input_layernorm") else None
             for layer, h in zip(layers, normed)] or [None] * num_layers
    return attentions, [x.double() for x in inputs], x_hat


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fold", [False, True], ids=["raw", "folded"])
def test_factors_norms_and_positions_reproduce_eager_attention(case, fold):
    model = tiny_model(CASES[case]())
    adapter = adapter_for(model.config)
    tensors = StateDictSource(model.state_dict())
    attentions, inputs, normed = block_inputs(model, adapter.num_layers)
    for index in range(adapter.num_layers):
        layer = adapter.layer(tensors, index)
        assert layer.q_norm is not None and layer.k_norm is not None
        x = inputs[index]
        if fold and layer.norm_gain is not None:
            layer, x = fold_norm(layer), torch.from_numpy(normed[index])
        ours = attention_probabilities(layer, x, causal=True)
        np.testing.assert_allclose(ours.numpy(), attentions[index].double().numpy(), atol=1e-5)


def test_gemma3_layers_carry_their_window_rotary_and_scale():
    adapter = adapter_for(CASES["gemma3_text"]())
    model = tiny_model(adapter.config)
    tensors = StateDictSource(model.state_dict())
    layers = [adapter.layer(tensors, i) for i in range(3)]
    assert [layer.sliding_window for layer in layers] == [5, None, 5]
    assert [layer.rotary.base for layer in layers] == [10_000.0, 1_000_000.0, 10_000.0]
    assert layers[0].scale == 12**-0.5
    np.testing.assert_array_equal(layers[0].q_norm.gain[0], 1.0 + model.layers[0].self_attn.q_norm.weight.detach().double().numpy())


def test_linearised_metric_is_the_logit_where_the_rms_is_the_typical_one():
    """At a query and key whose RMS equal r_Q, r_K, x^T M y is the normalised logit exactly (eps = 0)."""
    model = tiny_model(CASES["qwen3"]())
    adapter = adapter_for(model.config)
    layer = adapter.layer(StateDictSource(model.state_dict()), 0)
    layer = type(layer)(**{**layer.__dict__, "q_norm": _no_eps(layer.q_norm), "k_norm": _no_eps(layer.k_norm),
                           "rotary": None})
    x = torch.randn(1, 2, adapter.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    q, k = queries_and_keys(layer, x, torch.zeros(1, 2, dtype=torch.long))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # one key head per query head
    logits = (q @ k.transpose(-1, -2))[0, :, 0, 1]  # (H,) query token 0, key token 1
    raw_q = np.einsum("d,hde->he", x[0, 0].numpy(), layer.W_Q)  # (H, d_head)
    raw_k = np.einsum("d,hde->he", x[0, 1].numpy(), layer.W_K)  # (H_kv, d_head)
    rms = (np.sqrt((raw_q**2).mean(-1)), np.sqrt((raw_k**2).mean(-1)))
    flat = linearise(layer, rms).per_query_head()
    metric_logits = layer.scale * np.einsum("d,hde,hfe,f->h", x[0, 0].numpy(), flat.W_Q, flat.W_K, x[0, 1].numpy())
    np.testing.assert_allclose(metric_logits, logits.numpy(), rtol=1e-12)


def _no_eps(norm):
    return type(norm)(gain=norm.gain, bias=norm.bias, eps=0.0, over=norm.over, centred=norm.centred)


@pytest.mark.parametrize("case", ["qwen3", "olmo2"])
def test_spectra_do_not_depend_on_the_scale_of_the_query_and_key_weights(case):
    model = tiny_model(CASES[case]())
    adapter = adapter_for(model.config)
    state = dict(model.state_dict())
    scaled = {name: tensor * (8.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
              for name, tensor in state.items()}
    base = static_spectra(adapter, StateDictSource(state))
    again = static_spectra(adapter, StateDictSource(scaled))
    for row, other in zip(base.rows, again.rows):
        np.testing.assert_allclose(row["metric_singvals_per_head"], other["metric_singvals_per_head"], rtol=1e-10)


def test_isotropic_rms_is_the_rms_of_queries_from_isotropic_input():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 16, 4))  # (H, d_model, d_head)
    x = rng.normal(size=(200_000, 16))  # isotropic, unit RMS
    from qkspectra.models.adapters.base import QKNorm

    for over in ("head", "projection"):
        norm = QKNorm(gain=np.ones((3, 4)), bias=None, eps=0.0, over=over, centred=False)
        q = np.einsum("nd,hde->nhe", x, W)
        measured = np.sqrt((q**2).mean((0, 2))) if over == "head" else np.full(3, np.sqrt((q**2).mean()))
        np.testing.assert_allclose(isotropic_rms(W, None, norm), measured, rtol=1e-2)


def test_extract_records_how_the_metric_was_linearised(tmp_path, cli):
    import json

    from transformers import AutoModel, AutoTokenizer

    from qkspectra.models.bundled import bundled_model_path

    config = CASES["gemma3_text"]()
    config.vocab_size = 30522  # the MiniLM tokenizer's
    folder = tmp_path / "gemma3"
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path("minilm")).save_pretrained(folder)
    static, dynamic = tmp_path / "s.json", tmp_path / "d.json"
    assert cli(["extract", str(folder), "-o", str(static), "--static-only", "-q"])[0] == 0
    # windows longer than the sliding window: allowed, each layer's entropy is over the keys it sees
    assert cli(["extract", str(folder), "-o", str(dynamic), "--seq-len", "16", "--max-tokens", "64", "-q"])[0] == 0
    s, d = (json.loads(path.read_text()) for path in (static, dynamic))
    assert s["metadata"]["adapter"] == "gemma3_text"
    assert s["metadata"]["qk_norm"]["over"] == "each head"
    assert s["metadata"]["qk_norm"]["rms"].startswith("isotropic")
    assert d["metadata"]["qk_norm"]["rms"] == "measured on the corpus"
    assert s["static"][0]["metric_singvals_per_head"] != d["static"][0]["metric_singvals_per_head"]
    assert np.isfinite(d["dynamic"][0]["mean_normalized_entropy_per_head"]).all()
