# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Job: seconds per training epoch of the bundle's own trainers, teacher, student alone and each way of KD."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.brats_data import find_cases
from tools.benchmark.results import TrainingEpochs
from tools.bundle_config import DISTILL_CONFIGS, TEACHER_CONFIGS, bundle_configs, load_config

__all__ = ["TRAINING_MODES", "TrainingMode", "benchmark_training"]


@dataclasses.dataclass(frozen=True)
class TrainingMode:
    """A training as users run it: its configs and the ids it overrides."""

    name: str
    configs: tuple[str, ...]
    overrides: dict[str, Any]
    distillation: bool  # whether the configs hold the teacher (and its checkpoint, soft labels, validation)
    unlabelled: bool = False  # whether a copy of the training cases joins them as unlabelled cases


TRAINING_MODES = {
    "teacher": TrainingMode("Teacher training", TEACHER_CONFIGS, {}, distillation=False),
    "student_alone": TrainingMode(
        "Student alone (kd_weight 0)", DISTILL_CONFIGS, {"kd_weight": 0.0, "soft_labels": "online"}, distillation=True
    ),
    "distillation_online": TrainingMode(
        "Online distillation (soft_labels online)", DISTILL_CONFIGS, {"soft_labels": "online"}, distillation=True
    ),
    "distillation_cached": TrainingMode(
        "Distillation from cached soft labels (soft_labels cached)",
        DISTILL_CONFIGS,
        {"soft_labels": "cached"},
        distillation=True,
    ),
    "distillation_cached_pairwise": TrainingMode(
        "Cached distillation with the pairwise term (pairwise_weight 1)",
        DISTILL_CONFIGS,
        {"soft_labels": "cached", "pairwise_weight": 1.0},
        distillation=True,
    ),
    "distillation_cached_unlabelled": TrainingMode(
        "Cached distillation with as many unlabelled cases (unlabelled_ratio 1)",
        DISTILL_CONFIGS,
        {"soft_labels": "cached", "unlabelled_ratio": 1.0},
        distillation=True,
        unlabelled=True,
    ),
}


def _linked_copy(dataset_dir: str, folder: Path, labelled: bool) -> Path:
    """A folder of copies of the dataset's cases: their files linked under new case ids, with or without labels.

    Labelled copies are linked beside the original cases, so that ``folder`` holds twice the cases; unlabelled ones
    alone, as an ``unlabelled_dir``.
    """
    suffix = "copy" if labelled else "unlabelled"
    for case in find_cases(dataset_dir, require_label=labelled):
        if case["layout"] == "msd":
            raise ValueError("the training benchmark needs a per-case-folder layout, not msd.")
        case_id = f"{case['case_id']}{suffix}"
        separator = "_" if case["layout"] == "brats2020" else "-"
        files = case["image"] + ([case["label"]] if labelled else [])
        if labelled:
            (folder / case["case_id"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / case["case_id"]).symlink_to(Path(case["image"][0]).parent, target_is_directory=True)
        for path in files:
            name = Path(path).name
            link = folder / case_id / name.replace(f"{case['case_id']}{separator}", f"{case_id}{separator}", 1)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return folder


class _EpochTimer:
    """Records the wall time of every epoch of a trainer."""

    def __init__(self, trainer: Engine) -> None:
        self.seconds: list[float] = []
        self._start = 0.0
        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def _completed(self, engine: Engine) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def benchmark_training(
    bundle_root: str,
    dataset_dir: str,
    workdir: Path,
    epochs: int,
    patch: int,
    device: torch.device,
    amp: bool,
    progress: Callable[[int], object] = lambda steps: None,
) -> dict[str, TrainingEpochs]:
    """Run each of ``TRAINING_MODES`` for ``epochs`` epochs with its real trainer and time every epoch.

    Each mode's trainer is built from its configs (data pipeline and augmentation included, ``cache_rate`` 1, no
    validation), the distillation modes with a random-weight teacher checkpoint; the modes take turns epoch by epoch,
    so that the machine's drift hits all alike, and the first epoch is a warm-up. Building the training dataset is
    timed apart: in cached mode it includes the teacher's one pass per case. The mode with unlabelled cases trains on
    the training cases and as many unlabelled ones (their image files linked under new case ids, no label); every
    other mode on the training cases and as many labelled copies of them, so that every epoch holds the same number
    of patches in batches of the same size.

    Args:
        bundle_root: the bundle root.
        dataset_dir: the dataset folder (its training split is used).
        workdir: an empty folder for checkpoints, logs, the teacher checkpoint and the soft-label cache.
        epochs: epochs per mode (at least 2 for a steady-state figure).
        patch: ``patch_size``.
        device: where training runs.
        amp: mixed precision.
        progress: called with 1 after every epoch of every mode.

    Returns:
        mode key -> its epochs.
    """
    teacher_ckpt = workdir / "teacher.pt"
    doubled_dir = str(_linked_copy(dataset_dir, workdir / "labelled_copies", labelled=True))
    teacher_parser = load_config(bundle_configs(bundle_root, TEACHER_CONFIGS), bundle_root, dataset_dir)
    torch.save(teacher_parser.get_parsed_content("network_def").state_dict(), teacher_ckpt)
    trainers, timers, built = {}, {}, {}
    for key, mode in TRAINING_MODES.items():
        overrides: dict[str, Any] = {
            "device": f"$torch.device('{device}')",
            "amp": amp,
            "epochs": epochs,
            "val_interval": epochs + 1,
            "patch_size": patch,
            "cache_rate": 1.0,
            "num_workers": 0,
            "ckpt_dir": str(workdir / key / "models"),
            "log_dir": str(workdir / key / "runs"),
        }
        if mode.distillation:
            overrides |= {
                "teacher_validation": False,
                "teacher_ckpt": str(teacher_ckpt),
                "soft_label_dir": str(workdir / key / "soft_labels"),
            }
        if mode.unlabelled:
            overrides["unlabelled_dir"] = str(_linked_copy(dataset_dir, workdir / key / "unlabelled", labelled=False))
        parser = load_config(
            bundle_configs(bundle_root, mode.configs),
            bundle_root,
            dataset_dir if mode.unlabelled else doubled_dir,
            overrides | mode.overrides,
        )
        start = time.perf_counter()
        dataset = parser.get_parsed_content("train#dataset")
        build_s = time.perf_counter() - start
        trainers[key] = parser.get_parsed_content("train#trainer")
        timers[key] = _EpochTimer(trainers[key])
        built[key] = (parser, len(dataset), build_s)
    for epoch in range(1, epochs + 1):
        for trainer in trainers.values():
            trainer.state.max_epochs = epoch  # run() then resumes for one more epoch
            trainer.run()
            progress(1)
    results = {}
    for key, mode in TRAINING_MODES.items():
        parser, train_cases, build_s = built[key]
        patches = train_cases * parser.get_parsed_content("patches_per_case")
        runs = timers[key].seconds
        epoch_s = statistics.median(runs[1:] or runs)
        results[key] = TrainingEpochs(
            name=mode.name,
            configs=list(mode.configs),
            overrides=mode.overrides,
            parameters=sum(p.numel() for p in parser.get_parsed_content("network").parameters()),
            train_cases=train_cases,
            patches_per_epoch=patches,
            dataset_build_s=build_s,
            epoch_runs_s=runs,
            epoch_s=epoch_s,
            slices_per_s=patches / epoch_s,
        )
    return results
