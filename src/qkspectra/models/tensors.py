"""Read single named tensors, as float64 numpy arrays, without building a model.

``SafetensorsSource`` opens a folder's ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) with ``safetensors.safe_open`` and reads a tensor only when
asked, so a checkpoint larger than memory can be read layer by layer. ``StateDictSource``
serves an in-memory ``state_dict`` (tests, or a model already loaded). Adapters see only
the ``TensorSource`` protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qkspectra.errors import QkspectraError

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class TensorSource(Protocol):
    def names(self) -> frozenset[str]:
        """Every tensor name in the checkpoint."""

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float64 array; QkspectraError if absent or unreadable."""

    def dtype(self, name: str) -> str:
        """The stored dtype of ``name`` (e.g. ``"float32"``, ``"bfloat16"``)."""


class SafetensorsSource:
    """Lazy reader over a folder's single-file or sharded safetensors checkpoint."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise QkspectraError(f"{index} is not a valid safetensors shard index: {e}") from e
            if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and isinstance(shard, str) for name, shard in weight_map.items()
            ):
                raise QkspectraError(f"{index}: weight_map must map tensor names to shard file names")
            self._file_of = {name: self.folder / shard for name, shard in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            self._file_of = None
        else:
            raise QkspectraError(
                f"{self.folder} has no {SINGLE_FILE} or {SHARD_INDEX}; only safetensors checkpoints are supported"
            )
        self._handles: dict[Path, Any] = {}
        if self._file_of is None:
            self._names = frozenset(self._open(self.folder / SINGLE_FILE).keys())
        else:
            self._names = frozenset(self._file_of)

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise QkspectraError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from e
        return self._handles[path]

    def _handle_for(self, name: str):
        if name not in self._names:
            raise QkspectraError(f"tensor {name!r} not found in the checkpoint in {self.folder}")
        return self._open(self._file_of[name] if self._file_of is not None else self.folder / SINGLE_FILE)

    def names(self) -> frozenset[str]:
        return self._names

    def get(self, name: str) -> np.ndarray:
        import torch

        handle = self._handle_for(name)
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:
            raise QkspectraError(f"cannot read tensor {name!r} from {self.folder}: {e}") from e
        return tensor.to(torch.float64).numpy()

    def dtype(self, name: str) -> str:
        handle = self._handle_for(name)
        stored = str(handle.get_slice(name).get_dtype())
        return SAFETENSORS_DTYPES.get(stored, stored.lower())

    def close(self) -> None:
        """Unmap the files read so far (their pages would stay resident, counted again beside a loaded model's);
        a later read opens them again."""
        self._handles.clear()


class StateDictSource:
    """A ``TensorSource`` over a mapping of names to torch tensors or numpy arrays."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self._tensors = state_dict

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def get(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise QkspectraError(f"tensor {name!r} not found in the state dict")
        tensor = self._tensors[name]
        if hasattr(tensor, "detach"):
            import torch

            # to the CPU first: half the transfer for 16-bit weights, and devices without float64 (MPS)
            return tensor.detach().cpu().to(torch.float64).numpy()
        return np.asarray(tensor, dtype=np.float64)

    def dtype(self, name: str) -> str:
        return str(self._tensors[name].dtype).removeprefix("torch.")


def open_tensors(folder: Path) -> SafetensorsSource:
    """Lazy tensor reader for the safetensors checkpoint in ``folder``."""
    return SafetensorsSource(folder)
