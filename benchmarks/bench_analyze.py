"""Speed of ``qkspectra analyze --anchor best`` against the seed script.

Baseline: the seed analysis script (``seed_reference.py``), run as a whole process
on the same file. Floor: the time to merely parse that file with orjson.

    python benchmarks/bench_analyze.py --seed PATH/TO/seed_reference.py [--rounds 5]

Input: a synthetic geometry of 80 layers x 64 heads x rank 128 (the shape of a 70B
model, about 13 MB of JSON), made by ``scripts/make_bench_geometry.py``. Processes
are timed alternately (seed, ours, seed, ours, ...) so that load on the machine
affects both alike; the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_bench_geometry import bench_geometry  # noqa: E402

from qkspectra.analysis.seed import analyze  # noqa: E402
from qkspectra.geometry import load_geometry  # noqa: E402


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def best_of(f, n: int) -> float:
    """The fastest of n calls, in seconds."""
    return min(timeit.repeat(f, number=1, repeat=n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=Path, help="path to seed_reference.py (the baseline)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "geometry_80x64x128.json"
        path.write_bytes(orjson.dumps(bench_geometry(80, 64, 128, 0)))
        print(f"input: {path.name}, {path.stat().st_size / 1e6:.1f} MB")

        raw = path.read_bytes()
        parse = best_of(lambda: orjson.loads(raw), args.rounds)
        load = best_of(lambda: load_geometry(path), args.rounds)
        g = load_geometry(path)
        work = best_of(lambda: analyze(g, "best"), args.rounds)
        print(f"in process (best of {args.rounds}): parse only {parse * 1e3:.1f} ms (the floor), "
              f"load+validate {load * 1e3:.1f} ms, analysis {work * 1e3:.1f} ms")
        print(f"  load+validate+analysis / parse floor: {(load + work) / parse:.2f}x (goal <= 1.3x)")

        ours_cmd = [sys.executable, "-m", "qkspectra", "analyze", str(path), "--anchor", "best", "--quiet"]
        if args.seed is None:
            ours = [wall(ours_cmd) for _ in range(args.rounds)]
            print(f"qkspectra process: median {statistics.median(ours):.3f} s (no --seed given: no ratio)")
            return
        seed_cmd = [sys.executable, str(args.seed), str(path), "--anchor", "best"]
        seed, ours = [], []
        for _ in range(args.rounds):
            seed.append(wall(seed_cmd))
            ours.append(wall(ours_cmd))
        s, o = statistics.median(seed), statistics.median(ours)
        print(f"whole process, median of {args.rounds} alternating runs: seed {s:.3f} s, qkspectra {o:.3f} s")
        print(f"  speed-up over the seed: {s / o:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
