"""``qkspectra sweep`` of 4 small models on a local cluster of 2 workers against the same runs one after another.

Baseline: ``runner.run`` of each model in turn, in this process (its imports already paid for, as a
researcher's loop in a notebook would have them). Sweep: ``sweep.run_sweep`` with ``workers=2``,
everything included (cluster start, the workers' imports, the comparison report). Both fresh
(no reuse), same options: the corpus pass on 2048 tokens of 64-token windows, no functional test.
The models: random Llama checkpoints (6 layers, 8 query heads, 4 key/value heads, d_model 256).
On 2 cores the ratio cannot exceed 2.

Usage: python benchmarks/bench_sweep.py [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qkspectra.extract.extraction import ExtractOptions
from qkspectra.workflow.runner import RunSettings, run
from qkspectra.workflow.sweep import SweepModel, run_sweep

SETTINGS = RunSettings(ExtractOptions(max_tokens=2048, seq_len=64, quiet=True), functional=False)


def make_models(folder: Path, count: int) -> list[Path]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qkspectra.models.bundled import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("minilm"))
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
        paths.append(folder / f"model{i}")
        LlamaForCausalLM(config).save_pretrained(paths[-1])
        tokenizer.save_pretrained(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = make_models(tmp / "models", 4)
        run(str(models[0]), tmp / "warm-up", SETTINGS)  # the baseline's imports
        clock = time.perf_counter()
        for path in models:
            run(str(path), tmp / "one-by-one" / path.name, SETTINGS)
        one_by_one = time.perf_counter() - clock
        clock = time.perf_counter()
        result = run_sweep([SweepModel(p.name, str(p)) for p in models], tmp / "sweep", SETTINGS, workers=args.workers)
        swept = time.perf_counter() - clock
    assert result.failed == 0
    print(f"4 models one after another: {one_by_one:.1f} s")
    print(f"sweep on {args.workers} workers:      {swept:.1f} s (cluster start and worker imports included)")
    print(f"ratio (one after another / sweep): {one_by_one / swept:.2f}x")


if __name__ == "__main__":
    main()
