"""What the front page and the manual say exists does exist, and they hold together.

README.md and docs/ (docs/method/ included): every command and option they name exists; every key of
analysis.json is documented in docs/outputs.md, and every key documented there exists; every relative
link resolves (a file, and a heading for a #fragment); the front page stays a front page.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import typer

from qkspectra.cli import _register
from qkspectra.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
DOCS = "\n".join(page.read_text() for page in PAGES)
OUTPUTS = (ROOT / "docs" / "outputs.md").read_text()
COMMAND_LINE = re.compile(r"(?:^ {4}|`)qkspectra ([a-z]+)([^`\n]*)", re.M)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")


def command_options() -> dict[str, set[str]]:
    """Each command's option spellings (--out, -o, ...)."""
    _register()
    group = typer.main.get_command(app)
    return {name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            for name, command in group.commands.items()}


def test_every_command_and_option_the_docs_name_exists():
    options = command_options()
    inherited = {"run": options["extract"], "sweep": options["run"] | options["extract"]}  # "every ... option of"
    named = COMMAND_LINE.findall(DOCS)
    assert len(named) > 10
    assert {command for command, _ in named} == set(options), "every command is documented"
    for command, rest in named:
        assert command in options, f"the docs name `qkspectra {command}`, which does not exist"
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest):
            assert flag in options[command] | inherited.get(command, set()), f"docs: `qkspectra {command} {flag}` does not exist"


def analysis_json_table() -> dict[str, set[str]]:
    """docs/outputs.md's table of analysis.json: per top-level key, the second-level names it documents.

    A row's first cell names keys in backticks: `top.key...`, or `.key` continuing the row's first name."""
    section = OUTPUTS[OUTPUTS.index("## The analysis JSON"):]
    section = section[:section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    documented: dict[str, set[str]] = {}
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        top = re.split(r"[.\[]", names[0])[0]
        for name in names:
            full = top + name if name.startswith(".") else name
            head, _, rest = full.partition(".")
            documented.setdefault(head, set())
            if rest:
                documented[head].add(re.split(r"[.\[]", rest)[0])
    return documented


def golden_document() -> dict:
    from qkspectra.analysis.document import AnalysisOptions, build_analysis_document
    from qkspectra.geometry import load_geometry

    geometry = load_geometry(Path(__file__).parent / "data" / "golden" / "minilm_like.json")
    return build_analysis_document(geometry, AnalysisOptions(nulls=None, bootstrap=None))


ADDED_BY_OTHER_RUNS = {"null", "bootstrap", "operator", "rank_k", "functional"}  # with --null, a factors file, run


def test_every_key_of_analysis_json_is_documented_and_every_documented_key_exists():
    document = golden_document()
    documented = analysis_json_table()
    assert set(documented) == set(document) | ADDED_BY_OTHER_RUNS, "top-level keys: written vs documented"
    fixed = {"input", "anchor", "shape_invariance", "rescale", "entropy", "cross_head", "verdict"}  # not keyed by strategy
    for top in fixed:
        written = set(document[top]) - {"reason"}  # "null where a figure is undefined, with a reason"
        assert written == documented[top], f"analysis.json {top}: written {sorted(written)}, documented {sorted(documented[top])}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
        if fragment and file.suffix == ".md":
            assert fragment in anchors(file), f"{page.relative_to(ROOT)}: link to {target}: no such heading"


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines: move detail to docs/"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 300]
    assert not long, f"README.md lines over 300 characters: {long}"
    text = "\n".join(lines)
    for command in ("make run", "make test"):  # the two commands for a new user
        assert f"    {command}" in text
    assert "![The evidence behind the verdict on MiniLM](docs/evidence.png)" in "\n".join(lines[:40])
