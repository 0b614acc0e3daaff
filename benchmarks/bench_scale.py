"""Frontier-sized shapes: `qkspectra run DIR --static-only --no-functional` on random checkpoints.

Builds random checkpoints with real models' attention shapes, holding only what the static pass
reads (the query/key projections and the input norms, bfloat16, a Llama config):

  llama3-8b        32 layers, d_model 4096, 32 heads, 8 kv heads, d_head 128
  llama3-70b-4l    the first 4 layers of Llama-3-70B: d_model 8192, 64 heads, 8 kv heads, d_head 128

and runs the whole job on each in a child process, reporting

  wall            the child's wall time, and its stages from run.json (extraction, operator-level
                  fits, the whole analysis, plots and report);
  peak RSS        the child's own peak resident memory (its VmHWM, written as it exits; wait4's
                  maxrss would also count this script's memory at the fork, inherited across the exec);
  per layer pair  the operator-level fits' time over the number of distinct (layer, anchor) pairs;
  floor           the matrix products no exact operator analysis avoids, timed alone in this run on
                  random float64 factors of the same shapes, on every core as the analysis runs them:
                  per layer the d_head x d_head Gram matrices of its factors, per layer pair the key
                  Gram products of every kv-head pair, the (H, H) inner products (one product of each
                  query head with each key Gram, then dot products) and the same and matched heads'
                  query Gram products; operator / floor is the ratio against it (target: at most 2);
  80 layers       the projection to 80 layers of that shape: extraction and the per-layer summaries
                  scale with L, the fits with the number of layer pairs (4 anchor strategies: at most 4 L).

Targets (2 cores, 24 GB): the Llama-3-8B shape's whole run within 10 minutes and under 4 GB peak.

    python benchmarks/bench_scale.py [--shapes llama3-8b llama3-70b-4l] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SHAPES = {
    "llama3-8b": dict(layers=32, d_model=4096, heads=32, kv_heads=8),
    "llama3-70b-4l": dict(layers=4, d_model=8192, heads=64, kv_heads=8),
}
D_HEAD = 128
PROJECTED_LAYERS = 80


def write_checkpoint(folder: Path, layers: int, d_model: int, heads: int, kv_heads: int) -> None:
    """config.json and model.safetensors with random bfloat16 q/k projections and input norms."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d_model,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": D_HEAD, "intermediate_size": 4 * d_model, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors[prefix + "self_attn.q_proj.weight"] = (0.02 * torch.randn(heads * D_HEAD, d_model, generator=generator)).bfloat16()
        tensors[prefix + "self_attn.k_proj.weight"] = (0.02 * torch.randn(kv_heads * D_HEAD, d_model, generator=generator)).bfloat16()
        tensors[prefix + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(d_model, generator=generator)).bfloat16()
    save_file(tensors, str(folder / "model.safetensors"))


# Runs ``python -m qkspectra ARGS...`` and, as it exits, writes its peak resident memory (kB) to argv[1].
CHILD = """
import atexit, runpy, sys

peak_file = sys.argv.pop(1)


def record():
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(peak_file, "w") as out:
        out.write(str(kb))


atexit.register(record)
runpy.run_module("qkspectra", run_name="__main__", alter_sys=True)
"""


def run_child(model: Path, out: Path) -> tuple[float, float]:
    """Run the job in a child process: (wall seconds, its peak resident GiB)."""
    peak_file = out.parent / f"{out.name}.peak"
    command = [sys.executable, "-c", CHILD, str(peak_file), "run", str(model), "--static-only", "--no-functional",
               "--quiet", "--out", str(out)]
    clock = time.perf_counter()
    status = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - clock
    if status != 0:
        raise SystemExit(f"qkspectra run failed on {model} (status {status})")
    return wall, int(peak_file.read_text()) / 2**20  # KiB -> GiB


def floor_seconds(layers: int, pairs: int, d_model: int, heads: int, kv_heads: int) -> float:
    """The unavoidable products (see the module doc), timed on random factors, spread over every core."""
    from qkspectra.threads import single_blas_thread, worker_count
    from qkspectra.factored import cross_gram, grouped_pairwise_inner

    rng = np.random.default_rng(0)
    A, C = rng.standard_normal((2, heads, d_model, D_HEAD))
    B, D = rng.standard_normal((2, kv_heads, d_model, D_HEAD))

    def layer_products(_: int) -> None:
        np.swapaxes(A, -1, -2) @ A
        np.swapaxes(B, -1, -2) @ B

    def pair_products(_: int) -> None:
        key_gram = cross_gram(B, D)
        grouped_pairwise_inner(A, C, key_gram)
        for _ in range(2):  # same heads and matched heads
            np.stack([A[h].T @ C[h] for h in range(heads)])

    workers = worker_count()
    with single_blas_thread(), ThreadPoolExecutor(workers) as pool:
        clock = time.perf_counter()
        list(pool.map(layer_products, range(workers)))
        per_layer = (time.perf_counter() - clock) / workers  # each worker did one layer
        clock = time.perf_counter()
        list(pool.map(pair_products, range(workers)))
        per_pair = (time.perf_counter() - clock) / workers
    return layers * per_layer + pairs * per_pair


def bench(name: str, work: Path) -> None:
    shape = SHAPES[name]
    model, out = work / name, work / f"{name}-out"
    if not (model / "model.safetensors").is_file():
        clock = time.perf_counter()
        write_checkpoint(model, **shape)
        print(f"{name}: wrote the random checkpoint in {time.perf_counter() - clock:.0f} s "
              f"({(model / 'model.safetensors').stat().st_size / 1e9:.2f} GB)", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    wall, peak = run_child(model, out)
    timings = json.loads((out / "run.json").read_text())["timings"]
    factors_size = (out / "geometry.factors.safetensors").stat().st_size
    L, pairs = shape["layers"], timings["operator_layer_pairs"]
    floor = floor_seconds(L, pairs, shape["d_model"], shape["heads"], shape["kv_heads"])
    operator = timings["operator_s"]
    qk_f32 = L * (shape["heads"] + shape["kv_heads"]) * D_HEAD * shape["d_model"] * 4
    print(f"{name}: wall {wall:.1f} s, peak RSS {peak:.2f} GB  (extract {timings['extract_s']:.1f} s, "
          f"operator fits {operator:.1f} s, whole analysis {timings['analyze_s']:.1f} s, report {timings['report_s']:.1f} s)")
    print(f"{name}: factors file {factors_size / 1e9:.2f} GB = {factors_size / qk_f32:.3f} x the q/k weights in float32")
    print(f"{name}: {pairs} layer pairs, {operator / pairs:.2f} s per pair; floor {floor:.1f} s, "
          f"operator fits / floor = {operator / floor:.2f}, whole analysis / floor = {timings['analyze_s'] / floor:.2f} "
          "(target <= 2)")
    per_layer = (timings["extract_s"] + timings["analyze_s"] - operator + timings["report_s"]) / L
    projected = PROJECTED_LAYERS * per_layer + 4 * PROJECTED_LAYERS * operator / pairs
    print(f"{name}: projected to {PROJECTED_LAYERS} layers: {projected / 60:.1f} min "
          f"(per-layer work x {PROJECTED_LAYERS} + {4 * PROJECTED_LAYERS} pairs x the measured cost per pair)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    if args.work is not None:
        for name in args.shapes:
            bench(name, args.work)
        return
    with tempfile.TemporaryDirectory(prefix="qkspectra-bench-") as work:
        for name in args.shapes:
            bench(name, Path(work))


if __name__ == "__main__":
    main()
