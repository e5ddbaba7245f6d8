# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The real-data study in one command: the distillation ablation, every network trained and judged alike.

From a BraTS folder and its split, the study trains with the bundle's own configs, the same split, seed and schedule:

- ``teacher``: the large network;
- ``student_alone``: the student without a teacher;
- ``student_kd``: the student distilled from the teacher's logits (``unlabelled_ratio 0.0``, ``pairwise_weight 0.0``);
- ``student_kd_pairwise``: logit plus structured (pairwise affinity) distillation (``unlabelled_ratio 0.0``,
  ``pairwise_weight`` of ``--pairwise_weight``);
- ``student_kd_unlabelled``: logit distillation on the labelled cases and the datalist's ``"unlabelled"`` ones
  (``pairwise_weight 0.0``, ``unlabelled_ratio`` of ``--unlabelled_ratio``: unlabelled cases drawn per labelled case
  in each epoch);
- ``student_alone_long``: the student alone for ``student_epochs * (1 + unlabelled_ratio)`` epochs, as many optimizer
  steps as ``student_kd_unlabelled``: the control that tells "more steps" from "the teacher's targets on unlabelled
  cases".

The last two are in the study only when the datalist has a non-empty ``"unlabelled"`` list of case ids (e.g.
``configs/datalists/brats_real_few_labels.json``); the report says when they are left out. Every distilled student
reads the teacher's checkpoint and the study's one folder of cached soft labels. The study evaluates each network on
the test split with the bundle's evaluation (one per-case CSV per model) and writes docs-ready results in
``output_dir``: ``study.md`` (date, machine, schedule, command, each model's settings and a table of parameters,
GFLOPs, per-region Dice and HD95, legacy and lesion-wise, each student's mean Dice gain over the student alone, CPU
latency and training time), ``study.json`` (the same figures, each model's epochs and config overrides, the stages'
commands), ``study.png`` (FLAIR, ground truth and the predictions of the teacher and of up to
:data:`FIGURE_STUDENTS` students on the axial slice with most tumour of the first test cases) and ``study_dice.png``
(mean Dice per region of every model, as grouped bars). Run it from the bundle root::

    python -m tools.study --dataset_dir ../shared/data/brats_real \\
        --datalist configs/datalists/brats_real_few_labels.json --output_dir runs/study_cpu --schedule cpu

Options: ``--schedule`` (``cpu`` or ``gpu``), ``--teacher_epochs`` and ``--student_epochs`` (instead of the
schedule's; a validation interval longer than the epochs becomes the epochs), ``--pairwise_weight`` (default 1.0),
``--unlabelled_ratio`` (default 2.0), ``--models`` (comma-separated keys, default every model the datalist allows;
a distilled student brings its teacher), ``--overrides`` (further bundle ids for every stage, e.g.
``'{"patch_size": 64}'``), ``--figure_cases`` and ``--latency_repeats``.

Every stage is a ``python -m monai.bundle run`` subprocess logging to ``<output_dir>/<stage>.log``:

============================  =====================================================================================
stage                         writes
============================  =====================================================================================
``<model>`` (training)        ``models/<model>.pt`` (best validation), ``models/<model>_last.pt`` (resume state),
                              TensorBoard events in ``logs/<model>``; a distilled student also the teacher's soft
                              labels in ``cache/soft_labels``
``evaluate_<model>``          ``eval/<model>/metrics_test.csv`` (one row per test case and a mean row)
============================  =====================================================================================

The study resumes where it stopped: a training stage whose last checkpoint has every epoch of its model done is
skipped, one partly done is continued with ``--resume True``, and an evaluation whose CSV is newer than its
checkpoint is reused. While a stage trains, a progress bar shows the stage, the epochs done and an estimate of the
time left (from the epoch times in the stages' logs; a stage not yet timed is estimated from a stage training the
same network, scaled by the cases in an epoch, else the estimate waits for its first epoch).

Schedules (:data:`SCHEDULES`):

==========  ==============  ====================  ==================================================
schedule    teacher         each student          validation
==========  ==============  ====================  ==================================================
``cpu``     20 epochs       40 epochs             teacher every 10 epochs, students every 4 epochs
``gpu``     100 epochs      100 epochs            every epoch
==========  ==============  ====================  ==================================================

``student_alone_long`` trains for the students' epochs and validation interval times ``1 + unlabelled_ratio``
(rounded, at least 1). What each schedule costs is measured in the README's real-data section.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import enum
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fire
import matplotlib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import list_data_collate
from torch import nn
from tqdm import tqdm

from scripts.atomic_files import atomic_path, write_text_atomic
from scripts.brats_data import canonical_sequences
from scripts.brats_output import brain_mask
from scripts.brats_regions import region_names
from scripts.checkpoints import CheckpointMismatchError, check_network_checkpoint, read_checkpoint
from tools.compare_models import LABEL_CMAP, save_label_figure
from tools.flops import conv_gflops

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = [
    "FIGURE_STUDENTS",
    "METRICS",
    "MODELS",
    "SCHEDULES",
    "EvaluationTable",
    "MetricColumn",
    "Schedule",
    "StageAction",
    "StudyError",
    "StudyModel",
    "StudyPaths",
    "TrainingState",
    "datalist_unlabelled_cases",
    "dice_gain",
    "estimate_seconds_left",
    "evaluation_command",
    "main",
    "read_evaluation_csv",
    "read_training_state",
    "run_study",
    "select_models",
    "study_models",
    "trainer_epoch_seconds",
    "training_action",
    "training_command",
]


class StudyError(RuntimeError):
    """A stage failed, an input is missing or wrong, or the output folder holds another study's state (as it says)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long the study trains: epochs of the teacher and of each student, and how often they are validated.

    Args:
        name: the schedule's name, as given to ``--schedule``.
        teacher_epochs: training epochs of the teacher.
        student_epochs: training epochs of each student (alone and distilled alike), before its ``epoch_factor``.
        teacher_val_interval: epochs between two validations (checkpoint selection) of the teacher.
        student_val_interval: epochs between two validations of each student.
    """

    name: str
    teacher_epochs: int
    student_epochs: int
    teacher_val_interval: int
    student_val_interval: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self)[1:]:
            if getattr(self, field.name) < 1:
                raise ValueError(
                    f"schedule {self.name!r}: {field.name} must be at least 1, got {getattr(self, field.name)}."
                )
        for role, epochs, interval in (
            ("teacher", self.teacher_epochs, self.teacher_val_interval),
            ("student", self.student_epochs, self.student_val_interval),
        ):
            if interval > epochs:
                raise ValueError(
                    f"schedule {self.name!r}: the {role} would never be validated (validation every {interval} "
                    f"epochs, {epochs} epochs) and would write no best checkpoint."
                )

    def epochs(self, model: StudyModel) -> int:
        """Training epochs of one model of the study.

        Args:
            model: the model.

        Returns:
            ``teacher_epochs`` for the teacher; for a student, ``student_epochs`` times its ``epoch_factor``,
            rounded, at least 1.
        """
        return self.teacher_epochs if model.is_teacher else _scaled(self.student_epochs, model.epoch_factor)

    def val_interval(self, model: StudyModel) -> int:
        """Epochs between two validations of one model of the study.

        Args:
            model: the model.

        Returns:
            ``teacher_val_interval`` for the teacher; for a student, ``student_val_interval`` times its
            ``epoch_factor``, rounded, at least 1 and at most its epochs.
        """
        if model.is_teacher:
            return self.teacher_val_interval
        return min(_scaled(self.student_val_interval, model.epoch_factor), self.epochs(model))

    def with_epochs(self, teacher_epochs: int | None = None, student_epochs: int | None = None) -> Schedule:
        """This schedule with other epochs; a validation interval longer than its new epochs becomes the epochs.

        Args:
            teacher_epochs: the teacher's epochs, or None for this schedule's.
            student_epochs: each student's epochs, or None for this schedule's.

        Returns:
            the schedule, under the same name.

        Raises:
            ValueError: if an epoch count is below 1.
        """
        teacher = self.teacher_epochs if teacher_epochs is None else teacher_epochs
        student = self.student_epochs if student_epochs is None else student_epochs
        return dataclasses.replace(
            self,
            teacher_epochs=teacher,
            student_epochs=student,
            teacher_val_interval=max(1, min(self.teacher_val_interval, teacher)),
            student_val_interval=max(1, min(self.student_val_interval, student)),
        )


def _scaled(count: int, factor: float) -> int:
    """``count * factor`` rounded half up, at least 1."""
    return max(1, math.floor(count * factor + 0.5))


SCHEDULES: dict[str, Schedule] = {
    "cpu": Schedule("cpu", teacher_epochs=20, student_epochs=40, teacher_val_interval=10, student_val_interval=4),
    "gpu": Schedule("gpu", teacher_epochs=100, student_epochs=100, teacher_val_interval=1, student_val_interval=1),
}


@dataclasses.dataclass(frozen=True)
class StudyModel:
    """One network of the study: how the bundle trains it, evaluates it, and for how long.

    Args:
        key: its name in file names (checkpoint ``<key>.pt``), stage names and ``study.json``.
        title: its name in the reports.
        training_configs: the bundle configs of its training, merged in order.
        evaluation_configs: the bundle configs of its evaluation, merged in order.
        architecture: config id of its network definition in ``configs/train.json``.
        is_teacher: whether it trains for the schedule's teacher epochs.
        teacher: key of the model it is distilled from, or None.
        overrides: the bundle config ids its training sets (on its command line only), e.g.
            ``{"pairwise_weight": 1.0}``.
        epoch_factor: a student's epochs and validation interval are the schedule's times this (rounded, at least 1).
        needs_unlabelled: whether it is in the study only with a datalist listing unlabelled cases.
    """

    key: str
    title: str
    training_configs: tuple[str, ...]
    evaluation_configs: tuple[str, ...]
    architecture: str
    is_teacher: bool = False
    teacher: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    epoch_factor: float = 1.0
    needs_unlabelled: bool = False

    @property
    def ckpt_name(self) -> str:
        """File name of its best-validation checkpoint in ``<output_dir>/models``."""
        return f"{self.key}.pt"

    @property
    def last_ckpt_name(self) -> str:
        """File name of the resume state, as the bundle's ``last_ckpt_name`` derives it."""
        return f"{self.key}_last.pt"

    @property
    def epoch_length_factor(self) -> float:
        """The cases in one of its epochs over the labelled cases: ``1 + unlabelled_ratio``."""
        return 1.0 + float(self.overrides.get(UNLABELLED_RATIO_ID, 0.0))


UNLABELLED_RATIO_ID = "unlabelled_ratio"  # bundle id: unlabelled cases drawn per labelled case in an epoch
PAIRWISE_WEIGHT_ID = "pairwise_weight"  # bundle id: weight of the structured (pairwise affinity) distillation term
UNLABELLED_SPLIT = "unlabelled"  # the datalist's list of unlabelled case ids
REFERENCE_MODEL = "student_alone"  # the students' Dice gains are over this model
FIGURE_STUDENTS = 4  # students drawn in study.png beside the teacher, the first ones of the study
# the Dice metrics whose gain over the student alone study.md shows, and their columns' headers
GAIN_COLUMNS = {
    "legacy_dice": "Δ mean Dice vs student alone",
    "lesion_dice": "Δ lesion-wise mean Dice vs student alone",
}


def study_models(pairwise_weight: float = 1.0, unlabelled_ratio: float = 2.0) -> tuple[StudyModel, ...]:
    """Every network of the ablation, in training order (the teacher first: the distilled students need it).

    The config files of every stage are here and only here.

    Args:
        pairwise_weight: ``pairwise_weight`` of ``student_kd_pairwise``.
        unlabelled_ratio: ``unlabelled_ratio`` of ``student_kd_unlabelled``; ``student_alone_long`` trains
            ``1 + unlabelled_ratio`` times the students' epochs.

    Returns:
        the models.

    Raises:
        StudyError: if ``pairwise_weight`` or ``unlabelled_ratio`` is not positive (the model would be
            ``student_kd``).
    """
    for name, value in (("pairwise_weight", pairwise_weight), ("unlabelled_ratio", unlabelled_ratio)):
        if not value > 0:
            raise StudyError(f"{name} must be positive, got {value} (0 would train student_kd again).")
    student = {
        "training_configs": ("configs/train.json",),
        "evaluation_configs": ("configs/train.json", "configs/evaluate.json"),
        "architecture": "network_def",
    }
    distilled = student | {"training_configs": ("configs/train.json", "configs/distill.json"), "teacher": "teacher"}
    return (
        StudyModel(
            "teacher",
            "Teacher",
            training_configs=("configs/train.json", "configs/teacher.json"),
            evaluation_configs=("configs/train.json", "configs/teacher.json", "configs/evaluate.json"),
            architecture="teacher_def",
            is_teacher=True,
        ),
        StudyModel("student_alone", "Student alone", **student),
        StudyModel(
            "student_kd",
            "Student KD",
            overrides={UNLABELLED_RATIO_ID: 0.0, PAIRWISE_WEIGHT_ID: 0.0},
            **distilled,
        ),
        StudyModel(
            "student_kd_pairwise",
            "Student KD + pairwise",
            overrides={UNLABELLED_RATIO_ID: 0.0, PAIRWISE_WEIGHT_ID: float(pairwise_weight)},
            **distilled,
        ),
        StudyModel(
            "student_kd_unlabelled",
            "Student KD + unlabelled",
            overrides={UNLABELLED_RATIO_ID: float(unlabelled_ratio), PAIRWISE_WEIGHT_ID: 0.0},
            needs_unlabelled=True,
            **distilled,
        ),
        StudyModel(
            "student_alone_long",
            "Student alone, long",
            epoch_factor=1.0 + unlabelled_ratio,
            needs_unlabelled=True,
            **student,
        ),
    )


def datalist_unlabelled_cases(datalist: str | None) -> list[Any]:
    """The unlabelled cases a JSON datalist lists (its ``"unlabelled"`` list, as the bundle reads it).

    Args:
        datalist: the datalist, or None for the bundle's seeded split (which has none).

    Returns:
        the list's entries; empty without the list (or a list there).

    Raises:
        StudyError: if the datalist cannot be read as JSON.
    """
    if not datalist:
        return []
    try:
        with open(datalist) as f:
            content = json.load(f)
    except FileNotFoundError as e:
        raise StudyError(f"datalist {datalist} not found.") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudyError(f"cannot read datalist {datalist}: {e}") from e
    unlabelled = content.get(UNLABELLED_SPLIT) if isinstance(content, dict) else None
    return unlabelled if isinstance(unlabelled, list) else []


def select_models(
    models: Sequence[StudyModel], keys: str | Sequence[str] | None = None, unlabelled: bool = True
) -> tuple[StudyModel, ...]:
    """The models of one study, in training order.

    Args:
        models: every model, e.g. :func:`study_models`'s.
        keys: the keys asked for, comma-separated or as a sequence; None for every model ``unlabelled`` allows.
            A distilled model brings its teacher.
        unlabelled: whether the datalist lists unlabelled cases.

    Returns:
        the selected models.

    Raises:
        StudyError: if a key is unknown, none is given, or a model asked for needs unlabelled cases the datalist
            lacks.
    """
    by_key = {model.key: model for model in models}
    if keys is None:
        return tuple(model for model in models if unlabelled or not model.needs_unlabelled)
    asked = [key.strip() for key in (keys.split(",") if isinstance(keys, str) else keys) if key.strip()]
    unknown = [key for key in asked if key not in by_key]
    if unknown or not asked:
        raise StudyError(
            f"unknown model(s) {', '.join(map(repr, unknown)) or '(none given)'}; the models are {', '.join(by_key)}."
        )
    needing = [key for key in asked if by_key[key].needs_unlabelled]
    if needing and not unlabelled:
        raise StudyError(
            f"{', '.join(needing)} need(s) unlabelled cases: give a --datalist with a non-empty "
            f"{UNLABELLED_SPLIT!r} list."
        )
    chosen = set(asked) | {by_key[key].teacher for key in asked if by_key[key].teacher is not None}
    return tuple(model for model in models if model.key in chosen)


MODELS: tuple[StudyModel, ...] = study_models()  # with the default weights, the unlabelled models included
# the config the report reads in process: both architectures, the validation pipeline and the split
REPORT_CONFIG = "configs/train.json"
EVAL_SPLIT = "test"
TRAINER_KEY = "trainer"  # the trainer's state in a last checkpoint (``engine_key`` of configs/train.json)
# config ids the study sets itself, on every stage's command line
_STUDY_IDS = frozenset(
    (
        "dataset_dir",
        "datalist",
        "epochs",
        "val_interval",
        "ckpt_dir",
        "ckpt_name",
        "log_dir",
        "resume",
        "teacher_ckpt",
        "soft_label_dir",
        "output_dir",
        "eval_split",
    )
)


@dataclasses.dataclass(frozen=True)
class MetricColumn:
    """One metric of the study's table, as a column of the evaluation CSV for each region.

    Args:
        title: its header in ``study.md``, followed by the region.
        column: its column in the CSV, ``{region}`` standing for the region in lower case (``wt``, ``tc``, ``et``).
        digits: decimals shown in ``study.md``.
        required: whether the CSV must have it; an optional metric absent from the CSV is left out of the table.
    """

    title: str
    column: str
    digits: int
    required: bool = False

    def columns(self, regions: Sequence[str]) -> dict[str, str]:
        """The CSV column of each region.

        Args:
            regions: region names (``WT``, ``TC``, ``ET``).

        Returns:
            ``{region: column}``.
        """
        return {region: self.column.format(region=region.lower()) for region in regions}


# The metrics of the study's table and where the evaluation CSV holds them (adjust here if the CSV's header changes)
METRICS: dict[str, MetricColumn] = {
    "legacy_dice": MetricColumn("Dice", "dice_{region}", 3, required=True),
    "legacy_hd95": MetricColumn("HD95 (mm)", "hd95_{region}", 2, required=True),
    "lesion_dice": MetricColumn("lesion-wise Dice", "lesion_dice_{region}", 3),
    "lesion_hd95": MetricColumn("lesion-wise HD95 (mm)", "lesion_hd95_{region}", 2),
}
CASE_ID_COLUMN = "case_id"
MEAN_ROW = "mean"  # case id of the CSV's row of means over the cases (computed by the evaluation)

FIGURE_CASES = 3
SLICE_SIZE = 128  # side of the slice the GFLOPs are reported for
POLL_SECONDS = 2.0
LOG_TAIL_LINES = 20
# internal label -> (colour, name); label 0 is left transparent
_EPOCH_COMPLETE = re.compile(r"Trainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):(\d+(?:\.\d*)?)")


@dataclasses.dataclass(frozen=True)
class StudyPaths:
    """Where the study writes, under one output folder.

    Args:
        output_dir: the study's folder.
    """

    output_dir: str

    @property
    def models_dir(self) -> str:
        """The checkpoints' folder (the bundle's ``ckpt_dir``)."""
        return os.path.join(self.output_dir, "models")

    @property
    def soft_label_dir(self) -> str:
        """The teacher's cached soft labels."""
        return os.path.join(self.output_dir, "cache", "soft_labels")

    def log(self, stage: str) -> str:
        """The log of a stage (the subprocess's output)."""
        return os.path.join(self.output_dir, f"{stage}.log")

    def tensorboard_dir(self, model: StudyModel) -> str:
        """The TensorBoard folder of a model's training (the bundle's ``log_dir``)."""
        return os.path.join(self.output_dir, "logs", model.key)

    def best_ckpt(self, model: StudyModel) -> str:
        """A model's best-validation checkpoint."""
        return os.path.join(self.models_dir, model.ckpt_name)

    def last_ckpt(self, model: StudyModel) -> str:
        """A model's resume state, written after every epoch."""
        return os.path.join(self.models_dir, model.last_ckpt_name)

    def eval_dir(self, model: StudyModel) -> str:
        """A model's evaluation folder (the bundle's ``output_dir``)."""
        return os.path.join(self.output_dir, "eval", model.key)

    def eval_csv(self, model: StudyModel) -> str:
        """A model's per-case metrics on the test split."""
        return os.path.join(self.eval_dir(model), f"metrics_{EVAL_SPLIT}.csv")

    def report(self, suffix: str) -> str:
        """``study.md``, ``study.json`` or ``study.png``."""
        return os.path.join(self.output_dir, f"study{suffix}")


def _shell_join(command: Sequence[str]) -> str:
    """A command as one shell line: ``python`` for this interpreter, list literals double-quoted as users type them."""
    words = []
    for word in ["python", *command[1:]] if command[0] == sys.executable else command:
        plain_in_double_quotes = "'" in word and not any(c in word for c in '"$`\\!')
        words.append(f'"{word}"' if plain_in_double_quotes else shlex.quote(word))
    return " ".join(words)


def _config_file_argument(config_files: Sequence[str]) -> str:
    """``--config_file`` as ``monai.bundle run`` reads it: one path, or a list literal merged in order."""
    if len(config_files) == 1:
        return config_files[0]
    return "[" + ",".join(repr(f) for f in config_files) + "]"


def _bundle_command(run_id: str, config_files: Sequence[str], ids: Mapping[str, Any]) -> list[str]:
    """``python -m monai.bundle run RUN_ID --config_file ... --id value ...`` (values as Python literals)."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        _config_file_argument(config_files),
    ]
    for config_id, value in ids.items():
        command += [f"--{config_id}", value if isinstance(value, str) else repr(value)]
    return command


def _data_ids(dataset_dir: str, datalist: str | None) -> dict[str, str]:
    return {"dataset_dir": dataset_dir} | ({"datalist": datalist} if datalist else {})


def training_command(
    model: StudyModel,
    schedule: Schedule,
    dataset_dir: str,
    datalist: str | None,
    paths: StudyPaths,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> list[str]:
    """The command line of a model's training stage.

    Args:
        model: the model.
        schedule: the study's schedule.
        dataset_dir: the dataset folder.
        datalist: the JSON datalist of the split, or None for the bundle's seeded split.
        paths: the study's output paths.
        resume: continue from the model's last checkpoint.
        overrides: further bundle config ids, given to every stage (after the model's own ``overrides``).

    Returns:
        the command, one argument per item.
    """
    ids: dict[str, Any] = _data_ids(dataset_dir, datalist) | {
        "epochs": schedule.epochs(model),
        "val_interval": schedule.val_interval(model),
        "ckpt_dir": paths.models_dir,
        "ckpt_name": model.ckpt_name,
        "log_dir": paths.tensorboard_dir(model),
    }
    if model.teacher is not None:
        ids["teacher_ckpt"] = os.path.join(paths.models_dir, f"{model.teacher}.pt")
        ids["soft_label_dir"] = paths.soft_label_dir
    if resume:
        ids["resume"] = True
    return _bundle_command("training", model.training_configs, ids | dict(model.overrides) | dict(overrides or {}))


def evaluation_command(
    model: StudyModel,
    dataset_dir: str,
    datalist: str | None,
    paths: StudyPaths,
    overrides: Mapping[str, Any] | None = None,
) -> list[str]:
    """The command line of a model's evaluation on the test split (writes :meth:`StudyPaths.eval_csv`).

    Args:
        model: the model.
        dataset_dir: the dataset folder.
        datalist: the JSON datalist of the split, or None for the bundle's seeded split.
        paths: the study's output paths.
        overrides: further bundle config ids, given to every stage.

    Returns:
        the command, one argument per item.
    """
    ids = _data_ids(dataset_dir, datalist) | {
        "ckpt_dir": paths.models_dir,
        "ckpt_name": model.ckpt_name,
        "output_dir": paths.eval_dir(model),
        "eval_split": EVAL_SPLIT,
    }
    return _bundle_command("evaluating", model.evaluation_configs, ids | dict(overrides or {}))


@dataclasses.dataclass(frozen=True)
class TrainingState:
    """What a training's last checkpoint says about the run.

    Args:
        epochs_done: epochs completed.
        max_epochs: epochs the run was started for.
        best_metric: best validation key metric so far (-1 before the first validation).
        best_epoch: the epoch of ``best_metric`` (-1 before the first validation).
    """

    epochs_done: int
    max_epochs: int
    best_metric: float
    best_epoch: int


def read_training_state(path: str) -> TrainingState:
    """Read a last checkpoint written by ``scripts.checkpoints.AtomicCheckpointSaver`` (``weights_only=True``).

    Args:
        path: the checkpoint, e.g. ``runs/study_cpu/models/teacher_last.pt``.

    Returns:
        the run's state; the ignite trainer state gives the epochs (``iteration // epoch_length``).

    Raises:
        StudyError: if the file cannot be read safely or holds no trainer state.
    """
    try:
        checkpoint = read_checkpoint(path, "last checkpoint")
    except CheckpointMismatchError as e:
        raise StudyError(str(e)) from e
    trainer = checkpoint.get(TRAINER_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(trainer, Mapping) or not {"iteration", "epoch_length", "max_epochs"} <= set(trainer):
        raise StudyError(
            f"last checkpoint {path} holds no trainer state ({TRAINER_KEY!r} with iteration, epoch_length and "
            "max_epochs): it was not written by the bundle's training; remove it or choose another --output_dir."
        )
    best = checkpoint.get("best_metric", {})
    return TrainingState(
        epochs_done=int(trainer["iteration"]) // int(trainer["epoch_length"]),
        max_epochs=int(trainer["max_epochs"]),
        best_metric=float(best.get("best_metric", -1)),
        best_epoch=int(best.get("best_metric_epoch", -1)),
    )


class StageAction(str, enum.Enum):
    """What the study does with a training stage."""

    START = "start"
    RESUME = "resume"
    SKIP = "skip"


def training_action(model: StudyModel, schedule: Schedule, paths: StudyPaths) -> tuple[StageAction, int]:
    """Whether a model's training is to be started, resumed or skipped, from its last checkpoint.

    Args:
        model: the model.
        schedule: the study's schedule.
        paths: the study's output paths.

    Returns:
        the action and the epochs already done.

    Raises:
        StudyError: if the last checkpoint is unreadable, was started for another number of epochs than the
            schedule's, or says the training is done while its best checkpoint is missing.
    """
    last = paths.last_ckpt(model)
    if not os.path.isfile(last):
        return StageAction.START, 0
    state = read_training_state(last)
    epochs = schedule.epochs(model)
    if state.max_epochs != epochs:
        raise StudyError(
            f"{last} is a training of {state.max_epochs} epochs but schedule {schedule.name!r} trains the "
            f"{model.title.lower()} for {epochs}: use another --output_dir for this schedule, or remove {last}."
        )
    if state.epochs_done < epochs:
        return StageAction.RESUME, state.epochs_done
    if not os.path.isfile(paths.best_ckpt(model)):
        raise StudyError(
            f"{last} says the {model.title.lower()}'s training is done but its best checkpoint "
            f"{paths.best_ckpt(model)} is missing: remove {last} to train it again."
        )
    return StageAction.SKIP, state.epochs_done


def trainer_epoch_seconds(log_text: str) -> dict[int, float]:
    """Wall time of each training epoch (validation included) logged by ignite in a stage's log.

    Args:
        log_text: the log, possibly of several runs of the stage appended.

    Returns:
        ``{epoch: seconds}``; an epoch logged twice keeps its last time.
    """
    return {
        int(epoch): int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        for epoch, hours, minutes, seconds in _EPOCH_COMPLETE.findall(log_text)
    }


def estimate_seconds_left(
    epochs_left: Mapping[str, int],
    epoch_seconds: Mapping[str, Sequence[float]],
    models: Sequence[StudyModel] = MODELS,
) -> float | None:
    """Training time left to the study, from the epoch times measured so far.

    A model whose epochs were not timed yet is estimated from the other models of the same architecture (the
    students share theirs), scaled by the cases in an epoch (:attr:`StudyModel.epoch_length_factor`).

    Args:
        epochs_left: epochs still to train, per model key.
        epoch_seconds: measured epoch times, per model key.
        models: the models the keys name.

    Returns:
        the estimate in seconds, or None while a model with epochs left has no timed model of its architecture.
    """
    by_key = {model.key: model for model in models}
    total = 0.0
    for key, left in epochs_left.items():
        if left <= 0:
            continue
        model = by_key[key]
        per_labelled_epoch = [  # seconds per epoch over the labelled cases only
            t / by_key[other].epoch_length_factor
            for other, ts in epoch_seconds.items()
            if by_key[other].architecture == model.architecture
            for t in ts
        ]
        if epoch_seconds.get(key):
            total += left * statistics.mean(epoch_seconds[key])
        elif per_labelled_epoch:
            total += left * statistics.mean(per_labelled_epoch) * model.epoch_length_factor
        else:
            return None
    return total


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown until timed"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


@dataclasses.dataclass(frozen=True)
class EvaluationTable:
    """The metrics of one model's evaluation CSV, selected by :data:`METRICS`.

    Args:
        path: the CSV.
        means: ``{metric: {region: mean}}`` from the CSV's mean row (None where the mean is NaN).
        cases: ``{case_id: {metric: {region: value}}}`` of the other rows.
    """

    path: str
    means: dict[str, dict[str, float | None]]
    cases: dict[str, dict[str, dict[str, float | None]]]


def _value(text: str | None, path: str, case_id: str, column: str) -> float | None:
    """A CSV cell as a number; None where it is empty or NaN (a metric undefined for the case)."""
    if text == "":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError) as e:  # TypeError: a short row, without this cell
        raise StudyError(f"{path}: case {case_id!r}, column {column!r} holds {text!r}, not a number.") from e
    return None if math.isnan(value) else value


def read_evaluation_csv(path: str, regions: Sequence[str]) -> EvaluationTable:
    """Read an evaluation CSV by its header, keeping the metrics of :data:`METRICS` it holds.

    Args:
        path: the CSV written by the bundle's evaluation.
        regions: the regions to read (``WT``, ``TC``, ``ET``).

    Returns:
        the selected metrics; an optional metric with none of its columns in the header is left out.

    Raises:
        StudyError: if the file is missing or unreadable, lacks a required metric's column, holds only some
            regions of a metric, has no mean row, or a selected cell is not a number.
    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StudyError(f"cannot read evaluation CSV {path}: {e}") from e
    if CASE_ID_COLUMN not in header:
        raise StudyError(f"evaluation CSV {path} has no {CASE_ID_COLUMN!r} column (header: {', '.join(header)}).")
    selected: dict[str, dict[str, str]] = {}
    for name, metric in METRICS.items():
        columns = metric.columns(regions)
        missing = [c for c in columns.values() if c not in header]
        if not missing:
            selected[name] = columns
        elif metric.required or len(missing) < len(columns):
            raise StudyError(
                f"evaluation CSV {path} lacks column(s) {', '.join(missing)} of {name} (header: {', '.join(header)}); "
                "adjust tools.study.METRICS to the evaluation's columns."
            )

    def metrics_of(row: Mapping[str, str]) -> dict[str, dict[str, float | None]]:
        case_id = row[CASE_ID_COLUMN]
        return {
            name: {region: _value(row[column], path, case_id, column) for region, column in columns.items()}
            for name, columns in selected.items()
        }

    means = [row for row in rows if row[CASE_ID_COLUMN] == MEAN_ROW]
    if not means:
        raise StudyError(f"evaluation CSV {path} has no {MEAN_ROW!r} row of means.")
    cases = {row[CASE_ID_COLUMN]: metrics_of(row) for row in rows if row[CASE_ID_COLUMN] != MEAN_ROW}
    return EvaluationTable(path=path, means=metrics_of(means[0]), cases=cases)


class _LogFollower:
    """The complete lines a growing log file gained since the previous call (progress bars' ``\\r`` included)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path)
        self.partial = ""

    def new_lines(self) -> list[str]:
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = self.partial + f.read()
            self.offset = f.tell()
        lines = re.split(r"[\r\n]", text)
        self.partial = lines.pop()
        return lines


def _log_tail(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line for line in re.split(r"[\r\n]", f.read()) if line.strip()]
    return "\n".join(lines[-LOG_TAIL_LINES:])


class _StudyRunner:
    """Runs the stages of one study in order, with progress, resume and failure reports."""

    def __init__(
        self,
        schedule: Schedule,
        dataset_dir: str,
        datalist: str | None,
        paths: StudyPaths,
        overrides: Mapping[str, Any],
        models: Sequence[StudyModel],
    ) -> None:
        self.models = tuple(models)
        self.schedule = schedule
        self.dataset_dir = dataset_dir
        self.datalist = datalist
        self.paths = paths
        self.overrides = overrides
        self.num_stages = 2 * len(self.models) + 1  # trainings, evaluations, report
        self.commands: dict[str, str] = {}
        self.epoch_seconds: dict[str, list[float]] = {}
        self.epochs_left: dict[str, int] = {}

    def _logged_epoch_seconds(self, model: StudyModel) -> list[float]:
        log = self.paths.log(model.key)
        if not os.path.isfile(log):
            return []
        with open(log, errors="replace") as f:
            return list(trainer_epoch_seconds(f.read()).values())

    def _run(self, index: int, stage: str, command: list[str], on_line: Callable[[str], None] | None = None) -> None:
        """Run one stage's subprocess, its output appended to its log; raise a StudyError if it fails."""
        log_path = self.paths.log(stage)
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self.commands[stage] = _shell_join(command)
        with open(log_path, "a") as log:
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            log.write(f"\n# {started} tools.study stage {stage}: {self.commands[stage]}\n")
            log.flush()
            follower = _LogFollower(log_path)
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        try:
            while process.poll() is None:
                time.sleep(POLL_SECONDS)
                for line in follower.new_lines() if on_line else ():
                    on_line(line)
        except BaseException:  # interrupted: stop the stage, whose last checkpoint lets the next run resume
            process.terminate()
            process.wait()
            raise
        for line in follower.new_lines() if on_line else ():
            on_line(line)
        if process.returncode != 0:
            raise StudyError(
                f"stage {index}/{self.num_stages} {stage} failed (exit code {process.returncode}); its log is "
                f"{log_path}, ending with:\n{_log_tail(log_path)}"
            )

    def train(self, index: int, model: StudyModel, action: StageAction, done: int) -> None:
        epochs = self.schedule.epochs(model)
        label = f"stage {index}/{self.num_stages} {model.key}"
        resume = action is StageAction.RESUME
        command = training_command(
            model, self.schedule, self.dataset_dir, self.datalist, self.paths, resume, self.overrides
        )
        if action is StageAction.SKIP:
            self.commands[model.key] = _shell_join(command)
            tqdm.write(f"{label}: done ({done}/{epochs} epochs in {self.paths.last_ckpt(model)}), skipped")
            return
        start = f"resuming after epoch {done}" if resume else "starting"
        tqdm.write(f"{label}: {start} of {epochs} (log: {self.paths.log(model.key)})")
        bar = tqdm(total=epochs, initial=done, desc=label, unit="epoch", dynamic_ncols=True)
        self._show_time_left(bar)

        def on_line(line: str) -> None:
            for epoch, seconds in trainer_epoch_seconds(line).items():
                self.epoch_seconds[model.key].append(seconds)
                self.epochs_left[model.key] = epochs - epoch
                bar.update(epoch - bar.n)
                self._show_time_left(bar)

        try:
            self._run(index, model.key, command, on_line)
        finally:
            bar.close()
        if not os.path.isfile(self.paths.best_ckpt(model)):
            raise StudyError(
                f"{label} ended without writing its best checkpoint {self.paths.best_ckpt(model)} (was it ever "
                f"validated?); see {self.paths.log(model.key)}."
            )
        self.epochs_left[model.key] = 0

    def _show_time_left(self, bar: tqdm) -> None:
        bar.set_postfix_str(f"study training left ~{_format_duration(self._seconds_left())}")

    def _seconds_left(self) -> float | None:
        return estimate_seconds_left(self.epochs_left, self.epoch_seconds, self.models)

    def evaluate(self, index: int, model: StudyModel) -> None:
        label = f"stage {index}/{self.num_stages} evaluate_{model.key}"
        command = evaluation_command(model, self.dataset_dir, self.datalist, self.paths, self.overrides)
        csv_path, ckpt = self.paths.eval_csv(model), self.paths.best_ckpt(model)
        if os.path.isfile(csv_path) and os.path.getmtime(csv_path) >= os.path.getmtime(ckpt):
            tqdm.write(f"{label}: {csv_path} is newer than {ckpt}, reused")
            self.commands[f"evaluate_{model.key}"] = _shell_join(command)
            return
        tqdm.write(
            f"{label}: evaluating {ckpt} on the {EVAL_SPLIT} split (log: {self.paths.log('evaluate_' + model.key)})"
        )
        start = time.perf_counter()
        self._run(index, f"evaluate_{model.key}", command)
        if not os.path.isfile(csv_path):
            raise StudyError(
                f"{label} ended without writing {csv_path}; see {self.paths.log('evaluate_' + model.key)}."
            )
        tqdm.write(f"{label}: done in {_format_duration(time.perf_counter() - start)}")

    def run_stages(self) -> None:
        # every training's state first, so that a checkpoint of another schedule stops the study before any work
        plan = {model.key: training_action(model, self.schedule, self.paths) for model in self.models}
        self.epochs_left = {model.key: self.schedule.epochs(model) - plan[model.key][1] for model in self.models}
        self.epoch_seconds = {model.key: self._logged_epoch_seconds(model) for model in self.models}
        for index, model in enumerate(self.models, start=1):
            self.train(index, model, *plan[model.key])
        for index, model in enumerate(self.models, start=len(self.models) + 1):
            self.evaluate(index, model)


def _bundle_config(dataset_dir: str, datalist: str | None, overrides: Mapping[str, Any]) -> ConfigParser:
    """``configs/train.json`` (both architectures, the validation pipeline, the split) with the study's ids set."""
    parser = ConfigParser()
    parser.read_config(os.path.abspath(REPORT_CONFIG))
    parser["dataset_dir"] = os.path.abspath(dataset_dir)
    parser["datalist"] = os.path.abspath(datalist) if datalist else None
    for config_id, value in overrides.items():
        parser[config_id] = value
    return parser


def _load_network(model: StudyModel, definition: nn.Module, path: str) -> nn.Module:
    """A model's best checkpoint in a fresh copy of its network, on CPU, frozen in eval mode."""
    network = copy.deepcopy(definition).cpu()
    try:
        state = check_network_checkpoint(network, path, what=f"{model.title} checkpoint", config_id=model.architecture)
    except CheckpointMismatchError as e:
        raise StudyError(str(e)) from e
    network.load_state_dict(state)
    return network.eval().requires_grad_(False)


def _measure(
    parser: ConfigParser, paths: StudyPaths, models: Sequence[StudyModel], figure_cases: int, latency_repeats: int
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Size, GFLOPs and CPU latency of every network of the study, and their labels on the figure's slices."""
    modalities = canonical_sequences(parser.get_parsed_content("modalities"))
    image_channel = modalities.index("flair") if "flair" in modalities else 0
    networks = {
        model.key: _load_network(model, parser.get_parsed_content(model.architecture), paths.best_ckpt(model))
        for model in models
    }
    cases = parser.get_parsed_content("data_splits")[EVAL_SPLIT][:figure_cases]
    if not cases:
        raise StudyError(f"the {EVAL_SPLIT} split holds no case.")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    times: dict[str, list[float]] = {key: [] for key in networks}
    slices = []
    with torch.no_grad():
        for index, case in enumerate(tqdm(cases, desc="latency and figure", unit="case")):
            batch = list_data_collate([preprocessing(case)])
            image = batch["image"].as_tensor()  # plain tensor: the timing is the network's, without metadata
            label = batch["label"][0, 0].as_tensor()
            z = int((label > 0).sum(dim=(0, 1)).argmax())
            outside = ~brain_mask(image[0])[0, :, :, z].numpy()
            labels = {"ground truth": label[:, :, z].numpy()}
            for key, network in networks.items():
                if index == 0:  # warm-up, untimed
                    inferer(image, network)
                for _ in range(latency_repeats):
                    start = time.perf_counter()
                    logits = inferer(image, network)
                    times[key].append(time.perf_counter() - start)
                labels[key] = logits[0, :, :, :, z].argmax(dim=0).numpy()
                labels[key][outside] = 0  # as every output of the bundle: background outside the brain
            slices.append(
                {
                    "case_id": case["case_id"],
                    "z": z,
                    "image": image[0, image_channel, :, :, z].numpy(),
                    "labels": labels,
                }
            )
    in_channels = len(modalities)
    sizes = {
        key: {
            "parameters": sum(p.numel() for p in network.parameters()),
            "gflops_per_slice": conv_gflops(network, (1, in_channels, SLICE_SIZE, SLICE_SIZE)),
            "latency_s": statistics.median(times[key]),
        }
        for key, network in networks.items()
    }
    return sizes, slices, modalities[image_channel].upper()


def _figure_models(models: Sequence[StudyModel]) -> list[StudyModel]:
    """The models drawn in ``study.png``: the teacher and the first :data:`FIGURE_STUDENTS` students, in study order."""
    students = [model.key for model in models if not model.is_teacher][:FIGURE_STUDENTS]
    return [model for model in models if model.is_teacher or model.key in students]


def _write_figure(
    path: str,
    slices: list[dict[str, Any]],
    tables: Mapping[str, EvaluationTable],
    image_name: str,
    models: Sequence[StudyModel],
) -> None:
    """One row per case: the image, then the ground truth and the labels of each model of the figure over it."""
    drawn = _figure_models(models)
    columns = ["ground truth"] + [model.key for model in drawn]
    titles = {"ground truth": "ground truth"} | {model.key: model.title for model in drawn}
    fig, axes = plt.subplots(
        len(slices), 1 + len(columns), figsize=(2.3 * (1 + len(columns)), 2.5 * len(slices) + 0.4), layout="constrained"
    )
    axes = np.atleast_2d(axes)
    num_classes = 1
    for row, case in zip(axes, slices):
        image = case["image"].T
        vmin, vmax = np.percentile(image, (1, 99))
        for ax in row:
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            ax.set_axis_off()
        row[0].set_title(f"{case['case_id']}\n{image_name}, z={case['z']}", fontsize=8)
        for ax, column in zip(row[1:], columns):
            labels = case["labels"][column]
            num_classes = max(num_classes, int(labels.max()) + 1)
            ax.imshow(labels.T, cmap=LABEL_CMAP, vmin=0, vmax=3, alpha=0.7, origin="lower", interpolation="nearest")
            title = titles[column]
            dice = tables[column].cases.get(case["case_id"], {}).get("legacy_dice", {}) if column in tables else {}
            if dice.get("WT") is not None:
                title += f"\nDice WT {dice['WT']:.3f}"
            ax.set_title(title, fontsize=8)
    save_label_figure(fig, path, num_classes)


def _write_dice_figure(path: str, results: Mapping[str, Any]) -> None:
    """Grouped bars, written atomically: each model's mean (legacy) Dice per region, its value on each bar."""
    regions, models = results["regions"], results["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.4 * len(models) * len(regions)), 4.0), layout="constrained")
    x = np.arange(len(regions))
    colours = plt.get_cmap("tab10")
    for index, entry in enumerate(models.values()):
        values = [entry["metrics"]["legacy_dice"][region] for region in regions]
        bars = ax.bar(
            x + (index - (len(models) - 1) / 2) * width,
            [0.0 if value is None else value for value in values],
            width,
            label=entry["name"],
            color=colours(index % colours.N),
        )
        ax.bar_label(bars, labels=[_cell(value, 2) for value in values], fontsize=7, padding=2, rotation=90)
    ax.set_xticks(x, regions)
    ax.set_ylim(0.0, 1.18)  # room for the labels above a Dice of 1
    ax.set_ylabel("mean Dice")
    ax.set_title(f"Mean Dice per region on the {results['split_sizes'][EVAL_SPLIT]} test cases", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(loc="outside lower center", ncol=min(3, len(models)), fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def dice_gain(table: EvaluationTable, reference: EvaluationTable, metric: str = "legacy_dice") -> float | None:
    """How much a model's Dice beats a reference model's, from the mean rows of their evaluation CSVs.

    Args:
        table: the model's evaluation.
        reference: the reference's evaluation (the student alone's), read for the same regions.
        metric: ``legacy_dice`` or ``lesion_dice`` (a key of :data:`METRICS`).

    Returns:
        ``100 * (mean over the regions of the model's means - the same of the reference)``, in Dice points; None
        where either lacks the metric or a region's mean is undefined.
    """

    def mean_over_regions(means: Mapping[str, float | None]) -> float | None:
        if not means or any(value is None for value in means.values()):
            return None
        return statistics.mean(means.values())

    model, base = mean_over_regions(table.means.get(metric, {})), mean_over_regions(reference.means.get(metric, {}))
    return None if model is None or base is None else 100.0 * (model - base)


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _gain_cell(model: Mapping[str, Any], name: str) -> str:
    """A student's Dice gain over the student alone, in signed points; ``reference`` for the student alone."""
    if model["key"] == REFERENCE_MODEL:
        return "reference"
    if name not in model.get("dice_gain_vs_student_alone", {}):
        return "—"  # the teacher
    value = model["dice_gain_vs_student_alone"][name]
    return "n/a" if value is None else f"{round(value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _settings(model: Mapping[str, Any]) -> str:
    """One model's line of the settings list: epochs, validation, teacher and config overrides."""
    text = f"- {model['name']} (`{model['key']}`): {model['epochs']} epochs, validated every {model['val_interval']}"
    if model["epoch_factor"] != 1:
        text += f" (the students' schedule x {model['epoch_factor']:g})"
    if model["teacher"]:
        text += f", distilled from `{model['teacher']}`"
    if model["overrides"]:
        text += "; " + ", ".join(f"`{key} {value}`" for key, value in model["overrides"].items())
    return text + "."


def _markdown(results: dict[str, Any]) -> str:
    """``study.md``: context, the table, each model's settings, and how each figure was measured."""
    machine, schedule, regions = results["machine"], results["schedule"], results["regions"]
    metrics = [name for name in METRICS if name in results["metrics_reported"]]
    models = list(results["models"].values())
    gains = [name for name in GAIN_COLUMNS if name in metrics] if REFERENCE_MODEL in results["models"] else []
    header = (
        ["Model", "Epochs", "Parameters", f"GFLOPs / {SLICE_SIZE}x{SLICE_SIZE} slice"]
        + [f"{METRICS[name].title} {region}" for name in metrics for region in regions]
        + [GAIN_COLUMNS[name] for name in gains]
        + ["CPU latency / volume (s)", "Training wall time"]
    )
    split = results["split_sizes"]
    lines = [
        "# Real-data study: the distillation ablation",
        "",
        f"Written {results['date_utc']} on {machine['platform']} ({machine['processor']}, {machine['cpu_count']} "
        f"CPUs, {machine['torch_threads']} torch threads). Schedule `{schedule['name']}`: teacher "
        f"{schedule['teacher_epochs']} epochs (validated every {schedule['teacher_val_interval']}), each student "
        f"{schedule['student_epochs']} epochs (validated every {schedule['student_val_interval']}) unless its "
        f"settings below say otherwise, best validation checkpoint kept. Data `{results['dataset_dir']}`, "
        f"split `{results['datalist'] or 'seeded (split_seed of configs/train.json)'}`: {split['training']} training "
        f"(labelled), {results['unlabelled_cases']} unlabelled, {split['validation']} validation, {split['test']} "
        "test cases. Command:",
        "",
        f"    {results['command']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
    ]
    for model in models:
        cells = (
            [model["name"], str(model["epochs"]), f"{model['parameters']:,}", f"{model['gflops_per_slice']:.2f}"]
            + [_cell(model["metrics"][name][region], METRICS[name].digits) for name in metrics for region in regions]
            + [_gain_cell(model, name) for name in gains]
            + [f"{model['latency_s']:.3f}", _format_duration(model["training"]["wall_time_s"])]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Settings (bundle config ids set on each training's command line):", ""]
    lines += [_settings(model) for model in models]
    if results["left_out_models"]:
        lines += [
            "",
            f"Left out: {', '.join(f'`{key}`' for key in results['left_out_models'])}, as the datalist lists no "
            f'unlabelled cases (no non-empty "{UNLABELLED_SPLIT}" list).',
        ]
    left_out = [METRICS[name].title for name in METRICS if name not in metrics]
    lines += [
        "",
        f"Dice and HD95: means over the {split['test']} test cases of each model's `eval/<model>/metrics_test.csv` "
        "(the bundle's evaluation; its mean row, n/a where every case is undefined)."
        + (f" Not in the evaluation CSVs, so left out: {', '.join(left_out)}." if left_out else ""),
    ]
    if gains:
        lines.append(
            "Δ vs student alone: the student's mean Dice over "
            f"{', '.join(regions)} minus the student alone's, in Dice points (x100)."
        )
    lines += [
        f"Parameters: learnable ones. GFLOPs: 2 x multiply-adds of the convolutions for one {SLICE_SIZE}x{SLICE_SIZE} "
        f"slice. Latency: median wall time of `validate#inferer` over one preprocessed volume, on CPU, over "
        f"{results['latency_cases']} test case(s) x {results['latency_repeats']} run(s) after one warm-up. Training "
        "wall time: sum of the logged epoch times (validation included), on the machine that trained.",
        "",
        f"![FLAIR, ground truth and predictions on real test cases]({os.path.basename(results['figure'])})",
        "",
        f"![Mean Dice per region of each model]({os.path.basename(results['dice_figure'])})",
    ]
    return "\n".join(lines) + "\n"


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _training_summary(model: StudyModel, paths: StudyPaths) -> dict[str, Any]:
    state = read_training_state(paths.last_ckpt(model))
    with open(paths.log(model.key), errors="replace") as f:
        seconds = trainer_epoch_seconds(f.read())
    return {
        "epochs": state.epochs_done,
        "best_val_mean_dice": state.best_metric,
        "best_epoch": state.best_epoch,
        "wall_time_s": sum(seconds.values()) if seconds else None,
    }


def _study_command(
    dataset_dir: str, datalist: str | None, output_dir: str, schedule: Schedule, models: Sequence[StudyModel]
) -> str:
    args = ["python", "-m", "tools.study", "--dataset_dir", dataset_dir]
    args += ["--datalist", datalist] if datalist else []
    args += ["--output_dir", output_dir, "--schedule", schedule.name]
    args += ["--teacher_epochs", str(schedule.teacher_epochs), "--student_epochs", str(schedule.student_epochs)]
    for config_id in (PAIRWISE_WEIGHT_ID, UNLABELLED_RATIO_ID):
        values = [model.overrides[config_id] for model in models if model.overrides.get(config_id)]
        args += [f"--{config_id}", str(values[0])] if values else []
    return shlex.join(args + ["--models", ",".join(model.key for model in models)])


def _write_report(
    runner: _StudyRunner,
    command: str,
    figure_cases: int,
    latency_repeats: int,
    left_out_models: Sequence[str],
) -> dict[str, Any]:
    paths, models = runner.paths, runner.models
    tqdm.write(
        f"stage {runner.num_stages}/{runner.num_stages} report: measuring the networks and drawing "
        f"{paths.report('.png')} and {paths.report('_dice.png')}"
    )
    parser = _bundle_config(runner.dataset_dir, runner.datalist, runner.overrides)
    regions = list(region_names(parser.get_parsed_content("num_classes")))
    tables = {model.key: read_evaluation_csv(paths.eval_csv(model), regions) for model in models}
    sizes, slices, image_name = _measure(parser, paths, models, figure_cases, latency_repeats)
    splits = parser.get_parsed_content("data_splits")
    reported = [name for name in METRICS if all(name in table.means for table in tables.values())]

    def gains(model: StudyModel) -> dict[str, dict[str, float | None]]:
        if model.is_teacher or model.key == REFERENCE_MODEL or REFERENCE_MODEL not in tables:
            return {}
        reference = tables[REFERENCE_MODEL]
        gain = {name: dice_gain(tables[model.key], reference, name) for name in GAIN_COLUMNS if name in reported}
        return {"dice_gain_vs_student_alone": gain}

    results: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "command": command,
        "schedule": dataclasses.asdict(runner.schedule),
        "dataset_dir": runner.dataset_dir,
        "datalist": runner.datalist,
        "overrides": dict(runner.overrides),
        "split_sizes": {split: len(splits[split]) for split in ("training", "validation", "test")},
        "unlabelled_cases": len(datalist_unlabelled_cases(runner.datalist)),
        "left_out_models": list(left_out_models),
        "test_cases": [case["case_id"] for case in splits[EVAL_SPLIT]],
        "regions": regions,
        "metrics_reported": reported,
        "metric_columns": {name: METRICS[name].columns(regions) for name in reported},
        "latency_cases": len(slices),
        "latency_repeats": latency_repeats,
        "figure": paths.report(".png"),
        "figure_models": [model.key for model in _figure_models(models)],
        "figure_cases": [case["case_id"] for case in slices],
        "dice_figure": paths.report("_dice.png"),
        "stages": runner.commands,
        "models": {
            model.key: {
                "key": model.key,
                "name": model.title,
                "architecture": model.architecture,
                "teacher": model.teacher,
                "epochs": runner.schedule.epochs(model),
                "val_interval": runner.schedule.val_interval(model),
                "epoch_factor": model.epoch_factor,
                "overrides": dict(model.overrides),
                "checkpoint": paths.best_ckpt(model),
                "metrics_csv": tables[model.key].path,
                **sizes[model.key],
                "training": _training_summary(model, paths),
                "metrics": {name: tables[model.key].means[name] for name in reported},
                **gains(model),
            }
            for model in models
        },
    }
    markdown = _markdown(results)
    _write_figure(paths.report(".png"), slices, tables, image_name, models)
    _write_dice_figure(paths.report("_dice.png"), results)
    write_text_atomic(paths.report(".json"), json.dumps(results, indent=4) + "\n")
    write_text_atomic(paths.report(".md"), markdown)
    print(markdown)
    for suffix in (".md", ".json", ".png", "_dice.png"):
        print(f"written: {paths.report(suffix)}")
    return results


def run_study(
    dataset_dir: str,
    output_dir: str,
    schedule: Schedule,
    datalist: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    figure_cases: int = FIGURE_CASES,
    latency_repeats: int = 2,
    command: str | None = None,
    models: Sequence[StudyModel] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and report the models of the study; resume what was done.

    Must run from the bundle root (the stages' config files are relative to it).

    Args:
        dataset_dir: the BraTS folder.
        output_dir: the study's folder (checkpoints, logs, evaluations, reports).
        schedule: the training schedule, e.g. ``SCHEDULES["cpu"]``.
        datalist: JSON datalist of the split; None for the bundle's seeded split.
        overrides: further bundle config ids for every stage and the report, e.g. ``{"patch_size": 64}``.
        figure_cases: test cases in the figure (and the latency measurement), the split's first ones.
        latency_repeats: timed runs of each network per figure case, after one warm-up.
        command: the command line recorded in the report; default the equivalent ``python -m tools.study`` one.
        models: the models, in training order (see :func:`select_models`); default every model of :data:`MODELS`
            the datalist allows.

    Returns:
        the results, as written to ``study.json``.

    Raises:
        StudyError: if an input is missing, a model needs unlabelled cases the datalist lacks or a teacher that is
            not in ``models``, a stage fails (the message names it and its log), or ``output_dir`` holds a training
            of another schedule.
        ValueError: if ``figure_cases`` or ``latency_repeats`` is below 1 or ``overrides`` sets an id the study
            or a model sets itself.
    """
    if figure_cases < 1 or latency_repeats < 1:
        raise ValueError(f"figure_cases and latency_repeats must be at least 1, got {figure_cases}, {latency_repeats}.")
    overrides = dict(overrides or {})
    reserved = _STUDY_IDS | {config_id for model in (*MODELS, *(models or ())) for config_id in model.overrides}
    if reserved & set(overrides):
        raise ValueError(f"overrides cannot set {sorted(reserved & set(overrides))}: the study or its models set them.")
    all_models = MODELS if models is None else tuple(models)
    configs = {REPORT_CONFIG} | {f for model in all_models for f in model.training_configs + model.evaluation_configs}
    missing_configs = sorted(f for f in configs if not os.path.isfile(f))
    if missing_configs:
        raise StudyError(f"{', '.join(missing_configs)} not found: run the study from the bundle root.")
    if not os.path.isdir(dataset_dir):
        raise StudyError(f"dataset folder {dataset_dir} not found.")
    if datalist and not os.path.isfile(datalist):
        raise StudyError(f"datalist {datalist} not found.")
    unlabelled = bool(datalist_unlabelled_cases(datalist))
    models = select_models(MODELS, None, unlabelled) if models is None else tuple(models)
    needing = [model.key for model in models if model.needs_unlabelled]
    if needing and not unlabelled:
        raise StudyError(f"{', '.join(needing)} need(s) a datalist with a non-empty {UNLABELLED_SPLIT!r} list.")
    keys = {model.key for model in models}
    orphans = [model.key for model in models if model.teacher is not None and model.teacher not in keys]
    if orphans:
        raise StudyError(f"{', '.join(orphans)} need(s) their teacher in the study's models.")
    left_out = [] if unlabelled else [model.key for model in MODELS if model.needs_unlabelled]
    runner = _StudyRunner(schedule, dataset_dir, datalist, StudyPaths(output_dir), overrides, models)
    runner.run_stages()
    command = command or _study_command(dataset_dir, datalist, output_dir, schedule, models)
    return _write_report(runner, command, figure_cases, latency_repeats, left_out)


def main(
    dataset_dir: str,
    output_dir: str,
    schedule: str = "cpu",
    datalist: str | None = None,
    overrides: dict[str, Any] | None = None,
    figure_cases: int = FIGURE_CASES,
    latency_repeats: int = 2,
    pairwise_weight: float = 1.0,
    unlabelled_ratio: float = 2.0,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    models: str | Sequence[str] | None = None,
) -> None:
    """Command-line entry: run (or resume) the study; see :func:`run_study`. Exits with status 1 on a study error.

    Args:
        dataset_dir: the BraTS folder.
        output_dir: the study's folder.
        schedule: ``cpu`` or ``gpu`` (see :data:`SCHEDULES`).
        datalist: JSON datalist of the split; with a non-empty ``"unlabelled"`` list, the study includes
            ``student_kd_unlabelled`` and ``student_alone_long``.
        overrides: further bundle config ids, e.g. ``--overrides '{"patch_size": 64}'``.
        figure_cases: test cases in the figure and the latency measurement.
        latency_repeats: timed runs of each network per figure case.
        pairwise_weight: ``pairwise_weight`` of ``student_kd_pairwise``.
        unlabelled_ratio: ``unlabelled_ratio`` of ``student_kd_unlabelled`` (``student_alone_long`` trains
            ``1 + unlabelled_ratio`` times the students' epochs).
        teacher_epochs: the teacher's epochs instead of the schedule's.
        student_epochs: each student's epochs instead of the schedule's.
        models: the models to train, comma-separated keys (``--models teacher,student_kd``); default every model
            the datalist allows. A distilled student brings the teacher.
    """
    if schedule not in SCHEDULES:
        sys.exit(f"tools.study: error: unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    command = shlex.join(["python", "-m", "tools.study", *sys.argv[1:]])
    try:
        try:
            plan = SCHEDULES[schedule].with_epochs(teacher_epochs, student_epochs)
        except ValueError as e:
            raise StudyError(str(e)) from e
        chosen = select_models(
            study_models(pairwise_weight, unlabelled_ratio), models, bool(datalist_unlabelled_cases(datalist))
        )
        run_study(dataset_dir, output_dir, plan, datalist, overrides, figure_cases, latency_repeats, command, chosen)
    except StudyError as e:
        sys.exit(f"tools.study: error: {e}")


if __name__ == "__main__":
    fire.Fire(main)
