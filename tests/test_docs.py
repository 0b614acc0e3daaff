"""What the README says exists does exist: its commands and their options, and the keys of analysis.json."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from qkspectra.cli import _register
from qkspectra.cli.app import app

README = (Path(__file__).parents[1] / "README.md").read_text()
COMMAND_LINE = re.compile(r"(?:^ {4}|`)qkspectra ([a-z]+)([^`\n]*)", re.M)


def command_options() -> dict[str, set[str]]:
    """Each command's option spellings (--out, -o, ...)."""
    _register()
    group = typer.main.get_command(app)
    return {name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            for name, command in group.commands.items()}


def test_every_command_and_option_the_readme_names_exists():
    options = command_options()
    inherited = {"run": options["extract"], "sweep": options["run"] | options["extract"]}  # "every ... option of"
    named = COMMAND_LINE.findall(README)
    assert len(named) > 10
    for command, rest in named:
        assert command in options, f"README names `qkspectra {command}`, which does not exist"
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest):
            assert flag in options[command] | inherited.get(command, set()), f"README: `qkspectra {command} {flag}` does not exist"


def test_every_top_level_key_of_analysis_json_is_documented():
    from qkspectra.analysis.document import AnalysisOptions, build_analysis_document
    from qkspectra.geometry import load_geometry

    geometry = load_geometry(Path(__file__).parent / "data" / "golden" / "minilm_like.json")
    document = build_analysis_document(geometry, AnalysisOptions(nulls=None, bootstrap=None))
    keys = set(document) | {"null", "bootstrap", "operator", "rank_k", "functional"}  # what other runs add
    section = README[README.index("## The analysis JSON"):README.index("## What the numbers mean")]
    for key in keys:
        assert re.search(rf"`{re.escape(key)}[`.\[]", section), f"analysis.json key {key!r} is not in the README's table"
