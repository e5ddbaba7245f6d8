# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures: tiny but real BraTS datasets on disk, in each release layout, and trained-like networks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

SEQUENCES = ("flair", "t1", "t1ce", "t2")  # canonical order; also the channel order of MSD 4D images
FILE_SUFFIXES = {
    "brats2020": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "brats2023": {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
}
# the release's own label value of each tumour class
RELEASE_LABELS = {
    "brats2020": {"necrotic": 1, "edema": 2, "enhancing": 4},
    "brats2023": {"necrotic": 1, "edema": 2, "enhancing": 3},
    "msd": {"necrotic": 2, "edema": 1, "enhancing": 3},
}
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])

# the bundle root, so that `import scripts` works under a plain `pytest` as it does in the bundle's configs
BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])
if BUNDLE_ROOT not in sys.path:
    sys.path.insert(0, BUNDLE_ROOT)


def case_ids(layout: str, num_cases: int) -> list[str]:
    """Case ids written by ``make_brats_folder`` for ``layout`` and ``num_cases``, in order."""
    if layout == "brats2020":
        return [f"BraTS20_Training_{i:03d}" for i in range(1, num_cases + 1)]
    if layout == "brats2023":  # case 2 is a second timepoint of patient 1; later cases are new patients
        return [f"BraTS-GLI-{max(1, i - 1):05d}-{int(i == 2):03d}" for i in range(1, num_cases + 1)]
    return [f"BRATS_{i:03d}" for i in range(1, num_cases + 1)]


def sequence_volume(shape: tuple[int, int, int], sequence_index: int) -> np.ndarray:
    """Float32 volume of one sequence: ``100 * (sequence_index + 1) + z`` inside the brain ellipsoid, 0 outside."""
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    radii = [0.45 * s for s in shape]
    brain = sum(((g - (s - 1) / 2) / r) ** 2 for g, s, r in zip(grid, shape, radii)) <= 1
    brain |= tumour_volume(shape, "brats2023") > 0  # the tumour always lies inside the brain
    return np.where(brain, 100.0 * (sequence_index + 1) + grid[2], 0.0).astype(np.float32)


def tumour_volume(shape: tuple[int, int, int], layout: str) -> np.ndarray:
    """Uint8 label volume with nested boxes around the centre: edema (half-width 3), enhancing (2), necrotic (1)."""
    label = np.zeros(shape, dtype=np.uint8)
    for name, half_width in (("edema", 3), ("enhancing", 2), ("necrotic", 1)):
        label[tuple(slice(s // 2 - half_width, s // 2 + half_width) for s in shape)] = RELEASE_LABELS[layout][name]
    return label


def _save(volume: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, AFFINE), str(path))


def write_brats_folder(
    root: Path, layout: str, num_cases: int = 3, shape: tuple[int, int, int] = (16, 16, 8), labels_present: bool = True
) -> Path:
    """Write a tiny BraTS dataset in ``layout`` into the folder ``root`` (created if needed) and return ``root``.

    Case ids (see :func:`case_ids`): ``BraTS20_Training_001``, ``_002``... (brats2020); ``BraTS-GLI-00001-000``,
    ``BraTS-GLI-00001-001`` (a second timepoint of patient 1), ``BraTS-GLI-00002-000``, ``BraTS-GLI-00003-000``...
    (brats2023); ``BRATS_001``, ``BRATS_002``... (msd).

    Files: brats2020 ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``; brats2023
    ``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz``; msd ``imagesTr/<case>.nii.gz`` (4D, ``shape + (4,)``, channels
    flair, t1, t1ce, t2), ``labelsTr/<case>.nii.gz`` and a ``dataset.json`` like MSD's, listing
    ``{"image": "./imagesTr/<case>.nii.gz", "label": "./labelsTr/<case>.nii.gz"}`` under ``"training"``.

    Images are float32: a brain ellipsoid (radii 0.45 * shape, always containing the tumour) holds
    ``100 * (k + 1) + z``, with ``k`` the sequence's index in (flair, t1, t1ce, t2) and ``z`` the voxel's slice
    index, so flair lies in [100, 100 + Z), t1 in [200, ...), t1ce in [300, ...), t2 in [400, ...); 0 outside.
    Labels are uint8 with the release's own values (``RELEASE_LABELS``): nested boxes around ``shape // 2`` of
    edema (half-width 3), enhancing (2) and necrotic core (1); every case has the same images and label. The
    affine is ``diag(-1, -1, 1, 1)``.

    Args:
        root: the dataset folder to write.
        layout: ``brats2020``, ``brats2023`` or ``msd``.
        num_cases: number of cases.
        shape: spatial shape, each axis at least 6 and ``Z`` below 100.
        labels_present: whether label files are written (without them, msd's ``dataset.json`` lists images only).

    Returns:
        ``root``.
    """
    volumes = [sequence_volume(shape, k) for k in range(len(SEQUENCES))]
    label = tumour_volume(shape, layout)
    ids = case_ids(layout, num_cases)
    if layout == "msd":
        image_4d = np.stack(volumes, axis=-1)
        training = []
        for case_id in ids:
            entry = {"image": f"./imagesTr/{case_id}.nii.gz"}
            _save(image_4d, root / entry["image"])
            if labels_present:
                entry["label"] = f"./labelsTr/{case_id}.nii.gz"
                _save(label, root / entry["label"])
            training.append(entry)
        dataset = {
            "name": "BRATS",
            "tensorImageSize": "4D",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": num_cases,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(dataset, indent=4))
        return root
    separator = "_" if layout == "brats2020" else "-"
    for case_id in ids:
        for sequence, volume in zip(SEQUENCES, volumes):
            _save(volume, root / case_id / f"{case_id}{separator}{FILE_SUFFIXES[layout][sequence]}.nii.gz")
        if labels_present:
            _save(label, root / case_id / f"{case_id}{separator}seg.nii.gz")
    return root


@pytest.fixture
def make_brats_folder() -> Callable[..., Path]:
    """Factory ``make(root, layout, num_cases=3, shape=(16, 16, 8), labels_present=True) -> root``.

    See :func:`write_brats_folder` for the case ids, file names and voxel values written.
    """
    return write_brats_folder


@pytest.fixture
def trained_like_network() -> Callable[..., nn.Module]:
    """Factory of ``SeparableUNet``s in eval mode whose BatchNorm layers hold non-trivial statistics and affine
    parameters, as after training (freshly initialised BatchNorm is the identity, which hides folding mistakes).
    """

    from scripts.separable_unet import SeparableUNet  # importable once BUNDLE_ROOT is on sys.path (above)

    def make(channels: Sequence[int] = (16, 32, 64, 128, 256), seed: int = 0, dropout: float = 0.3) -> nn.Module:
        torch.manual_seed(seed)
        network = SeparableUNet(3, 4, list(channels), dropout=dropout)
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                # Near variance-preserving, so that every level of the U-Net moves the logits: with PyTorch's default
                # initialisation the signal of the coarser levels fades to ~1e-4 of the logits, below the tests'
                # tolerances, and a mistake there would go unseen.
                nn.init.kaiming_normal_(module.weight, a=0.01, nonlinearity="leaky_relu")
                module.weight.data.mul_(0.8)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)
        return network.eval()

    return make
