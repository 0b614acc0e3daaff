"""Analysis of a geometry: the seed's experiments and everything that tests them.

``seed`` (the three experiments), ``nulls``, ``bootstrap``, ``factors`` (the per-head factors),
``operator_fit``, ``rank_k``, ``reconstruction`` (the functional test), ``entropy_links`` (what goes
with a head's entropy, and its entropy against context length), ``verdict``, ``results``
(figures as JSON) and ``document`` (``analysis.json``, built in one place).
"""

from qkspectra.analysis.seed import Analysis, analyze, analyze_all

__all__ = ["Analysis", "analyze", "analyze_all"]
