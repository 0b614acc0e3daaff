"""Analysis results as JSON-ready dicts (full precision; None where a figure is undefined)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qkspectra.version import __version__
from qkspectra.analysis.seed import NO_FITTED_LAYER, Analysis, Correlation
from qkspectra.analysis.bootstrap import BootstrapResult, Interval
from qkspectra.analysis.entropy_links import CONFIDENCE as LINK_CONFIDENCE
from qkspectra.analysis.entropy_links import METHOD as LINK_METHOD
from qkspectra.analysis.entropy_links import ContextFit, Link, LinkOptions
from qkspectra.analysis.nulls import NullBaseline
from qkspectra.analysis.verdict import LayeredVerdict
from qkspectra.geometry import Geometry

SCHEMA_VERSION = 1


def _stats(x: np.ndarray | None) -> dict[str, float | None]:
    if x is None:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def _corr(c: Correlation | None, field: str) -> float | None:
    return None if c is None else getattr(c, field)


def input_dict(analysis: Analysis) -> dict[str, Any]:
    return input_section(analysis.geometry)


def input_section(g: Geometry) -> dict[str, Any]:
    """The document's ``input``: the geometry file's name, its shape, whether it has entropies, its metadata."""
    return {
        "file": Path(g.source).name,
        "num_layers": g.num_layers,
        "num_heads": g.num_heads,
        "max_rank": g.max_rank,
        "has_entropy": g.entropy is not None,
        "metadata": g.metadata,
    }


def analysis_dict(a: Analysis) -> dict[str, Any]:
    """One strategy's figures; keys as documented in the README."""
    si, rs, ch = a.shape_invariance, a.rescale, a.cross_head
    entropy_reason = None
    if a.corr_T_entropy is None:
        entropy_reason = "the geometry has no dynamic (entropy) section"
    elif a.corr_T_entropy.reason or a.corr_opnorm_entropy.reason:
        entropy_reason = "; ".join(r for r in (a.corr_T_entropy.reason, a.corr_opnorm_entropy.reason) if r)
    single = ch.single_spectrum_residual
    return {
        "anchor": {
            "strategy": a.anchor.strategy,
            "layer": a.anchor.layer,
            "layers": a.anchor.layers.tolist(),
            "groups": [list(g) for g in a.anchor.groups],
            "group_anchors": a.anchor.group_anchors,
            "scores": None if a.anchor.scores is None else a.anchor.scores.tolist(),
            "num_anchor_layers": a.anchor.num_anchor_layers,
            "num_fitted_layers": a.anchor.num_fitted_layers,
        },
        "shape_invariance": {
            "per_head_mean_cos": None if si.per_head_mean_cos is None else si.per_head_mean_cos.tolist(),
            **_stats(si.per_head_mean_cos),
            "label": si.label,
            "reason": si.reason,
        },
        "rescale": {
            "T": rs.T.tolist(),
            "residual": rs.residual.tolist(),
            "mean_residual": rs.mean_residual,
            "max_residual": rs.max_residual,
            "frac_below_0_10": rs.frac_below(0.10),
            "frac_below_0_20": rs.frac_below(0.20),
            "mean_residual_fitted": rs.mean_residual_fitted,
            "frac_below_0_10_fitted": rs.frac_below_fitted(0.10),
            "frac_below_0_20_fitted": rs.frac_below_fitted(0.20),
            "fitted_reason": None if rs.fitted.any() else NO_FITTED_LAYER,
            "per_layer": {
                "mean_residual": rs.residual.mean(axis=1).tolist(),
                "max_residual": rs.residual.max(axis=1).tolist(),
                "mean_T": rs.T.mean(axis=1).tolist(),
            },
        },
        "entropy": {
            "corr_T_entropy": _corr(a.corr_T_entropy, "pearson"),
            "corr_opnorm_entropy": _corr(a.corr_opnorm_entropy, "pearson"),
            "spearman_T_entropy": _corr(a.corr_T_entropy, "spearman"),
            "spearman_opnorm_entropy": _corr(a.corr_opnorm_entropy, "spearman"),
            "reason": entropy_reason,
        },
        "cross_head": {
            "per_layer_mean_cos": None if ch.per_layer_mean_cos is None else ch.per_layer_mean_cos.tolist(),
            "mean": None if ch.per_layer_mean_cos is None else float(ch.per_layer_mean_cos.mean()),
            "reason": ch.reason,
            "single_spectrum": {
                "typical_head": ch.typical_head.tolist(),
                "residual": single.tolist(),
                "per_layer_mean_residual": single.mean(axis=1).tolist(),
                "mean_residual": float(single.mean()),
            },
        },
        "verdict": {"code": a.verdict_code, "text": a.verdict_text},
    }


def comparison_rows(analyses: dict[str, Analysis]) -> list[dict[str, Any]]:
    """One row per strategy: the side-by-side table of ``--anchor all``."""
    rows = []
    for name, a in analyses.items():
        rows.append(
            {
                "strategy": name,
                "anchor_layers": a.anchor.group_anchors,
                "num_anchor_layers": a.anchor.num_anchor_layers,
                "num_fitted_layers": a.anchor.num_fitted_layers,
                "mean_residual": a.rescale.mean_residual,
                "mean_residual_fitted": a.rescale.mean_residual_fitted,
                "max_residual": a.rescale.max_residual,
                "frac_below_0_10": a.rescale.frac_below(0.10),
                "frac_below_0_10_fitted": a.rescale.frac_below_fitted(0.10),
                "corr_T_entropy": _corr(a.corr_T_entropy, "pearson"),
                "verdict": a.verdict_code,
            }
        )
    return rows


def null_dict(null: NullBaseline) -> dict[str, Any]:
    """One null: {"available", "reason", "draws", "seed", "figures": {name: {"real", "null_mean", "null_std", "p_value"}}}."""
    return {
        "available": null.available,
        "reason": null.reason,
        "draws": null.draws,
        "seed": null.seed,
        "figures": {
            name: {"real": f.real, "null_mean": f.null_mean, "null_std": f.null_std, "p_value": f.p_value}
            for name, f in null.figures.items()
        },
    }


def _interval(i: Interval) -> dict[str, Any]:
    return {"estimate": i.estimate, "low": i.low, "high": i.high, "degenerate_draws": i.degenerate}


def bootstrap_dict(b: BootstrapResult) -> dict[str, Any]:
    return {
        "draws": b.draws,
        "confidence": b.confidence,
        "method": b.method,
        "corr_T_entropy": {name: _interval(i) for name, i in b.corr_T_entropy.items()},
        "corr_opnorm_entropy": {name: _interval(i) for name, i in b.corr_opnorm_entropy.items()},
    }


def layered_verdict_dict(v: LayeredVerdict) -> dict[str, Any]:
    """``verdict.layers``, ``verdict.overall`` and ``verdict.summary``."""
    return {
        "layers": {name: {"code": layer.code, "evidence": layer.evidence} for name, layer in v.layers.items()},
        "overall": v.overall,
        "summary": v.summary,
    }


def result_document(
    analyses: dict[str, Analysis],
    primary: str,
    *,
    nulls: dict[str, NullBaseline] | None = None,
    bootstrap: BootstrapResult | None = None,
    verdict: LayeredVerdict | None = None,
) -> dict[str, Any]:
    """The JSON document of ``qkspectra analyze``.

    The top level holds the figures of the ``primary`` strategy; with several
    strategies, ``strategies`` holds each one's and ``comparison`` the table.
    With a layered verdict, ``null`` and ``bootstrap`` (None when not computed) and
    ``verdict.layers``, ``verdict.overall``, ``verdict.summary`` are added.
    """
    doc: dict[str, Any] = {"qkspectra_version": __version__, "schema_version": SCHEMA_VERSION}
    doc["input"] = input_dict(analyses[primary])
    doc.update(analysis_dict(analyses[primary]))
    if len(analyses) > 1:
        doc["strategies"] = {name: analysis_dict(a) for name, a in analyses.items()}
        doc["comparison"] = comparison_rows(analyses)
    if verdict is not None:
        doc["null"] = None if nulls is None else {name: null_dict(n) for name, n in nulls.items()}
        doc["bootstrap"] = None if bootstrap is None else bootstrap_dict(bootstrap)
        doc["verdict"].update(layered_verdict_dict(verdict))
    return doc


def _nullable(x: np.ndarray) -> list:
    """An array as nested lists, None where it is nan."""
    return np.where(np.isnan(x), None, x).tolist()


def _ends(low: float | None, high: float | None) -> list[float] | None:
    return None if low is None else [low, high]


def link_dict(link: Link) -> dict[str, Any]:
    """One cell of ``descriptors``: descriptor against target."""
    return {
        "pearson": link.pearson,
        "spearman": link.spearman,
        "pearson_ci95": None if link.pearson_ci95 is None else _ends(*link.pearson_ci95),
        "spearman_ci95": None if link.spearman_ci95 is None else _ends(*link.spearman_ci95),
        "p_permutation": link.p_permutation,
        "within_layer_spearman": link.within_layer_spearman,
        "within_layer_p_permutation": link.within_layer_p_permutation,
        "degenerate_draws": link.degenerate_draws,
        "reason": link.reason,
    }


def descriptors_dict(table: dict[str, dict[str, Link]], options: LinkOptions, seed: int, pairs: int) -> dict[str, Any]:
    """``descriptors``: ``settings`` and ``<descriptor>.<target>`` = ``link_dict``."""
    settings = {"bootstrap_draws": options.bootstrap_draws, "permutations": options.permutations, "seed": seed,
                "confidence": LINK_CONFIDENCE, "pairs": pairs, "method": LINK_METHOD}
    return {"settings": settings, **{d: {t: link_dict(link) for t, link in row.items()} for d, row in table.items()}}


def _summary(values: np.ndarray, reduce) -> float | None:
    finite = values[np.isfinite(values)]
    return float(reduce(finite)) if finite.size else None


def context_fit_dict(fit: ContextFit | str) -> dict[str, Any]:
    """One context fit (or the reason it is n/a): per head, per layer and over all heads."""
    if isinstance(fit, str):
        return {"entropy_slope_per_head": None, "r2_per_head": None, "buckets_used_per_head": None,
                "per_layer": None, "median_slope": None, "mean_r2": None, "reason": fit}
    no_slope, no_r2 = int(np.isnan(fit.slope).sum()), int(np.isnan(fit.r2).sum())
    reason = None
    if no_slope or no_r2:
        reason = (f"slope undefined for {no_slope} heads (fewer than two usable buckets, or one log(keys) value); "
                  f"R^2 undefined for {no_r2} heads (those, and heads whose entropy is the same in every bucket)")
    return {
        "entropy_slope_per_head": _nullable(fit.slope),
        "r2_per_head": _nullable(fit.r2),
        "buckets_used_per_head": fit.buckets_used.tolist(),
        "per_layer": {
            "median_slope": [_summary(row, np.median) for row in fit.slope],
            "mean_r2": [_summary(row, np.mean) for row in fit.r2],
        },
        "median_slope": _summary(fit.slope, np.median),
        "mean_r2": _summary(fit.r2, np.mean),
        "reason": reason,
    }


def context_dict(fits: dict[str, Any]) -> dict[str, Any]:
    """``context``: the fit of the entropy at the top, ``weighting``, and ``without_first``."""
    return {**context_fit_dict(fits["entropy"]), "weighting": fits["weighting"],
            "without_first": context_fit_dict(fits["without_first"])}
