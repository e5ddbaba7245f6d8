# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""After inference, every segmentation's tumour volume per region in mL: logged, checked, written as one CSV."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from scripts.brats_regions import labels_to_regions, region_voxel_counts
from scripts.tumour_volumes import TumourVolumeReport, TumourVolumesd

LOGGER = "TumourVolumeReport"


def test_region_voxel_counts_are_those_of_the_region_masks():
    label = torch.randint(0, 4, (1, 9, 7, 5), generator=torch.Generator().manual_seed(0))
    for num_classes, labels in ((4, label), (2, label.clamp(max=1))):
        masks = labels_to_regions(labels, num_classes).flatten(1).sum(1).int().tolist()
        assert list(region_voxel_counts(labels, num_classes).values()) == masks


def test_volumes_are_in_millilitres_from_the_voxel_size_of_the_affine():
    image = MetaTensor(torch.zeros(3, 10, 10, 10), affine=torch.diag(torch.tensor([-2.0, 1.0, 1.5, 1.0])))
    image[1, :, :, :4] = 1.0  # a brain of 400 voxels of 3 mm^3
    label = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    label[0, 0, 0, :3] = torch.tensor([1, 2, 3])  # necrotic core, edema, enhancing: one voxel each
    volumes = TumourVolumesd("pred")({"image": image, "pred": label})["tumour_volumes"]
    assert volumes == pytest.approx({"wt_ml": 0.009, "tc_ml": 0.006, "et_ml": 0.003, "brain_ml": 1.2})


def report_cases(tmp_path, cases: dict[str, dict[str, float]], **kwargs) -> TumourVolumeReport:
    """Run an engine whose output is ``cases`` (case id -> volumes) through the report, as the inference does."""
    batches = [
        [{"case_id": case_id, "volumes": volumes}] for case_id, volumes in cases.items()
    ]  # decollated batches of one case, as SupervisedEvaluator's state.batch

    def segment(engine: Engine, batch: list[dict]) -> list[dict]:
        saved = str(tmp_path / f"{batch[0]['case_id']}_seg.nii.gz")
        return [{"pred": MetaTensor(torch.zeros(1), meta={"saved_to": saved}), "tumour_volumes": batch[0]["volumes"]}]

    engine = Engine(segment)
    report = TumourVolumeReport(str(tmp_path), **kwargs)
    report.attach(engine)
    engine.run(batches)
    return report


def test_one_csv_row_per_segmentation_with_the_file_written(tmp_path):
    volumes = {"wt_ml": 80.0, "tc_ml": 30.5, "et_ml": 20.25, "brain_ml": 1400.0}
    report = report_cases(tmp_path, {"BraTS20_Training_001": volumes, "BraTS20_Training_002": volumes})
    with open(report.path, newline="") as f:
        rows = list(csv.reader(f))
    assert report.path == str(tmp_path / "tumour_volumes.csv")
    assert rows[0] == ["case_id", "file", "wt_ml", "tc_ml", "et_ml", "brain_ml"]
    assert rows[1] == [
        "BraTS20_Training_001", str(tmp_path / "BraTS20_Training_001_seg.nii.gz"), "80.000", "30.500", "20.250",
        "1400.000",
    ]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["BraTS20_Training_001", "BraTS20_Training_002"]


def test_a_whole_tumour_above_the_share_of_the_brain_is_warned_naming_the_case_and_file(tmp_path, caplog):
    logging.getLogger(LOGGER).disabled = False  # a bundle run in this process may have disabled it
    caplog.set_level(logging.INFO, logger=LOGGER)
    plausible = {"wt_ml": 232.0, "tc_ml": 80.0, "et_ml": 40.0, "brain_ml": 1400.0}  # 16.6%: the largest real case
    implausible = {**plausible, "wt_ml": 750.0}  # 54% of the brain
    report_cases(tmp_path, {"plausible": plausible, "implausible": implausible, "empty": dict.fromkeys(plausible, 0.0)})
    records = [r for r in caplog.records if r.name == LOGGER]
    [warning] = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warning.startswith(f"case implausible: implausible segmentation {tmp_path / 'implausible_seg.nii.gz'}")
    assert "whole tumour is 54% of the brain, above max_tumour_share 50%" in warning
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert info[0] == (
        f"case plausible: WT 232.0 mL, TC 80.0 mL, ET 40.0 mL (16.6% of the brain's 1400.0 mL) in "
        f"{tmp_path / 'plausible_seg.nii.gz'}"
    )
    assert info[-1].endswith("tumour_volumes.csv; implausible: implausible")


def test_the_volume_file_cannot_take_the_name_of_a_segmentation():
    with pytest.raises(ValueError, match="must be a .csv"):
        TumourVolumeReport("out", filename="tumour_volumes.nii.gz")


def test_binary_task_reports_the_whole_tumour_alone(tmp_path):
    image = MetaTensor(torch.ones(1, 4, 4, 4), affine=np.eye(4))
    volumes = TumourVolumesd("pred", num_classes=2)({"image": image, "pred": torch.ones(1, 4, 4, 4)})["tumour_volumes"]
    report = report_cases(tmp_path, {"case": volumes}, num_classes=2)
    with open(report.path, newline="") as f:
        assert list(csv.reader(f)) == [
            ["case_id", "file", "wt_ml", "brain_ml"],
            ["case", report.rows[0]["file"], "0.064", "0.064"],
        ]
