# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Odd volumes are refused or warned about naming the case and the file (the README's bad-input table)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.brats_data import BraTSDataError, find_cases
from scripts.brats_loading import LoadBraTSCased

SHAPE = (16, 16, 8)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
CASE = "BraTS20_Training_001"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(folder: Path, modalities=("flair", "t1ce", "t2")) -> dict:
    return LoadBraTSCased(keys=("image", "label"))(find_cases(folder, modalities)[0])


def case_file(folder: Path, suffix: str) -> Path:
    return folder / CASE / f"{CASE}_{suffix}.nii.gz"


def rewrite(path: Path, change) -> None:
    """Rewrite a NIfTI file with ``change(volume)``'s voxels, the same affine."""
    image = nib.load(str(path))
    nib.save(nib.Nifti1Image(change(np.asarray(image.dataobj)), image.affine), str(path))


@pytest.fixture
def case_folder(tmp_path, make_brats_folder) -> Path:
    return make_brats_folder(tmp_path / "data", "brats2020", num_cases=1, shape=SHAPE)


def test_real_cases_pass_without_warning():
    folders = [SHARED_DATA / "brats_sample", SHARED_DATA / "brats_real"]
    if not all(f.is_dir() for f in folders):
        pytest.skip("../shared/data is not available")
    cases = find_cases(folders[0]) + find_cases(folders[1])[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for case in cases:
            LoadBraTSCased(keys=("image", "label"))(case)


@pytest.mark.parametrize(
    "shape, message",
    [(SHAPE[:2], r"2D array of shape \[16, 16\]"), ((*SHAPE, 1, 3), r"5D array of shape \[16, 16, 8, 1, 3\]")],
)
def test_sequence_that_is_not_3d_is_refused(case_folder, shape, message):
    flair = case_file(case_folder, "flair")
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), AFFINE), str(flair))
    with pytest.raises(BraTSDataError, match=rf"case {CASE}: .*{flair.name} holds a {message}.*3D volume"):
        load(case_folder)


def test_sequence_file_holding_two_volumes_is_refused(case_folder):
    t2 = case_file(case_folder, "t2")
    rewrite(t2, lambda v: np.stack([v, v], axis=-1))
    with pytest.raises(BraTSDataError, match=rf"case {CASE}: .*{t2.name} holds 2 volumes"):
        load(case_folder)


def test_label_with_two_channels_is_refused(case_folder):
    seg = case_file(case_folder, "seg")
    rewrite(seg, lambda v: np.stack([v, v], axis=-1))
    with pytest.raises(BraTSDataError, match=rf"case {CASE}: .*{seg.name} holds 2 volumes.*the label"):
        load(case_folder)


def test_values_too_large_to_z_score_are_refused(case_folder):
    flair = case_file(case_folder, "flair")
    rewrite(flair, lambda v: np.where(v > 0, np.float32(3e38), 0).astype(np.float32))
    with pytest.raises(BraTSDataError, match=rf"case {CASE}: .*{flair.name} holds values up to 3e\+38, too large"):
        load(case_folder)


def test_sequence_with_nonzero_background_is_warned_about(case_folder):
    t1ce = case_file(case_folder, "t1ce")
    rewrite(t1ce, lambda v: v + np.float32(50))
    with pytest.warns(UserWarning, match=rf"case {CASE}: only 0.00% of the voxels of .*{t1ce.name} are 0"):
        load(case_folder)


def test_single_outlier_voxel_is_warned_about(case_folder):
    t2 = case_file(case_folder, "t2")

    def outlier(volume):
        volume = volume.copy()
        volume[tuple(s // 2 for s in SHAPE)] = 1e9
        return volume

    rewrite(t2, outlier)
    with pytest.warns(UserWarning, match=rf"case {CASE}: a few voxels of .*{t2.name} \(up to 1e\+09"):
        load(case_folder)


@pytest.mark.parametrize(
    "value, message", [(0.0, "every voxel of .*{} is 0"), (7.0, "every non-zero voxel of .*{} is 7")]
)
def test_sequence_without_image_is_warned_about(case_folder, value, message):
    flair = case_file(case_folder, "flair")
    rewrite(flair, lambda v: np.where(v > 0, np.float32(value), 0).astype(np.float32))
    with pytest.warns(UserWarning, match=rf"case {CASE}: {message.format(flair.name)}, so the sequence carries no"):
        load(case_folder)


def test_all_zero_case_is_left_to_the_empty_brain_handling(case_folder):
    for suffix in ("flair", "t1ce", "t2"):
        rewrite(case_file(case_folder, suffix), np.zeros_like)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(case_folder)["image"].meta["empty_brain"]


def _set_header(folder: Path, change) -> None:
    """Apply ``change(header)`` to every file of the case, so that their affines stay equal."""
    for path in (folder / CASE).iterdir():
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
        header = image.header.copy()
        change(header)
        nib.save(nib.Nifti1Image(data, None, header), str(path))


def test_in_plane_voxel_size_far_from_1_mm_is_warned_about(case_folder):
    _set_header(case_folder, lambda h: (h.set_sform(np.diag([-0.5, -0.5, 1.0, 1.0]), 1), h.set_qform(None, 0)))
    with pytest.warns(UserWarning, match=rf"case {CASE}: .*_flair.nii.gz has 0.5 x 0.5 mm voxels in-plane"):
        load(case_folder)


def test_sform_and_qform_that_disagree_are_warned_about(case_folder):
    shifted = AFFINE.copy()
    shifted[:3, 3] = [10.0, 0.0, 0.0]
    _set_header(case_folder, lambda h: (h.set_sform(shifted, 1), h.set_qform(AFFINE, 1)))
    with pytest.warns(
        UserWarning, match=rf"case {CASE}: the sform and qform of .*_flair.nii.gz disagree \(by up to 10"
    ):
        load(case_folder)
