# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The frozen teacher of the distillation: loading its checkpoint, and its targets for every training batch."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import PrepareBatch, default_prepare_batch
from scripts.checkpoints import CheckpointMismatchError, check_network_checkpoint
from scripts.distillation_loss import DistillationTarget
from scripts.soft_labels import SOFT_LABEL_KEY
from scripts.unlabelled import LABELLED_KEY
from torch import nn

__all__ = ["SOFT_LABEL_SOURCES", "TeacherCheckpointError", "TeacherTargets", "load_teacher"]

SOFT_LABEL_SOURCES = ("online", "cached")


TeacherCheckpointError = CheckpointMismatchError  # the teacher's file is missing, unreadable or does not fit


def load_teacher(teacher: nn.Module, path: str, max_keys: int = 5) -> nn.Module:
    """Load a teacher's weights with ``weights_only=True`` and freeze it (eval mode, no gradients).

    Args:
        teacher: the teacher network, as defined by the config's ``teacher_def`` (``configs/train.json``).
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


class TeacherTargets(PrepareBatch):
    """The trainer's ``prepare_batch``: each training batch's image, with its label and the frozen teacher's targets.

    Given to MONAI's ``SupervisedTrainer`` as ``prepare_batch``, it returns ``(image, DistillationTarget)``, and
    the trainer calls its loss (``scripts.distillation_loss.DistillationLoss``) as ``loss(student_logits, target)``.
    Two sources of targets (``soft_labels``):

    - ``"online"``: the teacher runs under ``torch.no_grad`` (and autocast when ``amp`` is on, on CUDA) on the very
      batch the student is about to see, augmentation included; its logits are the target's ``teacher_logits``.
    - ``"cached"``: the batch already holds the teacher's softened probabilities under ``soft_label_key``
      (``scripts.soft_labels.TeacherSoftLabelsd`` computed them once per case and the random spatial transforms
      moved them with the image); they are moved to the device as the target's ``teacher_probs``. The teacher is
      not run during training.

    The teacher stays in eval mode, so its BatchNorm statistics never change; it is not part of the trainer's
    network, optimizer or checkpoints, and it is never wrapped in ``DistributedDataParallel``. With ``enabled``
    False (``kd_weight`` 0: the student-alone baseline) no target is computed.

    Args:
        teacher: the teacher network with its weights loaded (see :func:`load_teacher`), on the trainer's device.
        soft_labels: ``"online"`` or ``"cached"``, see above.
        enabled: whether the teacher's targets are needed at all.
        amp: whether the teacher runs under autocast (CUDA only; ignored on CPU).
        soft_label_key: the batch key of the cached soft labels.

    Raises:
        ValueError: if ``soft_labels`` is neither ``"online"`` nor ``"cached"``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        soft_labels: str = "cached",
        enabled: bool = True,
        amp: bool = False,
        soft_label_key: str = SOFT_LABEL_KEY,
    ) -> None:
        if soft_labels not in SOFT_LABEL_SOURCES:
            raise ValueError(f"soft_labels must be one of {SOFT_LABEL_SOURCES}, got {soft_labels!r}.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.device_type = next(teacher.parameters()).device.type
        self.amp = amp and self.device_type == "cuda"
        self.soft_labels = soft_labels
        self.enabled = enabled
        self.soft_label_key = soft_label_key

    @torch.no_grad()
    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, DistillationTarget]:
        """The batch's image and its :class:`~scripts.distillation_loss.DistillationTarget`.

        Args:
            batchdata: the collated batch, with ``image`` and ``label`` (and the cached soft labels).
            device: the trainer's device.
            non_blocking: as in ``Tensor.to``.
            kwargs: other ``Tensor.to`` arguments.

        Returns:
            ``(image, DistillationTarget(label, teacher_logits, teacher_probs, labelled))``, the teacher entries
            None when not computed, ``labelled`` the batch's ``labelled`` flags (``scripts.unlabelled``) or None
            when the batch has none.

        Raises:
            KeyError: if ``soft_labels`` is ``"cached"`` and the batch holds no soft labels.
        """
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        labelled = batchdata.get(LABELLED_KEY)
        if labelled is not None:
            labelled = torch.as_tensor(labelled, dtype=torch.bool).to(device=device, non_blocking=non_blocking)
        if not self.enabled:
            return image, DistillationTarget(label, labelled=labelled)
        if self.soft_labels == "cached":
            if self.soft_label_key not in batchdata:
                raise KeyError(
                    f"soft_labels is 'cached' but the training batch has no {self.soft_label_key!r}: the training "
                    "preprocessing must include scripts.soft_labels.TeacherSoftLabelsd before the random transforms."
                )
            probs = batchdata[self.soft_label_key].to(device=device, non_blocking=non_blocking, **kwargs)
            return image, DistillationTarget(label, teacher_probs=probs, labelled=labelled)
        if self.teacher.training:  # nothing may put the teacher back into training mode
            self.teacher.eval()
        autocast = torch.autocast(self.device_type) if self.amp else contextlib.nullcontext()
        with autocast:
            logits = self.teacher(image)
        return image, DistillationTarget(label, teacher_logits=logits, labelled=labelled)
