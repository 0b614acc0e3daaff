"""Tidy tables of a run and of a sweep: pure functions from their documents to pandas DataFrames.

    head_table(document, geometry)   one row per (layer, head): every per-head figure
    layer_table(document, geometry)  one row per layer: every per-layer figure
    strategy_table(document)         one row per anchor strategy: the report's comparison, then more
    model_table(sweep_document)      one row per model of a sweep: its labels and key figures

Every value is read from the document (``analysis.json``, ``sweep.json``) or the geometry as it is,
never recomputed, except op_norm ... effective_rank for a geometry file without them (from its
singular values, as the descriptors table computes them) and the per-layer means of the operator
residuals, the entropy without the first position and the sink mass (means over heads of the
document's or the geometry's own arrays). Columns named ``*_{strategy}`` come once per anchor
strategy the document holds (last, middle, best, group); sections the document lacks (no entropy,
no context, no factors, no functional test) leave their columns out. Every column is described in docs/tables.md.

pandas is imported only when a table is made (the ``notebook`` extra: pip install 'qkspectra[notebook]').
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from qkspectra.errors import QkspectraError

if TYPE_CHECKING:
    import pandas

    from qkspectra.geometry import Geometry

GEOMETRY_STATISTICS = {  # static row key -> column
    "operator_norm_per_head": "op_norm",
    "frobenius_norm_per_head": "frobenius_norm",
    "stable_rank_per_head": "stable_rank",
    "effective_rank_per_head": "effective_rank",
}
DYNAMIC_FIGURES = {  # dynamic row key -> column
    "mean_attention_entropy_per_head": "entropy",
    "mean_normalized_entropy_per_head": "normalized_entropy",
    "mean_attention_entropy_without_first_per_head": "entropy_without_first",
    "mean_sink_mass_per_head": "sink_mass",
}
CONTEXT_FIGURES = {  # key of context (and context.without_first) -> column
    "entropy_slope_per_head": "context_slope",
    "r2_per_head": "context_r2",
    "buckets_used_per_head": "context_buckets",
}
OPERATOR_FIGURES = {  # key of operator.{strategy} -> column prefix
    "T": "operator_T",
    "residual": "operator_residual",
    "matched_head": "operator_matched_head",
    "matched_T": "operator_matched_T",
    "matched_residual": "operator_matched_residual",
    "principal_angles_deg_mean": "operator_principal_angle_deg",
}
RECONSTRUCTIONS = ("spectral", "operator", "operator_rank_k")


def pandas_module():
    """pandas, or QkspectraError saying which extra brings it."""
    try:
        import pandas
    except ImportError:
        raise QkspectraError("tables need pandas (pip install 'qkspectra[notebook]')") from None
    return pandas


def _strategies(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    if "strategies" in document:
        return dict(document["strategies"])
    return {document["anchor"]["strategy"]: document}


def _sections(document: Mapping[str, Any], key: str) -> dict[str, Mapping[str, Any]]:
    """A per-strategy section (operator, rank_k, functional) without its non-strategy entries."""
    return {name: entry for name, entry in (document.get(key) or {}).items() if isinstance(entry, Mapping) and name != "control"}


def _rows(geometry: Geometry | None, section: str) -> list[Mapping[str, Any]]:
    document = None if geometry is None else geometry.document
    rows = (document or {}).get(section)
    return rows if isinstance(rows, list) and all(isinstance(row, Mapping) for row in rows) else []


def _per_head(values: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """An (L, H) list as a flat (L * H,) array in (layer, head) order; None when absent or of another shape."""
    if values is None:
        return None
    array = np.asarray(values, dtype=object if any(v is None for row in values for v in row) else None)
    return array.reshape(-1) if array.shape == shape else None


def _nan_for_none(values: np.ndarray) -> np.ndarray:
    """A flat array with None (null in the file) as NaN, float; other arrays as they are."""
    if values.dtype != object:
        return values
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _in_order(columns: dict[str, Any], first: list[str]) -> dict[str, Any]:
    """columns with the names in ``first`` (those present) first, in that order."""
    return {**{name: columns[name] for name in first if name in columns}, **columns}


def _context_fits(document: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], str]]:
    """(fit, column suffix) of ``context`` ("") and ``context.without_first`` ("_without_first"), those present."""
    context = document.get("context")
    if not isinstance(context, Mapping):
        return []
    without = context.get("without_first")
    return [(context, ""), *([(without, "_without_first")] if isinstance(without, Mapping) else [])]


def head_columns(document: Mapping[str, Any], geometry: Geometry | None = None) -> dict[str, np.ndarray]:
    """The columns of ``head_table`` as arrays of length L * H, in (layer, head) order."""
    L, H = document["input"]["num_layers"], document["input"]["num_heads"]
    columns: dict[str, Any] = {"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)}
    for section, names in (("static", GEOMETRY_STATISTICS), ("dynamic", DYNAMIC_FIGURES)):
        rows = _rows(geometry, section)
        for key, column in names.items():
            if len(rows) == L and all(key in row for row in rows):
                values = _per_head([row[key] for row in rows], (L, H))
                if values is not None:
                    columns[column] = _nan_for_none(values)
    missing = [column for column in GEOMETRY_STATISTICS.values() if column not in columns]
    if missing and geometry is not None:  # a file without them: from its spectra, as the descriptors table has them
        from qkspectra.analysis.entropy_links import spectrum_descriptors

        computed = spectrum_descriptors(np.asarray(geometry.singular_values, dtype=np.float64))
        columns.update({column: computed[column].reshape(-1) for column in missing})
        columns = _in_order(columns, ["layer", "head", *GEOMETRY_STATISTICS.values()])
    if "entropy" not in columns and geometry is not None and geometry.entropy is not None:
        columns["entropy"] = geometry.entropy.reshape(-1)
    for name, s in _strategies(document).items():
        layers = np.asarray(s["anchor"]["layers"])  # (L,)
        columns[f"anchor_layer_{name}"] = np.repeat(layers, H)
        columns[f"fitted_{name}"] = np.repeat(layers != np.arange(L), H)
        columns[f"T_{name}"] = _per_head(s["rescale"]["T"], (L, H))
        columns[f"residual_{name}"] = _per_head(s["rescale"]["residual"], (L, H))
        columns[f"single_spectrum_residual_{name}"] = _per_head(s["cross_head"]["single_spectrum"]["residual"], (L, H))
    for name, entry in _sections(document, "operator").items():
        for key, prefix in OPERATOR_FIGURES.items():
            values = _per_head(entry.get(key), (L, H))
            if values is not None:
                columns[f"{prefix}_{name}"] = values
    for fit, suffix in _context_fits(document):
        for key, column in CONTEXT_FIGURES.items():
            values = _per_head(fit.get(key), (L, H))
            if values is not None:
                columns[column + suffix] = _nan_for_none(values)
    for name, entry in _sections(document, "rank_k").items():
        for kind in ("spectral", "operator"):
            values = _per_head((entry.get(kind) or {}).get("k"), (L, H))
            if values is not None:
                columns[f"rank_k_{kind}_{name}"] = values
    functional = document.get("functional") or {}
    control = _per_head((functional.get("control") or {}).get("per_head_kl"), (L, H))
    if control is not None:
        columns["functional_kl_control"] = control
    for name, entry in _sections(document, "functional").items():
        for kind in RECONSTRUCTIONS:
            values = _per_head((entry.get(kind) or {}).get("per_head_kl"), (L, H))
            if values is not None:
                columns[f"functional_kl_{kind}_{name}"] = values
    return columns


def head_table(document: Mapping[str, Any], geometry: Geometry | None = None) -> pandas.DataFrame:
    """One row per (layer, head), L * H rows in (layer, head) order; columns in docs/tables.md."""
    return pandas_module().DataFrame(head_columns(document, geometry))


def _layer_mean(values: Any, L: int, H: int) -> np.ndarray | None:
    """The mean over heads of an (L, H) list -> (L,); None when absent."""
    flat = _per_head(values, (L, H))
    return None if flat is None or flat.dtype == object else flat.reshape(L, H).mean(axis=1)


def _layer_nanmean(x: np.ndarray) -> np.ndarray:
    """(L, H) -> the mean over each layer's defined (non-NaN) heads, (L,); NaN for a layer with none."""
    count = np.isfinite(x).sum(axis=1)
    return np.where(count > 0, np.nansum(x, axis=1) / np.maximum(count, 1), np.nan)


def layer_columns(document: Mapping[str, Any], geometry: Geometry | None = None) -> dict[str, np.ndarray]:
    """The columns of ``layer_table`` as arrays of length L."""
    L, H = document["input"]["num_layers"], document["input"]["num_heads"]
    columns: dict[str, Any] = {"layer": np.arange(L)}
    if geometry is not None and geometry.entropy is not None:
        columns["mean_entropy"] = geometry.entropy.mean(axis=1)
    dynamic = _rows(geometry, "dynamic")
    for key, column in (("mean_attention_entropy_without_first_per_head", "mean_entropy_without_first"),
                        ("mean_sink_mass_per_head", "mean_sink_mass")):
        present = len(dynamic) == L and all(key in row for row in dynamic)
        values = _per_head([row[key] for row in dynamic], (L, H)) if present else None
        if values is not None:
            columns[column] = _layer_nanmean(_nan_for_none(values).astype(np.float64).reshape(L, H))
    for fit, suffix in _context_fits(document):
        per_layer = fit.get("per_layer") or {}
        for key, column in (("median_slope", "context_median_slope"), ("mean_r2", "context_mean_r2")):
            values = per_layer.get(key)
            if isinstance(values, list) and len(values) == L:
                columns[column + suffix] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    folded = ((geometry.metadata if geometry is not None else None) or document["input"].get("metadata") or {}).get("norm_folded_per_layer")
    if isinstance(folded, list) and len(folded) == L:
        columns["norm_folded"] = np.asarray(folded)
    cos = document["cross_head"].get("per_layer_mean_cos")
    if cos is not None:
        columns["cross_head_mean_cos"] = np.asarray(cos)
    for name, s in _strategies(document).items():
        anchor, per_layer = s["anchor"], s["rescale"]["per_layer"]
        layers = np.asarray(anchor["layers"])
        columns[f"anchor_layer_{name}"] = layers
        columns[f"fitted_{name}"] = layers != np.arange(L)
        if anchor.get("scores") is not None:
            columns[f"anchor_score_{name}"] = np.asarray(anchor["scores"])
        columns[f"mean_T_{name}"] = np.asarray(per_layer["mean_T"])
        columns[f"mean_residual_{name}"] = np.asarray(per_layer["mean_residual"])
        columns[f"max_residual_{name}"] = np.asarray(per_layer["max_residual"])
        single = s["cross_head"]["single_spectrum"]
        columns[f"typical_head_{name}"] = np.asarray(single["typical_head"])
        columns[f"single_spectrum_mean_residual_{name}"] = np.asarray(single["per_layer_mean_residual"])
    for name, entry in _sections(document, "operator").items():
        for key, column in (("residual", "operator_mean_residual"), ("matched_residual", "operator_matched_mean_residual")):
            means = _layer_mean(entry.get(key), L, H)
            if means is not None:
                columns[f"{column}_{name}"] = means
    return columns


def layer_table(document: Mapping[str, Any], geometry: Geometry | None = None) -> pandas.DataFrame:
    """One row per layer; columns in docs/tables.md."""
    return pandas_module().DataFrame(layer_columns(document, geometry))


def strategy_rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per anchor strategy: the report's comparison columns in its order, then the other sections' figures."""
    operator, rank_k, functional = (_sections(document, key) for key in ("operator", "rank_k", "functional"))
    nulls = {name: entry for name, entry in (document.get("null") or {}).items() if isinstance(entry, Mapping)}
    bootstrap = (document.get("bootstrap") or {}).get("corr_T_entropy") or {}
    rows = []
    for name, s in _strategies(document).items():
        rs, anchor, entropy = s["rescale"], s["anchor"], s["entropy"]
        row = {
            "strategy": name,
            "anchor_layers": list(anchor["group_anchors"]),
            "num_anchor_layers": anchor.get("num_anchor_layers"),
            "num_fitted_layers": anchor.get("num_fitted_layers"),
            "mean_residual_fitted": rs.get("mean_residual_fitted"),
            "mean_residual": rs["mean_residual"],
            "max_residual": rs["max_residual"],
            "frac_below_0_10_fitted": rs.get("frac_below_0_10_fitted"),
            "frac_below_0_20_fitted": rs.get("frac_below_0_20_fitted"),
            "corr_T_entropy": entropy["corr_T_entropy"],
            "single_spectrum_mean_residual": s["cross_head"]["single_spectrum"]["mean_residual"],
            "seed_verdict": s["verdict"]["code"],
            "spearman_T_entropy": entropy.get("spearman_T_entropy"),
            "corr_opnorm_entropy": entropy.get("corr_opnorm_entropy"),
        }
        if name in bootstrap:
            row["corr_T_entropy_low"], row["corr_T_entropy_high"] = bootstrap[name]["low"], bootstrap[name]["high"]
        for null, entry in nulls.items():
            if entry.get("available"):
                row[f"p_{null}"] = ((entry.get("figures") or {}).get(f"mean_residual_fitted.{name}") or {}).get("p_value")
        if name in operator:
            row["operator_mean_residual_fitted"] = operator[name].get("mean_residual_fitted")
            row["operator_matched_mean_residual_fitted"] = operator[name].get("matched_mean_residual_fitted")
        if name in rank_k:
            for kind in ("spectral", "operator"):
                row[f"rank_k_{kind}_mean_k_fitted"] = (rank_k[name].get(kind) or {}).get("mean_k_fitted")
        if name in functional:
            for kind in RECONSTRUCTIONS:
                row[f"functional_delta_{kind}"] = (functional[name].get(kind) or {}).get("delta_loss")
        rows.append(row)
    return rows


def strategy_table(document: Mapping[str, Any]) -> pandas.DataFrame:
    """One row per anchor strategy, indexed by its name; columns in docs/tables.md."""
    return pandas_module().DataFrame(strategy_rows(document)).set_index("strategy")


MODEL_COLUMNS = ("name", "model", "status", "error", "run")


def model_rows(sweep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per model of a sweep document: who it is, its labels (``label_NAME`` where a name is taken), its
    key figures (absent where it failed)."""
    every = [_model_figures(m.get("figures") or {}, m.get("timings") or {}) for m in sweep["models"]]
    taken = {*MODEL_COLUMNS, *(key for figures in every for key in figures)}
    rows = []
    for m, figures in zip(sweep["models"], every):
        labels = {(f"label_{k}" if k in taken else k): v for k, v in (m.get("labels") or {}).items()}
        rows.append({**{key: m.get(key) for key in MODEL_COLUMNS}, **labels, **figures})
    return rows


def _model_figures(f: Mapping[str, Any], timings: Mapping[str, Any]) -> dict[str, Any]:
    """One model's key figures (``workflow.sweep.key_figures``) as flat columns; empty when it failed."""
    from qkspectra.analysis.verdict import LAYERS

    if not f:
        return {}
    verdict = f.get("verdict") or {}
    figures: dict[str, Any] = {
        "num_layers": f.get("num_layers"), "num_heads": f.get("num_heads"),
        "overall": verdict.get("overall"),
        **{f"verdict_{layer}": ((verdict.get("layers") or {}).get(layer) or {}).get("code") for layer in LAYERS},
        "seed_verdict": verdict.get("code"),
    }
    for key in ("spectral_residual", "spectral_residual_all_layers", "anchor_layers", "corr_T_entropy", "functional_change"):
        for name, value in (f.get(key) or {}).items():
            figures[f"{key}_{name}"] = value
    for name, value in (f.get("operator_residual") or {}).items():
        figures[f"operator_residual_{name}"] = value.get("same_head")
        figures[f"operator_matched_residual_{name}"] = value.get("matched_head")
    figures["operator_residual_best"] = f.get("operator_residual_best")
    figures["functional_change_best"] = f.get("functional_change_best")
    for null, values in (f.get("null_p_values") or {}).items():
        for figure, p in values.items():
            figures[f"p_{null}_{figure.replace('.', '_')}"] = p
    best = f.get("entropy_link_best") or {}
    figures["entropy_link_best_descriptor"] = best.get("descriptor")
    figures["entropy_link_best_within_layer_spearman"] = best.get("within_layer_spearman")
    figures["median_context_slope"] = f.get("median_context_slope")
    figures["mean_sink_mass"] = f.get("mean_sink_mass")
    figures["total_s"] = timings.get("total_s")
    return figures


def model_table(sweep: Mapping[str, Any]) -> pandas.DataFrame:
    """One row per model of a sweep, in the sweep's order; columns in docs/tables.md."""
    return pandas_module().DataFrame(model_rows(sweep))
