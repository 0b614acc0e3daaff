"""Rank-k corrections: residual curves against dense truncated SVDs, the smallest k, parameter accounting."""

from __future__ import annotations

import numpy as np
import pytest

from qkspectra.analysis.seed import Anchor
from qkspectra.errors import QkspectraError
from qkspectra.geometry import parse_geometry
from qkspectra.analysis.factors import make_factors
from qkspectra.analysis.rank_k import operator_param_ratio, rank_k_evidence, smallest_rank, tail_residual_curve
from qkspectra.factored import head_singular_values

L, H, D_MODEL, D_HEAD = 3, 2, 12, 3


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(11)
    W_Q = rng.standard_normal((L, H, D_MODEL, D_HEAD))
    W_K = rng.standard_normal((L, H, D_MODEL, D_HEAD))
    W_Q[0, 0] = 2 * W_Q[2, 0]  # an exact rescale of the anchor: k = 0
    W_K[0, 0] = W_K[2, 0]
    return make_factors({"W_Q": W_Q, "W_K": W_K})


@pytest.fixture(scope="module")
def geometry(factors):
    sv = head_singular_values(factors.W_Q, factors.W_K)
    return parse_geometry({"num_layers": L, "num_heads": H,
                           "static": [{"metric_singvals_per_head": s.tolist()} for s in sv]})


ANCHORS = {"last": Anchor("last", np.full(L, L - 1), ((0, L),))}


def test_tail_residual_curve_and_smallest_rank():
    curve = tail_residual_curve(np.array([0.1, -3.0, 0.0, 4.0]), np.array(10.0))
    np.testing.assert_allclose(curve, [np.sqrt(25.01) / 10, np.sqrt(9.01) / 10, 0.01, 0.0, 0.0])
    assert smallest_rank(curve, 0.10) == 2
    assert smallest_rank(curve, 0.51) == 0
    assert tail_residual_curve(np.array([1.0]), np.array(0.0)).tolist() == [0.0, 0.0]


def test_operator_curve_equals_dense_truncated_svd(factors, geometry):
    section = rank_k_evidence(geometry, ANCHORS, factors)["last"]
    W_Q, W_K = factors.W_Q, factors.W_K
    k_expected = np.zeros((L, H), dtype=int)
    curves = []
    for layer in range(L):
        for head in range(H):
            M, Ma = W_Q[layer, head] @ W_K[layer, head].T, W_Q[2, head] @ W_K[2, head].T
            T = np.sum(M * Ma) / np.sum(Ma * Ma)
            s = np.linalg.svd(M - T * Ma, compute_uv=False)[: 2 * D_HEAD]
            curve = [np.sqrt(np.sum(s[k:] ** 2)) / np.linalg.norm(M) for k in range(2 * D_HEAD + 1)]
            curves.append(curve)
            k_expected[layer, head] = next(k for k, r in enumerate(curve) if r < 0.10)
    assert section["operator"]["k"] == k_expected.tolist()
    assert section["operator"]["k"][0][0] == 0 and section["operator"]["k"][2] == [0, 0]
    fitted = np.arange(L) != 2  # the curve and mean_k_fitted leave the anchor layer out
    np.testing.assert_allclose(section["curve"]["operator_mean_residual"],
                               np.mean(np.reshape(curves, (L, H, -1))[fitted], axis=(0, 1)), atol=1e-10)
    assert section["curve"]["k"] == list(range(2 * D_HEAD + 1))
    assert section["operator"]["mean_k"] == pytest.approx(k_expected.mean())
    assert section["operator"]["mean_k_fitted"] == pytest.approx(k_expected[fitted].mean())


def test_spectral_k_fixes_the_largest_differences(factors, geometry):
    section = rank_k_evidence(geometry, ANCHORS, factors)["last"]["spectral"]
    sigma = geometry.singular_values
    for layer in range(L):
        for head in range(H):
            s, a = sigma[layer, head], sigma[2, head]
            d = s - (s @ a) / (a @ a) * a
            tail = np.sort(np.abs(d))[::-1]
            k = next(k for k in range(D_HEAD + 1) if np.linalg.norm(tail[k:]) / np.linalg.norm(s) < 0.10)
            assert section["k"][layer][head] == k
    # anchor spectra stored (H K values), the other 2 layers store T and 2 numbers per correction
    k = np.array(section["k"])
    assert section["param_ratio"] == pytest.approx((H * D_HEAD + (1 + 2 * k[:2]).sum()) / (L * H * D_HEAD))


def test_operator_param_ratio_accounting():
    k = np.array([[1, 0], [2, 3], [0, 0]])
    anchor = Anchor("last", np.array([2, 2, 2]), ((0, 3),))
    full_head = 2 * D_MODEL * D_HEAD
    expected = (H * full_head + 4 + (1 + 2 + 3) * (2 * D_MODEL + 1)) / (L * H * full_head)
    assert operator_param_ratio(k, anchor, D_MODEL, D_HEAD) == pytest.approx(expected)
    groups = Anchor("group", np.array([0, 0, 2]), ((0, 2), (2, 3)))  # two anchor layers stored in full
    expected = (2 * H * full_head + 2 + (2 + 3) * (2 * D_MODEL + 1)) / (L * H * full_head)
    assert operator_param_ratio(k, groups, D_MODEL, D_HEAD) == pytest.approx(expected)


def test_without_factors_only_the_spectral_level(geometry):
    section = rank_k_evidence(geometry, ANCHORS)["last"]
    assert section["operator"] is None and section["curve"]["operator_mean_residual"] is None
    assert len(section["curve"]["spectral_mean_residual"]) == D_HEAD + 1
    with pytest.raises(QkspectraError, match="threshold"):
        rank_k_evidence(geometry, ANCHORS, threshold=1.5)
