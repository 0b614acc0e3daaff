"""Peak resident memory of the attention-entropy pass on SmolLM2 with long windows.

Target: under 2 GB with --seq-len 2048 (all 30 layers' attention maps of one such window
alone would take 30 x 9 x 2048^2 x 4 bytes = 4.5 GB, so they must never be held together).
The pass runs in a fresh subprocess (after a first one has made sure the model's safetensors
cache exists, so GGUF conversion does not count); its peak RSS comes from getrusage.

    python benchmarks/bench_entropy_memory.py [--seq-len 2048] [--windows 2]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

TARGET_BYTES = 2 * 10**9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(model_name: str, seq_len: int, windows: int) -> None:
    from qkspectra.extract.corpus import load_windows
    from qkspectra.extract.entropy import attention_entropy
    from qkspectra.models import load_model

    model, tokenizer = load_model(model_name, progress=False)
    after_load = peak_rss_bytes()
    corpus = load_windows(tokenizer, corpus=None, seq_len=seq_len, max_tokens=seq_len * windows,
                          window_per_line=False)
    stats = attention_entropy(model, corpus, progress=False)
    layers, heads = stats.mean_entropy.shape
    maps_bytes = layers * heads * seq_len**2 * 4
    print(f"{model_name}: {corpus.description}; {layers} layers x {heads} heads")
    print(f"all layers' maps of one window would take {maps_bytes / 1e9:.2f} GB")
    print(f"peak RSS after loading the model: {after_load / 1e9:.2f} GB")
    print(f"peak RSS after the entropy pass:  {peak_rss_bytes() / 1e9:.2f} GB  "
          f"({'within' if peak_rss_bytes() < TARGET_BYTES else 'ABOVE'} the {TARGET_BYTES / 1e9:.0f} GB target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.seq_len, args.windows)
        return
    warm = f"from qkspectra.models import load_model; load_model({args.model!r}, progress=False)"
    subprocess.run([sys.executable, "-c", warm], check=True)
    subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--seq-len", str(args.seq_len),
                    "--windows", str(args.windows)], check=True)


if __name__ == "__main__":
    main()
