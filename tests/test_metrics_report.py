# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import csv
import math

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from scripts.brats_regions import labels_to_regions, region_names, regions_to_labels
from scripts.metrics_report import BraTSMetricsReport, case_metrics
from scripts.official_metrics import METRIC_COLUMNS, SUMMARY_ROWS, evaluate_case, metrics_table


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


def test_region_channels_convert_back_to_the_internal_labels():
    label = torch.tensor([0, 1, 2, 3, 0, 3]).reshape(1, 6, 1, 1)
    assert torch.equal(regions_to_labels(labels_to_regions(label, 4)), label.to(torch.uint8))
    assert regions_to_labels(labels_to_regions(label > 0, 2)).flatten().tolist() == [0, 1, 1, 1, 0, 1]


def test_case_metrics_are_the_official_ones_of_the_label_maps_with_the_voxel_size():
    shape = (20, 20, 20)
    label = torch.zeros(1, *shape, dtype=torch.uint8)
    label[0, 5:12, 5:12, 5:12] = 2
    label[0, 7:10, 7:10, 7:10] = 3
    pred = torch.roll(label, 2, dims=3)  # shifted by 2 voxels along z
    spacing = (3.0, 3.0, 3.0)
    metrics = case_metrics(
        labels_to_regions(pred, 4),
        MetaTensor(labels_to_regions(label, 4), affine=torch.diag(torch.tensor([*spacing, 1.0]))),
        region_names(4),
    )
    rows = metrics_table({"case": evaluate_case(pred, label, "internal", spacing)})
    assert metrics == {name: value for name, value in rows[0].items() if name != "case_id"}
    assert metrics["dice_wt"] == pytest.approx(2 * 7 * 7 * 5 / (2 * 7**3))
    # lesion-wise HD95 is in mm (3 mm voxels, from the label's affine); the package's legacy HD95 is in voxels
    assert (metrics["hd95_wt"], metrics["lesion_hd95_wt"]) == (2.0, 6.0)


def test_a_region_empty_in_both_is_nan_and_a_missed_one_is_penalised():
    shape = (1, 10, 10, 10)
    empty = torch.zeros(shape)
    tumour = torch.zeros(shape)
    tumour[0, 2:5, 2:5, 2:5] = 1
    both_empty = case_metrics(empty, empty, ("WT",))
    assert math.isnan(both_empty["dice_wt"]) and math.isnan(both_empty["hd95_wt"])
    missed = case_metrics(empty, tumour, ("WT",))
    assert (missed["dice_wt"], missed["hd95_wt"], missed["lesion_fn_wt"]) == (0.0, 373.0, 1.0)


def test_regions_other_than_the_tasks_are_refused():
    with pytest.raises(ValueError, match="region channels"):
        case_metrics(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), ("ET",))


def _evaluate(report: BraTSMetricsReport, batches: list[tuple[list[dict], list[dict]]]) -> None:
    """Run the report on an ignite engine whose iterations give these (batch, output) pairs, as the evaluator's do."""

    def step(engine: Engine, item: tuple[list[dict], list[dict]]) -> list[dict]:
        engine.state.batch = item[0]  # the decollated batch, as MONAI's evaluator leaves it
        return item[1]

    evaluator = Engine(step)
    report.attach(evaluator)
    evaluator.run(batches, max_epochs=1)


def test_report_writes_one_row_per_case_and_a_mean_row(tmp_path):
    report = BraTSMetricsReport(output_dir=str(tmp_path / "eval"), num_classes=4, filename="metrics_test.csv")
    shape = (1, 12, 12, 6)
    label = torch.zeros(shape)
    label[0, 3:8, 3:8, 1:5] = 2
    label[0, 4:6, 4:6, 2:4] = 3
    regions = labels_to_regions(label, 4)
    batch = [{"case_id": "case_b"}, {"case_id": "case_a"}]
    output = [{"pred": regions, "label": regions}, {"pred": torch.zeros_like(regions), "label": regions}]
    _evaluate(report, [(batch, output)])
    with open(report.path) as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["case_a", "case_b", *SUMMARY_ROWS]
    assert list(rows[0]) == ["case_id"] + [f"{m}_{r}" for m in METRIC_COLUMNS for r in ("wt", "tc", "et")]
    assert float(rows[1]["dice_wt"]) == 1.0 and float(rows[0]["dice_wt"]) == 0.0
    assert float(rows[0]["hd95_et"]) == 373.0 and float(rows[1]["lesion_tp_tc"]) == 1.0
    assert float(rows[2]["dice_wt"]) == 0.5 and float(rows[4]["dice_wt"]) == 0.5  # mean and median
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.endswith(".tmp")]


def test_report_without_cases_fails_instead_of_writing_an_empty_table(tmp_path):
    report = BraTSMetricsReport(output_dir=str(tmp_path), num_classes=2)
    with pytest.raises(RuntimeError, match="no case"):
        _evaluate(report, [([], [])])
    assert not (tmp_path / "metrics.csv").exists()
