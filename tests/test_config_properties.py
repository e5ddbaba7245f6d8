# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Every workflow config passes MONAI's bundle property checks, as the Model Zoo's unit tests require."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.separable_unet import SeparableUNet
from scripts.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "configs/train.json",
    "configs/distill.json",
    ["configs/train.json", "configs/evaluate.json"],
    ["configs/distill.json", "configs/evaluate.json"],
]


def check_properties(config_file, workflow_type: str, bundle_root: Path) -> list:
    """Initialise a config as the Model Zoo's unit tests do and return its missing or misreferenced properties."""
    workflow = ConfigWorkflow(
        config_file=config_file,
        meta_file="configs/metadata.json",
        logging_file="configs/logging.conf",
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        dataset_dir=str(bundle_root / "data"),
    )
    workflow.initialize()
    return workflow.check_properties()


@pytest.mark.parametrize(
    "config_file", CONFIGS, ids=lambda c: "+".join(Path(p).stem for p in ([c] if isinstance(c, str) else c))
)
def test_workflow_config_defines_every_training_property(config_file, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)  # the configs' %configs/... macros are relative to the bundle root
    write_synthetic_dataset(tmp_path / "data", num_cases=3, shape=(32, 32, 16))
    (tmp_path / "models").mkdir()  # distillation loads the teacher when it initialises
    teacher = SeparableUNet(3, 4, channels=(64, 128, 256, 512, 1024), dropout=0.5)
    torch.save(teacher.state_dict(), tmp_path / "models" / "teacher.pt")
    assert check_properties(config_file, "train", tmp_path) == []


def test_inference_config_defines_every_inference_property(tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    write_synthetic_dataset(tmp_path / "data", num_cases=1, shape=(32, 32, 16))
    assert check_properties("configs/inference.json", "infer", tmp_path) == []
