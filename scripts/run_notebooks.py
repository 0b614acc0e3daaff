"""Execute the example notebooks headless and save them with their outputs.

    python scripts/run_notebooks.py [examples/NAME.ipynb ...]   # default: every notebook of examples/

Each notebook runs in an empty temporary folder (what it writes stays there) and is saved back with
the outputs a reader should see: the results, tables and figures, without the progress bars and
warnings on stderr (their rates and timings change from run to run) and without timing metadata.
tests/test_notebook.py executes them again and checks the saved outputs are current (``comparable``).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def execute(path: Path, folder: Path | None = None) -> nbformat.NotebookNode:
    """The notebook at ``path`` executed in ``folder`` (a new temporary folder by default), its outputs as
    they are saved. The kernel imports this checkout's qkspectra and runs numpy on one BLAS thread."""
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="qkspectra-notebook-") as temporary:
        where = Path(folder or temporary)
        NotebookClient(notebook, timeout=1200, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(where)}}).execute(env=env)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [output for output in cell.outputs if not (output.output_type == "stream" and output.name == "stderr")]
            cell.metadata.pop("execution", None)
    return notebook


NUMBER = re.compile(r"-?\d+\.\d+(?:e[+-]?\d+)?")


def rounded(text: str) -> str:
    """The text with every decimal number to 3 significant digits and memory addresses blanked."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x…", text)
    return NUMBER.sub(lambda match: f"{float(match.group()):.3g}", text)


def comparable(notebook: nbformat.NotebookNode) -> list[list[tuple[str, str]]]:
    """Per code cell, its outputs as (kind, text): text/plain results and stdout, numbers rounded; other
    kinds of output (figures, HTML) by their MIME types alone."""
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            if output.output_type == "stream":
                outputs.append((output.name, rounded(output.text)))
            elif output.output_type in ("execute_result", "display_data"):
                outputs.append(("text/plain", rounded(output.data.get("text/plain", ""))))
                outputs.append(("types", " ".join(sorted(output.data))))
            else:
                outputs.append((output.output_type, output.get("ename", "")))
        cells.append(outputs)
    return cells


def main(argv: list[str]) -> int:
    for path in [Path(arg).resolve() for arg in argv] or NOTEBOOKS:
        notebook = execute(path)
        errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
                  if output.output_type == "error"]
        if errors:
            print(f"{path.relative_to(ROOT)}: {errors[0].ename}: {errors[0].evalue}", file=sys.stderr)
            return 1
        nbformat.write(notebook, path)
        print(f"{path.relative_to(ROOT)}: executed and saved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
