"""The whole job from Python, on a bundled model, a path, or a model already in memory.

    >>> import qkspectra
    >>> g = qkspectra.extract_geometry(model, tokenizer, max_tokens=4096)   # a Geometry
    >>> r = qkspectra.run(model, tokenizer, max_tokens=4096)                 # a RunResult
    >>> r.verdict.overall, r.verdict.layers["operator"].evidence
    >>> r.figures()["schedule"]

``model`` is a bundled name (``"minilm"``), a model folder or .gguf file, or a transformers
``PreTrainedModel`` in memory (any dtype, any device), which is read where it is and left as it
was: nothing is copied to disk, no weight, mode or ``requires_grad`` flag changes (the functional
test rewrites a copy). The options are the command line's, as keyword arguments named like the
fields of ``ExtractOptions``, checked with the same one-line errors (``QkspectraError``); the
work goes through the same code as ``qkspectra extract`` and ``qkspectra run``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.geometry import Geometry


def keyword_options(options: Mapping[str, Any], function: str):
    """``ExtractOptions`` from keyword arguments; QkspectraError naming an unknown option or a value of the wrong type."""
    from qkspectra.extract.extraction import ExtractOptions

    hints = typing.get_type_hints(ExtractOptions)
    names = [field.name for field in dataclasses.fields(ExtractOptions)]
    values = {}
    for name, value in options.items():
        if name not in hints:
            raise QkspectraError(f"{function}() has no option {name!r}; its options: {', '.join(names)}")
        values[name] = _checked(name, value, hints[name])
    return ExtractOptions(**values)


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` allows (a path for a string; any whole number for an int), or QkspectraError."""
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
    raise QkspectraError(f"{name} must be {wanted}, got {value!r}")


def model_argument(model: Any, tokenizer: Any | None):
    """A name or path as a string, or a model in memory wrapped as ``InMemoryModel``."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise QkspectraError("tokenizer goes with a model in memory; a bundled name or a path brings its own")
        return os.fspath(model)
    from qkspectra.models.in_memory import in_memory_model

    return in_memory_model(model, tokenizer)


def extract_geometry(model: Any, tokenizer: Any | None = None, **options: Any) -> Geometry:
    """The geometry of ``model``: per-head metric spectra and (unless ``static_only=True``) attention entropies.

    The same numbers as ``qkspectra extract`` on the same weights; ``metadata`` says where they came from.
    """
    from qkspectra.extract.extraction import geometry_document
    from qkspectra.geometry import parse_geometry
    from qkspectra.workflow.runner import subject_name

    settings = keyword_options(options, "extract_geometry")
    subject = model_argument(model, tokenizer)
    return parse_geometry(geometry_document(subject, options=settings), source=f"<geometry of {subject_name(subject)}>")


def run(model: Any, tokenizer: Any | None = None, out: str | os.PathLike | None = None, *, groups: int | None = None,
        functional: bool = True, **options: Any) -> RunResult:
    """The whole job of ``qkspectra run``: extraction, every anchor strategy, null baselines, bootstrap
    intervals, the operator-level, rank-k and functional tests, and the layered verdict.

    out: the run folder to write (geometry, factors, analysis.json, plots, report.html and .md,
        run.json), reusing an earlier extraction there as the command line does; None: nothing written.
    groups: layer groups of the group anchor (default round(sqrt(layers))).
    functional: run the functional test (the slowest part).
    """
    from qkspectra.workflow import runner

    settings = runner.RunSettings(keyword_options(options, "run"), _checked("groups", groups, int | None),
                                  _checked("functional", functional, bool))
    subject = model_argument(model, tokenizer)
    if out is None:
        geometry, document = runner.run_in_memory(subject, settings)
        return RunResult(document, geometry)
    _checked("out", out, str)
    folder = runner.run(subject, Path(out), settings)
    return RunResult(folder.document, folder.geometry, folder.out_dir)


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


class RunResult:
    """What ``run`` computed.

    document:   the analysis document, the same dict as ``analysis.json``
    verdict:    the layered verdict, read from the document: ``overall``, ``summary``,
                ``layers[name].code`` and ``.evidence`` (spectral, spectral_vs_null, operator,
                functional), and the seed's ``code`` and ``text``
    strategies: each anchor strategy's figures (last, middle, best, group), as in the document
    analyses:   the same strategies as ``Analysis`` objects (numpy arrays), recomputed from the geometry
    geometry:   the geometry analysed; out_dir: the run folder (None when nothing was written)
    figures():  the report's matplotlib figures, by name, in report order
    In Jupyter a result shows the report's verdict and strategy table.
    """

    def __init__(self, document: dict[str, Any], geometry: Geometry, out_dir: Path | None = None):
        self.document = document
        self.geometry = geometry
        self.out_dir = out_dir

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

    def figures(self) -> dict[str, Any]:
        """The report's figures (matplotlib ``Figure``s) by name: those the document and geometry allow.

        In IPython (Jupyter) a figure shows as the report's PNG image.
        """
        from qkspectra.report.plots import report_figures
        from qkspectra.report.readers import describe_run

        _display_figures_in_ipython()
        return report_figures(self.document, self.geometry, title=describe_run(self.document)).figures

    def _repr_html_(self) -> str:
        from qkspectra.report.run_page import render_html_summary

        return render_html_summary(self.document)

    def __repr__(self) -> str:
        from qkspectra.report.readers import model_name

        where = "" if self.out_dir is None else f", out_dir={str(self.out_dir)!r}"
        return f"<RunResult {model_name(self.document)}: overall {self.verdict.get('overall')}{where}>"


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
