"""From a geometry to the whole analysis document (``analysis.json``).

``analyze`` with one strategy gives the seed's figures; ``build_analysis_document``
gives every anchor strategy side by side plus whatever goes beyond the seed.
"""

from __future__ import annotations

from typing import Any

from qkspectra.analysis import analyze_all
from qkspectra.geometry import Geometry
from qkspectra.results import result_document


def build_analysis_document(geometry: Geometry, *, groups: int | None = None) -> dict[str, Any]:
    """Every anchor strategy; the top level carries the seed's default (last) anchor."""
    return result_document(analyze_all(geometry, groups=groups), "last")
