"""``qkspectra extract``: a model's per-head QK spectra and attention entropy as a geometry JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qkspectra.cli import app
from qkspectra.extract.corpus import DEFAULT_MAX_TOKENS

MODEL_HELP = (
    "Bundled model name (minilm, smollm2), a local Hugging Face model folder, or a .gguf file "
    "(dequantised once into $QKSPECTRA_CACHE, default ~/.cache/qkspectra/models)."
)


@app.command()
def extract(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)] = "minilm",
    output: Annotated[Path, typer.Option("--output", "-o", help="Geometry JSON to write; the per-head factors go "
                                         "beside it as <stem>.factors.safetensors.", show_default=False)] = ...,
    no_fold_ln: Annotated[bool, typer.Option("--no-fold-ln", help="Use the raw W_Q, W_K instead of folding in the "
                                             "gain of the norm feeding attention.")] = False,
    static_only: Annotated[bool, typer.Option("--static-only", help="Skip the corpus pass (no 'dynamic' rows).")] = False,
    corpus: Annotated[Optional[Path], typer.Option(help="A .txt file, a folder of .txt files or a .jsonl file "
                                                   "(default: the bundled corpus).")] = None,
    window_per_line: Annotated[bool, typer.Option("--window-per-line", help="One window per non-blank corpus line "
                                                  "instead of fixed-length windows.")] = False,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per window (default: min(512, the model's "
                                                   "maximum)).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Corpus budget in tokens.")] = DEFAULT_MAX_TOKENS,
    batch_size: Annotated[Optional[int], typer.Option(help="Windows per forward pass (default: as many as fit "
                                                      "in memory).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, no summary line.")] = False,
) -> None:
    """Per-head singular values of s * W_Q W_K^T (static) and mean attention entropy over a corpus (dynamic)."""
    from qkspectra.extract import ExtractOptions, extract_to_files

    options = ExtractOptions(
        fold_ln=not no_fold_ln,
        static_only=static_only,
        corpus=None if corpus is None else str(corpus),
        seq_len=seq_len,
        max_tokens=max_tokens,
        window_per_line=window_per_line,
        batch_size=batch_size,
        quiet=quiet,
    )
    json_file, factors_file = extract_to_files(model, output, options=options)
    if not quiet:
        passes = "static spectra" if static_only else "static spectra and attention entropy"
        typer.echo(f"wrote {json_file} ({passes}) and {factors_file}", err=True)
