"""``qkspectra run``: extract (or reuse), analyze and report, into one folder.

    DIR/geometry.json                  the extraction (plus geometry.factors.safetensors)
    DIR/analysis.json                  every figure (operator-level and rank-k ones from the factors,
                                       functional ones on request); the same inputs give the same bytes
    DIR/plots/*.png, DIR/report.html, DIR/report.md
    DIR/run.json                       what ran: cache key, dates, timings

The extraction is reused when ``run.json`` holds the same cache key (model identity read from
the file system, extraction options, qkspectra version) and the geometry and factors files are
unchanged; a model in memory is extracted every time. ``run_in_memory`` does the same job
without writing anything (the factors stay in memory). ``workflow.folder`` completes a folder from
results computed elsewhere (a geometry given, a run in memory, a folder read back).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import orjson

from qkspectra.version import __version__
from qkspectra.atomic import atomic_write_json
from qkspectra.errors import QkspectraError, option
from qkspectra.extract.extraction import MAX_TOKENS_LIMIT, ExtractOptions
from qkspectra.geometry import Geometry
from qkspectra.report.files import check_writable
from qkspectra.report.run_page import ReportFiles, report_paths, write_report

if TYPE_CHECKING:
    import numpy as np

    from qkspectra.models.in_memory import InMemoryModel
    from qkspectra.models.subject import Subject

GEOMETRY_FILE = "geometry.json"
ANALYSIS_FILE = "analysis.json"
RUN_FILE = "run.json"
NOT_IN_KEY = ("quiet",)  # options that cannot change the extraction


@dataclass(frozen=True)
class RunSettings:
    """What a run is given: the options of ``qkspectra run``."""

    options: ExtractOptions = ExtractOptions()
    groups: int | None = None  # layer groups of the group anchor; None: round(sqrt(layers))
    functional: bool = True  # run the functional test (the slowest part)
    functional_tokens: int | None = None  # corpus tokens of the functional test; None: its default budget
    null_draws: int = 200  # draws of each null baseline (Gaussian heads, shuffled labels)
    seed: int = 0  # seed of the null baselines and the bootstrap

    def analysis_options(self):
        """The ``AnalysisOptions`` of these settings (nulls and bootstrap as ``qkspectra analyze --null`` draws them)."""
        from qkspectra.analysis.bootstrap import BootstrapOptions
        from qkspectra.analysis.document import AnalysisOptions
        from qkspectra.analysis.nulls import NullOptions

        nulls = NullOptions(shuffle_draws=self.null_draws, gaussian_draws=self.null_draws, seed=self.seed)
        return AnalysisOptions(groups=self.groups, nulls=nulls, bootstrap=BootstrapOptions(seed=self.seed))


def _file_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _tree_stamp(path: Path) -> list[dict[str, Any]]:
    """Every file under a folder (or the file itself), with size and modification time."""
    if path.is_file():
        return [_file_stamp(path)]
    return [dict(_file_stamp(f), name=str(f.relative_to(path))) for f in sorted(path.rglob("*")) if f.is_file()]


def model_identity(model: str) -> dict[str, Any]:
    """What tells this model apart from another, read without loading it."""
    from qkspectra.models.bundled import BUNDLED_MODELS, bundled_model_version

    if model in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[model]
        return {"bundled": model, "package": bundled.distribution, "version": bundled_model_version(model)}
    path = Path(model).expanduser()
    if not path.exists():
        known = ", ".join(BUNDLED_MODELS)
        raise QkspectraError(f"model {model!r} is neither a bundled model ({known}) nor an existing path")
    return {"path": str(path.resolve()), "files": _tree_stamp(path)}


def subject_name(model: str | InMemoryModel) -> str:
    """What the user called the model: the name or path given, or the in-memory model's own name."""
    return model if isinstance(model, str) else model.model_id


def cache_key(model: str | InMemoryModel, options: ExtractOptions) -> dict[str, Any] | None:
    """The extraction's inputs: equal keys give the same geometry. None for a model in memory (never reused)."""
    if not isinstance(model, str):
        return None
    settings = {k: v for k, v in asdict(options).items() if k not in NOT_IN_KEY}
    corpus = None if options.corpus is None else {"path": str(Path(options.corpus).resolve()), "files": _tree_stamp(Path(options.corpus))}
    return {"qkspectra_version": __version__, "model": model_identity(model), "options": settings, "corpus": corpus}


def default_out_dir(model: str, cwd: Path | None = None) -> Path:
    """./NAME for a bundled model, ./STEM for a folder or file (./STEM-qkspectra if that is the model itself)."""
    from qkspectra.models.bundled import BUNDLED_MODELS

    cwd = Path.cwd() if cwd is None else cwd
    if model in BUNDLED_MODELS:
        return cwd / model
    path = Path(model).expanduser().resolve()
    out = cwd / path.stem
    if out.resolve() == path or path in out.resolve().parents:
        out = cwd / f"{path.stem}-qkspectra"
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _previous_run(out_dir: Path) -> dict[str, Any]:
    try:
        record = orjson.loads((out_dir / RUN_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _factors_stamp(geometry_path: Path) -> dict[str, Any] | None:
    from qkspectra.extract.extraction import factors_path

    factors = factors_path(geometry_path)
    return _file_stamp(factors) if factors.is_file() else None


def reusable_geometry(out_dir: Path, key: dict[str, Any]) -> bool:
    """True when out_dir holds the geometry and factors file of this cache key, unchanged since they were written."""
    previous = _previous_run(out_dir)
    geometry = out_dir / GEOMETRY_FILE
    return (
        previous.get("cache_key") == key
        and geometry.is_file()
        and previous.get("geometry_sha256") == _sha256(geometry)
        and previous.get("factors_file") is not None
        and previous.get("factors_file") == _factors_stamp(geometry)
    )


NO_MODEL = "functional test not run: the run was given a geometry, not a model (the test runs the model)"


def analysis_document(
    geometry: Geometry,
    factors: Path | dict[str, np.ndarray] | None,
    settings: RunSettings = RunSettings(),
    *,
    model: str | InMemoryModel | Subject | None = None,
    map: Callable | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The analysis document with the operator-level section (when the factors exist) and the rank-k one.

    factors: the factors file, or the factors themselves (as ``Extraction.factors`` keeps them); None: none.
    model: the geometry's model, for the functional test (run when ``settings.functional``), on the
    corpus, device and dtype of ``settings.options``. The model runs once per reconstruction and anchor strategy;
    None: the functional layer is n/a (``NO_MODEL`` when the test was asked for).
    map: how the operator analysis' layer-pair fits run (see ``operator_fit.OperatorFitter``; None: a thread per core).
    progress(stage, done, total): after each layer and layer pair of the operator-level fits.
    timings: receives ``operator_s`` (the operator-level fits) and ``operator_layer_pairs``.
    """
    from qkspectra.analysis.document import NO_FUNCTIONAL, build_analysis_document
    from qkspectra.analysis.factors import as_factors
    from qkspectra.analysis.operator_fit import OperatorFitter
    from qkspectra.analysis.rank_k import rank_k_evidence
    from qkspectra.analysis.seed import analyze_all

    options = settings.analysis_options()
    analyses = analyze_all(geometry, groups=settings.groups)
    anchors = {name: a.anchor for name, a in analyses.items()}
    fitter = None
    if isinstance(factors, dict) or (factors is not None and factors.is_file()):  # a file is read one layer at a time
        clock = time.perf_counter()
        fitter = OperatorFitter(as_factors(factors, geometry), map=map, on_step=progress)
        pairs = {(layer, int(a)) for anchor in anchors.values() for layer, a in enumerate(anchor.layers)}
        fitter.fit_pairs(pairs)
        if timings is not None:
            timings["operator_s"] = round(time.perf_counter() - clock, 3)
            timings["operator_layer_pairs"] = len(pairs)
    if model is None or not settings.functional:
        missing = NO_MODEL if model is None and settings.functional else NO_FUNCTIONAL
        return build_analysis_document(geometry, options, fitter=fitter, analyses=analyses, functional_missing=missing)

    from qkspectra.analysis.reconstruction.evidence import functional_evidence
    from qkspectra.extract.corpus import DEFAULT_FUNCTIONAL_TOKENS

    rank_k = rank_k_evidence(geometry, anchors, fitter=fitter)
    if fitter is not None:  # the model comes next: the fits' layers are not held beside it
        fitter.drop_layers()
    tokens = DEFAULT_FUNCTIONAL_TOKENS if settings.functional_tokens is None else settings.functional_tokens
    functional = functional_evidence(model, geometry, anchors, rank_k, settings.options, max_tokens=tokens)
    return build_analysis_document(geometry, options, fitter=fitter, rank_k=rank_k, functional=functional,
                                   analyses=analyses)


def check_settings(settings: RunSettings) -> None:
    """Reject impossible settings before any model is read (the number of groups is checked against the model later)."""
    from qkspectra.extract.extraction import check_options

    from qkspectra.analysis.nulls import MAX_NULL_DRAWS

    check_options(settings.options)
    tokens = settings.functional_tokens
    if tokens is not None and not 2 <= tokens <= MAX_TOKENS_LIMIT:
        raise QkspectraError(f"{option('functional_tokens')} must be between 2 and 10^12, got {tokens}")
    if not 1 <= settings.null_draws <= MAX_NULL_DRAWS:
        raise QkspectraError(f"{option('null_draws')} {settings.null_draws}: must be between 1 and {MAX_NULL_DRAWS}")
    if not 0 <= settings.seed < 2**63:
        raise QkspectraError(f"{option('seed')} {settings.seed}: must be between 0 and 2**63 - 1")


def check_groups(groups: int | None, num_layers: int | None = None) -> None:
    """groups between 1 and the number of layers (only at least 1 while that number is not known)."""
    if groups is None or (groups >= 1 and (num_layers is None or groups <= num_layers)):
        return
    count = "" if num_layers is None else f" ({num_layers})"
    raise QkspectraError(f"{option('groups')} {groups}: must be between 1 and the number of layers{count}")


@dataclass(frozen=True)
class RunFolder:
    """What ``run`` wrote into ``out_dir``."""

    out_dir: Path
    document: dict[str, Any]  # the analysis document written to analysis.json
    extracted: bool  # False when the geometry was reused
    report: ReportFiles
    geometry: Geometry | None = None  # the geometry analysed
    record: dict[str, Any] | None = None  # what run.json holds


@dataclass(frozen=True, eq=False)
class RunInMemory:
    """What ``run_in_memory`` or ``analyse_geometry`` computed, nothing written: what ``save_run`` needs to write the folder."""

    geometry: Geometry
    document: dict[str, Any]  # the analysis document
    factors: dict[str, np.ndarray] | None  # the factors file's tensors, (L, ...) float32; None: not extracted here
    record: dict[str, Any]  # run.json's content, the files' stamps (geometry_sha256, factors_file) left to save_run


def new_record(model: str, key: dict[str, Any] | None, settings: RunSettings) -> dict[str, Any]:
    """run.json at the start of a run: what ran with which settings; files, dates and timings filled in as it goes."""
    return {
        "qkspectra_version": __version__,
        "model": model,
        "cache_key": key,
        "geometry_sha256": None,
        "factors_file": None,  # name, size and modification time of the factors file
        "extraction": None,  # "performed", "reused", or "given" (the run was given a geometry)
        "groups": settings.groups,
        "functional": settings.functional,
        "functional_tokens": settings.functional_tokens,
        "null_draws": settings.null_draws,
        "seed": settings.seed,
        "started": now(),
        "finished": None,  # stays null if the run stops after the extraction
        "timings": {},
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_outputs(out_dir: Path) -> list[Path]:
    """Every file a run folder holds."""
    from qkspectra.extract.extraction import factors_path

    geometry_path = out_dir / GEOMETRY_FILE
    return [geometry_path, factors_path(geometry_path), out_dir / ANALYSIS_FILE, out_dir / RUN_FILE, *report_paths(out_dir)]


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise QkspectraError(f"output {out_dir} exists and is not a folder")


def stamp_files(record: dict[str, Any], geometry_path: Path) -> None:
    record["geometry_sha256"] = _sha256(geometry_path)
    record["factors_file"] = _factors_stamp(geometry_path)


def run(
    model: str | InMemoryModel,
    out_dir: str | Path,
    settings: RunSettings = RunSettings(),
    *,
    map: Callable | None = None,
    say: Callable[[str], None] = lambda _: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RunFolder:
    """Extract (or reuse), analyze with every anchor strategy (and the functional test when
    ``settings.functional``, see ``analysis_document``), and write the report folder.

    map: how the operator analysis' layer-pair fits run (``cluster.cluster_map(client)``: on a Dask cluster).
    say: receives one line per step, for the user.
    progress: progress(stage, done, total) within the long steps (the operator-level fits).
    """
    from qkspectra.extract.extraction import factors_path, refuse_overwriting_inputs_of
    from qkspectra.geometry import load_geometry

    from qkspectra.models.subject import Subject

    check_settings(settings)
    options, groups = settings.options, settings.groups
    check_groups(groups)  # and against the number of layers, below
    subject = Subject(model, progress=not options.quiet)  # resolved and read once, when first needed
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    geometry_path = out_dir / GEOMETRY_FILE
    outputs = run_outputs(out_dir)
    refuse_overwriting_inputs_of(model, options, outputs)
    check_writable(outputs)
    key = cache_key(model, options)
    record = new_record(subject_name(model), key, settings)
    timings = record["timings"]

    geometry = load_geometry(geometry_path) if key is not None and reusable_geometry(out_dir, key) else None
    if groups is not None:  # checked against the model before anything is extracted or written
        check_groups(groups, geometry.num_layers if geometry is not None else subject.adapter.num_layers)
    if geometry is not None:
        say(f"reusing {geometry_path} (same model and options)")
        record["extraction"] = "reused"
    else:
        from qkspectra.extract.extraction import extract_to_files

        say(f"extracting the geometry of {subject_name(model)}")
        clock = time.perf_counter()
        extract_to_files(subject, geometry_path, options=options)
        timings["extract_s"] = round(time.perf_counter() - clock, 3)
        record["extraction"] = "performed"
    stamp_files(record, geometry_path)
    atomic_write_json(out_dir / RUN_FILE, record)  # the extraction is reusable even if what follows fails

    clock = time.perf_counter()
    if geometry is None:
        geometry = load_geometry(geometry_path)
    say("analysing: operator-level fits, every anchor strategy, null baselines, bootstrap intervals, rank-k"
        + (f", then the functional test on {subject_name(model)}" if settings.functional else ""))
    document = analysis_document(geometry, factors_path(geometry_path), settings, model=subject, map=map,
                                 progress=progress, timings=timings)
    timings["analyze_s"] = round(time.perf_counter() - clock, 3)
    return write_results(out_dir, geometry, document, record, say)


def write_results(out_dir: Path, geometry: Geometry, document: dict[str, Any], record: dict[str, Any],
                   say: Callable[[str], None]) -> RunFolder:
    """analysis.json, the plots and report pages, then run.json (marked finished): the end of every run folder."""
    atomic_write_json(out_dir / ANALYSIS_FILE, document)
    clock = time.perf_counter()
    say(f"writing plots and report in {out_dir}")
    report = write_report(document, geometry, out_dir)
    record["timings"]["report_s"] = round(time.perf_counter() - clock, 3)
    if record["finished"] is None:
        record["finished"] = now()
    atomic_write_json(out_dir / RUN_FILE, record)
    return RunFolder(out_dir, document, record["extraction"] == "performed", report, geometry, record)


def run_in_memory(
    model: str | InMemoryModel,
    settings: RunSettings = RunSettings(),
    *,
    map: Callable | None = None,
    say: Callable[[str], None] = lambda _: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RunInMemory:
    """The job of ``run`` without writing anything: the geometry, the analysis document, the factors (kept in
    memory, for ``save_run``) and the run's record."""
    from qkspectra.extract.extraction import run_extraction
    from qkspectra.geometry import parse_geometry
    from qkspectra.models.subject import Subject

    check_settings(settings)
    subject = Subject(model, progress=not settings.options.quiet)
    if settings.groups is not None:
        check_groups(settings.groups, subject.adapter.num_layers)
    record = new_record(subject_name(model), cache_key(model, settings.options), settings)
    say(f"extracting the geometry of {subject_name(model)}")
    clock = time.perf_counter()
    extraction = run_extraction(subject, options=settings.options)
    record["timings"]["extract_s"] = round(time.perf_counter() - clock, 3)
    record["extraction"] = "performed"
    geometry = parse_geometry(extraction.geometry, source=f"<geometry of {subject_name(model)}>")
    if settings.functional:
        say(f"running the functional test on {subject_name(model)}")
    clock = time.perf_counter()
    document = analysis_document(geometry, extraction.factors, settings, model=subject, map=map, progress=progress,
                                 timings=record["timings"])
    record["timings"]["analyze_s"] = round(time.perf_counter() - clock, 3)
    record["finished"] = now()
    return RunInMemory(geometry, document, extraction.factors, record)
