"""The seed's experiments: maths, properties, and the cases where the seed prints nan."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qkspectra.analysis.seed import (
    analyze,
    analyze_all,
    choose_anchor,
    correlate,
    first_best,
    pairwise_cosines,
    scalar_rescale,
    spectral_shape,
)
from qkspectra.cli import main
from qkspectra.geometry import Geometry
from qkspectra.analysis.results import result_document


def geometry(sigma: np.ndarray, entropy: np.ndarray | None = None) -> Geometry:
    return Geometry(singular_values=np.asarray(sigma, dtype=float), entropy=entropy)


def random_geometry(rng, L=5, H=4, K=6) -> Geometry:
    sigma = np.sort(rng.uniform(0.05, 3.0, (L, H, K)), axis=-1)[..., ::-1]  # (L, H, K)
    return geometry(sigma, rng.uniform(0.2, 4.0, (L, H)))


spectra = st.tuples(st.integers(2, 5), st.integers(1, 4), st.integers(1, 6)).flatmap(
    lambda s: arrays(np.float64, s, elements=st.floats(0.01, 100.0, allow_nan=False))
).map(lambda a: np.sort(a, axis=-1)[..., ::-1].copy())


# ---------------------------------------------------------------- maths


def test_pairwise_cosines_match_direct_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 7))  # (B, N, K)
    cos = pairwise_cosines(x)  # (B, N, N)
    for b in range(3):
        for i in range(5):
            for j in range(5):
                want = x[b, i] @ x[b, j] / (np.linalg.norm(x[b, i]) * np.linalg.norm(x[b, j]))
                assert cos[b, i, j] == pytest.approx(want, rel=1e-12)


def test_zero_vectors_have_cosine_zero_and_shape_unchanged():
    x = np.array([[0.0, 0.0], [1.0, 0.5]])
    np.testing.assert_allclose(pairwise_cosines(x), [[0.0, 0.0], [0.0, 1.0]], rtol=1e-15)
    assert spectral_shape(x).tolist() == [[0.0, 0.0], [1.0, 0.5]]


def test_scalar_rescale_guards():
    T, r = scalar_rescale(np.array([[1.0, 0.5], [0.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]))
    assert T.tolist() == [0.0, 0.0, 0.5]  # all-zero anchor: T = 0
    assert r[0] == 1.0  # ... and residual 1
    assert r[1] == 0.0  # all-zero head: residual 0
    assert r[2] == pytest.approx(1 / np.sqrt(2), rel=1e-15)


def test_first_best_breaks_near_ties_towards_the_first():
    assert first_best(np.array([1.0, 3.0, 3.0 * (1 + 1e-13), 2.0])) == 1
    assert first_best(np.array([1.0, 3.0, 3.0 * (1 + 1e-9)])) == 2


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5))
    y = x + rng.normal(size=(6, 5))
    y[0, :3] = y[1, :3] = 0.25  # ties
    c = correlate(x, y, "x", "y")
    assert c.pearson == pytest.approx(stats.pearsonr(x.ravel(), y.ravel())[0], rel=1e-12)
    assert c.spearman == pytest.approx(stats.spearmanr(x.ravel(), y.ravel())[0], rel=1e-12)


def test_constant_input_gives_no_correlation_and_a_reason():
    c = correlate(np.arange(6.0), np.full(6, 2.0), "T", "entropy")
    assert c.pearson is None and c.spearman is None and c.reason == "entropy is the same for every head"


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(sigma=spectra, c=st.floats(1e-3, 1e3))
def test_scaling_every_spectrum_changes_nothing(sigma, c):
    a, b = analyze(geometry(sigma), "best"), analyze(geometry(c * sigma), "best")
    np.testing.assert_allclose(b.rescale.T, a.rescale.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.rescale.residual, a.rescale.residual, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(spectral_shape(c * sigma), spectral_shape(sigma), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b.shape_invariance.per_head_mean_cos, a.shape_invariance.per_head_mean_cos, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    t=arrays(np.float64, st.integers(2, 6), elements=st.floats(0.05, 20.0)),
    base=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 8)), elements=st.floats(0.01, 10.0)),
    anchor=st.sampled_from(["last", "middle", "best", 0, -2]),
)
def test_planted_schedule_is_recovered(t, base, anchor):
    base = np.sort(base, axis=-1)[:, ::-1]  # (H, K)
    sigma = t[:, None, None] * base[None]  # (L, H, K): sigma_L^h = t_L * base^h
    a = analyze(geometry(sigma), anchor)
    expected_T = np.broadcast_to((t / t[a.anchor.layer])[:, None], a.rescale.T.shape)
    np.testing.assert_allclose(a.rescale.T, expected_T, rtol=1e-12)
    assert a.rescale.max_residual < 1e-12
    assert a.verdict_code == "supported"


@settings(max_examples=40, deadline=None)
@given(sigma=spectra, data=st.data())
def test_permuting_heads_permutes_every_per_head_output(sigma, data):
    H = sigma.shape[1]
    perm = np.array(data.draw(st.permutations(range(H))))
    ent = np.arange(sigma.shape[0] * H, dtype=float).reshape(sigma.shape[:2]) % 3 + 0.5
    for anchor in ("last", "middle", "best"):
        a = analyze(geometry(sigma, ent), anchor)
        b = analyze(geometry(sigma[:, perm], ent[:, perm]), anchor)
        assert b.anchor.layer == a.anchor.layer
        np.testing.assert_allclose(b.rescale.T, a.rescale.T[:, perm], rtol=1e-12)
        np.testing.assert_allclose(b.rescale.residual, a.rescale.residual[:, perm], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b.shape_invariance.per_head_mean_cos, a.shape_invariance.per_head_mean_cos[perm], rtol=1e-12)
        if H > 1:
            np.testing.assert_allclose(b.cross_head.per_layer_mean_cos, a.cross_head.per_layer_mean_cos, rtol=1e-9)


# ---------------------------------------------------------------- anchors


def test_anchor_index_counts_from_the_end():
    rng = np.random.default_rng(3)
    g = random_geometry(rng, L=5)
    assert analyze(g, -1).anchor.layer == 4
    assert analyze(g, -5).anchor.layer == 0
    assert analyze(g, 2).anchor.layers.tolist() == [2] * 5


def test_group_anchor_fits_each_layer_to_its_own_group():
    rng = np.random.default_rng(4)
    g = random_geometry(rng, L=9)
    a = analyze(g, "group", groups=3)
    assert a.anchor.groups == ((0, 3), (3, 6), (6, 9))
    for start, stop in a.anchor.groups:
        anchors = set(a.anchor.layers[start:stop].tolist())
        assert len(anchors) == 1 and start <= anchors.pop() < stop
    layer = a.anchor.layers[7]
    T, _ = scalar_rescale(g.singular_values[7], g.singular_values[layer])
    np.testing.assert_allclose(a.rescale.T[7], T, rtol=1e-14)


def test_group_anchor_is_best_within_group():
    rng = np.random.default_rng(5)
    g = random_geometry(rng, L=8)
    a = analyze(g, "group", groups=2)
    for start, stop in a.anchor.groups:
        sub = Geometry(g.singular_values[start:stop], g.entropy[start:stop])
        assert a.anchor.layers[start] == start + analyze(sub, "best").anchor.layer


def test_default_group_count_is_round_sqrt_layers():
    layer_cos = np.ones((2, 30, 30))
    assert len(choose_anchor(layer_cos, "group").groups) == 5


def test_all_strategies_share_the_anchor_independent_figures():
    g = random_geometry(np.random.default_rng(6), L=6)
    results = analyze_all(g)
    assert list(results) == ["last", "middle", "best", "group"]
    for name, a in results.items():
        single = analyze(g, name)
        np.testing.assert_array_equal(a.rescale.T, single.rescale.T)
        np.testing.assert_array_equal(a.shape_invariance.per_head_mean_cos, single.shape_invariance.per_head_mean_cos)


def test_single_spectrum_fit_uses_the_anchor_layers_most_typical_head():
    sigma = np.array([[[4.0, 1.0], [2.0, 1.0], [3.0, 1.9]], [[4.0, 1.0], [2.0, 1.0], [3.0, 1.2]]])  # (2, 3, 2)
    a = analyze(geometry(sigma), "last")
    assert a.cross_head.typical_head.tolist() == [2, 2]  # in the anchor layer, shape (1, 0.4) sits between (1, 0.25) and (1, 0.5)
    _, r = scalar_rescale(sigma, np.broadcast_to(sigma[1, 2], sigma.shape))
    np.testing.assert_allclose(a.cross_head.single_spectrum_residual, r, rtol=1e-14)


# ---------------------------------------------------------------- where the seed prints nan or crashes


def _json_via_cli(tmp_path, capsys, doc, *args):
    path, out = tmp_path / "g.json", tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        main(["analyze", str(path), "--json", str(out), *args])
    captured = capsys.readouterr()
    assert captured.err == ""
    return json.loads(out.read_text()), captured.out


def _doc(sigma, entropy=None):
    doc = {"num_layers": sigma.shape[0], "num_heads": sigma.shape[1], "static": [{"metric_singvals_per_head": s.tolist()} for s in sigma]}
    if entropy is not None:
        doc["dynamic"] = [{"mean_attention_entropy_per_head": e.tolist()} for e in entropy]
    return doc


def test_one_layer_reports_na(tmp_path, capsys):
    sigma = np.array([[[2.0, 1.0], [3.0, 0.5]]])
    doc, text = _json_via_cli(tmp_path, capsys, _doc(sigma, np.array([[1.0, 2.0]])), "--anchor", "best")
    assert doc["shape_invariance"]["per_head_mean_cos"] is None and doc["shape_invariance"]["mean"] is None
    assert doc["shape_invariance"]["reason"] == "one layer: no pair of layers to compare"
    assert doc["entropy"]["corr_T_entropy"] is None and "T is the same for every head" in doc["entropy"]["reason"]
    assert "n/a (one layer: no pair of layers to compare)" in text
    assert "nan" not in text


def test_one_head_reports_na(tmp_path, capsys):
    sigma = np.array([[[2.0, 1.0]], [[3.0, 1.0]], [[1.0, 0.2]]])
    doc, text = _json_via_cli(tmp_path, capsys, _doc(sigma, np.array([[1.0], [2.0], [1.5]])))
    assert doc["cross_head"]["per_layer_mean_cos"] is None
    assert "no pair of heads" in doc["cross_head"]["reason"]
    assert doc["shape_invariance"]["per_head_mean_cos"] is not None
    assert "nan" not in text


def test_constant_entropy_and_missing_dynamic(tmp_path, capsys):
    sigma = np.sort(np.random.default_rng(7).uniform(0.1, 1, (3, 2, 4)), axis=-1)[..., ::-1]
    doc, text = _json_via_cli(tmp_path, capsys, _doc(sigma, np.full((3, 2), 1.5)))
    assert doc["entropy"]["corr_T_entropy"] is None and doc["entropy"]["spearman_opnorm_entropy"] is None
    assert "entropy is the same for every head" in text
    doc, text = _json_via_cli(tmp_path, capsys, _doc(sigma))
    assert doc["entropy"]["corr_T_entropy"] is None
    assert doc["entropy"]["reason"] == "the geometry has no dynamic (entropy) section"
    assert doc["rescale"]["mean_residual"] is not None and "=== Summary ===" in text


def test_json_carries_the_documented_keys(tmp_path, capsys):
    g = random_geometry(np.random.default_rng(8), L=4, H=3)
    doc = _doc(g.singular_values, g.entropy)
    out, _ = _json_via_cli(tmp_path, capsys, doc, "--anchor", "group", "--quiet")
    assert isinstance(out["anchor"]["layer"], int) and len(out["anchor"]["layers"]) == 4
    assert len(out["shape_invariance"]["per_head_mean_cos"]) == 3
    assert out["shape_invariance"]["label"] in ("very stable", "approximately stable", "not stable")
    assert np.shape(out["rescale"]["T"]) == (4, 3) and np.shape(out["rescale"]["residual"]) == (4, 3)
    for key in ("mean_residual", "max_residual", "frac_below_0_10", "frac_below_0_20"):
        assert isinstance(out["rescale"][key], float)
    assert set(out["entropy"]) >= {"corr_T_entropy", "corr_opnorm_entropy", "spearman_T_entropy", "spearman_opnorm_entropy"}
    assert len(out["cross_head"]["per_layer_mean_cos"]) == 4
    assert out["verdict"]["code"] in ("supported", "partial", "rejected") and out["verdict"]["text"]


def test_quiet_prints_nothing_and_all_gives_the_comparison(tmp_path, capsys):
    g = random_geometry(np.random.default_rng(9), L=4, H=3)
    out, text = _json_via_cli(tmp_path, capsys, _doc(g.singular_values, g.entropy), "--anchor", "all", "--quiet")
    assert text == ""
    assert [row["strategy"] for row in out["comparison"]] == ["last", "middle", "best", "group"]
    assert set(out["strategies"]) == {"last", "middle", "best", "group"}
    assert out["anchor"]["strategy"] == "last"


def test_result_document_is_deterministic():
    g = random_geometry(np.random.default_rng(10))
    a = json.dumps(result_document(analyze_all(g), "last"))
    b = json.dumps(result_document(analyze_all(g), "last"))
    assert a == b
