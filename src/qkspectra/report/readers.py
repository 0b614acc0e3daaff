"""Readers of the analysis document (``analysis.json``): its strategies, its model, its best anchor, its check.

Numpy and the standard library only: the plots, the pages and ``qkspectra report`` read through these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qkspectra.analysis.verdict import eligible_strategies
from qkspectra.errors import QkspectraError


def strategies(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each strategy's figures; a single-strategy document gives its own under its anchor's name."""
    if "strategies" in document:
        return dict(document["strategies"])
    return {document["anchor"]["strategy"]: document}


def check_analysis(document: Any, source: str) -> None:
    """QkspectraError naming the JSON path of the first fault in what the plots read from an analysis document.

    input.num_layers / num_heads (L, H), and per strategy: rescale.T and rescale.residual (L x H
    finite numbers), anchor.group_anchors (layer indices), cross_head.per_layer_mean_cos (null or
    L numbers) and cross_head.single_spectrum.per_layer_mean_residual (L numbers).
    """

    def fail(path: str, what: str) -> None:
        raise QkspectraError(f"{source}: {path}: {what}")

    def get(obj: Any, path: str, key: str) -> Any:
        if not isinstance(obj, Mapping):
            fail(path, f"expected an object, found {type(obj).__name__}")
        if key not in obj:
            fail(f"{path}.{key}" if path else key, "missing")
        return obj[key]

    def numbers(values: Any, path: str, shape: tuple[int, ...]) -> None:
        array = np.asarray(values, dtype=object)
        if array.shape != shape:
            fail(path, f"expected {' x '.join(map(str, shape))} numbers, found shape {array.shape}")
        bad = [i for i, x in np.ndenumerate(array) if type(x) not in (int, float) or not np.isfinite(x)]
        if bad:
            fail(path + "".join(f"[{i}]" for i in bad[0]), f"expected a finite number, found {array[bad[0]]!r}")

    inp = get(document, "", "input")
    L, H = get(inp, "input", "num_layers"), get(inp, "input", "num_heads")
    for key, value in (("num_layers", L), ("num_heads", H)):
        if type(value) is not int or value < 1:
            fail(f"input.{key}", f"expected a positive whole number, found {value!r}")
    if "strategies" in document:
        per = get(document, "", "strategies")
        if not isinstance(per, Mapping) or not per:
            fail("strategies", "expected an object with one entry per anchor strategy")
        prefix = {name: f"strategies.{name}" for name in per}
    else:
        per = {"": document}
        prefix = {"": ""}
    for name, strategy in per.items():
        at = prefix[name]
        join = (lambda key: f"{at}.{key}") if at else (lambda key: key)
        rescale = get(strategy, at, "rescale")
        for key in ("T", "residual"):
            numbers(get(rescale, join("rescale"), key), join(f"rescale.{key}"), (L, H))
        anchors = get(get(strategy, at, "anchor"), join("anchor"), "group_anchors")
        if not isinstance(anchors, list) or not all(type(a) is int and 0 <= a < L for a in anchors):
            fail(join("anchor.group_anchors"), f"expected a list of layer indices below {L}")
        cross_head = get(strategy, at, "cross_head")
        cos = get(cross_head, join("cross_head"), "per_layer_mean_cos")
        if cos is not None:
            numbers(cos, join("cross_head.per_layer_mean_cos"), (L,))
        single = get(cross_head, join("cross_head"), "single_spectrum")
        numbers(get(single, join("cross_head.single_spectrum"), "per_layer_mean_residual"),
                join("cross_head.single_spectrum.per_layer_mean_residual"), (L,))


def model_name(document: Mapping[str, Any]) -> str:
    metadata = document["input"].get("metadata") or {}
    return str(metadata.get("model") or document["input"]["file"])


def describe_run(document: Mapping[str, Any]) -> str:
    """One line naming the model and the extraction options (from the geometry's metadata)."""
    inp = document["input"]
    metadata = inp.get("metadata") or {}
    parts = [model_name(document)]
    shape = f"{inp['num_layers']} layers × {inp['num_heads']} heads"
    parts.append(f"{metadata['model_type']}, {shape}" if "model_type" in metadata else shape)
    if "fold_ln" in metadata:
        parts.append("norm folded" if metadata["fold_ln"] else "norm not folded")
    if not inp.get("has_entropy"):
        parts.append("static only")
    corpus_label = str(metadata.get("corpus", "")).split(": ")[0]
    if corpus_label and not corpus_label.startswith("default corpus"):
        parts.append(f"corpus {corpus_label}")
    for key in ("seq_len", "max_tokens", "num_windows"):
        if metadata.get(key) is not None:
            parts.append(f"{key} {metadata[key]}")
    if metadata.get("window_per_line"):
        parts.append("window per line")
    return " · ".join(parts)


def best_strategy(per: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The strategy with the lowest mean residual over its fitted layers, chosen as the verdict chooses
    (``verdict.eligible_strategies``); None when no strategy fits a layer (or the document predates the figure)."""
    entries = {
        name: {**s["anchor"], "value": s["rescale"].get("mean_residual_fitted")}
        for name, s in per.items()
        if isinstance(s["rescale"].get("mean_residual_fitted"), (int, float))
    }
    eligible = eligible_strategies(entries)
    return min(eligible, key=lambda name: eligible[name]["value"]) if eligible else None


def ranked_descriptors(document: Mapping[str, Any], target: str = "entropy") -> list[tuple[str, Mapping[str, Any]]]:
    """Each descriptor of ``descriptors`` with its cell against ``target``, the strongest |within-layer Spearman|
    first; those without one (null) after, in the document's order. Empty without the section."""
    table = document.get("descriptors") or {}
    cells = [(name, row.get(target) or {}) for name, row in table.items()
             if name != "settings" and isinstance(row, Mapping)]

    def strength(item: tuple[str, Mapping[str, Any]]) -> tuple[bool, float]:
        w = item[1].get("within_layer_spearman")
        return (w is None, 0.0 if w is None else -abs(w))

    return sorted(cells, key=strength)
