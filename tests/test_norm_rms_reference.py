"""The corpus-measured q/k-norm root-mean-squares (metadata ``qk_norm.rms_query``, ``rms_key``) against
forward hooks on the norms themselves.

docs/models.md: r_Q, r_K are the root-mean-square of what the norm normalises, before the norm, over
the corpus: per head, sqrt(mean over the real tokens and the d_head coordinates of q^2) for per-head norms
(rms_query (L, H), rms_key (L, H_kv)); for a norm over the whole projection, the RMS of the whole projection
(the same for every head of the layer). Here the norms' inputs are read by hooks on the q_norm and k_norm
modules while a float64 copy of the model runs on the same corpus windows, one window at a time, with
eager attention in float64 throughout (``float64_attention``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Olmo2Config, Qwen3Config

SMALL = {"seq_len": 16, "max_tokens": 64}
COMMON = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
              max_position_embeddings=64)
CASES = {
    "qwen3": lambda vocab: Qwen3Config(num_key_value_heads=2, vocab_size=vocab, **COMMON),
    "olmo2": lambda vocab: Olmo2Config(num_key_value_heads=2, vocab_size=vocab, **COMMON),  # norms over the projection
    "gemma3_text": lambda vocab: Gemma3TextConfig(num_key_value_heads=1, query_pre_attn_scalar=8, sliding_window=5,
                                                  layer_types=["sliding_attention", "full_attention"], vocab_size=vocab,
                                                  **COMMON),
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qkspectra.models.bundled import bundled_model_path

    return AutoTokenizer.from_pretrained(bundled_model_path("minilm"))


def tiny(config) -> torch.nn.Module:
    """Random weights whose queries and keys have RMS far from 1 and different per head."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.2)
            if "norm" in name and name.endswith("weight"):
                parameter.add_(1.0)
        for layer in model.model.layers:  # each head's rows a different scale
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                rows = projection.weight.view(-1, 8, projection.weight.shape[-1])
                rows.mul_(torch.linspace(0.5, 3.0, rows.shape[0])[:, None, None])
    return model


# The layout of what each architecture hands its q/k norms (one window at a time, batch 1)
NORM_INPUT = {"qwen3": "tokens heads d_head", "gemma3_text": "heads tokens d_head", "olmo2": "tokens projection"}


def hooked_rms(model, windows: list[list[int]], layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(rms_query (L, H), rms_key (L, H_kv)) from the inputs of each layer's q_norm and k_norm."""
    per_head = layout != "tokens projection"
    model = model.to(torch.float64)
    sums = {}  # (layer, "q" | "k") -> sum over tokens of x^2 per head (or over the whole projection), and the count
    handles = []
    for index, layer in enumerate(model.model.layers):
        for side, norm in (("q", layer.self_attn.q_norm), ("k", layer.self_attn.k_norm)):
            def record(module, args, index=index, side=side):
                x = args[0].double()[0]
                if layout == "heads tokens d_head":
                    x = x.transpose(0, 1)  # (tokens, heads, d_head) per-head norms, (tokens, heads * d_head) otherwise
                squares, count = (x**2).sum(dim=0), x.shape[0]  # (heads, d_head) or (heads * d_head,)
                total, tokens = sums.get((index, side), (0.0, 0))
                sums[index, side] = (total + squares, tokens + count)

            handles.append(norm.register_forward_pre_hook(record))
    with torch.no_grad():
        for window in windows:
            model.model(input_ids=torch.tensor([window]))
    for handle in handles:
        handle.remove()
    L = len(model.model.layers)
    config = model.config
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads}
    result = {}
    for side in ("q", "k"):
        rows = []
        for index in range(L):
            squares, tokens = sums[index, side]
            if per_head:
                rows.append(torch.sqrt(squares.sum(-1) / (tokens * squares.shape[-1])).numpy())
            else:
                rows.append(np.full(heads[side], float(torch.sqrt(squares.sum() / (tokens * squares.numel())))))
        result[side] = np.stack(rows)
    return result["q"], result["k"]


@pytest.mark.parametrize("case", list(CASES))
def test_measured_qk_norm_rms_equals_the_norm_inputs_rms(case, tokenizer, monkeypatch):
    import qkspectra
    from float64_attention import float64_eager
    from qkspectra.extract.corpus import load_windows

    float64_eager(monkeypatch, __import__(f"transformers.models.{case}.modeling_{case}".replace("gemma3_text", "gemma3"),
                                          fromlist=["_"]))

    model = tiny(CASES[case](tokenizer.vocab_size)).to(torch.float64)
    geometry = qkspectra.extract_geometry(model, tokenizer, quiet=True, **SMALL)
    qk_norm = geometry.metadata["qk_norm"]
    assert qk_norm["rms"] == "measured on the corpus"
    windows = load_windows(tokenizer, corpus=None, window_per_line=False, **SMALL).windows
    assert geometry.metadata["num_tokens"] == sum(map(len, windows))
    rms_query, rms_key = hooked_rms(model, windows, NORM_INPUT[case])
    assert np.ptp(rms_query) > 0.5  # heads far from 1 and not alike: the check can fail
    assert np.asarray(qk_norm["rms_query"]).shape == rms_query.shape
    assert np.asarray(qk_norm["rms_key"]).shape == rms_key.shape
    np.testing.assert_allclose(qk_norm["rms_query"], rms_query, rtol=1e-12)
    np.testing.assert_allclose(qk_norm["rms_key"], rms_key, rtol=1e-12)
