"""The report of a run: ``report.html`` (self-contained) and ``report.md``, from ``analysis.json``.

``report_sections(document, figures, notes)`` lays the report out once, as sections of
paragraphs, tables and figures with every number already formatted; ``render_html`` and
``render_markdown`` only typeset that layout, so both carry the same numbers.
``write_report`` renders the plots and writes every file of a report folder atomically.

Sections beyond the seed (null baselines, bootstrap, operator-level, rank-k and functional
reconstruction, the layered verdict) appear when their keys are in the document.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkspectra._io import atomic_write_bytes, atomic_write_text
from qkspectra.analysis.seed import VERDICT_TEXT, seed_rule
from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry
from qkspectra.analysis.verdict import CHOICE_RULE, eligible_strategies

PLOTS_FOLDER = "plots"

FIGURE_CAPTIONS = {
    "schedule": "Mean temperature T per layer (band: interquartile range over heads) for every anchor strategy, "
    "and the mean rescale residual of each layer. The hypothesis predicts a smooth schedule with small residuals.",
    "temperature_heatmap": "T of every head (layer × head), one panel per anchor strategy.",
    "residual_heatmap": "Rescale residual ||σ − Tσ_anchor|| / ||σ|| of every head, one panel per anchor strategy.",
    "spectral_shapes": "Each head's spectral shape σ_k/σ_1 at every layer (colour = depth). Overlapping lines mean the "
    "shape is invariant across depth, as the hypothesis requires.",
    "entropy_scatter": "T (each anchor strategy) and operator norm σ_1 against the head's mean attention entropy; "
    "colour = layer.",
    "entropy_by_position": "Each layer's attention entropy against query position (log2 buckets; thin lines: heads, "
    "thick: their mean), beside the log of the number of keys the queries see (uniform attention).",
    "cross_head": "Mean pairwise shape cosine between the heads of each layer, and the residual when every head is "
    "fit to one spectrum.",
    "rank_k": "Mean residual over the fitted layers of scalar rescale plus a rank-k correction, against k.",
}


# ----------------------------------------------------------------------------
# The layout
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Paragraph:
    text: str
    style: str | None = None  # "verdict-supported" | "verdict-partial" | "verdict-rejected" | "note" | None


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Plot:
    name: str  # file stem under plots/
    caption: str


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Paragraph | Table | Plot, ...]
    anchor: str = field(default="")


def fmt(x: Any, digits: int = 4, *, signed: bool = False) -> str:
    """A figure for the report: n/a for None, fixed decimals for floats."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return format(x, f"{'+' if signed else ''}.{digits}f")
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits, signed=signed) for v in x)
    return str(x)


def _sig(x: Any) -> str:
    """Three significant digits, so that a control's 1e-17 does not print as 0.0000."""
    return "n/a" if x is None else format(x, ".3g")


def _mean(rows: Sequence[Sequence[float]] | None) -> float | None:
    """Mean of an (L, H) nested list; None when absent or empty."""
    if not rows:
        return None
    values = [v for row in rows for v in row if v is not None]
    return sum(values) / len(values) if values else None


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


def _verdict_style(code: Any) -> str | None:
    return f"verdict-{code}" if code in ("supported", "partial", "rejected") else None


def _verdict_section(document: Mapping[str, Any]) -> Section:
    blocks: list[Paragraph | Table | Plot] = []
    verdict = document.get("verdict") or {}
    overall, summary, layers = verdict.get("overall"), verdict.get("summary"), verdict.get("layers")
    if overall or summary:
        head = f"Overall: {str(overall).upper()}. " if overall else ""
        blocks.append(Paragraph(head + str(summary or ""), _verdict_style(overall)))
    if layers:
        blocks.append(
            Table(
                ("level", "verdict", "evidence"),
                tuple((name, fmt(v.get("code")), fmt(v.get("evidence"))) for name, v in layers.items()),
            )
        )
    per = strategies(document)
    primary = document["anchor"]["strategy"]
    blocks.append(
        Paragraph(f"Scalar-rescale verdict (the seed's), anchor {primary}: {verdict.get('text', 'n/a')}", _verdict_style(verdict.get("code")))
    )
    best = best_strategy(per) if len(per) > 1 else None
    if best is not None:
        s = per[best]
        fitted = s["rescale"]["mean_residual_fitted"]
        code = seed_rule(fitted)
        blocks.append(
            Paragraph(
                f"The seed's rule with the best anchor strategy by mean residual over the layers it fits, {best} "
                f"(anchor layer(s) {fmt(s['anchor']['group_anchors'])}, {fmt(s['anchor']['num_fitted_layers'])} fitted "
                f"layers, mean residual {fmt(fitted)} over them, {fmt(s['rescale']['mean_residual'])} over all layers; "
                f"strategies compared {CHOICE_RULE}): {VERDICT_TEXT[code]}",
                _verdict_style(code),
            )
        )
    return Section("Verdict", tuple(blocks), "verdict")


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


def _comparison_section(document: Mapping[str, Any]) -> Section:
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
                s["verdict"]["code"],
            )
        )
    table = Table(
        ("strategy", "anchor layer(s)", "anchors", "fitted layers", "mean resid (fitted)", "mean resid (all, seed)",
         "max resid", "frac < 0.10 (fitted)", "frac < 0.20 (fitted)", "corr(T, entropy)", "one-spectrum resid",
         "seed's verdict"),
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
        _verdict_section(document),
        _comparison_section(document),
        _schedule_section(document, figures),
        _shape_section(document, figures),
        _rescale_section(document, figures),
        _entropy_section(document, figures),
        _cross_head_section(document, figures),
        *(s for s in optional if s is not None),
        _run_section(document, notes),
    ]


# ----------------------------------------------------------------------------
# Typesetting
# ----------------------------------------------------------------------------

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #f6f7f9;
       margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.2rem 1.5rem 3rem; background: #fff; }
h1 { font-size: 1.5rem; margin: 0.2rem 0; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #dde1e7; padding-bottom: 0.2rem; }
.subtitle { color: #555e6d; margin: 0 0 0.8rem; }
nav { font-size: 0.9rem; margin-bottom: 1rem; }
nav a { margin-right: 0.8rem; color: #2f5fa5; }
p.verdict-supported, p.verdict-partial, p.verdict-rejected { padding: 0.6rem 0.9rem; border-radius: 6px;
       font-weight: 600; border-left: 6px solid; }
p.verdict-supported { background: #e8f6ec; border-color: #2e9a4d; }
p.verdict-partial { background: #fff5e0; border-color: #e09b1a; }
p.verdict-rejected { background: #fdeceb; border-color: #cc3b30; }
p.note { color: #6b5a00; background: #fffbe6; padding: 0.3rem 0.6rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.6rem 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #e6e9ee; text-align: right; white-space: nowrap; }
th { background: #f0f2f5; }
td:first-child, th:first-child, th.text { text-align: left; }
td.text { text-align: left; white-space: normal; max-width: 40rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e6e9ee; }
figcaption { font-size: 0.88rem; color: #555e6d; }
"""

# Runs in the page: records whether every image decoded, for the browser test and for readers.
IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  document.body.dataset.imagesTotal = String(images.length);
  document.body.dataset.imagesBroken = String(broken.length);
  document.body.dataset.imagesOk = broken.length === 0 ? "true" : "false";
});
"""

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _numeric(cell: str) -> bool:
    """A figure (or n/a, or blank): right-aligned in tables."""
    return cell.lstrip("+-").replace(".", "", 1).replace("e-", "", 1).isdigit() or cell in ("n/a", "")


def _numeric_columns(table: Table) -> list[bool]:
    """Which columns hold figures only (right-aligned); the first column is always a label."""
    return [i > 0 and all(_numeric(row[i]) for row in table.rows) for i in range(len(table.columns))]


def _html_block(block: Paragraph | Table | Plot, images: Mapping[str, bytes]) -> str:
    if isinstance(block, Paragraph):
        cls = f' class="{_e(block.style)}"' if block.style else ""
        return f"<p{cls}>{_e(block.text)}</p>"
    if isinstance(block, Table):
        cls = ["" if n else ' class="text"' for n in _numeric_columns(block)]
        head = "".join(f"<th{c}>{_e(name)}</th>" for c, name in zip(cls, block.columns)) if any(block.columns) else ""
        body = "".join("<tr>" + "".join(f"<td{c}>{_e(cell)}</td>" for c, cell in zip(cls, row)) + "</tr>" for row in block.rows)
        thead = f"<thead><tr>{head}</tr></thead>" if head else ""
        return f'<div class="table-wrap"><table>{thead}<tbody>{body}</tbody></table></div>'
    data = base64.b64encode(images[block.name]).decode("ascii")
    return (
        f'<figure id="fig-{_e(block.name)}"><img src="data:image/png;base64,{data}" alt="{_e(block.caption)}">'
        f"<figcaption>{_e(block.caption)}</figcaption></figure>"
    )


def render_html(document: Mapping[str, Any], images: Mapping[str, bytes], notes: Sequence[str] = ()) -> str:
    """report.html: one self-contained page (inline CSS, images as data URIs, no network request).

    images: plot name -> PNG bytes, in report order.
    """
    sections = report_sections(document, list(images), notes)
    title = f"qkspectra report: {model_name(document)}"
    nav = "".join(f'<a href="#{_e(s.anchor)}">{_e(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{_e(s.anchor)}"><h2>{_e(s.title)}</h2>\n' + "\n".join(_html_block(b, images) for b in s.blocks) + "</section>"
        for s in sections
    )
    return html_page(title, describe_run(document), nav, body)


def html_page(title: str, subtitle: str, nav: str, body: str, css: str = "") -> str:
    """A self-contained page: inline CSS (the report's, then ``css``), the image check, no network request.
    nav and body are HTML already escaped; title and subtitle are text."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}{css}</style>\n<script>{IMAGE_CHECK}</script>\n</head>\n"
        f'<body>\n<main>\n<h1>{_e(title)}</h1>\n<p class="subtitle">{_e(subtitle)}</p>\n'
        f"<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_block(block: Paragraph | Table | Plot) -> str:
    if isinstance(block, Paragraph):
        if block.style and block.style.startswith("verdict-"):
            return f"**{block.text}**"
        return f"> {block.text}" if block.style == "note" else block.text
    if isinstance(block, Table):
        columns = [(_md_cell(c) or " ") for c in block.columns]
        rule = "|".join("---:" if numeric else "---" for numeric in _numeric_columns(block))
        lines = ["| " + " | ".join(columns) + " |", f"|{rule}|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    return f"![{block.name}]({PLOTS_FOLDER}/{block.name}.png)\n\n*{block.caption}*"


def render_markdown(document: Mapping[str, Any], figures: Sequence[str], notes: Sequence[str] = ()) -> str:
    """report.md: the same sections and numbers; images referenced as plots/NAME.png."""
    sections = report_sections(document, figures, notes)
    out = [f"# qkspectra report: {model_name(document)}", "", describe_run(document)]
    for s in sections:
        out += ["", f"## {s.title}"]
        for block in s.blocks:
            out += ["", _md_block(block)]
    return "\n".join(out) + "\n"


def render_summary(document: Mapping[str, Any]) -> str:
    """Terminal text after a run: the strategy table, then the verdict(s)."""
    sections = [_comparison_section(document), _verdict_section(document)]
    out: list[str] = []
    for s in sections:
        out += ["", f"=== {s.title} ==="]
        for block in s.blocks:
            if isinstance(block, Table):
                widths = [max(len(c), *(len(r[i]) for r in block.rows)) for i, c in enumerate(block.columns)]
                out.append("  " + "  ".join(c.ljust(w) for c, w in zip(block.columns, widths)).rstrip())
                out += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in block.rows]
            elif isinstance(block, Paragraph):
                out.append(f"  {block.text}")
    return "\n".join(out) + "\n"


# The page's rules a fragment needs (verdict paragraphs, tables), scoped to the fragment.
_FRAGMENT_SELECTORS = ("p.verdict", "p.note", ".table-wrap", "table", "th", "td")


def render_html_summary(document: Mapping[str, Any]) -> str:
    """The verdict and the strategy table as an HTML fragment (a run's display in Jupyter), styled as the page."""
    rules = re.findall(r"([^{}]+)\{([^{}]*)\}", CSS)
    css = "".join(", ".join(f".qkspectra {part.strip()}" for part in selectors.split(",")) + f" {{{body}}}"
                  for selectors, body in rules if selectors.strip().startswith(_FRAGMENT_SELECTORS))
    sections = [_verdict_section(document), _comparison_section(document)]
    body = "".join(f"<h3>{_e(s.title)}</h3>" + "".join(_html_block(b, {}) for b in s.blocks) for s in sections)
    return (f'<div class="qkspectra"><style>{css}</style><p>{_e("qkspectra: " + describe_run(document))}</p>'
            f"{body}</div>")


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    plots: dict[str, Path]  # name -> PNG file
    html: Path | None
    markdown: Path | None
    notes: tuple[str, ...]  # what was left out and why


def render_plots(document: Mapping[str, Any], geometry: Geometry | None) -> tuple[dict[str, bytes], tuple[str, ...]]:
    """Every plot the inputs allow, as PNG bytes in report order, and a note per plot left out."""
    from qkspectra.report.plots import png_bytes, report_figures

    figure_set = report_figures(document, geometry, title=describe_run(document))
    images = {name: png_bytes(fig) for name, fig in figure_set.figures.items()}
    notes = tuple(f"plot {name} left out: {reason}" for name, reason in figure_set.skipped.items())
    return images, notes


def report_paths(out_dir: Path, *, pages: bool = True) -> list[Path]:
    """Every file a report (or, without ``pages``, a set of plots) may write in ``out_dir``."""
    plots = [out_dir / PLOTS_FOLDER / f"{name}.png" for name in FIGURE_CAPTIONS]
    return plots + ([out_dir / "report.html", out_dir / "report.md"] if pages else [])


def check_writable(paths: list[Path]) -> None:
    """QkspectraError, before anything is written, if a folder or a file stands where one of ``paths`` must go."""
    for path in paths:
        if path.is_dir():
            raise QkspectraError(f"cannot write {path}: it is a folder")
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise QkspectraError(f"cannot write {path}: {blocking} is a file, not a folder")


def _write_images(images: Mapping[str, bytes], out_dir: Path) -> dict[str, Path]:
    return {name: atomic_write_bytes(out_dir / PLOTS_FOLDER / f"{name}.png", png) for name, png in images.items()}


def write_plots(document: Mapping[str, Any], geometry: Geometry | None, out_dir: str | Path) -> ReportFiles:
    """out_dir/plots/NAME.png for every plot."""
    check_writable(report_paths(Path(out_dir), pages=False))
    images, notes = render_plots(document, geometry)
    return ReportFiles(_write_images(images, Path(out_dir)), None, None, notes)


def write_report(document: Mapping[str, Any], geometry: Geometry | None, out_dir: str | Path) -> ReportFiles:
    """out_dir/plots/*.png, out_dir/report.html and out_dir/report.md, each written atomically."""
    out_dir = Path(out_dir)
    check_writable(report_paths(out_dir))
    images, notes = render_plots(document, geometry)
    page, markdown = render_html(document, images, notes), render_markdown(document, list(images), notes)
    paths = _write_images(images, out_dir)  # only once everything has rendered
    html_path = atomic_write_text(out_dir / "report.html", page)
    md_path = atomic_write_text(out_dir / "report.md", markdown)
    return ReportFiles(paths, html_path, md_path, notes)
