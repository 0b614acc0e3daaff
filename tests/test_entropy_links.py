"""The geometry-entropy links (descriptors) and entropy against context length (context)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats

from qkspectra.analysis.bootstrap import resample_indices
from qkspectra.analysis.document import AnalysisOptions, build_analysis_document
from qkspectra.analysis.entropy_links import (
    DESCRIPTORS,
    NO_DYNAMIC,
    SAME_CONTEXT,
    TARGETS,
    LinkOptions,
    context_fit,
    context_fits,
    entropy_targets,
    link_table,
    permutation_p_values,
    permutations_of_pairs,
    queries_per_bucket,
    resampled_correlations,
    spectrum_descriptors,
    within_layer,
)
from qkspectra.geometry import Geometry, load_geometry, parse_geometry

GOLDEN = Path(__file__).parent / "data" / "golden"
OUTPUTS = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
FAST = LinkOptions(bootstrap_draws=400, permutations=400)


def table_of(x: np.ndarray, y: np.ndarray, options: LinkOptions = FAST, seed: int = 0):
    """The one link of descriptor x (L, H) against target y (L, H)."""
    return link_table({"x": x}, {"y": y}, options, seed)["x"]["y"]


def z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


# ----------------------------------------------------------------------------
# The link table
# ----------------------------------------------------------------------------


def test_pearson_and_spearman_equal_scipys_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (5, 7)).astype(float)  # many ties
    y = x + rng.normal(size=(5, 7))
    link = table_of(x, y)
    assert link.pearson == pytest.approx(scipy.stats.pearsonr(x.ravel(), y.ravel())[0], abs=1e-12)
    assert link.spearman == pytest.approx(scipy.stats.spearmanr(x.ravel(), y.ravel())[0], abs=1e-12)
    dx, dy = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    assert link.within_layer_spearman == pytest.approx(scipy.stats.spearmanr(dx.ravel(), dy.ravel())[0], abs=1e-12)


def test_within_layer_spearman_removes_a_depth_confound():
    """Both variables rise with depth; within each layer their head patterns are unrelated."""
    L, H = 8, 4
    layer = 10.0 * np.arange(L)[:, None]
    x = layer + np.array([0.0, 1.0, 2.0, 3.0])  # (L, H)
    y = layer + np.array([1.0, 3.0, 0.0, 2.0])
    link = table_of(x, y)
    assert link.spearman > 0.95 and link.p_permutation < 0.01
    assert link.within_layer_spearman == pytest.approx(0.0, abs=1e-12)
    assert link.within_layer_p_permutation > 0.5


def test_within_layer_permutations_keep_heads_in_their_layer():
    perms = permutations_of_pairs(np.random.default_rng(0), 50, 6, 5, within=True)  # (50, 30)
    assert (perms // 5 == np.arange(30) // 5).all()
    assert (np.sort(perms, axis=1) == np.arange(30)).all() and (perms != np.arange(30)).any()
    everywhere = permutations_of_pairs(np.random.default_rng(0), 50, 6, 5, within=False)
    assert (np.sort(everywhere, axis=1) == np.arange(30)).all() and (everywhere // 5 != np.arange(30) // 5).any()


def test_bootstrap_is_the_correlation_of_each_resample():
    rng = np.random.default_rng(3)
    cols = np.stack([z(rng.normal(size=40)), z(rng.normal(size=40))], axis=1)  # (N, 2)
    cols[:, 1] = z(cols[:, 1] + cols[:, 0])
    got = resampled_correlations(cols, [(0, 1)], 60, np.random.default_rng(5))[:, 0]  # (60,)
    idx = resample_indices(np.random.default_rng(5), 40, 60)
    np.testing.assert_allclose(got, [np.corrcoef(cols[i, 0], cols[i, 1])[0, 1] for i in idx], atol=1e-12)


def test_bootstrap_intervals_are_seeded_bracket_the_estimate_and_cover():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 9))
    y = 0.6 * x + 0.8 * rng.normal(size=(6, 9))
    a, b, c = table_of(x, y, seed=0), table_of(x, y, seed=0), table_of(x, y, seed=1)
    assert a == b and a.pearson_ci95 != c.pearson_ci95 and a.pearson == c.pearson
    assert a.pearson_ci95[0] < a.pearson < a.pearson_ci95[1] and a.spearman_ci95[0] < a.spearman < a.spearman_ci95[1]
    covered = 0
    for seed in range(60):  # true Pearson correlation 0.6
        r = np.random.default_rng(100 + seed)
        x = r.normal(size=(10, 15))
        link = table_of(x, 0.6 * x + 0.8 * r.normal(size=(10, 15)), LinkOptions(500, 1), seed)
        covered += link.pearson_ci95[0] <= 0.6 <= link.pearson_ci95[1]
    assert covered >= 51  # nominal 95%: 57 of 60 expected


def test_permutation_p_value_is_uniform_on_independent_data_and_small_on_dependent():
    rng = np.random.default_rng(2)
    p = []
    for _ in range(300):
        cols = np.stack([z(rng.normal(size=30)), z(rng.normal(size=30))], axis=1)
        p.append(permutation_p_values(cols, [(0, 1)], 99, rng, (5, 6), within=False)[1][0])
    p = np.array(p)
    assert abs(p.mean() - 0.5) < 0.06 and 0.02 <= (p <= 0.05).mean() <= 0.09 and 0.35 <= (p <= 0.5).mean() <= 0.65
    x = rng.normal(size=(5, 6))
    link = table_of(x, x + 0.3 * rng.normal(size=(5, 6)))
    assert link.p_permutation == pytest.approx(1 / 401) and link.within_layer_p_permutation == pytest.approx(1 / 401)


def test_n_a_reasons():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 3))
    constant = table_of(x, np.full((4, 3), 2.0))
    assert constant.pearson is None and constant.pearson_ci95 is None and constant.reason == "y is the same for every head"
    one_head = table_of(x[:, :1], rng.normal(size=(4, 1)))
    assert one_head.spearman is not None and one_head.within_layer_spearman is None
    assert one_head.reason == "one head per layer: nothing varies within a layer"
    by_layer = table_of(np.repeat(np.arange(4.0)[:, None] * 0.1, 3, axis=1), x)  # rounding: 0.3 * 3 / 3 != 0.3
    assert by_layer.spearman is not None and by_layer.within_layer_spearman is None
    assert by_layer.reason == "x does not vary within any layer"
    absent = link_table({"x": x}, {"y": NO_DYNAMIC}, FAST)["x"]["y"]
    assert absent.pearson is None and absent.p_permutation is None and absent.reason == NO_DYNAMIC


def test_targets_from_rows_or_attributes_with_reasons():
    rng = np.random.default_rng(5)
    sigma, entropy = np.sort(rng.uniform(size=(3, 2, 4)))[..., ::-1], rng.uniform(1, 2, (3, 2))
    assert entropy_targets(Geometry(sigma, None)) == {name: NO_DYNAMIC for name in TARGETS}
    rows = [{"mean_attention_entropy_per_head": e.tolist(), "mean_normalized_entropy_per_head": (e / 3).tolist()}
            for e in entropy]
    found = entropy_targets(Geometry(sigma, entropy, document={"dynamic": rows}))
    np.testing.assert_array_equal(found["normalised_entropy"], entropy / 3)
    assert found["entropy_without_first"] == ("the geometry's dynamic rows have no "
                                              "mean_attention_entropy_without_first_per_head")
    rows[1]["mean_normalized_entropy_per_head"][0] = float("nan")
    assert entropy_targets(Geometry(sigma, entropy, document={"dynamic": rows}))["normalised_entropy"] == (
        "normalised_entropy is not finite for every head")
    # the attribute the corpus pass adds to Geometry wins over the rows
    g = SimpleNamespace(entropy=entropy, entropy_without_first=entropy - 0.5, num_layers=3, num_heads=2, document=None)
    np.testing.assert_array_equal(entropy_targets(g)["entropy_without_first"], entropy - 0.5)


def test_spectrum_descriptors():
    sigma = np.array([[[3.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]])  # (1, 3, 3), padded
    d = spectrum_descriptors(sigma)
    np.testing.assert_allclose(d["op_norm"], [[3, 2, 0]])
    np.testing.assert_allclose(d["frobenius_norm"], [[np.sqrt(10), np.sqrt(12), 0]])
    np.testing.assert_allclose(d["stable_rank"], [[10 / 9, 3, 0]])
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(d["effective_rank"], [[np.exp(-(p * np.log(p)).sum()), 3, 0]])


# ----------------------------------------------------------------------------
# Entropy against context length
# ----------------------------------------------------------------------------


LOG_KEYS = np.log([1.0, 2.5, 5.5, 11.5, 23.5, 47.5])  # (b,) about the mean log keys of causal buckets


def test_uniform_attention_has_slope_one_and_fixed_k_slope_zero():
    L, H = 2, 3
    log_keys = np.broadcast_to(LOG_KEYS, (L, 6))
    uniform = np.broadcast_to(log_keys[:, None, :], (L, H, 6))  # entropy = log n exactly
    fit = context_fit(uniform, log_keys, np.array([1, 2, 4, 8, 16, 32]))
    np.testing.assert_allclose(fit.slope, 1.0, atol=1e-12)
    np.testing.assert_allclose(fit.r2, 1.0, atol=1e-12)
    assert (fit.buckets_used == 6).all()
    k = 4  # each query spreads its attention evenly over 4 keys: buckets seeing at least 4 keys
    fixed = np.full((L, H, 4), np.log(k))
    fit = context_fit(fixed, log_keys[:, 2:], np.array([4, 8, 16, 32]))
    assert (fit.slope == 0.0).all() and np.isnan(fit.r2).all()  # nothing varies: nothing to explain


def test_slope_and_r2_are_weighted_least_squares_ignoring_empty_and_nan_buckets():
    rng = np.random.default_rng(6)
    y = 0.5 + 0.3 * LOG_KEYS + 0.2 * rng.normal(size=6)
    w = rng.uniform(1, 10, 6)
    fit = context_fit(y[None, None, :], LOG_KEYS[None], w)
    slope, intercept = np.polyfit(LOG_KEYS, y, 1, w=np.sqrt(w))
    residual = y - (intercept + slope * LOG_KEYS)
    mean = (w * y).sum() / w.sum()
    r2 = 1 - (w * residual**2).sum() / (w * (y - mean) ** 2).sum()
    assert fit.slope[0, 0] == pytest.approx(slope, abs=1e-12) and fit.r2[0, 0] == pytest.approx(r2, abs=1e-12)
    padded = np.concatenate([y, [99.0, np.nan, 7.0]])  # an empty bucket, a nan entropy, a nan log keys
    keys = np.concatenate([LOG_KEYS, [5.0, 6.0, np.nan]])
    again = context_fit(padded[None, None, :], keys[None], np.concatenate([w, [0, 3, 3]]))
    assert again.slope[0, 0] == pytest.approx(slope, abs=1e-12) and again.buckets_used[0, 0] == 6
    two = context_fit(y[None, None, :2], LOG_KEYS[None, :2], w[:2])
    one = context_fit(y[None, None, :2], LOG_KEYS[None, :2], np.array([0.0, 1.0]))
    assert two.r2[0, 0] == pytest.approx(1.0) and np.isnan(one.slope).all() and np.isnan(one.r2).all()


def test_queries_per_bucket():
    assert queries_per_bucket({"queries_by_position": [1, 2, 3]}, 3)[0].tolist() == [1, 2, 3]
    weights, how = queries_per_bucket({}, 3)
    assert weights.tolist() == [1, 1, 1] and how.startswith("equal")
    weights, how = queries_per_bucket({"queries_by_position": [1, 2]}, 3)
    assert weights is None and "3 counts" in how


def position_geometry(without_first: bool = False) -> Geometry:
    """A geometry whose heads attend uniformly (entropy = log visible keys), with the position keys extract writes."""
    rng = np.random.default_rng(7)
    L, H = 3, 2
    doc = {"num_layers": L, "num_heads": H, "metadata": {"queries_by_position": [4, 8, 16, 32, 64, 0]},
           "static": [{"metric_singvals_per_head": np.sort(rng.uniform(1, 2, (H, 4)))[:, ::-1].tolist()} for _ in range(L)],
           "dynamic": []}
    for layer in range(L):
        row = {"mean_attention_entropy_per_head": rng.uniform(1, 3, H).tolist(),
               "mean_normalized_entropy_per_head": rng.uniform(0.2, 0.9, H).tolist(),
               "entropy_by_position_per_head": [LOG_KEYS.tolist()] * H,
               "log_visible_keys_by_position": LOG_KEYS.tolist()}
        if without_first:
            row["mean_attention_entropy_without_first_per_head"] = rng.uniform(1, 3, H).tolist()
            row["entropy_without_first_by_position_per_head"] = [[0.0, *np.log([1.5, 4.5, 10.5, 22.5, 46.5]).tolist()]] * H
        doc["dynamic"].append(row)
    return parse_geometry(doc)


def test_context_of_a_geometry():
    fits = context_fits(position_geometry(without_first=True))
    assert fits["weighting"].startswith("queries_by_position")
    np.testing.assert_allclose(fits["entropy"].slope, 1.0, atol=1e-12)
    assert (fits["entropy"].buckets_used == 5).all()  # the last bucket holds no query
    wf = fits["without_first"]
    assert (wf.buckets_used == 4).all()  # nor does the first, once its one key is left out
    assert ((0.9 < wf.slope) & (wf.slope < 1.2)).all() and (wf.r2 > 0.99).all()
    assert context_fits(position_geometry())["without_first"] == (
        "the geometry's dynamic rows have no entropy_without_first_by_position_per_head")
    g = position_geometry()
    encoder = Geometry(g.singular_values, g.entropy, metadata=g.metadata, entropy_by_position=g.entropy_by_position,
                       log_keys_by_position=np.full_like(g.log_keys_by_position, np.log(512)) * (1 + 1e-15))
    assert context_fits(encoder)["entropy"] == SAME_CONTEXT and context_fits(encoder)["without_first"] == SAME_CONTEXT
    assert context_fits(Geometry(g.singular_values, None))["entropy"] == NO_DYNAMIC
    assert "entropy_by_position" in context_fits(Geometry(g.singular_values, g.entropy))["entropy"]


# ----------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------


def test_golden_document_keys_and_unchanged_figures():
    geometry = load_geometry(GOLDEN / "minilm_like.json")
    options = AnalysisOptions(nulls=None, bootstrap=None)
    doc = build_analysis_document(geometry, options)
    before = build_analysis_document(geometry, AnalysisOptions(nulls=None, bootstrap=None, entropy_links=None))
    assert {k: v for k, v in doc.items() if k not in ("descriptors", "context")} == before
    descriptors = doc["descriptors"]
    assert set(descriptors) == {"settings", *DESCRIPTORS} and descriptors["settings"]["pairs"] == 72
    for d in DESCRIPTORS:
        assert set(descriptors[d]) == set(TARGETS)
    cell = descriptors["T_last"]["entropy"]
    assert cell["pearson"] == doc["entropy"]["corr_T_entropy"] and cell["spearman"] == doc["entropy"]["spearman_T_entropy"]
    assert descriptors["op_norm"]["entropy"]["pearson"] == doc["entropy"]["corr_opnorm_entropy"]
    assert cell["pearson_ci95"][0] < cell["pearson"] < cell["pearson_ci95"][1] and cell["reason"] is None
    assert descriptors["op_norm"]["normalised_entropy"]["pearson"] is None  # the golden file has no such key
    assert doc["context"]["entropy_slope_per_head"] is None and "entropy_by_position" in doc["context"]["reason"]
    assert build_analysis_document(geometry, options) == doc  # seeded


def test_document_of_a_geometry_with_positions():
    doc = build_analysis_document(position_geometry(without_first=True), AnalysisOptions(nulls=None, bootstrap=None))
    context = doc["context"]
    assert context["median_slope"] == pytest.approx(1.0) and context["per_layer"]["mean_r2"] == pytest.approx([1.0] * 3)
    assert context["without_first"]["reason"] is None and len(context["without_first"]["r2_per_head"]) == 3
    assert doc["descriptors"]["op_norm"]["normalised_entropy"]["pearson"] is not None
    assert doc["descriptors"]["op_norm"]["entropy_without_first"]["pearson"] is not None


def test_every_new_key_is_documented():
    section = OUTPUTS[OUTPUTS.index("## The analysis JSON"):]
    documented = {name for quoted in re.findall(r"`([^`]+)`", section) for name in re.findall(r"\w+", quoted)}
    doc = build_analysis_document(position_geometry(True), AnalysisOptions(nulls=None, bootstrap=None))
    names = set(doc["descriptors"]["op_norm"]["entropy"]) | set(doc["descriptors"]["settings"]) | set(DESCRIPTORS)
    names |= set(TARGETS) | set(doc["context"]) | set(doc["context"]["per_layer"]) | set(doc["context"]["without_first"])
    assert names - {"reason"} <= documented, sorted(names - documented)


def test_within_layer_snaps_rounding_to_zero():
    x = np.repeat(np.array([0.1, 0.7, 1.3])[:, None], 3, axis=1) * 3 / 3
    assert not within_layer(x).any()
