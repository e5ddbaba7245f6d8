# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""BraTS evaluation regions (whole tumour, tumour core, enhancing tumour) from internal label maps."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric
from monai.metrics.utils import do_metric_reduction
from monai.transforms import MapTransform
from monai.utils import MetricReduction

__all__ = [
    "REGION_NAMES",
    "region_names",
    "labels_to_regions",
    "region_voxel_counts",
    "regions_to_labels",
    "LabelToRegionsd",
    "RegionDiceMetric",
    "RegionMeanDice",
    "region_dice_metrics",
]

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


def region_voxel_counts(label: torch.Tensor, num_classes: int) -> dict[str, int]:
    """Number of voxels of each region in a map of internal labels, as :func:`labels_to_regions` defines them.

    One histogram of the labels (``torch.bincount``) instead of one mask per region: about 50 times faster than
    :func:`labels_to_regions` on a uint8 BraTS volume.

    Args:
        label: tensor of internal class indices (any shape, any integer or integral float dtype).
        num_classes: 4 or 2, see :func:`region_names`.

    Returns:
        ``{region name: voxel count}`` in the order of :func:`region_names`, e.g. ``{"WT": 812, "TC": 301, "ET": 95}``.
    """
    names = region_names(num_classes)
    flat = torch.as_tensor(label).as_subclass(torch.Tensor).flatten()
    if flat.is_floating_point() or flat.dtype == torch.bool:
        flat = flat.long()  # integer dtypes are counted as they are: no 8-byte copy of a uint8 label map
    counts = torch.bincount(flat, minlength=num_classes).tolist()
    if num_classes == 2:
        return {names[0]: int(sum(counts[1:]))}
    return {name: int(sum(counts[value] for value in REGION_LABELS[name])) for name in names}


def regions_to_labels(regions: torch.Tensor) -> torch.Tensor:
    """Convert nested region channels back to a map of internal labels, the inverse of :func:`labels_to_regions`.

    With the three BraTS regions, enhancing tumour (ET) becomes 3, the rest of the tumour core (TC) 1 and the rest
    of the whole tumour (WT) 2; with whole tumour alone (the binary task) the tumour becomes 1.

    Args:
        regions: tensor of shape (3, *spatial) holding WT, TC, ET, or (1, *spatial) holding WT, as
            :func:`labels_to_regions` gives them (any non-zero value is inside the region).

    Returns:
        uint8 tensor of shape (1, *spatial) of internal labels, on the device of ``regions``, metadata kept for a
        ``MetaTensor`` input.

    Raises:
        ValueError: if ``regions`` has neither 1 nor 3 channels.
    """
    inside = regions != 0
    if inside.shape[0] == 1:
        return inside.to(torch.uint8)
    if inside.shape[0] != len(REGION_NAMES):
        raise ValueError(f"expected 1 (WT) or 3 (WT, TC, ET) region channels, got {inside.shape[0]}.")
    whole, core, enhancing = inside
    labels = torch.where(enhancing, 3, torch.where(core, 1, torch.where(whole, 2, 0)))
    return labels[None].to(torch.uint8)


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


class RegionDiceMetric(DiceMetric):
    """Dice per region channel that leaves out a region absent from both prediction and ground truth.

    MONAI's ``DiceMetric`` either scores such a region 1 (``ignore_empty=False``) or leaves out every case whose
    ground truth lacks the region, false positives included (``ignore_empty=True``). Here, as in the official BraTS
    evaluation, a region empty in both is NaN and left out of the means, while a region predicted where the ground
    truth has none (or missed where it has one) scores 0. A mean over no case at all is NaN, not 0.

    Args:
        reduction: as ``DiceMetric``'s (over cases and channels, NaN left out), ``"mean"`` by default.
        get_not_nans: whether ``aggregate`` also returns the number of cases and channels counted.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__(include_background=True, reduction=reduction, get_not_nans=get_not_nans, ignore_empty=False)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Dice of shape (batch, channels): NaN where both the prediction and the ground truth are empty.

        Args:
            y_pred: binary prediction of shape (batch, channels, *spatial).
            y: binary ground truth of the same shape.

        Returns:
            the Dice of every case and channel.
        """
        dice = super()._compute_tensor(y_pred, y)
        both_empty = ~(y_pred.flatten(2).any(-1) | y.flatten(2).any(-1))
        return dice.masked_fill(both_empty.to(dice.device), float("nan"))

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Mean (or other reduction) of the collected Dice, NaN left out; NaN where nothing was counted.

        Args:
            reduction: overrides the constructor's reduction.

        Returns:
            the reduced Dice, and the number of values counted when ``get_not_nans`` is set.
        """
        dice, not_nans = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        dice = torch.where(not_nans > 0, dice, torch.full_like(dice, float("nan")))
        return (dice, not_nans) if self.get_not_nans else dice


class RegionMeanDice(IgniteMetricHandler):
    """Ignite metric handler of :class:`RegionDiceMetric`: mean Dice over cases and region channels.

    Args:
        output_transform: extracts ``(y_pred, y)`` from the engine's output, as for MONAI's ``MeanDice``.
        save_details: whether each case's Dice is saved in ``engine.state.metric_details``.
    """

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(metric_fn=RegionDiceMetric(), output_transform=output_transform, save_details=save_details)


def _select_region(index: int) -> Callable:
    pred_and_label = from_engine(["pred", "label"])

    def transform(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds, labels = pred_and_label(output)
        return [p[index : index + 1] for p in preds], [y[index : index + 1] for y in labels]

    return transform


def region_dice_metrics(num_classes: int, prefix: str = "val") -> dict[str, RegionMeanDice]:
    """One Dice metric per region, to be used as an evaluator's ``additional_metrics``.

    A case whose prediction and ground truth both lack a region is left out of that region's mean, and a region
    no case has is NaN (see :class:`RegionDiceMetric`).

    Args:
        num_classes: 4 or 2, see :func:`region_names`.
        prefix: prefix of the metric names, e.g. ``val`` gives ``val_dice_wt``.

    Returns:
        a dict from metric name to ``RegionMeanDice`` handler.
    """
    return {
        f"{prefix}_dice_{name.lower()}": RegionMeanDice(output_transform=_select_region(i))
        for i, name in enumerate(region_names(num_classes))
    }
