"""The terminal report: the seed's sections with its figures at its precision, plus ours.

Every line the seed analysis prints appears here unchanged (for the seed's
anchors last, middle and best); lines the seed lacks are added beside them.
"""

from __future__ import annotations

from qkspectra.analysis import Analysis, Correlation

EXPECTED_SIGN = "(negative expected: larger T → sharper → lower entropy)"


def _na(reason: str | None) -> str:
    return f"n/a ({reason})"


def _anchor_words(a: Analysis) -> str:
    if a.anchor.strategy == "group":
        return "per-group anchors " + ", ".join(
            f"L{start}-{stop - 1}→L={int(a.anchor.layers[start])}" for start, stop in a.anchor.groups
        )
    return f"anchor L={a.anchor.layer}"


def _corr_line(label: str, c: Correlation | None, tail: str, missing: str) -> str:
    if c is None:
        return f"{label} = {_na(missing)}"
    if c.pearson is None:
        return f"{label} = {_na(c.reason)}"
    return f"{label} = {c.pearson:+.3f}  {tail}".rstrip()


def render_report(a: Analysis) -> str:
    """The full report of one strategy, as text."""
    g = a.geometry
    si, rs, ch = a.shape_invariance, a.rescale, a.cross_head
    L = g.num_layers
    out: list[str] = [f"Loaded sigma: shape {g.singular_values.shape}, max rank {g.max_rank}"]

    out += ["", "=== (1) Spectral shape invariance across layers ==="]
    out.append("  per-head mean pairwise cosine of shape across layers:")
    if si.per_head_mean_cos is None:
        out.append(f"    {_na(si.reason)}")
    else:
        c = si.per_head_mean_cos
        out.append(f"    mean {c.mean():.4f}  std {c.std():.4f}  min {c.min():.4f}  max {c.max():.4f}")
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
    out.append(f"  overall max residual:  {rs.max_residual:.4f}")
    out.append(f"  frac of (L,h) with resid < 0.10: {rs.frac_below(0.10):.3f}")
    out.append(f"  frac of (L,h) with resid < 0.20: {rs.frac_below(0.20):.3f}")

    out += ["", "=== (2b) Temperature against attention entropy ==="]
    missing = "the geometry has no dynamic (entropy) section"
    out.append("  " + _corr_line("correlation corr(T_L^h, entropy_L^h)", a.corr_T_entropy, EXPECTED_SIGN, missing))
    out.append("  " + _corr_line("for comparison, corr(op_norm, entropy)", a.corr_opnorm_entropy, "", missing))
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
    out.append(f"  scalar-rescale fit residual: mean {rs.mean_residual:.3f}")
    out += ["", f"  {a.verdict_text}"]
    return "\n".join(out) + "\n"


def render_comparison(analyses: dict[str, Analysis]) -> str:
    """The side-by-side table of every anchor strategy."""
    out = ["", "=== Anchor strategies side by side ==="]
    out.append(
        f"  {'strategy':<8}  {'anchor layer(s)':<18}  {'mean resid':>10}  {'max resid':>10}  "
        f"{'frac<0.10':>9}  {'corr(T,ent)':>11}  verdict"
    )
    for name, a in analyses.items():
        layers = ",".join(str(x) for x in a.anchor.group_anchors)
        c = a.corr_T_entropy
        corr = "n/a" if c is None or c.pearson is None else f"{c.pearson:+.3f}"
        out.append(
            f"  {name:<8}  {layers:<18}  {a.rescale.mean_residual:>10.4f}  {a.rescale.max_residual:>10.4f}  "
            f"{a.rescale.frac_below(0.10):>9.3f}  {corr:>11}  {a.verdict_code}"
        )
    return "\n".join(out) + "\n"
