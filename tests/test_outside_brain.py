# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Voxels outside the brain (every input sequence 0) are written as background, whatever the network predicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.brats_output import OutsideBrainToBackgroundd, brain_mask
from scripts.separable_unet import SeparableUNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = BUNDLE_ROOT.parent / "shared" / "data" / "brats_sample"
needs_sample = pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="../shared/data/brats_sample is not available")
MODALITIES = ("flair", "t1ce", "t2")  # the configs' default input sequences
ENHANCING = 3  # internal class


def tumour_everywhere_student(bundle: Path) -> Path:
    """A randomly initialised student whose head's bias makes it predict enhancing tumour on every voxel."""
    torch.manual_seed(0)
    network = SeparableUNet(in_channels=len(MODALITIES), out_channels=4)
    with torch.no_grad():
        network.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_voxels_outside_the_brain_become_background_and_brain_voxels_keep_their_class():
    image = torch.zeros(3, 6, 5, 4)
    image[0, 1:4, 1:3, 1:3] = torch.randn(3, 2, 2)  # brain seen by one channel only, z-scored values of either sign
    image[2, 2, 4, 3] = -0.5
    pred = MetaTensor(torch.full((1, 6, 5, 4), ENHANCING, dtype=torch.uint8), meta={"case_id": "c1"})
    out = OutsideBrainToBackgroundd(keys="pred")({"image": image, "pred": pred})["pred"]
    brain = (image != 0).any(dim=0, keepdim=True)
    assert torch.equal(out.as_tensor(), torch.where(brain, ENHANCING, 0).to(torch.uint8))
    assert isinstance(out, MetaTensor) and out.meta["case_id"] == "c1"


def test_float_label_maps_of_several_keys_are_masked_alike():
    image = torch.zeros(2, 4, 4, 2)
    image[1, :2] = 1.0
    data = {"image": image, "pred": torch.full((1, 4, 4, 2), 2.0), "pred_teacher": torch.ones(1, 4, 4, 2)}
    out = OutsideBrainToBackgroundd(keys=["pred", "pred_teacher"])(data)
    for key, value in (("pred", 2.0), ("pred_teacher", 1.0)):
        assert out[key].dtype == torch.float32
        assert (out[key][:, :2] == value).all() and not out[key][:, 2:].any()


def test_brain_mask_is_any_nonzero_channel():
    image = torch.tensor([[[[0.0, 1.0, 0.0]]], [[[0.0, 0.0, -2.0]]]])  # (2, 1, 1, 3)
    assert brain_mask(image).tolist() == [[[[False, True, True]]]]


def test_prediction_on_another_grid_is_rejected_naming_the_case():
    image = MetaTensor(torch.ones(3, 8, 8, 4), meta={"case_id": "BraTS20_Training_007", "brats_layout": "brats2020"})
    with pytest.raises(ValueError, match=r"case BraTS20_Training_007: prediction 'pred' has spatial shape \(8, 8, 5\)"):
        OutsideBrainToBackgroundd(keys="pred")({"image": image, "pred": torch.ones(1, 8, 8, 5)})


@pytest.mark.slow
@needs_sample
def test_inference_config_writes_no_tumour_outside_the_brain_of_a_real_case(tmp_path):
    bundle = tumour_everywhere_student(tmp_path / "bundle")
    out = tmp_path / "seg"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--bundle_root", str(bundle), "--dataset_dir", str(SHARED_SAMPLE), "--output_dir", str(out),
         "--device", "$torch.device('cpu')"],
        cwd=BUNDLE_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (case,) = sorted(SHARED_SAMPLE.iterdir())
    written = np.asanyarray(nib.load(out / f"{case.name}_seg.nii.gz").dataobj)
    brain = np.zeros(written.shape, dtype=bool)
    for sequence in MODALITIES:
        brain |= np.asanyarray(nib.load(case / f"{case.name}_{sequence}.nii.gz").dataobj) != 0
    assert 0 < brain.sum() < brain.size
    assert not written[~brain].any()
    assert (written[brain] == 4).all()  # the network's enhancing tumour (4 in BraTS 2020 files), kept in the brain


@pytest.mark.slow
@needs_sample
def test_evaluation_path_scores_no_tumour_outside_the_brain_of_a_real_case(tmp_path):
    bundle = tumour_everywhere_student(tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config([BUNDLE_ROOT / "configs" / "train.json", BUNDLE_ROOT / "configs" / "evaluate.json"])
    parser.update(
        {"bundle_root": str(bundle), "dataset_dir": str(SHARED_SAMPLE), "output_dir": str(tmp_path / "eval"),
         "device": "$torch.device('cpu')", "infer_batch_size": 8}
    )  # fmt: skip
    # keep the checkpoint loader only: the masking under test is postprocessing, the metrics report is not
    parser["validate#handlers"] = parser["validate#handlers"][:1]
    with pytest.warns(UserWarning, match="too few for a split"):  # one case: every split holds it
        evaluator = parser.get_parsed_content("validate#evaluator")
    outputs: list[dict] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.extend(engine.state.output))
    evaluator.run()
    (output,) = outputs
    regions = output["pred"].as_tensor().bool()  # WT, TC, ET
    brain = (output["image"].as_tensor() != 0).any(dim=0)
    assert 0 < int(brain.sum()) < brain.numel()
    assert not regions[:, ~brain].any()
    assert regions[:, brain].all()
