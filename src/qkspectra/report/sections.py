"""The run report's content: its sections of paragraphs, tables and plots, laid out once from ``analysis.json``.

``report_sections(document, figures, notes)`` gives the whole report with every number already
formatted; ``run_page`` typesets it as HTML, Markdown and terminal text. Sections beyond the seed
(null baselines, bootstrap, operator-level, rank-k and functional reconstruction, the layered
verdict, what predicts a head's entropy: ``entropy_section``) appear when their keys are in the document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qkspectra.analysis.seed import VERDICT_TEXT, seed_rule
from qkspectra.analysis.nulls import NULL_LABELS, SHAPE_INVARIANCE
from qkspectra.analysis.verdict import CHOICE_RULE, stability_against_nulls
from qkspectra.report.entropy_section import ENTROPY_LINK_CAPTIONS, entropy_links_section
from qkspectra.report.layout import Paragraph, Plot, Section, Table, fmt
from qkspectra.report.readers import best_strategy, strategies

FIGURE_CAPTIONS = {
    "evidence": "The evidence at a glance: each layer of the verdict, coloured by its code, with the figure it is decided "
    "on against its thresholds: the spectral fit's mean residual over the fitted layers (the seed's rule), the real "
    "spectra against each null (mean ± 1 and ± 2 std of its draws; p-values), the lowest operator residual and the "
    "smallest change of the model (log scale; grey: the control) among the strategies the verdict compares.",
    "schedule": "Mean temperature T per layer (band: interquartile range over heads) for every anchor strategy, "
    "and the mean rescale residual of each fitted layer (anchor layers, which fit themselves with residual 0, are left "
    "out). The hypothesis predicts a smooth schedule with small residuals.",
    "temperature_heatmap": "T of every head (layer × head), one panel per anchor strategy.",
    "residual_heatmap": "Rescale residual ||σ − Tσ_anchor|| / ||σ|| of every head, one panel per anchor strategy.",
    "spectral_shapes": "Each head's spectral shape σ_k/σ_1 at every layer (colour = depth). Overlapping lines mean the "
    "shape is invariant across depth, as the hypothesis requires.",
    "entropy_scatter": "T (each anchor strategy) and operator norm σ_1 against the head's mean attention entropy; "
    "colour = layer.",
    "entropy_by_position": "Each layer's attention entropy against query position (log2 buckets; thin lines: heads, "
    "thick: their mean), beside the log of the number of keys the queries see (uniform attention).",
    **ENTROPY_LINK_CAPTIONS,
    "cross_head": "Mean pairwise shape cosine between the heads of each layer, and the residual when every head is "
    "fit to one spectrum.",
    "rank_k": "Mean residual over the fitted layers of scalar rescale plus a rank-k correction, against k.",
}



def _sig(x: Any) -> str:
    """Three significant digits, so that a control's 1e-17 does not print as 0.0000."""
    return "n/a" if x is None else format(x, ".3g")


def _mean(rows: Sequence[Sequence[float]] | None) -> float | None:
    """Mean of an (L, H) nested list; None when absent or empty."""
    if not rows:
        return None
    values = [v for row in rows for v in row if v is not None]
    return sum(values) / len(values) if values else None


def _shape_comparisons(document: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(null label, null mean, p-value) of the shape cosine for each available null in the document."""
    out = []
    for name, entry in (document.get("null") or {}).items():
        f = (entry.get("figures") or {}).get(SHAPE_INVARIANCE) if isinstance(entry, Mapping) and entry.get("available") else None
        if f is not None and f.get("p_value") is not None:
            out.append((NULL_LABELS.get(name, name), f["null_mean"], f["p_value"]))
    return out


def _verdict_style(code: Any) -> str | None:
    return f"verdict-{code}" if code in ("supported", "partial", "rejected") else None


def verdict_section(document: Mapping[str, Any], figures: Sequence[str] = ()) -> Section:
    """qkspectra's one verdict: the layered verdict's overall code and summary, the evidence at a glance (when
    ``figures`` has it) and its layers."""
    blocks: list[Paragraph | Table | Plot] = []
    verdict = document.get("verdict") or {}
    overall, summary, layers = verdict.get("overall"), verdict.get("summary"), verdict.get("layers")
    if overall or summary:
        head = f"Overall: {str(overall).upper()}. " if overall else ""
        blocks.append(Paragraph(head + str(summary or ""), _verdict_style(overall)))
    if "evidence" in figures:
        blocks.append(Plot("evidence", FIGURE_CAPTIONS["evidence"]))
    if layers:
        blocks.append(
            Table(
                ("level", "verdict", "evidence"),
                tuple((name, fmt(v.get("code")), fmt(v.get("evidence"))) for name, v in layers.items()),
            )
        )
    if not blocks:
        blocks.append(Paragraph("This document has no layered verdict (it was written before qkspectra gave one); "
                                "the seed's own verdict is under \"Reproducing the seed\".", "note"))
    return Section("Verdict", tuple(blocks), "verdict")


SEED_NOT_THE_VERDICT = (
    "Not qkspectra's verdict (that is the layered verdict at the top): the seed analysis' own verdict texts, kept to "
    "reproduce it. The seed judges the scalar rescale of the singular values alone, without a null baseline; that "
    "residual is only a lower bound on the operators' (Mirsky), so its words (\"Frobenius residual\", \"a low-rank "
    "correction on top is likely enough\") go beyond what it measures: the operator and rank-k sections measure those."
)


def seed_section(document: Mapping[str, Any]) -> Section:
    """The seed's verdict on the primary anchor and the seed's rule on the best strategy, headed as not the verdict."""
    verdict = document.get("verdict") or {}
    per = strategies(document)
    primary = document["anchor"]["strategy"]
    blocks = [
        Paragraph(SEED_NOT_THE_VERDICT, "note"),
        Paragraph(f"The seed's verdict, anchor {primary} (mean residual over all layers): {verdict.get('text', 'n/a')}"),
    ]
    best = best_strategy(per) if len(per) > 1 else None
    if best is not None:
        s = per[best]
        fitted = s["rescale"]["mean_residual_fitted"]
        blocks.append(
            Paragraph(
                f"The seed's rule with the best anchor strategy by mean residual over the layers it fits, {best} "
                f"(anchor layer(s) {fmt(s['anchor']['group_anchors'])}, {fmt(s['anchor']['num_fitted_layers'])} fitted "
                f"layers, mean residual {fmt(fitted)} over them, {fmt(s['rescale']['mean_residual'])} over all layers; "
                f"strategies compared {CHOICE_RULE}): {VERDICT_TEXT[seed_rule(fitted)]}"
            )
        )
    if len(per) > 1:
        blocks.append(Table(("strategy", "mean resid (all, seed)", "the seed's rule"),
                            tuple((name, fmt(s["rescale"]["mean_residual"]), s["verdict"]["code"]) for name, s in per.items())))
    return Section("Reproducing the seed", tuple(blocks), "seed")



def comparison_section(document: Mapping[str, Any]) -> Section:
    """Every anchor strategy's key figures, one row each."""
    per = strategies(document)
    rows = []
    for name, s in per.items():
        rs, anchor = s["rescale"], s["anchor"]
        rows.append(
            (
                name,
                fmt(anchor["group_anchors"]),
                fmt(anchor.get("num_anchor_layers")),
                fmt(anchor.get("num_fitted_layers")),
                fmt(rs.get("mean_residual_fitted")),
                fmt(rs["mean_residual"]),
                fmt(rs["max_residual"]),
                fmt(rs.get("frac_below_0_10_fitted"), 3),
                fmt(rs.get("frac_below_0_20_fitted"), 3),
                fmt(s["entropy"]["corr_T_entropy"], 3, signed=True),
                fmt(s["cross_head"]["single_spectrum"]["mean_residual"]),
            )
        )
    table = Table(
        ("strategy", "anchor layer(s)", "anchors", "fitted layers", "mean resid (fitted)", "mean resid (all, seed)",
         "max resid", "frac < 0.10 (fitted)", "frac < 0.20 (fitted)", "corr(T, entropy)", "one-spectrum resid"),
        tuple(rows),
    )
    return Section("Anchor strategies side by side", (table,), "strategies")


def _schedule_section(document: Mapping[str, Any], figures: Sequence[str]) -> Section:
    per = strategies(document)
    L = document["input"]["num_layers"]
    columns = ("layer", *(f"mean T ({n})" for n in per), *(f"mean resid ({n})" for n in per))
    rows = tuple(
        (
            str(layer),
            *(fmt(s["rescale"]["per_layer"]["mean_T"][layer], 3) for s in per.values()),
            *(fmt(s["rescale"]["per_layer"]["mean_residual"][layer]) for s in per.values()),
        )
        for layer in range(L)
    )
    blocks: list[Paragraph | Table | Plot] = []
    if "schedule" in figures:
        blocks.append(Plot("schedule", FIGURE_CAPTIONS["schedule"]))
    blocks.append(Table(columns, rows))
    return Section("Temperature schedule over depth", tuple(blocks), "schedule")


def _shape_section(document: Mapping[str, Any], figures: Sequence[str]) -> Section:
    si = document["shape_invariance"]
    blocks: list[Paragraph | Table | Plot] = []
    if si["per_head_mean_cos"] is None:
        blocks.append(Paragraph(f"Per-head mean pairwise cosine of shape across layers: n/a ({si['reason']})."))
    else:
        blocks.append(
            Paragraph(
                f"Per-head mean pairwise cosine of shape across layers: mean {fmt(si['mean'])}, std {fmt(si['std'])}, "
                f"min {fmt(si['min'])}, max {fmt(si['max'])} — {si['label']}."
                + (f" Held {against}." if (against := stability_against_nulls(_shape_comparisons(document))) else "")
            )
        )
        blocks.append(Table(("head", "mean cos across layers"), tuple((str(h), fmt(c)) for h, c in enumerate(si["per_head_mean_cos"]))))
    if "spectral_shapes" in figures:
        blocks.append(Plot("spectral_shapes", FIGURE_CAPTIONS["spectral_shapes"]))
    return Section("(1) Spectral shape invariance across layers", tuple(blocks), "shape")


def _rescale_section(document: Mapping[str, Any], figures: Sequence[str]) -> Section:
    blocks: list[Paragraph | Table | Plot] = [
        Paragraph("T_L^h = ⟨σ_L^h, σ_a^h⟩ / ||σ_a^h||², residual ||σ_L^h − T σ_a^h|| / ||σ_L^h|| against the anchor layer a.")
    ]
    for name in ("temperature_heatmap", "residual_heatmap"):
        if name in figures:
            blocks.append(Plot(name, FIGURE_CAPTIONS[name]))
    return Section("(2) Scalar rescale fit to the anchor", tuple(blocks), "rescale")


def _entropy_section(document: Mapping[str, Any], figures: Sequence[str]) -> Section:
    per = strategies(document)
    rows = tuple(
        (
            name,
            fmt(s["entropy"]["corr_T_entropy"], 3, signed=True),
            fmt(s["entropy"]["spearman_T_entropy"], 3, signed=True),
            fmt(s["entropy"]["reason"]) if s["entropy"]["reason"] else "",
        )
        for name, s in per.items()
    )
    e = document["entropy"]
    blocks: list[Paragraph | Table | Plot] = [
        Paragraph("Negative expected: larger T → sharper attention → lower entropy."),
        Table(("anchor", "Pearson corr(T, entropy)", "Spearman", "note"), rows),
        Paragraph(
            f"For comparison, corr(op-norm, entropy): Pearson {fmt(e['corr_opnorm_entropy'], 3, signed=True)}, "
            f"Spearman {fmt(e['spearman_opnorm_entropy'], 3, signed=True)}."
        ),
    ]
    if "entropy_scatter" in figures:
        blocks.append(Plot("entropy_scatter", FIGURE_CAPTIONS["entropy_scatter"]))
    if "entropy_by_position" in figures:
        blocks.append(Plot("entropy_by_position", FIGURE_CAPTIONS["entropy_by_position"]))
    return Section("(2b) Temperature against attention entropy", tuple(blocks), "entropy")


def _cross_head_section(document: Mapping[str, Any], figures: Sequence[str]) -> Section:
    per = strategies(document)
    ch = document["cross_head"]
    cos = ch["per_layer_mean_cos"]
    rows = tuple(
        (
            str(layer),
            "n/a" if cos is None else fmt(cos[layer]),
            *(fmt(s["cross_head"]["single_spectrum"]["per_layer_mean_residual"][layer]) for s in per.values()),
        )
        for layer in range(document["input"]["num_layers"])
    )
    blocks: list[Paragraph | Table | Plot] = []
    if ch["reason"]:
        blocks.append(Paragraph(f"Mean pair-cos n/a ({ch['reason']})."))
    blocks.append(Table(("layer", "mean pair-cos", *(f"one-spectrum resid ({n})" for n in per)), rows))
    if "cross_head" in figures:
        blocks.append(Plot("cross_head", FIGURE_CAPTIONS["cross_head"]))
    return Section("(3) Cross-head shape similarity within each layer", tuple(blocks), "cross-head")


def _null_section(document: Mapping[str, Any]) -> Section | None:
    null = document.get("null")
    if not null:
        return None
    blocks: list[Paragraph | Table | Plot] = []
    for kind, entry in null.items():
        if not isinstance(entry, Mapping):
            continue
        if not entry.get("available"):
            blocks.append(Paragraph(f"{kind}: not available ({entry.get('reason') or 'no reason given'})."))
            continue
        rows = tuple(
            (name, fmt(f.get("real")), fmt(f.get("null_mean")), fmt(f.get("null_std")), fmt(f.get("p_value"), 4))
            for name, f in (entry.get("figures") or {}).items()
        )
        blocks.append(Paragraph(f"{kind} null, {fmt(entry.get('draws'))} draws:"))
        blocks.append(Table(("figure", "real", "null mean", "null std", "p-value"), rows))
    return Section("Null baselines", tuple(blocks), "null")


def _bootstrap_section(document: Mapping[str, Any]) -> Section | None:
    boot = document.get("bootstrap")
    if not boot:
        return None
    rows = []
    for figure in ("corr_T_entropy", "corr_opnorm_entropy"):
        for name, ci in (boot.get(figure) or {}).items():
            rows.append((figure, name, fmt(ci.get("estimate"), 3, signed=True), fmt(ci.get("low"), 3, signed=True),
                         fmt(ci.get("high"), 3, signed=True)))
    blocks = (
        Paragraph(f"{fmt(boot.get('draws'))} bootstrap draws over heads, {fmt(boot.get('confidence'), 2)} confidence intervals."),
        Table(("figure", "anchor", "estimate", "low", "high"), tuple(rows)),
    )
    return Section("Bootstrap confidence intervals", blocks, "bootstrap")


def _operator_section(document: Mapping[str, Any]) -> Section | None:
    op = document.get("operator")
    if not op:
        return None
    rows = tuple(
        (
            name,
            fmt(o.get("num_anchor_layers")),
            fmt(o.get("num_fitted_layers")),
            fmt(o.get("mean_residual_fitted")),
            fmt(o.get("matched_mean_residual_fitted")),
            fmt(o.get("mean_residual")),
            fmt(o.get("matched_mean_residual")),
            fmt(_mean(o.get("principal_angles_deg_mean")), 1),
            fmt(_mean(o.get("T")), 3),
        )
        for name, o in op.items()
        if isinstance(o, Mapping)
    )
    blocks = (
        Paragraph(
            "Whole metric M_L^h against T·M_anchor^h (operator residual), and against the best-matching head of the "
            "anchor layer (matched): means over the fitted layers (anchor layers left out), and over all layers, anchor "
            "layers included, where each anchor layer fits itself with residual 0."
        ),
        Table(("anchor", "anchors", "fitted layers", "mean resid (fitted)", "matched (fitted)", "mean resid (all)",
               "matched (all)", "mean principal angle (°)", "mean T"), rows),
    )
    return Section("Operator-level reconstruction", blocks, "operator")


def _rank_k_section(document: Mapping[str, Any], figures: Sequence[str]) -> Section | None:
    rank_k = document.get("rank_k")
    if not rank_k:
        return None
    rows = tuple(
        (name, level, fmt(entry[level].get("mean_k_fitted"), 2), fmt(entry[level].get("mean_k"), 2),
         fmt(entry[level].get("param_ratio"), 3))
        for name, entry in rank_k.items()
        if isinstance(entry, Mapping)
        for level in ("spectral", "operator")
        if isinstance(entry.get(level), Mapping)
    )
    blocks: list[Paragraph | Table | Plot] = [
        Table(("anchor", "level", "mean k (fitted layers)", "mean k (all layers)", "parameter ratio"), rows)
    ]
    if "rank_k" in figures:
        blocks.append(Plot("rank_k", FIGURE_CAPTIONS["rank_k"]))
    return Section("Rank-k correction", tuple(blocks), "rank-k")


def _functional_section(document: Mapping[str, Any]) -> Section | None:
    functional = document.get("functional")
    if not functional:
        return None
    rows = []
    for name, entry in functional.items():
        if not isinstance(entry, Mapping):
            continue
        variants = [(k, v) for k, v in entry.items() if isinstance(v, Mapping)]
        replaced = entry.get("replaced_layers")
        if "delta_loss" in entry:  # the control: every head's own operator, no layer replaced
            variants, replaced = [("", entry)], 0
        for variant, f in variants:
            rows.append(
                (name, variant, fmt(replaced), _sig(f.get("delta_loss")), _sig(f.get("relative_delta_loss")),
                 fmt(f.get("loss_kind")), _sig(f.get("mean_kl")), _sig(f.get("mean_entropy_shift")))
            )
    blocks = (
        Paragraph("The model run with reconstructed metrics in place of the real ones: change in loss and in attention "
                  "(the control puts each head's own operator back through the same path and must change nothing)."),
        Table(("anchor", "reconstruction", "layers replaced", "Δ loss", "relative Δ loss", "loss", "mean KL",
               "mean entropy shift (nats)"), tuple(rows)),
    )
    return Section("Functional reconstruction", blocks, "functional")


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        return [row for k, v in value.items() for row in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, fmt(value, 6))]


def _run_section(document: Mapping[str, Any], notes: Sequence[str]) -> Section:
    inp = document["input"]
    rows = [
        ("input file", inp["file"]),
        ("layers × heads", f"{inp['num_layers']} × {inp['num_heads']}"),
        ("max rank K", str(inp["max_rank"])),
        ("attention entropy", fmt(inp["has_entropy"])),
        ("qkspectra version", str(document.get("qkspectra_version"))),
        ("schema version", str(document.get("schema_version"))),
    ]
    rows += [(f"metadata.{k}", v) for k, v in _flatten("", inp.get("metadata") or {})]
    blocks: list[Paragraph | Table | Plot] = [Table(("", ""), tuple(rows))]
    blocks += [Paragraph(note, "note") for note in notes]
    return Section("Model, options and metadata", tuple(blocks), "run")


def report_sections(document: Mapping[str, Any], figures: Sequence[str], notes: Sequence[str] = ()) -> list[Section]:
    """The whole report, laid out. figures: names of the plots that exist; notes: remarks (e.g. skipped plots)."""
    optional = (
        _null_section(document),
        _bootstrap_section(document),
        _operator_section(document),
        _rank_k_section(document, figures),
        _functional_section(document),
    )
    return [
        verdict_section(document, figures),
        comparison_section(document),
        _schedule_section(document, figures),
        _shape_section(document, figures),
        _rescale_section(document, figures),
        _entropy_section(document, figures),
        *(s for s in (entropy_links_section(document, figures),) if s is not None),
        _cross_head_section(document, figures),
        seed_section(document),
        *(s for s in optional if s is not None),
        _run_section(document, notes),
    ]
