"""The ``qkspectra`` command line: parses arguments, calls the library, prints.

Each command lives in its own module and registers itself on ``app`` (``cli.app``); no maths here.
"""

from __future__ import annotations

import sys

import typer

from qkspectra.cli.app import app
from qkspectra.errors import QkspectraError, command_line_spelling


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
        _error(str(e), getattr(e, "exit_status", 2))
    except OSError as e:  # paths the system refuses outright: names too long, symbolic link loops
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
    if status not in (0, None):
        sys.exit(status)


def _error(message: str, status: int = 2) -> None:
    typer.echo(f"qkspectra: error: {message}", err=True)
    sys.exit(status)
