"""The per-head query/key factors: in memory, or read layer by layer from a ``.factors.safetensors`` file.

M[l, h] = W_Q[l, h] @ W_K[l, h // (H / H_kv)].T is head h's metric with the scale s included (sqrt(s) in
each factor, norms folded as in the geometry, each key/value head stored once). ``check_against_geometry``
makes sure the factors are those of a geometry: same layers and heads, same spectra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkspectra.threads import Mapper, thread_map
from qkspectra.analysis.seed import TINY
from qkspectra.errors import QkspectraError
from qkspectra.factored import gram_singular_values
from qkspectra.geometry import Geometry

FACTOR_NAMES = ("W_Q", "W_K")
BIAS_NAMES = ("b_Q", "b_K")


@dataclass(frozen=True, eq=False)
class LayerFactors:
    """One layer's factors, float64: M^h = W_Q[h] @ W_K[h // (H / H_kv)].T.

    W_Q: (H, d_model, d_head); W_K: (H_kv, d_model, d_head); b_Q: (H, d_head) or None; b_K: (H_kv, d_head) or None.
    """

    W_Q: np.ndarray
    W_K: np.ndarray
    b_Q: np.ndarray | None = None
    b_K: np.ndarray | None = None


class FactorsShape:
    """Sizes shared by in-memory and file-backed factors (``_shape`` = W_Q's, ``_kv_heads`` = W_K's head count)."""

    _shape: tuple[int, int, int, int]
    _kv_heads: int

    @property
    def num_layers(self) -> int:
        return self._shape[0]

    @property
    def num_heads(self) -> int:
        return self._shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self._kv_heads

    @property
    def d_model(self) -> int:
        return self._shape[2]

    @property
    def d_head(self) -> int:
        return self._shape[3]

    @property
    def kv_head(self) -> np.ndarray:
        """(H,) the key/value head each query head reads."""
        return np.arange(self.num_heads) // (self.num_heads // self.num_kv_heads)


@dataclass(frozen=True, eq=False)
class Factors(FactorsShape):
    """Per-head query/key factors in memory, M[l, h] = W_Q[l, h] @ W_K[l, h // (H / H_kv)].T (the scale s included).

    W_Q: (L, H, d_model, d_head) float64; W_K: (L, H_kv, d_model, d_head), H_kv dividing H (H_kv = H: one key
    factor per query head); b_Q: (L, H, d_head), b_K: (L, H_kv, d_head) float64 or None.
    fold_ln: whether the norm gains were folded in (None when the file does not say).
    """

    W_Q: np.ndarray
    W_K: np.ndarray
    b_Q: np.ndarray | None = None
    b_K: np.ndarray | None = None
    fold_ln: bool | None = None
    source: str = "<memory>"

    @property
    def _shape(self) -> tuple[int, int, int, int]:
        return self.W_Q.shape

    @property
    def _kv_heads(self) -> int:
        return self.W_K.shape[1]

    def layer(self, index: int) -> LayerFactors:
        return LayerFactors(self.W_Q[index], self.W_K[index],
                            None if self.b_Q is None else self.b_Q[index], None if self.b_K is None else self.b_K[index])


def _check_shapes(source: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """QkspectraError unless W_Q is (L, H, d_model, d_head), W_K (L, H_kv, d_model, d_head) with H_kv dividing H,
    and the biases (L, H, d_head), (L, H_kv, d_head)."""
    for name in FACTOR_NAMES:
        if name not in shapes:
            raise QkspectraError(f"{source}: no {name} tensor in the factors")
    q, k = shapes["W_Q"], shapes["W_K"]
    if len(q) != 4:
        raise QkspectraError(f"{source}: W_Q has shape {q}, expected (L, H, d_model, d_head)")
    if len(k) != 4 or (k[0], k[2], k[3]) != (q[0], q[2], q[3]) or k[1] < 1 or q[1] % k[1]:
        raise QkspectraError(f"{source}: W_K has shape {k} but W_Q has {q} "
                             "(expected (L, H_kv, d_model, d_head), H_kv dividing H)")
    for name, heads in zip(BIAS_NAMES, (q[1], k[1])):
        if name in shapes and shapes[name] != (q[0], heads, q[3]):
            raise QkspectraError(f"{source}: {name} has shape {shapes[name]}, expected {(q[0], heads, q[3])}")


def make_factors(arrays: dict[str, np.ndarray], *, fold_ln: bool | None = None, source: str = "<memory>",
                 geometry: Geometry | None = None) -> Factors:
    """Validate arrays named W_Q, W_K (and optionally b_Q, b_K) and build ``Factors`` (float64)."""
    _check_shapes(source, {name: np.shape(array) for name, array in arrays.items()})
    converted = {name: np.asarray(arrays[name], dtype=np.float64) for name in FACTOR_NAMES + BIAS_NAMES
                 if name in arrays}
    for name, array in converted.items():
        if not np.all(np.isfinite(array)):
            raise QkspectraError(f"{source}: {name} holds non-finite values")
    factors = Factors(converted["W_Q"], converted["W_K"], converted.get("b_Q"), converted.get("b_K"), fold_ln, source)
    if geometry is not None:
        check_against_geometry(factors, geometry)
    return factors


class FactorsFile(FactorsShape):
    """The factors of a ``.factors.safetensors`` file, read one layer at a time (float64) by ``layer(index)``.

    The file of an earlier layout, with W_K repeated for every query head (L, H, d_model, d_head), reads
    as it is: each key factor then simply serves one query head.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.source = str(self.path)
        if not self.path.is_file():
            raise QkspectraError(f"{self.path}: no such factors file")
        try:
            with safe_open(self.path, framework="numpy") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
                dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
                metadata = f.metadata() or {}
        except (OSError, SafetensorError, ValueError) as e:
            raise QkspectraError(f"{self.path}: not a readable safetensors file ({e})") from None
        _check_shapes(self.source, shapes)
        for name in FACTOR_NAMES + BIAS_NAMES:
            if name in dtypes and dtypes[name] not in ("F32", "F64"):
                raise QkspectraError(f"{self.path}: {name} is {dtypes[name]}, expected F32 (extract again)")
        self._shape = shapes["W_Q"]
        self._kv_heads = shapes["W_K"][1]
        self._names = [name for name in FACTOR_NAMES + BIAS_NAMES if name in shapes]
        value = metadata.get("fold_ln")
        self.fold_ln = None if value is None else value == "true"

    def layer(self, index: int) -> LayerFactors:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path, framework="numpy") as f:  # memory-mapped: only this layer's slices are read
                arrays = {name: np.asarray(f.get_slice(name)[index], dtype=np.float64) for name in self._names}
        except (OSError, SafetensorError, ValueError) as e:
            raise QkspectraError(f"{self.path}: layer {index} cannot be read ({e})") from None
        for name, array in arrays.items():
            if not np.all(np.isfinite(array)):
                raise QkspectraError(f"{self.path}: layer {index}: {name} holds non-finite values")
        return LayerFactors(arrays["W_Q"], arrays["W_K"], arrays.get("b_Q"), arrays.get("b_K"))


AnyFactors = Factors | FactorsFile


def load_factors(path: str | os.PathLike, geometry: Geometry | None = None) -> FactorsFile:
    """Open a ``.factors.safetensors`` file (read lazily, layer by layer); QkspectraError if missing, corrupt
    or inconsistent with ``geometry``."""
    factors = FactorsFile(path)
    if geometry is not None:
        check_against_geometry(factors, geometry)
    return factors


def as_factors(factors: AnyFactors | str | os.PathLike | dict[str, np.ndarray], geometry: Geometry | None = None) -> AnyFactors:
    """Factors from themselves, a factors file path (read lazily), or a dict of arrays (W_Q, W_K, [b_Q, b_K])."""
    if isinstance(factors, (Factors, FactorsFile)):
        if geometry is not None:
            check_against_geometry(factors, geometry)
        return factors
    if isinstance(factors, dict):
        return make_factors(factors, geometry=geometry)
    return load_factors(factors, geometry)


def check_against_geometry(factors: AnyFactors, geometry: Geometry, *, map: Mapper | None = None) -> None:
    """QkspectraError unless the factors have the geometry's layers and heads and reproduce its spectra.

    Reads one layer at a time (through ``map``, default: every core)."""
    L, H = geometry.num_layers, geometry.num_heads
    if (factors.num_layers, factors.num_heads) != (L, H):
        raise QkspectraError(
            f"{factors.source}: factors for {factors.num_layers} layers x {factors.num_heads} heads, "
            f"but the geometry {geometry.source} has {L} x {H}"
        )
    if geometry.max_rank > min(factors.d_model, factors.d_head):
        raise QkspectraError(
            f"{factors.source}: spectra of length {geometry.max_rank} in {geometry.source} "
            f"exceed the factors' rank {min(factors.d_model, factors.d_head)}"
        )
    expected = geometry.singular_values  # (L, H, K)
    scale = max(np.abs(expected).max(), TINY)

    def worst(index: int) -> float:
        layer = factors.layer(index)
        sigma = gram_singular_values(layer.W_Q, layer.W_K)[:, : geometry.max_rank]  # (H, K)
        return float(np.abs(sigma - expected[index]).max() / scale)

    with thread_map(map) as mapper:
        difference = max(mapper(worst, range(L)))
    if difference > 1e-3:
        raise QkspectraError(
            f"{factors.source}: the factors do not reproduce the spectra of {geometry.source} "
            f"(largest relative difference {difference:.2g}); were they extracted with the same model and norm folding?"
        )


def factors_path_for(geometry: Geometry) -> Path | None:
    """The factors file the geometry's metadata names (beside the geometry file), or None.

    None also when the name is not a plain file name (a path elsewhere is not "beside").
    """
    name = geometry.metadata.get("factors_file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or geometry.source.startswith("<"):
        return None
    return Path(geometry.source).with_name(name)
