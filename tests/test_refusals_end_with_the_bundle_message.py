# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Refusals through the README's commands: non-zero exit, nothing written, and the last line of stderr is the
bundle's own message naming the case, the file (or id) and what to do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.separable_unet import SeparableUNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TEACHER = "['configs/train.json','configs/teacher.json']"
TEACHER_AND_EVALUATE = "['configs/train.json','configs/teacher.json','configs/evaluate.json']"
CASE = "BraTS20_Training_002"


def last_line_of_refused_run(*args: str) -> str:
    """Run ``python -m monai.bundle run ARGS`` in the bundle root; check that it fails and return stderr's last line."""
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=BUNDLE_ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0, f"bundle run {args} did not fail:\n{result.stderr[-3000:]}"
    return result.stderr.rstrip().splitlines()[-1]


@pytest.fixture(scope="module")
def bundle_inputs(tmp_path_factory) -> dict[str, Path]:
    """A 3-case BraTS 2020 folder and a student checkpoint that fits ``configs/inference.json``."""
    from conftest import write_brats_folder

    root = tmp_path_factory.mktemp("refusals")
    dataset = write_brats_folder(root / "data", "brats2020", num_cases=3, shape=(16, 16, 8))
    checkpoint = root / "model.pt"
    torch.save(SeparableUNet(3, 4, [16, 32, 64, 128, 256], dropout=0.3).state_dict(), checkpoint)
    return {"root": root, "dataset": dataset, "checkpoint": checkpoint}


def infer(inputs: dict[str, Path], output_dir: Path, *args: str) -> str:
    return last_line_of_refused_run(
        "--config_file", "configs/inference.json", "--dataset_dir", str(inputs["dataset"]),
        "--output_dir", str(output_dir), "--ckpt_path", str(inputs["checkpoint"]), *args,
    )  # fmt: skip


@pytest.mark.slow
def test_corrupt_sequence_file_ends_with_the_case_and_file(bundle_inputs, tmp_path):
    dataset = shutil.copytree(bundle_inputs["dataset"], tmp_path / "data")
    t1ce = dataset / CASE / f"{CASE}_t1ce.nii.gz"
    t1ce.write_bytes(b"truncated")
    line = infer({**bundle_inputs, "dataset": dataset}, tmp_path / "seg")
    assert line.startswith(f"BraTSDataError: case {CASE}: cannot read {t1ce}") and "replace the file" in line


@pytest.mark.slow
def test_output_folder_inside_a_case_folder_ends_naming_the_case_and_leaves_its_label(bundle_inputs):
    case_folder = bundle_inputs["dataset"] / CASE
    label = case_folder / f"{CASE}_seg.nii.gz"
    before = label.read_bytes()
    line = infer(bundle_inputs, case_folder)
    assert f"is inside the folder of case {CASE}" in line and line.endswith(
        "pass a --output_dir outside the dataset folder."
    )
    assert label.read_bytes() == before and sorted(p.name for p in case_folder.iterdir())[-1] == f"{CASE}_t2.nii.gz"


@pytest.mark.slow
def test_output_folder_inside_the_dataset_folder_ends_naming_it_and_is_not_created(bundle_inputs):
    line = infer(bundle_inputs, bundle_inputs["dataset"] / "seg")
    assert f"is inside the dataset folder ({bundle_inputs['dataset']})" in line
    assert not (bundle_inputs["dataset"] / "seg").exists()


@pytest.mark.slow
def test_checkpoint_for_other_classes_ends_naming_the_checkpoint(bundle_inputs, tmp_path):
    two_classes = tmp_path / "binary.pt"
    torch.save(SeparableUNet(3, 2, [16, 32, 64, 128, 256], dropout=0.3).state_dict(), two_classes)
    line = infer({**bundle_inputs, "checkpoint": two_classes}, tmp_path / "seg")
    assert line.startswith(f"CheckpointMismatchError: checkpoint {two_classes}") and "num_classes" in line


@pytest.mark.slow
def test_typo_in_a_training_override_ends_naming_the_closest_id(bundle_inputs):
    line = last_line_of_refused_run(
        "training", "--config_file", TEACHER, "--dataset_dir", str(bundle_inputs["dataset"]), "--epoch", "3"
    )
    assert line.endswith("did you mean --epochs?")


@pytest.mark.slow
def test_unwritable_checkpoint_folder_is_refused_before_training(bundle_inputs, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    line = last_line_of_refused_run(
        "training", "--config_file", TEACHER, "--dataset_dir", str(bundle_inputs["dataset"]),
        "--ckpt_dir", str(tmp_path / "file" / "models"), "--log_dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert line.startswith(f"PermissionError: output folder {tmp_path / 'file' / 'models'} cannot be created")
    assert not (tmp_path / "runs").exists(), "refused before the log folder is created"


@pytest.mark.slow
def test_unknown_eval_split_ends_naming_the_splits(bundle_inputs, tmp_path):
    line = last_line_of_refused_run(
        "evaluating", "--config_file", TEACHER_AND_EVALUATE, "--dataset_dir", str(bundle_inputs["dataset"]),
        "--output_dir", str(tmp_path / "eval"), "--eval_split", "bogus",
    )  # fmt: skip
    assert line.endswith("'bogus' is not a split; use --eval_split training | validation | test | all.")


@pytest.mark.slow
def test_unknown_run_id_ends_naming_the_configs_run_id(bundle_inputs, tmp_path):
    line = last_line_of_refused_run("inference", "--config_file", "configs/inference.json")
    assert line.startswith("CommandLineError: run id 'inference' is not defined by configs/inference.json")
    assert "the workflows they define: run " in line


@pytest.mark.slow
def test_inference_before_any_training_ends_saying_how_to_train_or_which_id_to_set(bundle_inputs, tmp_path):
    missing = tmp_path / "models" / "model.pt"
    line = infer({**bundle_inputs, "checkpoint": missing}, tmp_path / "seg")
    assert line.startswith(f"CheckpointMismatchError: no trained network at {missing}: train one first")
    assert "--config_file configs/train.json" in line and line.endswith("or pass --ckpt_path <checkpoint file>.")
    assert list((tmp_path / "seg").iterdir()) == []
