"""``qkspectra report`` and ``qkspectra plot``: rebuild a report from analysis.json, no model needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from qkspectra.cli.app import app
from qkspectra.errors import QkspectraError

ANALYSIS_HELP = ("A run folder, or an analysis.json written by `qkspectra run` or `qkspectra analyze --json` (the geometry file it was "
                 "computed from, beside it, adds the per-head plots).")
OUT_HELP = "Output folder (default: the folder of analysis.json)."
NOT_ANALYSIS = "not an analysis document (write one with `qkspectra run` or `qkspectra analyze --json`)"


def _inputs(path: Path) -> tuple[dict[str, Any], Any]:
    """The analysis document and the geometry beside it (None when absent).

    The geometry is the file the document names as its input, else ``geometry.json`` (as in a
    ``qkspectra run`` folder), looked up beside ``path``.
    """
    import orjson

    from qkspectra.geometry import load_geometry
    from qkspectra.report.readers import check_analysis
    from qkspectra.workflow.runner import ANALYSIS_FILE, GEOMETRY_FILE

    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise QkspectraError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QkspectraError(f"{path}: a folder without {ANALYSIS_FILE}; give a run folder or an analysis.json") from None
    except orjson.JSONDecodeError as e:
        raise QkspectraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or not all(isinstance(document.get(key), dict) for key in ("input", "rescale", "anchor")):
        raise QkspectraError(f"{path}: {NOT_ANALYSIS}")
    check_analysis(document, str(path))
    named = document["input"].get("file")
    candidates = [Path(named).name] if isinstance(named, str) and Path(named).name else []
    geometry_path = next((path.parent / name for name in (*candidates, GEOMETRY_FILE) if (path.parent / name).is_file()), None)
    if geometry_path is None:
        return document, None
    geometry = load_geometry(geometry_path)
    shape = (document["input"].get("num_layers"), document["input"].get("num_heads"))
    if shape != (geometry.num_layers, geometry.num_heads):
        raise QkspectraError(
            f"{geometry_path} has {geometry.num_layers} layers × {geometry.num_heads} heads, but {path.name} was "
            f"computed on {shape[0]} × {shape[1]}: not the geometry of this analysis"
        )
    return document, geometry


def _rebuild(path: Path, out: Path | None, quiet: bool, write: Callable[..., Any], summary: Callable[[Any, Path], str]) -> None:
    """Read the inputs, ``write(document, geometry, out_dir)``, print the notes and ``summary(files, out_dir)``."""
    import warnings

    import numpy as np

    from qkspectra.atomic import refuse_overwriting_inputs
    from qkspectra.report.run_page import report_paths, write_plots

    from qkspectra.workflow.runner import ANALYSIS_FILE

    if path.is_dir() and (path / ANALYSIS_FILE).is_file():  # a run folder: its analysis.json
        path = path / ANALYSIS_FILE
    document, geometry = _inputs(path)
    out_dir = path.parent if out is None else out
    inputs = [path] + ([Path(geometry.source)] if geometry is not None else [])
    for output in report_paths(out_dir, pages=write is not write_plots):
        refuse_overwriting_inputs(output, inputs)
    try:
        # A hand-edited document with absurd numbers may make numpy or matplotlib warn on the
        # way to the error below; the one-line error is what the user needs.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            files = write(document, geometry, out_dir)
    except QkspectraError:  # already one line naming the fault (a ValueError too)
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise QkspectraError(f"{path}: {NOT_ANALYSIS}: {type(e).__name__} {e}") from None
    if not quiet:
        for line in (*files.notes, summary(files, out_dir)):
            typer.echo(f"qkspectra: {line}", err=True)


@app.command(epilog="Examples: qkspectra report minilm  |  qkspectra report minilm/analysis.json (beside its geometry.json)")
def report(
    path: Annotated[Path, typer.Argument(help=ANALYSIS_HELP, show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=OUT_HELP, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Rebuild plots/*.png, report.html and report.md from an analysis.json."""
    from qkspectra.report.run_page import write_report

    _rebuild(path, out, quiet, write_report,
             lambda files, _: f"report: {files.html}  ({files.markdown.name}, {len(files.plots)} plots)")


@app.command(epilog="Example: qkspectra plot minilm/analysis.json")
def plot(
    path: Annotated[Path, typer.Argument(help=ANALYSIS_HELP, show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=OUT_HELP, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Rebuild plots/*.png from an analysis.json."""
    from qkspectra.report.files import PLOTS_FOLDER
    from qkspectra.report.run_page import write_plots

    _rebuild(path, out, quiet, write_plots,
             lambda files, out_dir: f"{len(files.plots)} plots in {out_dir / PLOTS_FOLDER}: {', '.join(files.plots)}")
