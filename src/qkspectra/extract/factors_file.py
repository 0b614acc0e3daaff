"""Stream the per-head factors into a safetensors file, one layer at a time.

The factors of a large model do not fit in memory (Llama-70B: about 24 GB as float32, each
key/value head once), so they are never gathered: the file's header is written as soon
as the first layer's shapes are known, every layer's slice is written at its offset, and the
staging file (beside the target, hidden) is renamed into place only by ``commit()``. Leaving
the ``with`` block without committing deletes it, so no half-written factors file is ever seen.

Format: standard safetensors (8-byte little-endian header length, JSON header, data); each
tensor has shape (L, *per-layer shape), float32, stored row-major, tensors one after another.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from qkspectra.atomic import current_umask, make_folder, remove_folders, write_error
from qkspectra.errors import QkspectraError

HEADER_ALIGNMENT = 8

# Receives (layer index, that layer's AttentionLayer as used for the spectra) once per layer.
FactorSink = Callable[[int, Any], None]


class FactorsFileWriter:
    """``with FactorsFileWriter(path, L, metadata) as w: w.write_layer(i, {...}) ...; w.commit()``."""

    def __init__(self, path: str | os.PathLike, num_layers: int, metadata: dict[str, str]):
        self.path = Path(path)
        self.num_layers = num_layers
        self.metadata = metadata
        self._file = None
        self._staging: Path | None = None
        self._layout: dict[str, tuple[int, int, tuple[int, ...]]] = {}  # name -> (data offset, layer bytes, shape)
        self._data_start = 0
        self._layers_written: set[int] = set()
        self._created_folders: list[Path] = []  # folders made for the file, removed again if it is never committed

    def __enter__(self) -> FactorsFileWriter:
        return self

    def _start(self, first_layer: dict[str, np.ndarray]) -> None:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, array in first_layer.items():
            layer_bytes = int(np.prod(array.shape)) * 4
            end = offset + layer_bytes * self.num_layers
            header[name] = {"dtype": "F32", "shape": [self.num_layers, *array.shape], "data_offsets": [offset, end]}
            self._layout[name] = (offset, layer_bytes, tuple(array.shape))
            offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        if self.path.is_dir():
            raise QkspectraError(f"cannot write {self.path}: it is a folder")
        self._created_folders = make_folder(self.path.parent, for_file=self.path)
        try:
            fd, staging = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self._staging = Path(staging)
            self._file = os.fdopen(fd, "wb")
            self._file.write(len(encoded).to_bytes(8, "little") + encoded)
            self._data_start = 8 + len(encoded)
            self._file.truncate(self._data_start + offset)
        except OSError as e:
            raise write_error(self.path, e) from None

    def write_layer(self, index: int, tensors: dict[str, np.ndarray]) -> None:
        """Write layer ``index``'s slice of every tensor (same names and shapes for every layer)."""
        if self._file is None:
            self._start(tensors)
        if set(tensors) != set(self._layout):
            raise QkspectraError(f"layer {index} has factors {sorted(tensors)}, layer 0 had {sorted(self._layout)}")
        for name, array in tensors.items():
            offset, layer_bytes, shape = self._layout[name]
            if array.shape != shape:
                raise QkspectraError(f"layer {index}: factor {name} has shape {array.shape}, expected {shape}")
            try:
                self._file.seek(self._data_start + offset + index * layer_bytes)
                self._file.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
            except OSError as e:
                raise write_error(self.path, e) from None
        self._layers_written.add(index)

    def commit(self) -> Path:
        """Rename the complete file into place."""
        if self._layers_written != set(range(self.num_layers)):
            raise QkspectraError(f"factors of layers {sorted(set(range(self.num_layers)) - self._layers_written)} "
                                 "were never written")
        try:
            self._file.close()
            os.chmod(self._staging, 0o666 & ~current_umask())
            os.replace(self._staging, self.path)
        except OSError as e:
            raise write_error(self.path, e) from None
        self._staging = None
        return self.path

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._staging is not None:
            self._staging.unlink(missing_ok=True)
            remove_folders(self._created_folders)
