"""Hand-written adapters for layouts the generic reader cannot see: each reproduces its model's own attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    DistilBertConfig,
    ElectraConfig,
    FalconConfig,
    GPTBigCodeConfig,
    PersimmonConfig,
    Phi3Config,
    RobertaConfig,
    XLMRobertaConfig,
)

from qkspectra.models.adapters.base import fold_norm
from qkspectra.models.adapters import adapter_for
from qkspectra.models.adapters.attention import attention_probabilities
from qkspectra.models.tensors import StateDictSource
from test_adapters import NO_DROPOUT, VOCAB, run_with_hooks, tiny_model

BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, pad_token_id=1, **NO_DROPOUT)


def bert_like(model, i):
    norm = model.embeddings.LayerNorm if i == 0 else model.encoder.layer[i - 1].output.LayerNorm
    return model.encoder.layer[i].attention.self, norm


def electra_projected(model, i):
    return bert_like(model, i) if i else (model.encoder.layer[0].attention.self, None)


def distilbert(model, i):
    norm = model.embeddings.LayerNorm if i == 0 else model.transformer.layer[i - 1].output_layer_norm
    return model.transformer.layer[i].attention, norm


def bigcode(model, i):
    return model.h[i].attn, model.h[i].ln_1


def falcon(model, i):
    layer = model.h[i]
    return layer.self_attention, getattr(layer, "ln_attn", None) or layer.input_layernorm


def decoder(model, i):
    return model.layers[i].self_attn, model.layers[i].input_layernorm


FALCON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=False,
              hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0)
CASES = {
    "roberta": (lambda: RobertaConfig(**BERT_LIKE), bert_like, False),
    "xlm-roberta": (lambda: XLMRobertaConfig(**BERT_LIKE), bert_like, False),
    "electra": (lambda: ElectraConfig(embedding_size=32, **BERT_LIKE), bert_like, False),
    "electra-projected": (lambda: ElectraConfig(embedding_size=16, **BERT_LIKE), electra_projected, False),
    "distilbert": (lambda: DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0),
                   distilbert, False),
    "gpt_bigcode-mqa": (lambda: GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                        bigcode, True),
    "gpt_bigcode-mha": (lambda: GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 multi_query=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                        bigcode, True),
    "falcon-gqa": (lambda: FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **FALCON), falcon, True),
    "falcon-mqa": (lambda: FalconConfig(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                        **FALCON), falcon, True),
    "falcon-mha": (lambda: FalconConfig(new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                                        bias=True, **FALCON), falcon, True),
    "phi3": (lambda: Phi3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                                sliding_window=5, pad_token_id=0, bos_token_id=0, eos_token_id=0), decoder, True),
    "persimmon": (lambda: PersimmonConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=37, max_position_embeddings=64, qk_layernorm=True,
                                          hidden_dropout=0.0, attention_dropout=0.0), decoder, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fold", [False, True], ids=["raw", "folded"])
def test_factors_reproduce_eager_attention(case, fold):
    make_config, modules_of, causal = CASES[case]
    model = tiny_model(make_config())
    adapter = adapter_for(model.config)
    assert adapter.model_type == model.config.model_type
    tensors = StateDictSource(model.state_dict())
    attentions, inputs = run_with_hooks(model, modules_of, adapter.num_layers)
    for index, (x, x_hat) in enumerate(inputs):
        layer = adapter.layer(tensors, index)
        assert layer.W_K.shape == (adapter.num_kv_heads, adapter.d_model, adapter.d_head)
        assert (layer.norm_gain is None) == (x_hat is None)
        if fold and x_hat is not None:
            layer, x = fold_norm(layer), x_hat
        ours = attention_probabilities(layer, torch.from_numpy(x), causal=causal)
        np.testing.assert_allclose(ours.numpy(), attentions[index], atol=1e-5)


def test_kv_head_counts():
    assert adapter_for(CASES["falcon-gqa"][0]()).num_kv_heads == 2
    assert adapter_for(CASES["falcon-mqa"][0]()).num_kv_heads == 1
    assert adapter_for(CASES["gpt_bigcode-mqa"][0]()).num_kv_heads == 1
