"""The report section "What predicts a head's entropy", laid out from ``descriptors`` and ``context``.

The link table has one row per descriptor, the strongest |within-layer Spearman| against the
mean entropy first (``readers.ranked_descriptors``); the context part gives the slopes' medians
and a per-layer table, or why they are n/a. Every number is the document's, formatted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qkspectra.report.layout import Paragraph, Plot, Section, Table, fmt
from qkspectra.report.readers import ranked_descriptors

ENTROPY_LINK_CAPTIONS = {
    "entropy_descriptors": "Each head's mean attention entropy (top row) and its entropy without the first position "
    "(bottom row: what an attention sink cannot lower) against each descriptor of its metric, the strongest "
    "within-layer link first; colour = layer. Panel titles: Spearman ρ over all heads and within layers (each "
    "layer's mean taken out of both).",
    "context_slopes": "Per head (layer × head), the slope of its entropy against log(visible keys) over the position "
    "buckets, with all keys and without the first position: 1 for uniform attention, 0 for attention spread over a "
    "fixed number of keys; grey where undefined.",
}
LINK_COLUMNS = (
    "descriptor", "within-layer ρ", "p (within)", "Spearman ρ", "ρ 95% CI", "p (permutation)", "Pearson r",
    "within-layer ρ (without first)", "Spearman ρ (without first)", "within-layer ρ (normalised)",
)
INTRO = (
    "Each descriptor of a head's metric (op-norm σ_1, Frobenius norm, stable and effective rank, its temperature T "
    "against the last, middle and best anchor) against its attention entropy, over all (layer, head) pairs and "
    "within layers (each layer's mean subtracted from both: depth taken out). A strong link over all heads with a "
    "within-layer one near 0 is depth's; the entropy without the first position is one an attention sink cannot "
    "lower. Strongest within-layer link first."
)
CONTEXT_INTRO = (
    "Entropy against context length: per head, the weighted least-squares slope of its position buckets' mean "
    "entropy on their mean log(visible keys); uniform attention has slope 1, attention spread over a fixed number "
    "of keys slope 0."
)


def _r(x: Any) -> str:
    return fmt(x, 3, signed=True)


def _interval(ends: Any) -> str:
    return "n/a" if not ends else f"[{_r(ends[0])}, {_r(ends[1])}]"


def link_rows(document: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """The link table's rows (``LINK_COLUMNS``), strongest within-layer Spearman against the entropy first."""
    table = document.get("descriptors") or {}
    rows = []
    for name, cell in ranked_descriptors(document):
        without = table[name].get("entropy_without_first") or {}
        normalised = table[name].get("normalised_entropy") or {}
        rows.append((
            name, _r(cell.get("within_layer_spearman")), fmt(cell.get("within_layer_p_permutation"), 4),
            _r(cell.get("spearman")), _interval(cell.get("spearman_ci95")), fmt(cell.get("p_permutation"), 4),
            _r(cell.get("pearson")), _r(without.get("within_layer_spearman")), _r(without.get("spearman")),
            _r(normalised.get("within_layer_spearman")),
        ))
    return tuple(rows)


def _reasons(document: Mapping[str, Any]) -> list[str]:
    """Each distinct reason a cell of the table is (partly) n/a, with the target it concerns."""
    table = document.get("descriptors") or {}
    seen: dict[str, None] = {}
    for name, row in table.items():
        if name == "settings" or not isinstance(row, Mapping):
            continue
        for target in ("entropy", "entropy_without_first", "normalised_entropy"):
            reason = (row.get(target) or {}).get("reason")
            if reason:
                seen.setdefault(f"{target}: {reason}", None)
    return list(seen)


def _context_blocks(document: Mapping[str, Any], figures: Sequence[str]) -> list[Paragraph | Table | Plot]:
    context = document.get("context")
    if not isinstance(context, Mapping):
        return []
    if context.get("entropy_slope_per_head") is None:
        return [Paragraph(f"{CONTEXT_INTRO} n/a: {context.get('reason') or 'no reason given'}.")]
    without = context.get("without_first") or {}
    text = (f"{CONTEXT_INTRO} Median slope over heads {fmt(context.get('median_slope'), 3)}, mean R² "
            f"{fmt(context.get('mean_r2'), 3)}; without the first position: ")
    if without.get("entropy_slope_per_head") is None:
        text += f"n/a ({without.get('reason') or 'no reason given'})"
    else:
        text += f"median slope {fmt(without.get('median_slope'), 3)}, mean R² {fmt(without.get('mean_r2'), 3)}"
    text += f". Buckets weighted by {context.get('weighting') or 'n/a'}."
    blocks: list[Paragraph | Table | Plot] = [Paragraph(text)]
    if context.get("reason"):
        blocks.append(Paragraph(f"Undefined: {context['reason']}.", "note"))
    if "context_slopes" in figures:
        blocks.append(Plot("context_slopes", ENTROPY_LINK_CAPTIONS["context_slopes"]))
    per_layer, per_layer_without = context.get("per_layer") or {}, without.get("per_layer") or {}
    slopes = per_layer.get("median_slope") or []
    rows = tuple(
        (str(layer), fmt(slope, 3), fmt((per_layer.get("mean_r2") or [None] * len(slopes))[layer], 3),
         fmt((per_layer_without.get("median_slope") or [None] * len(slopes))[layer], 3),
         fmt((per_layer_without.get("mean_r2") or [None] * len(slopes))[layer], 3))
        for layer, slope in enumerate(slopes)
    )
    if rows:
        blocks.append(Table(("layer", "median slope", "mean R²", "median slope (without first)",
                             "mean R² (without first)"), rows))
    return blocks


def entropy_links_section(document: Mapping[str, Any], figures: Sequence[str]) -> Section | None:
    """"What predicts a head's entropy": the link table and its figure, then the context slopes; None when the
    document has neither ``descriptors`` nor ``context``."""
    if "descriptors" not in document and "context" not in document:
        return None
    blocks: list[Paragraph | Table | Plot] = []
    ranked = ranked_descriptors(document)
    if ranked:
        settings = (document.get("descriptors") or {}).get("settings") or {}
        blocks.append(Paragraph(
            f"{INTRO} {fmt(settings.get('pairs'))} pairs; {fmt(settings.get('bootstrap_draws'))} bootstrap draws, "
            f"{fmt(settings.get('permutations'))} permutations."))
        name, best = ranked[0]
        if best.get("within_layer_spearman") is not None:
            blocks.append(Paragraph(
                f"Strongest within-layer link: {name}, within-layer ρ {_r(best['within_layer_spearman'])} "
                f"(p {fmt(best.get('within_layer_p_permutation'), 4)}); over all heads ρ {_r(best.get('spearman'))}."))
        blocks.append(Table(LINK_COLUMNS, link_rows(document)))
        reasons = _reasons(document)
        if reasons:
            blocks.append(Paragraph("n/a: " + "; ".join(reasons) + ".", "note"))
        if "entropy_descriptors" in figures:
            blocks.append(Plot("entropy_descriptors", ENTROPY_LINK_CAPTIONS["entropy_descriptors"]))
    blocks += _context_blocks(document, figures)
    return Section("What predicts a head's entropy", tuple(blocks), "entropy-links")
