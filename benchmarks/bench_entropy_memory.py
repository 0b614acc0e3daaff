"""Peak resident memory of the attention-entropy pass on SmolLM2 with long windows.

Target: under 2 GB with --seq-len 8192, the model's own limit (one layer's attention maps of one
such window alone would take 9 x 8192^2 x 4 bytes = 2.4 GB, all 30 layers' 72 GB: the pass forms
blocks of logits from queries and keys, never a map). ``--dtype bfloat16`` for the model in bfloat16.
The pass runs in a fresh subprocess (after a first one has made sure the model's safetensors
cache exists, so GGUF conversion does not count); its peak RSS comes from getrusage.

    python benchmarks/bench_entropy_memory.py [--seq-len 8192] [--windows 1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

TARGET_BYTES = 2 * 10**9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(model_name: str, seq_len: int, windows: int, dtype: str) -> None:
    import time

    from qkspectra.extract.corpus import load_windows
    from qkspectra.extract.entropy import attention_entropy
    from qkspectra.models import load_model
    from qkspectra.models.device import resolve_placement

    model, tokenizer = load_model(model_name, attn_implementation="sdpa", progress=False,
                                  placement=resolve_placement("cpu", dtype))
    after_load = peak_rss_bytes()
    corpus = load_windows(tokenizer, corpus=None, seq_len=seq_len, max_tokens=seq_len * windows,
                          window_per_line=False)
    start = time.perf_counter()
    stats = attention_entropy(model, corpus, progress=False)
    seconds = time.perf_counter() - start
    layers, heads = stats.mean_entropy.shape
    maps_bytes = heads * seq_len**2 * 4
    print(f"{model_name} ({dtype}): {corpus.description}; {layers} layers x {heads} heads; "
          f"{stats.num_tokens / seconds:.0f} tokens/s")
    print(f"one layer's maps of one window would take {maps_bytes / 1e9:.2f} GB")
    print(f"peak RSS after loading the model: {after_load / 1e9:.2f} GB")
    print(f"peak RSS after the entropy pass:  {peak_rss_bytes() / 1e9:.2f} GB  "
          f"({'within' if peak_rss_bytes() < TARGET_BYTES else 'ABOVE'} the {TARGET_BYTES / 1e9:.0f} GB target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.seq_len, args.windows, args.dtype)
        return
    warm = f"from qkspectra.models import load_model; load_model({args.model!r}, progress=False)"
    subprocess.run([sys.executable, "-c", warm], check=True)
    subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--seq-len", str(args.seq_len),
                    "--windows", str(args.windows), "--dtype", args.dtype], check=True)


if __name__ == "__main__":
    main()
