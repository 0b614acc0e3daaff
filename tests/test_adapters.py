"""Each adapter's per-head factors reproduce the model's own eager attention probabilities.

Tiny random models are built from configs (no download). For every layer we capture the
hidden states entering the attention block (and, for folding, the input of the norm that
produced them, normalised here by hand), rebuild softmax(scale * q k^T + mask) from the
extracted W_Q, W_K, biases and rotary, and compare with ``output_attentions=True``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AutoModel,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    T5Config,
)

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import fold_norm
from qkspectra.extract.spectra import static_spectra
from qkspectra.models.adapters import AttentionLayer, adapter_for
from qkspectra.models.tensors import SafetensorsSource, StateDictSource

VOCAB = 50
SEQ_LEN = 12
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}


def tiny_model(config) -> nn.Module:
    """A randomly initialised base model (eager attention) with non-trivial norms and biases."""
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.2)
            if "norm" in name.lower() and name.endswith("weight"):
                parameter.add_(1.0)
    return model


# Per architecture: the attention module of layer i, the norm module whose output enters it
# (None if none), and whether attention is causal. Shared modules (ALBERT) are called once per layer.
def bert_modules(model, i):
    norm = model.embeddings.LayerNorm if i == 0 else model.encoder.layer[i - 1].output.LayerNorm
    return model.encoder.layer[i].attention.self, norm


def albert_modules(model, i):
    config = model.config

    def shared_layer(index):
        group = int(index / (config.num_hidden_layers / config.num_hidden_groups))
        return model.encoder.albert_layer_groups[group].albert_layers[0]

    return shared_layer(i).attention, None  # no layer is folded (see the ALBERT adapter)


def gpt2_modules(model, i):
    return model.h[i].attn, model.h[i].ln_1


def neox_modules(model, i):
    return model.layers[i].attention, model.layers[i].input_layernorm


def llama_modules(model, i):
    return model.layers[i].self_attn, model.layers[i].input_layernorm


def llama_config(cls, heads, kv_heads, **extra):
    return cls(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=64, **extra,
    )


CASES = {
    "bert": (lambda: BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64, **NO_DROPOUT), bert_modules, False),
    "albert": (lambda: AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                    **NO_DROPOUT), albert_modules, False),
    "albert-2-groups": (lambda: AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                                             num_hidden_groups=2, num_attention_heads=4, intermediate_size=37,
                                             max_position_embeddings=64, **NO_DROPOUT), albert_modules, False),
    "gpt2": (lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                **GPT2_NO_DROPOUT), gpt2_modules, True),
    "gpt2-inverse-layer-scale": (lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                    scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
                                                    **GPT2_NO_DROPOUT), gpt2_modules, True),
    "gpt2-unscaled": (lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         scale_attn_weights=False, **GPT2_NO_DROPOUT), gpt2_modules, True),
    "gpt_neox": (lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=37, max_position_embeddings=64, rotary_pct=0.25,
                                       hidden_dropout=0.0, attention_dropout=0.0), neox_modules, True),
    "llama-4q-1kv": (lambda: llama_config(LlamaConfig, 4, 1), llama_modules, True),
    "llama-4q-2kv": (lambda: llama_config(LlamaConfig, 4, 2, attention_bias=True), llama_modules, True),
    "llama-6q-1kv": (lambda: llama_config(LlamaConfig, 6, 1), llama_modules, True),
    "llama-6q-2kv": (lambda: llama_config(LlamaConfig, 6, 2), llama_modules, True),
    "mistral": (lambda: llama_config(MistralConfig, 4, 2), llama_modules, True),
    "qwen2": (lambda: llama_config(Qwen2Config, 6, 2), llama_modules, True),
}


def normalise(norm: nn.Module, h: torch.Tensor) -> np.ndarray:
    """The norm's output before its gain and bias, computed here in float64: (B, T, d_model)."""
    h = h.double()
    if isinstance(norm, nn.LayerNorm):
        return nn.functional.layer_norm(h, h.shape[-1:], eps=norm.eps).numpy()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).numpy()


def rotate(x: np.ndarray, layer: AttentionLayer) -> np.ndarray:
    """Apply the layer's rotary embedding at positions 0..T-1 to x (B, H, T, d_head)."""
    rotary = layer.rotary
    if rotary is None:
        return x
    half = rotary.rotary_dim // 2
    inv_freq = rotary.base ** (-np.arange(0, rotary.rotary_dim, 2) / rotary.rotary_dim)  # (half,)
    angles = np.arange(x.shape[2])[:, None] * inv_freq[None, :]  # (T, half)
    cos, sin = np.cos(angles), np.sin(angles)
    first, second, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin, rest], axis=-1)


def attention_probabilities(layer: AttentionLayer, x: np.ndarray, causal: bool) -> np.ndarray:
    """softmax(scale * q k^T + mask) from the extracted factors; x (B, T, d_model) -> (B, H, T, T)."""
    layer = layer.per_query_head()  # query head h reads key head h // (H / H_kv)
    q = np.einsum("btd,hde->bhte", x, layer.W_Q)
    k = np.einsum("btd,hde->bhte", x, layer.W_K)
    if layer.b_Q is not None:
        q = q + layer.b_Q[None, :, None, :]
    if layer.b_K is not None:
        k = k + layer.b_K[None, :, None, :]
    logits = layer.scale * rotate(q, layer) @ rotate(k, layer).transpose(0, 1, 3, 2)
    if causal:
        T = x.shape[1]
        logits = np.where(np.tril(np.ones((T, T), dtype=bool)), logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(-1, keepdims=True)


def run_with_hooks(model, modules_of, num_layers):
    """Forward a random batch; return attention maps and, per layer, attention and norm inputs."""
    attention_inputs: dict[nn.Module, list[torch.Tensor]] = {}
    norm_inputs: dict[nn.Module, list[torch.Tensor]] = {}
    handles = []

    def record_attention(module, args, kwargs):
        attention_inputs.setdefault(module, []).append(args[0] if args else kwargs["hidden_states"])

    def record_norm(module, args, output):
        norm_inputs.setdefault(module, []).append(args[0])

    modules = [modules_of(model, i) for i in range(num_layers)]
    seen = set()
    for attention, norm in modules:
        if id(attention) not in seen:
            handles.append(attention.register_forward_pre_hook(record_attention, with_kwargs=True))
            seen.add(id(attention))
        if norm is not None and id(norm) not in seen:
            handles.append(norm.register_forward_hook(record_norm))
            seen.add(id(norm))
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=generator)
    with torch.no_grad():
        attentions = model(input_ids=input_ids, output_attentions=True).attentions
    for handle in handles:
        handle.remove()
    per_layer = []
    calls: dict[int, int] = {}
    norm_calls: dict[int, int] = {}
    for attention, norm in modules:
        n = calls.get(id(attention), 0)
        calls[id(attention)] = n + 1
        x = attention_inputs[attention][n].double().numpy()
        h = None
        if norm is not None:
            m = norm_calls.get(id(norm), 0)
            norm_calls[id(norm)] = m + 1
            h = normalise(norm, norm_inputs[norm][m])
        per_layer.append((x, h))
    return [a.double().numpy() for a in attentions], per_layer


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fold", [False, True], ids=["raw", "folded"])
def test_factors_reproduce_eager_attention(case, fold):
    make_config, modules_of, causal = CASES[case]
    model = tiny_model(make_config())
    adapter = adapter_for(model.config)
    tensors = StateDictSource(model.state_dict())
    attentions, inputs = run_with_hooks(model, modules_of, adapter.num_layers)
    assert len(attentions) == adapter.num_layers
    for index, (x, x_hat) in enumerate(inputs):
        layer = adapter.layer(tensors, index)
        assert layer.W_Q.shape == (adapter.num_heads, adapter.d_model, adapter.d_head)
        assert layer.W_K.shape == (adapter.num_kv_heads, adapter.d_model, adapter.d_head)
        assert layer.kv_group_size == adapter.num_heads // adapter.num_kv_heads
        assert (layer.norm_gain is None) == (x_hat is None)
        if fold and x_hat is not None:
            np.testing.assert_allclose(x_hat * layer.norm_gain + (layer.norm_bias if layer.norm_bias is not None else 0), x, atol=1e-5)
            layer, x = fold_norm(layer), x_hat
        np.testing.assert_allclose(attention_probabilities(layer, x, causal), attentions[index], atol=1e-5)


@pytest.mark.parametrize(("case", "expected"), [
    ("qwen2", {"query": True, "key": True}), ("llama-4q-2kv", {"query": True, "key": True}),
    ("llama-6q-2kv", {"query": False, "key": False}), ("gpt2", {"query": True, "key": True}),
])
def test_query_and_key_biases_are_recorded_as_stored(case, expected):
    model = tiny_model(CASES[case][0]())
    static = static_spectra(adapter_for(model.config), StateDictSource(model.state_dict()), fold_ln=True)
    assert static.qk_biases == expected
    assert ("b_Q" in static.factors) == expected["query"] and ("b_K" in static.factors) == expected["key"]


def key_projection(model_type: str, attention: nn.Module, num_heads: int):
    """The module whose output holds the keys, and how to read them: output (B, T, *) -> (B, T, H_kv, d_head)."""
    if model_type in ("bert", "albert"):
        return attention.key, lambda y, dh: y.reshape(*y.shape[:2], -1, dh)
    if model_type == "gpt2":
        return attention.c_attn, lambda y, dh: np.split(y, 3, axis=-1)[1].reshape(*y.shape[:2], -1, dh)
    if model_type == "gpt_neox":
        return attention.query_key_value, lambda y, dh: y.reshape(*y.shape[:2], num_heads, 3, dh)[..., 1, :]
    return attention.k_proj, lambda y, dh: y.reshape(*y.shape[:2], -1, dh)


@pytest.mark.parametrize("case", list(CASES))
def test_key_factors_and_biases_equal_the_models_own_key_projection(case):
    """Key biases cancel in the softmax without rotary, so attention maps cannot check them: the keys can."""
    make_config, modules_of, _ = CASES[case]
    model = tiny_model(make_config())
    adapter = adapter_for(model.config)
    module, read_keys = key_projection(adapter.model_type, modules_of(model, 1)[0], adapter.num_heads)
    seen = []
    handle = module.register_forward_hook(lambda m, args, output: seen.append((args[0], output)))
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2)))
    handle.remove()
    x, y = (t.double().numpy() for t in seen[-1 if adapter.model_type != "albert" else 1])  # ALBERT: 2nd call is layer 1
    layer = adapter.layer(StateDictSource(model.state_dict()), 1)
    ours = np.einsum("btd,hde->bthe", x, layer.W_K)  # (B, T, H_kv, d_head)
    if layer.b_K is not None:
        ours = ours + layer.b_K
    np.testing.assert_allclose(ours, read_keys(y, adapter.d_head), atol=1e-5)


def test_albert_layers_share_one_spectrum():
    make_config, _, _ = CASES["albert"]
    model = tiny_model(make_config())
    adapter = adapter_for(model.config)
    with torch.no_grad():  # shared layer norm gains far from 1, so that folding them would show
        model.encoder.albert_layer_groups[0].albert_layers[0].full_layer_layer_norm.weight.uniform_(0.2, 3.0)
    tensors = StateDictSource(model.state_dict())
    raw = static_spectra(adapter, tensors, fold_ln=False)
    default = static_spectra(adapter, tensors, fold_ln=True)
    # Layer 0 reads a projection, not a norm output; folding the others alone would set it apart.
    assert raw.norm_folded == default.norm_folded == [False, False, False]
    for row in (*raw.rows, *default.rows):
        assert row == raw.rows[0]


def test_safetensors_source_matches_state_dict_single_and_sharded(tmp_path):
    model = tiny_model(CASES["llama-6q-2kv"][0]())
    adapter = adapter_for(model.config)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    expected = adapter.layer(StateDictSource(model.state_dict()), 1)
    for folder in ("single", "sharded"):
        source = SafetensorsSource(tmp_path / folder)
        layer = adapter_for(model.config).layer(source, 1)
        np.testing.assert_array_equal(layer.W_Q, expected.W_Q)
        np.testing.assert_array_equal(layer.W_K, expected.W_K)
        np.testing.assert_array_equal(layer.norm_gain, expected.norm_gain)
        assert source.dtype("layers.1.self_attn.q_proj.weight") == "float32"


def test_truncated_safetensors_is_a_clean_error(tmp_path):
    model = tiny_model(CASES["bert"][0]())
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(QkspectraError, match="corrupt or truncated"):
        adapter_for(model.config).layer(SafetensorsSource(tmp_path), 0)


def test_unknown_model_type_names_it_and_lists_supported():
    with pytest.raises(QkspectraError, match=r"model type 't5' cannot be read: .*relative-position terms\) "
                                             r"\(hand-written adapters: albert, bert, distilbert, electra"):
        adapter_for(T5Config())


def with_attribute(config, **values):
    for name, value in values.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (with_attribute(BertConfig(hidden_size=32), num_attention_heads=5), "hidden size 32 is not a multiple of 5"),
        (with_attribute(BertConfig(), num_attention_heads=0), "cannot read the attention's shapes"),
        (SimpleNamespace(**dict(BertConfig().to_dict(), num_attention_heads="12")), "cannot read the attention's shapes"),
        (with_attribute(BertConfig(), num_hidden_layers=0), "num_layers is 0, not a positive whole number"),
        (with_attribute(LlamaConfig(num_attention_heads=6, hidden_size=48), num_key_value_heads=4),
         "6 query heads cannot share 4 key/value heads"),
        (with_attribute(LlamaConfig(), num_key_value_heads=-3), "num_kv_heads is -3"),
    ],
    ids=["heads-not-tiling", "zero-heads", "string-heads", "zero-layers", "kv-not-dividing", "negative-kv"],
)
def test_config_shapes_that_describe_no_attention_are_refused(config, message):
    with pytest.raises(QkspectraError, match=message):
        adapter_for(config)


def test_a_tensor_of_the_wrong_shape_is_named():
    model = tiny_model(CASES["llama-6q-2kv"][0]())
    state = dict(model.state_dict())
    name = "layers.1.self_attn.k_proj.weight"
    state[name] = state[name][:-1]
    with pytest.raises(QkspectraError, match=rf"tensor '{name}' has shape \(15, 48\), but the config implies \(16, 48\)"):
        adapter_for(model.config).layer(StateDictSource(state), 1)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (BertConfig(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
        (AlbertConfig(position_embedding_type="relative_key_query"), "position_embedding_type"),
        (AlbertConfig(inner_group_num=2), "inner_group_num=2"),
        (GPT2Config(add_cross_attention=True), "add_cross_attention=True"),
        (with_attribute(LlamaConfig(), attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
        (with_attribute(LlamaConfig(), use_qk_norm=True), "use_qk_norm=True"),
        (with_attribute(GPTNeoXConfig(), alibi=True), "alibi=True"),
        (LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type='yarn'"),
        (LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "attention_factor": 2.0}),
         "attention_factor=2.0"),
    ],
    ids=["bert-relative", "albert-relative", "albert-inner-groups", "gpt2-cross", "softcap", "qk-norm", "alibi",
         "yarn", "rope-attention-factor"],
)
def test_logit_changing_config_is_refused(config, message):
    with pytest.raises(QkspectraError, match=message.replace("(", r"\(")):
        adapter_for(config)


def test_non_finite_weights_are_refused():
    model = tiny_model(CASES["bert"][0]())
    state = dict(model.state_dict())
    state["encoder.layer.1.attention.self.key.weight"] = state["encoder.layer.1.attention.self.key.weight"].clone()
    state["encoder.layer.1.attention.self.key.weight"][0, 0] = float("nan")
    with pytest.raises(QkspectraError, match="layer 1: the checkpoint's query/key weights are not all finite"):
        static_spectra(adapter_for(model.config), StateDictSource(state))


def test_sliding_window_refused_only_when_it_bites():
    mistral = adapter_for(MistralConfig(sliding_window=128))
    mistral.check_sequence_length(128)
    with pytest.raises(QkspectraError, match="sliding_window=128, shorter than the sequence length 129"):
        mistral.check_sequence_length(129)
    adapter_for(MistralConfig(sliding_window=None)).check_sequence_length(100_000)
    adapter_for(Qwen2Config(use_sliding_window=False, sliding_window=64)).check_sequence_length(512)
    qwen = adapter_for(Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=2,
                                   num_hidden_layers=4))
    with pytest.raises(QkspectraError, match="sliding window of 64 tokens in layers 2..3"):
        qwen.check_sequence_length(65)
