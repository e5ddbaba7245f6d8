# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The bundle's workflows run as users run them: ``python -m monai.bundle run ...`` from the bundle root."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, write_brats_folder
from monai.bundle import ConfigParser

from scripts.brats_data import LABEL_MAPS, LAYOUTS
from scripts.label_convention import MONAI_LABEL_ENVIRONMENT_VARIABLE
from scripts.separable_unet import SeparableUNet
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = BUNDLE_ROOT.parent / "shared" / "data" / "brats_sample"
# small enough for CI: 1 epoch on 32 x 32 patches of 4 tiny synthetic cases
QUICK = "--epochs 1 --patch_size 32 --patches_per_case 2 --batch_size 2 --infer_batch_size 16".split()
TRAIN_AND_EVALUATE = "['configs/train.json','configs/evaluate.json']"
TEACHER = "['configs/train.json','configs/teacher.json']"
TEACHER_AND_EVALUATE = "['configs/train.json','configs/teacher.json','configs/evaluate.json']"
DISTILL = "['configs/train.json','configs/distill.json']"

pytestmark = pytest.mark.slow  # every test runs the bundle in subprocesses


def run_bundle(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run ARGS`` in the bundle root; on failure show its output."""
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=BUNDLE_ROOT, capture_output=True, text=True
    )
    if check and result.returncode != 0:
        pytest.fail(f"bundle run {args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(folder, num_cases=4, shape=(32, 32, 16))
    return folder


@pytest.fixture(scope="module")
def teacher_run(synthetic_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, set[str]]:
    """The teacher trained in a fresh bundle root: the root, the run, and the checkpoints it wrote."""
    root = tmp_path_factory.mktemp("bundle")
    result = run_bundle(
        "training", "--config_file", TEACHER, "--bundle_root", str(root), "--dataset_dir", str(synthetic_dir), *QUICK,
    )  # fmt: skip
    return root, result, {p.name for p in (root / "models").glob("*.pt")}


def test_teacher_training_through_the_bundle_runner_keeps_the_best_teacher(teacher_run):
    root, result, written = teacher_run
    state = torch.load(root / "models" / "teacher.pt", weights_only=True)
    teacher = SeparableUNet(3, 4, channels=(64, 128, 256, 512, 1024), dropout=0.5)
    teacher.load_state_dict(state)  # strict: exactly the teacher's keys and shapes
    output = result.stdout + result.stderr
    for metric in ("val_mean_dice", "val_dice_wt", "val_dice_tc", "val_dice_et"):
        assert metric in output
    assert list((root / "runs" / "teacher").glob("events.out.tfevents.*")), "no TensorBoard log written"
    assert written == {"teacher.pt", "teacher_last.pt"}  # the deployed student's model.pt is not touched


def test_evaluation_writes_one_row_per_case_and_the_summary_rows(teacher_run, synthetic_dir):
    root, *_ = teacher_run
    result = run_bundle(
        "evaluating", "--config_file", TEACHER_AND_EVALUATE, "--bundle_root", str(root), "--dataset_dir",
        str(synthetic_dir), "--eval_split", "all", "--infer_batch_size", "16",
    )  # fmt: skip
    with open(root / "eval" / "metrics_all.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == [f"SynBraTS_{i:03d}" for i in range(4)] + ["mean", "std", "median"]
    for row in rows[:4]:  # every synthetic case has every region, so no metric is NaN
        for region in ("wt", "tc", "et"):
            assert 0.0 <= float(row[f"dice_{region}"]) <= 1.0 and 0.0 <= float(row[f"lesion_dice_{region}"]) <= 1.0
            assert float(row[f"hd95_{region}"]) >= 0.0 and float(row[f"lesion_hd95_{region}"]) >= 0.0
    assert "SynBraTS_003" in result.stdout + result.stderr  # the table is printed too


def test_evaluation_of_the_default_test_split_uses_held_out_patients(teacher_run, synthetic_dir):
    root, *_ = teacher_run
    run_bundle(
        "evaluating", "--config_file", TEACHER_AND_EVALUATE, "--bundle_root", str(root), "--dataset_dir",
        str(synthetic_dir), "--infer_batch_size", "16",
    )  # fmt: skip
    with open(root / "eval" / "metrics_test.csv") as f:
        case_ids = [r["case_id"] for r in csv.DictReader(f)][:-3]  # without the mean, std and median rows
    assert len(case_ids) == 1  # 4 patients: 1 test, 1 validation, 2 training


def test_distillation_through_the_bundle_runner_writes_the_student_as_model_pt(teacher_run, synthetic_dir):
    root, *_ = teacher_run
    result = run_bundle(
        "training", "--config_file", DISTILL, "--bundle_root", str(root), "--dataset_dir",
        str(synthetic_dir), *QUICK,
    )  # fmt: skip
    SeparableUNet(3, 4).load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    output = result.stdout + result.stderr
    assert "teacher_val_mean_dice" in output and "val_mean_dice" in output
    assert list((root / "runs" / "distill").glob("events.out.tfevents.*"))
    # the default soft_labels "cached": one file of teacher soft labels per training case
    assert sorted(p.name for p in (root / "cache" / "soft_labels").glob("*.pt")), "no soft labels were cached"


def test_online_distillation_runs_without_a_soft_label_cache(teacher_run, synthetic_dir, tmp_path):
    root, *_ = teacher_run
    run_bundle(
        "training", "--config_file", DISTILL, "--bundle_root", str(root), "--dataset_dir",
        str(synthetic_dir), "--soft_labels", "online", "--soft_label_dir", str(tmp_path / "cache"),
        "--ckpt_dir", str(tmp_path / "models"), "--teacher_ckpt", str(root / "models" / "teacher.pt"),
        "--teacher_validation", "False", *QUICK,
    )  # fmt: skip
    SeparableUNet(3, 4).load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    assert not (tmp_path / "cache").exists()


def test_unknown_soft_label_mode_stops_naming_the_choices(teacher_run, synthetic_dir, tmp_path):
    root, *_ = teacher_run
    result = run_bundle(
        "training", "--config_file", DISTILL, "--bundle_root", str(root), "--dataset_dir",
        str(synthetic_dir), "--soft_labels", "cache", "--ckpt_dir", str(tmp_path / "models"), "--teacher_ckpt",
        str(root / "models" / "teacher.pt"), *QUICK, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "soft_labels must be one of ('online', 'cached'), got 'cache'" in result.stdout + result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


def test_distillation_without_a_teacher_checkpoint_stops_naming_the_file(synthetic_dir, tmp_path):
    result = run_bundle(
        "training", "--config_file", DISTILL, "--bundle_root", str(tmp_path), "--dataset_dir",
        str(synthetic_dir), *QUICK, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"teacher checkpoint {tmp_path / 'models' / 'teacher.pt'} not found" in result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


def test_train_config_trains_the_student_alone_into_model_pt_without_a_teacher(synthetic_dir, tmp_path):
    result = run_bundle(
        "training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path), "--dataset_dir",
        str(synthetic_dir), *QUICK,
    )  # fmt: skip
    SeparableUNet(3, 4).load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    assert {p.name for p in (tmp_path / "models").glob("*.pt")} == {"model.pt", "model_last.pt"}
    assert "val_mean_dice" in result.stdout + result.stderr
    assert list((tmp_path / "runs" / "student").glob("events.out.tfevents.*"))


# what MONAI Label 0.8.5's BundleTrainTask does on "Train": configs/train.json run in-process with its overrides and
# a CheckpointLoader (strict=False) of models/model.pt put first in train#handlers (monailabel/tasks/train/bundle.py)
MONAI_LABEL_TRAIN = """
import json, os, sys
import monai.bundle, torch
bundle_root, config_dir, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, os.path.dirname(config_dir))
config = monai.bundle.ConfigParser()
config.read_config(os.path.join(config_dir, "train.json"))
handlers = config.get("train#handlers", [])
handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": os.path.join(bundle_root, "models", "model.pt"),
                    "load_dict": {"model": "$@network"}, "strict": False})
monai.bundle.run(
    run_id="run", init_id=None, final_id=None, meta_file=os.path.join(config_dir, "metadata.json"),
    config_file=os.path.join(config_dir, "train.json"), bundle_root=bundle_root, device=torch.device("cpu"),
    **{"train#trainer#max_epochs": 1, "train#dataset#data": cases[:-1], "validate#dataset#data": cases[-1:],
       "train#handlers": handlers, "patch_size": 32, "patches_per_case": 2, "infer_batch_size": 16},
)
"""


def monai_label_train(bundle_root: Path, cases: list[dict]) -> subprocess.CompletedProcess:
    """``MONAI_LABEL_TRAIN`` in the environment a MONAI Label server exports (``MONAI_LABEL_APP_DIR`` among it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", MONAI_LABEL_ENVIRONMENT_VARIABLE: str(bundle_root.parent)}
    return subprocess.run(
        [sys.executable, "-c", MONAI_LABEL_TRAIN, str(bundle_root), str(BUNDLE_ROOT / "configs"), json.dumps(cases)],
        cwd=bundle_root, capture_output=True, text=True, env=env,
    )  # fmt: skip


def test_monai_label_training_fine_tunes_the_deployed_model_pt(synthetic_dir, tmp_path):
    (tmp_path / "models").mkdir()
    torch.save(SeparableUNet(3, 4).state_dict(), tmp_path / "models" / "model.pt")  # as distill.json writes it
    # MONAI Label's datalist: one image file per study and its label (the synthetic labels: 1/2/4, values that the
    # channel_def convention does not have, so they are converted into it first, as an annotator's would be)
    cases = []
    for c in sorted(p.name for p in synthetic_dir.iterdir() if p.is_dir()):
        label = np.asanyarray(nib.load(synthetic_dir / c / f"{c}_seg.nii.gz").dataobj)
        submitted = tmp_path / "labels" / "final" / f"{c}_flair.nii.gz"
        save_label(np.where(label == 4, 3, label), submitted, nib.load(synthetic_dir / c / f"{c}_seg.nii.gz").affine)
        cases.append({"image": str(synthetic_dir / c / f"{c}_flair.nii.gz"), "label": str(submitted)})
    result = monai_label_train(tmp_path, cases)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"Restored all variables from {tmp_path / 'models' / 'model.pt'}" in output
    SeparableUNet(3, 4).load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    assert not (tmp_path / "models" / "teacher.pt").exists()


def save_label(label: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(path))
    return path


def painted_label(shape: tuple[int, int, int]) -> np.ndarray:
    """An annotator's label in channel_def's values, unlike any release's file: one slab per class along x."""
    label = np.zeros(shape, np.uint8)
    for value, start in ((1, 2), (2, 5), (3, 9)):  # necrotic core, edema, enhancing (value 3 even on 2020 studies)
        label[start : start + 2, 3:-3, 2:-2] = value
    return label


def monai_label_studies(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """One-file studies of every layout, each with a painted label in labels/final/, as MONAI Label stores them.

    Every study also has its release's own label file next to it (``<case>_seg.nii.gz``, ``labelsTr/``), different
    from the painted one.
    """
    folders = {layout: write_brats_folder(tmp_path / layout, layout, num_cases=1) for layout in LAYOUTS}
    studies = {
        "brats2020": next(folders["brats2020"].glob("*/*_t1ce.nii.gz")),
        "brats2023": next(folders["brats2023"].glob("*/*-t2f.nii.gz")),
        "msd": next(folders["msd"].glob("imagesTr/*.nii.gz")),
    }
    final = tmp_path / "studies" / "labels" / "final"
    return {
        layout: (study, save_label(painted_label((16, 16, 8)), final / f"{layout}_{study.name}"))
        for layout, study in studies.items()
    }


def monai_label_validation_data(bundle_root: Path, pairs: list[dict]) -> list[dict]:
    """``validate#dataset`` of configs/train.json with MONAI Label's overrides, in a MONAI Label environment."""
    parser = ConfigParser()
    parser.read_config(BUNDLE_ROOT / "configs" / "train.json")
    parser.update({"bundle_root": str(bundle_root), "validate#dataset#data": pairs})
    return [parser.get_parsed_content("validate#dataset")[i] for i in range(len(pairs))]


def class_counts(label: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(label, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v != 0}


def test_monai_label_trains_on_the_submitted_label_in_channel_def_values_for_every_layout(tmp_path, monkeypatch):
    monkeypatch.setenv(MONAI_LABEL_ENVIRONMENT_VARIABLE, str(tmp_path / "app"))  # as monailabel start_server does
    studies = monai_label_studies(tmp_path)
    pairs = [{"image": str(study), "label": str(label)} for study, label in studies.values()]
    for (layout, (study, label)), data in zip(studies.items(), monai_label_validation_data(tmp_path, pairs)):
        sibling = study.parent / study.name.replace("t1ce", "seg").replace("t2f", "seg")
        if layout == "msd":
            sibling = study.parent.parent / "labelsTr" / study.name
        submitted = class_counts(np.asanyarray(nib.load(label).dataobj))
        assert class_counts(np.asanyarray(nib.load(sibling).dataobj)) != submitted  # a different label is next to it
        # the loaded label is the submitted one, its values unchanged: those channel_def names (3 enhancing, ...)
        assert class_counts(data["label"].numpy()) == submitted, layout


def test_label_conventions_of_channel_def_are_the_internal_classes():
    metadata = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert {int(k): v for k, v in channel_def.items()} == {
        0: "background", 1: "necrotic and non-enhancing tumour core", 2: "peritumoral edema", 3: "enhancing tumour"
    }  # fmt: skip
    assert LABEL_MAPS["brats2023"] == {v: v for v in range(4)}  # the internal classes, as BraTS 2023+ numbers them


def test_monai_label_trains_on_studies_of_every_layout_in_one_batch(tmp_path):
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    torch.save(SeparableUNet(3, 4).state_dict(), tmp_path / "bundle" / "models" / "model.pt")
    studies = monai_label_studies(tmp_path)
    cases = [{"image": str(study), "label": str(label)} for study, label in studies.values()]
    # training: an MSD 4D study and a BraTS 2020 study in the one batch (batch_size 2); validation: BraTS 2023
    result = monai_label_train(tmp_path / "bundle", [cases[2], cases[0], cases[1]])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "val_mean_dice" in output
    SeparableUNet(3, 4).load_state_dict(torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True))


def test_binary_whole_tumour_task_trains_a_two_class_network(synthetic_dir, tmp_path):
    run_bundle(
        "training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path), "--dataset_dir",
        str(synthetic_dir), "--num_classes", "2", "--network_def#channels", "[8,16,32,64,128]", *QUICK,
    )  # fmt: skip
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["head.weight"].shape[0] == 2


def test_training_on_a_folder_without_cases_fails_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_bundle(
        "training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path), "--dataset_dir",
        str(tmp_path / "empty"), *QUICK, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert str(tmp_path / "empty") in result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="../shared/data/brats_sample is not available")
def test_real_brats_case_trains_and_evaluates_as_it_is(tmp_path):
    narrow = ["--network_def#channels", "[8,16,32,64,128]", "--infer_batch_size", "64"]
    run_bundle(
        "training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path), "--dataset_dir",
        str(SHARED_SAMPLE), "--epochs", "1", "--patches_per_case", "4", "--batch_size", "1", *narrow,
    )  # fmt: skip
    assert (tmp_path / "models" / "model.pt").is_file()
    run_bundle(
        "evaluating", "--config_file", TRAIN_AND_EVALUATE, "--bundle_root", str(tmp_path), "--dataset_dir",
        str(SHARED_SAMPLE), *narrow,
    )  # fmt: skip
    with open(tmp_path / "eval" / "metrics_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["TCGA-DU-7294", "mean", "std", "median"]


def test_distillation_learns_from_unlabelled_cases_without_opening_their_label_files(
    teacher_run, synthetic_dir, tmp_path
):
    root, *_ = teacher_run
    archive = write_brats_folder(tmp_path / "archive", "brats2023", num_cases=2, shape=(32, 32, 16))
    for seg in archive.glob("*/*-seg.nii.gz"):
        seg.write_bytes(b"not a NIfTI file: reading it would fail")
    result = run_bundle(
        "training", "--config_file", DISTILL, "--bundle_root", str(root), "--dataset_dir", str(synthetic_dir),
        "--unlabelled_dir", str(archive), "--unlabelled_ratio", "1.0", "--ckpt_dir", str(tmp_path / "models"),
        "--soft_label_dir", str(tmp_path / "cache"), "--teacher_ckpt", str(root / "models" / "teacher.pt"),
        "--teacher_validation", "False", *QUICK,
    )  # fmt: skip
    SeparableUNet(3, 4).load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    cached = {p.stem for p in (tmp_path / "cache").glob("*.pt")}
    assert {p.name for p in archive.iterdir()} <= cached  # the teacher's soft labels of every unlabelled case
    assert "not a NIfTI" not in result.stdout + result.stderr
