"""The streamed operator analysis (factors read layer by layer, Gram-product residuals, threads) against the
in-memory computation it replaced (``operator_reference``), to 1e-12; the factors file's layout, old and new."""

from __future__ import annotations

import json

import numpy as np
import pytest
from operator_reference import ReferenceFitter

from qkspectra.analysis.seed import Anchor
from qkspectra.analysis.factors import load_factors, make_factors
from qkspectra.analysis.operator_fit import OperatorFitter, operator_evidence

FIT_FIELDS = ("T", "residual", "matched_T", "matched_residual", "angles_deg_mean")


def assert_fits_equal_reference(fitter: OperatorFitter, W_Q: np.ndarray, W_K: np.ndarray, pairs) -> None:
    """Every pair's fit equals the reference's to 1e-12 (singular values relative to ||M_L||); principal
    angles in degrees to 1e-5, the rounding of arccos near 0 (a subspace against itself: sqrt(eps) rad)."""
    H = W_Q.shape[1]
    reference = ReferenceFitter(W_Q, np.repeat(W_K, H // W_K.shape[1], axis=1), fitter.subspace_dim)
    for layer, anchor in pairs:
        ours, theirs = fitter.fit(layer, anchor), reference.fit(layer, anchor)
        np.testing.assert_array_equal(ours.matched_head, theirs.matched_head)
        for field in FIT_FIELDS:
            atol = 1e-5 if field.startswith("angles") else 1e-12
            np.testing.assert_allclose(getattr(ours, field), getattr(theirs, field), rtol=0, atol=atol, err_msg=field)
        norm = np.sqrt(reference.norm_sq[layer])[:, None]  # (H, 1)
        np.testing.assert_allclose(ours.difference_singvals / norm, theirs.difference_singvals / norm, rtol=0, atol=1e-12)


def random_gqa(seed: int, L=4, H=6, H_kv=2, d_model=48, d_head=8) -> tuple[np.ndarray, np.ndarray]:
    """Random factors; layer 1 a rescaled near copy of layer 3 (small residuals), layer 2 a permutation of it."""
    rng = np.random.default_rng(seed)
    W_Q = rng.standard_normal((L, H, d_model, d_head))
    W_K = rng.standard_normal((L, H_kv, d_model, d_head))
    W_Q[1] = 0.5 * W_Q[3] + 1e-6 * rng.standard_normal((H, d_model, d_head))
    W_K[1] = W_K[3]
    W_Q[2] = W_Q[3][::-1]
    return W_Q, W_K


def save_factors(path, W_Q, W_K) -> None:
    from safetensors.numpy import save_file

    save_file({"W_Q": W_Q.astype(np.float32), "W_K": W_K.astype(np.float32)}, path, metadata={"fold_ln": "true"})


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_fits_equal_in_memory_fits_on_random_models(tmp_path, seed):
    W_Q, W_K = random_gqa(seed)
    W_Q, W_K = W_Q.astype(np.float32).astype(np.float64), W_K.astype(np.float32).astype(np.float64)
    save_factors(tmp_path / "f.safetensors", W_Q, W_K)
    pairs = [(layer, anchor) for layer in range(4) for anchor in range(4)]
    assert_fits_equal_reference(OperatorFitter(load_factors(tmp_path / "f.safetensors")), W_Q, W_K, pairs)
    assert_fits_equal_reference(OperatorFitter(make_factors({"W_Q": W_Q, "W_K": W_K}), subspace_dim=3), W_Q, W_K, pairs)


def test_fits_after_the_layers_are_dropped_read_them_again(tmp_path):
    W_Q, W_K = random_gqa(4)
    save_factors(tmp_path / "f.safetensors", W_Q, W_K)
    fitter = OperatorFitter(load_factors(tmp_path / "f.safetensors"))
    first = fitter.fit(1, 3)
    fitter.drop_layers()
    assert fitter.fit(1, 3) is first  # a pair fitted before is kept
    W_Q, W_K = W_Q.astype(np.float32).astype(np.float64), W_K.astype(np.float32).astype(np.float64)
    assert_fits_equal_reference(fitter, W_Q, W_K, [(0, 3), (2, 1)])


def test_old_layout_with_repeated_key_heads_reads_and_gives_the_same_section(tmp_path):
    W_Q, W_K = random_gqa(2)
    save_factors(tmp_path / "new.safetensors", W_Q, W_K)
    save_factors(tmp_path / "old.safetensors", W_Q, np.repeat(W_K, 3, axis=1))
    assert load_factors(tmp_path / "old.safetensors").num_kv_heads == 6
    assert load_factors(tmp_path / "new.safetensors").num_kv_heads == 2
    anchors = {"last": Anchor("last", np.full(4, 3), ((0, 4),)), "middle": Anchor("middle", np.full(4, 2), ((0, 4),))}
    new = operator_evidence(tmp_path / "new.safetensors", anchors)
    old = operator_evidence(tmp_path / "old.safetensors", anchors)
    for name in anchors:
        assert new[name]["matched_head"] == old[name]["matched_head"]
        for key in ("T", "residual", "matched_T", "matched_residual", "principal_angles_deg_mean"):
            np.testing.assert_allclose(new[name][key], old[name][key], rtol=0, atol=1e-12)


def test_a_layer_fitted_to_itself_is_exact():
    W_Q, W_K = random_gqa(3)
    fit = OperatorFitter(make_factors({"W_Q": W_Q, "W_K": W_K})).fit(2, 2)
    assert fit.T.tolist() == [1.0] * 6 and fit.residual.tolist() == [0.0] * 6
    assert fit.matched_head.tolist() == list(range(6))


def test_pairs_go_through_the_given_map():
    W_Q, W_K = random_gqa(4)
    seen = []

    def serial_map(function, items):
        items = list(items)
        seen.append(len(items))
        return [function(item) for item in items]

    fitter = OperatorFitter(make_factors({"W_Q": W_Q, "W_K": W_K}), map=serial_map)
    fitter.fit_all(np.array([3, 3, 3, 3]))
    assert seen == [4, 4]  # the layers' summaries, then the four layer pairs


def random_llama_checkpoint(folder, *, layers=2, d_model=64, heads=4, kv_heads=2, seed=0):
    """A Llama checkpoint holding only the query/key projections and input norms (bfloat16)."""
    import torch
    from safetensors.torch import save_file

    d_head = d_model // heads
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d_model,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": 4 * d_model, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "torch_dtype": "bfloat16"}))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors[prefix + "self_attn.q_proj.weight"] = torch.randn(heads * d_head, d_model, generator=generator).bfloat16()
        tensors[prefix + "self_attn.k_proj.weight"] = torch.randn(kv_heads * d_head, d_model, generator=generator).bfloat16()
        tensors[prefix + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(d_model, generator=generator)).bfloat16()
    save_file(tensors, str(folder / "model.safetensors"))
    return (heads + kv_heads) * d_head * d_model * layers * 4  # the q/k weights' bytes in float32


def test_factors_file_stores_each_key_head_once(tmp_path):
    from qkspectra.extract.extraction import ExtractOptions, extract_to_files
    from qkspectra.geometry import load_geometry
    from qkspectra.analysis.document import AnalysisOptions, fitter_beside, gather_evidence
    from qkspectra.analysis.seed import analyze_all

    qk_bytes = random_llama_checkpoint(tmp_path / "llama")
    geometry_path, factors_path = extract_to_files(str(tmp_path / "llama"), tmp_path / "g.json",
                                                   options=ExtractOptions(static_only=True, quiet=True))
    factors = load_factors(factors_path)
    assert (factors.num_heads, factors.num_kv_heads) == (4, 2)
    assert qk_bytes < factors_path.stat().st_size <= qk_bytes + 1024  # plus the header
    geometry = load_geometry(geometry_path)
    fitter, _ = fitter_beside(geometry)
    evidence = gather_evidence(geometry, analyze_all(geometry), "last", AnalysisOptions(None, None, None), fitter=fitter)
    assert evidence.operator["last"]["residual"][1] == [0.0] * 4


@pytest.mark.slow
@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_streamed_fits_equal_in_memory_fits_on_the_bundled_models(tmp_path, model, request):
    """The first, second, middle and last layers against the last layer, from the extracted factors file."""
    from qkspectra.extract.extraction import ExtractOptions, extract_to_files

    request.getfixturevalue(f"{model}_source")  # smollm2: the session's GGUF conversion, once
    _, factors_path = extract_to_files(model, tmp_path / "g.json", options=ExtractOptions(static_only=True, quiet=True))
    factors = load_factors(factors_path)
    layers = [factors.layer(i) for i in range(factors.num_layers)]
    arrays = [np.stack([layer.W_Q for layer in layers]), np.stack([layer.W_K for layer in layers])]
    L = factors.num_layers
    pairs = [(layer, L - 1) for layer in sorted({0, 1, L // 2, L - 2, L - 1})]
    assert_fits_equal_reference(OperatorFitter(factors), *arrays, pairs)


def test_large_products_through_torch_give_the_same_fits(monkeypatch):
    """The GPU route of the large products (torch, float64), taken here on the CPU for every product."""
    import qkspectra.factored as factored

    W_Q, W_K = random_gqa(7)
    factors = make_factors({"W_Q": W_Q, "W_K": W_K})
    pairs = [(layer, 3) for layer in range(4)] + [(0, 1)]
    numpy_fits = [OperatorFitter(factors).fit(*pair) for pair in pairs]
    monkeypatch.setattr(factored, "product_device", lambda: "cpu")
    monkeypatch.setattr(factored, "GPU_MIN_PRODUCT", 0)
    for pair, expected in zip(pairs, numpy_fits):
        ours = OperatorFitter(factors).fit(*pair)
        for field in FIT_FIELDS:
            np.testing.assert_allclose(getattr(ours, field), getattr(expected, field), rtol=0, atol=1e-12)


def test_operator_device_named_but_missing_is_one_line(monkeypatch):
    import torch

    import qkspectra.factored as factored
    from qkspectra.errors import QkspectraError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    factored.product_device.cache_clear()
    monkeypatch.setenv("QKSPECTRA_OPERATOR_DEVICE", "cuda:0")
    with pytest.raises(QkspectraError, match="no CUDA device"):
        factored.product_device()
    factored.product_device.cache_clear()
    monkeypatch.setenv("QKSPECTRA_OPERATOR_DEVICE", "cpu")
    assert factored.product_device() is None
    factored.product_device.cache_clear()


def test_operator_section_equals_the_dense_reference(tmp_path):
    """The ``operator`` section from a factors file (float32 on disk) against the dense numpy reference
    (``operator_reference``, which imports nothing from qkspectra), for two anchor strategies, to 1e-12."""
    W_Q, W_K = random_gqa(5)
    save_factors(tmp_path / "f.safetensors", W_Q, W_K)
    W_Q, W_K = W_Q.astype(np.float32).astype(np.float64), W_K.astype(np.float32).astype(np.float64)
    anchors = {"last": Anchor("last", np.full(4, 3), ((0, 4),)),
               "group": Anchor("group", np.array([1, 1, 3, 3]), ((0, 2), (2, 4)))}
    section = operator_evidence(tmp_path / "f.safetensors", anchors, subspace_dim=4)
    reference = ReferenceFitter(W_Q, np.repeat(W_K, 3, axis=1), subspace_dim=4)
    for name, anchor in anchors.items():
        fits = [reference.fit(layer, int(a)) for layer, a in enumerate(anchor.layers)]
        ours = section[name]
        assert ours["matched_head"] == [fit.matched_head.tolist() for fit in fits]
        for key, field in (("T", "T"), ("residual", "residual"), ("matched_T", "matched_T"),
                           ("matched_residual", "matched_residual"), ("principal_angles_deg_mean", "angles_deg_mean")):
            atol = 1e-5 if field.startswith("angles") else 1e-12
            np.testing.assert_allclose(ours[key], [getattr(fit, field) for fit in fits], rtol=0, atol=atol, err_msg=key)
        residual = np.array([fit.residual for fit in fits])
        assert abs(ours["mean_residual"] - residual.mean()) < 1e-12
        assert abs(ours["mean_residual_fitted"] - residual[anchor.fitted].mean()) < 1e-12
        assert ours["subspace_dim"] == 4
