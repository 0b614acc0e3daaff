"""``qkspectra run``: extract, analyze with every anchor, plot and report, in one folder.

Its options are declared once here (the extraction's in ``cli.extract``); ``qkspectra sweep`` takes the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from qkspectra.cli.app import app
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

if TYPE_CHECKING:
    from qkspectra.workflow.runner import RunSettings

Groups = Annotated[Optional[int], typer.Option(help="Number of contiguous layer groups for the group anchor (default: round(sqrt(layers))).")]
NoFunctional = Annotated[
    bool,
    typer.Option(
        "--no-functional",
        help="Skip the functional test (the model run with reconstructed operators: loss and attention change), "
        "the slowest part: one forward pass per reconstruction and anchor strategy.",
    ),
]
FunctionalTokens = Annotated[int, typer.Option(help="Corpus tokens the functional test runs on (each reconstruction "
                                               "is one pass over them).")]
NullDraws = Annotated[int, typer.Option(help="Draws of each null baseline (Gaussian heads, shuffled labels).")]
Seed = Annotated[int, typer.Option(help="Seed of the null baselines and the bootstrap.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; print only the strategy table and the verdict.")]
Scheduler = Annotated[
    Optional[str],
    typer.Option(help="Address of a Dask scheduler (tcp://HOST:PORT) whose workers fit the operator analysis' layer pairs "
                 "(the same numbers as here)."),
]


def run_settings(*, groups: int | None, no_functional: bool, functional_tokens: int | None, quiet: bool,
                 null_draws: int = 200, seed: int = 0, **extract) -> RunSettings:
    """The library's settings of a run from the command line's options (the extraction's in ``extract``)."""
    from qkspectra.workflow.runner import RunSettings

    return RunSettings(extract_options(quiet=quiet, **extract), groups, not no_functional, functional_tokens,
                       null_draws, seed)


class StageBars:
    """progress(stage, done, total) as a bar per stage on stderr, with elapsed and remaining time; nothing if disabled.

    The display is shown only while a stage is under way, so other output (the extraction's own bars,
    the messages) never interleaves with it.
    """

    def __init__(self, disable: bool):
        self.disable = disable
        self._bars = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> StageBars | None:
        return None if self.disable else self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._bars is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                  console=Console(stderr=True), transient=True)
            self._bars.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._bars.add_task(stage, total=total)
        self._bars.update(self._tasks[stage], completed=done)
        if done >= total:
            self._bars.remove_task(self._tasks.pop(stage))
            if not self._tasks:
                self._stop()

    def _stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __exit__(self, *exc) -> None:
        self._stop()


@app.command(epilog="Examples: qkspectra run  |  qkspectra run smollm2 --out smollm2-run --functional-tokens 1024")
def run(
    model: Model = "minilm",
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default: ./NAME for a bundled model, ./STEM for a folder or .gguf file, "
                                               "./STEM-qkspectra where that would be the model itself).", show_default=False)
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
    groups: Groups = None,
    no_functional: NoFunctional = False,
    functional_tokens: FunctionalTokens = DEFAULT_FUNCTIONAL_TOKENS,
    null_draws: NullDraws = 200,
    seed: Seed = 0,
    scheduler: Scheduler = None,
    quiet: Quiet = False,
) -> None:
    """Extract (reusing a cached extraction of the same model and options), analyze with every anchor
    strategy, and write geometry.json, analysis.json, plots/*.png, report.html and report.md."""
    from qkspectra.workflow.cluster import fit_map
    from qkspectra.report.run_page import render_summary
    from qkspectra.workflow.runner import default_out_dir
    from qkspectra.workflow.runner import run as run_all

    settings = run_settings(no_fold_ln=no_fold_ln, static_only=static_only, corpus=corpus, window_per_line=window_per_line,
                            seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, device=device, dtype=dtype,
                            quiet=quiet, groups=groups, no_functional=no_functional, functional_tokens=functional_tokens,
                            null_draws=null_draws, seed=seed)
    out_dir = default_out_dir(model) if out is None else out
    say = (lambda _: None) if quiet else (lambda line: typer.echo(f"qkspectra: {line}", err=True))
    with fit_map(scheduler) as layer_pairs_map, StageBars(disable=quiet) as progress:
        result = run_all(model, out_dir, settings, map=layer_pairs_map, say=say, progress=progress)
    typer.echo(render_summary(result.document), nl=False)
    for note in result.report.notes:
        say(note)
    say(f"report: {result.report.html}")
