"""The whole job from Python, on a bundled model, a path, a model already in memory, or a geometry.

    >>> import qkspectra
    >>> g = qkspectra.extract_geometry(model, tokenizer, max_tokens=4096)   # a Geometry
    >>> r = qkspectra.run(model, tokenizer, max_tokens=4096)                 # a RunResult
    >>> r.verdict.overall, r.verdict.layers["operator"].evidence
    >>> r.heads(), r.figures()["schedule"]
    >>> qkspectra.run("geometry.json")                                       # the analysis part alone
    >>> qkspectra.analyze("geometry.json", anchor="best")                    # an Analysis

``model`` is a bundled name (``"minilm"``), a model folder or .gguf file, or a transformers
``PreTrainedModel`` in memory (any dtype, any device), which is read where it is and left as it
was: nothing is copied to disk, no weight, mode or ``requires_grad`` flag changes (the functional
test rewrites a copy). The options are the command line's, under their Python names (``--no-fold-ln``
is ``fold_ln=False``, ``--no-functional`` ``functional=False``), checked with the same one-line
errors: ``QkspectraError`` (a ``ValueError``) for a bad value, ``QkspectraTypeError`` (a ``TypeError``
too) for a value of the wrong type or an option that does not exist. The work goes through the same
code as ``qkspectra extract`` and ``qkspectra run``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qkspectra.analysis.seed import Analysis
from qkspectra.errors import QkspectraError, QkspectraTypeError, unknown_option
from qkspectra.extract.corpus import DEFAULT_FUNCTIONAL_TOKENS, DEFAULT_MAX_TOKENS
from qkspectra.extract.extraction import ExtractOptions
from qkspectra.geometry import Geometry
from qkspectra.runs import RunResult

EXTRACT_OPTIONS = tuple(field.name for field in dataclasses.fields(ExtractOptions))
RUN_OPTIONS = ("out", *EXTRACT_OPTIONS, "groups", "functional", "functional_tokens", "null_draws", "seed", "scheduler")


def keyword_options(options: Mapping[str, Any], function: str) -> ExtractOptions:
    """``ExtractOptions`` from keyword arguments; QkspectraTypeError naming an unknown option (with the closest
    one) or a value of the wrong type."""
    hints = typing.get_type_hints(ExtractOptions)
    values = {}
    for name, value in options.items():
        if name not in hints:
            raise unknown_option(function, name, EXTRACT_OPTIONS)
        values[name] = checked(name, value, hints[name])
    return ExtractOptions(**values)


def checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` allows (a path for a string; any whole number for an int), or QkspectraTypeError."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif int in allowed and isinstance(value, numbers.Integral):
        return int(value)
    elif float in allowed and isinstance(value, numbers.Real):
        return float(value)
    elif str in allowed and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    words = {bool: "True or False", int: "a whole number", float: "a number", str: "a string or a path", type(None): "None"}
    wanted = " or ".join(words.get(kind, getattr(kind, "__name__", str(kind))) for kind in allowed)
    raise QkspectraTypeError(f"{name} must be {wanted}, got {value!r}")


def model_argument(model: Any, tokenizer: Any | None):
    """A name or path as a string, or a model in memory (transformers or TransformerLens) wrapped as ``InMemoryModel``."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise QkspectraError("tokenizer goes with a model in memory; a bundled name or a path brings its own")
        return os.fspath(model)
    from qkspectra.models.in_memory import in_memory_model
    from qkspectra.models.transformer_lens import is_transformer_lens, transformer_lens_model

    if is_transformer_lens(model):
        return transformer_lens_model(model, tokenizer)
    return in_memory_model(model, tokenizer)


def is_geometry_file(model: Any) -> bool:
    """A path to an existing .json file: a geometry (a model is a bundled name, a folder or a .gguf file)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".json" and Path(model).is_file()


def geometry_argument(geometry: Any, name: str = "geometry") -> Geometry:
    """A ``Geometry`` as it is, or the geometry file a path names (read and validated)."""
    from qkspectra.geometry import load_geometry

    if isinstance(geometry, Geometry):
        return geometry
    if isinstance(geometry, (str, os.PathLike)):
        return load_geometry(geometry)
    raise QkspectraTypeError(f"{name} must be a Geometry or a geometry file's path, got {type(geometry).__name__}")


def extract_geometry(model: Any, tokenizer: Any | None = None, **options: Any) -> Geometry:
    """The geometry of ``model``: per-head metric spectra and (unless ``static_only=True``) attention entropies.

    The same numbers as ``qkspectra extract`` on the same weights; ``metadata`` says where they came from.
    options: those of ``ExtractOptions`` (fold_ln, static_only, corpus, seq_len, max_tokens, window_per_line,
    batch_size, device, dtype, quiet).
    """
    from qkspectra.extract.extraction import geometry_document
    from qkspectra.geometry import parse_geometry
    from qkspectra.workflow.runner import subject_name

    settings = keyword_options(options, "extract_geometry")
    subject = model_argument(model, tokenizer)
    return parse_geometry(geometry_document(subject, options=settings), source=f"<geometry of {subject_name(subject)}>")


def run(
    model: Any,
    tokenizer: Any | None = None,
    out: str | os.PathLike | None = None,
    *,
    fold_ln: bool = True,
    static_only: bool = False,
    corpus: str | os.PathLike | None = None,
    seq_len: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window_per_line: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    quiet: bool = False,
    groups: int | None = None,
    functional: bool = True,
    functional_tokens: int = DEFAULT_FUNCTIONAL_TOKENS,
    null_draws: int = 200,
    seed: int = 0,
    scheduler: str | None = None,
    **unknown: Any,
) -> RunResult:
    """The whole job of ``qkspectra run``: extraction, every anchor strategy, null baselines, bootstrap
    intervals, the operator-level, rank-k and functional tests, and the layered verdict.

    model: a bundled name, a model folder or .gguf file, a model in memory (with its ``tokenizer``),
        or a geometry (a ``Geometry`` or a geometry file's path): then only the analysis runs, on the
        factors file beside the geometry when it has one, and the functional layer is n/a (it needs the model).
    out: the run folder to write (geometry, factors, analysis.json, plots, report.html and .md,
        run.json), reusing an earlier extraction there as the command line does; None: nothing written
        (``RunResult.save`` writes it later).
    The other options are ``qkspectra run``'s (see ``qkspectra run --help``): the extraction's (fold_ln,
    static_only, corpus, seq_len, max_tokens, window_per_line, batch_size, device, dtype; quiet: no progress
    bars), groups (layer groups of the group anchor; default round(sqrt(layers))), functional (run the
    functional test, the slowest part), functional_tokens, null_draws and seed (of the nulls and the
    bootstrap), scheduler (a Dask scheduler's address for the operator-level fits).
    """
    from qkspectra.workflow import folder, runner
    from qkspectra.workflow.cluster import fit_map

    if unknown:
        raise unknown_option("run", next(iter(unknown)), RUN_OPTIONS)
    if isinstance(tokenizer, (str, os.PathLike)):
        kind = "string" if isinstance(tokenizer, str) else "path"
        raise QkspectraTypeError(f"tokenizer must be a tokenizer object, got the {kind} {os.fspath(tokenizer)!r}; "
                                 "the run folder is out=...")
    hints = typing.get_type_hints(ExtractOptions)
    given = {"fold_ln": fold_ln, "static_only": static_only, "corpus": corpus, "seq_len": seq_len, "max_tokens": max_tokens,
             "window_per_line": window_per_line, "batch_size": batch_size, "device": device, "dtype": dtype, "quiet": quiet}
    options = ExtractOptions(**{name: checked(name, value, hints[name]) for name, value in given.items()})
    settings = runner.RunSettings(
        options, checked("groups", groups, int | None), checked("functional", functional, bool),
        checked("functional_tokens", functional_tokens, int), checked("null_draws", null_draws, int),
        checked("seed", seed, int))
    checked("scheduler", scheduler, str | None)
    if out is not None:
        checked("out", out, str)
    if isinstance(model, Geometry) or is_geometry_file(model):
        geometry = geometry_argument(model, "model")
        if tokenizer is not None:
            raise QkspectraError("tokenizer goes with a model in memory; run was given a geometry")
        extraction = [name for name in EXTRACT_OPTIONS if name != "quiet" and getattr(options, name) != getattr(ExtractOptions(), name)]
        if extraction:
            raise QkspectraError(f"{extraction[0]} is an extraction option; run was given a geometry, already extracted")
        with fit_map(scheduler) as layer_pairs_map:
            return RunResult.of(folder.analyse_geometry(geometry, out, settings, map=layer_pairs_map))
    subject = model_argument(model, tokenizer)
    with fit_map(scheduler) as layer_pairs_map:
        if out is None:
            return RunResult.of(runner.run_in_memory(subject, settings, map=layer_pairs_map))
        return RunResult.of(runner.run(subject, Path(out), settings, map=layer_pairs_map))


def _anchor_argument(anchor: Any, groups: Any) -> tuple[str | int, int | None]:
    if isinstance(anchor, numbers.Integral) and not isinstance(anchor, bool):
        anchor = int(anchor)  # numpy integers too
    elif not isinstance(anchor, str):
        raise QkspectraTypeError(f"anchor must be last, middle, best, group or a layer index, got {anchor!r}")
    return anchor, checked("groups", groups, int | None)


def analyze(geometry: Geometry | str | os.PathLike, anchor: str | int = "last", *, groups: int | None = None) -> Analysis:
    """The seed's experiments on a geometry with one anchor strategy: always an ``Analysis``.

    geometry: a ``Geometry`` or a geometry file's path.
    anchor: "last" | "middle" | "best" | "group" | a layer index (negative counts from the end).
        Every strategy at once: ``analyze_all`` (a dict, strategy -> Analysis).
    groups: number of contiguous layer groups for anchor="group".
    """
    from qkspectra.analysis.seed import analyze as analyze_one

    anchor, groups = _anchor_argument(anchor, groups)
    if anchor == "all":
        raise QkspectraError("anchor 'all' gives one analysis per strategy: use analyze_all(geometry), "
                             "a dict strategy -> Analysis (analyze returns one Analysis)")
    return _with_verdict(analyze_one(geometry_argument(geometry), anchor, groups=groups))


def _with_verdict(analysis: Analysis) -> Analysis:
    """The analysis with qkspectra's verdict as far as the spectra can judge it (``verdict.spectral_verdict``)."""
    from qkspectra.analysis.verdict import spectral_verdict

    return dataclasses.replace(analysis, verdict=spectral_verdict(analysis))


def analyze_all(geometry: Geometry | str | os.PathLike, *, groups: int | None = None) -> dict[str, Analysis]:
    """Every anchor strategy's ``Analysis``: {"last": ..., "middle": ..., "best": ..., "group": ...}.

    geometry: a ``Geometry`` or a geometry file's path; groups: layer groups of the group anchor.
    """
    from qkspectra.analysis.seed import analyze_all as analyze_every

    analyses = analyze_every(geometry_argument(geometry), groups=checked("groups", groups, int | None))
    return {name: _with_verdict(a) for name, a in analyses.items()}
