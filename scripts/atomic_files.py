# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Atomic file writes: a file is either complete or left as it was, never truncated by a crash or a kill.

A write goes to a hidden temporary file beside its destination, ``.<name>.<8 random characters><suffix>``, locked
(``flock``) while it is written and renamed over the destination when complete. A process killed meanwhile leaves
that file behind, unlocked; :func:`remove_stale_temporary_files` removes such leftovers and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock, so leftovers cannot be told from writes in progress and are kept
    fcntl = None

__all__ = ["TEMPORARY_SUFFIXES", "atomic_path", "remove_stale_temporary_files", "write_text_atomic"]

# suffixes of temporary files besides the destination's own extension (e.g. ".nii.gz")
TEMPORARY_SUFFIXES = (".tmp", ".partial")
# tempfile.mkstemp(prefix=".<name>.", suffix=...) names: 8 characters of tempfile's alphabet between them
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\..+)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file path beside ``path``; when the block succeeds, move the file onto ``path``.

    The temporary file is locked until it is renamed, flushed to disk and given the usual permissions of a new file
    before ``os.replace`` (atomic on POSIX). If the block raises, the temporary file is removed and ``path`` keeps
    its old content.

    Args:
        path: the destination file; its folder must exist.
        suffix: suffix of the temporary file: one of ``TEMPORARY_SUFFIXES``, or the destination's own extension for
            writers that choose the format by extension (``.nii.gz``).

    Yields:
        the temporary file's path, to write to.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    if fcntl is None:
        os.close(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed, also when the process is killed
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if fcntl is not None:
            os.close(fd)


def _is_temporary_name(filename: str) -> bool:
    match = _TEMPORARY_NAME.fullmatch(filename)
    return match is not None and (match["suffix"] in TEMPORARY_SUFFIXES or match["name"].endswith(match["suffix"]))


def remove_stale_temporary_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files that interrupted :func:`atomic_path` writes left in ``folder``.

    Only files named as :func:`atomic_path` names them (``.<name>.<8 characters><suffix>``, the suffix one of
    ``TEMPORARY_SUFFIXES`` or the end of ``<name>``) and not locked by a write in progress are removed. Without
    ``flock`` (Windows) nothing is removed.

    Args:
        folder: an existing folder.

    Returns:
        the removed files, sorted.
    """
    if fcntl is None:
        return []
    removed = []
    with os.scandir(folder) as entries:
        candidates = [e.path for e in entries if e.is_file(follow_symlinks=False) and _is_temporary_name(e.name)]
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a write in progress holds it
            os.remove(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return sorted(removed)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: the destination file.
        text: its content.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)
