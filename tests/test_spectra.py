"""Maths of the static part: factored spectra, their summaries, norm folding."""

from __future__ import annotations

import numpy as np
import pytest

from qkspectra.extract.spectra import fold_norm, metric_singular_values, spectrum_statistics
from qkspectra.models.adapters import AttentionLayer


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
    W_K = np.repeat(rng.standard_normal((H_kv, d_model, d_head)), H // H_kv, axis=0)
    factored = metric_singular_values(W_Q, W_K, 0.3, kv_group_size=H // H_kv)  # (H, min(d_model, d_head))
    dense = np.linalg.svd(0.3 * W_Q @ W_K.transpose(0, 2, 1), compute_uv=False)[:, : factored.shape[1]]
    assert np.all(np.diff(factored, axis=1) <= 0)
    np.testing.assert_allclose(factored, dense, atol=1e-10 * dense[:, :1].max())


def test_statistics_on_known_spectra():
    spectra = np.array([
        [2.0, 0.0, 0.0, 0.0],  # rank one
        [1.0, 1.0, 1.0, 1.0],  # flat
        [3.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],  # zero head
    ])
    stats = spectrum_statistics(spectra)
    np.testing.assert_allclose(stats["operator_norm"], [2, 1, 3, 0])
    np.testing.assert_allclose(stats["frobenius_norm"], [2, 2, np.sqrt(10), 0])
    np.testing.assert_allclose(stats["stable_rank"], [1, 4, 10 / 9, 0])
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(stats["effective_rank"], [1, 4, np.exp(-(p * np.log(p)).sum()), 0])


def test_statistics_keep_leading_axes():
    stats = spectrum_statistics(np.ones((2, 3, 5)))
    assert all(values.shape == (2, 3) for values in stats.values())
    np.testing.assert_allclose(stats["effective_rank"], 5)


def test_folding_the_norm_preserves_every_logit():
    rng = np.random.default_rng(1)
    H, d_model, d_head = 2, 10, 4
    layer = AttentionLayer(
        W_Q=rng.standard_normal((H, d_model, d_head)), W_K=rng.standard_normal((H, d_model, d_head)),
        b_Q=rng.standard_normal((H, d_head)), b_K=None, scale=0.5,
        norm_gain=rng.uniform(0.5, 2.0, d_model), norm_bias=rng.standard_normal(d_model), rotary=None,
    )
    x_hat, y_hat = rng.standard_normal(d_model), rng.standard_normal(d_model)
    x, y = layer.norm_gain * x_hat + layer.norm_bias, layer.norm_gain * y_hat + layer.norm_bias
    folded = fold_norm(layer)
    assert folded.norm_gain is None and folded.b_K is not None
    raw_logits = np.einsum("he,he->h", x @ layer.W_Q + layer.b_Q, y @ layer.W_K)
    folded_logits = np.einsum("he,he->h", x_hat @ folded.W_Q + folded.b_Q, y_hat @ folded.W_K + folded.b_K)
    np.testing.assert_allclose(folded_logits, raw_logits, rtol=1e-12)
    # The metric itself (no biases) is diag(g) W_Q W_K^T diag(g).
    g = np.diag(layer.norm_gain)
    dense = np.linalg.svd(layer.scale * g @ layer.W_Q @ layer.W_K.transpose(0, 2, 1) @ g, compute_uv=False)
    np.testing.assert_allclose(metric_singular_values(folded.W_Q, folded.W_K, layer.scale), dense[:, :d_head],
                               rtol=1e-10)
    assert fold_norm(folded) is folded
