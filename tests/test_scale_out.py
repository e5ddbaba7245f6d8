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
NARROW_TEACHER = ["--teacher_def#channels", "[8,16,32,64,128]"]  # teacher.json's network_def is @teacher_def
DISTILL = "['configs/train.json','configs/distill.json']"
TEACHER = "['configs/train.json','configs/teacher.json']"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow  # every test runs the bundle in subprocesses


def bundle_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", *args]


def torchrun_command(*args: str) -> list[str]:
    """``torchrun --nproc_per_node=2 -m monai.bundle run ARGS``: two gloo processes on the CPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", *args]


def config_list(*names: str) -> str:
    return "[" + ",".join(f"'configs/{name}'" for name in names) + "]"


def run(command: list[str], check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` in the bundle root; a run still going after ``timeout`` s is killed with its children."""
    process = subprocess.Popen(
        command, cwd=BUNDLE_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s (deadlock?):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        pytest.fail(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """6 synthetic cases and a datalist: 4 training cases, 2 validation and test cases (2 per process of 2)."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root / "cases", num_cases=6, shape=(32, 32, 16))
    ids = [f"SynBraTS_{i:03d}" for i in range(6)]
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": ids[:4], "validation": ids[4:], "test": ids[4:]}))
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


@pytest.fixture(scope="module")
def two_process_distillation(data, tmp_path_factory) -> tuple[Path, str]:
    """The README's multi-GPU distillation run with 2 gloo processes: its bundle root and its output."""
    bundle = bundle_with_teacher(tmp_path_factory.mktemp("distributed") / "bundle")
    result = run(
        torchrun_command("training", "--config_file", config_list("train.json", "distill.json", "multi_gpu_train.json"),
                         "--bundle_root", str(bundle), *data_args(data), "--epochs", "1", *QUICK), timeout=300,
    )  # fmt: skip
    return bundle, result.stdout + result.stderr


@pytest.mark.slow
def test_two_process_distillation_runs_to_the_end_and_rank_0_alone_writes(two_process_distillation):
    bundle, _ = two_process_distillation
    # models/model.pt is the plain student (no DistributedDataParallel prefix)
    SeparableUNet(3, 4).load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    assert len({f.name.split(".")[-2] for f in (bundle / "runs" / "distill").glob("events.out.tfevents.*")}) == 1
    # training and validation; the teacher's validation logs through the validation's writer
    assert len(list((bundle / "runs" / "distill").glob("events.out.tfevents.*"))) == 2
    [(epoch, _)] = scalars(bundle / "runs" / "distill", "val_mean_dice")
    assert epoch == 1
    [(epoch, _)] = scalars(bundle / "runs" / "distill", "teacher_val_mean_dice")
    assert epoch == 0  # once, when training starts


@pytest.mark.slow
def test_two_process_distillation_computes_each_training_case_soft_labels_once(two_process_distillation):
    bundle, output = two_process_distillation
    computed = re.findall(r"case (SynBraTS_\d+): teacher soft labels computed", output)
    # each process computed its own share (2 of the 4 training cases), not every case
    assert sorted(computed) == [f"SynBraTS_{i:03d}" for i in range(4)]
    assert sorted(p.name for p in (bundle / "cache" / "soft_labels").iterdir()) == [
        f"SynBraTS_{i:03d}.pt" for i in range(4)
    ]  # and no temporary file is left


@pytest.mark.slow
def test_two_process_evaluation_writes_what_one_process_writes(two_process_distillation, data, tmp_path):
    bundle, _ = two_process_distillation
    evaluate = ["--config_file", config_list("train.json", "distill.json", "evaluate.json")]
    common = ["--bundle_root", str(bundle), *data_args(data), "--eval_split", "validation", "--infer_batch_size", "16"]
    run(bundle_command("evaluating", *evaluate, *common, "--output_dir", str(tmp_path / "single")))
    evaluate[-1] = config_list("train.json", "distill.json", "evaluate.json", "multi_gpu_evaluate.json")
    run(torchrun_command("evaluating", *evaluate, *common, "--output_dir", str(tmp_path / "two")), timeout=300)
    rows = {}
    for name in ("single", "two"):
        with open(tmp_path / name / "metrics_validation.csv") as f:
            rows[name] = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows["two"]] == ["SynBraTS_004", "SynBraTS_005", "mean", "std", "median"]
    assert rows["two"] == rows["single"]


@pytest.mark.slow
@pytest.mark.parametrize("configs", [("train.json", "teacher.json"), ("train.json",)], ids=["teacher", "student"])
def test_two_process_supervised_training_runs_to_the_end(data, tmp_path, configs):
    run(
        torchrun_command("training", "--config_file", config_list(*configs, "multi_gpu_train.json"), "--bundle_root",
                         str(tmp_path), *data_args(data), "--epochs", "2", *QUICK, *NARROW_TEACHER), timeout=300,
    )  # fmt: skip
    name = "teacher" if "teacher.json" in configs else "model"
    assert {p.name for p in (tmp_path / "models").iterdir()} == {f"{name}.pt", f"{name}_last.pt"}
    last = torch.load(tmp_path / "models" / f"{name}_last.pt", weights_only=True)
    assert last["trainer"]["epoch_length"] == 2  # each process: its 2 of the 4 training cases, batch size 1
    assert last["trainer"]["iteration"] == 2 * 2  # both epochs ran


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry, configs, split",
    [
        ("training", ("train.json", "multi_gpu_train.json"), "validation"),
        ("evaluating", ("train.json", "evaluate.json", "multi_gpu_evaluate.json"), "test"),
    ],
)
def test_fewer_cases_than_processes_stops_naming_the_split_and_counts(data, tmp_path, entry, configs, split):
    ids = [f"SynBraTS_{i:03d}" for i in range(6)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": ids[:4], "validation": ids[4:5], "test": ids[5:]}))
    (tmp_path / "models").mkdir()
    torch.save(SeparableUNet(3, 4).state_dict(), tmp_path / "models" / "model.pt")
    result = run(
        torchrun_command(entry, "--config_file", config_list(*configs), "--bundle_root", str(tmp_path),
                         "--dataset_dir", str(data[0]), "--datalist", str(datalist), "--epochs", "1", *QUICK),
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        f"the {split} split has 1 case(s) for 2 processes: every process needs at least one {split} case"
        in result.stderr
    )
    assert "the dataset length is less than the number of participating ranks" not in result.stderr


def test_teacher_training_killed_mid_run_resumes_at_the_next_epoch(data, tmp_path):
    bundle = tmp_path / "bundle"
    args = ["training", "--config_file", TEACHER, "--bundle_root", str(bundle), *data_args(data)]
    args += ["--epochs", "6", *QUICK, *NARROW_TEACHER]
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

    result = run(bundle_command(*args, "--resume", "True"))
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
                       *data_args(data), "--epochs", "1", "--resume", "True", *QUICK, *NARROW), check=False,
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
    assert len(losses[0]) == 4  # one per training case (batch_size 1)
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
    volumes = (out / "tumour_volumes.csv").read_bytes()

    flair = next(dataset.glob("BraTS20_Training_002/*_flair.nii.gz"))
    volume = np.ones((16, 16, 8), np.float32)
    volume[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), flair)
    result = inference(bundle, dataset, out)
    assert result.returncode != 0
    assert re.search(rf"case BraTS20_Training_002: .*{flair.name} holds NaN or infinite", result.stderr)
    assert (out / "BraTS20_Training_002_seg.nii.gz").read_bytes() == good
    assert (out / "tumour_volumes.csv").read_bytes() == volumes
    assert sorted(p.name for p in out.iterdir()) == [
        "BraTS20_Training_001_seg.nii.gz",
        "BraTS20_Training_002_seg.nii.gz",
        "tumour_volumes.csv",
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
