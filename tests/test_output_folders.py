# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Output folders are refused among the input cases or when unwritable, before any work; leftovers are removed."""

from __future__ import annotations

import pytest

from scripts.brats_data import case_from_file, find_cases
from scripts.output_folders import prepare_output_folders


@pytest.mark.parametrize(
    "layout, case_id", [("brats2020", "BraTS20_Training_002"), ("brats2023", "BraTS-GLI-00001-001")]
)
def test_output_folder_inside_a_case_folder_is_refused_naming_the_case(tmp_path, make_brats_folder, layout, case_id):
    dataset = make_brats_folder(tmp_path / "data", layout)
    before = sorted(p.name for p in (dataset / case_id).iterdir())
    with pytest.raises(ValueError, match=rf"output folder {dataset / case_id} is inside the folder of case {case_id}"):
        prepare_output_folders({"output_dir": dataset / case_id}, dataset, find_cases(dataset, require_label=False))
    assert sorted(p.name for p in (dataset / case_id).iterdir()) == before


def test_output_folder_inside_the_dataset_folder_is_refused_before_it_is_created(tmp_path, make_brats_folder):
    dataset = make_brats_folder(tmp_path / "data", "brats2020")
    with pytest.raises(
        ValueError,
        match=r"output folder .*/data/seg is inside the dataset folder .*--output_dir outside",
    ):
        prepare_output_folders({"output_dir": dataset / "seg"}, dataset, find_cases(dataset, require_label=False))
    assert not (dataset / "seg").exists()


def test_output_folder_of_a_one_file_study_may_not_be_the_studys_own_folder(tmp_path, make_brats_folder):
    dataset = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1)
    study = dataset / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz"
    with pytest.raises(ValueError, match=r"inside the folder of case BraTS20_Training_001"):
        prepare_output_folders({"output_dir": study.parent}, study, [case_from_file(study)])


def test_output_folders_beside_the_dataset_are_created_and_unused_ones_skipped(tmp_path, make_brats_folder):
    dataset = make_brats_folder(tmp_path / "data", "msd")
    folders = {"ckpt_dir": tmp_path / "models", "log_dir": tmp_path / "runs" / "x", "soft_label_dir": None}
    prepared = prepare_output_folders(folders, dataset, find_cases(dataset))
    assert prepared == {"ckpt_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "runs" / "x")}
    assert (tmp_path / "models").is_dir() and (tmp_path / "runs" / "x").is_dir()


def test_output_folder_that_cannot_be_created_is_refused_naming_its_id(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(
        PermissionError, match=rf"output folder {tmp_path / 'file' / 'models'} cannot be created.*--ckpt_dir"
    ):
        prepare_output_folders({"ckpt_dir": tmp_path / "file" / "models"}, None, [])


def test_stale_temporary_files_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    leftovers = [".model_last.pt.k3j_9x2a.partial", ".BraTS20_Training_001_seg.nii.gz.ab12cd34.nii.gz"]
    kept = ["model.pt", ".hidden", ".notes.txt.abcdefgh.bak", "BraTS20_Training_001_seg.nii.gz"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    prepare_output_folders({"output_dir": tmp_path}, None, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
