"""``qkspectra analyze``: the seed's experiments on a geometry file, what qkspectra adds, and the layered verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qkspectra.cli.app import app, fail, output_file
from qkspectra.cli.run import Scheduler



def parse_anchor(text: str) -> str | int:
    """'last' | 'middle' | 'best' | 'group' | 'all' | a layer index."""
    if text in ("last", "middle", "best", "group", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        fail(f"--anchor {text!r}: choose last, middle, best, group, all or a layer index")


@app.command(epilog="Examples: qkspectra analyze geometry.json --anchor all --null  |  qkspectra analyze geometry.json --json analysis.json")
def analyze(
    path: Annotated[Path, typer.Argument(help="Geometry JSON file (the seed's schema).", show_default=False)],
    anchor: Annotated[
        str, typer.Option(help="last | middle | best | group | INDEX (negative from the end) | all (every strategy side by side).")
    ] = "last",
    groups: Annotated[
        Optional[int], typer.Option(help="Number of contiguous layer groups for --anchor group (default: round(sqrt(layers))).")
    ] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write every figure at full precision to this JSON file.")] = None,
    null: Annotated[
        bool, typer.Option("--null", help="Compare the figures with null baselines (Gaussian heads, shuffled labels), add bootstrap intervals and the layered verdict.")
    ] = False,
    null_draws: Annotated[int, typer.Option(help="Draws of each null baseline (with --null).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the null baselines and the bootstrap (with --null).")] = 0,
    scheduler: Scheduler = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Spectral-shape invariance, scalar-rescale fit to an anchor layer, and cross-head similarity."""
    from qkspectra.atomic import atomic_write_json, refuse_overwriting_inputs
    from qkspectra.analysis.bootstrap import BootstrapOptions
    from qkspectra.analysis.document import AnalysisOptions, fitter_beside, gather_evidence
    from qkspectra.analysis.nulls import MAX_NULL_DRAWS, NullOptions
    from qkspectra.analysis.seed import analyze as run_analysis
    from qkspectra.analysis.seed import analyze_all
    from qkspectra.geometry import load_geometry
    from qkspectra.report.text import (
        NO_NULL_LINE,
        render_comparison,
        render_layered_verdict,
        render_null_comparison,
        render_operator,
        render_report,
        render_seed_strategies,
    )
    from qkspectra.workflow.cluster import fit_map

    json_path = None if json_out is None else output_file(json_out, "--json", "analysis.json")
    choice = parse_anchor(anchor)
    if groups is not None and choice not in ("group", "all"):
        fail("--groups goes with --anchor group or --anchor all")
    if not 1 <= null_draws <= MAX_NULL_DRAWS:
        fail(f"--null-draws {null_draws}: must be between 1 and {MAX_NULL_DRAWS}")
    if not 0 <= seed < 2**63:
        fail(f"--seed {seed}: must be between 0 and 2**63 - 1")

    options = AnalysisOptions(
        groups=groups,
        nulls=NullOptions(shuffle_draws=null_draws, gaussian_draws=null_draws, seed=seed) if null else None,
        bootstrap=BootstrapOptions(seed=seed) if null else None,
    )
    geometry = load_geometry(path)
    if json_path is not None:
        from qkspectra.analysis.factors import factors_path_for

        refuse_overwriting_inputs(json_path, [path, *filter(None, [factors_path_for(geometry)])])
    if choice == "all":
        analyses = analyze_all(geometry, groups=groups)
        primary = "last"
    else:
        primary = choice if isinstance(choice, str) else "index"
        analyses = {primary: run_analysis(geometry, choice, groups=groups)}

    with fit_map(scheduler) as layer_pairs_map:
        fitter, operator_missing = fitter_beside(geometry, map=layer_pairs_map)
        evidence = gather_evidence(geometry, analyses, primary, options, fitter=fitter, operator_missing=operator_missing)

    if json_path is not None:
        atomic_write_json(json_path, evidence.document())
    if not quiet:
        text = render_report(analyses[primary], evidence.nulls, evidence.bootstrap, primary)
        if len(analyses) > 1:
            text += render_seed_strategies(analyses)
            text += render_comparison(analyses)
            if evidence.nulls:
                text += render_null_comparison(analyses, evidence.nulls)
        if evidence.operator is not None:
            text += render_operator(evidence.operator, evidence.rank_k)
        text += render_layered_verdict(evidence.verdict, evidence.nulls)
        if not evidence.nulls:
            text += "\n" + NO_NULL_LINE + "\n"
        typer.echo(text, nl=False)
