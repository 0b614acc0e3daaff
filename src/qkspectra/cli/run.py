"""``qkspectra run``: extract, analyze with every anchor, plot and report, in one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qkspectra.cli import app
from qkspectra.cli.extract import (
    BatchSize,
    Corpus,
    Device,
    Dtype,
    MaxTokens,
    Model,
    NoFoldLn,
    SeqLen,
    StaticOnly,
    WindowPerLine,
    extract_options,
)
from qkspectra.extract.corpus import DEFAULT_FUNCTIONAL_TOKENS, DEFAULT_MAX_TOKENS


@app.command()
def run(
    model: Model = "minilm",
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default: ./MODEL-NAME).", show_default=False)
    ] = None,
    corpus: Corpus = None,
    no_fold_ln: NoFoldLn = False,
    seq_len: SeqLen = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    window_per_line: WindowPerLine = False,
    static_only: StaticOnly = False,
    batch_size: BatchSize = None,
    device: Device = "auto",
    dtype: Dtype = None,
    groups: Annotated[Optional[int], typer.Option(help="Number of contiguous layer groups for the group anchor (default: round(sqrt(layers))).")] = None,
    no_functional: Annotated[
        bool,
        typer.Option(
            "--no-functional",
            help="Skip the functional test (the model run with reconstructed operators: loss and attention change), "
            "the slowest part: one forward pass per reconstruction and anchor strategy.",
        ),
    ] = False,
    functional_tokens: Annotated[int, typer.Option(help="Corpus tokens the functional test runs on (each "
                                                   "reconstruction is one pass over them).")] = DEFAULT_FUNCTIONAL_TOKENS,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; print only the strategy table and the verdict.")] = False,
) -> None:
    """Extract (reusing a cached extraction of the same model and options), analyze with every anchor
    strategy, and write geometry.json, analysis.json, plots/*.png, report.html and report.md."""
    from qkspectra.report import render_summary
    from qkspectra.runner import default_out_dir
    from qkspectra.runner import run as run_all

    options = extract_options(no_fold_ln=no_fold_ln, static_only=static_only, corpus=corpus,
                              window_per_line=window_per_line, seq_len=seq_len, max_tokens=max_tokens,
                              batch_size=batch_size, quiet=quiet, device=device, dtype=dtype)
    out_dir = default_out_dir(model) if out is None else out
    say = (lambda _: None) if quiet else (lambda line: typer.echo(f"qkspectra: {line}", err=True))
    result = run_all(model, out_dir, options=options, groups=groups, functional=not no_functional,
                     functional_tokens=functional_tokens, say=say)
    typer.echo(render_summary(result.document), nl=False)
    for note in result.report.notes:
        say(note)
    say(f"report: {result.report.html}")
