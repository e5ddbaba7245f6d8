# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Logit knowledge-distillation loss: the teacher's supervised loss blended with a temperature-scaled KL term."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch.nn.modules.loss import _Loss

__all__ = ["DistillationLoss", "DistillationTarget"]

MODES = ("softmax", "sigmoid")


class DistillationTarget(NamedTuple):
    """What the student is trained towards in one batch: the label and the teacher's targets.

    ``scripts.teacher.TeacherTargets`` builds it as the trainer's target, so MONAI's ``SupervisedTrainer`` calls
    :class:`DistillationLoss` as ``loss(student_logits, target)``. At most one of the teacher entries is set.

    Attributes:
        label: the ground truth, as the supervised loss expects it.
        teacher_logits: the teacher's logits of the batch (online distillation), or None.
        teacher_probs: the teacher's cached soft labels of the batch, softened with the loss's temperature, or None.
    """

    label: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    teacher_probs: torch.Tensor | None = None


class DistillationLoss(_Loss):
    """Supervised Dice + cross-entropy blended with a per-pixel knowledge-distillation (KD) term.

    The loss is ``(1 - kd_weight) * supervised(student, label) + kd_weight * T**2 * KD`` (Hinton et al., 2015).
    ``KD`` is the KL divergence from the teacher's to the student's temperature-softened predictions, summed over
    the channel dimension and averaged over pixels and batch, so that its scale depends neither on the number of
    classes being averaged nor on the image size. ``T**2`` keeps the gradient magnitude comparable across
    temperatures: the gradient of the KD part with respect to a student logit is
    ``T * (p_student - p_teacher) / (number of pixels in the batch)``.

    In ``"softmax"`` mode channels are mutually exclusive classes: ``KD = KL(softmax(t / T) || softmax(s / T))``
    along ``dim=1``, and the label holds class indices of shape (N, 1, *spatial). In ``"sigmoid"`` mode channels are
    overlapping regions (e.g. WT, TC, ET): ``KD`` is the sum over channels of the Bernoulli KL between
    ``sigmoid(t / T)`` and ``sigmoid(s / T)``, and the label holds binary region channels of the logits' shape.

    Args:
        temperature: softening temperature ``T``, finite and > 0.
        kd_weight: weight of the KD term in [0, 1]; 0 gives exactly the supervised loss, 1 the KD term alone.
        mode: ``"softmax"`` (exclusive classes) or ``"sigmoid"`` (overlapping regions).
        supervised: the supervised loss, called as ``supervised(student_logits, label)``. Defaults to the loss the
            teacher is trained with: ``DiceCELoss(to_onehot_y=True, softmax=True)`` in softmax mode,
            ``DiceCELoss(sigmoid=True)`` in sigmoid mode.

    Raises:
        ValueError: if ``temperature``, ``kd_weight`` or ``mode`` is out of range.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        kd_weight: float = 0.5,
        mode: str = "softmax",
        supervised: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}.")
        if not 0 <= kd_weight <= 1:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)
        self.mode = mode
        if supervised is None:
            supervised = DiceCELoss(to_onehot_y=True, softmax=True) if mode == "softmax" else DiceCELoss(sigmoid=True)
        self.supervised = supervised

    def kd_term(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ``T**2``-scaled KD term alone, as used in :meth:`forward` (also useful for logging).

        The computation runs in at least float32, whatever the precision of the inputs (e.g. a float16 teacher run
        under autocast); the teacher logits are detached.

        Args:
            student_logits: student logits of shape (N, C, *spatial).
            teacher_logits: teacher logits of the same shape, or None when ``teacher_probs`` is given.
            mask: optional (N, 1, *spatial) bool or float weights restricting the average to e.g. brain pixels:
                ``sum(kl * mask) / max(sum(mask), 1)``, where ``kl`` is the per-pixel KL summed over channels.
            teacher_probs: instead of ``teacher_logits``, the teacher's probabilities already softened with this
                loss's temperature (``scripts.soft_labels``: softmax or sigmoid of ``logits / T``), e.g. cached soft
                labels. A pixel whose probabilities are all 0 (brought in by padding during augmentation) adds 0.

        Returns:
            scalar tensor ``T**2 * KD``.

        Raises:
            ValueError: if not exactly one of ``teacher_logits`` and ``teacher_probs`` is given, if it differs in
                shape from the student logits, or if the mask is not (N, 1, *spatial).
        """
        if (teacher_logits is None) == (teacher_probs is None):
            raise ValueError("kd_term needs exactly one of teacher_logits and teacher_probs.")
        teacher_target = teacher_logits if teacher_logits is not None else teacher_probs
        name = "teacher_logits" if teacher_logits is not None else "teacher_probs"
        if teacher_target.shape != student_logits.shape:
            raise ValueError(
                f"student_logits and {name} must have the same shape, got {tuple(student_logits.shape)} "
                f"and {tuple(teacher_target.shape)}."
            )
        dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_target.dtype), torch.float32)
        student = student_logits.to(dtype) / self.temperature
        if teacher_probs is not None:
            kl = self._kl_from_probs(student, teacher_probs.detach().to(dtype))
        elif self.mode == "softmax":
            teacher = teacher_logits.detach().to(dtype) / self.temperature
            log_p_student = F.log_softmax(student, dim=1)
            log_p_teacher = F.log_softmax(teacher, dim=1)
            kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1, keepdim=True)
        else:
            teacher = teacher_logits.detach().to(dtype) / self.temperature
            # Bernoulli KL per channel; log(1 - sigmoid(x)) = logsigmoid(-x)
            log_p_student, log_q_student = F.logsigmoid(student), F.logsigmoid(-student)
            log_p_teacher, log_q_teacher = F.logsigmoid(teacher), F.logsigmoid(-teacher)
            kl = log_p_teacher.exp() * (log_p_teacher - log_p_student) + log_q_teacher.exp() * (
                log_q_teacher - log_q_student
            )
            kl = kl.sum(dim=1, keepdim=True)
        if mask is None:
            kd = kl.mean()
        else:
            if mask.shape != kl.shape:
                raise ValueError(f"mask must have shape {tuple(kl.shape)} (N, 1, *spatial), got {tuple(mask.shape)}.")
            weights = mask.to(dtype)
            kd = (kl * weights).sum() / weights.sum().clamp(min=1)
        return self.temperature**2 * kd

    def _kl_from_probs(self, student: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Per-pixel KL (N, 1, *spatial) from softened teacher probabilities to the temperature-scaled student."""
        if self.mode == "softmax":
            kl = torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * F.log_softmax(student, dim=1)
        else:
            q_teacher = 1 - teacher_probs
            kl = (
                torch.xlogy(teacher_probs, teacher_probs)
                + torch.xlogy(q_teacher, q_teacher)
                - teacher_probs * F.logsigmoid(student)
                - q_teacher * F.logsigmoid(-student)
            )
        return kl.sum(dim=1, keepdim=True)

    def forward(
        self,
        student_logits: torch.Tensor,
        label: torch.Tensor | DistillationTarget,
        teacher_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blend the supervised loss of the student with the KD term.

        Args:
            student_logits: student logits of shape (N, C, *spatial).
            label: (N, 1, *spatial) class indices (softmax mode) or (N, C, *spatial) binary regions (sigmoid mode),
                as expected by ``supervised``; or a :class:`DistillationTarget` holding it with the teacher's
                targets (how the trainer calls the loss), in which case ``teacher_logits`` and ``teacher_probs``
                are taken from it.
            teacher_logits: teacher logits of the student's shape, any floating dtype; may be None when
                ``kd_weight`` is 0.
            mask: optional (N, 1, *spatial) mask restricting the KD term, see :meth:`kd_term`; the supervised term
                is unaffected.
            teacher_probs: cached soft labels used instead of ``teacher_logits``, see :meth:`kd_term`.

        Returns:
            scalar loss ``(1 - kd_weight) * supervised + kd_weight * kd_term``; a term whose weight is 0 is not
            computed, so ``kd_weight`` 0 and 1 give exactly the supervised loss and the KD term.

        Raises:
            ValueError: if both ``teacher_logits`` and ``teacher_probs`` are None while ``kd_weight`` > 0, or as
                raised by :meth:`kd_term`.
        """
        if isinstance(label, DistillationTarget):
            label, teacher_logits, teacher_probs = label
        if self.kd_weight == 0:
            return self.supervised(student_logits, label)
        if teacher_logits is None and teacher_probs is None:
            raise ValueError(
                f"teacher_logits or teacher_probs is required when kd_weight > 0, got kd_weight={self.kd_weight}."
            )
        kd = self.kd_term(student_logits, teacher_logits, mask, teacher_probs)
        if self.kd_weight == 1:
            return kd
        return (1 - self.kd_weight) * self.supervised(student_logits, label) + self.kd_weight * kd
