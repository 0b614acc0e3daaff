"""Peak memory of the functional test with the model in bfloat16 (and float32), against the weights.

Target: peak resident memory within 1.3x of the weights in the chosen dtype plus the activations.
A random Llama-shaped causal LM (grouped-query attention, 4 query heads per key head; shapes set
by the options, 24 layers of width 1024 by default, 0.45B parameters) is saved as a bfloat16 safetensors checkpoint with
SmolLM2's tokenizer; its static geometry is extracted once (``qkspectra extract --static-only``).
Then, for each dtype, a fresh subprocess loads the model in that dtype and runs the functional test
(last-layer anchor, rank-k from the factors file) on ``--tokens`` tokens; it reports its peak RSS
(getrusage) and its resident memory before any of it (the libraries imported), the weights' bytes
in that dtype, and the activations the test keeps by design: the original's queries and keys of
every layer (float32 or the model's dtype, linear in the tokens) and one batch's logits over the
vocabulary in float32. The ratio printed is (peak - libraries) / (weights + those activations).

    python benchmarks/bench_functional_memory.py [--layers 8] [--d-model 1536] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = 1.3


def build(folder: Path, layers: int, d_model: int) -> None:
    import shutil

    import torch
    import transformers

    from qkspectra.models import resolve_model

    tokenizer_folder = resolve_model("smollm2", progress=False).folder
    config = transformers.LlamaConfig(hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=d_model // 64,
                                      num_key_value_heads=d_model // 256, head_dim=64, intermediate_size=4 * d_model,
                                      vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, folder / name)


def resident_bytes() -> int:
    """The process's resident memory now (not its peak)."""
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(folder: Path, dtype: str, tokens: int) -> None:
    import torch

    from qkspectra.analysis import analyze_all
    from qkspectra.functional import functional_evidence
    from qkspectra.geometry import load_geometry
    from qkspectra.models import resolve_model
    from qkspectra.operator import load_factors
    from qkspectra.rank_k import rank_k_evidence

    baseline = resident_bytes()  # the interpreter, numpy, torch and transformers imported
    geometry = load_geometry(folder.parent / "geometry.json")
    anchors = {"last": analyze_all(geometry)["last"].anchor}
    rank_k = rank_k_evidence(geometry, anchors, load_factors(folder.parent / "geometry.factors.safetensors", geometry))
    functional_evidence(str(folder), geometry, anchors, rank_k, max_tokens=tokens, seq_len=min(tokens, 1024),
                        device="cpu", dtype=dtype)
    config = resolve_model(str(folder), progress=False).config
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    parameters = sum(p.numel() for p in transformers_model_parameters(config))
    d_head = config.hidden_size // config.num_attention_heads
    kept = 2 * config.num_hidden_layers * tokens * config.num_attention_heads * d_head * itemsize
    logits = tokens * config.vocab_size * 4
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "baseline": baseline,
                      "weights": parameters * itemsize, "kept_queries_keys": kept, "logits": logits}))


def transformers_model_parameters(config):
    import torch
    import transformers

    with torch.device("meta"):
        return list(transformers.LlamaForCausalLM(config).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.tokens)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder, args.layers, args.d_model)
        subprocess.run([sys.executable, "-m", "qkspectra", "extract", str(folder), "--static-only", "--quiet",
                        "-o", str(Path(tmp) / "geometry.json")], check=True)
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", str(folder), dtype],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            budget = r["weights"] + r["kept_queries_keys"] + r["logits"]
            ratio = (r["peak"] - r["baseline"]) / budget
            print(f"{dtype:>9}: weights {r['weights'] / 1e9:.2f} GB, kept queries/keys {r['kept_queries_keys'] / 1e9:.2f} GB, "
                  f"logits {r['logits'] / 1e9:.2f} GB; peak RSS {r['peak'] / 1e9:.2f} GB, of which "
                  f"{r['baseline'] / 1e9:.2f} GB the imported libraries: the test's own {ratio:.2f}x weights + "
                  f"activations ({'within' if ratio <= TARGET else 'ABOVE'} the {TARGET}x target), "
                  f"{r['peak'] / budget:.2f}x with the libraries")


if __name__ == "__main__":
    main()
