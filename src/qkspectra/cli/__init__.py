"""The ``qkspectra`` command line: parses arguments, calls the library, prints.

Each command lives in its own module and registers itself on ``app``; no maths here.
"""

from __future__ import annotations

import sys

import typer

from qkspectra.errors import QkspectraError

app = typer.Typer(
    name="qkspectra",
    help="Test the annealing-schedule hypothesis on transformer attention heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Test the annealing-schedule hypothesis on transformer attention heads."""


def fail(message: str) -> None:
    """Print one line to stderr and exit with status 2."""
    typer.echo(f"qkspectra: error: {message}", err=True)
    raise typer.Exit(2)


def _register() -> None:
    from qkspectra.cli import analyze, extract, report, run  # noqa: F401  (each registers its commands)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:  # success returns; errors keep their exit status
        if e.code not in (0, None):
            raise
    except QkspectraError as e:
        typer.echo(f"qkspectra: error: {e}", err=True)
        sys.exit(2)
