"""examples/quickstart.ipynb: docs/python.md's "From Python" section as a notebook, committed without outputs, run headless;
the README's ten lines of Python are lines of it, in its order."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def python_lines(page: str) -> list[str]:
    """The non-blank lines of the first ```python block of the page's "From Python" section."""
    section = (ROOT / page).read_text().split("## From Python", 1)[1]
    block = section.split("```python\n", 1)[1].split("```\n", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def notebook_lines() -> list[str]:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    return [line for cell in notebook.cells if cell.cell_type == "code" for line in cell.source.splitlines() if line.strip()]


def test_the_notebook_is_the_python_page_section_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert notebook_lines() == python_lines("docs/python.md")
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_the_readme_python_is_the_notebook_in_brief():
    """The README's block: lines of the notebook, in its order (a subsequence), about ten of them."""
    lines, remaining = python_lines("README.md"), iter(notebook_lines())
    assert 5 <= len(lines) <= 12
    assert all(line in remaining for line in lines), "the README's Python lines must be the notebook's, in order"


@pytest.mark.slow
def test_the_notebook_runs_headless(tmp_path):
    from nbclient import NotebookClient

    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    notebook = nbformat.read(copy, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    html = [output.data["text/html"] for output in outputs if "text/html" in output.get("data", {})]
    assert any("Overall: " in page and "Anchor strategies side by side" in page for page in html)  # the run's display
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the schedule figure
    assert sorted(p.name for p in tmp_path.iterdir()) == [NOTEBOOK.name]  # nothing written beside it
