"""``qkspectra report`` and ``qkspectra plot``: rebuild a report from analysis.json, no model needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from qkspectra.cli import app

ANALYSIS_HELP = "analysis.json written by `qkspectra run` (geometry.json beside it adds the per-head plots)."
OUT_HELP = "Output folder (default: the folder of analysis.json)."


def _inputs(path: Path) -> tuple[dict[str, Any], Any]:
    """The analysis document and the geometry beside it (None when absent)."""
    import orjson

    from qkspectra.errors import QkspectraError
    from qkspectra.geometry import load_geometry
    from qkspectra.runner import GEOMETRY_FILE

    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise QkspectraError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QkspectraError(f"{path}: is a folder; give its analysis.json") from None
    except orjson.JSONDecodeError as e:
        raise QkspectraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or not {"input", "rescale", "anchor"} <= document.keys():
        raise QkspectraError(f"{path}: not an analysis document (write one with `qkspectra run` or `qkspectra analyze --json`)")
    geometry_path = path.parent / GEOMETRY_FILE
    return document, load_geometry(geometry_path) if geometry_path.is_file() else None


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        typer.echo(f"qkspectra: {line}", err=True)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help=ANALYSIS_HELP, show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=OUT_HELP, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Rebuild plots/*.png, report.html and report.md from an analysis.json."""
    from qkspectra.report import write_report

    document, geometry = _inputs(path)
    files = write_report(document, geometry, path.parent if out is None else out)
    for note in files.notes:
        _say(quiet, note)
    _say(quiet, f"report: {files.html}  ({files.markdown.name}, {len(files.plots)} plots)")


@app.command()
def plot(
    path: Annotated[Path, typer.Argument(help=ANALYSIS_HELP, show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=OUT_HELP, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Rebuild plots/*.png from an analysis.json."""
    from qkspectra.report import PLOTS_FOLDER, write_plots

    document, geometry = _inputs(path)
    out_dir = path.parent if out is None else out
    files = write_plots(document, geometry, out_dir)
    for note in files.notes:
        _say(quiet, note)
    _say(quiet, f"{len(files.plots)} plots in {out_dir / PLOTS_FOLDER}: {', '.join(files.plots)}")
