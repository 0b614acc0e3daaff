"""Generate the golden test data: synthetic geometries and the seed analysis's numbers on them.

    python scripts/make_goldens.py --seed PATH/TO/seed_reference.py [--out tests/data/golden]

For every input geometry built below (deterministic, seeded numpy) this writes
``NAME.json`` (the geometry, in the seed's schema) and ``NAME.expected.json``
(what the seed computed on it with ``--anchor last``, ``middle`` and ``best``).

The seed is run unchanged: it is imported from the given path and its
``main()`` is called with ``sys.argv`` set as on its command line. Its stdout,
warnings and exception are captured, and its numbers are read at full float64
precision from ``main()``'s frame with ``sys.settrace``:

* on ``main``'s 'return' event (also fired when ``main`` raises): the final
  locals ``anchor_L``, ``per_head_cos`` (H), ``T_map`` (L, H), ``resid_map``
  (L, H), ``c``, ``c_op``, ``verdict``;
* on the line that prints an experiment-3 row: ``float(np.mean(cs))``, the
  same numpy call the seed formats, so the value is bit-identical;
* on the line ``if score > best_score:`` (best mode): ``score`` for ``Lc``.

NaN and infinity are written as JSON null; a value the seed never reached
(because it raised first) is null too. Floats are written with ``repr`` so
they round-trip exactly. The project's parity tests read only these files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from qkspectra.atomic import atomic_write_text

ANCHOR_MODES = ("last", "middle", "best")
EXPERIMENT3_ROW_SOURCE = "{np.mean(cs):>14.4f}"
BEST_SCORE_COMPARE_SOURCE = "if score > best_score:"


# ----------------------------------------------------------------------------
# Synthetic geometries
# ----------------------------------------------------------------------------


def sorted_spectrum(values: np.ndarray) -> np.ndarray:
    """Clip at zero and sort descending along the last axis (K)."""
    return -np.sort(-np.clip(values, 0.0, None), axis=-1)


def decaying_spectra(rng: np.random.Generator, num_layers: int, num_heads: int, rank: int,
                     layer_temperature: np.ndarray, noise: float,
                     decay_range: tuple[float, float] = (0.05, 0.25)) -> np.ndarray:
    """Spectra sigma (L, H, K): per-head exponential decay, per-layer temperature, lognormal noise."""
    decay_h = rng.uniform(*decay_range, size=num_heads)  # (H,)
    k = np.arange(rank)  # (K,)
    base_hk = np.exp(-decay_h[:, None] * k[None, :])  # (H, K)
    jitter = np.exp(noise * rng.standard_normal((num_layers, num_heads, rank)))  # (L, H, K)
    return sorted_spectrum(layer_temperature[:, None, None] * base_hk[None] * jitter)


def entropies_from_temperature(rng: np.random.Generator, temperature_lh: np.ndarray,
                               noise: float) -> np.ndarray:
    """Entropies (L, H), positive, falling with temperature (sharper attention)."""
    return 3.0 * np.exp(-0.4 * (temperature_lh - 1.0)) * np.exp(noise * rng.standard_normal(temperature_lh.shape))


def geometry(spectra, entropies) -> dict:
    """Seed-schema dict; ``spectra`` is (L, H, K) or nested lists of ragged heads, ``entropies`` (L, H) or None."""
    spectra = [[np.asarray(s, dtype=np.float64).tolist() for s in row] for row in spectra]
    out = {"num_layers": len(spectra), "num_heads": len(spectra[0]),
           "static": [{"metric_singvals_per_head": row} for row in spectra]}
    if entropies is not None:
        out["dynamic"] = [{"mean_attention_entropy_per_head": np.asarray(row, dtype=np.float64).tolist()}
                          for row in entropies]
    return out


def random_small():
    rng = np.random.default_rng(101)
    num_layers, num_heads, rank = 6, 12, 32
    t_l = np.linspace(0.6, 1.8, num_layers)
    sigma = decaying_spectra(rng, num_layers, num_heads, rank, t_l, noise=0.25)
    ent = entropies_from_temperature(rng, t_l[:, None] * np.ones(num_heads), noise=0.2)
    return geometry(sigma, ent), "L=6 H=12 K=32 random decaying spectra, per-layer temperature, lognormal noise"


def planted_schedule():
    rng = np.random.default_rng(102)
    num_layers, num_heads, rank = 8, 6, 24
    t_l = 0.5 + 0.25 * np.arange(num_layers)  # (L,)
    base_hk = sorted_spectrum(rng.gamma(2.0, 1.0, size=(num_heads, rank)) * np.exp(-0.15 * np.arange(rank)))
    sigma = t_l[:, None, None] * base_hk[None]  # (L, H, K), exact schedule
    ent = 3.0 / t_l[:, None] * np.exp(0.05 * rng.standard_normal((num_layers, num_heads)))
    return geometry(sigma, ent), "L=8 H=6 K=24 planted schedule sigma_L^h = t_L * base^h exactly"


def ragged():
    rng = np.random.default_rng(103)
    num_layers, num_heads = 5, 6
    t_l = np.linspace(0.8, 1.6, num_layers)
    spectra = []
    for layer in range(num_layers):
        row = []
        for _ in range(num_heads):
            rank = int(rng.integers(3, 17))
            s = t_l[layer] * np.exp(-0.2 * np.arange(rank)) * np.exp(0.2 * rng.standard_normal(rank))
            row.append(sorted_spectrum(s))
        spectra.append(row)
    ent = entropies_from_temperature(rng, t_l[:, None] * np.ones(num_heads), noise=0.2)
    return geometry(spectra, ent), "L=5 H=6, each head's spectrum length drawn from 3..16 (zero padding matters)"


def zero_heads():
    rng = np.random.default_rng(104)
    num_layers, num_heads, rank = 5, 5, 10
    t_l = np.linspace(0.7, 1.5, num_layers)
    sigma = decaying_spectra(rng, num_layers, num_heads, rank, t_l, noise=0.2)
    sigma[:, 4] = 0.0  # head 4 is zero in every layer
    for layer, head in [(4, 1), (2, 3), (0, 0), (1, 2), (3, 2)]:  # (4, 1): last anchor; (2, 3): middle
        sigma[layer, head] = 0.0
    ent = entropies_from_temperature(rng, t_l[:, None] * np.ones(num_heads), noise=0.2)
    return geometry(sigma, ent), ("L=5 H=5 K=10 with all-zero heads: head 4 in every layer, and (L,h) = "
                                  "(4,1) [last anchor], (2,3) [middle anchor], (0,0), (1,2), (3,2)")


def rank_one():
    rng = np.random.default_rng(105)
    num_layers, num_heads, rank = 5, 6, 12
    t_l = np.linspace(0.7, 1.5, num_layers)
    sigma = decaying_spectra(rng, num_layers, num_heads, rank, t_l, noise=0.2)
    sigma[:, [0, 2], 1:] = 0.0  # heads 0 and 2 rank one in every layer
    sigma[[1, 4], 4, 1:] = 0.0  # head 4 rank one in layers 1 and 4 only
    ent = entropies_from_temperature(rng, t_l[:, None] * np.ones(num_heads), noise=0.2)
    return geometry(sigma, ent), "L=5 H=6 K=12, heads 0 and 2 rank one everywhere, head 4 rank one in layers 1 and 4"


def rejected():
    rng = np.random.default_rng(106)
    num_layers, num_heads, rank = 6, 4, 16
    decay_l = np.array([0.0, 3.0, 0.02, 1.5, 0.6, 0.01])  # flat, steep, flat, ... alternating shapes
    k = np.arange(rank)
    sigma = np.exp(-decay_l[:, None, None] * k[None, None, :]) * np.exp(0.3 * rng.standard_normal((num_layers, num_heads, rank)))
    sigma = sorted_spectrum(sigma)
    ent = rng.uniform(0.5, 4.0, size=(num_layers, num_heads))
    return geometry(sigma, ent), "L=6 H=4 K=16, spectral shapes alternate between flat and steep across layers"


def two_layers():
    rng = np.random.default_rng(107)
    t_l = np.array([0.8, 1.3])
    sigma = decaying_spectra(rng, 2, 3, 8, t_l, noise=0.2)
    ent = entropies_from_temperature(rng, t_l[:, None] * np.ones(3), noise=0.2)
    return geometry(sigma, ent), "L=2 H=3 K=8 random"


def wide():
    rng = np.random.default_rng(108)
    t_l = np.array([0.7, 1.1, 1.6])
    sigma = decaying_spectra(rng, 3, 40, 8, t_l, noise=0.2)
    ent = entropies_from_temperature(rng, t_l[:, None] * np.ones(40), noise=0.2)
    return geometry(sigma, ent), "L=3 H=40 K=8 random"


def deep():
    rng = np.random.default_rng(109)
    num_layers, num_heads, rank = 40, 2, 16
    t_l = 0.5 + 1.5 * (np.arange(num_layers) / (num_layers - 1)) ** 2
    sigma = decaying_spectra(rng, num_layers, num_heads, rank, t_l, noise=0.1)
    ent = entropies_from_temperature(rng, t_l[:, None] * np.ones(num_heads), noise=0.1)
    return geometry(sigma, ent), "L=40 H=2 K=16 quadratic temperature schedule with lognormal noise"


def ties_best():
    rng = np.random.default_rng(110)
    num_layers, num_heads, rank = 6, 3, 10
    base_hk = sorted_spectrum(rng.gamma(2.0, 1.0, size=(num_heads, rank)))
    scale_l = np.array([1.7, 0.3, 1.0, 2.9, 1.1, 0.55])
    sigma = scale_l[:, None, None] * base_hk[None]  # (L, H, K): every layer a scaled copy of one
    ent = rng.uniform(1.0, 3.0, size=(num_layers, num_heads))
    return geometry(sigma, ent), ("L=6 H=3 K=10, every layer an exact copy of one spectrum set scaled by "
                                  "1.7, 0.3, 1.0, 2.9, 1.1, 0.55: the best-anchor scores tie bit for bit")


def ties_rounding():
    rng = np.random.default_rng(1)
    num_layers, num_heads, rank = 6, 3, 10
    base_hk = sorted_spectrum(rng.gamma(2.0, 1.0, size=(num_heads, rank)))
    scale_l = np.array([2.01, 2.22, 2.54, 0.99, 0.8, 1.99])
    sigma = scale_l[:, None, None] * base_hk[None]  # (L, H, K): scaled copies whose shapes differ in the last bit
    ent = rng.uniform(1.0, 3.0, size=(num_layers, num_heads))
    return geometry(sigma, ent), ("L=6 H=3 K=10, every layer a copy of one spectrum set scaled by "
                                  "2.01, 2.22, 2.54, 0.99, 0.8, 1.99: the best-anchor scores tie in exact "
                                  "arithmetic but not in the seed's rounding, which picks a non-first layer")


def minilm_like():
    rng = np.random.default_rng(111)
    num_layers, num_heads, rank = 6, 12, 32
    k = np.arange(rank)
    t_l = np.array([1.3, 1.1, 1.0, 0.95, 0.9, 1.05])
    head_scale = rng.lognormal(0.0, 0.35, size=num_heads)  # (H,)
    q_lh = rng.uniform(0.88, 0.95, size=(num_layers, num_heads))  # geometric decay ratio
    heavy = 1.0 + 4.0 * np.exp(-k / 1.5)  # (K,) heavy head: first few values stand out
    sigma = (20.0 * t_l[:, None, None] * head_scale[None, :, None] * q_lh[..., None] ** k * heavy
             * np.exp(0.08 * rng.standard_normal((num_layers, num_heads, rank))))
    sigma = sorted_spectrum(sigma)
    ent = np.clip(2.2 - 1.2 * np.log(sigma[..., 0] / sigma[..., 0].mean()) + 0.5 * rng.standard_normal((num_layers, num_heads)),
                  0.5, 4.0)
    return geometry(sigma, ent), "L=6 H=12 K=32 geometric decay with a heavy head, like a small BERT; entropies in [0.5, 4]"


def one_layer():
    rng = np.random.default_rng(112)
    sigma = decaying_spectra(rng, 1, 4, 8, np.array([1.0]), noise=0.2)
    ent = rng.uniform(1.0, 3.0, size=(1, 4))
    return geometry(sigma, ent), "L=1 H=4 K=8: no layer pairs, the seed prints nan and numpy warns"


def one_head():
    rng = np.random.default_rng(113)
    t_l = np.linspace(0.7, 1.5, 5)
    sigma = decaying_spectra(rng, 5, 1, 8, t_l, noise=0.2)
    ent = entropies_from_temperature(rng, t_l[:, None], noise=0.2)
    return geometry(sigma, ent), "L=5 H=1 K=8: no head pairs, experiment 3 means are nan and numpy warns"


def constant_entropy():
    rng = np.random.default_rng(114)
    t_l = np.linspace(0.7, 1.5, 4)
    sigma = decaying_spectra(rng, 4, 3, 8, t_l, noise=0.2)
    ent = np.full((4, 3), 2.0)
    return geometry(sigma, ent), "L=4 H=3 K=8, every entropy 2.0: both correlations are nan"


def no_dynamic():
    rng = np.random.default_rng(115)
    t_l = np.linspace(0.7, 1.5, 4)
    sigma = decaying_spectra(rng, 4, 3, 8, t_l, noise=0.2)
    return geometry(sigma, None), "L=4 H=3 K=8 without the 'dynamic' key: the seed raises KeyError after experiment 2"


INPUT_BUILDERS = {f.__name__: f for f in (
    random_small, planted_schedule, ragged, zero_heads, rank_one, rejected, two_layers, wide, deep,
    ties_best, ties_rounding, minilm_like, one_layer, one_head, constant_entropy, no_dynamic)}


# ----------------------------------------------------------------------------
# Running the seed
# ----------------------------------------------------------------------------


def load_seed(seed_path: Path):
    spec = importlib.util.spec_from_file_location("seed_reference", seed_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source_line(function, text: str) -> int:
    """Absolute line number of the one line of ``function`` containing ``text``."""
    lines, first = inspect.getsourcelines(function)
    hits = [first + i for i, line in enumerate(lines) if text in line]
    if len(hits) != 1:
        raise SystemExit(f"expected one line containing {text!r} in the seed's main(), found {len(hits)}")
    return hits[0]


def finite_or_none(x):
    """Float, or None for NaN/inf; applied elementwise to nested lists."""
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    x = float(x)
    return x if math.isfinite(x) else None


def run_seed(seed, input_path: Path, anchor: str) -> dict:
    """Run the seed's main() on one input and anchor mode; return the RUN record."""
    main_code = seed.main.__code__
    row_line = source_line(seed.main, EXPERIMENT3_ROW_SOURCE)
    compare_line = source_line(seed.main, BEST_SCORE_COMPARE_SOURCE)
    cross_head = []  # experiment-3 mean per layer, in print order
    best_scores = []  # (Lc, score) in comparison order
    final_locals = {}

    def trace_main(frame, event, arg):
        if event == "line" and frame.f_lineno == row_line:
            cs = frame.f_locals["cs"]
            cross_head.append(float(np.mean(cs)) if cs else None)  # np.mean([]) would add a warning
        elif event == "line" and frame.f_lineno == compare_line:
            best_scores.append((frame.f_locals["Lc"], frame.f_locals["score"]))
        elif event == "return":
            final_locals.update(frame.f_locals)
        return trace_main

    def trace_calls(frame, event, arg):
        return trace_main if frame.f_code is main_code else None

    stdout = io.StringIO()
    error = None
    previous_trace = sys.gettrace()
    saved_argv = sys.argv
    sys.argv = [str(seed.__file__), str(input_path), "--anchor", anchor]
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), \
                np.errstate(divide="warn", over="warn", invalid="warn", under="ignore"):
            warnings.simplefilter("always")
            sys.settrace(trace_calls)
            try:
                seed.main()
            except (Exception, SystemExit) as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                sys.settrace(previous_trace)
    finally:
        sys.argv = saved_argv

    num_layers = json.loads(input_path.read_text())["num_layers"]
    if anchor == "best":
        if [lc for lc, _ in best_scores] != list(range(num_layers)):
            raise SystemExit(f"{input_path.name}: best-anchor scores not captured for every layer")
        scores = [finite_or_none(s) for _, s in best_scores]
    else:
        scores = None

    def local(name, convert):
        return convert(final_locals[name]) if name in final_locals else None

    return {
        "stdout": stdout.getvalue(),
        "error": error,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "anchor_layer": local("anchor_L", int),
        "per_head_mean_cos": local("per_head_cos", lambda a: finite_or_none(a.tolist())),
        "T": local("T_map", lambda a: finite_or_none(a.tolist())),
        "residual": local("resid_map", lambda a: finite_or_none(a.tolist())),
        "corr_T_entropy": local("c", finite_or_none),
        "corr_opnorm_entropy": local("c_op", finite_or_none),
        "cross_head_per_layer_mean_cos": cross_head if (cross_head or error is None) else None,
        "verdict": local("verdict", str),
        "best_scores": scores,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", required=True, type=Path, help="path to seed_reference.py")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data" / "golden")
    args = ap.parse_args(argv)

    seed_sha256 = hashlib.sha256(args.seed.read_bytes()).hexdigest()
    seed = load_seed(args.seed.resolve())
    for name, build in INPUT_BUILDERS.items():
        geometry_dict, description = build()
        input_path = args.out / f"{name}.json"
        atomic_write_text(input_path, json.dumps(geometry_dict, indent=1) + "\n")
        expected = {
            "input": input_path.name,
            "seed_sha256": seed_sha256,
            "numpy_version": np.__version__,
            "description": description,
            "runs": {mode: run_seed(seed, input_path.resolve(), mode) for mode in ANCHOR_MODES},
        }
        atomic_write_text(args.out / f"{name}.expected.json",
                          json.dumps(expected, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        runs = expected["runs"]
        print(f"{name:18} L={geometry_dict['num_layers']:<3} H={geometry_dict['num_heads']:<3} "
              + "  ".join(f"{m}: L={r['anchor_layer']} {(r['verdict'] or r['error'] or '')[:20]!r}"
                          f"{' warn' if r['warnings'] else ''}" for m, r in runs.items()))


if __name__ == "__main__":
    main()
