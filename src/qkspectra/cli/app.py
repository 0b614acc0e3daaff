"""The ``qkspectra`` command group that every command registers on, and the helpers commands share."""

from __future__ import annotations

import os
from pathlib import Path

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
    """Stop the command: ``main`` prints ``message`` as one line on stderr and exits with status 2."""
    raise QkspectraError(message)


def output_file(text: str, option: str, example: str) -> Path:
    """The file an option names; QkspectraError if the text names a folder (ends with a slash) or nothing."""
    if not text or text.endswith(("/", os.sep)):
        raise QkspectraError(f"{option} {text!r} names a folder; give a file name such as {text}{example}")
    return Path(text)
