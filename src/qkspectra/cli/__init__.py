"""The ``qkspectra`` command line: parses arguments, calls the library, prints.

Each command lives in its own module and registers itself on ``app``; no maths here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from qkspectra.errors import QkspectraError, command_line_spelling

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


def _register() -> None:
    from qkspectra.cli import analyze, extract, report, run, sweep  # noqa: F401  (each registers its commands)


def main(argv: list[str] | None = None) -> None:
    """Run the command line: bad input and usage errors give one line on stderr and exit status 2 (130: interrupted)."""
    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    _register()
    try:
        with command_line_spelling():
            status = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as e:  # bare `qkspectra`: the help (rich prints it itself and returns "")
        text = e.ctx.get_help() if e.ctx is not None else ""
        if text:
            typer.echo(text)
        sys.exit(2)
    except ClickException as e:  # usage errors: unknown option, missing argument, value of the wrong type
        _error(" ".join(e.format_message().split()) + " (see --help)")
    except Abort:
        sys.exit(130)
    except QkspectraError as e:
        _error(str(e))
    except OSError as e:  # paths the system refuses outright: names too long, symbolic link loops
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
    if status not in (0, None):
        sys.exit(status)


def _error(message: str) -> None:
    typer.echo(f"qkspectra: error: {message}", err=True)
    sys.exit(2)
