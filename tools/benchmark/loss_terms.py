# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Job: seconds and peak memory of one iteration's distillation loss, logit KD alone and with the pairwise term."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from scripts.distillation_loss import DistillationLoss, DistillationTarget
from tools.benchmark.results import LossTermCost
from tools.benchmark.timing import peak_memory_mib, timed_runs

__all__ = ["LOSS_TERMS", "benchmark_loss_terms"]

# the losses compared: configs/distill.json's with these ids set
LOSS_TERMS: dict[str, tuple[str, dict[str, Any]]] = {
    "logit_kd": ("Logit KD (pairwise_weight 0)", {"pairwise_weight": 0.0}),
    "logit_and_pairwise_kd": ("Logit + pairwise KD (pairwise_weight 1)", {"pairwise_weight": 1.0}),
}


def benchmark_loss_terms(
    batch: int, patch: int, num_classes: int, repeats: int, device: torch.device
) -> dict[str, LossTermCost]:
    """Time the loss's forward and backward pass on one training batch of student logits and cached soft labels.

    Args:
        batch: patches per iteration (``batch_size * patches_per_case``).
        patch: side of a patch in pixels.
        num_classes: output channels.
        repeats: timed calls per loss, after one warm-up call.
        device: where the loss runs.

    Returns:
        key of ``LOSS_TERMS`` -> its cost; the peak memory is that of one more call.
    """
    generator = torch.Generator().manual_seed(0)
    shape = (batch, num_classes, patch, patch)
    student = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    teacher_probs = torch.softmax(torch.randn(shape, generator=generator), dim=1).half().to(device)
    label = torch.randint(0, num_classes, (batch, 1, patch, patch), generator=generator).to(device)
    target = DistillationTarget(label, teacher_probs=teacher_probs)
    results = {}
    for key, (name, settings) in LOSS_TERMS.items():
        loss = DistillationLoss(**settings)

        def iteration(loss: DistillationLoss = loss) -> None:
            student.grad = None
            loss(student, target).backward()

        iteration()  # warm-up
        runs = timed_runs(iteration, repeats, device)
        results[key] = LossTermCost(
            name=name,
            settings=settings,
            batch=batch,
            patch=patch,
            iteration_runs_s=runs,
            iteration_s=statistics.median(runs),
            peak_mib=peak_memory_mib(iteration, device),
        )
    return results
