# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Where a run's checkpoints are: written (and replaced) by a training, and missing before an inference.

:class:`CheckpointReport` is a trainer handler of ``configs/train.json`` (so also of the teacher's and the
distillation's trainings): when training starts it logs where the run writes its checkpoints and warns about every
existing file it will replace (a demo's ``models/model.pt`` before a real-data training, say), unless the run
resumes from it; when training completes it logs the best validation metric, its epoch and both checkpoint paths.
:class:`TrainedNetworkLoader` is the checkpoint loader of ``configs/inference.json`` and ``configs/evaluate.json``:
before any training, it says how to get the checkpoint they need.
"""

from __future__ import annotations

import datetime
import logging
import os

from ignite.engine import Engine, Events
from scripts.checkpoints import CheckpointMismatchError, NetworkCheckpointLoader

__all__ = ["CheckpointReport", "TrainedNetworkLoader", "missing_checkpoint_message"]

# the README's shortest training of the deployed network: the student alone, supervised
TRAIN_COMMAND = "python -m monai.bundle run training --config_file configs/train.json --dataset_dir <your BraTS folder>"


def _modified(path: str) -> str:
    return datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y-%m-%d %H:%M")


class CheckpointReport:
    """Trainer handler logging where the run's checkpoints go, what they replace, and which one is best at the end.

    When the trainer starts (after ``scripts.checkpoints.ResumeCheckpointLoader`` has restored a resumed run) it logs
    the two files the run writes: ``best_ckpt`` (the network at its best validation, written by the validation's
    key-metric saver) and ``last_ckpt`` (the run's state after every epoch, for ``--resume True``). Without
    ``resume``, a warning names each of them that already exists, with its modification time: the run replaces it
    (the best at the first validation, the last after the first epoch); a run continued in the same process
    (``run()`` again after ``max_epochs`` was raised) writes its own files and is not reported again. With
    ``resume``, it says which epoch the run continues from and which best it has to beat. When the trainer completes
    it logs the best value of the evaluator's key metric, its epoch and both paths (or that no validation ran, so no
    best checkpoint was written).

    Args:
        best_ckpt: the best network's file, e.g. ``models/model.pt``.
        last_ckpt: the last epoch's state, e.g. ``models/model_last.pt``.
        evaluator: the validation evaluator, whose ``best_metric`` and ``best_metric_epoch`` the saver follows.
        resume: whether the run resumes from ``last_ckpt`` (the config's ``resume``).
        name: logger name.
    """

    def __init__(
        self, best_ckpt: str, last_ckpt: str, evaluator: Engine, resume: bool = False, name: str = "CheckpointReport"
    ) -> None:
        self.best_ckpt = os.fspath(best_ckpt)
        self.last_ckpt = os.fspath(last_ckpt)
        self.evaluator = evaluator
        self.resume = bool(resume)
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on the trainer.

        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    @property
    def _metric(self) -> str:
        return str(getattr(self.evaluator.state, "key_metric_name", None) or "validation metric")

    def _best(self) -> tuple[float, int] | None:
        """(best metric, its epoch), None before any validation."""
        epoch = getattr(self.evaluator.state, "best_metric_epoch", -1)
        if epoch is None or int(epoch) < 0:
            return None
        return float(self.evaluator.state.best_metric), int(epoch)

    def started(self, engine: Engine) -> None:
        """Log the run's checkpoint files; warn about those it replaces (see the class description).

        Args:
            engine: the trainer.
        """
        if not self.resume and engine.state.epoch > 0:
            return  # the same run continued in this process (ignite's run() after max_epochs was raised): its files
        if self.resume:
            best = self._best()
            to_beat = f"{self._metric} {best[0]:.4f} of epoch {best[1]}" if best else "no validation yet"
            self.logger.info(
                f"resuming from {self.last_ckpt} after epoch {engine.state.epoch} of {engine.state.max_epochs}: "
                f"the run goes on replacing it after every epoch, and replaces {self.best_ckpt} only when a "
                f"validation beats the best so far ({to_beat})."
            )
            return
        self.logger.info(
            f"this run writes its checkpoints to {self.best_ckpt} (the network at its best {self._metric}) and "
            f"{self.last_ckpt} (its state after every epoch, for --resume True)."
        )
        for path, when, advice in (
            (self.best_ckpt, "at its first validation", "pass another --ckpt_name or --ckpt_dir"),
            (
                self.last_ckpt,
                "after its first epoch",
                "to continue the run that wrote it, rerun with --resume True instead",
            ),
        ):
            if os.path.isfile(path):
                self.logger.warning(
                    f"{path} exists (modified {_modified(path)}): this run replaces it {when}; to keep it, stop the "
                    f"run now and move it away, or {advice}."
                )

    def completed(self, engine: Engine) -> None:
        """Log the best validation metric, its epoch and the checkpoint paths.

        Args:
            engine: the trainer.
        """
        best = self._best()
        done = f"training done after epoch {engine.state.epoch} of {engine.state.max_epochs}"
        if best is None:
            self.logger.warning(
                f"{done}, without any validation (val_interval above the epochs?): no best checkpoint was written "
                f"to {self.best_ckpt}; the last epoch's state is in {self.last_ckpt}."
            )
            return
        self.logger.info(
            f"{done}: best {self._metric} {best[0]:.4f} at epoch {best[1]}, network saved in {self.best_ckpt}; the "
            f"last epoch's state in {self.last_ckpt}."
        )


def missing_checkpoint_message(path: str) -> str:
    """What to do when the checkpoint an inference or evaluation needs does not exist.

    Args:
        path: the missing checkpoint (the config's ``ckpt_path``).

    Returns:
        the message.
    """
    return (
        f"no trained network at {path}: train one first ({TRAIN_COMMAND} writes models/model.pt; the README's "
        '"Step by step" trains the teacher and the distilled student), put a trained checkpoint there, or pass '
        "--ckpt_path <checkpoint file>."
    )


class TrainedNetworkLoader(NetworkCheckpointLoader):
    """``scripts.checkpoints.NetworkCheckpointLoader`` that says how to get the checkpoint when there is none yet.

    Args:
        load_path, load_dict, map_location, name: as ``NetworkCheckpointLoader``'s.
    """

    def __call__(self, engine: Engine) -> None:
        """Load the checkpoint into the network when ``engine`` starts.

        Args:
            engine: the evaluator.

        Raises:
            CheckpointMismatchError: if the checkpoint does not exist (:func:`missing_checkpoint_message`), or as
                ``NetworkCheckpointLoader``.
        """
        if not os.path.isfile(self.load_path):
            raise CheckpointMismatchError(missing_checkpoint_message(self.load_path))
        super().__call__(engine)
