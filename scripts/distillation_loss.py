# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Knowledge-distillation loss: the supervised loss blended with a temperature-scaled KL term and a pairwise term."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from scripts.soft_labels import soft_labels_from_logits
from torch.nn.modules.loss import _Loss

__all__ = ["DistillationLoss", "DistillationTarget", "pairwise_affinity_loss"]

MODES = ("softmax", "sigmoid")


class DistillationTarget(NamedTuple):
    """What the student is trained towards in one batch: the label and the teacher's targets.

    ``scripts.teacher.TeacherTargets`` builds it as the trainer's target, so MONAI's ``SupervisedTrainer`` calls
    :class:`DistillationLoss` as ``loss(student_logits, target)``. At most one of the teacher entries is set.

    Attributes:
        label: the ground truth, as the supervised loss expects it.
        teacher_logits: the teacher's logits of the batch (online distillation), or None.
        teacher_probs: the teacher's cached soft labels of the batch, softened with the loss's temperature, or None.
        labelled: (N,) bool, False for the samples of unlabelled cases, whose ``label`` is no ground truth
            (``scripts.unlabelled``); None when every sample is labelled.
    """

    label: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    teacher_probs: torch.Tensor | None = None
    labelled: torch.Tensor | None = None


def pairwise_affinity_loss(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, pool_size: int = 8, mode: str = "softmax"
) -> torch.Tensor:
    """Pairwise (affinity) distillation: how alike every two regions of a patch are, student against teacher.

    The structured term of Liu et al., "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019),
    on the networks' temperature-softened predictions rather than on hidden features, so that cached soft labels
    serve it. The patch is average-pooled into nodes of ``pool_size`` pixels a side; each node's feature is its mean
    class distribution (``softmax``), or each region's mean probability and its complement (``sigmoid``); the
    affinity of two nodes is the cosine similarity of their features. The term is the mean squared difference
    between the student's and the teacher's affinities over all pairs of valid nodes, per sample and then averaged.
    A node is valid when the teacher has a target on at least half of its pixels (cached soft labels are all 0
    where augmentation padded the patch). It is 0 when the student's probabilities equal the teacher's.

    Args:
        student_probs: (N, C, *spatial) softened student probabilities (2D or 3D spatial).
        teacher_probs: the teacher's, of the same shape.
        pool_size: side of a node in pixels.
        mode: ``softmax`` or ``sigmoid``, how the channels are read (see above).

    Returns:
        scalar tensor.

    Raises:
        ValueError: if the shapes differ, the spatial dimensions are not 2 or 3, or ``pool_size`` is below 1.
    """
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"student and teacher probabilities must have the same shape, got {tuple(student_probs.shape)} and "
            f"{tuple(teacher_probs.shape)}."
        )
    spatial_dims = student_probs.ndim - 2
    if spatial_dims not in (2, 3) or pool_size < 1:
        raise ValueError(f"need 2D or 3D (N, C, *spatial) inputs and pool_size >= 1, got {tuple(student_probs.shape)}.")
    pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
    has_target = (teacher_probs.sum(dim=1, keepdim=True) > 0).to(teacher_probs.dtype)
    valid = pool(has_target, pool_size, ceil_mode=True).flatten(2)[:, 0] >= 0.5  # (N, nodes)

    def affinity(probs: torch.Tensor) -> torch.Tensor:
        if mode == "sigmoid":
            probs = torch.cat([probs, 1 - probs], dim=1)
        nodes = F.normalize(pool(probs, pool_size, ceil_mode=True).flatten(2), dim=1, eps=1e-6)  # (N, C, nodes)
        return nodes.transpose(1, 2) @ nodes  # (N, nodes, nodes)

    pairs = (valid[:, :, None] & valid[:, None, :]).to(student_probs.dtype)
    squared = (affinity(student_probs) - affinity(teacher_probs)) ** 2
    per_sample = (squared * pairs).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1)
    return per_sample.mean()


class DistillationLoss(_Loss):
    """Supervised Dice + cross-entropy blended with a per-pixel knowledge-distillation (KD) term and a pairwise term.

    The loss is ``(1 - kd_weight) * supervised(student, label) + kd_weight * T**2 * KD`` (Hinton et al., 2015),
    plus ``pairwise_weight * pairwise`` when ``pairwise_weight`` > 0 (:func:`pairwise_affinity_loss` between the
    student's and the teacher's probabilities softened with ``T``). The supervised term is computed on the labelled
    samples of the batch only (``DistillationTarget.labelled``): samples of unlabelled cases learn from the teacher
    alone, and a batch without labelled sample has no supervised term.
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
        pairwise_weight: weight of the pairwise term, >= 0; 0 leaves it out.
        pairwise_pool: node size of the pairwise term in pixels (see :func:`pairwise_affinity_loss`).

    Raises:
        ValueError: if ``temperature``, ``kd_weight``, ``mode``, ``pairwise_weight`` or ``pairwise_pool`` is out of
            range.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        kd_weight: float = 0.5,
        mode: str = "softmax",
        supervised: torch.nn.Module | None = None,
        pairwise_weight: float = 0.0,
        pairwise_pool: int = 8,
    ) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}.")
        if not 0 <= kd_weight <= 1:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not (math.isfinite(pairwise_weight) and pairwise_weight >= 0):
            raise ValueError(f"pairwise_weight must be finite and >= 0, got {pairwise_weight}.")
        if pairwise_pool < 1:
            raise ValueError(f"pairwise_pool must be at least 1, got {pairwise_pool}.")
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)
        self.mode = mode
        self.pairwise_weight = float(pairwise_weight)
        self.pairwise_pool = int(pairwise_pool)
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

    def pairwise_term(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pairwise term alone (unweighted), on the predictions softened with this loss's temperature.

        Args:
            student_logits: student logits of shape (N, C, *spatial).
            teacher_logits: teacher logits of the same shape, or None when ``teacher_probs`` is given.
            teacher_probs: the teacher's softened probabilities (cached soft labels) instead of its logits.

        Returns:
            scalar tensor, computed in float32.

        Raises:
            ValueError: if not exactly one of ``teacher_logits`` and ``teacher_probs`` is given, or as
                :func:`pairwise_affinity_loss`.
        """
        if (teacher_logits is None) == (teacher_probs is None):
            raise ValueError("pairwise_term needs exactly one of teacher_logits and teacher_probs.")
        if teacher_probs is None:
            teacher_probs = soft_labels_from_logits(teacher_logits.detach(), self.temperature, self.mode)
        student_probs = soft_labels_from_logits(student_logits, self.temperature, self.mode)
        return pairwise_affinity_loss(student_probs, teacher_probs.detach().float(), self.pairwise_pool, self.mode)

    def supervised_term(
        self, student_logits: torch.Tensor, label: torch.Tensor, labelled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The supervised loss on the labelled samples of the batch.

        Args:
            student_logits: student logits of shape (N, C, *spatial).
            label: the batch's labels, as ``supervised`` expects them.
            labelled: (N,) bool, which samples have a ground-truth label; None for all.

        Returns:
            ``supervised`` of the labelled samples; a zero that keeps the graph when none is labelled.
        """
        if labelled is None or bool(labelled.all()):
            return self.supervised(student_logits, label)
        labelled = labelled.to(device=student_logits.device, dtype=torch.bool).flatten()
        if not bool(labelled.any()):
            return student_logits.sum() * 0.0
        return self.supervised(student_logits[labelled], label[labelled])

    def forward(
        self,
        student_logits: torch.Tensor,
        label: torch.Tensor | DistillationTarget,
        teacher_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blend the supervised loss of the student with the distillation terms.

        Args:
            student_logits: student logits of shape (N, C, *spatial).
            label: (N, 1, *spatial) class indices (softmax mode) or (N, C, *spatial) binary regions (sigmoid mode),
                as expected by ``supervised``; or a :class:`DistillationTarget` holding it with the teacher's
                targets and which samples are labelled (how the trainer calls the loss), in which case
                ``teacher_logits`` and ``teacher_probs`` are taken from it.
            teacher_logits: teacher logits of the student's shape, any floating dtype; may be None when
                ``kd_weight`` and ``pairwise_weight`` are 0.
            mask: optional (N, 1, *spatial) mask restricting the KD term, see :meth:`kd_term`; the supervised and
                pairwise terms are unaffected.
            teacher_probs: cached soft labels used instead of ``teacher_logits``, see :meth:`kd_term`.

        Returns:
            scalar loss ``(1 - kd_weight) * supervised + kd_weight * kd_term + pairwise_weight * pairwise_term``; a
            term whose weight is 0 is not computed, so ``kd_weight`` 0 and 1 give exactly the supervised loss and
            the KD term when ``pairwise_weight`` is 0.

        Raises:
            ValueError: if both ``teacher_logits`` and ``teacher_probs`` are None while a distillation weight is
                > 0, or as raised by :meth:`kd_term` and :meth:`pairwise_term`.
        """
        labelled = None
        if isinstance(label, DistillationTarget):
            label, teacher_logits, teacher_probs, labelled = label
        terms = []
        if self.kd_weight < 1:
            terms.append((1 - self.kd_weight) * self.supervised_term(student_logits, label, labelled))
        if self.kd_weight > 0 or self.pairwise_weight > 0:
            if teacher_logits is None and teacher_probs is None:
                raise ValueError(
                    "teacher_logits or teacher_probs is required when kd_weight or pairwise_weight is > 0, got "
                    f"kd_weight={self.kd_weight}, pairwise_weight={self.pairwise_weight}."
                )
        if self.kd_weight > 0:
            terms.append(self.kd_weight * self.kd_term(student_logits, teacher_logits, mask, teacher_probs))
        if self.pairwise_weight > 0:
            terms.append(self.pairwise_weight * self.pairwise_term(student_logits, teacher_logits, teacher_probs))
        return sum(terms[1:], terms[0])
