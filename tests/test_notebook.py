"""examples/quickstart.ipynb: the README's Python section as a notebook, committed without outputs, run headless."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def readme_python_lines() -> list[str]:
    """The non-blank lines of the first ```python block of the README's "From Python" section."""
    section = (ROOT / "README.md").read_text().split("## From Python", 1)[1]
    block = section.split("```python\n", 1)[1].split("```\n", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_notebook_is_the_readme_section_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    lines = [line for cell in code for line in cell.source.splitlines() if line.strip()]
    assert lines == readme_python_lines()
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


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
