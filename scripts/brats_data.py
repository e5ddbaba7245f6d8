# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Discovery of BraTS cases on disk (BraTS 2020/2021, BraTS 2023+, MSD Task01) and patient-level splits.

Three release layouts are recognised (see ``LAYOUTS``)::

    brats2020   <dataset_dir>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz
    brats2023   <dataset_dir>/<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz
    msd         <dataset_dir>/imagesTr/BRATS_xxx.nii.gz (4D: FLAIR, T1w, T1gd, T2w) and labelsTr/BRATS_xxx.nii.gz

Every found case is a dict ready for a MONAI datalist: ``case_id``, ``patient_id``, ``layout``, ``image`` (one path
per requested sequence, or the MSD 4D file with ``channel_indices``) and, when present, ``label``. Label values are
not read here: ``LABEL_MAPS`` tells the loader how to map each release's values to the internal classes.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

__all__ = [
    "LABEL_MAPS",
    "LAYOUTS",
    "MSD_CHANNELS",
    "SEQUENCE_ALIASES",
    "SEQUENCE_FILE_NAMES",
    "BraTSDataError",
    "build_splits",
    "canonical_sequences",
    "detect_layout",
    "find_cases",
    "find_unlabelled_cases",
    "load_datalist",
    "select_split",
    "split_cases",
]

LAYOUTS = ("brats2020", "brats2023", "msd")
# canonical sequence names and the accepted aliases a user may write in `modalities`
SEQUENCE_ALIASES = {
    "flair": ("flair", "t2f", "t2flair"),
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c", "t1gd"),
    "t2": ("t2", "t2w"),
}
# file name suffix of each canonical sequence in the per-case-folder releases
SEQUENCE_FILE_NAMES = {
    "brats2020": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "brats2023": {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
}
# channel order of MSD Task01 4D images
MSD_CHANNELS = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
# release label value -> internal label (0 background, 1 necrotic/non-enhancing core, 2 edema, 3 enhancing)
LABEL_MAPS = {
    "brats2020": {0: 0, 1: 1, 2: 2, 4: 3},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
}

SPLITS = ("training", "validation", "test")
UNLABELLED = "unlabelled"  # the datalist list of cases used without their labels (distillation)
_SEPARATORS = {"brats2020": "_", "brats2023": "-"}
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")
_MSD_DIRS = ("imagesTr", "imagesTs", "labelsTr", "labelsTs")
_ALIAS_TO_SEQUENCE = {alias: name for name, aliases in SEQUENCE_ALIASES.items() for alias in aliases}
_TIMEPOINT = re.compile(r"(?P<patient>.+)-\d{3}")
_EXPECTED_LAYOUTS = (
    "brats2020 (<case>/<case>_flair.nii.gz, _t1, _t1ce, _t2, _seg), "
    "brats2023 (<case>/<case>-t2f.nii.gz, -t1n, -t1c, -t2w, -seg) or "
    "msd (imagesTr/*.nii.gz or imagesTs/*.nii.gz, labels in labelsTr/)"
)


class BraTSDataError(ValueError):
    """Bad or unrecognised BraTS data; the message names the case and the file."""


def canonical_sequences(modalities: Sequence[str]) -> list[str]:
    """Map user-written sequence names (any alias of ``SEQUENCE_ALIASES``, any case) to canonical names.

    Args:
        modalities: sequence names such as ``("flair", "t1ce", "t2")`` or ``("t2f", "t1c", "t2w")``.

    Returns:
        the canonical names (``flair``, ``t1``, ``t1ce``, ``t2``), in the given order.

    Raises:
        BraTSDataError: if ``modalities`` is a single string or empty, a name is unknown, or two names denote the
            same sequence.
    """
    if isinstance(modalities, str) or not modalities:
        raise BraTSDataError(f"modalities must be a non-empty list of sequence names, got {modalities!r}.")
    sequences = []
    for name in modalities:
        sequence = _ALIAS_TO_SEQUENCE.get(str(name).strip().lower())
        if sequence is None:
            accepted = "; ".join(
                f"{canonical}: {', '.join(aliases)}" for canonical, aliases in SEQUENCE_ALIASES.items()
            )
            raise BraTSDataError(f"Unknown MRI sequence {name!r} in modalities; accepted names are {accepted}.")
        if sequence in sequences:
            raise BraTSDataError(f"Sequence {sequence!r} is requested twice in modalities {list(modalities)}.")
        sequences.append(sequence)
    return sequences


def detect_layout(dataset_dir: str | os.PathLike) -> str:
    """Tell which BraTS release layout a dataset folder follows.

    A folder is ``msd`` when ``imagesTr/`` or ``imagesTs/`` holds NIfTI files, ``brats2020`` or ``brats2023``
    when its case subfolders (or those of grouping folders such as ``HGG/``) hold files named after the folder in
    that release's convention, in any letter case (any sequence or the segmentation counts, so a case missing one
    sequence is still recognised). Hidden entries are ignored.

    Args:
        dataset_dir: the dataset folder.

    Returns:
        one of ``LAYOUTS``.

    Raises:
        BraTSDataError: if the folder does not exist, is empty, follows no known layout, or mixes layouts.
    """
    root = _absolute(dataset_dir)
    if not root.is_dir():
        raise BraTSDataError(f"Dataset folder {root} does not exist or is not a folder; expected {_EXPECTED_LAYOUTS}.")
    if not _visible(root.iterdir()):
        raise BraTSDataError(f"Dataset folder {root} is empty; expected {_EXPECTED_LAYOUTS}.")
    found: dict[str, str] = {}  # layout -> an example that shows it
    for images_dir in ("imagesTr", "imagesTs"):
        if _nifti_files(root / images_dir):
            found.setdefault("msd", str(root / images_dir))
    for layout in _SEPARATORS:
        for folder in _case_folder_candidates(root, layout):
            if _holds_case_files(folder, layout):
                found.setdefault(layout, str(folder))
                break
    if not found:
        raise BraTSDataError(f"Dataset folder {root} follows no known BraTS layout; expected {_EXPECTED_LAYOUTS}.")
    if len(found) > 1:
        examples = ", ".join(f"{layout} (e.g. {example})" for layout, example in sorted(found.items()))
        raise BraTSDataError(f"Dataset folder {root} mixes layouts: {examples}; keep one release per folder.")
    return next(iter(found))


def find_cases(
    dataset_dir: str | os.PathLike, modalities: Sequence[str] = ("flair", "t1ce", "t2"), require_label: bool = True
) -> list[dict[str, Any]]:
    """Find every case of a BraTS dataset folder, in any layout of ``LAYOUTS``.

    For ``brats2020``/``brats2023`` every (non-hidden) subfolder holding files named after it is a case whose id is
    the folder name, also one level down in grouping folders (BraTS 2019's ``HGG/`` and ``LGG/``, or
    ``<case>/<case>/``); file names are compared in any letter case, and ``.nii`` files are accepted besides
    ``.nii.gz``. For ``msd`` every image of ``imagesTr/`` is a case (plus ``imagesTs/`` when ``require_label`` is
    False), labelled by the file of the same name in ``labelsTr/`` (``labelsTs/``). No case is skipped: a missing
    file is an error, and so are two files for one volume or one case id twice; only a subfolder without any NIfTI
    file (``docs/``) is skipped, with a warning.

    Args:
        dataset_dir: the dataset folder.
        modalities: the sequences to load, in channel order; any alias of ``SEQUENCE_ALIASES``.
        require_label: whether every case must have a label file (training, evaluation).

    Returns:
        the cases sorted by ``case_id``, each a dict with ``case_id``, ``patient_id`` (BraTS 2023: the case id
        without its ``-NNN`` timepoint; otherwise the case id), ``layout``, ``image`` (a list of absolute paths in the
        order of ``modalities``, or for ``msd`` the 4D file's absolute path plus ``channel_indices``) and ``label``
        (absolute path, present when the file exists).

    Raises:
        BraTSDataError: if the layout is not recognised, no case is found, a requested sequence file is missing,
            a label is missing while ``require_label`` is True, a volume has two files (``.nii`` and ``.nii.gz``),
            a case id is found twice, or a subfolder holds NIfTI files not named after it; the message names the
            case and the files.
    """
    root = _absolute(dataset_dir)
    sequences = canonical_sequences(modalities)
    layout = detect_layout(root)
    candidates = _candidates(root, layout, require_label)
    if not candidates:
        raise BraTSDataError(
            f"Dataset folder {root} has no labelled case: {root / 'imagesTr'} holds no NIfTI image "
            "(imagesTs/ is only searched when require_label is False)."
        )
    return [_make_case(case_id, source, layout, sequences, require_label) for case_id, source in candidates.items()]


def case_from_file(path: str | os.PathLike, modalities: Sequence[str] = ("flair", "t1ce", "t2")) -> dict[str, Any]:
    """Build the case of a one-file study (as MONAI Label hands it over) from any one of its files.

    A sequence or label file named the BraTS way (``<case>_flair.nii.gz``, ``<case>-t2f.nii.gz``, ...) gives its
    case folder, whose sibling sequence files are found as in :func:`find_cases`. A 4D image under ``imagesTr/`` or
    ``imagesTs/`` is an MSD Task01 case. Any other multi-channel NIfTI is a ``multichannel`` case: with as many
    channels as ``modalities`` they are taken in that order; with 4 channels, in the BraTS/MSD order flair, t1,
    t1ce, t2.

    Args:
        path: one file of the study.
        modalities: the sequences to load, in channel order (aliases accepted).

    Returns:
        a case dict as :func:`find_cases` returns (no ``label`` is required); ``layout`` is ``multichannel`` for a
        generic multi-channel NIfTI.

    Raises:
        BraTSDataError: if the file does not exist, a sibling sequence file is missing (naming the case and the
            file), or a single-channel file is not named the BraTS way.
    """
    file = _absolute(path)
    sequences = canonical_sequences(modalities)
    if not file.is_file():
        raise BraTSDataError(f"Study file {file} does not exist.")
    stem = _strip_nifti(file.name)
    for layout, separator in _SEPARATORS.items():
        suffixes = "|".join(list(SEQUENCE_FILE_NAMES[layout].values()) + ["seg"])
        match = re.fullmatch(rf"(?P<case>.+){re.escape(separator)}(?:{suffixes})", stem, flags=re.IGNORECASE)
        if match:
            return _make_case(match["case"], file.parent, layout, sequences, require_label=False)
    if file.parent.name in ("imagesTr", "imagesTs"):
        return _make_case(stem, file, "msd", sequences, require_label=False)
    shape = nib.load(str(file)).shape
    channels = shape[3] if len(shape) == 4 else 1
    if channels == len(sequences):
        indices = list(range(channels))
    elif channels == len(MSD_CHANNELS):
        indices = [MSD_CHANNELS[s] for s in sequences]
    else:
        raise BraTSDataError(
            f"Study file {file} is neither named like a BraTS sequence file (<case>_flair.nii.gz, "
            f"<case>-t2f.nii.gz, ...) so that its sibling sequences can be found, nor a multi-channel NIfTI with "
            f"{len(sequences)} channels ({', '.join(sequences)}) or 4 (flair, t1, t1ce, t2): it has {channels}."
        )
    return {
        "case_id": stem,
        "patient_id": stem,
        "layout": "multichannel",
        "image": str(file),
        "channel_indices": indices,
    }


def split_cases(
    cases: list[dict[str, Any]], seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, list[dict[str, Any]]]:
    """Split cases into training, validation and test at patient level, reproducibly.

    All cases of one patient (``patient_id``) land in the same split. The sorted patient ids are shuffled with
    ``random.Random(seed)``; the first ``max(1, round(n * test_fraction))`` go to test, the next
    ``max(1, round(n * val_fraction))`` to validation and the rest to training. With only one or two patients no
    split is possible: every case is used in every split and a ``UserWarning`` says so.

    Args:
        cases: cases from :func:`find_cases`.
        seed: seed of the shuffle.
        val_fraction: fraction of patients for validation, in [0, 1).
        test_fraction: fraction of patients for test, in [0, 1).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each sorted by ``case_id``.

    Raises:
        BraTSDataError: if ``cases`` is empty.
        ValueError: if a fraction is outside [0, 1) or the fractions leave no patient for training.
    """
    if not cases:
        raise BraTSDataError("No cases to split: the dataset folder or datalist holds no case.")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}.")
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for case in sorted(cases, key=lambda c: c["case_id"]):
        by_patient.setdefault(case["patient_id"], []).append(case)
    patients = sorted(by_patient)
    n = len(patients)
    if n < 3:
        warnings.warn(
            f"Only {n} patient(s) ({len(cases)} case(s)) found: too few for a split, so every case is used for "
            "training, validation and test alike; the metrics are not a held-out estimate.",
            UserWarning,
            stacklevel=2,
        )
        everything = sorted(cases, key=lambda c: c["case_id"])
        return {split: list(everything) for split in SPLITS}
    random.Random(seed).shuffle(patients)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise ValueError(
            f"With {n} patients, val_fraction={val_fraction} and test_fraction={test_fraction} leave no patient "
            "for training."
        )
    groups = {
        "test": patients[:n_test],
        "validation": patients[n_test : n_test + n_val],
        "training": patients[n_test + n_val :],
    }
    return {
        split: sorted((c for p in groups[split] for c in by_patient[p]), key=lambda c: c["case_id"]) for split in SPLITS
    }


def load_datalist(
    datalist_file: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    modalities: Sequence[str] = ("flair", "t1ce", "t2"),
    require_label: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Read an explicit split from a JSON datalist and resolve its cases in ``dataset_dir``.

    The file holds ``{"training": [...], "validation": [...], "test": [...]}`` (``validation`` and ``test`` may
    be left out). Each entry is a case id, a path whose file name gives the case id (as MSD's ``test`` list), or a
    dict: its ``case_id``, else the file name of its ``label`` (else ``image``) without ``.nii``/``.nii.gz``, so MSD's
    own ``dataset.json`` works as a datalist. Only the listed cases are checked.

    Args:
        datalist_file: the JSON datalist.
        dataset_dir: the dataset folder the case ids refer to.
        modalities: the sequences to load, in channel order; any alias of ``SEQUENCE_ALIASES``.
        require_label: whether every case must have a label file.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` of cases as returned by :func:`find_cases`, in
        the datalist's order.

    Raises:
        BraTSDataError: if the file cannot be read, is not valid JSON, has no ``training`` list, holds an entry
            without a case id, names a case that is not in ``dataset_dir``, or lists a case twice in one split (a
            case in two splits is warned about); or as :func:`find_cases` for a listed case.
    """
    path = _absolute(datalist_file)
    datalist = _read_datalist(path)
    splits = {split: _datalist_cases(datalist, split, path, dataset_dir, modalities, require_label) for split in SPLITS}
    listed: dict[str, list[str]] = {}  # case id -> the splits that list it
    for split in SPLITS:
        for case in splits[split]:
            splits_of_case = listed.setdefault(case["case_id"], [])
            if split in splits_of_case:
                raise BraTSDataError(
                    f'Datalist {path} lists case {case["case_id"]} twice in "{split}", where it would weigh twice; '
                    "list every case once."
                )
            splits_of_case.append(split)
    for case_id, splits_of_case in listed.items():
        if len(splits_of_case) > 1:
            warnings.warn(
                f"Datalist {path} lists case {case_id} in {' and '.join(splits_of_case)}: the metrics of the later "
                "split are not a held-out estimate for it.",
                UserWarning,
                stacklevel=3,
            )
    return splits


def find_unlabelled_cases(
    dataset_dir: str | os.PathLike,
    modalities: Sequence[str] = ("flair", "t1ce", "t2"),
    datalist: str | os.PathLike | None = None,
    unlabelled_dir: str | os.PathLike | None = None,
    labelled_cases: Iterable[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The cases distillation uses without their labels: a datalist's ``unlabelled`` list and an unlabelled folder.

    The ``"unlabelled"`` list of the JSON datalist names cases of ``dataset_dir`` (entries as in
    :func:`load_datalist`); ``unlabelled_dir`` is a folder of cases in any layout of ``LAYOUTS``, every one of which
    is used (MSD: ``imagesTr/`` and ``imagesTs/``). A label file next to such a case is never listed, so it is never
    opened: the teacher's predictions stand in for it (``scripts.unlabelled``).

    Args:
        dataset_dir: the dataset folder the datalist's case ids refer to.
        modalities: the sequences to load, in channel order; any alias of ``SEQUENCE_ALIASES``.
        datalist: the JSON datalist, or None / ``""`` for none.
        unlabelled_dir: a folder of unlabelled cases, or None / ``""`` for none.
        labelled_cases: the labelled cases of the run (training, validation and test); an unlabelled case may share
            neither their case ids nor their patients, so that no validation or test patient is trained on.

    Returns:
        the datalist's cases in its order, then ``unlabelled_dir``'s sorted by ``case_id``: dicts as
        :func:`find_cases` returns, without ``label`` and with ``labelled`` False.

    Raises:
        BraTSDataError: naming the case, if an entry is not in ``dataset_dir``, a case id comes twice, or a case or
            its patient is also among ``labelled_cases``; or as :func:`find_cases` for a case's files.
    """
    cases: list[dict[str, Any]] = []
    if datalist:
        path = _absolute(datalist)
        cases += _datalist_cases(_read_datalist(path), UNLABELLED, path, dataset_dir, modalities, False)
    if unlabelled_dir:
        cases += find_cases(unlabelled_dir, modalities, require_label=False)
    labelled = {case["case_id"]: case for case in labelled_cases}
    labelled_patients = {case["patient_id"]: case for case in labelled.values()}
    seen: dict[str, dict[str, Any]] = {}
    for case in cases:
        case_id, source = case["case_id"], _source(case)
        if case_id in seen:
            raise BraTSDataError(
                f"Unlabelled case {case_id} is listed twice: {_source(seen[case_id])} and {source}; every "
                "unlabelled case id must be unique."
            )
        other = labelled.get(case_id) or labelled_patients.get(case["patient_id"])
        if other is not None:
            raise BraTSDataError(
                f"Unlabelled case {case_id} ({source}) is also labelled case {other['case_id']} "
                f"({_source(other)}), or the same patient: remove it from the unlabelled cases, or from the "
                "datalist's labelled splits."
            )
        seen[case_id] = case
        case.pop("label", None)
        case["labelled"] = False
    return cases


def build_splits(
    dataset_dir: str | os.PathLike,
    modalities: Sequence[str] = ("flair", "t1ce", "t2"),
    datalist: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    require_label: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Training, validation and test cases of a dataset folder: the entry point of the bundle configs.

    Args:
        dataset_dir: the dataset folder, in any layout of ``LAYOUTS``.
        modalities: the sequences to load, in channel order; any alias of ``SEQUENCE_ALIASES``.
        datalist: a JSON datalist with an explicit split (see :func:`load_datalist`); None or ``""`` for an
            automatic patient-level split (see :func:`split_cases`).
        seed: seed of the automatic split.
        val_fraction: fraction of patients for validation in the automatic split.
        test_fraction: fraction of patients for test in the automatic split.
        require_label: whether every case must have a label file.

    Returns:
        ``{"training", "validation", "test", "all"}``; ``"all"`` holds every case of the splits once, sorted by
        ``case_id`` (for an automatic split: every case of the folder).

    Raises:
        BraTSDataError: as :func:`find_cases`, :func:`split_cases` and :func:`load_datalist`.
        ValueError: as :func:`split_cases`.
    """
    if datalist:
        splits = load_datalist(datalist, dataset_dir, modalities, require_label)
    else:
        splits = split_cases(find_cases(dataset_dir, modalities, require_label), seed, val_fraction, test_fraction)
    unique = {case["case_id"]: case for split in SPLITS for case in splits[split]}
    return {**splits, "all": [unique[case_id] for case_id in sorted(unique)]}


def select_split(splits: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    """The cases of one split of :func:`build_splits` (the ``eval_split`` of ``configs/evaluate.json``).

    Args:
        splits: as returned by :func:`build_splits`.
        name: ``training``, ``validation``, ``test`` or ``all``.

    Returns:
        the split's cases.

    Raises:
        BraTSDataError: naming the valid splits, if ``name`` is not one of them.
    """
    if name not in splits:
        raise BraTSDataError(f"eval_split {name!r} is not a split; use --eval_split {' | '.join(splits)}.")
    return splits[name]


def _read_datalist(path: Path) -> dict[str, Any]:
    """The JSON object of a datalist file, which must hold a ``training`` list."""
    try:
        datalist = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BraTSDataError(f"Cannot read datalist {path}: {e}") from e
    if not isinstance(datalist, dict) or not isinstance(datalist.get("training"), list):
        raise BraTSDataError(f'Datalist {path} must be a JSON object with a "training" list of cases.')
    return datalist


def _datalist_cases(
    datalist: dict[str, Any],
    split: str,
    path: Path,
    dataset_dir: str | os.PathLike,
    modalities: Sequence[str],
    require_label: bool,
) -> list[dict[str, Any]]:
    """The cases of one list of a datalist, resolved in ``dataset_dir`` and checked, in the list's order."""
    entries = datalist.get(split, [])
    if not isinstance(entries, list):
        raise BraTSDataError(f'Datalist {path}: "{split}" must be a list of cases, got {type(entries).__name__}.')
    if not entries:
        return []
    root = _absolute(dataset_dir)
    sequences = canonical_sequences(modalities)
    layout = detect_layout(root)
    candidates = _candidates(root, layout, require_label)
    cases = []
    for entry in entries:
        case_id = _datalist_case_id(entry, path, split)
        if case_id not in candidates:
            raise BraTSDataError(
                f'Datalist {path} lists case {case_id!r} in "{split}", but {root} holds no such {layout} case.'
            )
        cases.append(_make_case(case_id, candidates[case_id], layout, sequences, require_label))
    return cases


def _source(case: dict[str, Any]) -> str:
    """Where a case's first image file lies, for messages."""
    image = case["image"]
    return image if isinstance(image, str) else image[0]


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def _visible(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if not p.name.startswith("."))


def _case_dirs(root: Path) -> list[Path]:
    return [p for p in _visible(root.iterdir()) if p.is_dir() and p.name not in _MSD_DIRS]


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in _visible(folder.iterdir()) if p.is_file() and p.name.endswith(_NIFTI_EXTENSIONS)]


def _strip_nifti(name: str) -> str:
    for ext in _NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _case_file_stems(folder: Path, layout: str) -> list[str]:
    """The lower-case file name stems of a case folder's files in ``layout``: ``<case><separator><suffix>``."""
    prefix = f"{folder.name}{_SEPARATORS[layout]}".lower()
    return [prefix + suffix for suffix in (*SEQUENCE_FILE_NAMES[layout].values(), "seg")]


def _holds_case_files(folder: Path, layout: str) -> bool:
    """Whether a folder holds a file named after it in ``layout``'s convention (any sequence or the label)."""
    stems = set(_case_file_stems(folder, layout))
    return any(_strip_nifti(p.name).lower() in stems for p in _nifti_files(folder))


def _case_folder_candidates(root: Path, layout: str) -> list[Path]:
    """The folders that may be cases: ``root``'s subfolders, and those of grouping folders one level down.

    A grouping folder holds no NIfTI file itself and at least one case folder: BraTS 2019's ``HGG/`` and ``LGG/``,
    or a case folder unpacked into ``<case>/<case>/``.
    """
    candidates = []
    for folder in _case_dirs(root):
        subfolders = _case_dirs(folder)
        if not _nifti_files(folder) and any(_holds_case_files(sub, layout) for sub in subfolders):
            candidates += subfolders
        else:
            candidates.append(folder)
    return candidates


def _case_folders(root: Path, layout: str) -> dict[str, Path]:
    """Case id -> case folder of a per-case layout, sorted by case id.

    A folder without any NIfTI file (``docs/``, ...) is skipped with a warning; one whose NIfTI files are not named
    after it, or a case id found twice (``HGG/<case>`` and ``LGG/<case>``), is refused.
    """
    folders: dict[str, Path] = {}
    for folder in _case_folder_candidates(root, layout):
        if not _holds_case_files(folder, layout):
            example = f"{folder.name}{_SEPARATORS[layout]}{SEQUENCE_FILE_NAMES[layout]['flair']}.nii.gz"
            if _nifti_files(folder):
                raise BraTSDataError(
                    f"Folder {folder} holds NIfTI files, but none named after the folder as {layout} case files are "
                    f"(e.g. {example}); rename the files or the folder, or move it out of {root}."
                )
            warnings.warn(
                f"Folder {folder} holds no NIfTI file, so it is not a {layout} case (e.g. {example}): skipped.",
                UserWarning,
                stacklevel=4,
            )
            continue
        if folder.name in folders:
            raise BraTSDataError(
                f"Case {folder.name} is found twice: {folders[folder.name]} and {folder}; keep one of them."
            )
        folders[folder.name] = folder
    return dict(sorted(folders.items()))


def _candidates(root: Path, layout: str, require_label: bool) -> dict[str, Path]:
    """Case id -> case folder (per-case layouts) or 4D image file (msd), sorted by case id, nothing checked yet."""
    if layout != "msd":
        return _case_folders(root, layout)
    candidates: dict[str, Path] = {}
    for images_dir in ("imagesTr",) if require_label else ("imagesTr", "imagesTs"):
        for image in _nifti_files(root / images_dir):
            case_id = _strip_nifti(image.name)
            if case_id in candidates:
                raise BraTSDataError(f"Case {case_id} has two image files: {candidates[case_id]} and {image}.")
            candidates[case_id] = image
    return dict(sorted(candidates.items()))


def _make_case(case_id: str, source: Path, layout: str, sequences: list[str], require_label: bool) -> dict[str, Any]:
    """Build the case dict of one candidate, checking that its files exist."""
    case: dict[str, Any] = {"case_id": case_id, "patient_id": case_id, "layout": layout}
    if layout == "msd":
        case["image"] = str(source)
        case["channel_indices"] = [MSD_CHANNELS[s] for s in sequences]
        expected_label = source.parent.parent / source.parent.name.replace("images", "labels") / source.name
        label = expected_label if expected_label.is_file() else None
    else:
        if layout == "brats2023":
            match = _TIMEPOINT.fullmatch(case_id)
            case["patient_id"] = match["patient"] if match else case_id
        separator = _SEPARATORS[layout]
        case["image"] = []
        for sequence in sequences:
            stem = source / f"{case_id}{separator}{SEQUENCE_FILE_NAMES[layout][sequence]}"
            image = _existing_nifti(stem, case_id)
            if image is None:
                raise BraTSDataError(
                    f"Case {case_id}: missing {sequence} file {stem}.nii.gz (also looked for {stem.name}.nii, in any "
                    "letter case)."
                )
            case["image"].append(str(image))
        label = _existing_nifti(source / f"{case_id}{separator}seg", case_id)
        expected_label = source / f"{case_id}{separator}seg.nii.gz"
    if label is not None:
        case["label"] = str(label)
    elif require_label:
        raise BraTSDataError(f"Case {case_id}: missing label file {expected_label}.")
    return case


def _existing_nifti(stem: Path, case_id: str) -> Path | None:
    """The one NIfTI file ``<stem>.nii.gz`` or ``<stem>.nii`` (file names compared in any letter case), or None.

    Raises:
        BraTSDataError: naming the case and both files, if more than one file matches.
    """
    matches = [p for p in _nifti_files(stem.parent) if _strip_nifti(p.name).lower() == stem.name.lower()]
    if len(matches) > 1:
        raise BraTSDataError(
            f"Case {case_id}: {' and '.join(str(p) for p in matches)} are two files for one volume; keep one of them."
        )
    return matches[0] if matches else None


def _datalist_case_id(entry: Any, datalist_file: Path, split: str) -> str:
    """Case id of one datalist entry: a case id or path string, or a dict with ``case_id``, ``label`` or ``image``."""
    if isinstance(entry, str):
        return _strip_nifti(Path(entry).name)
    if isinstance(entry, dict):
        if "case_id" in entry:
            return str(entry["case_id"])
        for key in ("label", "image"):
            if isinstance(entry.get(key), str):
                return _strip_nifti(Path(entry[key]).name)
    raise BraTSDataError(
        f'Datalist {datalist_file}: entry {entry!r} in "{split}" is neither a case id nor a dict with "case_id", '
        '"label" or "image".'
    )
