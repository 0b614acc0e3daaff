"""``qkspectra extract``: a model's per-head QK spectra and attention entropy as a geometry JSON.

The extraction options are declared once here; ``qkspectra run`` takes the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from qkspectra.cli.app import app, output_file
from qkspectra.extract.corpus import DEFAULT_MAX_TOKENS
from qkspectra.models.bundled import BUNDLED_MODELS

if TYPE_CHECKING:
    from qkspectra.extract.extraction import ExtractOptions

MODEL_HELP = (
    f"Bundled model name ({', '.join(BUNDLED_MODELS)}), a local Hugging Face model folder, or a .gguf file "
    "(dequantised once into $QKSPECTRA_CACHE, default ~/.cache/qkspectra/models)."
)

Model = Annotated[str, typer.Argument(help=MODEL_HELP)]
NoFoldLn = Annotated[bool, typer.Option("--no-fold-ln", help="Use the raw W_Q, W_K instead of folding in the gain of "
                                        "the norm feeding attention.")]
StaticOnly = Annotated[bool, typer.Option("--static-only", help="Skip the corpus pass (no 'dynamic' rows, no entropy).")]
Corpus = Annotated[Optional[Path], typer.Option(help="A .txt file, a folder of .txt files or a .jsonl file "
                                                "(default: the bundled corpus).")]
WindowPerLine = Annotated[bool, typer.Option("--window-per-line", help="One window per non-blank corpus line instead "
                                             "of fixed-length windows.")]
SeqLen = Annotated[Optional[int], typer.Option(help="Tokens per window (default: min(512, the model's maximum)).")]
MaxTokens = Annotated[int, typer.Option(help="Corpus budget in tokens.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Windows per forward pass (default: as many as fit in memory).")]
Device = Annotated[str, typer.Option(help="Where the model runs (the corpus pass; with run, also the functional test): auto (a GPU if there "
                                     "is one), cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[Optional[str], typer.Option(help="The model's dtype: float32, bfloat16 or float16 (default: float32 "
                                              "on the CPU, bfloat16 on a GPU). Entropies are reduced in float32.")]


def extract_options(
    *, no_fold_ln: bool, static_only: bool, corpus: Path | None, window_per_line: bool, seq_len: int | None,
    max_tokens: int, batch_size: int | None, quiet: bool, device: str = "auto", dtype: str | None = None,
) -> ExtractOptions:
    """The library's options from the command line's."""
    from qkspectra.extract.extraction import ExtractOptions

    return ExtractOptions(
        fold_ln=not no_fold_ln,
        static_only=static_only,
        corpus=None if corpus is None else str(corpus),
        seq_len=seq_len,
        max_tokens=max_tokens,
        window_per_line=window_per_line,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        quiet=quiet,
    )


@app.command(epilog="Examples: qkspectra extract -o geometry.json  |  qkspectra extract smollm2 -o smollm2.json --static-only")
def extract(
    model: Model = "minilm",
    output: Annotated[str, typer.Option("--output", "-o", help="Geometry JSON to write; the per-head factors go "
                                         "beside it as <stem>.factors.safetensors.", show_default=False)] = ...,
    no_fold_ln: NoFoldLn = False,
    static_only: StaticOnly = False,
    corpus: Corpus = None,
    window_per_line: WindowPerLine = False,
    seq_len: SeqLen = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    batch_size: BatchSize = None,
    device: Device = "auto",
    dtype: Dtype = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, no summary line.")] = False,
) -> None:
    """Per-head singular values of s * W_Q W_K^T (static) and mean attention entropy over a corpus (dynamic)."""
    from qkspectra.extract.extraction import extract_to_files

    options = extract_options(no_fold_ln=no_fold_ln, static_only=static_only, corpus=corpus,
                              window_per_line=window_per_line, seq_len=seq_len, max_tokens=max_tokens,
                              batch_size=batch_size, quiet=quiet, device=device, dtype=dtype)
    json_file, factors_file = extract_to_files(model, output_file(output, "-o", "geometry.json"), options=options)
    if not quiet:
        passes = "static spectra" if static_only else "static spectra and attention entropy"
        typer.echo(f"wrote {json_file} ({passes}) and {factors_file}", err=True)
