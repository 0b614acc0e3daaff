"""Runs and sweeps as Python objects, and as folders: ``RunResult``, ``load_run``, ``Sweep``, ``load_sweep``.

    >>> r = qkspectra.load_run("minilm")          # any folder `qkspectra run --out` wrote (or a sweep's model folder)
    >>> r.heads()                                  # one row per (layer, head): pandas, the `notebook` extra
    >>> r.save("elsewhere")                        # the same files `qkspectra run --out elsewhere` writes
    >>> s = qkspectra.load_sweep("sweep")          # a folder `qkspectra sweep --out` wrote
    >>> s.models(), s["minilm"].layers()
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from qkspectra.errors import QkspectraError, QkspectraTypeError
from qkspectra.geometry import Geometry

if TYPE_CHECKING:
    import numpy as np
    import pandas


class Record(Mapping):
    """A read-only view of one object of the analysis document: keys as attributes, nested objects as records.

    Whatever the document holds is there, including keys added after this was written.
    """

    def __init__(self, data: Mapping[str, Any]):
        self._data = data

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        return Record(value) if isinstance(value, Mapping) else value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no {key!r} here; keys: {', '.join(self._data)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __dir__(self) -> list[str]:
        return [*self._data, *super().__dir__()]

    def __repr__(self) -> str:
        return f"Record({dict(self._data)!r})"


def json_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """The document exactly as its JSON file holds it (lists, not tuples or arrays; null, not NaN)."""
    return orjson.loads(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY))


class RunResult:
    """What ``run`` computed, or what a run folder holds (``load_run``).

    document:   the analysis document: the dict ``analysis.json`` holds (or would hold)
    verdict:    the layered verdict, read from the document: ``overall``, ``summary``,
                ``layers[name].code`` and ``.evidence`` (spectral, spectral_vs_null, operator,
                functional), and the seed's ``code`` and ``text``
    strategies: each anchor strategy's figures (last, middle, best, group), as in the document
    analyses:   the same strategies as ``Analysis`` objects (numpy arrays), recomputed from the geometry
    geometry:   the geometry analysed; out_dir: the run folder (None when nothing was written)
    factors:    the factors file's tensors when they are in memory (a run without ``out``), else None
    record:     what run.json holds (settings, dates, timings); None when unknown
    heads(), layers(), strategy_table(): tidy pandas tables (docs/tables.md)
    figures():  the report's matplotlib figures, by name, in report order
    save(DIR):  the folder ``qkspectra run --out DIR`` writes
    Two results are equal when their documents, geometries and folders are.
    In Jupyter a result shows the report's verdict and strategy table.
    """

    def __init__(self, document: Mapping[str, Any], geometry: Geometry, out_dir: str | os.PathLike | None = None, *,
                 factors: dict[str, np.ndarray] | None = None, record: dict[str, Any] | None = None):
        if not isinstance(geometry, Geometry):
            raise QkspectraTypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
        self.document = json_document(document)
        self.geometry = geometry
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.factors = factors
        self.record = record

    @classmethod
    def of(cls, outcome: Any) -> RunResult:
        """From ``workflow.runner``'s ``RunFolder`` (written) or ``RunInMemory`` (not)."""
        out_dir = getattr(outcome, "out_dir", None)
        return cls(outcome.document, outcome.geometry, out_dir, factors=getattr(outcome, "factors", None),
                   record=outcome.record)

    @property
    def verdict(self) -> Record:
        return Record(self.document["verdict"])

    @property
    def strategies(self) -> dict[str, Record]:
        from qkspectra.report.readers import strategies

        return {name: Record(entry) for name, entry in strategies(self.document).items()}

    @property
    def analyses(self) -> dict[str, Any]:
        from qkspectra.analysis.seed import analyze_all

        groups = self.document.get("strategies", {}).get("group", {}).get("anchor", {}).get("groups")
        return analyze_all(self.geometry, groups=None if groups is None else len(groups))

    def heads(self) -> pandas.DataFrame:
        """One row per (layer, head), in (layer, head) order: every per-head figure (docs/tables.md)."""
        from qkspectra.tables import head_table

        return head_table(self.document, self.geometry)

    def layers(self) -> pandas.DataFrame:
        """One row per layer: every per-layer figure (docs/tables.md)."""
        from qkspectra.tables import layer_table

        return layer_table(self.document, self.geometry)

    def strategy_table(self) -> pandas.DataFrame:
        """One row per anchor strategy: the report's comparison table, then the other sections' figures."""
        from qkspectra.tables import strategy_table

        return strategy_table(self.document)

    def save(self, out_dir: str | os.PathLike) -> RunResult:
        """Write the folder ``qkspectra run --out out_dir`` writes: geometry.json and its factors file,
        analysis.json, plots/, report.html, report.md and run.json; returns the result as saved there.

        Nothing is computed again but the report: the factors are this result's (in memory, or the file
        beside its geometry), the document is this one with ``input`` naming the saved geometry. A result
        without factors (a geometry without a factors file) gives a folder without one.
        """
        from qkspectra.workflow.folder import save_run

        if not isinstance(out_dir, (str, os.PathLike)):
            raise QkspectraTypeError(f"out_dir must be a string or a path, got {type(out_dir).__name__}")
        folder = save_run(out_dir, self.geometry, self.document, self.record, factors=self.factors)
        return RunResult.of(folder)

    def figures(self) -> dict[str, Any]:
        """The report's figures (matplotlib ``Figure``s) by name: those the document and geometry allow.

        In IPython (Jupyter) a figure shows as the report's PNG image.
        """
        from qkspectra.report.plots import report_figures
        from qkspectra.report.readers import describe_run

        _display_figures_in_ipython()
        return report_figures(self.document, self.geometry, title=describe_run(self.document)).figures

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunResult):
            return NotImplemented
        return self.out_dir == other.out_dir and self.document == other.document and self.geometry == other.geometry

    __hash__ = None

    def _repr_html_(self) -> str:
        from qkspectra.report.run_page import render_html_summary

        return render_html_summary(self.document)

    def __repr__(self) -> str:
        from qkspectra.report.readers import model_name

        where = "" if self.out_dir is None else f", out_dir={str(self.out_dir)!r}"
        return f"<RunResult {model_name(self.document)}: overall {self.verdict.get('overall')}{where}>"


def _folder(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise QkspectraTypeError(f"{what} must be a string or a path, got {type(path).__name__}")
    folder = Path(path)
    if not folder.exists():
        raise QkspectraError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise QkspectraError(f"{folder}: not a folder; give the folder {what.split()[0]} wrote")
    return folder


def _read_json(path: Path, what: str) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise QkspectraError(f"{path.parent}: no {path.name} here; {what}") from None
    except OSError as e:
        raise QkspectraError(f"{path}: cannot read: {e.strerror}") from None
    except orjson.JSONDecodeError as e:
        raise QkspectraError(f"{path}: not valid JSON ({e})") from None


RUN_FOLDER = "a run folder holds analysis.json and geometry.json (qkspectra run --out DIR)"


def load_run(path: str | os.PathLike) -> RunResult:
    """The run folder ``path`` (written by ``qkspectra run --out``, ``run(..., out=...)``, ``RunResult.save``,
    or a sweep's model folder) as the ``RunResult`` that wrote it: its document, geometry and out_dir.

    The factors stay in their file (``factors`` is None; ``save`` copies the file); ``record`` is run.json's
    content (None without one).
    """
    from qkspectra.geometry import load_geometry
    from qkspectra.report.readers import check_analysis
    from qkspectra.workflow.runner import ANALYSIS_FILE, GEOMETRY_FILE, RUN_FILE

    folder = _folder(path, "run folder")
    if (folder / "sweep.json").is_file() and not (folder / ANALYSIS_FILE).exists():
        raise QkspectraError(f"{folder}: a sweep folder; open it with load_sweep, or one model's folder with load_run")
    document = _read_json(folder / ANALYSIS_FILE, RUN_FOLDER)
    check_analysis(document, str(folder / ANALYSIS_FILE))
    if not (folder / GEOMETRY_FILE).is_file():
        raise QkspectraError(f"{folder}: no {GEOMETRY_FILE} beside analysis.json; {RUN_FOLDER}")
    geometry = load_geometry(folder / GEOMETRY_FILE)
    record = None
    if (folder / RUN_FILE).is_file():
        record = _read_json(folder / RUN_FILE, RUN_FOLDER)
        record = record if isinstance(record, dict) else None
    return RunResult(document, geometry, folder, record=record)


class Sweep(Mapping):
    """A sweep folder (``load_sweep``): its document and each model's run, by the model's name.

    document: what sweep.json holds; out_dir: the sweep folder
    sweep[name] / sweep.runs: each finished model's ``RunResult`` (read from its folder when first asked for)
    models(): one row per model, its labels and key figures (docs/tables.md)
    In Jupyter a sweep shows its models table.
    """

    def __init__(self, document: Mapping[str, Any], out_dir: str | os.PathLike):
        self.document = json_document(document)
        self.out_dir = Path(out_dir)
        self._runs: dict[str, RunResult] = {}

    def _finished(self) -> dict[str, Mapping[str, Any]]:
        return {m["name"]: m for m in self.document["models"] if m.get("status") == "ok" and m.get("run_dir")}

    def __getitem__(self, name: str) -> RunResult:
        finished = self._finished()
        if name not in finished:
            failed = {m["name"]: m for m in self.document["models"]}.get(name)
            if failed is not None:
                raise KeyError(f"{name!r} failed in this sweep: {failed.get('error')}")
            raise KeyError(f"no model {name!r} in this sweep; models: {', '.join(finished)}")
        if name not in self._runs:
            self._runs[name] = load_run(self.out_dir / finished[name]["run_dir"])
        return self._runs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._finished())

    def __len__(self) -> int:
        return len(self._finished())

    def __contains__(self, name: object) -> bool:
        return name in self._finished()

    @property
    def runs(self) -> dict[str, RunResult]:
        """Every finished model's RunResult, by name (each folder read now, once)."""
        return {name: self[name] for name in self}

    def models(self) -> pandas.DataFrame:
        """One row per model (failed ones too), in the sweep's order: labels and key figures (docs/tables.md)."""
        from qkspectra.tables import model_table

        return model_table(self.document)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sweep):
            return NotImplemented
        return self.out_dir == other.out_dir and self.document == other.document

    __hash__ = None

    def _repr_html_(self) -> str:
        from qkspectra.report.sweep_page import render_sweep_html_summary

        return render_sweep_html_summary(self.document)

    def __repr__(self) -> str:
        models = self.document["models"]
        ok = sum(m.get("status") == "ok" for m in models)
        return f"<Sweep {str(self.out_dir)!r}: {len(models)} models, {ok} ok, {len(models) - ok} failed>"


def load_sweep(path: str | os.PathLike) -> Sweep:
    """The sweep folder ``path`` (written by ``qkspectra sweep --out``): sweep.json and each model's run."""
    folder = _folder(path, "sweep folder")
    document = _read_json(folder / "sweep.json", "a sweep folder holds sweep.json (qkspectra sweep --out DIR)")
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise QkspectraError(f"{folder / 'sweep.json'}: models: missing; not a sweep document")
    return Sweep(document, folder)


def _display_figures_in_ipython() -> None:
    """In a running IPython, show matplotlib figures as PNG when nothing else does.

    The report's figures are drawn without pyplot, so no backend registered a display for them
    (``%matplotlib inline`` would); one already registered is left as it is.
    """
    import sys

    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython
    from matplotlib.figure import Figure

    from qkspectra.report.plots import png_bytes

    shell = get_ipython()
    if shell is None:
        return
    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        formatter.for_type(Figure, png_bytes)
