# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Job: how far the student's fast path is from MONAI's plain ``SliceInferer`` on the benchmark case."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from scripts.checkpoints import CheckpointMismatchError, check_network_checkpoint
from tools.benchmark.models import BenchmarkModel, preprocessed_image
from tools.benchmark.results import FastPathAgreement

__all__ = ["fast_path_agreement"]


def fast_path_agreement(
    student: BenchmarkModel, plain: BenchmarkModel, bundle_root: str, device: torch.device
) -> FastPathAgreement:
    """Compare the logits and labels of the fast path and the plain ``SliceInferer`` on the same network.

    Uses the bundle's ``models/model.pt`` when it fits (a trained network exercises the crop's edge effects as
    deployed), else the benchmark's random weights; the network's own weights are restored afterwards.

    Args:
        student: the student with the fast ``BrainSliceInferer``.
        plain: the student with MONAI's ``SliceInferer`` (the network is ``student``'s).
        bundle_root: the bundle root.
        device: where both run.

    Returns:
        the largest logit difference and the fractions of voxels (all, brain) with the same label.
    """
    network = student.network
    original = {name: value.clone() for name, value in network.state_dict().items()}
    checkpoint = Path(bundle_root) / "models" / "model.pt"
    weights = "random"
    if checkpoint.is_file():
        with contextlib.suppress(CheckpointMismatchError):
            network.load_state_dict(check_network_checkpoint(network, str(checkpoint)))
            weights = "trained models/model.pt"
    image = preprocessed_image(student, device)
    with torch.no_grad():
        fast = student.inferer(image, network).float()
        reference = plain.inferer(image, network).float()
    network.load_state_dict(original)
    brain = (image[0] != 0).any(dim=0)
    same = fast.argmax(dim=1)[0] == reference.argmax(dim=1)[0]
    return FastPathAgreement(
        weights=weights,
        max_abs_logit_difference=float((fast - reference).abs().max()),
        label_agreement=float(same.float().mean()),
        label_agreement_brain=float(same[brain].float().mean()) if bool(brain.any()) else 1.0,
    )
