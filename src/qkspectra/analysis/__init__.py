"""Analysis of a geometry: the seed's experiments and everything that tests them.

``seed`` (the three experiments), ``nulls``, ``bootstrap``, ``operator_fit``, ``rank_k``,
``reconstruction`` (the functional test), ``verdict`` and ``document`` (``analysis.json``).
"""

from qkspectra.analysis.seed import Analysis, analyze, analyze_all

__all__ = ["Analysis", "analyze", "analyze_all"]
