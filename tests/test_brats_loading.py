# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from scripts.brats_data import BraTSDataError, find_cases
from scripts.brats_loading import LoadBraTSCased

SHAPE = (16, 16, 8)
CENTRE = tuple(s // 2 for s in SHAPE)


def load_first_case(folder, modalities=("flair", "t1ce", "t2"), num_classes=4):
    case = find_cases(folder, modalities)[0]
    return case, LoadBraTSCased(keys=("image", "label"), num_classes=num_classes)(case)


@pytest.mark.parametrize("layout", ["brats2020", "brats2023", "msd"])
def test_requested_sequences_become_channels_in_requested_order(tmp_path, make_brats_folder, layout):
    folder = make_brats_folder(tmp_path / layout, layout, num_cases=1)
    _, data = load_first_case(folder, modalities=("t2", "flair", "t1ce", "t1"))
    image = data["image"]
    assert tuple(image.shape) == (4, *SHAPE)
    # the fixture writes 100 * (k + 1) + z inside the brain, k in canonical order flair, t1, t1ce, t2
    assert [int(image[c][CENTRE]) // 100 for c in range(4)] == [4, 1, 3, 2]
    np.testing.assert_allclose(image.affine.numpy(), np.diag([-1.0, -1.0, 1.0, 1.0]))


@pytest.mark.parametrize("layout", ["brats2020", "brats2023", "msd"])
def test_labels_of_every_release_map_to_the_internal_convention(tmp_path, make_brats_folder, layout):
    folder = make_brats_folder(tmp_path / layout, layout, num_cases=1)
    _, data = load_first_case(folder)
    label = data["label"].numpy()[0]
    x, y, z = CENTRE
    # nested boxes: necrotic core (half-width 1), enhancing (2), edema (3) -> internal 1, 3, 2
    assert label[x, y, z] == 1
    assert label[x - 2, y, z] == 3
    assert label[x - 3, y, z] == 2
    assert label[0, 0, 0] == 0
    assert set(np.unique(label)) == {0, 1, 2, 3}


def test_binary_task_merges_every_tumour_label_into_whole_tumour(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1)
    _, data = load_first_case(folder, num_classes=2)
    label = data["label"].numpy()
    assert set(np.unique(label)) == {0, 1}
    assert label.sum() == 6**3


def _overwrite(path, volume, affine=None):
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine), str(path))


def test_label_value_outside_the_release_set_names_case_and_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1)
    seg = next(folder.glob("*/*_seg.nii.gz"))
    label = np.asanyarray(nib.load(seg).dataobj).copy()
    label[0, 0, 0] = 3  # 3 is not a BraTS 2020 label
    _overwrite(seg, label)
    with pytest.raises(BraTSDataError, match=rf"BraTS20_Training_001.*{seg.name}.*\[3\]"):
        load_first_case(folder)


def test_sequence_shape_mismatch_names_case_and_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1)
    t2 = next(folder.glob("*/*_t2.nii.gz"))
    _overwrite(t2, np.ones((16, 16, 9), dtype=np.float32))
    with pytest.raises(BraTSDataError, match=rf"BraTS20_Training_001.*{t2.name}.*shape"):
        load_first_case(folder)


def test_sequence_affine_mismatch_names_case_and_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2023", num_cases=1)
    t2w = next(folder.glob("*/*-t2w.nii.gz"))
    _overwrite(t2w, np.ones(SHAPE, dtype=np.float32), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(BraTSDataError, match=rf"BraTS-GLI-00001-000.*{t2w.name}.*affine"):
        load_first_case(folder)


def test_label_geometry_mismatch_names_the_label_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1)
    seg = next(folder.glob("*/*_seg.nii.gz"))
    _overwrite(seg, np.zeros((8, 16, 8), dtype=np.uint8))
    with pytest.raises(BraTSDataError, match=rf"{seg.name}.*shape"):
        load_first_case(folder)


def test_non_finite_voxels_name_case_and_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1)
    flair = next(folder.glob("*/*_flair.nii.gz"))
    volume = np.ones(SHAPE, dtype=np.float32)
    volume[1, 2, 3] = np.nan
    _overwrite(flair, volume)
    with pytest.raises(BraTSDataError, match=rf"BraTS20_Training_001.*{flair.name}.*NaN"):
        load_first_case(folder)


def test_truncated_file_names_case_and_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1)
    t1ce = next(folder.glob("*/*_t1ce.nii.gz"))
    payload = gzip.decompress(t1ce.read_bytes())
    t1ce.write_bytes(gzip.compress(payload)[:200])
    with pytest.raises(BraTSDataError, match=rf"BraTS20_Training_001.*cannot read.*{t1ce.name}"):
        load_first_case(folder)


def one_file_study_with_painted_label(tmp_path, make_brats_folder, layout):
    """A one-file study and an annotator's label (channel_def values, enhancing 3) unlike the release's own label."""
    folder = make_brats_folder(tmp_path / layout, layout, num_cases=1)
    case = find_cases(folder)[0]
    study = case["image"] if isinstance(case["image"], str) else case["image"][0]
    painted = np.zeros(SHAPE, np.uint8)
    painted[:4] = 3
    painted[4:6] = 1
    label = tmp_path / "labels" / "final" / "study.nii.gz"
    label.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(painted, np.diag([-1.0, -1.0, 1.0, 1.0])), label)
    return study, label, painted


@pytest.mark.parametrize("layout", ["brats2020", "brats2023", "msd"])
def test_one_file_study_loads_the_label_handed_over_not_the_release_file_next_to_it(
    tmp_path, make_brats_folder, layout
):
    study, label, painted = one_file_study_with_painted_label(tmp_path, make_brats_folder, layout)
    loader = LoadBraTSCased(keys=("image", "label"), label_convention="channel_def")
    data = loader({"image": str(study), "label": str(label)})
    np.testing.assert_array_equal(data["label"].numpy()[0], painted)
    assert "channel_indices" not in data  # the same keys for every layout, so that studies share a batch


def test_channel_def_convention_rejects_release_only_values_naming_the_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "brats2020", "brats2020", num_cases=1)
    case = find_cases(folder)[0]
    with pytest.raises(BraTSDataError, match=r"holds values \[4\] outside the channel_def label set \[0, 1, 2, 3\]"):
        LoadBraTSCased(keys=("image", "label"), label_convention="channel_def")(case)


def test_unknown_label_convention_is_refused():
    with pytest.raises(ValueError, match=r"label_convention must be one of \('release', 'channel_def'\), got 'msd'"):
        LoadBraTSCased(label_convention="msd")
