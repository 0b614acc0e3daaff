"""Factored linear algebra: the static spectra's CholeskyQR triangles and singular values against dense SVDs."""

from __future__ import annotations

import numpy as np
import pytest

from qkspectra import factored
from qkspectra.factored import NonFiniteFactor, metric_singular_values, r_factors


def orthonormal_columns(rng, rows, cols):
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def test_planted_singular_values_come_back():
    rng = np.random.default_rng(0)
    H, d_model, d_head = 3, 40, 6
    planted = np.sort(rng.uniform(0.1, 5.0, (H, d_head)), axis=1)[:, ::-1]  # (H, d_head)
    W_Q = np.empty((H, d_model, d_head))
    W_K = np.empty((H, d_model, d_head))
    for h in range(H):
        U, V = orthonormal_columns(rng, d_model, d_head), orthonormal_columns(rng, d_model, d_head)
        A = rng.standard_normal((d_head, d_head)) + 3 * np.eye(d_head)  # invertible mixing inside the head
        W_Q[h] = U @ np.diag(np.sqrt(planted[h])) @ A
        W_K[h] = V @ np.diag(np.sqrt(planted[h])) @ np.linalg.inv(A).T
    np.testing.assert_allclose(metric_singular_values(W_Q, W_K, 0.25), 0.25 * planted, rtol=1e-10)


@pytest.mark.parametrize(("H", "H_kv", "d_model", "d_head"), [(4, 4, 32, 8), (6, 2, 24, 8), (2, 1, 5, 8)])
def test_factored_equals_dense_svd(H, H_kv, d_model, d_head):
    rng = np.random.default_rng(H * 100 + d_model)
    W_Q = rng.standard_normal((H, d_model, d_head))
    W_K = rng.standard_normal((H_kv, d_model, d_head))  # query head h reads W_K[h // (H / H_kv)]
    values = metric_singular_values(W_Q, W_K, 0.3)  # (H, min(d_model, d_head))
    per_query_head = np.repeat(W_K, H // H_kv, axis=0)  # (H, d_model, d_head)
    dense = np.linalg.svd(0.3 * W_Q @ per_query_head.transpose(0, 2, 1), compute_uv=False)[:, : values.shape[1]]
    assert np.all(np.diff(values, axis=1) <= 0)
    np.testing.assert_allclose(values, dense, atol=1e-10 * dense[:, :1].max())


def factor_with_singular_values(rng, d_model, values):
    """A (d_model, len(values)) factor with the given singular values and random singular vectors."""
    U = orthonormal_columns(rng, d_model, len(values))
    V = orthonormal_columns(rng, len(values), len(values))
    return U @ np.diag(values) @ V.T


def test_r_factors_are_the_qr_triangle_up_to_row_signs():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((5, 30, 7))
    R = r_factors(W)  # (5, 7, 7)
    householder = np.linalg.qr(W, mode="r")
    assert np.allclose(np.tril(R, -1), 0)
    np.testing.assert_allclose(np.abs(R), np.abs(householder), atol=1e-12)


@pytest.mark.parametrize("smallest", [1e-3, 1e-6, 1e-9, 0.0], ids=["cond1e3", "cond1e6", "cond1e9", "rank_deficient"])
def test_ill_conditioned_factors_keep_every_digit_the_metric_needs(smallest):
    """Badly conditioned or rank-deficient factors still give the dense SVD's values (Householder fallback)."""
    rng = np.random.default_rng(3)
    d_model, d_head = 50, 8
    values = np.geomspace(1.0, max(smallest, 1e-300), d_head)
    if smallest == 0.0:
        values[-2:] = 0.0
    W_Q = np.stack([factor_with_singular_values(rng, d_model, values) for _ in range(3)])
    W_K = np.stack([factor_with_singular_values(rng, d_model, values[::-1].copy()) for _ in range(3)])
    dense = np.linalg.svd(W_Q @ W_K.transpose(0, 2, 1), compute_uv=False)[:, :d_head]
    np.testing.assert_allclose(metric_singular_values(W_Q, W_K, 1.0), dense, rtol=0, atol=1e-13 * dense[:, :1].max())


def kahan_factor(rng, d_model, d_head, c):
    """Q times a Kahan matrix: badly conditioned (about 1e6 at c = 0.2, d_head 64) with a mild diagonal."""
    s = np.sqrt(1 - c * c)
    kahan = np.diag(s ** np.arange(d_head)) @ (np.eye(d_head) + np.triu(np.full((d_head, d_head), -c), 1))
    return orthonormal_columns(rng, d_model, d_head) @ kahan


def test_a_badly_conditioned_factor_with_a_harmless_looking_diagonal_takes_householder(monkeypatch):
    rng = np.random.default_rng(6)
    W_Q = np.stack([kahan_factor(rng, 200, 64, 0.2) for _ in range(2)])  # diagonal spread ~4, condition ~1e6
    W_K = rng.standard_normal((2, 200, 64))
    fallbacks = []
    householder = factored.householder_r_factors
    monkeypatch.setattr(factored, "householder_r_factors", lambda W: fallbacks.append(len(W)) or householder(W))
    values = metric_singular_values(W_Q, W_K, 1.0)
    assert fallbacks == [2]  # the two Kahan factors; the Gaussian keys stay on the Gram route
    dense = np.linalg.svd(W_Q @ W_K.transpose(0, 2, 1), compute_uv=False)[:, :64]
    np.testing.assert_allclose(values, dense, rtol=0, atol=1e-14 * dense[:, :1].max())


def test_the_gram_route_and_householder_agree(monkeypatch):
    rng = np.random.default_rng(4)
    W_Q, W_K = rng.standard_normal((6, 40, 8)), rng.standard_normal((2, 40, 8))
    fallbacks = []
    householder = factored.householder_r_factors
    monkeypatch.setattr(factored, "householder_r_factors", lambda W: fallbacks.append(len(W)) or householder(W))
    gram_route = metric_singular_values(W_Q, W_K, 0.7)
    assert fallbacks == []
    monkeypatch.setattr(factored, "GRAM_CONDITION_LIMIT", 0.0)  # every factor takes Householder QR
    np.testing.assert_allclose(metric_singular_values(W_Q, W_K, 0.7), gram_route, rtol=1e-13)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("d_model", [40, 5], ids=["gram", "wide_head"])
def test_non_finite_factors_are_refused(bad, d_model):
    W = np.ones((2, d_model, 8))
    W[1, 3, 2] = bad
    with pytest.raises(NonFiniteFactor):
        metric_singular_values(np.ones((2, d_model, 8)), W, 1.0)


def test_factors_whose_gram_matrix_overflows_still_give_their_values():
    rng = np.random.default_rng(5)
    W_Q, W_K = rng.standard_normal((2, 40, 8)), rng.standard_normal((2, 40, 8))
    W_K[1] *= 1e160  # W_K^T W_K overflows float64; the metric itself does not
    dense = np.linalg.svd(W_Q @ W_K.transpose(0, 2, 1), compute_uv=False)[:, :8]
    np.testing.assert_allclose(metric_singular_values(W_Q, W_K, 1.0), dense, rtol=1e-12)
