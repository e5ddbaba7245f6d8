# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Distillation on unlabelled cases: the teacher's predictions choose their patches, a sampler mixes them in.

A case without label (``scripts.brats_data.find_unlabelled_cases``: a datalist's ``unlabelled`` list, or
``unlabelled_dir``) goes through the same training pipeline as a labelled one (``configs/distill.json``):

1. ``scripts.soft_labels.TeacherSoftLabelsd`` caches the teacher's soft labels of the whole volume, as for every case;
2. :class:`TeacherPredictedLabeld` stores the teacher's predicted classes under the label key and ``labelled``
   False, so that ``RandCropByPosNegLabeld`` samples its patches around the tumour the teacher sees, and in the brain
   (``image_threshold`` 0) for the negative ones, and the spatial transforms move this label with the image;
3. the loss (``scripts.distillation_loss.DistillationLoss``) leaves these patches out of its supervised term: they
   are trained by the distillation terms alone. The teacher's predicted classes are never a training target.

:class:`LabelledUnlabelledSampler` draws each epoch's cases: every labelled case once, and ``unlabelled_ratio``
unlabelled cases per labelled case, taken in turn from a shuffled order so that every unlabelled case is used as
often as the others.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scripts.soft_labels import MODES, SOFT_LABEL_KEY
from torch.utils.data import Sampler

__all__ = ["LABELLED_KEY", "LabelledUnlabelledSampler", "TeacherPredictedLabeld", "classes_from_soft_labels"]

LABELLED_KEY = "labelled"  # per case and per patch: whether the label is the ground truth


def classes_from_soft_labels(probs: torch.Tensor, mode: str = "softmax") -> torch.Tensor:
    """The teacher's predicted internal classes (0 background, 1 core, 2 edema, 3 enhancing) from its soft labels.

    Args:
        probs: (C, *spatial) soft labels of one volume: class probabilities (``softmax``), or the probabilities of
            the regions WT, TC and ET, or of WT alone (``sigmoid``).
        mode: ``softmax`` or ``sigmoid``, as the distillation.

    Returns:
        a (1, *spatial) uint8 class map: the most probable class (``softmax``); the nested regions above 0.5 mapped to
        classes, ET as 3, the rest of TC as 1, the rest of WT as 2, or WT alone as 1 (``sigmoid``).

    Raises:
        ValueError: on an unknown ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode == "softmax":
        return probs.argmax(dim=0, keepdim=True).to(torch.uint8)
    regions = probs > 0.5
    classes = torch.zeros((1, *probs.shape[1:]), dtype=torch.uint8, device=probs.device)
    values = (1,) if len(regions) == 1 else (2, 1, 3)  # WT, then TC inside it, then ET inside TC
    for region, value in zip(regions, values):
        classes[0][region] = value
    return classes


class TeacherPredictedLabeld(MapTransform):
    """Give a case without label the teacher's predicted classes as its label, for patch sampling; mark which is which.

    A case that has the label key keeps it and is marked ``labelled`` True. A case without it (an unlabelled case,
    whose label file is never opened) gets :func:`classes_from_soft_labels` of its cached soft labels under the label
    key, with the image's metadata, and ``labelled`` False: the loss must not train on that label (see the module
    docstring).

    Args:
        keys: the label key (exactly one).
        soft_label_key: the key of the teacher's cached soft labels (``scripts.soft_labels.TeacherSoftLabelsd``).
        mode: ``softmax`` or ``sigmoid``, as the soft labels.
        labelled_key: where the flag is stored.

    Raises:
        ValueError: if more than one key is given or ``mode`` is unknown.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        soft_label_key: str = SOFT_LABEL_KEY,
        mode: str = "softmax",
        labelled_key: str = LABELLED_KEY,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != 1:
            raise ValueError(f"TeacherPredictedLabeld takes one label key, got {self.keys}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.soft_label_key = soft_label_key
        self.mode = mode
        self.labelled_key = labelled_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label_key = self.keys[0]
        d[self.labelled_key] = label_key in d
        if label_key in d:
            return d
        if self.soft_label_key not in d:
            raise KeyError(
                f"case {d.get('case_id', '?')} has no label and no {self.soft_label_key!r}: an unlabelled case needs "
                "the teacher's cached soft labels (soft_labels 'cached') before TeacherPredictedLabeld."
            )
        probs = d[self.soft_label_key]
        classes = classes_from_soft_labels(probs.as_tensor() if isinstance(probs, MetaTensor) else probs, self.mode)
        d[label_key] = MetaTensor(classes, meta=dict(probs.meta)) if isinstance(probs, MetaTensor) else classes
        return d


class LabelledUnlabelledSampler(Sampler[int]):
    """Each epoch: every labelled case once and ``unlabelled_ratio`` unlabelled cases per labelled case, shuffled.

    The cases are the training dataset's data, in its order; a case is unlabelled when its ``labelled`` entry is
    False (``scripts.brats_data.find_unlabelled_cases``). An epoch holds ``n_labelled + round(unlabelled_ratio *
    n_labelled)`` cases: the unlabelled ones are taken in turn from a shuffled order, reshuffled once all are used,
    so each is drawn as often as the others (an unlabelled case comes twice in an epoch only when the ratio asks for
    more cases than there are). With no labelled case, an epoch is every unlabelled case once.

    Args:
        data: the training cases (``train#dataset#data``).
        unlabelled_ratio: unlabelled cases per labelled case in an epoch, >= 0.
        seed: seed of the shuffling.

    Raises:
        ValueError: if ``unlabelled_ratio`` is negative or not finite.
        RuntimeError: if more than one process trains (``torch.distributed``): the multi-GPU training partitions the
            cases itself, without this mix.
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], unlabelled_ratio: float = 1.0, seed: int = 0) -> None:
        if not (math.isfinite(unlabelled_ratio) and unlabelled_ratio >= 0):
            raise ValueError(f"unlabelled_ratio must be finite and >= 0, got {unlabelled_ratio}.")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    "distillation with unlabelled cases trains in one process; with configs/multi_gpu_train.json "
                    "give --unlabelled_ratio 0.0 (labelled cases only)."
                )
        self.labelled = [i for i, case in enumerate(data) if case.get(LABELLED_KEY, True)]
        self.unlabelled = [i for i, case in enumerate(data) if not case.get(LABELLED_KEY, True)]
        self.unlabelled_ratio = float(unlabelled_ratio)
        self.generator = torch.Generator().manual_seed(seed)
        self._queue: list[int] = []

    def __len__(self) -> int:
        if not self.labelled:
            return len(self.unlabelled)
        return len(self.labelled) + (round(self.unlabelled_ratio * len(self.labelled)) if self.unlabelled else 0)

    def _next_unlabelled(self) -> int:
        if not self._queue:
            order = torch.randperm(len(self.unlabelled), generator=self.generator).tolist()
            self._queue = [self.unlabelled[i] for i in order]
        return self._queue.pop()

    def __iter__(self) -> Iterator[int]:
        epoch = list(self.labelled) + [self._next_unlabelled() for _ in range(len(self) - len(self.labelled))]
        order = torch.randperm(len(epoch), generator=self.generator).tolist()
        return iter([epoch[i] for i in order])
