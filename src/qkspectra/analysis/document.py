"""From a geometry to the whole analysis document (``analysis.json``).

``analyze`` with one strategy gives the seed's figures; ``build_analysis_document``
gives every anchor strategy side by side plus whatever goes beyond the seed: null
baselines, bootstrap intervals, the operator-level and functional results when given,
and the layered verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qkspectra.analysis.seed import Analysis, analyze_all
from qkspectra.analysis.bootstrap import BootstrapOptions, BootstrapResult, bootstrap_correlations
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry
from qkspectra.analysis.nulls import NullBaseline, NullOptions, null_baselines
from qkspectra.analysis.results import result_document
from qkspectra.analysis.verdict import LayeredVerdict, layered_verdict

NO_FACTORS = "no factors file beside the geometry"
NO_FUNCTIONAL = "functional test not run"


def operator_missing_reason(geometry: Geometry) -> str:
    """Why the operator layer is n/a when no factors were given."""
    from qkspectra.analysis.operator_fit import factors_path_for

    path = factors_path_for(geometry)
    if path is not None and path.is_file():
        return f"operator test not requested (the factors file {path.name} is beside the geometry)"
    return NO_FACTORS


def operator_sections(geometry: Geometry, analyses: dict[str, Analysis], *, map: Any = None) -> tuple[dict | None, dict | None, str]:
    """The ``operator`` and ``rank_k`` sections from the factors file beside the geometry.

    Returns (operator, rank_k, reason): both None, with the reason, when there is no factors
    file or safetensors (the ``models`` extra) is not installed. map: how the layer-pair fits
    run (see ``operator.OperatorFitter``).
    """
    from qkspectra.analysis.operator_fit import factors_path_for

    path = factors_path_for(geometry)
    if path is not None and path.exists() and not path.is_file():
        raise QkspectraError(f"{path}: the geometry names this as its factors file, but it is not a file")
    if path is None or not path.is_file():
        return None, None, NO_FACTORS
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return None, None, f"reading {path.name} needs safetensors (pip install 'qkspectra[models]')"
    from qkspectra.analysis.operator_fit import OperatorFitter, load_factors, operator_evidence
    from qkspectra.analysis.rank_k import rank_k_evidence

    anchors = {name: a.anchor for name, a in analyses.items()}
    fitter = OperatorFitter(load_factors(path, geometry), map=map)
    operator = operator_evidence(fitter.factors, anchors, fitter=fitter)
    return operator, rank_k_evidence(geometry, anchors, fitter=fitter), ""


@dataclass(frozen=True)
class BeyondSeed:
    """What goes beyond the seed's figures. nulls and bootstrap are None when not computed."""

    nulls: dict[str, NullBaseline] | None
    bootstrap: BootstrapResult | None
    verdict: LayeredVerdict


def beyond_seed(
    analyses: dict[str, Analysis],
    primary: str,
    *,
    nulls: NullOptions | None = NullOptions(),
    bootstrap: BootstrapOptions | None = BootstrapOptions(),
    operator: dict[str, Any] | None = None,
    functional: dict[str, Any] | None = None,
    operator_missing: str = NO_FACTORS,
    functional_missing: str = NO_FUNCTIONAL,
) -> BeyondSeed:
    """Null baselines and bootstrap intervals for ``analyses`` (None options: skipped) and the layered verdict."""
    geometry = analyses[primary].geometry
    null_results = None if nulls is None else null_baselines(geometry, analyses, nulls)
    intervals = None if bootstrap is None else bootstrap_correlations(analyses, bootstrap)
    verdict = layered_verdict(
        analyses[primary],
        null_results,
        operator,
        functional,
        strategy=primary,
        operator_missing=operator_missing,
        functional_missing=functional_missing,
    )
    return BeyondSeed(null_results, intervals, verdict)


def build_analysis_document(
    geometry: Geometry,
    *,
    groups: int | None = None,
    nulls: NullOptions | bool = True,
    bootstrap: BootstrapOptions | bool = True,
    factors: Any = None,
    fitter: Any = None,
    rank_k: dict[str, Any] | None = None,
    functional: dict[str, Any] | None = None,
    functional_missing: str = NO_FUNCTIONAL,
    analyses: dict[str, Analysis] | None = None,
) -> dict[str, Any]:
    """Every anchor strategy; the top level carries the seed's default (last) anchor.

    nulls, bootstrap: True for the defaults, options, or False to skip.
    factors: the per-head factors for the operator-level tests (``operator.Factors``, a
        ``.factors.safetensors`` path such as ``operator.factors_path_for(geometry)``, or a
        dict of arrays): the operator fits go under ``operator`` and, unless ``rank_k`` is
        given, the rank-k corrections under ``rank_k`` (one fitter for both). None: neither.
    fitter: an ``operator.OperatorFitter`` on those factors that has already fitted layer pairs
        (e.g. for a ``rank_k`` computed beforehand), reused instead of fitting again.
    rank_k, functional: results computed elsewhere, merged into the document under those
        keys; functional also feeds the layered verdict (n/a with ``functional_missing``
        when absent).
    analyses: ``analyze_all(geometry, groups=groups)`` when the caller has it already.
    """
    if analyses is None:
        analyses = analyze_all(geometry, groups=groups)
    operator = None
    if factors is not None:
        from qkspectra.analysis.operator_fit import OperatorFitter, as_factors, operator_evidence
        from qkspectra.analysis.rank_k import rank_k_evidence

        anchors = {name: a.anchor for name, a in analyses.items()}
        if fitter is None:
            fitter = OperatorFitter(as_factors(factors, geometry))
        operator = operator_evidence(fitter.factors, anchors, fitter=fitter)
        if rank_k is None:
            rank_k = rank_k_evidence(geometry, anchors, fitter=fitter)
    null_options = NullOptions() if nulls is True else nulls or None
    bootstrap_options = BootstrapOptions() if bootstrap is True else bootstrap or None
    extra = beyond_seed(
        analyses,
        "last",
        nulls=null_options,
        bootstrap=bootstrap_options,
        operator=operator,
        functional=functional,
        operator_missing=operator_missing_reason(geometry),
        functional_missing=functional_missing,
    )
    doc = result_document(analyses, "last", nulls=extra.nulls, bootstrap=extra.bootstrap, verdict=extra.verdict)
    for key, value in (("operator", operator), ("rank_k", rank_k), ("functional", functional)):
        if value is not None:
            doc[key] = value
    return doc
