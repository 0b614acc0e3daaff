"""Speed of the null baselines (200 shuffle + 200 Gaussian draws, all four strategies).

Baseline: the same draws analysed one at a time with ``analyze_all`` (a loop over
draws, each draw a full analysis), timed on the first ``--baseline-draws`` draws of
each null and scaled to the full count. Also printed: the cost of the nulls relative
to the analysis of the real geometry alone.

    python benchmarks/bench_nulls.py [GEOMETRY.json] [--rounds 3]

Without a file: a synthetic geometry of MiniLM's shapes (6 layers x 12 heads,
d_model 384, d_head 32), and one of SmolLM2-135M's (30 x 9, 3 kv heads, d_model 576,
d_head 64), where the Gaussian null's draws are bounded.
"""

from __future__ import annotations

import argparse
import time
import timeit
from pathlib import Path

import numpy as np

from qkspectra.analysis.seed import analyze_all
from qkspectra.geometry import Geometry, load_geometry
from qkspectra.analysis.nulls import NullOptions, draw_generators, gaussian_shapes, gaussian_spectra, null_baselines


def best_of(f, n: int) -> float:
    """The fastest of n calls, in seconds."""
    return min(timeit.repeat(f, number=1, repeat=n))


def synthetic(L: int, H: int, d_model: int, d_head: int, kv: int) -> Geometry:
    sigma = gaussian_spectra([np.random.default_rng(0)], L, H, d_model, d_head, kv)[0]  # (L, H, d_head)
    sigma = sigma * np.linspace(1.0, 3.0, L)[:, None, None]
    return Geometry(sigma, None, metadata={"d_model": d_model, "d_head": d_head, "num_kv_heads": kv})


def loop_seconds_per_draw(geometry: Geometry, draws: int) -> tuple[float, float]:
    """Seconds per draw of the shuffle and of the Gaussian null, each draw analysed on its own."""
    sigma = geometry.singular_values
    L, H, K = sigma.shape
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(draws):
        analyze_all(Geometry(sigma.reshape(L * H, K)[rng.permutation(L * H)].reshape(L, H, K), None))
    shuffle = (time.perf_counter() - start) / draws
    shapes = gaussian_shapes(geometry)
    if isinstance(shapes, str):
        return shuffle, 0.0
    d_model, d_head, kv = shapes
    start = time.perf_counter()
    for i in range(draws):
        sampled = gaussian_spectra(draw_generators(0, 1, i, i + 1), L, H, d_model, d_head, kv)[0, ..., :K]
        analyze_all(Geometry(sampled, None))
    return shuffle, (time.perf_counter() - start) / draws


def bench(name: str, geometry: Geometry, rounds: int, baseline_draws: int) -> None:
    options = NullOptions()
    gauss = null_baselines(geometry, analyze_all(geometry), options)["gaussian"]
    ours = best_of(lambda: null_baselines(geometry, analyze_all(geometry), options), rounds)
    alone = best_of(lambda: analyze_all(geometry), rounds)
    shuffle_s, gauss_s = loop_seconds_per_draw(geometry, baseline_draws)
    loop = shuffle_s * options.shuffle_draws + gauss_s * gauss.draws
    L, H, K = geometry.singular_values.shape
    print(f"{name}: {L} layers x {H} heads x {K}; shuffle {options.shuffle_draws} draws, "
          f"Gaussian {gauss.draws if gauss.available else 'unavailable'}" + (f" ({gauss.reason})" if gauss.reason else ""))
    print(f"  nulls, vectorised        {ours:8.3f} s")
    print(f"  baseline: analyze_all per draw {loop:8.3f} s (timed on {baseline_draws} draws)  ratio {loop / ours:5.1f}x")
    print(f"  analysis alone           {alone:8.3f} s  (nulls cost {ours / alone:.0f}x the analysis)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("geometry", nargs="?", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-draws", type=int, default=20)
    args = ap.parse_args()
    if args.geometry:
        bench(args.geometry.name, load_geometry(args.geometry), args.rounds, args.baseline_draws)
        return
    bench("MiniLM shapes", synthetic(6, 12, 384, 32, 12), args.rounds, args.baseline_draws)
    bench("SmolLM2 shapes", synthetic(30, 9, 576, 64, 3), args.rounds, args.baseline_draws)


if __name__ == "__main__":
    main()
