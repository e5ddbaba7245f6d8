# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The whole benchmark in one process: the case, the models, every job in turn, and the reports."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from scripts.atomic_files import write_text_atomic
from scripts.fast_inference import has_onnxruntime
from tools.benchmark.agreement import fast_path_agreement
from tools.benchmark.batch_size import fastest_batch_size
from tools.benchmark.inference import benchmark_inference, speedups
from tools.benchmark.loss_terms import LOSS_TERMS, benchmark_loss_terms
from tools.benchmark.machine import describe_machine
from tools.benchmark.models import TEACHER_CHANNELS, BenchmarkModel, bundle_model, peer_model
from tools.benchmark.report import markdown_report, write_figure
from tools.benchmark.results import BenchmarkResults, Case
from tools.benchmark.timing import MEMORY_METHOD
from tools.benchmark.training import TRAINING_MODES, benchmark_training
from tools.synthetic_brats import write_synthetic_dataset

__all__ = ["REPORT_FILES", "Workload", "benchmark"]

DEFAULT_CASE_DIR = os.path.join("..", "shared", "data", "brats_sample", "TCGA-DU-7294")
REPORT_FILES = ("benchmark.json", "benchmark.md", "benchmark.png")
PEER_ROI = (240, 240, 160)  # the Model Zoo brats_mri_segmentation bundle's sliding window
PEER_DIVISOR = 8  # SegResNet with 4 down levels needs every side of its input divisible by 2 ** 3
TEACHER_BATCH_SIZES = (1, 2, 4, 8)  # slice batch sizes tried for the teacher
TRAINING_BATCH = 2 * 16  # patches per training iteration: configs/train.json's batch_size x patches_per_case
NUM_CLASSES = 4


@dataclasses.dataclass(frozen=True)
class Workload:
    """The sizes of one benchmark run."""

    synthetic_shape: tuple[int, int, int]  # of the case when no real case is used
    matmul_size: int
    training_patch: int
    fit_peer_window: bool  # SegResNet's window fitted to the volume instead of the zoo bundle's 240 x 240 x 160


FULL = Workload(synthetic_shape=(240, 240, 155), matmul_size=2048, training_patch=128, fit_peer_window=False)
QUICK = Workload(synthetic_shape=(32, 32, 16), matmul_size=256, training_patch=16, fit_peer_window=True)


def _prepare_case(case_dir: str | None, quick: bool, bundle_root: str, workdir: Path) -> tuple[str, str]:
    """A dataset folder holding the one benchmark case, and where the case comes from."""
    dataset_dir = workdir / "data"
    if not quick:
        source = Path(case_dir) if case_dir is not None else Path(bundle_root) / DEFAULT_CASE_DIR
        if case_dir is not None and not source.is_dir():
            raise FileNotFoundError(f"case_dir {case_dir} is not a folder.")
        if source.is_dir():
            dataset_dir.mkdir()
            (dataset_dir / source.name).symlink_to(source.resolve(), target_is_directory=True)
            return str(dataset_dir), str(source)
    shape = (QUICK if quick else FULL).synthetic_shape
    write_synthetic_dataset(dataset_dir, num_cases=1, shape=shape)
    return str(dataset_dir), "synthetic " + "x".join(str(n) for n in shape)


def _student_forms(bundle_root: str, dataset_dir: str, seg_dir: str, device: torch.device) -> dict[str, BenchmarkModel]:
    """The student through the fast path, the plain ``SliceInferer`` and (on CPU, if installed) ONNX Runtime.

    All three share one network, so that they run the same weights.
    """
    student = bundle_model(bundle_root, dataset_dir, seg_dir, device)
    forms = {
        "student": student,
        "student_plain": bundle_model(bundle_root, dataset_dir, seg_dir, device, plain_inferer=True),
    }
    if device.type == "cpu" and has_onnxruntime:
        forms["student_onnxruntime"] = bundle_model(bundle_root, dataset_dir, seg_dir, device, backend="onnxruntime")
    return {key: dataclasses.replace(model, network=student.network) for key, model in forms.items()}


def benchmark(
    output_dir: str,
    case_dir: str | None = None,
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
    amp: bool = False,
    bundle_root: str = ".",
) -> BenchmarkResults:
    """Measure the student, the teacher and SegResNet on one case in this process and write the reports.

    Args:
        output_dir: folder of ``benchmark.json``, ``benchmark.md`` and ``benchmark.png``, created if needed.
        case_dir: a BraTS 2020/2021 or 2023 case folder (four sequences); default: the shared sample
            ``../shared/data/brats_sample/TCGA-DU-7294`` when present, else a synthetic 240 x 240 x 155 case.
        repeats: timed rounds of every inference measurement, after one warm-up; the trainings run
            ``3 * repeats + 1`` epochs each.
        quick: ``QUICK`` sizes (a 32 x 32 x 16 synthetic case, 16 x 16 patches, 2 epochs), for tests; ``case_dir``
            is then ignored.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        amp: mixed precision (autocast, and gradient scaling in training) on CUDA; ignored on CPU, as in the configs.
        bundle_root: the bundle root (its ``configs/`` are read).

    Returns:
        the results, as written to ``benchmark.json``.

    Raises:
        ValueError: if ``repeats`` < 1, the device is neither CPU nor CUDA, or CUDA is requested but not available.
        FileNotFoundError: if ``case_dir`` is given but is not a folder.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    torch_device = torch.device(device)
    if torch_device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}.")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here (torch {torch.__version__}).")
    amp = amp and torch_device.type == "cuda"  # as the configs' use_amp: ignored on CPU
    workload = QUICK if quick else FULL
    bundle_root = os.path.abspath(bundle_root)
    date_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="brats_benchmark_") as tmp:
        workdir = Path(tmp)
        dataset_dir, source = _prepare_case(case_dir, quick, bundle_root, workdir)
        seg_dir = str(workdir / "segmentations")
        models = _student_forms(bundle_root, dataset_dir, seg_dir, torch_device)
        student = models["student"]
        shape = list(student.preprocessing(student.case)["image"].shape[1:])
        roi = [math.ceil(n / PEER_DIVISOR) * PEER_DIVISOR for n in shape] if workload.fit_peer_window else PEER_ROI
        models["teacher"] = bundle_model(bundle_root, dataset_dir, seg_dir, torch_device, TEACHER_CHANNELS)
        models["segresnet"] = peer_model(dataset_dir, seg_dir, torch_device, roi)
        epochs = 2 if quick else 3 * repeats + 1
        steps = 1 + len(models) * (2 * repeats + 4) + len(TRAINING_MODES) * epochs + len(LOSS_TERMS)
        with tqdm(total=steps, desc="benchmark") as progress:
            agreement = fast_path_agreement(student, models["student_plain"], bundle_root, torch_device)
            progress.set_postfix_str("teacher batch size")
            sweep = fastest_batch_size(models["teacher"], TEACHER_BATCH_SIZES, torch_device, amp)
            progress.update()
            progress.set_postfix_str("inference")
            latency, matmul = benchmark_inference(
                models, repeats, torch_device, amp, workload.matmul_size, progress.update
            )
            progress.set_postfix_str("training")
            training = benchmark_training(
                bundle_root, dataset_dir, workdir, epochs, workload.training_patch, torch_device, amp, progress.update
            )
            progress.set_postfix_str("loss terms")
            loss_terms = benchmark_loss_terms(
                TRAINING_BATCH, workload.training_patch, NUM_CLASSES, 3 * repeats, torch_device
            )
            progress.update(len(LOSS_TERMS))
    results = BenchmarkResults(
        date_utc=date_utc,
        machine=describe_machine(torch_device, amp),
        repeats=repeats,
        quick=quick,
        case=Case(source=source, shape=shape),
        fast_path_agreement=agreement,
        student_batch_size=student.inferer.sw_batch_size,
        teacher_batch_size=sweep,
        models=latency,
        matmul=matmul,
        speedups=speedups(latency, ("student", "student_onnxruntime"), ("segresnet", "teacher", "student_plain")),
        training_patch_size=workload.training_patch,
        training=training,
        loss_terms=loss_terms,
        memory_method=MEMORY_METHOD[torch_device.type],
    )
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = markdown_report(results)
    write_text_atomic(output / "benchmark.json", json.dumps(results.to_dict(), indent=4) + "\n")
    write_text_atomic(output / "benchmark.md", report)
    write_figure(output / "benchmark.png", results)
    print(report)
    for name in REPORT_FILES:
        print(f"written: {output / name}")
    return results
