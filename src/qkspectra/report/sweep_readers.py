"""Readers of the sweep document (``sweep.json``): each model's headline figures, verdict codes and labels.

Shared by the sweep's page (``sweep_page``) and its figures (``sweep_plots``); no matplotlib here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from qkspectra.analysis.verdict import LAYERS

VERDICT_COLUMNS = ("overall", *LAYERS)

# name -> how it is read from a model's key figures (sweep.key_figures)
HEADLINE: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "spectral residual (last, fitted layers)": lambda f: f["spectral_residual"].get("last"),
    "Gaussian null p (residual, last)": lambda f: f["null_p_values"].get("gaussian", {}).get("mean_residual_fitted.last"),
    "shuffle null p (residual, last)": lambda f: f["null_p_values"].get("shuffle", {}).get("mean_residual_fitted.last"),
    "operator residual (best, fitted layers)": lambda f: f["operator_residual_best"],
    "functional change (best)": lambda f: f["functional_change_best"],
    "corr(T, entropy) (last)": lambda f: f["corr_T_entropy"].get("last"),
    "strongest within-layer descriptor of entropy": lambda f: (f.get("entropy_link_best") or {}).get("descriptor"),
    "its within-layer Spearman": lambda f: (f.get("entropy_link_best") or {}).get("within_layer_spearman"),
    "median context slope": lambda f: f.get("median_context_slope"),
    "mean sink mass": lambda f: f.get("mean_sink_mass"),
}
TEXT_HEADLINE = ("strongest within-layer descriptor of entropy",)  # names, not numbers: no plot against a label


def headline_figures(record: Mapping[str, Any]) -> dict[str, Any]:
    """The models table's figures of one model (None for each when it failed)."""
    figures = record.get("figures")
    return {name: (None if figures is None else read(figures)) for name, read in HEADLINE.items()}


def verdict_codes(record: Mapping[str, Any]) -> list[str]:
    """One model's verdict code in each of VERDICT_COLUMNS ("n/a" where absent, "—" for each when it failed)."""
    if record["status"] != "ok":
        return ["—"] * len(VERDICT_COLUMNS)
    verdict = record["figures"]["verdict"]
    return [verdict.get("overall") or "n/a", *(verdict["layers"].get(layer, {}).get("code") or "n/a" for layer in LAYERS)]


def label_columns(document: Mapping[str, Any]) -> list[str]:
    """Every label column, in the order first seen."""
    return list(dict.fromkeys(label for m in document["models"] for label in m["labels"]))


def numeric_labels(document: Mapping[str, Any]) -> list[str]:
    """The labels whose every given value is a number."""
    return [
        label for label in label_columns(document)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in (m["labels"].get(label) for m in document["models"]) if v is not None)
        and any(m["labels"].get(label) is not None for m in document["models"])
    ]


def plot_name(label: str) -> str:
    """The name of the plot of the key figures against a numeric label."""
    return "sweep_against_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_") or "label")


def describe_sweep(document: Mapping[str, Any]) -> str:
    """One line: how many models ran and failed, on how many workers where, with which qkspectra."""
    models = document["models"]
    ok = sum(m["status"] == "ok" for m in models)
    engine = document["engine"]
    where = "a local cluster" if engine.get("cluster") == "local" else engine["scheduler"]
    return (f"{len(models)} models, {ok} ok, {len(models) - ok} failed; {engine['workers']} workers "
            f"({where}); qkspectra {document['qkspectra_version']}")
