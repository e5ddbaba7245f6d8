# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Per-epoch validation Dice: a region absent from both prediction and label is left out, not scored 0."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import from_engine

from scripts.brats_regions import RegionMeanDice, labels_to_regions, region_dice_metrics


def case(pred_labels: list[int], true_labels: list[int]) -> dict[str, torch.Tensor]:
    """One decollated evaluator output: 2 x 2 x 1 internal label maps as region channels (WT, TC, ET)."""
    as_regions = [labels_to_regions(torch.tensor(v).reshape(1, 2, 2, 1), 4) for v in (pred_labels, true_labels)]
    return {"pred": as_regions[0], "label": as_regions[1]}


def validate(cases: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The metrics of configs/train.json's validation (key metric and per-region ones) over ``cases``."""
    engine = Engine(lambda engine, batch: batch)
    RegionMeanDice(output_transform=from_engine(["pred", "label"])).attach(engine, "val_mean_dice")
    for name, metric in region_dice_metrics(4).items():
        metric.attach(engine, name)
    return engine.run([[c] for c in cases]).metrics


def test_a_case_without_enhancing_tumour_in_prediction_and_label_leaves_et_out():
    metrics = validate([case([0, 2, 2, 1], [0, 2, 2, 1])])  # perfect WT and TC, no ET anywhere
    assert math.isnan(metrics["val_dice_et"])  # not 0: the region was not there to be found
    assert metrics["val_dice_wt"] == metrics["val_dice_tc"] == 1.0
    assert metrics["val_mean_dice"] == 1.0  # the mean of WT and TC only


def test_enhancing_tumour_predicted_where_there_is_none_scores_zero():
    metrics = validate([case([0, 2, 3, 1], [0, 2, 3, 1]), case([0, 2, 3, 1], [0, 2, 2, 1])])
    assert metrics["val_dice_et"] == 0.5  # 1 for the first case, 0 for the false positive


def test_regions_absent_from_both_are_left_out_of_the_mean_over_cases():
    metrics = validate([case([0, 3, 0, 0], [0, 3, 3, 0]), case([0, 0, 0, 0], [0, 0, 0, 0])])
    assert metrics["val_dice_et"] == pytest.approx(2 / 3)  # the empty case counts for no region
    assert metrics["val_mean_dice"] == pytest.approx(2 / 3)
