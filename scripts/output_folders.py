# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The folders a run writes to, made ready before any work: outside the input cases, writable, no leftovers.

Every workflow config calls :func:`prepare_output_folders` in its ``initialize`` list, after its cases are found
and before anything is computed, so that a bad output folder is refused at once instead of after an epoch or an
evaluation, and no run writes among the cases it reads (a segmentation written into a BraTS 2020 case folder
replaces its ``<case>_seg.nii.gz``; a folder inside the dataset folder becomes a "case" of the next run).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from scripts.atomic_files import remove_stale_temporary_files

__all__ = ["input_folders", "prepare_output_folders"]

_CASE_FILE_KEYS = ("image", "label")


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def input_folders(dataset_dir: str | os.PathLike | None, cases: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The folders holding a run's input: the dataset folder and the folder of every case file.

    Args:
        dataset_dir: the dataset folder (or a one-file study, whose own folder is a case folder); None or a path
            that is not a folder adds no folder.
        cases: datalist entries; the files under their ``image`` (a path or a list of paths) and ``label`` keys.

    Returns:
        ``{real folder path: what it is}``, e.g. ``"the dataset folder"`` or ``"the folder of case <id>"``.
    """
    folders: dict[str, str] = {}
    for case in cases:
        for key in _CASE_FILE_KEYS:
            files = case.get(key)
            for file in [files] if isinstance(files, (str, os.PathLike)) else files or ():
                folder = os.path.dirname(_real(file))
                folders.setdefault(folder, f"the folder of case {case.get('case_id', file)}")
    if dataset_dir and os.path.isdir(dataset_dir):
        folders[_real(dataset_dir)] = "the dataset folder"
    return folders


def prepare_output_folders(
    folders: Mapping[str, str | os.PathLike | None],
    dataset_dir: str | os.PathLike | None,
    cases: Iterable[Mapping[str, Any]],
) -> dict[str, str]:
    """Check the output folders of a run against its input, create them, and remove stale temporary files.

    Each folder must not be, nor lie inside, a folder of :func:`input_folders`; it is then created if needed and
    a file is written and removed in it; finally the temporary files of interrupted atomic writes are removed from
    it (see ``scripts.atomic_files.remove_stale_temporary_files``), with an INFO log naming them.

    Args:
        folders: ``{config id: folder}`` (``{"output_dir": ...}``); None values (an unused folder) are skipped.
        dataset_dir: the dataset folder of the run.
        cases: the run's cases (datalist entries with ``image`` and ``label`` files).

    Returns:
        ``{config id: folder}`` of the folders prepared.

    Raises:
        ValueError: naming the id, the folder and the case or dataset folder, if a folder is among the input cases.
        PermissionError: naming the id and the folder, if it cannot be created or written to (a parent is a file,
            read-only file system, no permission).
    """
    inputs = input_folders(dataset_dir, cases)
    prepared = {}
    for name, folder in folders.items():
        if folder is None:
            continue
        folder = os.fspath(folder)
        for input_folder, what in inputs.items():
            if _is_within(_real(folder), input_folder):
                raise ValueError(
                    f"output folder {folder} is inside {what} ({input_folder}): writing there would replace "
                    f"or add files among the input cases; pass a --{name} outside the dataset folder."
                )
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError("no write permission")
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise PermissionError(
                f"output folder {folder} cannot be created or written to: {e}; pass another --{name}."
            ) from e
        removed = remove_stale_temporary_files(folder)
        if removed:
            logging.getLogger(__name__).info(f"removed temporary files of interrupted writes: {', '.join(removed)}")
        prepared[name] = folder
    return prepared
