# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Every config runs as the Model Zoo's ``ci/unit_tests`` run bundles: ``ConfigWorkflow`` from another folder.

The zoo's tests start in the zoo's root, put the bundle root on ``sys.path`` and give every config by its full path
(two-config workflows as a list), then call ``initialize``, ``check_properties``, ``run`` and ``finalize``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = BUNDLE_ROOT / "configs"
TINY = {"epochs": 1, "patch_size": 32, "patches_per_case": 2, "batch_size": 2, "infer_batch_size": 16}

# in the order a user runs them: each later workflow reads the checkpoints the earlier ones wrote
WORKFLOWS = [
    ("train", ["train.json"], TINY),
    ("train", ["train.json", "teacher.json"], TINY),
    ("train", ["train.json", "distill.json"], TINY),
    ("train", ["train.json", "evaluate.json"], {}),
    ("infer", ["inference.json"], {}),
]


def run_workflow(workflow_type: str, configs: list[str], bundle_root: Path, **override) -> None:
    """Run one workflow as the zoo's ``check_workflow`` does; fail on any missing or misreferenced property."""
    workflow = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[str(CONFIG_DIR / name) for name in configs],
        meta_file=str(CONFIG_DIR / "metadata.json"),
        logging_file=str(CONFIG_DIR / "logging.conf"),
        bundle_root=str(bundle_root),
        device="$torch.device('cpu')",
        **override,
    )
    workflow.initialize()
    assert workflow.check_properties() == [], f"{configs}: properties missing or misreferenced"
    workflow.run()
    workflow.finalize()


@pytest.mark.slow
def test_every_config_runs_through_config_workflow_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may resolve against the working directory
    dataset = tmp_path / "data"
    write_synthetic_dataset(dataset, num_cases=4, shape=(32, 32, 16))
    root = tmp_path / "bundle"
    for workflow_type, configs, override in WORKFLOWS:
        run_workflow(workflow_type, configs, root, dataset_dir=str(dataset), **override)
    assert {p.name for p in (root / "models").glob("*.pt")} == {"model.pt", "model_last.pt", "teacher.pt",
                                                                  "teacher_last.pt"}  # fmt: skip
    assert (root / "eval" / "metrics_test.csv").is_file()
    written = sorted((root / "eval" / "segmentations").rglob("*.nii.gz"))
    assert len(written) == 4, written
    assert torch.load(root / "models" / "model.pt", weights_only=True)["head.weight"].shape[0] == 4
