"""``qkspectra run``: extract, analyze with every anchor, plot and report, in one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qkspectra.cli import app
from qkspectra.cli.extract import MODEL_HELP


@app.command()
def run(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)] = "minilm",
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default: ./MODEL-NAME).", show_default=False)
    ] = None,
    corpus: Annotated[
        Optional[Path], typer.Option(help="Text for the entropy pass: a .txt file, a folder of .txt, or .jsonl (default: the bundled corpus).")
    ] = None,
    no_fold_ln: Annotated[
        bool, typer.Option("--no-fold-ln", help="Use the raw W_Q, W_K instead of folding in the gain of the norm feeding attention.")
    ] = False,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per window (default: min(512, the model's maximum)).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Corpus budget in tokens.")] = 32768,
    window_per_line: Annotated[bool, typer.Option("--window-per-line", help="One window per non-blank line instead of fixed windows.")] = False,
    static_only: Annotated[bool, typer.Option("--static-only", help="Spectra only: skip the corpus pass (no entropy).")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Windows per forward pass (default: as many as fit in memory).")] = None,
    groups: Annotated[Optional[int], typer.Option(help="Number of contiguous layer groups for the group anchor (default: round(sqrt(layers))).")] = None,
    no_functional: Annotated[
        bool,
        typer.Option(
            "--no-functional",
            help="Skip the functional test (the model run with reconstructed operators: loss and attention change), "
            "the slowest part: one pass per reconstruction and anchor strategy, on at most 2048 corpus tokens.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; print only the strategy table and the verdict.")] = False,
) -> None:
    """Extract (reusing a cached extraction of the same model and options), analyze with every anchor
    strategy, and write geometry.json, analysis.json, plots/*.png, report.html and report.md."""
    from qkspectra.extract import ExtractOptions
    from qkspectra.report import render_summary
    from qkspectra.runner import default_out_dir
    from qkspectra.runner import run as run_all

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
    out_dir = default_out_dir(model) if out is None else out
    say = (lambda _: None) if quiet else (lambda line: typer.echo(f"qkspectra: {line}", err=True))
    result = run_all(model, out_dir, options=options, groups=groups, functional=not no_functional, say=say)
    typer.echo(render_summary(result.document), nl=False)
    for note in result.report.notes:
        say(note)
    say(f"report: {result.report.html}")
