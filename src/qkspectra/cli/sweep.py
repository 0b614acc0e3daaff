"""``qkspectra sweep``: many models through ``run`` on a Dask cluster, and one comparison report.

It takes every option of ``run`` (read from run's own declarations, so the two never drift
apart) besides its own: the models, ``--models FILE``, ``--out``, ``--scheduler``, ``--workers``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from qkspectra.cli.app import app
from qkspectra.cli.run import run, run_settings

NOT_FROM_RUN = ("model", "out", "scheduler")  # run's options that sweep declares its own way


def sweep(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(help="Models as for run: bundled names, model folders, .gguf files.", show_default=False),
    ] = None,
    models_file: Annotated[
        Optional[Path],
        typer.Option("--models", help="CSV with a 'model' column, an optional 'name' column and any further columns as "
                     "labels (e.g. family, params, step); paths relative to the CSV's folder.", show_default=False),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder: DIR/<name>/ per model, sweep.json, sweep.html, "
                                      "sweep.md, plots/.", show_default=False)] = ...,
    scheduler: Annotated[
        Optional[str],
        typer.Option(help="Address of an existing Dask scheduler (tcp://HOST:PORT) whose workers run the models "
                     "(default: a local cluster)."),
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Worker processes of the local cluster (default: one per core).", show_default=False)
    ] = None,
    **run_options: Any,
) -> None:
    """Run every model (reusing finished runs of the same model and options) as tasks on a Dask cluster and
    compare them: sweep.json, sweep.html, sweep.md and plots. Exit status 1 if any model failed."""
    from qkspectra.workflow.sweep import run_sweep, sweep_models
    from qkspectra.report.sweep_page import render_sweep_summary

    settings = run_settings(**run_options)
    entries = sweep_models(models or [], models_file)
    quiet = settings.options.quiet
    say = (lambda _: None) if quiet else (lambda line: typer.echo(f"qkspectra: {line}", err=True))
    result = run_sweep(entries, out, settings, scheduler=scheduler, workers=workers, say=say)
    typer.echo(render_sweep_summary(result.document), nl=False)
    say(f"report: {result.out_dir / 'sweep.html'}")
    if result.failed:
        raise typer.Exit(1)


def _with_run_options() -> None:
    """sweep's signature: its own parameters, then every option of run (typer reads the signature)."""
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(sweep, eval_str=True).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    from_run = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                for name, p in inspect.signature(run, eval_str=True).parameters.items() if name not in NOT_FROM_RUN]
    sweep.__signature__ = inspect.Signature([*own, *from_run], return_annotation=None)


_with_run_options()
app.command(epilog="Examples: qkspectra sweep minilm smollm2 --out sweep  |  qkspectra sweep --models models.csv --out sweep --workers 2")(sweep)
