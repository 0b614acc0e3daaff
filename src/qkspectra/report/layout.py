"""The layout pages are made of: paragraphs, tables and plots in sections, every number already text.

Laid out once (``sections`` for a run, ``sweep_page`` for a sweep), typeset by ``typeset``
as HTML, Markdown or terminal text, so that every form carries the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Paragraph:
    text: str
    style: str | None = None  # "verdict-supported" | "verdict-partial" | "verdict-rejected" | "note" | None


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]  # (C,)
    rows: tuple[tuple[str, ...], ...]  # (R, C)


@dataclass(frozen=True)
class Plot:
    name: str  # file stem under plots/
    caption: str


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Paragraph | Table | Plot, ...]
    anchor: str = field(default="")


def fmt(x: Any, digits: int = 4, *, signed: bool = False) -> str:
    """A figure for the report: n/a for None, fixed decimals for floats."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return format(x, f"{'+' if signed else ''}.{digits}f")
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits, signed=signed) for v in x)
    return str(x)
