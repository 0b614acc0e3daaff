"""Where a report's files go: the plots folder, the check that nothing blocks a path, the PNG writer.

Shared by the run's report (``run_page``) and the sweep's page (``sweep_page``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qkspectra.atomic import atomic_write_bytes
from qkspectra.errors import QkspectraError

PLOTS_FOLDER = "plots"


def check_writable(paths: list[Path]) -> None:
    """QkspectraError, before anything is written, if a folder or a file stands where one of ``paths`` must go."""
    for path in paths:
        if path.is_dir():
            raise QkspectraError(f"cannot write {path}: it is a folder")
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise QkspectraError(f"cannot write {path}: {blocking} is a file, not a folder")


def write_images(images: Mapping[str, bytes], out_dir: Path) -> dict[str, Path]:
    """out_dir/plots/NAME.png for each plot name -> PNG bytes, written atomically; name -> path."""
    return {name: atomic_write_bytes(out_dir / PLOTS_FOLDER / f"{name}.png", png) for name, png in images.items()}
