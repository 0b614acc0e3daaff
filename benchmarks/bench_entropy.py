"""Speed of the attention-entropy pass against a plain SDPA forward over the same windows.

Target: the entropy pass runs at 0.8x or more of the plain forward's tokens/s (the same model,
attn_implementation="sdpa", no hooks, called on the same padded batches). The two are measured
alternately, ``--repeats`` times each; the medians are compared.

The floor, measured in the same run: the plain forward plus the work no exact entropy can skip,
forming every visible logit once more from the model's own queries and keys and taking its
exponential (blocks of 256 query rows, causal blocks cut at the diagonal, nothing reduced). The
entropy needs both; ``floor`` is the best ratio any method that leaves the model's own attention
kernel alone could reach on this machine. ``--dtype`` loads the model in
another precision (the pass still reduces in float32), for bfloat16 against float32.

    python benchmarks/bench_entropy.py                                  # MiniLM, default corpus, 32768 tokens
    python benchmarks/bench_entropy.py --model smollm2 --max-tokens 4096 --seq-len 512
    python benchmarks/bench_entropy.py --model smollm2 --max-tokens 8192 --seq-len 8192 --repeats 1
    python benchmarks/bench_entropy.py --model smollm2 --max-tokens 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkspectra.extract.corpus import DEFAULT_MAX_TOKENS, default_seq_len, load_windows
from qkspectra.extract.entropy import attention_entropy, forward_inputs, pad_windows, window_batches
from qkspectra.models import load_model
from qkspectra.models.device import resolve_placement

TARGET_RATIO = 0.8


def plain_forward(model, corpus) -> None:
    """The baseline: the same batches through the same model body, no hooks."""
    body = model.base_model
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    with torch.inference_mode():
        for batch in window_batches(corpus.windows, model.config.num_attention_heads, None):
            input_ids, attention_mask = pad_windows([corpus.windows[i] for i in batch], pad_id, "right")
            body(**forward_inputs(body, input_ids.to(device), attention_mask.to(device)))


def floor_pass(model, corpus) -> None:
    """The plain forward plus each layer's visible logits formed once more and exponentiated."""
    from qkspectra.extract.capture import AttentionCapture

    def logits_once_more(call) -> None:
        queries, keys = call.scaled_queries(), call.keys_per_query_head()  # (B, H, T, d)
        causal = call.visible.causal or call.visible.mask is not None
        for start in range(0, queries.shape[-2], 256):
            stop = min(start + 256, queries.shape[-2])
            width = stop if causal else keys.shape[-2]
            torch.exp_(queries[..., start:stop, :] @ keys[..., :width, :].transpose(-1, -2))

    body = model.base_model
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    with torch.inference_mode(), AttentionCapture(model, logits_once_more) as capture:
        for batch in window_batches(corpus.windows, model.config.num_attention_heads, None):
            input_ids, attention_mask = pad_windows([corpus.windows[i] for i in batch], pad_id, "right")
            capture.begin(attention_mask)
            body(**forward_inputs(body, input_ids.to(device), attention_mask.to(device)))
            capture.end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    placement = resolve_placement(args.device, args.dtype)
    model, tokenizer = load_model(args.model, attn_implementation="sdpa", placement=placement, progress=False)
    seq_len = args.seq_len or default_seq_len(model)
    corpus = load_windows(tokenizer, corpus=None, seq_len=seq_len, max_tokens=args.max_tokens, window_per_line=False)
    print(f"{args.model} ({placement.dtype} on {placement.device}): {corpus.description}; "
          f"torch threads {torch.get_num_threads()}")

    plain_forward(model, corpus)  # warm-up
    times: dict[str, list[float]] = {"plain SDPA forward": [], "entropy pass": [], "floor": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain_forward(model, corpus)
        times["plain SDPA forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        attention_entropy(model, corpus, progress=False)
        times["entropy pass"].append(time.perf_counter() - start)
        start = time.perf_counter()
        floor_pass(model, corpus)
        times["floor"].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:>20}: {corpus.num_tokens / seconds:9.0f} tokens/s  (median of {args.repeats}, {seconds:.2f} s)")
    ratio = medians["plain SDPA forward"] / medians["entropy pass"]
    floor = medians["plain SDPA forward"] / medians["floor"]
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"tokens/s of the entropy pass / plain forward: {ratio:.3f}  ({verdict} the {TARGET_RATIO}x target)")
    print(f"floor (plain forward + every visible logit once more and its exp) / plain forward: {floor:.3f}; "
          f"the entropy pass takes {medians['entropy pass'] / medians['floor']:.2f}x the floor's time")


if __name__ == "__main__":
    main()
