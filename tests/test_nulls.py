"""Null baselines: the Bartlett sampler, the batched figures, p-values, and the sanity cases."""

from __future__ import annotations

import numpy as np
import pytest

from qkspectra.analysis import nulls as nulls_module
from qkspectra.analysis.seed import analyze, analyze_all
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry
from qkspectra.analysis.nulls import (
    NullOptions,
    anchor_rules,
    batched_figures,
    empirical_p_value,
    gaussian_null,
    gaussian_spectra,
    null_baselines,
    real_figures,
    sample_bartlett_factor,
    shuffle_null,
    shuffled_spectra,
)
from qkspectra.analysis.verdict import null_layer

FIGURES = {
    "shape_invariance_mean",
    "cross_head_mean_cos",
    "mean_residual.last",
    "mean_residual.middle",
    "mean_residual.best",
    "mean_residual.group",
    "mean_residual_fitted.last",
    "mean_residual_fitted.middle",
    "mean_residual_fitted.best",
    "mean_residual_fitted.group",
}


def gaussian_geometry(seed: int, L: int, H: int, d_model: int, d_head: int, num_kv_heads: int | None = None) -> Geometry:
    """A geometry with no shared operator: one draw of the Gaussian null itself."""
    rng = np.random.default_rng(seed)
    sigma = gaussian_spectra([rng], L, H, d_model, d_head, num_kv_heads or H)[0]  # (L, H, d_head)
    meta = {"d_model": d_model, "d_head": d_head}
    if num_kv_heads:
        meta["num_kv_heads"] = num_kv_heads
    return Geometry(sigma, rng.uniform(0.5, 3.0, (L, H)), metadata=meta)


def planted_geometry(L: int = 6, H: int = 5, K: int = 8) -> Geometry:
    """sigma_L^h = t_L * base^h with power-law heads (base_k = (k + 1)^-alpha_h), far from Gaussian spectra."""
    alpha = np.linspace(0.3, 3.0, H)  # (H,)
    base = (np.arange(1, K + 1)[None, :] ** -alpha[:, None])  # (H, K)
    t = np.linspace(0.4, 2.0, L)  # (L,)
    return Geometry(t[:, None, None] * base[None], None, metadata={"d_model": 64, "d_head": K})


# ---------------------------------------------------------------- the Gaussian sampler


def test_bartlett_factor_is_upper_triangular_with_chi_diagonal():
    R = sample_bartlett_factor(np.random.default_rng(0), (3000,), d_model=12, d_head=4)  # (3000, 4, 4)
    assert np.all(np.tril(R, k=-1) == 0)
    diag_sq = np.diagonal(R, axis1=-2, axis2=-1) ** 2  # (3000, 4): chi-square with 12 - i degrees of freedom
    se = np.sqrt(2 * (12 - np.arange(4)) / 3000)
    assert np.all(np.abs(diag_sq.mean(axis=0) - (12 - np.arange(4))) < 4 * se)


def test_bartlett_spectra_match_explicit_gaussian_products():
    """Singular values of R_Q R_K^T (sampled) against those of W_Q W_K^T (explicit Gaussian factors)."""
    d_model, d_head, n = 10, 4, 4000
    rng = np.random.default_rng(1)
    W_Q = rng.standard_normal((n, d_model, d_head))
    W_K = rng.standard_normal((n, d_model, d_head))
    explicit = np.linalg.svd(W_Q @ np.swapaxes(W_K, -1, -2), compute_uv=False)[:, :d_head]  # (n, d_head)
    R_Q = np.linalg.qr(W_Q, mode="r")  # (n, d_head, d_head): the factor the module docstring names
    R_K = np.linalg.qr(W_K, mode="r")
    via_qr = np.linalg.svd(R_Q @ np.swapaxes(R_K, -1, -2), compute_uv=False)
    np.testing.assert_allclose(via_qr, explicit, rtol=1e-9)  # the identity itself, draw by draw
    sampled = gaussian_spectra(nulls_module.draw_generators(0, 1, 0, n), 1, 1, d_model, d_head, 1)[:, 0, 0]  # (n, d_head)
    for stat in (lambda s: s, lambda s: s**2):  # means and second moments of every singular value
        a, b = stat(explicit), stat(sampled)
        se = np.sqrt(a.var(axis=0) / n + b.var(axis=0) / n)
        assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 4 * se)


def test_heads_of_a_kv_group_share_the_key_factor():
    """Heads sharing W_K have correlated spectra; heads with their own W_K do not."""
    n, d_model, d_head = 3000, 6, 3

    def top_corr(num_kv_heads):
        s = gaussian_spectra(nulls_module.draw_generators(5, 1, 0, n), 1, 2, d_model, d_head, num_kv_heads)[:, 0, :, 0]  # (n, 2)
        return np.corrcoef(s[:, 0], s[:, 1])[0, 1]

    assert top_corr(1) > 0.15
    assert abs(top_corr(2)) < 0.06


def test_gaussian_null_at_minilm_shapes_reproduces_the_seed_false_positive():
    """Independent heads of MiniLM's shapes score a mean residual of about 0.016: the seed's 'supported'."""
    g = gaussian_geometry(0, L=6, H=12, d_model=384, d_head=32)
    null = gaussian_null(g, analyze_all(g), NullOptions(gaussian_draws=5))
    assert 0.01 < null.figures["mean_residual.last"].null_mean < 0.025
    assert analyze(g).verdict_code == "supported"


# ---------------------------------------------------------------- batched figures and p-values


def test_batched_figures_equal_the_analysis_figures():
    rng = np.random.default_rng(2)
    sigma = np.sort(rng.uniform(0.05, 3.0, (7, 4, 6)), axis=-1)[..., ::-1]  # (L, H, K)
    g = Geometry(sigma, None)
    analyses = analyze_all(g, groups=3)
    analyses["index"] = analyze(g, -3)
    batched = batched_figures(np.stack([sigma, sigma[::-1]]), anchor_rules(analyses))  # B = 2
    real = real_figures(analyses)
    assert set(real) == FIGURES | {"mean_residual.index", "mean_residual_fitted.index"}
    for name, value in real.items():
        assert batched[name][0] == pytest.approx(value, rel=1e-12), name
    reversed_geometry = Geometry(sigma[::-1].copy(), None)
    for name, a in analyze_all(reversed_geometry, groups=3).items():
        assert batched[f"mean_residual.{name}"][1] == pytest.approx(a.rescale.mean_residual, rel=1e-12)
        assert batched[f"mean_residual_fitted.{name}"][1] == pytest.approx(a.rescale.mean_residual_fitted, rel=1e-12)


def test_empirical_p_value_counts_draws_at_least_as_alike():
    null = np.array([0.1, 0.2, 0.3, 0.4])
    assert empirical_p_value(0.35, null, higher_is_alike=True) == pytest.approx(2 / 5)  # 0.4 and the real one
    assert empirical_p_value(0.35, null, higher_is_alike=False) == pytest.approx(4 / 5)  # residual: lower is alike
    assert empirical_p_value(0.5, null, higher_is_alike=True) == pytest.approx(1 / 5)  # the smallest possible
    assert empirical_p_value(0.3 * (1 + 1e-13), null, higher_is_alike=True) == pytest.approx(3 / 5)  # rounding ties count


def test_shuffled_spectra_permute_layer_head_labels():
    sigma = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)  # (L, H, K)
    perm = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    out = shuffled_spectra(sigma, perm)  # (2, L, H, K)
    np.testing.assert_array_equal(out[1], sigma)
    np.testing.assert_array_equal(out[0, 0, 0], sigma[1, 2])


# ---------------------------------------------------------------- the nulls


def test_nulls_are_seeded_and_independent_of_chunking(monkeypatch):
    g = gaussian_geometry(3, L=4, H=3, d_model=16, d_head=4)
    analyses = analyze_all(g)
    options = NullOptions(shuffle_draws=30, gaussian_draws=30, seed=7)
    first = null_baselines(g, analyses, options)
    monkeypatch.setattr(nulls_module, "CHUNK_BYTES", 1)  # one draw per chunk
    assert null_baselines(g, analyses, options) == first
    other = null_baselines(g, analyses, NullOptions(shuffle_draws=30, gaussian_draws=30, seed=8))
    assert other["gaussian"].figures != first["gaussian"].figures


def test_null_results_carry_every_figure_with_its_p_value():
    g = gaussian_geometry(4, L=5, H=4, d_model=32, d_head=6)
    for null in null_baselines(g, analyze_all(g), NullOptions(shuffle_draws=40, gaussian_draws=40)).values():
        assert null.available and null.reason is None and null.draws == 40 and null.seed == 0
        assert set(null.figures) == FIGURES
        for f in null.figures.values():
            assert 1 / 41 <= f.p_value <= 1 and f.null_std >= 0


def test_independent_gaussian_heads_are_not_more_alike_than_chance():
    g = gaussian_geometry(11, L=6, H=8, d_model=96, d_head=12)
    nulls = null_baselines(g, analyze_all(g), NullOptions(shuffle_draws=100, gaussian_draws=100))
    for null in nulls.values():
        assert null.figures["mean_residual.last"].p_value > 0.01
        assert null.figures["shape_invariance_mean"].p_value > 0.01
    assert null_layer(nulls, "last").code != "supported"


def test_planted_schedule_is_far_below_both_nulls():
    g = planted_geometry()
    nulls = null_baselines(g, analyze_all(g), NullOptions(shuffle_draws=100, gaussian_draws=100))
    for null in nulls.values():
        residual = null.figures["mean_residual.last"]
        assert residual.real < 1e-12 and residual.null_mean > 0.05
        assert residual.p_value == pytest.approx(1 / 101)
        assert null.figures["shape_invariance_mean"].p_value == pytest.approx(1 / 101)
    assert null_layer(nulls, "last").code == "supported"


def test_gaussian_null_unavailable_without_shapes_but_shuffle_runs():
    g = Geometry(planted_geometry().singular_values, None)  # no metadata
    nulls = null_baselines(g, analyze_all(g), NullOptions(shuffle_draws=20))
    gauss = nulls["gaussian"]
    assert not gauss.available and gauss.draws == 0 and "d_model and d_head" in gauss.reason
    assert set(gauss.figures) == FIGURES and gauss.figures["mean_residual.last"].p_value is None
    assert gauss.figures["mean_residual.last"].real == pytest.approx(0, abs=1e-12)
    assert nulls["shuffle"].available


@pytest.mark.parametrize(
    "meta, words",
    [
        ({"d_model": 8, "d_head": 16}, "exceeds d_model"),
        ({"d_model": 64, "d_head": 8, "num_kv_heads": 2}, "does not divide"),
        ({"d_model": 64, "d_head": 4}, "hold 8 values"),
        ({"d_model": 64.0, "d_head": 8}, "not a positive whole number"),
    ],
)
def test_gaussian_null_says_why_the_metadata_does_not_fit(meta, words):
    g = Geometry(planted_geometry(H=5, K=8).singular_values, None, metadata=meta)
    null = gaussian_null(g, analyze_all(g))
    assert not null.available and words in null.reason


def test_gaussian_null_with_fewer_values_than_d_head_keeps_the_top_ones():
    g = gaussian_geometry(6, L=3, H=4, d_model=32, d_head=8, num_kv_heads=2)
    g = Geometry(g.singular_values[..., :5], None, metadata=g.metadata)  # only the top 5 of 8 stored
    null = gaussian_null(g, analyze_all(g), NullOptions(gaussian_draws=10))
    assert null.available and null.figures["mean_residual.last"].null_mean > 0


def test_gaussian_draws_are_bounded_and_say_so():
    g = gaussian_geometry(7, L=4, H=4, d_model=32, d_head=8)
    per_draw = 4 * 4 * 8**3
    null = gaussian_null(g, analyze_all(g), NullOptions(gaussian_draws=200, gaussian_budget=30 * per_draw))
    assert null.draws == 30 and "reduced from 200 to 30" in null.reason
    null = gaussian_null(g, analyze_all(g), NullOptions(gaussian_draws=200, gaussian_budget=per_draw))
    assert null.draws == 20  # never fewer than min_gaussian_draws


def test_one_layer_or_one_head_leaves_those_figures_undefined():
    g = Geometry(planted_geometry(L=1, H=3).singular_values, None, metadata={"d_model": 64, "d_head": 8})
    nulls = null_baselines(g, analyze_all(g), NullOptions(shuffle_draws=10, gaussian_draws=10))
    for null in nulls.values():
        assert null.figures["shape_invariance_mean"] == nulls_module.FigureNull(None, None, None, None)
        assert null.figures["cross_head_mean_cos"].p_value is not None
    g = Geometry(planted_geometry(L=4, H=1).singular_values, None)
    assert shuffle_null(g, analyze_all(g), NullOptions(shuffle_draws=10)).figures["cross_head_mean_cos"].real is None


def test_draw_counts_must_be_positive():
    with pytest.raises(QkspectraError, match="at least 1"):
        NullOptions(shuffle_draws=0)
