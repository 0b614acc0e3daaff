"""The functional test of a TransformerLens model: reconstructions written into the bridge's own weights.

Against independent references: on a bridge of a transformers Llama the functional section equals that
of the transformers model itself; on TransformerLens's native random models (rotary, grouped-query)
each operator reconstruction's per-head KL and loss change equal those measured from TransformerLens's
own ``hook_pattern`` maps and losses after writing the anchors' weights in by hand. Every parameter,
module, mode and config field comes back bit for bit, also when the test fails midway.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformer_lens")

import qkspectra  # noqa: E402
from test_transformer_lens import SMALL, assert_same_state, llama_bridge, native_bridge, state, tiny_llama  # noqa: E402
from test_transformer_lens import tokenizer  # noqa: E402,F401  (the fixture)

FAST = {"functional_tokens": 96, "null_draws": 10}


def parts(bridge) -> dict:
    """The bridge's module and parameter objects by path (identity, not values), and its head counts."""
    return {"modules": {name: id(m) for name, m in torch.nn.Module.named_modules(bridge, remove_duplicate=False)},
            "parameters": {name: id(p) for name, p in torch.nn.Module.named_parameters(bridge, remove_duplicate=False)},
            "kv_heads": [bridge.cfg.n_key_value_heads] + [block.attn.config.n_key_value_heads for block in bridge.blocks]}


def functional_windows(tokenizer) -> list[list[int]]:
    from qkspectra.extract.corpus import load_windows

    return load_windows(tokenizer, corpus=None, seq_len=SMALL["seq_len"], max_tokens=FAST["functional_tokens"],
                        window_per_line=False).windows


def patterns_and_losses(bridge, windows) -> tuple[list[torch.Tensor], np.ndarray]:
    """Per window, (L, H, query_pos, key_pos) float64 attention maps from hook_pattern, and summed next-token losses."""
    maps, losses = [], []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            loss, cache = bridge.run_with_cache(ids, return_type="loss", names_filter=lambda n: n.endswith("hook_pattern"))
            maps.append(torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0].double() for l in range(bridge.cfg.n_layers)]))
            losses.append(float(loss) * (len(window) - 1))
    return maps, np.array(losses)


def operator_reference(bridge, tokenizer, anchor_layers: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-head KL (L, H), delta loss) of writing T * W_Q[a] and W_K[a] (unfolded) into a copy of the bridge by hand,
    from TransformerLens's own attention maps and losses. Key heads stay shared: the anchor's share alike."""
    windows = functional_windows(tokenizer)
    rewritten = copy.deepcopy(bridge)
    with torch.no_grad():
        for layer, anchor in enumerate(anchor_layers):
            attention, source = rewritten.blocks[layer].attn, bridge.blocks[anchor].attn
            W_Q = torch.from_numpy(T[layer])[:, None, None].float() * source.W_Q  # (H, d_model, d_head)
            attention.q.original_component.weight.copy_(W_Q.permute(0, 2, 1).reshape(-1, W_Q.shape[1]))
            attention.k.original_component.weight.copy_(source.k.original_component.weight)
    original, original_loss = patterns_and_losses(bridge, windows)
    changed, changed_loss = patterns_and_losses(rewritten, windows)
    kl = sum((torch.xlogy(p0, p0) - torch.xlogy(p0, p)).sum((-1, -2)) for p0, p in zip(original, changed))  # (L, H)
    tokens, predicted = sum(map(len, windows)), sum(len(w) - 1 for w in windows)
    return kl.numpy() / tokens, float((changed_loss.sum() - original_loss.sum()) / predicted)


@pytest.mark.parametrize("position, kv_heads, norm", [("rotary", 2, "RMS"), ("standard", None, "LN")])
def test_native_models_equal_their_own_attention_maps_rewritten_by_hand(tokenizer, position, kv_heads, norm):
    bridge = native_bridge(tokenizer, position, kv_heads, norm)
    before, identity = state(bridge), parts(bridge)
    result = qkspectra.run(bridge, tokenizer, fold_ln=False, **SMALL, **FAST)
    assert_same_state(bridge, before)
    assert parts(bridge) == identity
    document = result.document
    functional = document["functional"]
    assert abs(functional["control"]["delta_loss"]) < 1e-6 and np.abs(functional["control"]["per_head_kl"]).max() < 1e-6
    anchor_layers = np.array(document["strategies"]["last"]["anchor"]["layers"])
    ours = functional["last"]["operator"]
    kl, delta_loss = operator_reference(bridge, tokenizer, anchor_layers, np.array(document["operator"]["last"]["T"]))
    np.testing.assert_allclose(ours["per_head_kl"], kl, rtol=0, atol=1e-5)
    assert abs(ours["delta_loss"] - delta_loss) < 1e-5
    for strategy, entry in document["strategies"].items():  # layers before the first one replaced keep their attention
        anchors = np.array(entry["anchor"]["layers"])  # (L,)
        first_replaced = int(np.argmax(anchors != np.arange(len(anchors))))
        per_layer = np.array(functional[strategy]["operator"]["per_head_kl"]).max(axis=1)  # (L,)
        assert per_layer[:first_replaced].max(initial=0) <= 1e-6 and per_layer[first_replaced] > 1e-3, strategy
    assert result.verdict.layers["functional"].code != "n/a"


def test_a_bridge_of_a_llama_gives_the_functional_section_of_the_llama_itself(tokenizer):
    bridge = llama_bridge(tokenizer)
    before, identity = state(bridge), parts(bridge)
    through_bridge = qkspectra.run(bridge, tokenizer, **SMALL, **FAST).document["functional"]
    assert_same_state(bridge, before)
    assert parts(bridge) == identity
    assert all(block.attn.original_component.num_key_value_groups == 2 for block in bridge.blocks)
    itself = qkspectra.run(tiny_llama(tokenizer), tokenizer, **SMALL, **FAST).document["functional"]
    assert through_bridge.keys() == itself.keys()
    for strategy, entry in itself.items():
        reconstructions = {"control": entry} if strategy == "control" else {
            name: entry[name] for name in ("spectral", "operator", "operator_rank_k") if entry[name] is not None}
        for name, expected in reconstructions.items():
            got = through_bridge[strategy] if strategy == "control" else through_bridge[strategy][name]
            np.testing.assert_allclose(got["per_head_kl"], expected["per_head_kl"], rtol=1e-4, atol=1e-7)
            assert got["delta_loss"] == pytest.approx(expected["delta_loss"], rel=1e-4, abs=1e-7)
            assert got["mean_entropy_shift"] == pytest.approx(expected["mean_entropy_shift"], rel=1e-4, abs=1e-7)


def test_a_functional_test_failing_midway_leaves_the_bridge_exactly_as_it_was(tokenizer, fail_on_the_second_call):
    from qkspectra.analysis.reconstruction.transformer_lens_passes import TransformerLensPasses

    bridge = native_bridge(tokenizer, "rotary", 2, "RMS")
    before, identity = state(bridge), parts(bridge)
    calls = fail_on_the_second_call(TransformerLensPasses, "compare")
    with pytest.raises(RuntimeError, match="interrupted"):
        qkspectra.run(bridge, tokenizer, **SMALL, **FAST)
    assert len(calls) == 2
    assert_same_state(bridge, before)
    assert parts(bridge) == identity
    assert all(block.attn.original_component.kv_repeats == 2 for block in bridge.blocks)
