"""The static part: spectrum summaries, norm folding."""

from __future__ import annotations

import numpy as np

from qkspectra.models.adapters.base import fold_norm
from qkspectra.extract.spectra import spectrum_statistics
from qkspectra.factored import metric_singular_values
from qkspectra.models.adapters import AttentionLayer


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
