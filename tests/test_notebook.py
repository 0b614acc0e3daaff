"""The example notebooks (examples/*.ipynb): one thing per cell, saved with their outputs, and those outputs current.

examples/quickstart.ipynb teaches docs/python.md's "From Python" block (its lines are the notebook's, in
order) and the README's ten lines of Python are lines of it, in order. The fast tests read the saved
notebooks; the slow one executes them headless (scripts/run_notebooks.py, which also saves them) and
compares what they show now with what was saved, numbers to 3 significant digits.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.ipynb"
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
IDS = [path.name for path in NOTEBOOKS]
NO_RESULT = {"print": "stdout", "shutil.rmtree": None}  # calls that show no value: what they show instead
MACHINE_PATH = re.compile(r"(/tmp/|/home/|/root/|/usr/|/opt/|/Users/|site-packages|[A-Z]:\\\\)")


def runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_lines(page: str) -> list[str]:
    """The non-blank lines of the first ```python block of the page's "From Python" section."""
    section = (ROOT / page).read_text().split("## From Python", 1)[1]
    block = section.split("```python\n", 1)[1].split("```\n", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def code_cells(path: Path) -> list:
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def notebook_lines(path: Path = QUICKSTART) -> list[str]:
    return [line for cell in code_cells(path) for line in cell.source.splitlines() if line.strip()]


def is_subsequence(lines: list[str], of: list[str]) -> bool:
    remaining = iter(of)
    return all(line in remaining for line in lines)


def shown_expression(cell) -> ast.expr | None:
    """The cell's one expression statement, its last statement; None for a cell of statements alone."""
    statements = ast.parse(cell.source).body
    expressions = [s for s in statements if isinstance(s, ast.Expr)]
    assert len(expressions) <= 1, f"one expression per cell:\n{cell.source}"
    assert not expressions or statements[-1] is expressions[0], f"the expression ends the cell:\n{cell.source}"
    return expressions[0].value if expressions else None


def output_texts(cell) -> list[str]:
    """What the cell's outputs show as text: streams, and the text/plain and text/html of results."""
    return [output.get("text", "") for output in cell.outputs] + [
        value for output in cell.outputs for kind, value in output.get("data", {}).items() if kind.startswith("text/")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_one_thing_per_cell_with_its_output_saved(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown"
    cells = code_cells(path)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), "run scripts/run_notebooks.py"
    for cell in cells:
        kinds = [output.output_type for output in cell.outputs]
        assert "error" not in kinds and not any(o.get("name") == "stderr" for o in cell.outputs), cell.source
        assert "execution" not in cell.metadata, "no timings saved"
        assert not any(MACHINE_PATH.search(text) for text in output_texts(cell)), f"a path of this machine in:\n{cell.source}"
        expression = shown_expression(cell)
        if expression is None:
            continue
        call = ast.unparse(expression.func) if isinstance(expression, ast.Call) else None
        if call in NO_RESULT:
            assert [o.get("name") for o in cell.outputs] == ([NO_RESULT[call]] if NO_RESULT[call] else []), cell.source
        else:
            assert "execute_result" in kinds, f"no saved output for:\n{cell.source}"


def test_the_quickstart_ends_with_temperature_against_entropy():
    cells = code_cells(QUICKSTART)
    assert ".plot.scatter(" in cells[-1].source and '"entropy"' in cells[-1].source and '"T_' in cells[-1].source
    assert any("image/png" in output.get("data", {}) for output in cells[-1].outputs)
    source = "\n".join(cell.source for cell in cells)
    assert "mean_residual_fitted" in source  # the fitted-layer figures, not the all-layer mean the docs call biased
    assert not re.search(r"\.mean_residual\b|\"mean_residual\"", source)


def test_the_python_page_block_is_the_quickstart_in_brief():
    """docs/python.md's "From Python" block: lines of the quickstart, in its order."""
    assert is_subsequence(python_lines("docs/python.md"), notebook_lines()), \
        "docs/python.md's From Python lines must be the quickstart's, in order"


def test_the_readme_python_is_the_notebook_in_brief():
    """The README's block: lines of the notebook, in its order (a subsequence), about ten of them."""
    lines = python_lines("README.md")
    assert 5 <= len(lines) <= 12
    assert is_subsequence(lines, notebook_lines()), "the README's Python lines must be the notebook's, in order"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_saved_outputs_are_current(path, tmp_path):
    """Executed headless now, the notebook shows what it was saved with (numbers to 3 significant digits,
    figures and tables by kind), and leaves nothing behind in its folder."""
    run_notebooks = runner()
    fresh = run_notebooks.execute(path, tmp_path)
    saved = nbformat.read(path, as_version=4)
    assert [cell.source for cell in fresh.cells] == [cell.source for cell in saved.cells]
    now, then = run_notebooks.comparable(fresh), run_notebooks.comparable(saved)
    for source, shown, expected in zip([c.source for c in fresh.cells if c.cell_type == "code"], now, then):
        assert shown == expected, f"outputs changed (run scripts/run_notebooks.py) in:\n{source}"
    assert list(tmp_path.iterdir()) == []
