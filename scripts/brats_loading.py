# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Loading of one BraTS case (any supported release) into a checked multi-channel image and internal labels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform
from scripts.brats_data import LABEL_MAPS, BraTSDataError, case_from_file
from scripts.case_metadata import BRATS_LAYOUT, CASE_ID, EMPTY_BRAIN, SOURCE_FILES
from scripts.label_convention import check_label_convention
from scripts.volume_checks import check_header_geometry, check_intensities, check_volume_shape

__all__ = ["LoadBraTSCased", "map_release_labels"]

AFFINE_ATOL = 1e-3
# a generic multi-channel study (no release) and every label under label_convention "channel_def" hold the internal
# values, which metadata.json's channel_def names (and which equal BraTS 2023+'s)
INTERNAL_LABELS = {0: 0, 1: 1, 2: 2, 3: 3}
INTERNAL_LABEL_SETS = ("multichannel", "channel_def")


def map_release_labels(label: np.ndarray, layout: str, num_classes: int, case_id: str, path: str) -> np.ndarray:
    """Map a release's label values to the internal convention (0 bg, 1 necrotic core, 2 edema, 3 enhancing).

    Args:
        label: label volume with the values of ``layout``'s release.
        layout: one of the keys of ``LABEL_MAPS``, or ``multichannel`` / ``channel_def`` (internal values).
        num_classes: 4 keeps the internal classes, 2 merges every tumour label into whole tumour (1).
        case_id: case id, for error messages.
        path: label file, for error messages.

    Returns:
        a uint8 volume of internal labels.

    Raises:
        BraTSDataError: if the volume holds values outside the release's label set, or ``num_classes`` is not 2 or 4.
    """
    if num_classes not in (2, 4):
        raise BraTSDataError(f"num_classes must be 2 (whole tumour) or 4 (BraTS classes), got {num_classes}.")
    mapping = INTERNAL_LABELS if layout in INTERNAL_LABEL_SETS else LABEL_MAPS[layout]
    values = np.unique(label)
    unexpected = [int(v) if float(v).is_integer() else float(v) for v in values if v not in mapping]
    if unexpected:
        raise BraTSDataError(
            f"case {case_id}: label file {path} holds values {unexpected} outside the {layout} label set "
            f"{sorted(mapping)}."
        )
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for release_value, internal_value in mapping.items():
        lut[release_value] = internal_value
    internal = lut[label.astype(np.int64)]
    return (internal > 0).astype(np.uint8) if num_classes == 2 else internal


class LoadBraTSCased(MapTransform):
    """Load one datalist case (from ``scripts.brats_data``) into a checked image and an internal label map.

    The case's sequence files (or the requested channels of a 4D file) are stacked into a channel-first
    ``MetaTensor`` carrying the first file's metadata, plus ``case_id`` and ``brats_layout``. Data holding only a
    file path under the image key (a one-file study, as MONAI Label sends) is first resolved into its case with
    ``scripts.brats_data.case_from_file``: its sibling sequence files are found, but its label is always the file
    under the label key (the label MONAI Label hands over), never a ``seg`` file found next to the study. The
    loaded data holds the same keys whatever the study's layout (``channel_indices``, which selects an MSD image's
    channels, is consumed), so studies of different layouts can share a batch. Every file is checked: readable, one 3D
    volume (an MSD image: 4D), same shape and affine as the others, finite voxel values, then the intensity and
    header checks of ``scripts.volume_checks`` (refused or warned about, naming the case and the file); the label's
    values must belong to the label set of ``label_convention`` and are mapped to the internal convention by
    :func:`map_release_labels`.

    Args:
        keys: the image key and, optionally, the label key, in this order.
        num_classes: 4 for the BraTS classes, 2 for whole tumour.
        modalities: the sequences of a one-file study, in channel order (datalist cases carry their own files).
        label_convention: ``release`` (labels hold the values of the study's release) or ``channel_def`` (labels
            hold the values ``channel_def`` names, whatever the release; MONAI Label's), see
            ``scripts.label_convention``.
        allow_missing_keys: whether a case without a label (inference) is accepted.

    Raises:
        BraTSDataError: naming the case and the file, for an unreadable file, a file that is not one 3D volume, a
            shape or affine mismatch, non-finite voxels, values too large to z-score or unexpected label values.
        ValueError: if ``label_convention`` is unknown.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        num_classes: int = 4,
        modalities: Sequence[str] = ("flair", "t1ce", "t2"),
        label_convention: str = "release",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes
        self.modalities = list(modalities)
        self.label_convention = check_label_convention(label_convention)
        self.reader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)

    def _read(self, path: str, case_id: str) -> MetaTensor:
        try:
            return self.reader(path)
        except Exception as e:
            raise BraTSDataError(
                f"case {case_id}: cannot read {path} (not a readable NIfTI file: truncated, corrupt or another "
                "format; the reader's errors are above); replace the file or remove the case."
            ) from e

    def _load_image(self, case: Mapping[Hashable, Any], key: Hashable) -> MetaTensor:
        case_id = case["case_id"]
        paths = case[key]
        if isinstance(paths, str):  # MSD: one 4D file, channels selected by the datalist
            volume = self._read(paths, case_id)
            check_volume_shape(volume, paths, case_id, "a 4D image's every channel", channels=None)
            indices = list(case["channel_indices"])
            if volume.shape[0] <= max(indices):
                raise BraTSDataError(
                    f"case {case_id}: {paths} has {volume.shape[0]} channels, channels {indices} were requested."
                )
            volumes, paths = [volume[i : i + 1] for i in indices], [paths] * len(indices)
        else:
            volumes = [self._read(p, case_id) for p in paths]
            for volume, path in zip(volumes, paths):
                check_volume_shape(volume, path, case_id, "a sequence file")
        reference, reference_path = volumes[0], paths[0]
        for volume, path in zip(volumes, paths):
            self._check_geometry(volume, reference, case_id, path, reference_path)
        image = torch.cat([v.as_tensor() for v in volumes], dim=0)
        check_intensities(image, paths, case_id)
        check_header_geometry(paths, case_id)
        meta = {**reference.meta, CASE_ID: case_id, BRATS_LAYOUT: case["layout"]}
        # an all-zero image (empty brain) is segmented as background at inference (brats_output)
        meta[EMPTY_BRAIN] = not bool(image.any())
        meta[SOURCE_FILES] = ", ".join(dict.fromkeys(paths))
        return MetaTensor(image, meta=meta)

    @staticmethod
    def _check_geometry(volume: MetaTensor, reference: MetaTensor, case_id: str, path: str, reference_path: str):
        if volume.shape[1:] != reference.shape[1:]:
            raise BraTSDataError(
                f"case {case_id}: {path} has shape {list(volume.shape[1:])} but {reference_path} has "
                f"{list(reference.shape[1:])}."
            )
        if not np.allclose(volume.affine.numpy(), reference.affine.numpy(), atol=AFFINE_ATOL):
            raise BraTSDataError(
                f"case {case_id}: {path} has a different affine from {reference_path}:\n"
                f"{volume.affine.numpy()}\nvs\n{reference.affine.numpy()}"
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key_iter = self.key_iterator(d)
        image_key = next(key_iter)
        if "case_id" not in d:  # a one-file study: the label is the one handed over, not a sibling seg file
            case = case_from_file(d[image_key], self.modalities)
            case.pop("label", None)
            d[image_key] = case.pop("image")
            d.update(case)
        source = d[image_key]
        d[image_key] = self._load_image(d, image_key)
        d.pop("channel_indices", None)
        label_set = d["layout"] if self.label_convention == "release" else "channel_def"
        for label_key in key_iter:
            path = d[label_key]
            label = self._read(path, d["case_id"])
            check_volume_shape(label, path, d["case_id"], "the label")
            self._check_geometry(label, d[image_key], d["case_id"], path, _first_path(source))
            internal = map_release_labels(label.numpy(), label_set, self.num_classes, d["case_id"], path)
            d[label_key] = MetaTensor(torch.from_numpy(internal), meta=label.meta)
        return d


def _first_path(paths: str | Sequence[str]) -> str:
    return paths if isinstance(paths, str) else paths[0]
