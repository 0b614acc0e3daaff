"""Memory and time of ``extract --static-only`` on a GGUF file with Qwen2-7B's attention shapes.

Writes (once, into ``--dir``, default the system temp folder) a Qwen2-architecture GGUF with
Qwen2-7B's attention: 28 layers, d_model 3584, 28 heads, 4 kv heads, d_head 128, q/k/v biases,
every q/k/v/o projection at full size in Q8_0 (norms and biases F32). The tensors the static pass
never reads are stand-ins so that writing stays quick: feed-forward width 256 (18944 in Qwen2-7B)
and 1024 embedding rows (the metadata says 152064, so the config is Qwen2-7B's but the whole model
cannot be loaded from this file). Then runs ``qkspectra extract FILE --static-only`` in a fresh
subprocess and prints its wall time and its own peak RSS (VmHWM) against the baseline: the
dequantise-whole path, which reads the full Qwen2-7B (7.6e9 parameters, computed from the shapes,
not run) into float32 before anything else: 30.5 GB resident, 15.2 GB for a bfloat16 cache.

    python benchmarks/bench_gguf_static.py [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS, D_MODEL, HEADS, KV_HEADS, D_FF, VOCAB = 28, 3584, 28, 4, 18944, 152064
STAND_IN_FF, STAND_IN_VOCAB = 256, 1024


def qwen2_7b_parameters() -> int:
    d_head = D_MODEL // HEADS
    attention = D_MODEL * HEADS * d_head * 2 + D_MODEL * KV_HEADS * d_head * 2 + (HEADS + 2 * KV_HEADS) * d_head
    layer = attention + 3 * D_MODEL * D_FF + 2 * D_MODEL
    return LAYERS * layer + 2 * VOCAB * D_MODEL + D_MODEL  # untied embeddings and head, final norm


def write(path: Path) -> float:
    from qkspectra.models.gguf_write import write_decoder_gguf

    start = time.perf_counter()
    write_decoder_gguf(path, arch="qwen2", num_layers=LAYERS, d_model=D_MODEL, num_heads=HEADS,
                       num_kv_heads=KV_HEADS, d_ff=STAND_IN_FF, vocab=VOCAB, stand_in_vocab=STAND_IN_VOCAB,
                       tensor_type=lambda name: "Q8_0" if ".attn_" in name else "F32")
    return time.perf_counter() - start


CHILD = """
import resource, sys
from qkspectra.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))
print('PEAK', int(hwm.split()[1]) * 1024, file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the GGUF file for another run")
    args = parser.parse_args()
    path = args.dir / "qkspectra-bench-qwen2-7b-shapes.Q8_0.gguf"
    if not path.is_file():
        print(f"writing {path} ...", flush=True)
        print(f"written in {write(path):.1f} s", flush=True)
    size = path.stat().st_size
    out = Path(tempfile.mkdtemp()) / "geometry.json"
    env = dict(os.environ, QKSPECTRA_CACHE=str(out.parent / "cache"))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, "extract", str(path), "--static-only", "--quiet",
                           "--output", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"extract failed: {done.stderr.strip()}")
    peak = int(next(line for line in done.stderr.splitlines() if line.startswith("PEAK")).split()[1])
    cache_used = (out.parent / "cache").exists() and any((out.parent / "cache").iterdir())
    params = qwen2_7b_parameters()
    baseline = params * 4
    print(f"GGUF file: {size / 1e9:.2f} GB (Qwen2-7B attention shapes in Q8_0, stand-in FFN and embeddings)")
    print(f"extract --static-only: wall {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB; "
          f"model cache written: {'yes' if cache_used else 'no'}")
    print(f"baseline, dequantise-whole (Qwen2-7B, {params / 1e9:.2f}e9 parameters, computed): "
          f"float32 {baseline / 1e9:.1f} GB, bfloat16 {params * 2 / 1e9:.1f} GB")
    print(f"peak RSS / dequantise-whole float32: {peak / baseline:.3f} ({baseline / peak:.1f}x less)")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
