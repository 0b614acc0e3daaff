"""The exception type users see: a one-line message, exit status 2.

``QkspectraError`` is a ``ValueError`` (bad input); ``QkspectraTypeError``, a value of the wrong
type or an unknown keyword argument, is both a ``QkspectraError`` and a ``TypeError``, so
``except TypeError`` catches it as Python's own would and the command line still prints it as one line.

Messages name the user's options as the user spells them: ``option("seq_len")`` is ``seq_len``
(the Python argument) by default and ``--seq-len`` while the command line runs
(``command_line_spelling()``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_COMMAND_LINE = contextvars.ContextVar("qkspectra_command_line", default=False)


class QkspectraError(ValueError):
    """Bad input or an unsupported request.

    The message is one line that says what is wrong and where (file, JSON
    path, layer, head). The command line prints it to stderr and exits 2.
    """


class QkspectraTypeError(QkspectraError, TypeError):
    """A value of the wrong type, or a keyword argument that does not exist (as Python's own TypeError)."""


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """' did you mean 'X'?' for the closest of ``known`` to ``name`` (difflib), or ''."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


def unknown_option(function: str, name: str, known: list[str] | tuple[str, ...]) -> QkspectraTypeError:
    """The error for ``function(name=...)`` when ``name`` is none of ``known``: the closest match and the full list."""
    return QkspectraTypeError(f"{function}() has no option {name!r};{did_you_mean(name, known)} "
                              f"its options: {', '.join(known)}")


def option(name: str) -> str:
    """The option ``name`` (a Python argument name such as ``seq_len``) as the user wrote it."""
    return "--" + name.replace("_", "-") if _COMMAND_LINE.get() else name


@contextlib.contextmanager
def command_line_spelling() -> Iterator[None]:
    """Within this block, messages name options as command-line flags (``--seq-len``)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
