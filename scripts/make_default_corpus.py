"""Generate ``src/qkspectra/data/default_corpus.txt``: English prose from the standard library's docstrings.

The default corpus must exist offline on every machine and never change, so it is generated
once by this script and committed as package data. Source: the docstrings (module, class and
function) of the public pure-Python modules of the running interpreter's standard library, read
with ``ast`` (nothing is imported or executed), files in sorted path order. Each docstring is cut
into paragraphs at blank lines; a paragraph is kept only if it reads as prose:

- no doctest lines (``>>>``, ``...``), no indented or literal blocks (``::``), no tables or rules
  (``|``, ``+--``, ``===``, ``---``, runs of spaces inside a line), no bullet or field lists;
- at least 12 words, starting with a capital letter and ending with a full stop;
- few code-like characters (``_ = ( ) [ ] { } < > * \\ ` # @ $``) and mostly letters.

Kept paragraphs are re-flowed onto one line each (so ``--window-per-line`` sees one paragraph
per window), deduplicated, and separated by blank lines, until the file reaches the size cap.

Usage: python scripts/make_default_corpus.py [--out PATH] [--max-bytes N]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "qkspectra" / "data" / "default_corpus.txt"

# Folders of the standard library that hold tests, tools, vendored or generated code.
SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "lib2to3",
                 "ensurepip", "turtledemo", "pydoc_data", "__pycache__", "idlelib"}
CODE_CHARACTERS = set("_=()[]{}<>*\\`#@$|")
MIN_WORDS = 12
MAX_CODE_CHARACTER_FRACTION = 0.02
MIN_LETTER_FRACTION = 0.75


def stdlib_sources(stdlib: Path) -> Iterator[Path]:
    """Public modules of the standard library, in sorted path order."""
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if any(part in SKIPPED_PARTS or part.startswith("_") for part in relative.parts[:-1]):
            continue
        if relative.name.startswith("_") and relative.name != "__init__.py":
            continue
        yield path


def docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def is_prose(paragraph_lines: list[str]) -> bool:
    """Whether one docstring paragraph (its raw lines) reads as English prose, not code or markup."""
    if any(line != line.lstrip() for line in paragraph_lines):  # indented: code, list or literal block
        return False
    text = " ".join(line.strip() for line in paragraph_lines)
    if text.startswith((">>>", "...", "-", "*", "+", ":", "..", "#")) or "::" in text or ">>>" in text:
        return False
    if re.search(r"(===|---|\+--|\|)", text) or any("  " in line.strip() for line in paragraph_lines):
        return False
    if re.match(r"^(\w+\s*:|\d+[.)])", text):  # field lists ("Args:", "name: ...") and numbered lists
        return False
    words = text.split()
    if len(words) < MIN_WORDS or not text[0].isupper() or not text.endswith("."):
        return False
    if sum(c in CODE_CHARACTERS for c in text) > MAX_CODE_CHARACTER_FRACTION * len(text):
        return False
    letters = sum(c.isalpha() for c in text)
    return letters >= MIN_LETTER_FRACTION * sum(not c.isspace() for c in text)


def prose_paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of one docstring, each re-flowed onto one line."""
    for block in re.split(r"\n\s*\n", doc):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if lines and is_prose(lines):
            yield " ".join(line.strip() for line in lines)


def build_corpus(stdlib: Path, max_bytes: int) -> str:
    seen: set[str] = set()
    paragraphs: list[str] = []
    size = 0
    for path in stdlib_sources(stdlib):
        for doc in docstrings(path.read_text(encoding="utf-8", errors="replace")):
            for paragraph in prose_paragraphs(doc):
                if paragraph in seen:
                    continue
                cost = len(paragraph.encode("utf-8")) + 2
                if size + cost > max_bytes:
                    return "\n\n".join(paragraphs) + "\n"
                seen.add(paragraph)
                paragraphs.append(paragraph)
                size += cost
    return "\n\n".join(paragraphs) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-bytes", type=int, default=560_000)
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = build_corpus(stdlib, args.max_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text.encode())} bytes, {text.count(chr(10) * 2) + 1} paragraphs "
          f"from the Python {sys.version_info.major}.{sys.version_info.minor} standard library")


if __name__ == "__main__":
    main()
