"""qkspectra: test the annealing-schedule hypothesis on transformer attention heads.

    >>> import qkspectra
    >>> g = qkspectra.load_geometry("geometry.json")
    >>> result = qkspectra.analyze(g, anchor="best")
    >>> result.rescale.T            # (L, H) temperatures
    >>> result.verdict_text
    >>> run = qkspectra.run("minilm")  # or a transformers model in memory, with its tokenizer
    >>> run.verdict.overall

Analysis needs numpy alone; extraction from models (``extract_geometry``, ``run``) needs
the ``models`` extra (torch, transformers).
"""

from qkspectra.analysis.seed import Analysis, analyze, analyze_all
from qkspectra.api import RunResult, extract_geometry, run
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry, load_geometry, parse_geometry
from qkspectra.version import __version__

__all__ = [
    "Analysis", "Geometry", "QkspectraError", "RunResult", "analyze", "analyze_all", "extract_geometry", "load_geometry",
    "parse_geometry", "run", "__version__",
]
