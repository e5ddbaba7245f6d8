# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Atomic file writes: a file is either complete or left as it was, never truncated by a crash or a kill."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file path beside ``path``; when the block succeeds, move the file onto ``path``.

    The temporary file is flushed to disk and given the usual permissions of a new file before ``os.replace``
    (atomic on POSIX). If the block raises, the temporary file is removed and ``path`` keeps its old content.

    Args:
        path: the destination file; its folder must exist.
        suffix: suffix of the temporary file, for writers that choose the format by extension (``.nii.gz``).

    Yields:
        the temporary file's path, to write to.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: the destination file.
        text: its content.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)
