"""Atomic file and directory writes: readers see the old file or the new one, never half.

Traces, plans and exports are read by other processes (planners, loaders, a fleet's
merge job) while they are being produced. Everything is written to a temporary sibling,
flushed to disk, then renamed into place: a crash leaves at most a stray temporary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_permissions(path: Path) -> None:
    """Give ``path`` the mode plain ``open()`` / ``mkdir()`` would have (umask applied).

    ``mkstemp`` / ``mkdtemp`` (and safetensors' writer) create owner-only files; outputs
    meant for other processes, such as a vLLM server running as another user, must be
    readable like any other file the user creates.
    """
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The caller writes the file at the yielded path by any means (``safetensors``,
    ``yaml``...). On an exception the temporary is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _default_permissions(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; it becomes ``target`` on success.

    ``target`` must not exist yet: replacing a directory cannot be atomic, and silently
    deleting a user's directory is worse than refusing.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose a new output directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                _default_permissions(path)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
