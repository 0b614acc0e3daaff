"""The geometry file: per-head metric spectra and attention entropies.

Schema (the seed analysis' input; rows and the top level may carry more keys)::

    {"num_layers": L, "num_heads": H,
     "static":  [{"metric_singvals_per_head": [[s_0 >= s_1 >= ... >= 0], ... H lists]}, ... L rows],
     "dynamic": [{"mean_attention_entropy_per_head": [e_0, ..., e_{H-1}]}, ... L rows],
     "metadata": {...}}

``dynamic`` is optional (then only the static experiments run). Spectra may
differ in length between heads; they are zero-padded to the longest (K).

Loading validates everything and raises :class:`QkspectraError` with one line
naming the file and the JSON path of the first fault.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from qkspectra.errors import QkspectraError

_NUMBER_TYPES = frozenset((float, int))


@dataclass(frozen=True, eq=False)
class Geometry:
    """Per-head QK geometry of one model.

    Attributes:
        singular_values: ndarray of shape (L, H, K), float64. Each head's metric
            spectrum in descending order, zero-padded to the longest (K).
        entropy: ndarray of shape (L, H), float64, mean attention entropy in
            nats; None when the file has no ``dynamic`` section.
        metadata: the file's ``metadata`` object (empty when absent).
        source: where the geometry came from, for messages.
        document: the whole parsed file, kept so that extra per-row keys survive.
        entropy_by_position: ndarray of shape (L, H, buckets), float64, each head's mean entropy
            over the queries at 1-based positions 2^b .. 2^(b+1) - 1; None when the rows lack it.
        log_keys_by_position: ndarray of shape (L, buckets), the mean log of the number of keys
            those queries see; None likewise.
        entropy_without_first: ndarray of shape (L, H), float64, each head's mean entropy of the
            attention renormalised over the visible keys other than the window's first position,
            over the queries that see at least two keys (NaN where the file says null: none
            does); None when the rows lack it.
        entropy_without_first_by_position: ndarray of shape (L, H, buckets), float64, the same by
            position bucket (NaN for a bucket without such queries, e.g. position 1 of a causal
            model); None when the rows lack it.
    """

    singular_values: np.ndarray
    entropy: np.ndarray | None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    document: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    entropy_by_position: np.ndarray | None = None
    log_keys_by_position: np.ndarray | None = None
    entropy_without_first: np.ndarray | None = None
    entropy_without_first_by_position: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return self.singular_values.shape[0]

    @property
    def num_heads(self) -> int:
        return self.singular_values.shape[1]

    @property
    def max_rank(self) -> int:
        return self.singular_values.shape[2]

    def __eq__(self, other: object) -> bool:
        """Equal numbers (every array, bitwise) and metadata; where each came from (``source``) does not count."""
        if not isinstance(other, Geometry):
            return NotImplemented
        arrays = ("singular_values", "entropy", "entropy_by_position", "log_keys_by_position")
        return all(_same_array(getattr(self, name), getattr(other, name)) for name in arrays) and self.metadata == other.metadata

    __hash__ = None  # mutable arrays inside

    def __repr__(self) -> str:
        model = f" {self.metadata['model']}" if self.metadata.get("model") else ""
        entropy = "static only (no entropy)" if self.entropy is None else (
            "with entropy by position" if self.entropy_by_position is not None else "with entropy")
        return (f"<Geometry{model}: {self.num_layers} layers × {self.num_heads} heads, max rank {self.max_rank}, "
                f"{entropy}; from {self.source}>")

    def _repr_html_(self) -> str:
        """Jupyter's display: a short table of what the geometry is (no arrays)."""
        from html import escape

        rows = [("model", self.metadata.get("model") or "—"), ("from", self.source),
                ("layers × heads", f"{self.num_layers} × {self.num_heads}"), ("max rank (K)", self.max_rank),
                ("entropy", "no (static only)" if self.entropy is None else "yes" + (
                    ", by position" if self.entropy_by_position is not None else ""))]
        rows += [(key, self.metadata[key]) for key in ("model_type", "fold_ln", "dtype", "num_tokens") if key in self.metadata]
        body = "".join(f"<tr><th style='text-align:left'>{escape(str(k))}</th><td style='text-align:left'>"
                       f"{escape(str(v))}</td></tr>" for k, v in rows)
        return f"<div><b>qkspectra Geometry</b><table>{body}</table></div>"


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


def geometry_document_of(geometry: Geometry) -> dict[str, Any]:
    """The document a geometry was read from, or, for one built from arrays, the schema's minimal document
    (spectra zero-padded to K, entropies, metadata)."""
    if geometry.document is not None:
        return geometry.document
    document: dict[str, Any] = {
        "num_layers": geometry.num_layers,
        "num_heads": geometry.num_heads,
        "static": [{"metric_singvals_per_head": layer.tolist()} for layer in geometry.singular_values],
    }
    if geometry.entropy is not None:
        document["dynamic"] = [{"mean_attention_entropy_per_head": layer.tolist()} for layer in geometry.entropy]
    document["metadata"] = geometry.metadata
    return document


# Largest singular value accepted: the fits square and sum them, and (1e150)^2 times any
# realistic rank stays far inside float64's range (about 1.8e308).
MAX_SINGULAR_VALUE = 1e150
# Smallest largest-singular-value accepted: below it the seed's absolute 1e-20 guards on
# squared norms start to treat real heads as zero (measured: every value x 1e-10 already
# changes the mean residual of a real geometry from 0.106 to 0.64). All-zero geometries pass.
MIN_LARGEST_SINGULAR_VALUE = 1e-6


def load_geometry(path: str | os.PathLike) -> Geometry:
    """Read and validate a geometry JSON file."""
    path = Path(path)
    src = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise QkspectraError(f"{src}: no such file") from None
    except IsADirectoryError:
        raise QkspectraError(f"{src}: is a folder, not a geometry file") from None
    except OSError as e:
        raise QkspectraError(f"{src}: cannot read: {e.strerror}") from None
    return parse_geometry(_parse_json(raw, src), source=src)


def _parse_json(raw: bytes, src: str) -> Any:
    if not raw.strip():
        raise QkspectraError(f"{src}: empty file")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson rejects NaN/Infinity literals and deep nesting; the standard parser
    # accepts the former (so validation can name their JSON path) and tells us where
    # the text stops being JSON.
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise QkspectraError(f"{src}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise QkspectraError(f"{src}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise QkspectraError(f"{src}: not a geometry file: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise QkspectraError(f"{src}: not a geometry file: {e}") from None


POSITION_KEY = "entropy_by_position_per_head"  # optional dynamic-row keys written by extract
LOG_KEYS_KEY = "log_visible_keys_by_position"
WITHOUT_FIRST_KEY = "mean_attention_entropy_without_first_per_head"  # optional, null where undefined
WITHOUT_FIRST_POSITION_KEY = "entropy_without_first_by_position_per_head"


def parse_geometry(data: Any, *, source: str = "<memory>") -> Geometry:
    """Validate a parsed geometry document and build a :class:`Geometry`."""
    v = _Validator(source)
    if not isinstance(data, dict):
        v.fail("", f"expected a JSON object at the top level, found {_kind(data)}")
    num_layers = v.positive_int(data, "num_layers")
    num_heads = v.positive_int(data, "num_heads")

    static = v.rows(data, "static", num_layers, "num_layers")
    spectra = [v.spectra_row(row, f"static[{L}]", num_heads) for L, row in enumerate(static)]  # L x (H, k_L)
    max_rank = max(s.shape[1] for s in spectra)
    sigma = np.zeros((num_layers, num_heads, max_rank))  # (L, H, K)
    for L, s in enumerate(spectra):
        sigma[L, :, : s.shape[1]] = s
    largest = float(sigma.max())
    if 0.0 < largest < MIN_LARGEST_SINGULAR_VALUE:
        v.fail("static", f"the largest singular value is {_fmt(largest)}: the fits treat squared norms below 1e-20 as "
                         "zero (the seed's guard), so a geometry this small changes the result; multiply every "
                         "value by a power of ten")

    entropy = by_position = log_keys = without_first = without_first_by_position = None
    if "dynamic" in data:
        dynamic = v.rows(data, "dynamic", num_layers, "num_layers")
        entropy = np.stack(
            [v.entropy_row(row, f"dynamic[{L}]", num_heads) for L, row in enumerate(dynamic)]
        )  # (L, H)
        if isinstance(dynamic[0], dict) and POSITION_KEY in dynamic[0]:
            by_position, log_keys = v.position_rows(dynamic, num_heads)
        if isinstance(dynamic[0], dict) and WITHOUT_FIRST_KEY in dynamic[0]:
            without_first = np.stack([v.optional_entropies(row, f"dynamic[{L}]", WITHOUT_FIRST_KEY, num_heads)
                                      for L, row in enumerate(dynamic)])  # (L, H)
        if isinstance(dynamic[0], dict) and WITHOUT_FIRST_POSITION_KEY in dynamic[0]:
            buckets = None if by_position is None else by_position.shape[2]
            without_first_by_position = v.optional_position_rows(dynamic, num_heads, buckets)  # (L, H, buckets)

    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        v.fail("metadata", f"expected an object, found {_kind(metadata)}")
    return Geometry(singular_values=sigma, entropy=entropy, metadata=metadata, source=source, document=data,
                    entropy_by_position=by_position, log_keys_by_position=log_keys,
                    entropy_without_first=without_first,
                    entropy_without_first_by_position=without_first_by_position)


def _kind(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, (int, float)):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


class _Validator:
    """Checks one document; every failure names the file and the JSON path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, what: str) -> None:
        where = f"{self.source}: {path}: " if path else f"{self.source}: "
        raise QkspectraError(where + what)

    def positive_int(self, obj: dict, key: str) -> int:
        if key not in obj:
            self.fail(key, "missing")
        x = obj[key]
        if type(x) is not int:
            if type(x) is float and x.is_integer() and x >= 1:
                return int(x)
            self.fail(key, f"expected a positive whole number, found {_describe(x)}")
        if x < 1:
            self.fail(key, f"expected a positive whole number, found {x}")
        return x

    def rows(self, obj: dict, key: str, n: int, count_key: str) -> list:
        if key not in obj:
            self.fail(key, "missing")
        rows = obj[key]
        if not isinstance(rows, list):
            self.fail(key, f"expected a list of {n} rows, found {_kind(rows)}")
        if len(rows) != n:
            self.fail(key, f"{len(rows)} rows, but {count_key} is {n}")
        return rows

    def _row_list(self, row: Any, path: str, key: str, num_heads: int) -> list:
        if not isinstance(row, dict):
            self.fail(path, f"expected an object, found {_kind(row)}")
        if key not in row:
            self.fail(f"{path}.{key}", "missing")
        values = row[key]
        if not isinstance(values, list):
            self.fail(f"{path}.{key}", f"expected a list of {num_heads} heads, found {_kind(values)}")
        if not values:
            self.fail(f"{path}.{key}", "empty list of heads")
        if len(values) != num_heads:
            self.fail(f"{path}.{key}", f"{len(values)} heads, but num_heads is {num_heads}")
        return values

    def _check_numbers(self, values: list, path: str) -> None:
        """Every element is an int or float (not a bool, string, null, list...)."""
        for i, x in enumerate(values):
            if type(x) not in _NUMBER_TYPES:
                self.fail(f"{path}[{i}]", f"expected a number, found {_describe(x)}")
            if type(x) is int and abs(x) > 1e300:
                self.fail(f"{path}[{i}]", "number too large")

    def spectra_row(self, row: Any, path: str, num_heads: int) -> np.ndarray:
        """One layer's spectra as ndarray of shape (H, k_L), zero-padded to the layer's longest."""
        key = "metric_singvals_per_head"
        path = f"{path}.{key}"
        heads = self._row_list(row, path.rsplit(".", 1)[0], key, num_heads)
        lengths = [len(s) if type(s) is list else -1 for s in heads]
        if min(lengths) < 1:
            h = next(h for h, n in enumerate(lengths) if n < 1)
            s = heads[h]
            if isinstance(s, list):
                self.fail(f"{path}[{h}]", "empty spectrum")
            self.fail(f"{path}[{h}]", f"expected a list of singular values, found {_describe(s)}")
        k = max(lengths)
        sigma = self._rectangular(heads) if min(lengths) == k else None  # (H, k), or None: check one by one
        if sigma is None:
            for h, s in enumerate(heads):
                self._check_numbers(s, f"{path}[{h}]")
            sigma = np.zeros((num_heads, k))  # (H, k)
            for h, s in enumerate(heads):
                sigma[h, : len(s)] = s
        padding = np.arange(k)[None, :] >= np.asarray(lengths)[:, None]  # (H, k)
        self._first(~np.isfinite(sigma), path, lambda x: f"not a finite number: {x}", sigma)
        self._first(sigma < 0, path, lambda x: f"negative singular value {_fmt(x)}", sigma)
        self._first(sigma > MAX_SINGULAR_VALUE, path, lambda x: f"singular value {_fmt(x)} too large: its square "
                    f"overflows float64 in the fits (above {MAX_SINGULAR_VALUE:.0e}; rescale the geometry)", sigma)
        rising = np.zeros_like(padding)
        rising[:, 1:] = (sigma[:, 1:] > sigma[:, :-1]) & ~padding[:, 1:]
        self._first(rising, path, lambda x: f"singular values not in descending order ({_fmt(x)} follows a smaller value)", sigma)
        return sigma

    @staticmethod
    def _rectangular(heads: list) -> np.ndarray | None:
        """Equal-length spectra as a float64 (H, k) array when every element is surely a JSON number.

        A fast path: numpy turns a string into a '<U' array and null or a huge integer into an
        object array, but a boolean among numbers silently into 0.0 or 1.0; so a layer that holds
        an exact 0 or 1, a non-finite value or anything else unusual is left (None) to the exact
        element-by-element check, which also names the fault.
        """
        try:
            values = np.array(heads)  # (H, k)
        except (ValueError, TypeError, OverflowError):
            return None
        if values.ndim != 2 or values.dtype.kind not in "fi":
            return None
        values = values.astype(np.float64, copy=False)
        if not np.isfinite(values).all() or ((values == 0.0) | (values == 1.0)).any():
            return None
        return values

    def entropy_row(self, row: Any, path: str, num_heads: int) -> np.ndarray:
        """One layer's entropies, ndarray of shape (H,)."""
        key = "mean_attention_entropy_per_head"
        values = self._row_list(row, path, key, num_heads)
        path = f"{path}.{key}"
        if not set(map(type, values)) <= _NUMBER_TYPES:
            self._check_numbers(values, path)
        try:
            ent = np.array(values, dtype=np.float64)  # (H,)
        except OverflowError:
            self._check_numbers(values, path)
            raise
        self._first(~np.isfinite(ent), path, lambda x: f"not a finite number: {x}", ent)
        self._first(ent < 0, path, lambda x: f"negative entropy {_fmt(x)}", ent)
        return ent

    def position_rows(self, dynamic: list, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
        """Every layer's entropy by position bucket (L, H, buckets) and log visible keys (L, buckets).

        Present in the first row, so required in every row, with the same number of buckets.
        """
        by_position, log_keys = [], []
        for L, row in enumerate(dynamic):
            path = f"dynamic[{L}]"
            heads = self._row_list(row, path, POSITION_KEY, num_heads)
            buckets = len(heads[0]) if isinstance(heads[0], list) else -1
            for h, values in enumerate(heads):
                where = f"{path}.{POSITION_KEY}[{h}]"
                if not isinstance(values, list) or len(values) != buckets or buckets < 1:
                    self.fail(where, f"expected a list of {max(buckets, 1)} position buckets, found {_describe(values)}")
                self._check_numbers(values, where)
            if L and buckets != by_position[0].shape[1]:
                self.fail(f"{path}.{POSITION_KEY}", f"{buckets} position buckets, dynamic[0] has {by_position[0].shape[1]}")
            values = np.array(heads, dtype=np.float64)  # (H, buckets)
            self._first(~np.isfinite(values) | (values < 0), f"{path}.{POSITION_KEY}",
                        lambda x: f"not a finite entropy >= 0: {x}", values)
            by_position.append(values)
            where = f"{path}.{LOG_KEYS_KEY}"
            keys = row.get(LOG_KEYS_KEY)
            if not isinstance(keys, list) or len(keys) != buckets:
                self.fail(where, f"expected a list of {buckets} numbers, found {_describe(keys)}")
            self._check_numbers(keys, where)
            keys = np.array(keys, dtype=np.float64)  # (buckets,)
            self._first(~np.isfinite(keys) | (keys < 0), where, lambda x: f"not a finite number >= 0: {x}", keys)
            log_keys.append(keys)
        return np.stack(by_position), np.stack(log_keys)

    def _entropies_or_null(self, values: list, path: str) -> np.ndarray:
        """(n,) float64 of a list of entropies in nats, each finite and >= 0 or null (NaN)."""
        for i, x in enumerate(values):
            if x is not None and (type(x) not in _NUMBER_TYPES or (type(x) is int and abs(x) > 1e300)):
                self.fail(f"{path}[{i}]", f"expected a number or null, found {_describe(x)}")
        entropies = np.array([np.nan if x is None else x for x in values], dtype=np.float64)  # (n,)
        nulls = np.array([x is None for x in values])
        self._first(~nulls & (~np.isfinite(entropies) | (entropies < 0)), path,
                    lambda x: f"not a finite entropy >= 0 or null: {x}", entropies)
        return entropies

    def optional_entropies(self, row: Any, path: str, key: str, num_heads: int) -> np.ndarray:
        """One layer's per-head entropies (H,) under ``key``, null (NaN) where undefined; present in
        the first row, so required in every row."""
        return self._entropies_or_null(self._row_list(row, path, key, num_heads), f"{path}.{key}")

    def optional_position_rows(self, dynamic: list, num_heads: int, buckets: int | None) -> np.ndarray:
        """Every layer's entropy without the first position by bucket (L, H, buckets), null (NaN) where no
        query of a bucket sees two keys; ``buckets`` those of entropy_by_position_per_head, if present."""
        key = WITHOUT_FIRST_POSITION_KEY
        layers = []
        for L, row in enumerate(dynamic):
            heads = self._row_list(row, f"dynamic[{L}]", key, num_heads)
            if buckets is None:
                buckets = len(heads[0]) if isinstance(heads[0], list) and heads[0] else -1
            values = []
            for h, bucket_values in enumerate(heads):
                where = f"dynamic[{L}].{key}[{h}]"
                if not isinstance(bucket_values, list) or len(bucket_values) != buckets:
                    self.fail(where, f"expected a list of {max(buckets, 1)} position buckets, found {_describe(bucket_values)}")
                values.append(self._entropies_or_null(bucket_values, where))
            layers.append(np.stack(values))  # (H, buckets)
        return np.stack(layers)

    def _first(self, bad: np.ndarray, path: str, what, values: np.ndarray) -> None:
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            self.fail(path + "".join(f"[{i}]" for i in idx), what(values[idx]))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _describe(x: Any) -> str:
    """What a value is, quoting it when it is a short scalar: 'a string "abc"'."""
    if isinstance(x, (list, dict)) or x is None:
        return _kind(x)
    text = repr(x) if isinstance(x, float) and not math.isfinite(x) else json.dumps(x)
    return f"{_kind(x)} {text if len(text) <= 40 else text[:37] + '...'}"
