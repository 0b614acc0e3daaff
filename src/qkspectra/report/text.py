"""The terminal report: the seed's sections with its figures at its precision, plus ours, then the one verdict.

Every line the seed analysis prints appears here unchanged (for the seed's
anchors last, middle and best), under a heading that says it reproduces the seed
and that the seed's verdict is not qkspectra's; lines the seed lacks are added
beside them: with null baselines, a "null (NAME): mean ± std, p = ..." line under
each figure they qualify, bootstrap intervals under the correlations, and the
stability label held against the nulls. qkspectra's verdict, the layered one,
comes last (``render_layered_verdict``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkspectra.analysis.bootstrap import BootstrapResult, Interval
from qkspectra.analysis.seed import NO_FITTED_LAYER, Analysis, Correlation
from qkspectra.analysis.nulls import CROSS_HEAD, NULL_LABELS, RESIDUAL_FITTED_PREFIX, RESIDUAL_PREFIX, SHAPE_INVARIANCE, NullBaseline
from qkspectra.analysis.verdict import LayeredVerdict, stability_against_nulls

EXPECTED_SIGN = "(negative expected: larger T → sharper → lower entropy)"
SEED_HEADING = "=== Reproducing the seed: its experiments, its summary and its verdict ==="
SEED_NOT_THE_VERDICT = (
    "  The seed's verdict below is not qkspectra's: it applies the seed's rule to the spectra's residual over all "
    "layers, without chance or operators. qkspectra's verdict is the layered verdict at the end."
)
NO_NULL_LINE = (
    "No null baseline was computed, so no layer of the verdict above is compared with chance "
    "(add --null for null baselines, bootstrap intervals and the spectral_vs_null layer)."
)


def _na(reason: str | None) -> str:
    return f"n/a ({reason})"


def _anchor_words(a: Analysis) -> str:
    if a.anchor.strategy == "group":
        return "per-group anchors " + ", ".join(
            f"L{start}-{stop - 1}→L={int(a.anchor.layers[start])}" for start, stop in a.anchor.groups
        )
    return f"anchor L={a.anchor.layer}"


def _fitted_words(a: Analysis) -> str:
    """'over the 5 fitted layers (anchor layer 5 left out)'."""
    anchors = a.anchor.group_anchors if a.anchor.strategy == "group" else [a.anchor.layer]
    n = a.anchor.num_fitted_layers
    return (f"over the {n} fitted layer{'' if n == 1 else 's'} only (anchor layer{'' if len(anchors) == 1 else 's'} "
            f"{', '.join(map(str, anchors))} left out: an anchor layer fits itself with residual 0)")


def _corr_line(label: str, c: Correlation | None, tail: str, missing: str) -> str:
    if c is None:
        return f"{label} = {_na(missing)}"
    if c.pearson is None:
        return f"{label} = {_na(c.reason)}"
    return f"{label} = {c.pearson:+.3f}  {tail}".rstrip()


def _null_lines(nulls: dict[str, NullBaseline] | None, figure: str, indent: str) -> list[str]:
    """'null (NAME): mean ± std, p = ...' for each available null of one figure."""
    out = []
    for name, null in (nulls or {}).items():
        f = null.figures.get(figure)
        if null.available and f is not None and f.p_value is not None:
            out.append(
                f"{indent}null ({NULL_LABELS.get(name, name)}, {null.draws} draws): "
                f"mean {f.null_mean:.4f} ± {f.null_std:.2g}, p = {f.p_value:.3f}"
            )
    return out


def _interval_line(label: str, i: Interval | None, confidence: float) -> list[str]:
    if i is None or i.low is None:
        return []
    return [f"    {label}: {100 * confidence:g}% bootstrap interval [{i.low:+.3f}, {i.high:+.3f}]"]


def render_report(
    a: Analysis,
    nulls: dict[str, NullBaseline] | None = None,
    bootstrap: BootstrapResult | None = None,
    strategy: str | None = None,
) -> str:
    """The full report of one strategy, as text.

    nulls, bootstrap: shown beside the figures they qualify; strategy: the name of this
    analysis in them (default: its anchor strategy).
    """
    name = strategy or a.anchor.strategy
    g = a.geometry
    si, rs, ch = a.shape_invariance, a.rescale, a.cross_head
    L = g.num_layers
    out: list[str] = [SEED_HEADING, SEED_NOT_THE_VERDICT, "", f"Loaded sigma: shape {g.singular_values.shape}, max rank {g.max_rank}"]

    out += ["", "=== (1) Spectral shape invariance across layers ==="]
    out.append("  per-head mean pairwise cosine of shape across layers:")
    if si.per_head_mean_cos is None:
        out.append(f"    {_na(si.reason)}")
    else:
        c = si.per_head_mean_cos
        out.append(f"    mean {c.mean():.4f}  std {c.std():.4f}  min {c.min():.4f}  max {c.max():.4f}")
        out += _null_lines(nulls, SHAPE_INVARIANCE, "    ")
    if a.anchor.strategy == "best":
        out.append(f"  [auto-anchor] best layer by total shape-cosine: L={a.anchor.layer}")
    if a.anchor.strategy == "group":
        out.append(f"  [auto-anchor] best layer of each group by total shape-cosine: {a.anchor.group_anchors}")

    out += ["", f"=== (2) Scalar rescale fit to {_anchor_words(a)} ==="]
    out.append("  per-layer residual fraction ||σ_L^h - T σ_anchor^h|| / ||σ_L^h||:")
    grouped = a.anchor.strategy == "group"
    out.append(f"  {'L':>3}  {'mean resid':>10}  {'max resid':>10}  {'mean T':>8}" + ("  anchor" if grouped else ""))
    for layer in range(L):
        r, t = rs.residual[layer], rs.T[layer]
        row = f"  {layer:>3}  {r.mean():>10.4f}  {r.max():>10.4f}  {t.mean():>8.3f}"
        out.append(row + (f"  {int(a.anchor.layers[layer]):>6}" if grouped else ""))
    out.append("")
    out.append(f"  overall mean residual: {rs.mean_residual:.4f}")
    out += _null_lines(nulls, RESIDUAL_PREFIX + name, "    ")
    out.append(f"  overall max residual:  {rs.max_residual:.4f}")
    out.append(f"  frac of (L,h) with resid < 0.10: {rs.frac_below(0.10):.3f}")
    out.append(f"  frac of (L,h) with resid < 0.20: {rs.frac_below(0.20):.3f}")
    out.append(f"  {_fitted_words(a)}:")
    if rs.mean_residual_fitted is None:
        out.append(f"    {_na(NO_FITTED_LAYER)}")
    else:
        out.append(f"    mean residual {rs.mean_residual_fitted:.4f}, frac < 0.10: {rs.frac_below_fitted(0.10):.3f}, "
                   f"frac < 0.20: {rs.frac_below_fitted(0.20):.3f}")
        out += _null_lines(nulls, RESIDUAL_FITTED_PREFIX + name, "    ")

    out += ["", "=== (2b) Temperature against attention entropy ==="]
    missing = "the geometry has no dynamic (entropy) section"
    out.append("  " + _corr_line("correlation corr(T_L^h, entropy_L^h)", a.corr_T_entropy, EXPECTED_SIGN, missing))
    if bootstrap is not None:
        out += _interval_line("corr(T, entropy)", bootstrap.corr_T_entropy.get(name), bootstrap.confidence)
    out.append("  " + _corr_line("for comparison, corr(op_norm, entropy)", a.corr_opnorm_entropy, "", missing))
    if bootstrap is not None:
        out += _interval_line("corr(op_norm, entropy)", bootstrap.corr_opnorm_entropy.get(name), bootstrap.confidence)
    for name, c in (("T", a.corr_T_entropy), ("op_norm", a.corr_opnorm_entropy)):
        if c is not None and c.spearman is not None:
            out.append(f"  Spearman rank correlation ({name}, entropy) = {c.spearman:+.3f}")

    out += ["", "=== (3) Cross-head shape similarity within each layer ==="]
    out.append(f"  {'L':>3}  {'mean pair-cos':>14}")
    for layer in range(L):
        cos = "n/a" if ch.per_layer_mean_cos is None else f"{ch.per_layer_mean_cos[layer]:.4f}"
        out.append(f"  {layer:>3}  {cos:>14}")
    if ch.reason:
        out.append(f"  mean pair-cos {_na(ch.reason)}")
    elif nulls:
        out.append(f"  mean over layers: {ch.per_layer_mean_cos.mean():.4f}")
        out += _null_lines(nulls, CROSS_HEAD, "    ")
    heads = sorted({(int(a.anchor.layers[i]), int(ch.typical_head[i])) for i in range(L)})
    refs = ", ".join(f"L={layer} h={h}" for layer, h in heads)
    out.append(
        f"  one spectrum for every head ({refs}, the anchor layer's most typical head): "
        f"mean residual {ch.single_spectrum_residual.mean():.4f}"
    )

    out += ["", "=== Summary ==="]
    if a.anchor.strategy == "group":
        out.append(f"  anchor layers (per group): {a.anchor.group_anchors}")
    else:
        out.append(f"  anchor layer: {a.anchor.layer}")
    if si.mean is None:
        out.append(f"  spectral shape stability across layers: {_na(si.reason)}")
    else:
        out.append(f"  spectral shape is {si.label} across layers (per-head mean pairwise cos = {si.mean:.3f})")
        against = stability_against_nulls(_shape_comparisons(nulls))
        if against:
            out.append(f"    {against}")
    out.append(f"  scalar-rescale fit residual: mean {rs.mean_residual:.3f}")
    if rs.mean_residual_fitted is not None:
        out.append(f"  over the fitted layers only: mean {rs.mean_residual_fitted:.3f}")
    out += ["", "  the seed's verdict (not qkspectra's; see the layered verdict):", f"  {a.verdict_text}"]
    return "\n".join(out) + "\n"


def _shape_comparisons(nulls: dict[str, NullBaseline] | None) -> list[tuple[str, float, float]]:
    """(null label, null mean, p-value) of the shape cosine for each available null."""
    out = []
    for name, null in (nulls or {}).items():
        f = null.figures.get(SHAPE_INVARIANCE)
        if null.available and f is not None and f.p_value is not None:
            out.append((NULL_LABELS.get(name, name), f.null_mean, f.p_value))
    return out


def render_seed_strategies(analyses: dict[str, Analysis]) -> str:
    """The seed's rule on every strategy's all-layer mean residual: part of the seed's reproduction, not the verdict."""
    parts = ", ".join(f"{name} {a.verdict_code} ({a.rescale.mean_residual:.4f})" for name, a in analyses.items())
    return f"  the seed's rule on each strategy's mean residual over all layers (not qkspectra's verdict): {parts}\n"


def render_comparison(analyses: dict[str, Analysis]) -> str:
    """The side-by-side table of every anchor strategy (resid: the seed's mean over all layers; fitted: over the fitted layers)."""
    out = ["", "=== Anchor strategies side by side ==="]
    out.append(
        f"  {'strategy':<8}  {'anchor layer(s)':<18}  {'anchors':>7}  {'fitted':>6}  {'mean resid':>10}  {'fitted resid':>12}  "
        f"{'max resid':>10}  {'frac<0.10':>9}  {'corr(T,ent)':>11}"
    )
    for name, a in analyses.items():
        layers = ",".join(str(x) for x in a.anchor.group_anchors)
        c = a.corr_T_entropy
        corr = "n/a" if c is None or c.pearson is None else f"{c.pearson:+.3f}"
        fitted = a.rescale.mean_residual_fitted
        out.append(
            f"  {name:<8}  {layers:<18}  {a.anchor.num_anchor_layers:>7}  {a.anchor.num_fitted_layers:>6}  "
            f"{a.rescale.mean_residual:>10.4f}  {'n/a' if fitted is None else f'{fitted:.4f}':>12}  "
            f"{a.rescale.max_residual:>10.4f}  {a.rescale.frac_below(0.10):>9.3f}  {corr:>11}"
        )
    out.append("  (mean resid and frac: over all layers, as the seed; fitted resid: over the fitted layers only)")
    return "\n".join(out) + "\n"


def render_null_comparison(analyses: dict[str, Analysis], nulls: dict[str, NullBaseline]) -> str:
    """Each strategy's mean residual over its fitted layers against the nulls (goes under the side-by-side table)."""
    out = ["", "  mean residual over the fitted layers against the null baselines:"]
    for name, a in analyses.items():
        parts = []
        for null_name, null in nulls.items():
            f = null.figures.get(RESIDUAL_FITTED_PREFIX + name)
            if null.available and f is not None and f.p_value is not None:
                parts.append(f"{NULL_LABELS.get(null_name, null_name)} {f.null_mean:.4f} ± {f.null_std:.2g} (p = {f.p_value:.3f})")
        fitted = a.rescale.mean_residual_fitted
        out.append(f"  {name:<8}  {'n/a' if fitted is None else f'{fitted:.4f}':>6}  vs  " + ("; ".join(parts) or "n/a"))
    return "\n".join(out) + "\n"


def render_operator(operator: dict[str, Any], rank_k: dict[str, Any]) -> str:
    """The operator-level section: per strategy, how far M_L^h is from T M_anchor^h as an operator."""
    out = ["", "=== Operator level (from the factors file) ==="]
    out.append("  residual ||M_L^h - T M_a^h||_F / ||M_L^h||_F, mean over the fitted layers (anchor layers left out)")
    out.append("  and, in brackets, over all (L, h), anchor layers included (each fits itself with residual 0);")
    out.append("  k: the rank of the correction T M_a + rank-k that reaches residual < 0.10 (operator level, fitted layers)")
    out.append(
        f"  {'strategy':<8}  {'anchors':>7}  {'fitted':>6}  {'same head':>18}  {'matched':>18}  {'angle (deg)':>11}  "
        f"{'mean k':>7}  {'params':>7}"
    )

    def pair(fitted: float | None, whole: float) -> str:
        return f"{'n/a' if fitted is None else f'{fitted:.4f}'} ({whole:.4f})"

    for name, entry in operator.items():
        angle = float(np.mean(entry["principal_angles_deg_mean"]))
        k = rank_k[name]["operator"]
        mean_k = "n/a" if k["mean_k_fitted"] is None else f"{k['mean_k_fitted']:.1f}"
        out.append(
            f"  {name:<8}  {entry['num_anchor_layers']:>7}  {entry['num_fitted_layers']:>6}  "
            f"{pair(entry['mean_residual_fitted'], entry['mean_residual']):>18}  "
            f"{pair(entry['matched_mean_residual_fitted'], entry['matched_mean_residual']):>18}  {angle:>11.1f}  "
            f"{mean_k:>7}  {k['param_ratio']:>7.2f}"
        )
    return "\n".join(out) + "\n"


def render_layered_verdict(verdict: LayeredVerdict, nulls: dict[str, NullBaseline] | None = None) -> str:
    """The "=== Layered verdict ===" section: notes on the nulls, each layer, the overall code and the summary."""
    out = ["", "=== Layered verdict ==="]
    for name, null in (nulls or {}).items():
        label = NULL_LABELS.get(name, name)
        if not null.available:
            out.append(f"  {label} null unavailable: {null.reason}")
        elif null.reason:
            out.append(f"  {label} null: {null.reason}")
    width = max(len(name) for name in verdict.layers)
    for name, layer in verdict.layers.items():
        out.append(f"  {name:<{width}}  {layer.code:<9}  {layer.evidence}")
    out.append(f"  {'overall':<{width}}  {verdict.overall}")
    out += ["", f"  {verdict.summary}"]
    return "\n".join(out) + "\n"
