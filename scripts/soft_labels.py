# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The frozen teacher's soft labels computed once per case, stored compactly and reused every epoch.

``TeacherSoftLabelsd`` is a deterministic transform for the distillation pipeline (``configs/distill.json`` with
``soft_labels`` set to ``cached``). Placed after loading and normalisation and before the random transforms, it
adds the teacher's temperature-softened probabilities of the whole volume under ``soft_label_key``; the random
spatial transforms then crop, flip and rotate image, label and soft labels together, so the student's soft target
always matches what it sees. ``CacheDataset`` keeps the result in memory, so the teacher costs one forward pass per
case per run instead of one per patch per epoch.

On disk (``cache_dir``) each case is one ``<case_id>.pt`` file holding float16 probabilities of the brain's bounding
box (plus ``margin`` voxels) and of one all-background slice, which fills the rest of the volume when it is read
back. A file is reused only when its fingerprint (teacher weights, temperature, mode and the preprocessed image) is
the one of the current run; otherwise the teacher runs again and the file is replaced atomically. Each computation
is logged when it starts and when it ends, naming the case, the cache file and the time it took (tens of seconds per
real BraTS case on CPU), between the updates of ``CacheDataset``'s progress bar over the cases. With one training
process per GPU each process caches only its own share of the cases (``scripts.distributed.PartitionedCacheDataset``)
and logs its own computations, so the teacher runs once per case, not once per case and process.

Probabilities rather than logits are stored because zero is then "no target": voxels that a rotation or padding
brings in from outside the image get all-zero probabilities, which contribute nothing to the KL term
(``scripts.distillation_loss.DistillationLoss`` with ``teacher_probs``), whereas zero logits would be a uniform
target. Bilinear interpolation of probabilities also stays a probability distribution.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scripts.atomic_files import atomic_path
from scripts.case_metadata import CASE_ID
from scripts.checkpoints import CheckpointMismatchError, read_checkpoint, state_dict_fingerprint
from scripts.fast_inference import BrainSliceInferer, brain_bounding_box
from torch import nn

__all__ = ["SOFT_LABEL_KEY", "TeacherSoftLabelsd", "soft_labels_from_logits"]

SOFT_LABEL_KEY = "teacher_probs"
MODES = ("softmax", "sigmoid")


def soft_labels_from_logits(
    logits: torch.Tensor, temperature: float, mode: str = "softmax", channel_dim: int = 1
) -> torch.Tensor:
    """The teacher's temperature-softened probabilities, as the KD term uses them.

    Args:
        logits: the teacher's logits.
        temperature: softening temperature ``T``.
        mode: ``softmax`` (exclusive classes, over channels) or ``sigmoid`` (per channel).
        channel_dim: the class dimension of ``logits`` (1 for (N, C, ...), 0 for one (C, ...) volume).

    Returns:
        float32 probabilities of the shape of ``logits``.

    Raises:
        ValueError: on an unknown ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    scaled = logits.float() / temperature
    return torch.softmax(scaled, dim=channel_dim) if mode == "softmax" else torch.sigmoid(scaled)


class TeacherSoftLabelsd(MapTransform):
    """Add the frozen teacher's soft labels of the whole volume, computed once per case and cached on disk.

    Args:
        keys: the image key (exactly one), a (C, H, W, D) preprocessed volume whose metadata holds ``case_id``
            (``scripts.brats_loading.LoadBraTSCased`` records it).
        teacher: the frozen 2D teacher, weights loaded (``scripts.teacher.load_teacher``).
        cache_dir: folder of the per-case files, created if needed.
        temperature: the distillation temperature ``T`` the probabilities are softened with.
        mode: ``softmax`` or ``sigmoid``, as the distillation loss.
        soft_label_key: key the (C_out, H, W, D) float16 probabilities are stored under.
        margin: background voxels kept around the brain's bounding box in plane.
        sw_batch_size: slices per teacher forward pass.
        divisor: the teacher's size divisor; H and W are zero-padded up to multiples of it for the teacher only.
        amp: run the teacher under autocast (CUDA only; ignored on CPU).

    Raises:
        ValueError: if more than one key is given or ``mode`` is unknown.
    """

    def __init__(
        self,
        keys: KeysCollection,
        teacher: nn.Module,
        cache_dir: str,
        temperature: float,
        mode: str = "softmax",
        soft_label_key: str = SOFT_LABEL_KEY,
        margin: int = 16,
        sw_batch_size: int = 8,
        divisor: int = 16,
        amp: bool = False,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"TeacherSoftLabelsd takes one image key, got {self.keys}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.cache_dir = cache_dir
        self.temperature = float(temperature)
        self.mode = mode
        self.soft_label_key = soft_label_key
        self.margin = margin
        self.divisor = divisor
        self.inferer = BrainSliceInferer(sw_batch_size=sw_batch_size, crop_to_brain=False)
        self.device = next(teacher.parameters()).device
        self.amp = amp and self.device.type == "cuda"
        self._teacher_fingerprint = state_dict_fingerprint(teacher)
        self.logger = logging.getLogger(type(self).__name__)

    def _fingerprint(self, image: torch.Tensor) -> str:
        digest = hashlib.sha1(f"{self._teacher_fingerprint}:{self.temperature}:{self.mode}".encode())
        digest.update(f"{tuple(image.shape)}".encode())
        digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def _compute(self, image: torch.Tensor, fingerprint: str) -> dict[str, Any]:
        """The compact record of one case: box probabilities, background slice, box, shape and fingerprint."""
        volume = image.as_tensor() if isinstance(image, MetaTensor) else image
        volume = volume.to(self.device, torch.float32)[None]
        height, width = volume.shape[2:4]
        padding = (0, 0, 0, -width % self.divisor, 0, -height % self.divisor)  # last dims first: D, W, H
        padded = torch.nn.functional.pad(volume, padding)
        autocast = torch.autocast(self.device.type) if self.amp else torch.autocast(self.device.type, enabled=False)
        with autocast:
            logits = self.inferer(padded, self.teacher)[0, :, :height, :width]
            background_logits = self.teacher(padded.new_zeros((1, *padded.shape[1:4])))[0, :, :height, :width]
        probs = soft_labels_from_logits(logits, self.temperature, self.mode, channel_dim=0)
        background = soft_labels_from_logits(background_logits, self.temperature, self.mode, channel_dim=0)
        brain = (volume[0] != 0).any(dim=0)
        in_plane = brain_bounding_box(brain, self.margin, divisor=1)
        if in_plane is None:
            box = (slice(0, 0), slice(0, 0), slice(0, 0))
        else:
            depth = torch.nonzero(brain.any(dim=(0, 1))).flatten()
            box = (*in_plane, slice(int(depth[0]), int(depth[-1]) + 1))
        return {
            "box_probs": probs[:, box[0], box[1], box[2]].half().cpu(),
            "background": background.half().cpu(),
            "box": [[span.start, span.stop] for span in box],
            "shape": list(probs.shape),
            "fingerprint": fingerprint,
        }

    def _read(self, path: str, fingerprint: str) -> dict[str, Any] | None:
        if not os.path.isfile(path):
            return None
        try:
            record = read_checkpoint(path, "soft-label cache file")
        except CheckpointMismatchError as e:  # truncated or damaged: the teacher computes it again
            warnings.warn(f"{e}; the teacher's soft labels of this case are computed again.", stacklevel=3)
            return None
        return record if isinstance(record, Mapping) and record.get("fingerprint") == fingerprint else None

    @staticmethod
    def _expand(record: Mapping[str, Any]) -> torch.Tensor:
        """The full (C_out, H, W, D) float16 soft labels of a compact record."""
        channels, height, width, depth = record["shape"]
        probs = record["background"][..., None].expand(channels, height, width, depth).clone()
        (r0, r1), (c0, c1), (z0, z1) = record["box"]
        probs[:, r0:r1, c0:c1, z0:z1] = record["box_probs"]
        return probs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        image = d[key]
        meta = image.meta if isinstance(image, MetaTensor) else {}
        case_id = str(meta.get(CASE_ID, "")) or hashlib.sha1(str(meta.get("filename_or_obj")).encode()).hexdigest()
        path = os.path.join(self.cache_dir, f"{case_id}.pt")
        fingerprint = self._fingerprint(image)
        record = self._read(path, fingerprint)
        if record is None:
            self.logger.info(f"case {case_id}: computing the teacher's soft labels (once per case) -> {path}")
            start = time.perf_counter()
            record = self._compute(image, fingerprint)
            os.makedirs(self.cache_dir, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(record, tmp)
            seconds = time.perf_counter() - start
            self.logger.info(f"case {case_id}: teacher soft labels computed in {seconds:.1f} s, cached in {path}")
        probs = self._expand(record)
        d[self.soft_label_key] = MetaTensor(probs, meta=dict(meta)) if isinstance(image, MetaTensor) else probs
        return d
