"""Peak memory of the functional test with the model in bfloat16 (and float32), against the weights.

Target: peak resident memory within 1.3x of the weights in the chosen dtype plus the activations.
A random Llama-shaped causal LM (grouped-query attention, 4 query heads per key head; shapes set
by the options, 24 layers of width 1024 by default, 0.45B parameters) is saved as a bfloat16 safetensors checkpoint with
SmolLM2's tokenizer; its static geometry is extracted once (``qkspectra extract --static-only``).
Then, for each dtype, a fresh subprocess loads the model in that dtype and runs the functional test
(last-layer anchor, rank-k from the factors file) on ``--tokens`` tokens; it reports its peak RSS
(VmHWM: this process's own high-water mark; getrusage's maxrss would also count this script's
memory at the fork, inherited across the exec), the weights' bytes in that dtype, and the activations the test keeps by design: the
original's queries and keys of every layer (in the model's dtype, linear in the tokens) and one
batch's logits over the vocabulary in float32. Another fresh subprocess measures the fixed costs,
which do not grow with the model: the libraries imported, the model's code (its class built on the
meta device, no weights) and its tokenizer loaded. The ratio printed is
(peak - fixed costs) / (weights + those activations); the ratio with the fixed costs is printed too.

    python benchmarks/bench_functional_memory.py [--layers 8] [--d-model 1536] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
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


def fixed_costs(folder: Path) -> None:
    """Print the resident memory of what does not grow with the model: the libraries, the model's code, its tokenizer."""
    import importlib

    import torch
    import transformers

    from qkspectra.models import resolve_model

    importlib.import_module("qkspectra.analysis.reconstruction.evidence")  # the same libraries as the test's process

    source = resolve_model(str(folder), progress=False)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(source.config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.folder, local_files_only=True)
    tokenizer("warm up")
    print(json.dumps({"fixed": resident_bytes()}))


def peak_resident_bytes() -> int:
    """The high-water mark of this process's resident memory since its exec (VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def child(folder: Path, dtype: str, tokens: int) -> None:
    import torch

    from qkspectra.analysis.seed import analyze_all
    from qkspectra.analysis.reconstruction.evidence import functional_evidence
    from qkspectra.extract.extraction import ExtractOptions
    from qkspectra.geometry import load_geometry
    from qkspectra.models import resolve_model
    from qkspectra.analysis.factors import load_factors
    from qkspectra.analysis.rank_k import rank_k_evidence

    geometry = load_geometry(folder.parent / "geometry.json")
    anchors = {"last": analyze_all(geometry)["last"].anchor}
    rank_k = rank_k_evidence(geometry, anchors, load_factors(folder.parent / "geometry.factors.safetensors", geometry))
    functional_evidence(str(folder), geometry, anchors, rank_k,
                        ExtractOptions(seq_len=min(tokens, 1024), device="cpu", dtype=dtype, quiet=True), max_tokens=tokens)
    config = resolve_model(str(folder), progress=False).config
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    parameters = sum(p.numel() for p in transformers_model_parameters(config))
    d_head = config.hidden_size // config.num_attention_heads
    kept = 2 * config.num_hidden_layers * tokens * config.num_attention_heads * d_head * itemsize
    logits = tokens * config.vocab_size * 4
    print(json.dumps({"peak": peak_resident_bytes(),
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
        if args.child[1] == "fixed":
            fixed_costs(Path(args.child[0]))
        else:
            child(Path(args.child[0]), args.child[1], args.tokens)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder, args.layers, args.d_model)
        subprocess.run([sys.executable, "-m", "qkspectra", "extract", str(folder), "--static-only", "--quiet",
                        "-o", str(Path(tmp) / "geometry.json")], check=True)
        def run_child(what: str) -> dict:
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", str(folder), what],
                                 check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        fixed = run_child("fixed")["fixed"]
        print(f"fixed costs (libraries, the model's code, its tokenizer): {fixed / 1e9:.2f} GB resident")
        for dtype in ("bfloat16", "float32"):
            r = run_child(dtype)
            budget = r["weights"] + r["kept_queries_keys"] + r["logits"]
            ratio = (r["peak"] - fixed) / budget
            print(f"{dtype:>9}: weights {r['weights'] / 1e9:.2f} GB, kept queries/keys {r['kept_queries_keys'] / 1e9:.2f} GB, "
                  f"logits {r['logits'] / 1e9:.2f} GB; peak RSS {r['peak'] / 1e9:.2f} GB: the test's own "
                  f"{ratio:.2f}x weights + activations ({'within' if ratio <= TARGET else 'ABOVE'} the {TARGET}x "
                  f"target), {r['peak'] / budget:.2f}x with the fixed costs")


if __name__ == "__main__":
    main()
