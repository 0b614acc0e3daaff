"""The layered verdict: what each kind of evidence says, and what all of it supports together.

Four layers, each "supported", "partial", "rejected" or "n/a" with one sentence of evidence:
spectral (the seed's rule on the fitted layers), spectral_vs_null (more alike than chance?),
operator (the full operators) and functional (the model with its operators replaced).
Strategies are compared over their fitted layers, among those with the fewest anchor layers.
Overall: the weakest available layer, and "supported" only with a layer tested against chance.

The method in full: docs/method/verdict.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qkspectra.analysis.seed import NO_FITTED_LAYER, Analysis, seed_rule
from qkspectra.analysis.nulls import NULL_LABELS, RESIDUAL_FITTED_PREFIX, SHAPE_INVARIANCE, FigureNull, NullBaseline

CODES = ("rejected", "partial", "supported")  # weakest first
CHOICE_RULE = "over the fitted layers, among the strategies with the fewest anchor layers"
LAYERS = ("spectral", "spectral_vs_null", "operator", "functional")


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of the layered verdict."""

    alpha: float = 0.05  # a null p-value at most this says "more alike than chance"
    operator_supported: float = 0.10  # mean operator residual, best strategy
    operator_partial: float = 0.30
    functional_supported: float = 0.01  # change of the operator reconstruction (relative loss or cosine distance)
    functional_partial: float = 0.10
    control_tolerance: float = 1e-4  # the control's change above which the functional test is unreliable
    control_multiple: float = 5.0  # changes within this many times the control's are rounding: no change


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Layer:
    """code and one sentence of evidence; brief: the deciding figures in a few words, for the summary."""

    code: str
    evidence: str
    brief: str = ""


@dataclass(frozen=True)
class LayeredVerdict:
    """layers: {name: Layer} in LAYERS order; overall: the combined code; summary: a short paragraph."""

    layers: dict[str, Layer]
    overall: str
    summary: str


def _graded(value: float, supported: float, partial: float) -> str:
    return "supported" if value < supported else "partial" if value < partial else "rejected"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


def spectral_layer(analysis: Analysis) -> Layer:
    """The seed's rule on the primary strategy's mean residual over its fitted layers."""
    rs, anchor = analysis.rescale, analysis.anchor
    fitted = rs.mean_residual_fitted
    if fitted is None:
        return Layer("n/a", f"No spectral fit to judge with the {anchor.strategy} anchor: {NO_FITTED_LAYER}.")
    return Layer(
        seed_rule(fitted),
        f"Mean scalar-rescale residual of the spectra {fitted:.3f} over the {_count(anchor.num_fitted_layers, 'layer')} "
        f"fitted to the {anchor.strategy} anchor ({_count(anchor.num_anchor_layers, 'anchor layer')} left out; over all "
        f"layers, the seed's figure, {rs.mean_residual:.3f}); the seed's rule: supported below 0.10, partial below 0.30.",
        f"mean residual {fitted:.3f} over fitted layers",
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def null_figure_labels(strategy: str) -> dict[str, str]:
    """The figures the null layer compares with chance, for the primary ``strategy``: {figure name: label}."""
    return {SHAPE_INVARIANCE: "shape cosine", RESIDUAL_FITTED_PREFIX + strategy: f"residual ({strategy}, fitted layers)"}


def deciding_null_figures(nulls: dict[str, NullBaseline], strategy: str) -> dict[str, dict[str, FigureNull]]:
    """Per available null, the figures of ``null_figure_labels`` that have a p-value: {null: {figure: FigureNull}}.

    Nulls with no such figure are left out; the null layer judges the others (``beats_null``).
    """
    deciding = {}
    for name, null in nulls.items():
        if not null.available:
            continue
        figures = {}
        for figure in null_figure_labels(strategy):
            f = null.figures.get(figure)
            if f is not None and f.p_value is not None:
                figures[figure] = f
        if figures:
            deciding[name] = figures
    return deciding


def beats_null(figures: dict[str, FigureNull], t: Thresholds = THRESHOLDS) -> bool:
    """A null is beaten when every deciding figure's p-value is at most alpha."""
    return all(f.p_value <= t.alpha for f in figures.values())


def null_layer(nulls: dict[str, NullBaseline] | None, strategy: str, t: Thresholds = THRESHOLDS) -> Layer:
    """Are the real spectra more alike than every available null? (see the module docstring)"""
    if not nulls:
        return Layer("n/a", "No null baseline was computed.")
    if all(null.figures[SHAPE_INVARIANCE].real is None for null in nulls.values()):
        return Layer("n/a", "One layer: no pair of layers to compare, so nothing to compare with chance.")
    labels = null_figure_labels(strategy)
    deciding = deciding_null_figures(nulls, strategy)
    unavailable = [f"{NULL_LABELS.get(name, name)} null unavailable" for name, null in nulls.items() if not null.available]
    beaten, parts, briefs = [], [], []
    for name, figures in deciding.items():
        label = NULL_LABELS.get(name, name)
        described = [f"{labels[figure]} {f.real:.3f} vs {f.null_mean:.3f} ± {f.null_std:.2g}, p = {_p(f.p_value)}"
                     for figure, f in figures.items()]
        brief = [f"{labels[figure].split(' (')[0]} p = {_p(f.p_value)}" for figure, f in figures.items()]
        beaten.append(beats_null(figures, t))
        parts.append(f"{label} null ({nulls[name].draws} draws): " + "; ".join(described))
        briefs.append(f"{label} null: " + ", ".join(brief))
    if not beaten:
        return Layer("n/a", "No null p-value is defined (" + ", ".join(unavailable or ["no figure to compare"]) + ").")
    code = "supported" if all(beaten) else "partial" if any(beaten) else "rejected"
    tail = f" ({', '.join(unavailable)})" if unavailable else ""
    return Layer(code, "; ".join(parts) + f"; a null is beaten when both p <= {t.alpha}{tail}.", "; ".join(briefs))


def stability_against_nulls(comparisons: list[tuple[str, float, float]], t: Thresholds = THRESHOLDS) -> str | None:
    """The seed's stability label held against chance; None without a null.

    comparisons: (null label, the null's mean shape cosine, p-value) for each available null. The
    label comes from fixed cut-offs (0.98, 0.9) that independent random heads pass, so it means
    "more stable than chance" only when every null is beaten (p <= alpha).
    """
    if not comparisons:
        return None
    beaten = [p <= t.alpha for _, _, p in comparisons]
    found = ("more alike across layers than every null" if all(beaten) else
             "more alike than some nulls but not all" if any(beaten) else "no more alike across layers than chance")
    parts = "; ".join(f"{label} {mean:.3f} (p = {_p(p)})" for label, mean, p in comparisons)
    return f"against the nulls' shape cosine, {parts}: {found} (the label is the seed's, by fixed cut-offs)"


def _strategy_entries(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-strategy sub-dicts of part B's results (other keys are ignored)."""
    return {name: value for name, value in results.items() if isinstance(value, dict) and name != "control"}


def eligible_strategies(entries: dict[str, dict[str, Any]], fitted_key: str = "num_fitted_layers") -> dict[str, dict[str, Any]]:
    """The strategies a choice may pick from (see "Choosing among strategies" in the module docstring).

    entries: {strategy: entry}, each with "num_anchor_layers" and ``fitted_key`` (ints). Returns
    those that fit at least one layer and have the fewest anchor layers among them, in their order.
    """
    def counts(entry: dict[str, Any]) -> tuple[int, int] | None:
        anchors, fitted = entry.get("num_anchor_layers"), entry.get(fitted_key)
        if isinstance(anchors, int) and isinstance(fitted, int) and fitted > 0:
            return anchors, fitted
        return None

    usable = {name: entry for name, entry in entries.items() if counts(entry) is not None}
    if not usable:
        return {}
    fewest = min(counts(entry)[0] for entry in usable.values())
    return {name: entry for name, entry in usable.items() if counts(entry)[0] == fewest}


def best_operator_residual(operator: dict[str, Any]) -> tuple[float, str, str] | None:
    """The operator layer's deciding figure: (lowest mean operator residual over the fitted layers, its strategy,
    "same head" or "matched heads") among the eligible strategies; None when no strategy has one."""
    eligible = eligible_strategies(_strategy_entries(operator))
    best = None  # (residual, strategy, kind)
    for name, entry in eligible.items():
        for key, kind in (("mean_residual_fitted", "same head"), ("matched_mean_residual_fitted", "matched heads")):
            value = entry.get(key)
            if isinstance(value, (int, float)) and (best is None or value < best[0]):
                best = (float(value), name, kind)
    return best


def operator_layer(operator: dict[str, Any] | None, t: Thresholds = THRESHOLDS, *, missing: str = "no factors file beside the geometry") -> Layer:
    """The lowest operator residual over the fitted layers (same head or matched) among the eligible strategies."""
    if operator is None:
        return Layer("n/a", f"Operators not compared: {missing}.")
    entries = _strategy_entries(operator)
    best = best_operator_residual(operator)
    if best is None:
        reason = operator.get("reason") or (NO_FITTED_LAYER if entries else "no operator residual in the results")
        return Layer("n/a", f"Operators not compared: {reason}.")
    value, name, kind = best
    entry = entries[name]
    return Layer(
        _graded(value, t.operator_supported, t.operator_partial),
        f"Lowest mean operator residual {value:.3f} ({name} anchor, {kind}, over its "
        f"{_count(entry['num_fitted_layers'], 'fitted layer')}; strategies compared {CHOICE_RULE}, "
        f"{_count(entry['num_anchor_layers'], 'anchor layer')}; supported below {t.operator_supported:.2f}, "
        f"partial below {t.operator_partial:.2f}).",
        f"best operator residual {value:.3f} over fitted layers",
    )


def functional_change(entry: Any) -> float | None:
    """How much one reconstruction changes the model: |relative_delta_loss| (language models) or
    |delta_loss| when that is a cosine distance of final hidden states (encoders); None otherwise."""
    if not isinstance(entry, dict):
        return None
    relative = entry.get("relative_delta_loss")
    if isinstance(relative, (int, float)):
        return abs(float(relative))
    delta = entry.get("delta_loss")
    if entry.get("loss_kind") == "final_hidden_cosine_distance" and isinstance(delta, (int, float)):
        return abs(float(delta))
    return None


def _change_words(change: float, entry: dict[str, Any]) -> str:
    if entry.get("loss_kind") == "final_hidden_cosine_distance":
        return f"moves the final hidden states by a cosine distance of {change:.4f}"
    return f"changes the next-token loss by {100 * change:.2f}%"


@dataclass(frozen=True)
class FunctionalChange:
    """The functional layer's deciding figure.

    measured: the smallest change among the eligible strategies' operator reconstructions; strategy: whose;
    control: the control's change (None when not run); counted: what the verdict grades (0.0 when
    ``measured`` is within ``control_multiple`` times the control's change: rounding, no change).
    """

    measured: float
    strategy: str
    control: float | None
    counted: float


def control_change(functional: dict[str, Any]) -> float | None:
    """The control's change (each head's own operator put back through the same path); None when absent."""
    return functional_change(functional.get("control"))


def smallest_functional_change(functional: dict[str, Any], t: Thresholds = THRESHOLDS) -> FunctionalChange | None:
    """The smallest change of the operator reconstruction among the eligible strategies; None when there is none."""
    eligible = eligible_strategies(_strategy_entries(functional), "replaced_layers")
    best = None  # (change, strategy)
    for name, entry in eligible.items():
        change = functional_change(entry.get("operator"))
        if change is not None and (best is None or change < best[0]):
            best = (change, name)
    if best is None:
        return None
    change, name = best
    control = control_change(functional)
    counted = 0.0 if control is not None and change <= t.control_multiple * control else change
    return FunctionalChange(change, name, control, counted)


def functional_layer(functional: dict[str, Any] | None, t: Thresholds = THRESHOLDS, *, missing: str = "functional test not run") -> Layer:
    """The smallest change of the operator reconstruction among the eligible strategies (see the module docstring)."""
    if functional is None:
        return Layer("n/a", f"No functional evidence: {missing}.")
    control = control_change(functional)
    if control is not None and control > t.control_tolerance:
        return Layer("n/a", f"No functional evidence: the control (each head's own operator) changed the model by {control:.2g}, so the test is unreliable.")
    entries = _strategy_entries(functional)
    best = smallest_functional_change(functional, t)
    if best is None:
        reason = functional.get("reason") or (NO_FITTED_LAYER if entries else "no operator reconstruction in the results")
        return Layer("n/a", f"No functional evidence: {reason}.")
    change, name = best.counted, best.strategy
    entry = entries[name]
    return Layer(
        _graded(change, t.functional_supported, t.functional_partial),
        f"Replacing every head's operator by the anchor's, rescaled, in {_count(entry['replaced_layers'], 'layer')}, "
        f"{_change_words(change, entry['operator'])} ({name} anchor; strategies compared at the same number of replaced "
        f"layers, those with the fewest anchor layers; supported below {t.functional_supported:g}, partial below "
        f"{t.functional_partial:g}).",
        f"change {change:.3g}",
    )


# ----------------------------------------------------------------------------
# Together
# ----------------------------------------------------------------------------


def overall_code(layers: dict[str, Layer]) -> str:
    """The weakest available layer; "supported" needs a layer tested against chance."""
    available = {name: layer.code for name, layer in layers.items() if layer.code != "n/a"}
    if not available:
        return "n/a"
    code = min(available.values(), key=CODES.index)
    if code == "supported" and set(available) <= {"spectral"}:
        return "partial"
    return code


_SENTENCES = {
    "spectral": {
        "supported": "the scalar rescale of the spectra fits within the seed's 10% rule",
        "partial": "the scalar rescale of the spectra captures most of their structure",
        "rejected": "the scalar rescale of the spectra leaves large residuals",
        "n/a": "the spectral fit had no layer to judge (every layer is an anchor layer)",
    },
    "spectral_vs_null": {
        "supported": "the spectra are more alike across layers than chance",
        "partial": "the spectra are more alike than some null baselines but not all",
        "rejected": "the spectra are no more alike across layers than chance",
        "n/a": "the spectral fit was not compared with chance",
    },
    "operator": {
        "supported": "the full operators of different layers are scalar multiples of a shared one",
        "partial": "the full operators of different layers share part of their structure",
        "rejected": "the full operators of different layers share little beyond their spectra",
        "n/a": "the full operators were not compared",
    },
    "functional": {
        "supported": "the model barely notices its operators being replaced by the rescaled shared one",
        "partial": "replacing the operators by the rescaled shared one costs the model noticeably",
        "rejected": "replacing the operators by the rescaled shared one breaks the model",
        "n/a": "the functional test was not run",
    },
}

_CLOSING = {
    "supported": "Taken together, the evidence supports a shared operator rescaled by a per-layer temperature.",
    "partial": "Taken together, the evidence supports a shared operator only in part.",
    "rejected": "Taken together, the evidence does not support a shared operator rescaled by a per-layer temperature.",
    "n/a": "There is no evidence either way.",
}


def _sentence(clauses: list[str]) -> str:
    text = "".join(clauses)
    return text[0].upper() + text[1:] + ". "


def summarize(layers: dict[str, Layer], overall: str) -> str:
    """One short paragraph: what each layer found, then what the whole supports."""
    found, missing, previous = [], [], None
    for name in LAYERS:
        layer = layers[name]
        words = _SENTENCES[name][layer.code]
        if layer.code == "n/a":
            missing.append(words)
            continue
        words = f"{words} ({layer.brief})" if layer.brief else words
        if previous is not None:
            weaker = CODES.index(layer.code) < CODES.index(previous)
            words = (", but " if weaker else ", and ") + words
        found.append(words)
        previous = layer.code
    text = _sentence(found) if found else ""
    if missing:
        text += _sentence([" and ".join(missing)])
    if overall == "partial" and set(n for n in LAYERS if layers[n].code != "n/a") == {"spectral"}:
        text += "The spectral fit alone cannot tell a shared operator from chance (independent random heads pass it). "
    return text + _CLOSING[overall]


def layered_verdict(
    analysis: Analysis,
    nulls: dict[str, NullBaseline] | None = None,
    operator: dict[str, Any] | None = None,
    functional: dict[str, Any] | None = None,
    *,
    strategy: str | None = None,
    thresholds: Thresholds = THRESHOLDS,
    operator_missing: str = "no factors file beside the geometry",
    functional_missing: str = "functional test not run",
) -> LayeredVerdict:
    """Every layer, the overall code and the summary.

    analysis: the primary strategy's analysis (the seed's verdict); strategy: its name in the
    nulls' figures (default: its anchor strategy).
    """
    name = strategy or analysis.anchor.strategy
    layers = {
        "spectral": spectral_layer(analysis),
        "spectral_vs_null": null_layer(nulls, name, thresholds),
        "operator": operator_layer(operator, thresholds, missing=operator_missing),
        "functional": functional_layer(functional, thresholds, missing=functional_missing),
    }
    overall = overall_code(layers)
    return LayeredVerdict(layers, overall, summarize(layers, overall))


ANALYSIS_ONLY_OPERATOR = "the spectra alone were analysed (qkspectra.run, or qkspectra analyze beside the factors file, compares operators)"
ANALYSIS_ONLY_FUNCTIONAL = "the spectra alone were analysed (qkspectra.run on a model runs the functional test)"


def spectral_verdict(analysis: Analysis) -> LayeredVerdict:
    """The layered verdict that one strategy's analysis of the spectra can give: its spectral layer, the others
    n/a with what they need. Its overall is never "supported": the spectral fit alone is not tested against chance."""
    return layered_verdict(analysis, operator_missing=ANALYSIS_ONLY_OPERATOR, functional_missing=ANALYSIS_ONLY_FUNCTIONAL)
