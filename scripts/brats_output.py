# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Predicted label maps written back in the conventions of the input's BraTS release."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import MapTransform, Transform
from scripts.atomic_files import atomic_path
from scripts.brats_data import LABEL_MAPS
from scripts.case_metadata import BRATS_LAYOUT, CASE_ID, EMPTY_BRAIN, SOURCE_FILES

__all__ = [
    "OUTPUT_CONVENTIONS",
    "internal_to_release",
    "ArgmaxLabeld",
    "ToReleaseLabelsd",
    "OutsideBrainToBackgroundd",
    "brain_mask",
    "AtomicNibabelWriter",
    "case_name_formatter",
    "output_postfix",
]

# "internal" is 0 background, 1 necrotic/non-enhancing core, 2 edema, 3 enhancing (the BraTS 2023+ values);
# "challenge" is what the official brats-evaluation command line scores: BraTS 2023 values in `<case_id>.nii.gz`
CHALLENGE = "challenge"
OUTPUT_CONVENTIONS = (*LABEL_MAPS, "internal", CHALLENGE)


def internal_to_release(label: torch.Tensor, convention: str) -> torch.Tensor:
    """Map internal labels (0 background, 1 necrotic core, 2 edema, 3 enhancing) to a release's label values.

    Args:
        label: tensor of internal class indices.
        convention: a key of ``LABEL_MAPS`` (``brats2020``, ``brats2023``, ``msd``), ``internal`` or ``challenge``
            (BraTS 2023 values).

    Returns:
        a tensor of the same shape and type with the release's values (e.g. enhancing 3 -> 4 for BraTS 2020).

    Raises:
        ValueError: if ``convention`` is unknown.
    """
    if convention not in OUTPUT_CONVENTIONS:
        raise ValueError(f"Unknown label convention {convention!r}, expected one of {OUTPUT_CONVENTIONS}.")
    if convention == "internal":
        return label
    convention = "brats2023" if convention == CHALLENGE else convention
    lut = torch.zeros(4, dtype=torch.int64, device=label.device)
    for release_value, internal_value in LABEL_MAPS[convention].items():
        lut[internal_value] = release_value
    return lut[label.long()].to(label.dtype)


def _case_meta(data: Mapping[Hashable, Any], key: Hashable, ref_key: Hashable) -> dict:
    for k in (ref_key, key):
        if isinstance(data.get(k), MetaTensor) and BRATS_LAYOUT in data[k].meta:
            return data[k].meta
    return {}


class ArgmaxLabeld(MapTransform):
    """Class logits (C, *spatial) to a (1, *spatial) label map of class indices, as ``AsDiscreted(argmax=True)``.

    ``torch.argmax`` over the channel dimension of a channel-first volume is a strided reduction that takes ~1 s
    for 4 x 240 x 240 x 155 logits on a CPU core; ``torch.max(...).indices`` gives the same indices (the first
    maximum on ties) about 10x faster. The label map is stored as ``dtype`` (uint8 by default: BraTS has at most
    a handful of classes), metadata kept.

    Args:
        keys: keys of the logits.
        dtype: integer dtype of the label map; it must hold every class index.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: if a tensor has more classes than ``dtype`` can hold.
    """

    def __init__(self, keys: KeysCollection, dtype: torch.dtype = torch.uint8, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = d[key]
            if logits.shape[0] - 1 > torch.iinfo(self.dtype).max:
                raise ValueError(f"{logits.shape[0]} classes of {key!r} do not fit {self.dtype}.")
            d[key] = logits.max(dim=0, keepdim=True).indices.to(self.dtype)
        return d


class ToReleaseLabelsd(MapTransform):
    """Convert predicted internal labels to the label values of the input case's release.

    The release is read from the ``brats_layout`` metadata that ``scripts.brats_loading.LoadBraTSCased`` records
    (``ref_key``'s metadata first, then the key's). A generic multi-channel study has no release and keeps the
    internal values, which equal BraTS 2023+'s. The binary whole-tumour task (``num_classes`` 2) keeps 0/1.

    Args:
        keys: keys of the predicted label maps.
        convention: ``None`` to follow each case's release, or one of ``OUTPUT_CONVENTIONS`` for every case.
        num_classes: 4 (BraTS classes) or 2 (whole tumour, left unchanged).
        ref_key: key of the input image holding the case metadata.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: if ``convention`` is unknown.
    """

    def __init__(
        self,
        keys: KeysCollection,
        convention: str | None = None,
        num_classes: int = 4,
        ref_key: Hashable = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if convention is not None and convention not in OUTPUT_CONVENTIONS:
            raise ValueError(f"Unknown label convention {convention!r}, expected one of {OUTPUT_CONVENTIONS}.")
        self.convention = convention
        self.num_classes = num_classes
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.num_classes == 2:
                continue
            layout = _case_meta(d, key, self.ref_key).get(BRATS_LAYOUT, "internal")
            convention = self.convention or (layout if layout in LABEL_MAPS else "internal")
            d[key] = internal_to_release(d[key], convention)
        return d


def case_name_formatter(metadict: dict, saver: Transform) -> dict:
    """``SaveImage`` name formatter naming each output after its case id (``<case_id>_seg.nii.gz`` by default).

    Args:
        metadict: the saved image's metadata, holding ``case_id`` (see ``LoadBraTSCased``).
        saver: the ``SaveImage`` transform.

    Returns:
        the keyword arguments of ``FolderLayout.filename``.
    """
    return {"subject": str(metadict.get(CASE_ID, getattr(saver, "_data_index", 0))), "idx": None}


def output_postfix(convention: str | None) -> str:
    """``SaveImage`` postfix of a segmentation's file name: ``seg`` (``<case_id>_seg.nii.gz``), none for ``challenge``.

    The official ``brats-evaluation`` command line pairs a reference file with the prediction whose name ends with
    the subject id found in the reference's name (e.g. ``00001-000`` in ``BraTS-GLI-00001-000-seg.nii.gz``), so a
    BraTS 2023+ case's prediction must be named ``<case_id>.nii.gz``.

    Args:
        convention: the output convention (``None`` for the input's release).

    Returns:
        the postfix.
    """
    return "" if convention == CHALLENGE else "seg"


def brain_mask(image: torch.Tensor) -> torch.Tensor:
    """The brain voxels of a channel-first image: those where at least one input channel is not 0.

    Skull-stripped BraTS sequences are exactly 0 outside the brain, and z-scoring with ``nonzero=True`` (the bundle's
    ``NormalizeIntensityd``) and zero padding keep them so.

    Args:
        image: (C, *spatial) input image.

    Returns:
        a (1, *spatial) boolean tensor (a plain tensor, not a ``MetaTensor``), on the device of ``image``.
    """
    image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    brain = image[0] != 0
    for channel in image[1:]:  # in place, channel by channel: twice as fast as any(dim=0) on a BraTS volume
        brain.logical_or_(channel != 0)
    return brain[None]


class OutsideBrainToBackgroundd(MapTransform):
    """Label every voxel outside the brain as background (0), whatever the network predicted there.

    The brain is where at least one channel of the input image (``ref_key``, on the grid of the prediction) is not 0
    (:func:`brain_mask`); a 2D network's output on the all-zero background around the skull-stripped brain is a
    function of its biases and statistics only, and can be any class. A case whose every input voxel is 0
    (``empty_brain`` in the image's metadata, recorded by ``scripts.brats_loading.LoadBraTSCased``) comes out all
    background, with a ``UserWarning`` (also logged) naming the case and its files.

    Place it after the argmax and before any transform that changes the prediction's grid (``Invertd``).

    Args:
        keys: keys of the predicted label maps, (C, *spatial) class indices (any dtype).
        ref_key: key of the input image, (C_in, *spatial).
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        KeyError: if ``ref_key`` is missing.
        ValueError: if a prediction's spatial shape is not the image's (it was moved to another grid).
    """

    def __init__(self, keys: KeysCollection, ref_key: Hashable = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.logger = logging.getLogger(type(self).__name__)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.ref_key]
        meta = _case_meta(d, next(iter(self.keys)), self.ref_key)
        if bool(meta.get(EMPTY_BRAIN, False)):
            message = (
                f"case {meta.get(CASE_ID, '?')}: every voxel of {meta.get(SOURCE_FILES, '?')} is 0 (empty brain "
                "volume); its segmentation is all background."
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            self.logger.warning(message)
        brain = brain_mask(image)
        for key in self.key_iterator(d):
            pred = d[key]
            if tuple(pred.shape[1:]) != tuple(brain.shape[1:]):
                raise ValueError(
                    f"case {meta.get(CASE_ID, '?')}: prediction {key!r} has spatial shape {tuple(pred.shape[1:])}, "
                    f"the image {self.ref_key!r} {tuple(brain.shape[1:])}; mask it before changing its grid."
                )
            d[key] = pred * brain.to(pred.device)
        return d


class AtomicNibabelWriter(NibabelWriter):
    """``NibabelWriter`` whose files appear complete or not at all (for ``SaveImaged(writer=...)``).

    Each file is written under a hidden temporary name in its destination folder (``.<name>.XXXX.nii.gz``) and
    renamed over the destination only when complete, so an interrupted or failing run never leaves a truncated
    segmentation or damages a previous good one of the same name.
    """

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        """Write the image to ``filename`` atomically (see ``NibabelWriter.write`` for the arguments)."""
        filename = os.fspath(filename)
        folder, name = os.path.split(os.path.abspath(filename))
        suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
        with atomic_path(filename, suffix=suffix) as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)
        if verbose:
            logging.getLogger(type(self).__name__).info(f"writing: {filename}")
