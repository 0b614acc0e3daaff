"""Speed of the attention-entropy pass against a plain eager forward over the same windows.

Target: the entropy pass costs at most 1.3x the plain forward (the model with
attn_implementation="eager" and no hooks, called on the same padded batches).
The two are measured alternately, ``--repeats`` times each; the medians are compared.

    python benchmarks/bench_entropy.py                                  # MiniLM, default corpus, 32768 tokens
    python benchmarks/bench_entropy.py --model smollm2 --max-tokens 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkspectra.extract.corpus import DEFAULT_MAX_TOKENS, default_seq_len, load_windows
from qkspectra.extract.entropy import attention_entropy, forward_inputs, pad_windows, window_batches
from qkspectra.models import load_model

TARGET_RATIO = 1.3


def plain_forward(model, corpus) -> None:
    """The baseline: the same batches through the same model body, no hooks."""
    body = model.base_model
    pad_id = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    with torch.inference_mode():
        for batch in window_batches(corpus.windows, model.config.num_attention_heads, None):
            input_ids, attention_mask = pad_windows([corpus.windows[i] for i in batch], pad_id, "right")
            body(**forward_inputs(body, input_ids, attention_mask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, progress=False)
    seq_len = args.seq_len or default_seq_len(model)
    corpus = load_windows(tokenizer, corpus=None, seq_len=seq_len, max_tokens=args.max_tokens, window_per_line=False)
    print(f"{args.model}: {corpus.description}; torch threads {torch.get_num_threads()}")

    plain_forward(model, corpus)  # warm-up
    times: dict[str, list[float]] = {"plain eager forward": [], "entropy pass": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain_forward(model, corpus)
        times["plain eager forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        attention_entropy(model, corpus, progress=False)
        times["entropy pass"].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:>20}: {corpus.num_tokens / seconds:9.0f} tokens/s  (median of {args.repeats}, {seconds:.2f} s)")
    ratio = medians["entropy pass"] / medians["plain eager forward"]
    verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
    print(f"ratio entropy / plain: {ratio:.3f}  ({verdict} the {TARGET_RATIO}x target)")


if __name__ == "__main__":
    main()
