"""Where and in what precision a model runs: ``--device auto|cpu|cuda|cuda:N|mps``, ``--dtype``.

``auto`` is the first CUDA device when there is one, else Apple's MPS, else the CPU. The model's
dtype defaults to float32 on the CPU and bfloat16 on a GPU; whatever it is, the corpus pass forms
queries and keys and reduces entropies in float32 (see ``extract.entropy``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qkspectra.errors import QkspectraError

DEVICES = "auto, cpu, cuda, cuda:N, mps"
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class Placement:
    device: str  # a torch device string: "cpu", "cuda:0", "mps"
    dtype: str  # one of DTYPES


def check_placement_names(device: str, dtype: str | None) -> None:
    """QkspectraError unless ``device`` and ``dtype`` are names qkspectra knows (checked before any work)."""
    if not isinstance(device, str) or not _DEVICE_PATTERN.fullmatch(device):
        raise QkspectraError(f"--device {device!r} is not one of {DEVICES}")
    if dtype is not None and dtype not in DTYPES:
        raise QkspectraError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def resolve_placement(device: str = "auto", dtype: str | None = None) -> Placement:
    """The device that is there and the dtype to load the model in; QkspectraError (one line) for a missing device."""
    import torch

    check_placement_names(device, dtype)
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "auto":
        device = "cuda:0" if cuda_count else "mps" if mps else "cpu"
    elif device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= cuda_count:
            have = f"{cuda_count} CUDA device{'s' if cuda_count != 1 else ''}" if cuda_count else "no CUDA device"
            raise QkspectraError(f"--device {device}: this machine has {have}")
        device = f"cuda:{index}"
    elif device == "mps" and not mps:
        raise QkspectraError("--device mps: this machine has no MPS device")
    if dtype is None:
        dtype = "float32" if device == "cpu" else "bfloat16"
    return Placement(device, dtype)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)
