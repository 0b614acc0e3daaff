"""Atomic file writes: a reader never sees a half-written output file.

A write that the file system refuses (a folder in the way, no permission, disk full) raises
``QkspectraError`` naming the file, so the command line prints one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson

from qkspectra.errors import QkspectraError


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: Path, error: OSError) -> QkspectraError:
    """``cannot write PATH: REASON`` for an OSError met while writing ``path``."""
    blocking = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    reason = f"{blocking} is a file, not a folder" if blocking is not None else error.strerror or str(error)
    return QkspectraError(f"cannot write {path}: {reason}")


def make_folder(path: Path, *, for_file: Path | None = None) -> list[Path]:
    """Create ``path`` and its parents if needed; QkspectraError (naming ``for_file``, if given) if refused.

    Returns the folders it created, outermost first (for ``remove_folders`` to undo).
    """
    missing = [folder for folder in (path, *path.parents) if not folder.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(for_file or path, e) from None
    return missing


def remove_folders(created: list[Path]) -> None:
    """Undo ``make_folder``: remove the folders it created, innermost first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


def refuse_overwriting_inputs(output: Path, inputs: list[Path]) -> None:
    """QkspectraError if ``output`` is one of the files ``inputs``.

    Writing there would destroy what is being read (a geometry, its factors, a corpus, a model's files).
    """
    output = Path(output)
    try:
        resolved = output.resolve()  # symbolic links and ".." resolved, also through folders not yet made
    except (OSError, RuntimeError) as e:  # a symbolic link loop
        raise QkspectraError(f"cannot write {output}: {e}") from None
    for source in inputs:
        source = Path(source)
        if source.is_file() and (resolved == source.resolve() or (output.exists() and output.samefile(source))):
            raise QkspectraError(f"output {output} would overwrite an input ({source}); write it elsewhere")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A path that names an existing device or pipe (``/dev/null``, ``/dev/stdout``) is written
    directly: renaming over it would replace the device with a file.
    """
    path = Path(path)
    if path.is_dir():
        raise QkspectraError(f"cannot write {path}: it is a folder")
    if path.exists() and not path.is_file():
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise write_error(path, e) from None
        return path
    with _replacing(path) as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return path


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, str]]:
    """(fd, name) of a temporary file beside ``path``, renamed onto it (with a plain open()'s permissions)
    when the block succeeds and removed when it fails; OSError as ``write_error``."""
    make_folder(path.parent, for_file=path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield fd, tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: object) -> bytes:
    """Serialise to indented JSON; numpy arrays become lists, NaN is never written (use None)."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_bytes(path, dumps_json(obj))


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy ``source`` to ``target`` through a temporary file beside it, then rename (as ``atomic_write_bytes``)."""
    import shutil

    target = Path(target)
    with _replacing(target) as (fd, tmp):
        os.close(fd)
        shutil.copyfile(source, tmp)
    return target
