"""``qkspectra sweep``: many models (or training checkpoints) through ``run``, each a task on a Dask cluster.

    DIR/<name>/      each model's run folder, what ``qkspectra run`` writes there
    DIR/sweep.json   engine and versions; per model its name, model, labels, status (ok or failed),
                     error, run_dir (relative to DIR), timings and key figures (``key_figures``)
    DIR/sweep.html, DIR/sweep.md, DIR/plots/sweep_*.png   the comparison (``report.sweep_page``)

A finished run of the same cache key and options is reused; others run in ``DIR/.partial/<name>/``
and are renamed into place once complete. One model's failure (bad path, unsupported type, corrupt
weights, out of memory, a lost worker) is recorded with its one-line error; the others finish (Dask
runs a lost worker's task again on another). A lost scheduler stops the sweep (``ClusterLost``, no
sweep.json): the finished models' folders stay, and the same command resumes from them.
On a cluster, every worker needs qkspectra installed and the models and DIR readable and writable.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from qkspectra.version import __version__
from qkspectra.atomic import atomic_write_json, make_folder
from qkspectra.errors import QkspectraError
from qkspectra.workflow.runner import RunSettings

SWEEP_FILE = "sweep.json"
PARTIAL_FOLDER = ".partial"  # runs in progress, renamed into DIR/<name>/ when complete
RESERVED_NAMES = frozenset({"plots", SWEEP_FILE, "sweep.html", "sweep.md"})  # what DIR holds besides the run folders
SWEEP_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SweepModel:
    """One model of a sweep: its run folder's name, the model (bundled name, folder, .gguf), its labels."""

    name: str
    model: str
    labels: Mapping[str, Any] = field(default_factory=dict)  # column -> int, float, str or None


# ----------------------------------------------------------------------------
# The list of models
# ----------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A folder name from any text: letters, digits, '.', '_' and '-' only, never hidden or empty."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:100] or "model"


def unique_names(wanted: Sequence[str]) -> list[str]:
    """Safe names, made unique (case-insensitively, for case-insensitive file systems) with -2, -3, ..."""
    taken: set[str] = set()
    names = []
    for text in wanted:
        base = name = safe_name(text)
        suffix = 2
        while name.lower() in taken or name.lower() in RESERVED_NAMES:
            name, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(name.lower())
        names.append(name)
    return names


def model_location(text: str, base: Path | None = None) -> str:
    """A bundled name as it is; a path made absolute (relative to ``base``, default the current folder),
    since workers run elsewhere."""
    from qkspectra.models.bundled import BUNDLED_MODELS

    if text in BUNDLED_MODELS:
        return text
    path = Path(text).expanduser()
    return os.path.abspath(path if base is None else base / path)


def _default_name(model: str) -> str:
    path = Path(model)
    return path.stem if path.suffix.lower() == ".gguf" else path.name or model


def _label_value(text: str) -> int | float | str | None:
    """A CSV cell: None when blank, a number when it reads as a finite one, else the text."""
    text = text.strip()
    if not text:
        return None
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text
    return text


def read_models_file(path: str | os.PathLike) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(name or None, model, labels) per row of a CSV with a ``model`` column, an optional ``name`` column,
    and any further columns as labels. Model paths are relative to the CSV's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise QkspectraError(f"--models {path}: {reason}") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise QkspectraError(f"{path}: empty; expected a header line with a 'model' column")
    header = [column.strip() for column in rows[0]]
    if "model" not in header:
        raise QkspectraError(f"{path}: no 'model' column in the header ({', '.join(header) or 'empty'})")
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated or "" in header:
        raise QkspectraError(f"{path}: header: {'column ' + repr(duplicated[0]) + ' twice' if duplicated else 'a column without a name'}")
    entries = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise QkspectraError(f"{path}: line {number}: {len(row)} cells, the header has {len(header)}")
        cells = dict(zip(header, row))
        model = cells.pop("model").strip()
        if not model:
            raise QkspectraError(f"{path}: line {number}: empty model")
        name = cells.pop("name", "").strip() or None
        entries.append((name, model_location(model, path.parent), {k: _label_value(v) for k, v in cells.items()}))
    return entries


def sweep_models(models: Sequence[str] = (), models_file: str | os.PathLike | None = None) -> list[SweepModel]:
    """The models of the command line (no labels), then those of the CSV file, with unique safe names."""
    entries = [(None, model_location(m), {}) for m in models]
    if models_file is not None:
        entries += read_models_file(models_file)
    if not entries:
        raise QkspectraError("no model to sweep: give MODEL arguments or --models FILE")
    names = unique_names([name or _default_name(model) for name, model, _ in entries])
    return [SweepModel(name, model, labels) for name, (_, model, labels) in zip(names, entries)]


# ----------------------------------------------------------------------------
# Key figures of one run
# ----------------------------------------------------------------------------


def entropy_link_best(document: Mapping[str, Any]) -> dict[str, Any] | None:
    """The descriptor with the strongest |within-layer Spearman| against the mean entropy:
    ``{descriptor, target, within_layer_spearman}``; None without ``descriptors`` or without any such figure."""
    from qkspectra.report.readers import ranked_descriptors

    ranked = ranked_descriptors(document, "entropy")
    if not ranked or ranked[0][1].get("within_layer_spearman") is None:
        return None
    name, cell = ranked[0]
    return {"descriptor": name, "target": "entropy", "within_layer_spearman": cell["within_layer_spearman"]}


def mean_sink_mass(geometry: Any) -> float | None:
    """The mean over every (layer, head) of the geometry's ``mean_sink_mass_per_head``; None without it."""
    from qkspectra.analysis.entropy_links import dynamic_per_head

    if geometry is None:
        return None
    mass = dynamic_per_head(geometry, "sink_mass", "mean_sink_mass_per_head")  # (L, H) or None
    if mass is None or mass.ndim != 2 or not mass.size or not np.isfinite(mass).all():
        return None
    return float(mass.mean())


def key_figures(document: Mapping[str, Any], geometry: Any = None) -> dict[str, Any]:
    """What the comparison shows of one ``analysis.json`` (and the geometry it came from, when given).

    verdict: the seed's code, the overall code and each layer's code and evidence;
    spectral_residual (over each strategy's fitted layers), spectral_residual_all_layers (the
    seed's mean), anchor_layers, corr_T_entropy: per anchor strategy; null_p_values: per null, per
    figure; operator_residual: per strategy, same head and matched head, over the fitted layers;
    functional_change: per strategy, the change of the operator reconstruction
    (``verdict.functional_change``); operator_residual_best, functional_change_best: the lowest
    among the strategies the verdict chooses from, as the verdict finds them (``verdict.best_operator_residual``,
    ``verdict.smallest_functional_change``: the change measured, before the control's rounding);
    schedule: the mean T over heads per layer, with the seed's (last) anchor; entropy_link_best (the
    strongest within-layer descriptor of the entropy, ``entropy_link_best``), median_context_slope
    (``context.median_slope``), mean_sink_mass (from the geometry, ``mean_sink_mass``). None where absent.
    """
    from qkspectra.analysis.verdict import best_operator_residual, functional_change, smallest_functional_change

    per = dict(document["strategies"]) if "strategies" in document else {document["anchor"]["strategy"]: document}
    verdict = document["verdict"]
    nulls = document.get("null") or {}
    functional = document.get("functional") or {}
    replaced = {name: entry for name, entry in functional.items() if isinstance(entry, Mapping) and "operator" in entry}
    operator = {name: entry for name, entry in (document.get("operator") or {}).items() if isinstance(entry, Mapping)}
    operator_best, functional_best = best_operator_residual(operator), smallest_functional_change(functional)  # the verdict's figures
    T = document["rescale"]["T"]  # (L, H)
    return {
        "num_layers": len(T),
        "num_heads": len(T[0]) if T else 0,
        "verdict": {
            "code": verdict.get("code"),
            "overall": verdict.get("overall"),
            "layers": {name: {"code": layer.get("code"), "evidence": layer.get("evidence")}
                       for name, layer in (verdict.get("layers") or {}).items()},
        },
        "spectral_residual": {name: s["rescale"].get("mean_residual_fitted") for name, s in per.items()},
        "spectral_residual_all_layers": {name: s["rescale"]["mean_residual"] for name, s in per.items()},
        "anchor_layers": {name: s["anchor"].get("num_anchor_layers") for name, s in per.items()},
        "null_p_values": {
            name: {figure: values.get("p_value") for figure, values in (entry.get("figures") or {}).items()}
            for name, entry in nulls.items() if isinstance(entry, Mapping) and entry.get("available")
        },
        "operator_residual": {
            name: {"same_head": entry.get("mean_residual_fitted"), "matched_head": entry.get("matched_mean_residual_fitted")}
            for name, entry in operator.items()
        },
        "functional_change": {name: functional_change(entry.get("operator")) for name, entry in replaced.items()},
        "operator_residual_best": None if operator_best is None else operator_best[0],
        "functional_change_best": None if functional_best is None else functional_best.measured,
        "corr_T_entropy": {name: s["entropy"]["corr_T_entropy"] for name, s in per.items()},
        "schedule": {
            "anchor": document["anchor"]["strategy"],
            "mean_T": [sum(row) / len(row) for row in T],
        },
        "entropy_link_best": entropy_link_best(document),
        "median_context_slope": (document.get("context") or {}).get("median_slope"),
        "mean_sink_mass": mean_sink_mass(geometry),
    }


# ----------------------------------------------------------------------------
# One model's task (runs on a worker)
# ----------------------------------------------------------------------------


def _finished_run(run_dir: Path, model: str, settings: RunSettings) -> dict[str, Any] | None:
    """The analysis document of a finished run in ``run_dir`` with this model's cache key and these settings, or None."""
    from qkspectra.workflow.runner import ANALYSIS_FILE, RUN_FILE, cache_key, reusable_geometry

    try:
        record = orjson.loads((run_dir / RUN_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    key = cache_key(model, settings.options)
    if not (
        isinstance(record, dict) and record.get("finished") is not None and record.get("cache_key") == key
        and record.get("groups") == settings.groups and record.get("functional") == settings.functional
        and record.get("functional_tokens") == settings.functional_tokens
        and record.get("null_draws", 200) == settings.null_draws and record.get("seed", 0) == settings.seed
        and reusable_geometry(run_dir, key) and (run_dir / "report.html").is_file()
    ):
        return None
    try:
        return orjson.loads((run_dir / ANALYSIS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _run_geometry(run_dir: Path) -> Any:
    """The geometry of a finished run folder, or None where it cannot be read (its key figures then lack it)."""
    from qkspectra.geometry import load_geometry
    from qkspectra.workflow.runner import GEOMETRY_FILE

    try:
        return load_geometry(run_dir / GEOMETRY_FILE)
    except (OSError, QkspectraError):
        return None


def run_model(model: SweepModel, out_dir: str, settings: RunSettings) -> dict[str, Any]:
    """One model's run into ``out_dir/<name>/`` (reused when finished with the same key); returns how it ran,
    its timings and its key figures. Raises on failure (the sweep records the one-line error)."""
    from qkspectra.workflow.runner import RUN_FILE, run

    clock = time.perf_counter()
    final = Path(out_dir) / model.name
    document = _finished_run(final, model.model, settings)
    if document is not None:
        return {"run": "reused", "timings": {"total_s": round(time.perf_counter() - clock, 3)},
                "figures": key_figures(document, _run_geometry(final))}
    staging = Path(out_dir) / PARTIAL_FOLDER / model.name
    if final.exists() and not staging.exists():  # an older run (other options): its extraction may still serve
        if not (final / RUN_FILE).is_file() and (not final.is_dir() or any(final.iterdir())):
            raise QkspectraError(f"{final} exists and is not a qkspectra run folder; move it or choose another --out")
        make_folder(staging.parent)
        os.replace(final, staging)
    result = run(model.model, staging, replace(settings, options=replace(settings.options, quiet=True)))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    timings = orjson.loads((final / RUN_FILE).read_bytes()).get("timings") or {}
    return {"run": "performed", "timings": {**timings, "total_s": round(time.perf_counter() - clock, 3)},
            "figures": key_figures(result.document, result.geometry)}


# ----------------------------------------------------------------------------
# The sweep (runs on the client)
# ----------------------------------------------------------------------------


def one_line(error: BaseException | None) -> str:
    """An exception as the one line a sweep records: qkspectra's own message, else the type and message."""
    if type(error).__name__ == "KilledWorker":  # Dask's: every worker that ran the task died (memory limit, killed)
        return ("the worker running it died each time it was tried (it ran out of its memory limit, was killed or "
                "crashed); the other models went on")
    text = str(error) if isinstance(error, QkspectraError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:1000]


@dataclass(frozen=True)
class SweepResult:
    out_dir: Path
    document: dict[str, Any]  # what sweep.json holds
    failed: int  # models that failed


def _versions() -> dict[str, str]:
    import platform

    import numpy

    versions = {"qkspectra": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    for module in ("torch", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return versions


def run_sweep(
    models: Sequence[SweepModel],
    out_dir: str | os.PathLike,
    settings: RunSettings = RunSettings(),
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> SweepResult:
    """Run every model as a task on a Dask cluster (``scheduler``'s, or a local one of ``workers`` processes),
    record each result as it arrives, and write DIR/sweep.json, sweep.html, sweep.md and the plots.

    Interrupted (KeyboardInterrupt): the tasks are cancelled and no sweep file is written; the finished
    models' folders stay for the next sweep to reuse; on a local cluster the unfinished runs'
    partial folders are removed.
    """
    from qkspectra.workflow.cluster import ClusterLost, connect, describe, lost_scheduler, require_distributed
    from qkspectra.extract.extraction import check_options
    from qkspectra.report.sweep_page import check_sweep_outputs, write_sweep_report

    check_options(settings.options)
    if settings.groups is not None and settings.groups < 1:
        raise QkspectraError(f"--groups {settings.groups}: must be between 1 and the number of layers")
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise QkspectraError(f"output {out_dir} exists and is not a folder")
    check_sweep_outputs(out_dir)
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        with connect(scheduler, workers) as client:
            engine = describe(client)
            make_folder(out_dir)
            where = f"scheduler {scheduler}" if scheduler else "a local cluster"
            say(f"{len(models)} models on {engine['workers']} workers of {where}")
            futures = {client.submit(run_model, m, str(out_dir), settings, pure=False,
                                     key=f"qkspectra-run-{m.name}-{os.urandom(4).hex()}"): m for m in models}

            def lost() -> ClusterLost:
                return ClusterLost(f"lost the Dask scheduler {scheduler} after {len(records)} of {len(models)} models; the "
                                   "finished models' run folders are kept: run the same command again, on a running scheduler, to go on")

            try:
                for future in require_distributed().as_completed(futures, loop=client.loop):
                    if future.status not in ("finished", "error"):  # cancelled by no one here: the scheduler is gone
                        raise lost()
                    records[futures[future].name] = _record(futures[future], future)
                    say(_progress_line(records[futures[future].name], len(records), len(models)))
                    future.release()
            except ClusterLost:
                raise
            except BaseException as e:
                if scheduler is not None and lost_scheduler(e):
                    raise lost() from None
                interrupted = True
                client.cancel(list(futures), force=True)
                raise
    finally:
        if interrupted and scheduler is None:  # the local workers have stopped with their cluster
            _remove_partial_runs(out_dir, [m for m in models if m.name not in records])
    # a failed model's task is over wherever it ran: its partial run goes, then the folder of partial runs when empty
    _remove_partial_runs(out_dir, [m for m in models if records.get(m.name, {}).get("status") == "failed"])
    document = {
        "qkspectra_version": __version__,
        "schema_version": SWEEP_SCHEMA_VERSION,
        "engine": {**engine, "cluster": "local" if scheduler is None else "existing", "versions": _versions()},
        "settings": {"options": {k: v for k, v in asdict(settings.options).items() if k != "quiet"},
                     "groups": settings.groups, "functional": settings.functional,
                     "null_draws": settings.null_draws, "seed": settings.seed},
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - clock, 3),
        "models": [records[m.name] for m in models],
    }
    write_sweep_report(document, out_dir)  # the pages and plots first: sweep.json marks a finished sweep
    atomic_write_json(out_dir / SWEEP_FILE, document)
    return SweepResult(out_dir, document, sum(r["status"] == "failed" for r in document["models"]))


def _record(model: SweepModel, future: Any) -> dict[str, Any]:
    """One model's entry in sweep.json from its finished (or failed) task."""
    record: dict[str, Any] = {"name": model.name, "model": model.model, "labels": dict(model.labels)}
    if future.status == "finished":
        return {**record, "status": "ok", "error": None, "run_dir": model.name, **future.result()}
    return {**record, "status": "failed", "error": one_line(future.exception()), "run_dir": None, "run": None,
            "timings": None, "figures": None}


def _progress_line(record: Mapping[str, Any], done: int, total: int) -> str:
    if record["status"] == "ok":
        return f"[{done}/{total}] {record['name']}: ok ({record['run']}, {record['timings']['total_s']:.1f} s)"
    return f"[{done}/{total}] {record['name']}: failed: {record['error']}"


def _remove_partial_runs(out_dir: Path, models: Sequence[SweepModel]) -> None:
    for model in models:
        shutil.rmtree(out_dir / PARTIAL_FOLDER / model.name, ignore_errors=True)
    try:
        (out_dir / PARTIAL_FOLDER).rmdir()
    except OSError:
        pass
