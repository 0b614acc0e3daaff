"""A run folder from results computed elsewhere: the analysis of a geometry given (``analyse_geometry``), and
any run's results written as the folder ``qkspectra run --out`` writes (``save_run``).

The files, their names and their bytes are ``runner``'s: the same writers (``write_outputs`` for factors in
memory, ``runner.write_results`` for analysis.json, the report and run.json); only the factors file of a
geometry read from disk is copied as it is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qkspectra.atomic import atomic_write_json
from qkspectra.geometry import Geometry
from qkspectra.report.files import check_writable
from qkspectra.workflow.runner import (
    GEOMETRY_FILE,
    RunFolder,
    RunInMemory,
    RunSettings,
    analysis_document,
    check_groups,
    check_out_dir,
    check_settings,
    new_record,
    now,
    run_outputs,
    stamp_files,
    write_results,
)

if TYPE_CHECKING:
    import numpy as np


def geometry_name(geometry: Geometry) -> str:
    """The model a geometry names in its metadata, else where it came from."""
    return str(geometry.metadata.get("model") or geometry.source)


def analyse_geometry(
    geometry: Geometry,
    out_dir: str | Path | None = None,
    settings: RunSettings = RunSettings(),
    *,
    map: Callable | None = None,
    say: Callable[[str], None] = lambda _: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RunFolder | RunInMemory:
    """The analysis part of ``run`` on a geometry already extracted: every anchor strategy, nulls, bootstrap,
    and the operator-level and rank-k tests on the factors file beside the geometry (when there is one).

    The functional test needs the model: its layer is n/a (``NO_MODEL``). With ``out_dir``, the geometry
    (and its factors file) is written there first and the folder completed as ``run`` completes it (run.json's
    ``extraction`` is "given"); without, nothing is written.
    """
    from qkspectra.analysis.factors import factors_path_for

    check_settings(settings)
    check_groups(settings.groups, geometry.num_layers)
    record = new_record(geometry_name(geometry), None, settings)
    record["extraction"] = "given"
    if out_dir is not None:
        out_dir = Path(out_dir)
        check_out_dir(out_dir)
        check_writable(run_outputs(out_dir))
        geometry = write_geometry_files(geometry, out_dir)
        stamp_files(record, out_dir / GEOMETRY_FILE)
    clock = time.perf_counter()
    say("analysing: every anchor strategy, null baselines, bootstrap intervals"
        + (", operator-level fits, rank-k" if factors_path_for(geometry) is not None else ""))
    document = analysis_document(geometry, factors_path_for(geometry), settings, model=None, map=map,
                                 progress=progress, timings=record["timings"])
    record["timings"]["analyze_s"] = round(time.perf_counter() - clock, 3)
    if out_dir is None:
        record["finished"] = now()
        return RunInMemory(geometry, document, None, record)
    return write_results(out_dir, geometry, document, record, say)


def write_geometry_files(geometry: Geometry, out_dir: Path, factors: dict[str, np.ndarray] | None = None) -> Geometry:
    """out_dir/geometry.json and its factors file, as ``run`` writes them; the geometry as read back from there.

    factors: the factors in memory (``RunInMemory.factors``); None: the factors file beside the geometry is
    copied, if it has one (else the folder has none, and the operator-level tests of its analysis are n/a).
    """
    from qkspectra.analysis.factors import factors_path_for
    from qkspectra.atomic import atomic_copy
    from qkspectra.extract.extraction import Extraction, factors_path, write_outputs
    from qkspectra.geometry import geometry_document_of, load_geometry

    path = out_dir / GEOMETRY_FILE
    document = geometry_document_of(geometry)
    if factors is not None:
        write_outputs(Extraction(document, factors), path)
        return load_geometry(path)
    source, target = factors_path_for(geometry), factors_path(path)
    metadata = dict(document.get("metadata") or {})
    if source is not None and source.is_file():
        if not (target.exists() and target.samefile(source)):
            atomic_copy(source, target)
        metadata["factors_file"] = target.name
    else:
        metadata.pop("factors_file", None)
        target.unlink(missing_ok=True)  # an earlier run's, which this geometry's analysis did not use
    atomic_write_json(path, dict(document, metadata=metadata))
    return load_geometry(path)


def save_run(
    out_dir: str | Path,
    geometry: Geometry,
    document: dict[str, Any],
    record: dict[str, Any] | None = None,
    *,
    factors: dict[str, np.ndarray] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> RunFolder:
    """Write what ``run`` writes into ``out_dir`` from a run's results, computing nothing again but the report.

    The geometry and its factors as ``write_geometry_files`` writes them; the document with its ``input``
    naming the geometry as saved (file and metadata: what ``run`` would have computed there); the plots and
    pages; run.json: ``record`` (the run's settings, dates and timings) with the saved files' stamps
    (None: a record that names no cache key, so a later ``run`` extracts again).
    """
    from qkspectra.analysis.results import input_section

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    check_writable(run_outputs(out_dir))
    saved = write_geometry_files(geometry, out_dir, factors)
    document = dict(document, input=input_section(saved))
    if record is None:
        record = new_record(geometry_name(saved), None, RunSettings())
        record.update(groups=None, functional=None, functional_tokens=None, null_draws=None, seed=None, started=None)
    record = dict(record, timings=dict(record.get("timings") or {}))
    stamp_files(record, out_dir / GEOMETRY_FILE)
    return write_results(out_dir, saved, document, record, say)
