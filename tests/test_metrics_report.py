# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.brats_regions import labels_to_regions, region_names
from scripts.metrics_report import BraTSMetricsReport, case_metrics


def test_regions_follow_brats_definitions_of_internal_labels():
    label = torch.tensor([0, 1, 2, 3]).reshape(1, 4, 1, 1)
    regions = labels_to_regions(label, num_classes=4)[:, :, 0, 0]
    # WT = 1 + 2 + 3, TC = 1 + 3, ET = 3
    assert regions.tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert region_names(4) == ("WT", "TC", "ET")


def test_binary_task_is_evaluated_on_whole_tumour_only():
    label = torch.tensor([0, 1]).reshape(1, 2, 1, 1)
    assert labels_to_regions(label, num_classes=2)[:, :, 0, 0].tolist() == [[0, 1]]
    assert region_names(2) == ("WT",)
    with pytest.raises(ValueError, match="num_classes"):
        region_names(3)


def cube(shape, start, stop):
    volume = torch.zeros(shape)
    volume[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
    return volume


def test_case_metrics_match_hand_computed_dice_and_hd95_in_mm():
    shape = (20, 20, 20)
    label = cube(shape, (5, 5, 5), (10, 10, 10))[None]
    pred = cube(shape, (5, 5, 7), (10, 10, 12))[None]  # shifted by 2 voxels along z
    spacing = np.diag([2.0, 2.0, 2.0, 1.0])
    metrics = case_metrics(pred, MetaTensor(label, affine=torch.tensor(spacing)), ("WT",))
    assert metrics["dice_wt"] == pytest.approx(2 * 75 / 250)
    assert metrics["hd95_wt"] == pytest.approx(4.0)  # 2 voxels of 2 mm


def test_empty_regions_follow_the_brats_convention():
    shape = (10, 10, 10)
    empty = torch.zeros(1, *shape)
    tumour = cube(shape, (2, 2, 2), (5, 5, 5))[None]
    both_empty = case_metrics(empty, empty, ("ET",))
    assert both_empty == {"dice_et": 1.0, "hd95_et": 0.0}
    missed = case_metrics(empty, tumour, ("ET",))
    assert missed["dice_et"] == 0.0
    assert missed["hd95_et"] == pytest.approx(math.sqrt(3 * 10**2))


def test_report_writes_one_row_per_case_and_a_mean_row(tmp_path):
    report = BraTSMetricsReport(output_dir=str(tmp_path / "eval"), num_classes=4, filename="metrics_test.csv")
    shape = (1, 12, 12, 6)
    label = torch.zeros(shape)
    label[0, 3:8, 3:8, 1:5] = 2
    label[0, 4:6, 4:6, 2:4] = 3
    regions = labels_to_regions(label, 4)
    engine = SimpleNamespace(
        state=SimpleNamespace(
            batch=[{"case_id": "case_b"}, {"case_id": "case_a"}],
            output=[{"pred": regions, "label": regions}, {"pred": torch.zeros_like(regions), "label": regions}],
        )
    )
    report._reset(engine)
    report._collect(engine)
    report._write(engine)
    with open(report.path) as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["case_a", "case_b", "mean"]
    assert list(rows[0]) == ["case_id", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"]
    assert float(rows[1]["dice_wt"]) == 1.0 and float(rows[0]["dice_wt"]) == 0.0
    assert float(rows[2]["dice_wt"]) == 0.5
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.endswith(".tmp")]


def test_report_without_cases_fails_instead_of_writing_an_empty_table(tmp_path):
    report = BraTSMetricsReport(output_dir=str(tmp_path), num_classes=2)
    with pytest.raises(RuntimeError, match="no case"):
        report._write(SimpleNamespace())
    assert not (tmp_path / "metrics.csv").exists()
