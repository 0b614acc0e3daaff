"""The analysis document (``analysis.json``): every figure of a geometry, gathered in one place.

``gather_evidence`` is the one path from a geometry's analyses to the evidence and its
document; ``build_analysis_document`` is that path for every anchor strategy, with the seed's
default (last) anchor as the primary one. ``run``, ``analyze``, the Python API and ``sweep``
all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qkspectra.analysis.bootstrap import BootstrapOptions, BootstrapResult, bootstrap_correlations
from qkspectra.analysis.entropy_links import (
    TEMPERATURE_STRATEGIES,
    LinkOptions,
    context_fits,
    entropy_targets,
    link_table,
    spectrum_descriptors,
)
from qkspectra.analysis.nulls import NullBaseline, NullOptions, null_baselines
from qkspectra.analysis.results import context_dict, descriptors_dict, result_document
from qkspectra.analysis.seed import Analysis, analyze, analyze_all
from qkspectra.analysis.verdict import LayeredVerdict, layered_verdict
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry

NO_FACTORS = "no factors file beside the geometry"
NO_FUNCTIONAL = "functional test not run"


@dataclass(frozen=True)
class AnalysisOptions:
    """How a geometry is analysed beyond the seed's figures (None: that part is skipped)."""

    groups: int | None = None  # layer groups of the group anchor; None: round(sqrt(layers))
    nulls: NullOptions | None = NullOptions()
    bootstrap: BootstrapOptions | None = BootstrapOptions()
    entropy_links: LinkOptions | None = LinkOptions()  # the descriptors table and the context fits


@dataclass(frozen=True)
class Evidence:
    """Everything known about a geometry: the seed's analyses and what goes beyond them."""

    analyses: dict[str, Analysis]  # anchor strategy -> the seed's figures
    primary: str  # the strategy the top level of the document and the verdict's spectral layers carry
    nulls: dict[str, NullBaseline] | None
    bootstrap: BootstrapResult | None
    verdict: LayeredVerdict
    operator: dict[str, Any] | None = None
    rank_k: dict[str, Any] | None = None
    functional: dict[str, Any] | None = None
    descriptors: dict[str, Any] | None = None
    context: dict[str, Any] | None = None

    def document(self) -> dict[str, Any]:
        """The JSON-ready document (``analysis.json``)."""
        doc = result_document(self.analyses, self.primary, nulls=self.nulls, bootstrap=self.bootstrap, verdict=self.verdict)
        for key, value in (("descriptors", self.descriptors), ("context", self.context), ("operator", self.operator),
                           ("rank_k", self.rank_k), ("functional", self.functional)):
            if value is not None:
                doc[key] = value
        return doc


def operator_missing_reason(geometry: Geometry) -> str:
    """Why the operator layer is n/a when no factors were given."""
    from qkspectra.analysis.factors import factors_path_for

    path = factors_path_for(geometry)
    if path is not None and path.is_file():
        return f"operator test not requested (the factors file {path.name} is beside the geometry)"
    return NO_FACTORS


def entropy_link_sections(
    geometry: Geometry, analyses: dict[str, Analysis], options: LinkOptions, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``descriptors`` and ``context`` of the document (see ``entropy_links``).

    T_last, T_middle, T_best come from ``analyses``; a strategy missing there is analysed here.
    """
    descriptors = spectrum_descriptors(geometry.singular_values)  # name -> (L, H)
    for name in TEMPERATURE_STRATEGIES:
        a = analyses[name] if name in analyses else analyze(geometry, name)
        descriptors[f"T_{name}"] = a.rescale.T
    table = link_table(descriptors, entropy_targets(geometry), options, seed)
    pairs = geometry.num_layers * geometry.num_heads
    return descriptors_dict(table, options, seed, pairs), context_dict(context_fits(geometry))


def fitter_beside(geometry: Geometry, *, map: Any = None):
    """(an ``OperatorFitter`` on the factors file beside the geometry, or None, and why it is None).

    None when there is no factors file or safetensors (the ``models`` extra) is not installed.
    map: how the layer-pair fits run (see ``operator_fit.OperatorFitter``).
    """
    from qkspectra.analysis.factors import factors_path_for

    path = factors_path_for(geometry)
    if path is not None and path.exists() and not path.is_file():
        raise QkspectraError(f"{path}: the geometry names this as its factors file, but it is not a file")
    if path is None or not path.is_file():
        return None, NO_FACTORS
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return None, f"reading {path.name} needs safetensors (pip install 'qkspectra[models]')"
    from qkspectra.analysis.factors import load_factors
    from qkspectra.analysis.operator_fit import OperatorFitter

    return OperatorFitter(load_factors(path, geometry), map=map), ""


def gather_evidence(
    geometry: Geometry,
    analyses: dict[str, Analysis],
    primary: str,
    options: AnalysisOptions = AnalysisOptions(),
    *,
    fitter: Any = None,
    rank_k: dict[str, Any] | None = None,
    functional: dict[str, Any] | None = None,
    operator_missing: str | None = None,
    functional_missing: str = NO_FUNCTIONAL,
) -> Evidence:
    """The evidence on ``geometry`` beyond the seed's ``analyses``, and the layered verdict.

    fitter: an ``operator_fit.OperatorFitter`` on the geometry's factors (it may have fitted layer
        pairs already): the operator fits and, unless ``rank_k`` is given, the rank-k corrections.
        None: neither, and the operator layer is n/a with ``operator_missing`` (default: why).
    rank_k, functional: results computed elsewhere; functional also feeds the layered verdict
        (n/a with ``functional_missing`` when absent).
    """
    operator = None
    if fitter is not None:
        from qkspectra.analysis.operator_fit import operator_evidence
        from qkspectra.analysis.rank_k import rank_k_evidence

        anchors = {name: a.anchor for name, a in analyses.items()}
        operator = operator_evidence(fitter.factors, anchors, fitter=fitter)
        if rank_k is None:
            rank_k = rank_k_evidence(geometry, anchors, fitter=fitter)
    if operator_missing is None:
        operator_missing = operator_missing_reason(geometry)
    nulls = None if options.nulls is None else null_baselines(geometry, analyses, options.nulls)
    intervals = None if options.bootstrap is None else bootstrap_correlations(analyses, options.bootstrap)
    descriptors = context = None
    if options.entropy_links is not None:
        seed = options.entropy_links.seed
        if seed is None:
            seed = 0 if options.bootstrap is None else options.bootstrap.seed
        descriptors, context = entropy_link_sections(geometry, analyses, options.entropy_links, seed)
    verdict = layered_verdict(
        analyses[primary], nulls, operator, functional, strategy=primary,
        operator_missing=operator_missing, functional_missing=functional_missing,
    )
    return Evidence(analyses, primary, nulls, intervals, verdict, operator, rank_k, functional, descriptors, context)


def build_analysis_document(
    geometry: Geometry,
    options: AnalysisOptions = AnalysisOptions(),
    *,
    factors: Any = None,
    fitter: Any = None,
    rank_k: dict[str, Any] | None = None,
    functional: dict[str, Any] | None = None,
    analyses: dict[str, Analysis] | None = None,
    functional_missing: str = NO_FUNCTIONAL,
) -> dict[str, Any]:
    """Every anchor strategy side by side; the top level carries the seed's default (last) anchor.

    factors: the per-head factors for the operator-level tests (``factors.Factors``, a
        ``.factors.safetensors`` path such as ``factors.factors_path_for(geometry)``, or a dict of
        arrays), or ``fitter``, an ``OperatorFitter`` on them that may have fitted layer pairs
        already. Neither: no operator or rank-k sections.
    analyses: ``analyze_all(geometry, groups=options.groups)`` when the caller has it already.
    functional_missing: why the functional layer is n/a when ``functional`` is None.
    """
    if analyses is None:
        analyses = analyze_all(geometry, groups=options.groups)
    if fitter is None and factors is not None:
        from qkspectra.analysis.factors import as_factors
        from qkspectra.analysis.operator_fit import OperatorFitter

        fitter = OperatorFitter(as_factors(factors, geometry))
    evidence = gather_evidence(geometry, analyses, "last", options, fitter=fitter, rank_k=rank_k, functional=functional,
                               functional_missing=functional_missing)
    return evidence.document()
