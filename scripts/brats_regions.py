# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""BraTS evaluation regions (whole tumour, tumour core, enhancing tumour) from internal label maps."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.handlers import MeanDice, from_engine
from monai.transforms import MapTransform

__all__ = ["REGION_NAMES", "region_names", "labels_to_regions", "LabelToRegionsd", "region_dice_metrics"]

REGION_NAMES = ("WT", "TC", "ET")
# internal labels (1 necrotic/non-enhancing core, 2 edema, 3 enhancing) making up each region
REGION_LABELS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def region_names(num_classes: int) -> tuple[str, ...]:
    """The regions a task can be evaluated on: WT, TC, ET for the 4-class task, WT alone for the binary one.

    Args:
        num_classes: 4 (BraTS classes) or 2 (whole tumour).

    Returns:
        the region names, in channel order of :func:`labels_to_regions`.

    Raises:
        ValueError: if ``num_classes`` is neither 2 nor 4.
    """
    if num_classes == 4:
        return REGION_NAMES
    if num_classes == 2:
        return REGION_NAMES[:1]
    raise ValueError(f"num_classes must be 2 or 4, got {num_classes}.")


def labels_to_regions(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Convert a channel-first map of internal labels to one binary channel per region.

    Args:
        label: tensor of shape (1, *spatial) holding internal class indices.
        num_classes: 4 or 2, see :func:`region_names`.

    Returns:
        float tensor of shape (number of regions, *spatial), metadata kept for a ``MetaTensor`` input.
    """
    if num_classes == 2:
        return (label > 0).float()
    return torch.cat([torch.isin(label, torch.tensor(REGION_LABELS[r], device=label.device)) for r in REGION_NAMES]).to(
        torch.float32
    )


class LabelToRegionsd(MapTransform):
    """Dictionary transform applying :func:`labels_to_regions` to label maps (ground truth or argmax prediction).

    Args:
        keys: keys of the label maps to convert.
        num_classes: 4 or 2, see :func:`region_names`.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = labels_to_regions(d[key], self.num_classes)
        return d


def _select_region(index: int) -> Callable:
    pred_and_label = from_engine(["pred", "label"])

    def transform(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds, labels = pred_and_label(output)
        return [p[index : index + 1] for p in preds], [y[index : index + 1] for y in labels]

    return transform


def region_dice_metrics(num_classes: int, prefix: str = "val") -> dict[str, MeanDice]:
    """One Dice metric per region, to be used as an evaluator's ``additional_metrics``.

    As MONAI's ``DiceMetric``, a case whose ground truth lacks a region is left out of that region's mean
    (evaluation with ``scripts.metrics_report`` applies the BraTS convention for such cases instead).

    Args:
        num_classes: 4 or 2, see :func:`region_names`.
        prefix: prefix of the metric names, e.g. ``val`` gives ``val_dice_wt``.

    Returns:
        a dict from metric name to ``MeanDice`` handler.
    """
    return {
        f"{prefix}_dice_{name.lower()}": MeanDice(include_background=True, output_transform=_select_region(i))
        for i, name in enumerate(region_names(num_classes))
    }
