"""The one exception type users see: a one-line message, exit status 2.

Messages name the user's options as the user spells them: ``option("seq_len")`` is ``seq_len``
(the Python argument) by default and ``--seq-len`` while the command line runs
(``command_line_spelling()``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_COMMAND_LINE = contextvars.ContextVar("qkspectra_command_line", default=False)


class QkspectraError(Exception):
    """Bad input or an unsupported request.

    The message is one line that says what is wrong and where (file, JSON
    path, layer, head). The command line prints it to stderr and exits 2.
    """


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
