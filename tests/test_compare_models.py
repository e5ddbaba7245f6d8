# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch

from scripts.teacher import TeacherCheckpointError
from tools.bundle_config import DISTILL_CONFIGS, TEACHER_CONFIGS, bundle_configs, load_config
from tools.compare_models import compare_models
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])
SMALL_TEACHER = {"teacher_def#channels": [8, 16, 32, 64, 128]}  # keeps the test fast
ROW_NAMES = ("Teacher", "Student alone", "Student distilled (KD)")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three untrained checkpoints (teacher, student alone, distilled student) compared on a 3-patient dataset."""
    root = tmp_path_factory.mktemp("compare")
    dataset_dir = root / "data"
    write_synthetic_dataset(dataset_dir, num_cases=3, shape=(32, 32, 16))
    parser = load_config(bundle_configs(BUNDLE_ROOT, DISTILL_CONFIGS), BUNDLE_ROOT, str(dataset_dir), SMALL_TEACHER)
    checkpoints, networks = {}, {}
    for seed, (key, config_id) in enumerate(
        (("teacher", "teacher_def"), ("student_alone", "network_def"), ("student_kd", "network_def"))
    ):
        torch.manual_seed(seed)
        networks[key] = parser.get_parsed_content(config_id, lazy=False)  # a fresh instance per model
        checkpoints[key] = str(root / f"{key}.pt")
        torch.save(networks[key].state_dict(), checkpoints[key])
    results = compare_models(
        str(dataset_dir),
        str(root / "results"),
        bundle_root=BUNDLE_ROOT,
        teacher_ckpt=checkpoints["teacher"],
        baseline_ckpt=checkpoints["student_alone"],
        student_ckpt=checkpoints["student_kd"],
        latency_repeats=1,
        overrides=SMALL_TEACHER,
    )
    return {"results": results, "networks": networks, "checkpoints": checkpoints, "dataset_dir": dataset_dir}


def test_markdown_table_has_one_row_per_model_and_the_expected_columns(comparison):
    text = Path(comparison["results"]["files"]["markdown"]).read_text()
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == [
        "Model",
        "Parameters",
        "GFLOPs / 128x128 slice",
        "Dice WT",
        "Dice TC",
        "Dice ET",
        "HD95 WT (mm)",
        "HD95 TC (mm)",
        "HD95 ET (mm)",
        "CPU latency / volume (s)",
    ]
    assert [row.strip("|").split("|")[0].strip() for row in table[2:]] == list(ROW_NAMES)
    assert "Split `test` (1 cases)" in lines[0] and "comparison_cases.csv" in lines[0]
    assert "32x32x16" in lines[0]


def test_json_holds_in_range_per_case_metrics_of_every_model(comparison):
    results = json.loads(Path(comparison["results"]["files"]["json"]).read_text())
    assert results["split"] == "test" and results["num_cases"] == 1
    assert [m["name"] for m in results["models"].values()] == list(ROW_NAMES)
    for model in results["models"].values():
        (case,) = model["cases"]
        assert case["case_id"].startswith("SynBraTS_")
        for region in ("wt", "tc", "et"):
            assert 0.0 <= case[f"dice_{region}"] <= 1.0
            assert case[f"hd95_{region}"] >= 0.0
        assert 0.0 <= model["metrics"]["mean_dice"] <= 1.0
        assert model["latency_s"] > 0.0


def test_csv_has_one_row_per_model_and_case(comparison):
    with open(comparison["results"]["files"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [row["model"] for row in rows] == ["teacher", "student_alone", "student_kd"]
    assert all(0.0 <= float(row["dice_wt"]) <= 1.0 for row in rows)


def test_figure_is_a_valid_png(comparison):
    path = comparison["results"]["files"]["figure"]
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 500


def test_reported_parameter_counts_are_the_networks_counts(comparison):
    for key, network in comparison["networks"].items():
        expected = sum(p.numel() for p in network.parameters())
        assert comparison["results"]["models"][key]["parameters"] == expected
    assert comparison["results"]["models"]["student_kd"]["parameters"] == 605_679


def _compare_with_checkpoints(comparison: dict, tmp_path, **checkpoints: str) -> None:
    """``compare_models`` on the fixture's data and checkpoints, with some checkpoints replaced."""
    paths = {**comparison["checkpoints"], **checkpoints}
    compare_models(
        str(comparison["dataset_dir"]),
        str(tmp_path / "results"),
        bundle_root=BUNDLE_ROOT,
        teacher_ckpt=paths["teacher"],
        baseline_ckpt=paths["student_alone"],
        student_ckpt=paths["student_kd"],
        overrides=SMALL_TEACHER,
    )


def test_checkpoint_of_another_architecture_is_rejected_naming_model_and_file(comparison, tmp_path):
    with pytest.raises(TeacherCheckpointError, match="Student distilled \\(KD\\) checkpoint .*teacher.pt"):
        _compare_with_checkpoints(comparison, tmp_path, student_kd=comparison["checkpoints"]["teacher"])


def test_missing_checkpoint_is_reported_with_its_model_and_path(comparison, tmp_path):
    missing = str(tmp_path / "nowhere" / "student_alone.pt")
    with pytest.raises(FileNotFoundError, match="Student alone checkpoint .*nowhere/student_alone.pt"):
        _compare_with_checkpoints(comparison, tmp_path, student_alone=missing)
    assert not (tmp_path / "results").exists()


def test_missing_teacher_checkpoint_says_which_configs_train_it(comparison, tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/train.json with configs/teacher.json merged on it"):
        _compare_with_checkpoints(comparison, tmp_path, teacher=str(tmp_path / "teacher.pt"))


def test_config_list_is_merged_in_order_like_the_bundle_runner():
    teacher = load_config(bundle_configs(BUNDLE_ROOT, TEACHER_CONFIGS), BUNDLE_ROOT, ".")
    distill = load_config(bundle_configs(BUNDLE_ROOT, DISTILL_CONFIGS), BUNDLE_ROOT, ".")
    network, teacher_def = teacher.get_parsed_content("network_def"), distill.get_parsed_content("teacher_def")
    assert {k: v.shape for k, v in network.state_dict().items()} == {
        k: v.shape for k, v in teacher_def.state_dict().items()
    }
    assert teacher.get_parsed_content("ckpt_name") == "teacher.pt"
    assert distill.get_parsed_content("ckpt_name") == "model.pt"
