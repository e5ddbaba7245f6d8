# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""A training says where its checkpoints go, warns before replacing one, and names the best one when it ends;
an inference before any training says how to get a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

from scripts.checkpoint_report import CheckpointReport, TrainedNetworkLoader
from scripts.checkpoints import CheckpointMismatchError
from scripts.separable_unet import SeparableUNet

LOGGER = "CheckpointReport"


@pytest.fixture
def report_log(caplog) -> pytest.LogCaptureFixture:
    """The report's records (its logger enabled again: a bundle run in this process may have disabled it)."""
    logging.getLogger(LOGGER).disabled = False
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


def train(tmp_path: Path, epochs: int = 2, validated: bool = True, resume: bool = False) -> CheckpointReport:
    """Run a do-nothing trainer with the report; its validator's best metric is 0.5 + epoch / 10 at each epoch."""
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.key_metric_name, evaluator.state.best_metric, evaluator.state.best_metric_epoch = "val_dice", -1, -1
    trainer = Engine(lambda engine, batch: None)
    report = CheckpointReport(str(tmp_path / "model.pt"), str(tmp_path / "model_last.pt"), evaluator, resume=resume)
    report.attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        if validated:
            evaluator.state.best_metric, evaluator.state.best_metric_epoch = (
                0.5 + engine.state.epoch / 10,
                engine.state.epoch,
            )

    trainer.run([0], max_epochs=epochs)
    return report


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_training_start_names_both_checkpoints_and_warns_about_each_existing_one(tmp_path, report_log):
    (tmp_path / "model.pt").write_bytes(b"the demo's student")
    train(tmp_path)
    [where] = [m for m in messages(report_log, logging.INFO) if m.startswith("this run writes")]
    assert str(tmp_path / "model.pt") in where and str(tmp_path / "model_last.pt") in where
    [warning] = messages(report_log, logging.WARNING)  # model_last.pt did not exist: one warning
    assert warning.startswith(f"{tmp_path / 'model.pt'} exists (modified ") and "replaces it" in warning


def test_a_run_continued_in_the_same_process_does_not_warn_about_its_own_checkpoints(tmp_path, report_log):
    trainer = Engine(lambda engine, batch: None)
    evaluator = Engine(lambda engine, batch: None)
    CheckpointReport(str(tmp_path / "model.pt"), str(tmp_path / "model_last.pt"), evaluator).attach(trainer)
    trainer.run([0], max_epochs=1)
    (tmp_path / "model_last.pt").write_bytes(b"written by epoch 1 of this run")
    trainer.state.max_epochs = 2
    trainer.run()  # ignite continues the same run for one more epoch, as the benchmark's training job does
    assert not [w for w in messages(report_log, logging.WARNING) if " exists (modified " in w]
    assert len([m for m in messages(report_log, logging.INFO) if m.startswith("this run writes")]) == 1


def test_resumed_training_says_it_continues_and_warns_about_nothing(tmp_path, report_log):
    for name in ("model.pt", "model_last.pt"):
        (tmp_path / name).write_bytes(b"a run's checkpoint")
    train(tmp_path, resume=True)
    assert messages(report_log, logging.WARNING) == []
    assert messages(report_log, logging.INFO)[0].startswith(f"resuming from {tmp_path / 'model_last.pt'} after epoch")


def test_training_end_names_the_best_metric_its_epoch_and_both_checkpoints(tmp_path, report_log):
    train(tmp_path, epochs=3)
    assert messages(report_log, logging.INFO)[-1] == (
        f"training done after epoch 3 of 3: best val_dice 0.8000 at epoch 3, network saved in {tmp_path / 'model.pt'}; "
        f"the last epoch's state in {tmp_path / 'model_last.pt'}."
    )


def test_training_end_without_validation_says_no_best_checkpoint_was_written(tmp_path, report_log):
    train(tmp_path, validated=False)
    [warning] = messages(report_log, logging.WARNING)
    assert (
        "without any validation" in warning and f"no best checkpoint was written to {tmp_path / 'model.pt'}" in warning
    )


def test_inference_before_any_training_says_how_to_train_or_which_id_to_set(tmp_path):
    missing = tmp_path / "models" / "model.pt"
    loader = TrainedNetworkLoader(load_path=str(missing), load_dict={"model": SeparableUNet(3, 4)})
    with pytest.raises(CheckpointMismatchError) as error:
        loader(Engine(lambda engine, batch: None))
    message = str(error.value)
    assert message.startswith(f"no trained network at {missing}: train one first")
    assert "python -m monai.bundle run training --config_file configs/train.json" in message
    assert message.endswith("or pass --ckpt_path <checkpoint file>.")
