"""Bootstrap intervals for the correlations with entropy."""

from __future__ import annotations

import numpy as np
import pytest

from qkspectra.analysis.seed import analyze_all
from qkspectra.analysis.bootstrap import (
    BootstrapOptions,
    bootstrap_correlations,
    percentile_interval,
    resample_indices,
    resampled_pearson,
)
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry


def correlated_geometry(seed: int = 0, L: int = 6, H: int = 8, noise: float = 0.3) -> Geometry:
    """Entropy falls with the operator norm (and so with T against the last layer)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, (L, H))  # (L, H)
    base = np.sort(rng.uniform(0.1, 1.0, (H, 5)), axis=-1)[:, ::-1]  # (H, K)
    sigma = scale[:, :, None] * base[None]  # (L, H, K)
    entropy = 4.0 - scale + noise * rng.normal(size=(L, H))
    return Geometry(sigma, entropy)


def test_resampled_pearson_equals_corrcoef_on_each_resample():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=20), rng.normal(size=20)
    idx = resample_indices(rng, 20, 50)  # (50, 20)
    got = resampled_pearson(x, y, idx)
    want = [np.corrcoef(x[i], y[i])[0, 1] for i in idx]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_constant_resamples_are_left_out_and_counted():
    x, y = np.array([1.0, 2.0]), np.array([0.5, 0.1])
    idx = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    r = resampled_pearson(x, y, idx)
    assert np.isnan(r[[0, 2]]).all() and r[1] == pytest.approx(-1.0)
    interval = percentile_interval(-1.0, r, 0.95)
    assert interval.degenerate == 2 and interval.low == interval.high == pytest.approx(-1.0)


def test_intervals_per_strategy_bracket_the_estimate():
    analyses = analyze_all(correlated_geometry())
    result = bootstrap_correlations(analyses)
    assert result.draws == 1000 and result.confidence == 0.95 and "with replacement" in result.method
    assert set(result.corr_T_entropy) == set(result.corr_opnorm_entropy) == {"last", "middle", "best", "group"}
    for name, a in analyses.items():
        t = result.corr_T_entropy[name]
        assert t.estimate == a.corr_T_entropy.pearson
        assert t.low <= t.estimate <= t.high
    op = result.corr_opnorm_entropy["last"]
    assert op.estimate < -0.8 and op.high < 0  # a strong negative correlation excludes 0
    assert result.corr_opnorm_entropy["middle"] == op  # the op-norm does not depend on the anchor


def test_weaker_correlation_gives_a_wider_interval():
    tight = bootstrap_correlations(analyze_all(correlated_geometry(noise=0.1))).corr_opnorm_entropy["last"]
    loose = bootstrap_correlations(analyze_all(correlated_geometry(noise=2.0))).corr_opnorm_entropy["last"]
    assert loose.high - loose.low > 2 * (tight.high - tight.low)


def test_seeded_and_none_without_entropy():
    analyses = analyze_all(correlated_geometry())
    assert bootstrap_correlations(analyses) == bootstrap_correlations(analyses)
    assert bootstrap_correlations(analyses, BootstrapOptions(seed=1)) != bootstrap_correlations(analyses)
    g = correlated_geometry()
    assert bootstrap_correlations(analyze_all(Geometry(g.singular_values, None))) is None


def test_undefined_correlation_gives_no_interval():
    g = correlated_geometry()
    result = bootstrap_correlations(analyze_all(Geometry(g.singular_values, np.full(g.entropy.shape, 2.0))))
    assert result.corr_T_entropy["last"].estimate is None and result.corr_T_entropy["last"].low is None


def test_options_are_checked():
    with pytest.raises(QkspectraError):
        BootstrapOptions(draws=0)
    with pytest.raises(QkspectraError):
        BootstrapOptions(confidence=1.0)
