# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Validation shows a progress bar over its cases, on the main process only."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointSaver
from torch import nn

from scripts.progress_bars import EvaluationProgressBar

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TRAIN = [str(CONFIG_DIR / "train.json")]
DISTILL = [*TRAIN, str(CONFIG_DIR / "distill.json")]


def test_a_validation_during_training_shows_its_cases_not_a_count_of_validations():
    screen = io.StringIO()
    cases = [{"image": torch.zeros(1, 1, 4, 4), "label": torch.zeros(1, 1, 4, 4)} for _ in range(3)]
    bar = EvaluationProgressBar(desc="validation", file=screen, mininterval=0)  # every update drawn
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=cases, network=nn.Identity(), val_handlers=[bar])
    evaluator.run(global_epoch=5)  # what ValidationHandler does after the trainer's 5th epoch
    shown = screen.getvalue()
    assert "validation: [3/3]" in shown
    assert "[5/5]" not in shown  # ignite's epoch count would read as the last of 5 validations
    assert bar.pbar is None  # closed when the validation ended


def validation_bar(main_process: bool) -> EvaluationProgressBar | None:
    """The progress bar among the validation's log handlers, as one process of a run instantiates it."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser["main_process"] = main_process
    handlers = "validate#log_handlers"
    [index] = [i for i, h in enumerate(parser[handlers]) if h["_target_"].endswith("EvaluationProgressBar")]
    return parser.get_parsed_content(f"{handlers}#{index}")


def test_validation_bars_are_shown_by_the_main_process_alone():
    assert validation_bar(main_process=True).tqdm_kwargs["desc"] == "validation"
    # another process of a torchrun run (configs/multi_gpu_train.json: main_process is rank 0 alone)
    assert validation_bar(main_process=False) is None


def test_the_teacher_validation_logs_as_the_students_and_saves_no_checkpoint():
    parser = ConfigParser()
    parser.read_config(DISTILL)
    assert parser["validate_teacher#evaluator#val_handlers"] == "@validate#log_handlers"
    log_handlers = parser.get_parsed_content("validate#log_handlers")
    assert not any(isinstance(handler, CheckpointSaver) for handler in log_handlers)  # never saves the teacher
    student_handlers = parser.get_parsed_content("validate#handlers")
    assert student_handlers[: len(log_handlers)] == log_handlers
    assert isinstance(student_handlers[-1], CheckpointSaver)  # the student's best checkpoint, model.pt
