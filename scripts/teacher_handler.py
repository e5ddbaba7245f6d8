# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Ignite handler running a frozen teacher network beside the student inside MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

import contextlib
import os

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from scripts.checkpoints import CheckpointMismatchError, check_network_checkpoint
from scripts.soft_labels import SOFT_LABEL_KEY

__all__ = [
    "SOFT_LABEL_SOURCES",
    "TEACHER_PRED",
    "TEACHER_PROBS",
    "TeacherCheckpointError",
    "load_teacher",
    "FrozenTeacherHandler",
]

TEACHER_PRED = "teacher_pred"  # key of the teacher's logits in the trainer's iteration output (online mode)
TEACHER_PROBS = "teacher_probs"  # key of the cached soft labels in the iteration output (cached mode)
SOFT_LABEL_SOURCES = ("online", "cached")


TeacherCheckpointError = CheckpointMismatchError  # the teacher's file is missing, unreadable or does not fit


def load_teacher(teacher: nn.Module, path: str, max_keys: int = 5) -> nn.Module:
    """Load a teacher's weights with ``weights_only=True`` and freeze it (eval mode, no gradients).

    Args:
        teacher: the teacher network, as defined by the config's ``teacher_def`` (``configs/teacher.json``'s
            ``network_def``).
        path: checkpoint file written by the teacher's training (``configs/train.json`` with
            ``configs/teacher.json`` merged on it: ``models/teacher.pt``): a state dict, or a
            checkpoint whose ``model`` entry is one.
        max_keys: how many mismatching keys an error message lists.

    Returns:
        the frozen ``teacher``.

    Raises:
        TeacherCheckpointError: if the file is missing, cannot be read safely, or its keys or shapes differ from
            the teacher's (the message names the file and the first mismatching keys).
    """
    if not os.path.isfile(path):
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} not found: train the teacher first (python -m monai.bundle run training "
            "--config_file \"['configs/train.json','configs/teacher.json']\") or point --teacher_ckpt to its "
            "checkpoint."
        )
    state = check_network_checkpoint(
        teacher, path, what="teacher checkpoint", max_keys=max_keys, config_id="teacher_def"
    )
    teacher.load_state_dict(state)
    return teacher.eval().requires_grad_(False)


class FrozenTeacherHandler:
    """Hand the frozen teacher's targets for every training batch to the distillation loss.

    ``attach`` makes the trainer call its loss as ``loss(student_logits, label, teacher_logits, teacher_probs=...)``
    (see ``scripts.distillation_loss.DistillationLoss``). Two sources of targets (``soft_labels``):

    - ``"online"``: after the student's forward pass, the teacher runs under ``torch.no_grad`` (and autocast when
      ``amp`` is on, on CUDA) on the very batch the student saw, augmentation included, and its logits are stored
      in the iteration output under ``teacher_pred``.
    - ``"cached"``: the batch already holds the teacher's softened probabilities under ``soft_label_key``
      (``scripts.soft_labels.TeacherSoftLabelsd`` computed them once per case and the random spatial transforms
      moved them with the image); they are moved to the student's device and stored under ``teacher_probs``. The
      teacher is not run during training.

    The teacher stays in eval mode, so its BatchNorm statistics never change; it is not part of the trainer's
    network, optimizer or checkpoints, and it is never wrapped in ``DistributedDataParallel``. When the loss's
    ``kd_weight`` is 0 (the student-alone baseline) no target is computed.

    Args:
        teacher: the teacher network with its weights loaded (see :func:`load_teacher`), on the trainer's device.
        amp: whether the teacher runs under autocast (CUDA only; ignored on CPU).
        soft_labels: ``"online"`` or ``"cached"``, see above.
        soft_label_key: the batch key of the cached soft labels.

    Raises:
        ValueError: if ``soft_labels`` is neither ``"online"`` nor ``"cached"``.
    """

    def __init__(
        self, teacher: nn.Module, amp: bool = False, soft_labels: str = "online", soft_label_key: str = SOFT_LABEL_KEY
    ) -> None:
        if soft_labels not in SOFT_LABEL_SOURCES:
            raise ValueError(f"soft_labels must be one of {SOFT_LABEL_SOURCES}, got {soft_labels!r}.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.device_type = next(teacher.parameters()).device.type
        self.amp = amp and self.device_type == "cuda"
        self.soft_labels = soft_labels
        self.soft_label_key = soft_label_key

    def attach(self, engine: SupervisedTrainer) -> None:
        """Provide the teacher's targets after each student forward pass, and make the loss receive them.

        Args:
            engine: the student's ``SupervisedTrainer``; its ``loss_function`` takes
                ``(student_logits, label, teacher_logits, teacher_probs=...)``.
        """
        # the trainer sets its loss after attaching handlers, so the loss is wrapped when the run starts
        engine.add_event_handler(Events.STARTED, self._wrap_loss)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    @staticmethod
    def _wrap_loss(engine: SupervisedTrainer) -> None:
        if not isinstance(engine.loss_function, _LossWithTeacher):
            engine.loss_function = _LossWithTeacher(engine.loss_function, engine)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        output[TEACHER_PRED] = output[TEACHER_PROBS] = None
        if getattr(engine.loss_function.loss, "kd_weight", 1.0) == 0:
            return
        if self.soft_labels == "cached":
            if self.soft_label_key not in engine.state.batch:
                raise KeyError(
                    f"soft_labels is 'cached' but the training batch has no {self.soft_label_key!r}: the training "
                    "preprocessing must include scripts.soft_labels.TeacherSoftLabelsd before the random transforms."
                )
            probs = engine.state.batch[self.soft_label_key]
            output[TEACHER_PROBS] = probs.to(output[CommonKeys.PRED].device, non_blocking=True)
            return
        if self.teacher.training:  # nothing may put the teacher back into training mode
            self.teacher.eval()
        autocast = torch.autocast(self.device_type) if self.amp else contextlib.nullcontext()
        with autocast:
            output[TEACHER_PRED] = self.teacher(output[CommonKeys.IMAGE])


class _LossWithTeacher(nn.Module):
    """The trainer-facing ``loss(pred, label)`` calling ``loss(pred, label, teacher_logits, teacher_probs=...)``."""

    def __init__(self, loss: nn.Module, engine: Engine) -> None:
        super().__init__()
        self.loss = loss
        self.engine = engine

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        output = self.engine.state.output
        return self.loss(pred, label, output[TEACHER_PRED], teacher_probs=output[TEACHER_PROBS])
