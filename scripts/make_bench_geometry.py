"""Write a synthetic geometry JSON of a large model's shape, for the analysis benchmark.

    python scripts/make_bench_geometry.py OUT [--layers 80 --heads 64 --rank 128 --seed 0]

The defaults give the shape of a 70B model (80 layers, 64 heads, d_head 128),
about 13 MB of JSON. Spectra decay exponentially per head, scale with a
per-layer temperature and carry lognormal noise; entropies fall with the
temperature. Deterministic for a given seed; floats use ``json.dumps``'s
default (shortest round-trip) formatting. Do not commit the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qkspectra.atomic import atomic_write_text


def bench_geometry(num_layers: int, num_heads: int, rank: int, seed: int) -> dict:
    """Seed-schema geometry with spectra (L, H, K) and entropies (L, H)."""
    rng = np.random.default_rng(seed)
    temperature_l = 0.5 + 1.5 * np.linspace(0.0, 1.0, num_layers) ** 1.5  # (L,)
    decay_h = rng.uniform(0.02, 0.12, size=num_heads)  # (H,)
    k = np.arange(rank)  # (K,)
    heavy_k = 1.0 + 3.0 * np.exp(-k / 2.0)  # (K,) a few leading values stand out
    head_scale_h = rng.lognormal(0.0, 0.3, size=num_heads)  # (H,)
    sigma = (10.0 * temperature_l[:, None, None] * head_scale_h[None, :, None]
             * np.exp(-decay_h[None, :, None] * k) * heavy_k
             * np.exp(0.15 * rng.standard_normal((num_layers, num_heads, rank))))  # (L, H, K)
    sigma = -np.sort(-sigma, axis=-1)
    entropy = 3.5 * np.exp(-0.5 * (temperature_l[:, None] - 0.5)) * np.exp(
        0.2 * rng.standard_normal((num_layers, num_heads)))  # (L, H)
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "source": f"synthetic benchmark geometry (seed {seed})",
        "static": [{"metric_singvals_per_head": layer.tolist()} for layer in sigma],
        "dynamic": [{"mean_attention_entropy_per_head": layer.tolist()} for layer in entropy],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    geometry = bench_geometry(args.layers, args.heads, args.rank, args.seed)
    atomic_write_text(args.out, json.dumps(geometry))


if __name__ == "__main__":
    main()
