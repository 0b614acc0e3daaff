"""The committed golden data is well formed: inputs in the geometry schema, expected files with consistent shapes.

The numbers themselves come from scripts/make_goldens.py; parity with them is tested elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
INPUT_NAMES = sorted(p.name.removesuffix(".json") for p in GOLDEN_DIR.glob("*.json")
                     if not p.name.endswith(".expected.json"))
ANCHOR_MODES = ("last", "middle", "best")
RUN_KEYS = {"stdout", "error", "warnings", "anchor_layer", "per_head_mean_cos", "T", "residual",
            "corr_T_entropy", "corr_opnorm_entropy", "cross_head_per_layer_mean_cos", "verdict", "best_scores"}
VERDICT_PREFIXES = ("HYPOTHESIS SUPPORTED", "PARTIALLY SUPPORTED", "HYPOTHESIS REJECTED")


def load(name: str) -> tuple[dict, dict]:
    return (json.loads((GOLDEN_DIR / f"{name}.json").read_text()),
            json.loads((GOLDEN_DIR / f"{name}.expected.json").read_text(encoding="utf-8")))


def float_or_null_array(values, shape: tuple[int, ...]) -> np.ndarray:
    """Check every entry is a float or null, and the nesting has ``shape``; return it with NaN for null."""
    array = np.array(values, dtype=object)
    assert array.shape == shape
    assert all(v is None or isinstance(v, float) for v in array.flat)
    return np.array([math.nan if v is None else v for v in array.flat], dtype=np.float64).reshape(shape)


def test_golden_set_is_complete_and_small():
    assert len(INPUT_NAMES) >= 10
    expected_names = sorted(p.name.removesuffix(".expected.json") for p in GOLDEN_DIR.glob("*.expected.json"))
    assert expected_names == INPUT_NAMES
    sizes = [p.stat().st_size for p in GOLDEN_DIR.iterdir()]
    assert max(sizes) < 200_000 and sum(sizes) < 3_000_000


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_input_is_a_geometry(name):
    geometry, _ = load(name)
    num_layers, num_heads = geometry["num_layers"], geometry["num_heads"]
    assert len(geometry["static"]) == num_layers
    for row in geometry["static"]:
        spectra = row["metric_singvals_per_head"]
        assert len(spectra) == num_heads
        for s in spectra:
            assert s and all(isinstance(v, float) and v >= 0.0 for v in s)
            assert all(a >= b for a, b in zip(s, s[1:]))
    if "dynamic" in geometry:
        entropy = np.array([row["mean_attention_entropy_per_head"] for row in geometry["dynamic"]])  # (L, H)
        assert entropy.shape == (num_layers, num_heads) and (entropy > 0).all()


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_expected_file_is_consistent(name):
    geometry, expected = load(name)
    num_layers, num_heads = geometry["num_layers"], geometry["num_heads"]
    assert expected["input"] == f"{name}.json"
    assert re.fullmatch(r"[0-9a-f]{64}", expected["seed_sha256"])
    assert set(expected["runs"]) == set(ANCHOR_MODES)
    for mode, run in expected["runs"].items():
        assert set(run) == RUN_KEYS, mode
        assert isinstance(run["stdout"], str) and run["stdout"].startswith("Loaded sigma: shape ")
        assert all(isinstance(w, str) for w in run["warnings"])
        anchor = run["anchor_layer"]
        assert anchor == {"last": num_layers - 1, "middle": num_layers // 2}.get(mode, anchor)
        assert 0 <= anchor < num_layers
        float_or_null_array(run["per_head_mean_cos"], (num_heads,))
        T = float_or_null_array(run["T"], (num_layers, num_heads))
        residual = float_or_null_array(run["residual"], (num_layers, num_heads))
        check_experiment2_table(run["stdout"], T, residual)

        if mode == "best":
            scores = float_or_null_array(run["best_scores"], (num_layers,))
            assert anchor == first_strict_maximum(scores)
        else:
            assert run["best_scores"] is None

        if run["error"] is None:
            assert run["verdict"].startswith(VERDICT_PREFIXES)
            assert f"anchor layer: {anchor}\n" in run["stdout"]
            for key in ("corr_T_entropy", "corr_opnorm_entropy"):
                assert run[key] is None or isinstance(run[key], float)
            cross_head = float_or_null_array(run["cross_head_per_layer_mean_cos"], (num_layers,))
            rows = [f"  {layer:>3}  {value:>14.4f}" for layer, value in enumerate(cross_head)]
            assert "\n".join(rows) in run["stdout"]
        else:
            assert re.fullmatch(r"\w+: .*", run["error"])
            assert run["verdict"] is None


def check_experiment2_table(stdout: str, T: np.ndarray, residual: np.ndarray) -> None:
    """The seed's printed per-layer rows agree with the captured T (L, H) and residual (L, H)."""
    rows = [f"  {layer:>3}  {r.mean():>10.4f}  {r.max():>10.4f}  {t.mean():>8.3f}"
            for layer, (r, t) in enumerate(zip(residual, T))]
    assert "\n".join(rows) in stdout


def first_strict_maximum(scores: np.ndarray) -> int:
    """Index the seed's loop picks: the first score strictly above every earlier one, starting from -1."""
    best_score, best_layer = -1.0, len(scores) - 1
    for layer, score in enumerate(scores):
        if score > best_score:
            best_score, best_layer = score, layer
    return best_layer


def test_degenerate_inputs_record_the_seeds_failures():
    _, one_layer = load("one_layer")
    assert any("Mean of empty slice" in w for w in one_layer["runs"]["last"]["warnings"])
    assert one_layer["runs"]["last"]["per_head_mean_cos"] == [None] * 4
    _, constant_entropy = load("constant_entropy")
    assert constant_entropy["runs"]["last"]["corr_T_entropy"] is None
    _, no_dynamic = load("no_dynamic")
    assert no_dynamic["runs"]["last"]["error"] == "KeyError: 'dynamic'"
    assert no_dynamic["runs"]["last"]["cross_head_per_layer_mean_cos"] is None
