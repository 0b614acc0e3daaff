"""The bundled checkpoints: factored spectra against numpy's dense SVD, GGUF cache, loading.

The dense reference is built here straight from the safetensors tensors (not through the
adapters): M = s * diag(g) W_Q^h (W_K^h)^T diag(g) as a d_model x d_model matrix, every head
of every layer, with and without the norm gain.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from qkspectra.extract.spectra import static_spectra
from qkspectra.models import load_model, resolve_model
from qkspectra.models import gguf_cache
from qkspectra.models.adapters import adapter_for
from qkspectra.models.tensors import open_tensors

pytestmark = pytest.mark.slow


def minilm_dense_metrics(weights, layer: int, fold: bool) -> np.ndarray:
    """(12, 384, 384) metrics of MiniLM layer ``layer``."""
    H, d_head = 12, 32
    attention = f"encoder.layer.{layer}.attention.self"
    W_Q = weights.get_tensor(f"{attention}.query.weight").astype(np.float64)  # (H*d_head, d_model), x @ W.T
    W_K = weights.get_tensor(f"{attention}.key.weight").astype(np.float64)
    norm = "embeddings.LayerNorm" if layer == 0 else f"encoder.layer.{layer - 1}.output.LayerNorm"
    gain = weights.get_tensor(f"{norm}.weight").astype(np.float64) if fold else np.ones(W_Q.shape[1])
    return np.stack([
        d_head**-0.5 * (gain[:, None] * W_Q[h * d_head:(h + 1) * d_head].T)
        @ (gain[:, None] * W_K[h * d_head:(h + 1) * d_head].T).T
        for h in range(H)
    ])


def smollm2_dense_metrics(weights, layer: int, fold: bool) -> np.ndarray:
    """(9, 576, 576) metrics of SmolLM2 layer ``layer``; query head h reads key head h // 3."""
    H, H_kv, d_head = 9, 3, 64
    attention = f"model.layers.{layer}.self_attn"
    W_Q = weights.get_tensor(f"{attention}.q_proj.weight").astype(np.float64)  # (576, 576)
    W_K = weights.get_tensor(f"{attention}.k_proj.weight").astype(np.float64)  # (192, 576)
    gain = (weights.get_tensor(f"model.layers.{layer}.input_layernorm.weight").astype(np.float64) if fold
            else np.ones(W_Q.shape[1]))
    group = H // H_kv
    return np.stack([
        d_head**-0.5 * (gain[:, None] * W_Q[h * d_head:(h + 1) * d_head].T)
        @ (gain[:, None] * W_K[(h // group) * d_head:(h // group + 1) * d_head].T).T
        for h in range(H)
    ])


DENSE = {"minilm": minilm_dense_metrics, "smollm2": smollm2_dense_metrics}


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "raw"])
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_factored_spectra_match_dense_svd(name, fold, request):
    source = request.getfixturevalue(f"{name}_source")
    adapter = adapter_for(source.config)
    static = static_spectra(adapter, open_tensors(source.folder), fold_ln=fold)
    assert static.norm_folded == [fold] * adapter.num_layers
    with safe_open(source.folder / "model.safetensors", framework="numpy") as weights:
        for layer, row in enumerate(static.rows):
            factored = np.array(row["metric_singvals_per_head"])  # (H, d_head)
            dense = np.linalg.svd(DENSE[name](weights, layer, fold), compute_uv=False)  # (H, d_model)
            top = dense[:, :1]
            error = np.abs(factored - dense[:, : adapter.d_head]) / top  # relative to each head's largest
            assert error.max() <= 1e-6, f"layer {layer}: error {error.max():.2e} of the largest singular value"
            assert np.all(dense[:, adapter.d_head:] <= 1e-6 * top)  # the metric has rank <= d_head
            np.testing.assert_allclose(row["operator_norm_per_head"], top[:, 0], rtol=1e-6)


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_cholesky_and_householder_routes_agree_on_real_weights(name, request, monkeypatch):
    """Every factor of the bundled models takes the Gram (CholeskyQR) route, and Householder QR gives the same values."""
    from qkspectra import factored

    source = request.getfixturevalue(f"{name}_source")
    adapter = adapter_for(source.config)
    fallbacks = []
    householder = factored.householder_r_factors
    monkeypatch.setattr(factored, "householder_r_factors", lambda W: fallbacks.append(W.shape) or householder(W))
    gram_route = np.array([row["metric_singvals_per_head"] for row in
                           static_spectra(adapter, open_tensors(source.folder)).rows])  # (L, H, d_head)
    assert fallbacks == []
    monkeypatch.setattr(factored, "GRAM_CONDITION_LIMIT", 0.0)  # now every factor takes Householder QR
    reference = np.array([row["metric_singvals_per_head"] for row in
                          static_spectra(adapter, open_tensors(source.folder)).rows])
    assert len(fallbacks) == 2 * adapter.num_layers
    error = np.abs(gram_route - reference) / reference[..., :1]
    assert error.max() <= 1e-13


def test_gguf_is_converted_once_into_the_cache(smollm2_source, model_cache, monkeypatch):
    folder = smollm2_source.folder
    assert folder.parent == model_cache and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {"config.json", "model.safetensors", gguf_cache.SOURCE_RECORD} <= {p.name for p in folder.iterdir()}
    assert not [p for p in model_cache.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    again = resolve_model("smollm2", progress=False)
    assert again.folder == folder and again.config.model_type == "llama"
    assert "SmolLM2-135M-Instruct.Q4_1.gguf dequantised to float32" in again.description


def test_gguf_path_and_bundled_name_share_one_cache_entry(smollm2_source, monkeypatch):
    from qkspectra.models.bundled import bundled_model_path

    monkeypatch.setattr(gguf_cache, "_convert", lambda *a, **k: pytest.fail("reconverted"))
    by_path = resolve_model(str(bundled_model_path("smollm2")), progress=False)
    assert by_path.kind == "gguf" and by_path.folder == smollm2_source.folder


def test_loaded_smollm2_is_an_eager_float32_llama_in_eval_mode(smollm2_source):
    model, tokenizer = load_model(smollm2_source)
    assert type(model).__name__ == "LlamaModel" and not model.training
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.float32"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (30, 9, 3)
    assert len(tokenizer("Hello world")["input_ids"]) >= 2


def test_smollm2_end_to_end_through_analyze(tmp_path, smollm2_source):
    """extract (static and dynamic, a small budget) then analyze every strategy with nulls and the factors."""
    import json

    from qkspectra.cli import main

    out = tmp_path / "geometry.json"
    main(["extract", "smollm2", "-o", str(out), "--seq-len", "64", "--max-tokens", "256", "--quiet"])
    geometry = json.loads(out.read_text())
    assert (geometry["num_layers"], geometry["num_heads"]) == (30, 9)
    assert geometry["metadata"]["num_kv_heads"] == 3 and geometry["metadata"]["model_type"] == "llama"
    entropy = np.array([row["mean_attention_entropy_per_head"] for row in geometry["dynamic"]])  # (L, H)
    assert entropy.shape == (30, 9) and np.all(entropy >= 0) and np.all(entropy <= np.log(64) + 1e-9)
    main(["analyze", str(out), "--anchor", "all", "--null", "--null-draws", "20", "--json", str(tmp_path / "a.json"), "--quiet"])
    document = json.loads((tmp_path / "a.json").read_text())
    assert set(document["strategies"]) == {"last", "middle", "best", "group"}
    assert np.shape(document["rescale"]["T"]) == (30, 9)
    assert document["entropy"]["corr_T_entropy"] is not None
    assert document["null"]["gaussian"]["available"] and document["null"]["shuffle"]["available"]
    assert set(document["operator"]) == {"last", "middle", "best", "group"}
    assert set(document["verdict"]["layers"]) == {"spectral", "spectral_vs_null", "operator", "functional"}
