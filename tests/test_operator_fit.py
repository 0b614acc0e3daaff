"""Operator-level fits from factors: against dense matrices, planted controls, the factors file, MiniLM."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qkspectra.analysis.seed import Anchor
from qkspectra.errors import QkspectraError
from qkspectra.geometry import parse_geometry
from qkspectra.analysis.factors import load_factors, make_factors
from qkspectra.analysis.operator_fit import OperatorFitter, operator_evidence
from qkspectra.factored import frobenius_inner, head_singular_values, pairwise_frobenius_inner


def last_anchor(L: int) -> dict[str, Anchor]:
    return {"last": Anchor("last", np.full(L, L - 1), ((0, L),))}


def geometry_of(factors) -> object:
    sv = head_singular_values(factors.W_Q, factors.W_K)  # (L, H, d_head)
    return parse_geometry({"num_layers": sv.shape[0], "num_heads": sv.shape[1],
                           "static": [{"metric_singvals_per_head": s.tolist()} for s in sv]})


def dense_fit(W_Q: np.ndarray, W_K: np.ndarray, layer: int, head: int, anchor: int, anchor_head: int):
    """T and residual by forming the d_model x d_model matrices."""
    M = W_Q[layer, head] @ W_K[layer, head].T
    Ma = W_Q[anchor, anchor_head] @ W_K[anchor, anchor_head].T
    T = np.sum(M * Ma) / np.sum(Ma * Ma)
    return T, np.linalg.norm(M - T * Ma) / np.linalg.norm(M)


def dense_mean_angle(W_Q, W_K, layer, head, anchor, k):
    def bases(l):
        U, _, Vt = np.linalg.svd(W_Q[l, head] @ W_K[l, head].T)
        return U[:, :k], Vt[:k].T

    angles = []
    for b1, b2 in zip(bases(layer), bases(anchor)):
        cos = np.linalg.svd(b1.T @ b2, compute_uv=False)
        angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    return np.concatenate(angles).mean()


@pytest.fixture(scope="module")
def random_factors():
    rng = np.random.default_rng(7)
    L, H, d_model, d_head = 3, 3, 20, 4
    W_Q = rng.standard_normal((L, H, d_model, d_head))
    W_K = rng.standard_normal((L, H, d_model, d_head))
    # layer 1 is the anchor's heads, permuted and rescaled, plus a little noise: matching must find them
    W_Q[1] = 0.5 * W_Q[2][[2, 0, 1]] + 0.01 * rng.standard_normal((H, d_model, d_head))
    W_K[1] = W_K[2][[2, 0, 1]]
    return make_factors({"W_Q": W_Q, "W_K": W_K})


def test_gram_products_equal_dense(random_factors):
    A, B = random_factors.W_Q[0], random_factors.W_K[0]
    C, D = random_factors.W_Q[1], random_factors.W_K[1]
    dense = np.array([[np.sum((A[h] @ B[h].T) * (C[g] @ D[g].T)) for g in range(3)] for h in range(3)])
    np.testing.assert_allclose(pairwise_frobenius_inner(A, B, C, D), dense, rtol=1e-12)
    np.testing.assert_allclose(frobenius_inner(A, B, C, D), np.diag(dense), rtol=1e-12)


def test_operator_evidence_equals_dense_computation(random_factors):
    W_Q, W_K = random_factors.W_Q, random_factors.W_K
    section = operator_evidence(random_factors, last_anchor(3), subspace_dim=2)["last"]
    assert section["subspace_dim"] == 2
    for layer, head in itertools.product(range(3), range(3)):
        T, residual = dense_fit(W_Q, W_K, layer, head, 2, head)
        assert section["T"][layer][head] == pytest.approx(T, rel=1e-9)
        assert section["residual"][layer][head] == pytest.approx(residual, abs=1e-9)
        assert section["principal_angles_deg_mean"][layer][head] == pytest.approx(
            dense_mean_angle(W_Q, W_K, layer, head, 2, 2), abs=1e-5)
        # brute-force assignment: the permutation with the largest total |cosine|
        def abs_cos(g, h=head):
            M, Ma = W_Q[layer, h] @ W_K[layer, h].T, W_Q[2, g] @ W_K[2, g].T
            return abs(np.sum(M * Ma)) / np.linalg.norm(M) / np.linalg.norm(Ma)

        best = max(itertools.permutations(range(3)),
                   key=lambda p: sum(abs_cos(p[h], h) for h in range(3)))
        assert section["matched_head"][layer][head] == best[head]
        T_m, residual_m = dense_fit(W_Q, W_K, layer, head, 2, best[head])
        assert section["matched_T"][layer][head] == pytest.approx(T_m, rel=1e-9)
        assert section["matched_residual"][layer][head] == pytest.approx(residual_m, abs=1e-9)
    assert section["matched_head"][1] == [2, 0, 1]
    assert max(section["matched_residual"][1]) < 0.05 < min(section["residual"][1])
    assert section["mean_residual"] == pytest.approx(np.mean(section["residual"]))


def test_independent_random_layers_have_residual_near_one():
    rng = np.random.default_rng(3)
    shape = (4, 6, 64, 8)
    factors = make_factors({"W_Q": rng.standard_normal(shape), "W_K": rng.standard_normal(shape)})
    section = operator_evidence(factors, last_anchor(4))["last"]
    residual = np.array(section["residual"])  # (L, H)
    assert np.all(residual[:3] > 0.95)
    assert np.all(residual[3] < 1e-12)
    assert np.all(np.array(section["matched_residual"])[:3] > 0.9)
    assert np.mean(section["principal_angles_deg_mean"][0]) > 45


def test_planted_rescale_of_one_shared_operator_is_recovered_exactly():
    """GPT-2 with the same attention weights in every layer and scale 1/(layer + 1): T = (a + 1) / (L + 1)."""
    from qkspectra.analysis.reconstruction.layers import model_factors

    model = shared_gpt2(num_layers=4)
    factors = model_factors(model, fold_ln=True)
    section = operator_evidence(factors, last_anchor(4))["last"]
    planted = np.array([4 / (layer + 1) for layer in range(4)])  # (L,)
    np.testing.assert_allclose(section["T"], np.repeat(planted[:, None], 4, axis=1), rtol=1e-12)
    assert np.max(section["residual"]) < 1e-9
    assert np.max(section["matched_residual"]) < 1e-9
    assert section["matched_head"] == [[0, 1, 2, 3]] * 4
    assert np.max(section["principal_angles_deg_mean"]) < 1e-3


def shared_gpt2(num_layers: int):
    """A tiny GPT-2 whose layers share their query/key weights, biases and ln_1; scale 1/(layer + 1)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=num_layers, n_head=4, n_embd=32, vocab_size=64, n_positions=64, bos_token_id=0,
                        eos_token_id=0, scale_attn_by_inverse_layer_idx=True, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    first = model.transformer.h[0]
    with torch.no_grad():
        first.attn.c_attn.weight.normal_(0, 0.3)
        first.attn.c_attn.bias.normal_()
        first.ln_1.weight.uniform_(0.5, 1.5)
        first.ln_1.bias.normal_()
        for block in model.transformer.h[1:]:
            block.attn.c_attn.weight[:, :64].copy_(first.attn.c_attn.weight[:, :64])
            block.attn.c_attn.bias[:64].copy_(first.attn.c_attn.bias[:64])
            block.ln_1.load_state_dict(first.ln_1.state_dict())
    return model


def test_fits_are_cached_per_layer_pair(random_factors):
    fitter = OperatorFitter(random_factors)
    anchors = {"last": Anchor("last", np.full(3, 2), ((0, 3),)), "index": Anchor("index", np.full(3, 2), ((0, 3),))}
    section = operator_evidence(random_factors, anchors, fitter=fitter)
    assert section["last"] == section["index"]
    assert sorted(fitter._fits) == [(0, 2), (1, 2), (2, 2)]


def test_load_factors_round_trip_and_errors(tmp_path, random_factors):
    from safetensors.numpy import save_file

    path = tmp_path / "g.factors.safetensors"
    save_file({"W_Q": random_factors.W_Q.astype(np.float32), "W_K": random_factors.W_K.astype(np.float32)},
              path, metadata={"fold_ln": "false"})
    geometry = geometry_of(random_factors)
    loaded = load_factors(path, geometry)
    assert loaded.fold_ln is False and loaded.layer(0).W_Q.dtype == np.float64 and loaded.num_heads == 3
    assert operator_evidence(path, last_anchor(3))["last"]["subspace_dim"] == 4

    with pytest.raises(QkspectraError, match="no such factors file"):
        load_factors(tmp_path / "missing.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(QkspectraError, match="not a readable safetensors"):
        load_factors(tmp_path / "corrupt.safetensors")
    save_file({"W_Q": np.zeros((3, 3, 20, 4), np.float32)}, tmp_path / "no_k.safetensors")
    with pytest.raises(QkspectraError, match="no W_K"):
        load_factors(tmp_path / "no_k.safetensors")
    save_file({"W_Q": np.zeros((3, 3, 20, 4), np.float32), "W_K": np.zeros((3, 3, 20, 5), np.float32)},
              tmp_path / "mismatch.safetensors")
    with pytest.raises(QkspectraError, match="W_K has shape"):
        load_factors(tmp_path / "mismatch.safetensors")
    other = parse_geometry({"num_layers": 2, "num_heads": 3,
                            "static": [{"metric_singvals_per_head": [[1.0]] * 3}] * 2})
    with pytest.raises(QkspectraError, match="factors for 3 layers x 3 heads"):
        load_factors(path, other)
    wrong = parse_geometry({"num_layers": 3, "num_heads": 3,
                            "static": [{"metric_singvals_per_head": [[1.0]] * 3}] * 3})
    with pytest.raises(QkspectraError, match="do not reproduce the spectra"):
        load_factors(path, wrong)


@pytest.mark.slow
def test_minilm_raw_last_anchor_equals_dense(minilm_source):
    """Acceptance: raw weights, anchor last, same head; mean over all (L, h) as a dense numpy computation."""
    from qkspectra.extract.spectra import static_spectra
    from qkspectra.models.adapters import adapter_for
    from qkspectra.models.tensors import open_tensors

    static = static_spectra(adapter_for(minilm_source.config), open_tensors(minilm_source.folder), fold_ln=False)
    factors = make_factors(static.factors, geometry=parse_geometry({
        "num_layers": 6, "num_heads": 12, "static": static.rows}))
    W_Q, W_K = factors.W_Q, factors.W_K
    section = operator_evidence(factors, last_anchor(6))["last"]
    dense = [dense_fit(W_Q, W_K, layer, head, 5, head) for layer in range(6) for head in range(12)]
    dense_residual = np.array([r for _, r in dense]).reshape(6, 12)
    assert section["mean_residual"] == pytest.approx(dense_residual.mean(), abs=1e-6)
    np.testing.assert_allclose(section["residual"], dense_residual, atol=1e-6)
    np.testing.assert_allclose(section["T"], np.array([t for t, _ in dense]).reshape(6, 12), rtol=1e-6)
    assert 0.99 < dense_residual[:5].mean() < 1.0  # the layers other than the anchor differ almost entirely
    assert section["matched_mean_residual"] <= section["mean_residual"] + 1e-12


@pytest.mark.parametrize("name, beside", [("g.factors.safetensors", True), ("../../etc/passwd", False), ("sub/g.safetensors", False),
                                          ("..", False), ("", False), (["g"], False)])
def test_factors_path_for_takes_only_a_file_name_beside_the_geometry(tmp_path, name, beside):
    from qkspectra.geometry import Geometry
    from qkspectra.analysis.factors import factors_path_for

    g = Geometry(np.ones((1, 1, 1)), None, metadata={"factors_file": name}, source=str(tmp_path / "g.json"))
    assert factors_path_for(g) == (tmp_path / name if beside else None)
