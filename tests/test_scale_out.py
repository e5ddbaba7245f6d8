# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Scale-out and robustness through the bundle runner: 2-process distillation, resume after a kill, determinism,
and bad inputs stopping the CLI with a message naming the file and without damaging previous outputs."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scripts.separable_unet import SeparableUNet
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
QUICK = "--patch_size 32 --patches_per_case 2 --batch_size 1 --infer_batch_size 16".split()
NARROW = ["--network_def#channels", "[8,16,32,64,128]"]
DISTILL = "configs/distill.json"
TEACHER = "['configs/train.json','configs/teacher.json']"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow  # every test runs the bundle in subprocesses


def bundle_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", *args]


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, env=ENV)
    if check and result.returncode != 0:
        pytest.fail(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """5 synthetic cases and a datalist: 3 training, 2 validation cases (one per process of a 2-process run)."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root / "cases", num_cases=5, shape=(32, 32, 16))
    ids = [f"SynBraTS_{i:03d}" for i in range(5)]
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": ids[:3], "validation": ids[3:], "test": ids[3:]}))
    return root / "cases", datalist


def bundle_with_teacher(root: Path) -> Path:
    """A bundle root holding a full-width teacher checkpoint (untrained: only its architecture matters here)."""
    (root / "models").mkdir(parents=True)
    torch.manual_seed(0)
    teacher = SeparableUNet(3, 4, channels=(64, 128, 256, 512, 1024), dropout=0.5)
    torch.save(teacher.state_dict(), root / "models" / "teacher.pt")
    return root


def data_args(data: tuple[Path, Path]) -> list[str]:
    return ["--dataset_dir", str(data[0]), "--datalist", str(data[1])]


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    values = []
    for f in files:
        events = EventAccumulator(str(f))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values += [(e.step, e.value) for e in events.Scalars(tag)]
    return values


def test_two_process_distillation_matches_a_single_process_evaluation(data, tmp_path):
    bundle = bundle_with_teacher(tmp_path / "bundle")
    command = bundle_command("training", "--config_file", f"['{DISTILL}','configs/multi_gpu_distill.json']")
    command += ["--bundle_root", str(bundle), *data_args(data), "--epochs", "1", *QUICK]
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *command[1:]])
    # rank 0 alone wrote the checkpoints and logs; models/model.pt is the plain student
    SeparableUNet(3, 4).load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    assert len({f.name.split(".")[-2] for f in (bundle / "runs" / "distill").glob("events.out.tfevents.*")}) == 1
    assert len(list((bundle / "runs" / "distill").glob("events.out.tfevents.*"))) == 3  # train, val, teacher val
    [(epoch, distributed_dice)] = scalars(bundle / "runs" / "distill", "val_mean_dice")
    assert epoch == 1
    run(
        bundle_command("evaluating", "--config_file", f"['{DISTILL}','configs/evaluate.json']", "--bundle_root",
                       str(bundle), *data_args(data), "--eval_split", "validation", "--infer_batch_size", "16")
    )  # fmt: skip
    with open(bundle / "eval" / "metrics_validation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["SynBraTS_003", "SynBraTS_004", "mean"]
    single_dice = np.mean([float(rows[-1][f"dice_{r}"]) for r in ("wt", "tc", "et")])
    assert distributed_dice == pytest.approx(single_dice, abs=1e-4)


def test_teacher_training_killed_mid_run_resumes_at_the_next_epoch(data, tmp_path):
    bundle = tmp_path / "bundle"
    args = ["training", "--config_file", TEACHER, "--bundle_root", str(bundle), *data_args(data)]
    args += ["--epochs", "6", *QUICK, "--teacher_def#channels", "[8,16,32,64,128]"]  # teacher.json: @teacher_def
    last = bundle / "models" / "teacher_last.pt"
    # the same run, killed (SIGKILL) by a handler of its own in its third epoch: two epochs done and saved
    kill = tmp_path / "kill_in_epoch_3.json"
    kill.write_text(json.dumps({"+train#handlers": [{"_target_": "tests.interruption.KillDuringEpoch", "epoch": 3}]}))
    killed_args = list(args)
    killed_args[2] = TEACHER.replace("]", f",'{kill}']")
    killed_run = run(bundle_command(*killed_args), check=False)
    assert killed_run.returncode == -signal.SIGKILL, killed_run.stderr[-3000:]
    # no truncated checkpoint: every models/*.pt loads; only hidden temporary files may be left over
    assert {p.name for p in (bundle / "models").glob("*.pt")} == {"teacher.pt", "teacher_last.pt"}
    killed = torch.load(last, weights_only=True)
    torch.load(bundle / "models" / "teacher.pt", weights_only=True)
    done = killed["trainer"]["iteration"] // killed["trainer"]["epoch_length"]
    assert done == 2

    result = run(bundle_command(*args, "--resume", "true"))
    output = result.stdout + result.stderr
    assert f"resumed from {last}: epoch {done} of 6 done" in output
    trained = [int(e) for e in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", output)]
    assert trained == list(range(done + 1, 7))
    final = torch.load(last, weights_only=True)
    assert final["trainer"]["iteration"] == 6 * final["trainer"]["epoch_length"]
    assert final["lr_scheduler"]["last_epoch"] == 6
    assert final["best_metric"]["best_metric"] >= killed["best_metric"]["best_metric"]
    teacher = SeparableUNet(3, 4, channels=(8, 16, 32, 64, 128), dropout=0.5)
    teacher.load_state_dict(torch.load(bundle / "models" / "teacher.pt", weights_only=True))  # a plain state dict


def test_resume_without_a_last_checkpoint_names_the_file(data, tmp_path):
    result = run(
        bundle_command("training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path),
                       *data_args(data), "--epochs", "1", "--resume", "true", *QUICK, *NARROW), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"cannot resume: last checkpoint {tmp_path / 'models' / 'model_last.pt'} not found" in result.stderr


def test_distillation_with_a_fixed_seed_repeats_its_losses_exactly(data, tmp_path):
    losses = []
    for name in ("first", "second"):
        bundle = bundle_with_teacher(tmp_path / name)
        run(
            bundle_command("training", "--config_file", DISTILL, "--bundle_root", str(bundle), *data_args(data),
                           "--epochs", "1", *QUICK)
        )  # fmt: skip
        losses.append(scalars(bundle / "runs" / "distill", "train_loss"))
    assert len(losses[0]) == 3  # one per training case (batch_size 1)
    assert losses[0] == losses[1]


def test_student_checkpoint_given_as_teacher_stops_distillation_naming_it(data, tmp_path):
    (tmp_path / "models").mkdir()
    torch.save(SeparableUNet(3, 4).state_dict(), tmp_path / "models" / "model.pt")
    result = run(
        bundle_command("training", "--config_file", DISTILL, "--bundle_root", str(tmp_path), *data_args(data),
                       "--epochs", "1", "--teacher_ckpt", str(tmp_path / "models" / "model.pt"), *QUICK),
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"teacher checkpoint {tmp_path / 'models' / 'model.pt'} does not fit teacher_def" in result.stderr


def inference(bundle: Path, dataset: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(
        bundle_command("--config_file", "configs/inference.json", "--bundle_root", str(bundle), "--dataset_dir",
                       str(dataset), "--output_dir", str(output), *extra), check=False,
    )  # fmt: skip


def student_bundle(root: Path, in_channels: int = 3) -> Path:
    (root / "models").mkdir(parents=True)
    torch.save(SeparableUNet(in_channels, 4).state_dict(), root / "models" / "model.pt")
    return root


def test_failing_case_leaves_the_previous_good_segmentation_and_an_empty_brain_is_background(
    tmp_path, make_brats_folder
):
    bundle = student_bundle(tmp_path / "bundle")
    dataset = make_brats_folder(tmp_path / "data", "brats2020", num_cases=2, labels_present=False)
    for path in dataset.glob("BraTS20_Training_002/*.nii.gz"):  # an empty brain
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    out = tmp_path / "seg"
    result = inference(bundle, dataset, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "case BraTS20_Training_002: every voxel of" in result.stderr
    empty = nib.load(out / "BraTS20_Training_002_seg.nii.gz")
    assert not np.asanyarray(empty.dataobj).any()
    good = (out / "BraTS20_Training_002_seg.nii.gz").read_bytes()

    flair = next(dataset.glob("BraTS20_Training_002/*_flair.nii.gz"))
    volume = np.ones((16, 16, 8), np.float32)
    volume[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), flair)
    result = inference(bundle, dataset, out)
    assert result.returncode != 0
    assert re.search(rf"case BraTS20_Training_002: .*{flair.name} holds NaN or infinite", result.stderr)
    assert (out / "BraTS20_Training_002_seg.nii.gz").read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == [
        "BraTS20_Training_001_seg.nii.gz",
        "BraTS20_Training_002_seg.nii.gz",
    ]


def test_four_channel_checkpoint_with_three_sequences_stops_before_any_case(tmp_path, make_brats_folder):
    bundle = student_bundle(tmp_path / "bundle", in_channels=4)
    dataset = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1, labels_present=False)
    result = inference(bundle, dataset, tmp_path / "seg")
    assert result.returncode != 0
    assert (
        f"checkpoint {bundle / 'models' / 'model.pt'} was trained on 4 input channels but the config's network "
        "takes 3 (in_channels/modalities mismatch" in result.stderr
    )
    assert list((tmp_path / "seg").iterdir()) == []


def test_checkpoint_carrying_pickled_code_is_refused_by_inference(tmp_path, make_brats_folder):
    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    with open(tmp_path / "bundle" / "models" / "model.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    dataset = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1, labels_present=False)
    result = inference(tmp_path / "bundle", dataset, tmp_path / "seg")
    assert result.returncode != 0
    assert f"checkpoint {tmp_path / 'bundle' / 'models' / 'model.pt'} is refused" in result.stderr
    assert (tmp_path / "victim").is_dir()  # the pickled code did not run


def test_unwritable_output_folder_stops_inference_naming_it(tmp_path, make_brats_folder):
    bundle = student_bundle(tmp_path / "bundle")
    dataset = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1, labels_present=False)
    (tmp_path / "file").write_text("a file, not a folder")
    result = inference(bundle, dataset, tmp_path / "file" / "seg")
    assert result.returncode != 0
    assert f"output folder {tmp_path / 'file' / 'seg'} cannot be created or written to" in result.stderr
