"""The corpus pass with the model in bfloat16 against float32: speed, peak memory, and how far the entropies move.

Each dtype runs in its own fresh subprocess (load, then the corpus pass over the same windows),
so that its peak RSS (getrusage) is its own. Queries, keys and entropies are reduced in float32
either way; in bfloat16 the model's hidden states, queries and keys are rounded, which is what
moves the entropies. Prints tokens/s and peak RSS of each, and the largest and mean absolute
difference of the per-head mean entropy and normalised entropy (the bound the tests hold).

    python benchmarks/bench_precision.py                      # SmolLM2, 512-token windows, 4096 tokens
    python benchmarks/bench_precision.py --model minilm
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(model_name: str, dtype: str, seq_len: int, max_tokens: int) -> None:
    from qkspectra.extract.corpus import load_windows
    from qkspectra.extract.entropy import attention_entropy
    from qkspectra.models import load_model
    from qkspectra.models.device import resolve_placement

    model, tokenizer = load_model(model_name, attn_implementation="sdpa", progress=False,
                                  placement=resolve_placement("cpu", dtype))
    corpus = load_windows(tokenizer, corpus=None, seq_len=seq_len, max_tokens=max_tokens, window_per_line=False)
    attention_entropy(model, corpus, progress=False)  # warm-up
    start = time.perf_counter()
    stats = attention_entropy(model, corpus, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "tokens_per_s": stats.num_tokens / seconds,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mean_entropy": stats.mean_entropy.tolist(),
        "mean_normalized_entropy": stats.mean_normalized_entropy.tolist(),
        "description": corpus.description,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.seq_len, args.max_tokens)
        return
    import numpy as np

    results = {}
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--seq-len", str(args.seq_len),
                              "--max-tokens", str(args.max_tokens), "--child", dtype],
                             check=True, capture_output=True, text=True).stdout
        results[dtype] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.model}: {results['float32']['description']}")
    for dtype, result in results.items():
        print(f"{dtype:>9}: {result['tokens_per_s']:7.0f} tokens/s, peak RSS {result['peak_rss'] / 1e9:.2f} GB")
    for key in ("mean_entropy", "mean_normalized_entropy"):
        difference = np.abs(np.array(results["bfloat16"][key]) - np.array(results["float32"][key]))
        print(f"bfloat16 - float32, {key} per head: largest {difference.max():.4f}, mean {difference.mean():.4f}")


if __name__ == "__main__":
    main()
