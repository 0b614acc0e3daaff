"""Analysing a JSON file (``analyze``, and ``run`` on a geometry without writing) needs numpy alone: no torch,
transformers, scipy or matplotlib."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "data" / "golden" / "minilm_like.json"
HEAVY = ("torch", "transformers", "scipy", "matplotlib", "safetensors")

SCRIPT = f"""
import sys
for name in {HEAVY!r}:
    sys.modules[name] = None  # any import of these now fails
from qkspectra.cli import main
main(["analyze", sys.argv[1], "--anchor", "all", "--quiet"])
import qkspectra
qkspectra.analyze(qkspectra.load_geometry(sys.argv[1]), "best")
qkspectra.analyze(sys.argv[1], "best")  # a path
result = qkspectra.run(sys.argv[1], null_draws=5)  # the analysis part of a run, nothing written
assert result.verdict.layers["functional"].code == "n/a"
"""


def test_analyze_runs_without_torch_scipy_or_matplotlib():
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(GOLDEN)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
