"""qkspectra: test the annealing-schedule hypothesis on transformer attention heads.

    >>> import qkspectra
    >>> g = qkspectra.load_geometry("geometry.json")
    >>> result = qkspectra.analyze(g, anchor="best")   # an Analysis (analyze_all: every strategy)
    >>> result.rescale.T            # (L, H) temperatures
    >>> run = qkspectra.run("minilm")  # or a transformers model in memory, with its tokenizer, or a geometry
    >>> run.verdict.overall, run.heads()
    >>> run.save("minilm-run"); qkspectra.load_run("minilm-run") == run.save("minilm-run")

Analysis needs numpy alone; extraction from models (``extract_geometry``, ``run``) needs
the ``models`` extra (torch, transformers); the tables (``heads()``, ``layers()``, ...) pandas,
the ``notebook`` extra. docs/python.md describes the API, docs/tables.md the tables' columns.
"""

from qkspectra.analysis.seed import Analysis
from qkspectra.api import analyze, analyze_all, extract_geometry, run
from qkspectra.errors import QkspectraError, QkspectraTypeError
from qkspectra.geometry import Geometry, load_geometry, parse_geometry
from qkspectra.runs import RunResult, Sweep, load_run, load_sweep
from qkspectra.version import __version__

__all__ = [
    "Analysis", "Geometry", "QkspectraError", "QkspectraTypeError", "RunResult", "Sweep", "analyze", "analyze_all",
    "extract_geometry", "load_geometry", "load_run", "load_sweep", "parse_geometry", "run", "__version__",
]
