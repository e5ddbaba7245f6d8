# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Synthetic BraTS-like MRI cases for the demo, the tests and CI (no network, no licence needed).

Each case is a skull-stripped ellipsoidal "brain" with a grey/white-matter texture and one glioma-like
tumour made of an irregular peritumoral edema (label 2), an enhancing rim (label 4) and a necrotic core
(label 1), imaged in the four BraTS sequences with sequence-specific contrast. Cases are written in the
BraTS 2020 layout, ``<output_dir>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``, as int16 images and a
uint8 label on a 1 mm LPS grid, so the bundle's real-data loaders read them unchanged.

Example::

    python -m tools.synthetic_brats --output_dir data/synthetic --num_cases 12 --shape "[96,96,64]"
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from scipy import ndimage
from tqdm import tqdm

__all__ = ["CASE_PREFIX", "SEQUENCES", "main", "make_synthetic_case", "write_synthetic_dataset"]

SEQUENCES = ("flair", "t1", "t1ce", "t2")
CASE_PREFIX = "SynBraTS"
MIN_DIM = 16

# Bumped whenever the generated data changes, so that stale folders are not mistaken for current ones.
_GENERATOR_VERSION = 1
_TMP_SUFFIX = ".tmp"

# Intensity relative to normal brain (~1.0) of grey matter, white matter, necrosis (1), edema (2), enhancing (4).
_CONTRAST = {
    "flair": {"gm": 1.08, "wm": 0.92, 1: 1.2, 2: 1.8, 4: 1.5},
    "t1": {"gm": 0.9, "wm": 1.1, 1: 0.5, 2: 0.8, 4: 0.85},
    "t1ce": {"gm": 0.9, "wm": 1.1, 1: 0.5, 2: 0.9, 4: 2.2},
    "t2": {"gm": 1.1, "wm": 0.9, 1: 2.0, 2: 1.8, 4: 1.3},
}
# Stored intensity of normal brain per sequence, before the per-case jitter (int16-like ranges as in BraTS).
_SCALE = {"flair": 350.0, "t1": 600.0, "t1ce": 750.0, "t2": 900.0}


def _parse_shape(shape: Sequence[int] | str) -> tuple[int, int, int]:
    """Return ``shape`` as a validated tuple of three ints.

    Args:
        shape: three voxel counts (x, y, z), as a sequence or a string such as ``"96,96,64"`` or ``"96x96x64"``.

    Returns:
        The shape as a tuple of three Python ints.

    Raises:
        ValueError: if ``shape`` does not have three integer entries, each at least ``MIN_DIM``.
    """
    dims = shape.replace("x", ",").strip("()[] ").split(",") if isinstance(shape, str) else shape
    try:
        parsed = tuple(int(d) for d in dims)
        if any(float(d) != int(d) for d in dims):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"shape must be three integers (x, y, z), got {shape!r}.") from None
    if len(parsed) != 3 or min(parsed) < MIN_DIM:
        raise ValueError(f"shape must be three integers (x, y, z), each >= {MIN_DIM}, got {shape!r}.")
    return parsed


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cell: float) -> np.ndarray:
    """Smooth stationary Gaussian random field with zero mean and unit variance at every voxel.

    The field is a sum of Gaussian bumps of width ``cell / 2`` with standard normal weights, centred on a grid
    of spacing ``cell / 2`` that extends beyond the volume. The bump is separable, so the field is three small
    matrix products (much cheaper than filtering or spline-upsampling at full resolution), and normalising each
    axis' basis to unit norm per voxel gives unit variance everywhere.

    Args:
        rng: random generator.
        shape: output shape.
        cell: feature size in voxels.

    Returns:
        float32 array of ``shape``.
    """
    sigma = max(cell / 2, 0.5)
    bases = []
    for size in shape:
        nodes = np.arange(-2 * sigma, size - 1 + 2 * sigma + sigma, sigma)
        basis = np.exp(-0.5 * ((np.arange(size)[:, None] - nodes[None, :]) / sigma) ** 2)
        bases.append((basis / np.linalg.norm(basis, axis=1, keepdims=True)).astype(np.float32))
    field = rng.standard_normal(tuple(b.shape[1] for b in bases), dtype=np.float32)
    for basis in bases:  # contracting the leading axis each time cycles it to the end: (i, j, k) -> (x, y, z)
        field = np.tensordot(field, basis, axes=(0, 1))
    return np.ascontiguousarray(field)


def _radius(grid: list[np.ndarray], centre: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius: 1 on the surface of the ellipsoid ``centre``, ``semi_axes``."""
    return np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi_axes, strict=True)))


def _tumour_variant(seed: int) -> str:
    """Which tumour sub-regions a case has: one case in six lacks necrosis or (alternately) enhancement.

    The variant depends on the seed arithmetic only, so any two consecutive seeds include a case with all four
    labels, and twelve consecutive seeds include one case of each incomplete variant.
    """
    if seed % 6 != 5:
        return "full"
    return "no_necrosis" if (seed // 6) % 2 == 0 else "no_enhancing"


def make_synthetic_case(
    shape: Sequence[int] | str = (96, 96, 64), seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Generate one synthetic BraTS-like case.

    The brain is an ellipsoid with jittered size and position and an irregular surface; everything outside
    it is exactly 0 in every sequence and every voxel inside it is at least 1, as in skull-stripped BraTS.
    The tumour lies inside the brain and appears on roughly half to three quarters of its axial slices.
    Sequence contrast relative to normal brain follows ``_CONTRAST`` (e.g. enhancing rim bright in t1ce, edema
    bright in flair and t2, necrosis dark in t1/t1ce and bright in t2), with a per-case global scale, a smooth
    bias field and mild noise.

    Args:
        shape: volume shape (x, y, z) in voxels of 1 mm; each dimension at least 16.
        seed: non-negative seed; the same seed always gives identical arrays.

    Returns:
        ``(images, label)``: ``images`` maps each name in ``SEQUENCES`` to an int16 array of ``shape``;
        ``label`` is a uint8 array of ``shape`` with BraTS 2020 values 0 background, 1 necrotic core,
        2 edema, 4 enhancing tumour.

    Raises:
        ValueError: if ``shape`` is invalid.
    """
    shape = _parse_shape(shape)
    rng = np.random.default_rng(seed)
    size = np.asarray(shape, dtype=np.float32)
    grid = [g.astype(np.float32) for g in np.ogrid[tuple(slice(0, s) for s in shape)]]

    # brain: ellipsoid with an irregular surface and a two-level grey/white-matter structure
    brain_axes = size * rng.uniform(0.36, 0.43, 3)
    brain_centre = (size - 1) / 2 + size * rng.uniform(-0.03, 0.03, 3)
    brain_radius = _radius(grid, brain_centre, brain_axes)
    brain = brain_radius + 0.03 * _smooth_noise(rng, shape, size.min() / 4) < 1.0
    white = brain_radius + 0.12 * _smooth_noise(rng, shape, size.min() / 8) < 0.72
    texture = 1.0 + 0.05 * _smooth_noise(rng, shape, 3.0)

    # tumour: nested irregular shells around a centre placed so that the edema fits inside the brain
    tumour_size = brain_axes.min() * rng.uniform(0.45, 0.6)
    tumour_axes = tumour_size * rng.uniform(0.85, 1.15, 3)
    room = np.maximum(brain_axes - 1.3 * tumour_axes - 2.0, 0.0)
    offset = rng.uniform(0.2, 0.7, 3) * rng.choice([-1.0, 1.0], 3) * room / np.sqrt(3)
    distance = _radius(grid, brain_centre + offset, tumour_axes)
    outer = distance + 0.2 * _smooth_noise(rng, shape, max(tumour_size / 2, 2.0))
    core = distance + 0.07 * _smooth_noise(rng, shape, max(tumour_size / 3, 2.0))
    enhancing_radius, necrosis_radius = rng.uniform(0.62, 0.72), rng.uniform(0.4, 0.5)
    variant = _tumour_variant(seed)
    if variant == "no_necrosis":
        necrosis_radius = 0.0
    elif variant == "no_enhancing":
        necrosis_radius = enhancing_radius
    label = np.zeros(shape, dtype=np.uint8)
    label[outer < 1.0] = 2
    label[core < enhancing_radius] = 4
    if necrosis_radius > 0:
        label[core < necrosis_radius] = 1
    label[~brain] = 0

    images = {}
    case_scale = rng.uniform(0.8, 1.25)
    for name in SEQUENCES:
        contrast = _CONTRAST[name]
        relative = np.where(white, contrast["wm"], contrast["gm"]).astype(np.float32)
        for value in (1, 2, 4):
            relative[label == value] = contrast[value]
        relative = ndimage.gaussian_filter(relative * texture, sigma=0.5)
        bias = np.exp(0.08 * _smooth_noise(rng, shape, size.max() / 2))
        noise = 0.03 * rng.standard_normal(shape, dtype=np.float32)
        scale = _SCALE[name] * case_scale * rng.uniform(0.9, 1.1)
        image = np.clip(np.rint(scale * (relative * bias + noise)), 1, np.iinfo(np.int16).max)
        images[name] = np.where(brain, image, 0).astype(np.int16)
    return images, label


def _affine(shape: tuple[int, int, int]) -> np.ndarray:
    """1 mm LPS affine (negative x and y axes, as in BraTS) with the volume centred on the world origin."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = np.array([1.0, 1.0, -1.0]) * (np.asarray(shape) - 1) / 2
    return affine


def _case_files(case_id: str) -> list[str]:
    """File names of one case in the BraTS 2020 layout, label last."""
    return [f"{case_id}_{name}.nii.gz" for name in (*SEQUENCES, "seg")]


def _description(shape: tuple[int, int, int], seed: int) -> str:
    """Provenance stored in each file's NIfTI ``descrip`` field; identifies the parameters of a case."""
    return f"{CASE_PREFIX} v{_GENERATOR_VERSION} seed={seed} shape={shape[0]}x{shape[1]}x{shape[2]}"


def _is_current(case_dir: Path, case_id: str, description: str) -> bool:
    """Whether ``case_dir`` holds exactly the files of ``case_id`` written with ``description``."""
    if not case_dir.is_dir() or sorted(p.name for p in case_dir.iterdir()) != sorted(_case_files(case_id)):
        return False
    try:
        return all(
            nib.load(case_dir / f).header["descrip"].item().decode(errors="replace") == description
            for f in _case_files(case_id)
        )
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError):  # unreadable: not a current case
        return False


def _save(array: np.ndarray, affine: np.ndarray, description: str, path: Path) -> None:
    """Save ``array`` as NIfTI-1 with the affine as both qform and sform (scanner coordinates, mm)."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = description
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _write_case(output_dir: Path, case_id: str, shape: tuple[int, int, int], seed: int) -> None:
    """Generate one case into a temporary folder next to its final place, then rename it into place."""
    images, label = make_synthetic_case(shape, seed)
    affine = _affine(shape)
    description = _description(shape, seed)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{case_id}.", suffix=_TMP_SUFFIX, dir=output_dir))
    try:
        for file_name, array in zip(_case_files(case_id), [images[name] for name in SEQUENCES] + [label], strict=True):
            _save(array, affine, description, tmp_dir / file_name)
        os.replace(tmp_dir, output_dir / case_id)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def write_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_cases: int = 12,
    shape: Sequence[int] | str = (96, 96, 64),
    seed: int = 0,
    overwrite: bool = False,
) -> list[str]:
    """Write synthetic cases in the BraTS 2020 layout; case ``i`` is ``SynBraTS_{i:03d}`` from seed ``seed + i``.

    Each case is generated in a hidden temporary folder inside ``output_dir`` and renamed into place when
    complete, so an interrupted run never leaves a half-written case. Cases already present with the same
    parameters (recorded in each file's NIfTI ``descrip``) are kept: rerunning is a fast no-op, and a rerun
    after an interruption only writes the missing cases (and removes leftover temporary folders).

    Args:
        output_dir: dataset folder; created if missing.
        num_cases: number of cases, at least 1.
        shape: volume shape (x, y, z) in voxels; each dimension at least 16.
        seed: seed of the first case.
        overwrite: if True, delete everything else in ``output_dir`` (other files and folders, stale cases)
            instead of raising.

    Returns:
        The case ids, in order.

    Raises:
        ValueError: if ``num_cases`` < 1 or ``shape`` is invalid.
        FileExistsError: if ``output_dir`` holds other content and ``overwrite`` is False.
    """
    shape = _parse_shape(shape)
    if int(num_cases) != num_cases or num_cases < 1:
        raise ValueError(f"num_cases must be a positive integer, got {num_cases!r}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {str(output_dir)!r} exists and is not a folder.")
    output_dir.mkdir(parents=True, exist_ok=True)
    case_seeds = {f"{CASE_PREFIX}_{i:03d}": seed + i for i in range(int(num_cases))}

    current, other = set(), []
    for entry in sorted(output_dir.iterdir()):
        if entry.name.startswith(f".{CASE_PREFIX}_") and entry.name.endswith(_TMP_SUFFIX) and entry.is_dir():
            shutil.rmtree(entry)  # left by an interrupted run
        elif entry.name in case_seeds and _is_current(entry, entry.name, _description(shape, case_seeds[entry.name])):
            current.add(entry.name)
        else:
            other.append(entry)
    if other and not overwrite:
        names = ", ".join(repr(p.name) for p in other[:5]) + (", ..." if len(other) > 5 else "")
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} holds content other than the requested synthetic cases ({names}); "
            "choose another folder or pass overwrite=True to replace it."
        )
    for entry in other:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()

    missing = [case_id for case_id in case_seeds if case_id not in current]
    for case_id in tqdm(missing, desc="synthetic BraTS cases", disable=not missing):
        _write_case(output_dir, case_id, shape, case_seeds[case_id])
    return list(case_seeds)


def main(
    output_dir: str = "data/synthetic",
    num_cases: int = 12,
    shape: Sequence[int] | str = (96, 96, 64),
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Command-line entry: write a synthetic BraTS 2020-layout dataset and print where it went.

    Args:
        output_dir: dataset folder.
        num_cases: number of cases.
        shape: volume shape, e.g. ``"[96,96,64]"`` or ``96,96,64``.
        seed: seed of the first case.
        overwrite: replace other content of ``output_dir``.
    """
    case_ids = write_synthetic_dataset(output_dir, num_cases=num_cases, shape=shape, seed=seed, overwrite=overwrite)
    print(f"{len(case_ids)} synthetic BraTS cases ({case_ids[0]} ... {case_ids[-1]}) in {Path(output_dir).resolve()}")


if __name__ == "__main__":
    fire.Fire(main)
