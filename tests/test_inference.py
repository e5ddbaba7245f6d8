# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""configs/inference.json: whole folders and one-file studies, written back in the input's geometry and labels."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, SaveImaged

from scripts.brats_data import BraTSDataError, find_cases
from scripts.brats_output import ToReleaseLabelsd, output_postfix
from scripts.label_convention import MONAI_LABEL_ENVIRONMENT_VARIABLE
from scripts.separable_unet import SeparableUNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def constant_student(tmp_path: Path, internal_class: int) -> Path:
    """A student checkpoint predicting ``internal_class`` everywhere, so output label values are known."""
    network = SeparableUNet(in_channels=3, out_channels=4)
    state = network.state_dict()
    state["head.weight"].zero_()
    state["head.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(internal_class), 4).float() * 10)
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp_path / "models" / "model.pt")
    return tmp_path


def first_file(case: dict) -> str:
    return case["image"] if isinstance(case["image"], str) else case["image"][0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, internal_class, release_value",
    [("brats2020", 3, 4), ("brats2023", 3, 3), ("msd", 1, 2)],  # enhancing is 4 in 2020; MSD's core is 2
)
def test_folder_inference_writes_each_case_in_its_input_geometry_and_release_labels(
    tmp_path, make_brats_folder, layout, internal_class, release_value
):
    bundle = constant_student(tmp_path / "bundle", internal_class)
    data = make_brats_folder(tmp_path / layout, layout, num_cases=2, shape=(20, 24, 8), labels_present=False)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out)],
        cwd=BUNDLE_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cases = find_cases(data, require_label=False)
    segmentations = [f"{c['case_id']}_seg.nii.gz" for c in cases]
    assert sorted(p.name for p in out.iterdir()) == sorted([*segmentations, "tumour_volumes.csv"])
    with open(out / "tumour_volumes.csv", newline="") as f:
        volumes = list(csv.DictReader(f))
    assert [(v["case_id"], Path(v["file"]).name) for v in volumes] == [
        (c["case_id"], s) for c, s in zip(cases, segmentations)
    ]
    # the student predicts tumour on every brain voxel: the whole tumour is the brain, an implausible one
    assert all(float(v["wt_ml"]) == float(v["brain_ml"]) > 0 for v in volumes)
    assert "implausible segmentation" in result.stdout + result.stderr
    for case in cases:
        source = nib.load(first_file(case))
        written = nib.load(out / f"{case['case_id']}_seg.nii.gz")
        assert written.shape == source.shape[:3]
        np.testing.assert_allclose(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        assert np.unique(np.asanyarray(written.dataobj)).tolist() == [0, release_value]  # 0: outside the brain


@pytest.mark.slow
def test_output_convention_override_writes_internal_labels(tmp_path, make_brats_folder):
    bundle = constant_student(tmp_path / "bundle", 3)
    data = make_brats_folder(tmp_path / "brats2020", "brats2020", num_cases=1, labels_present=False)
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out),
         "--output_convention", "internal"],
        cwd=BUNDLE_ROOT, check=True, capture_output=True,
    )  # fmt: skip
    written = nib.load(out / "BraTS20_Training_001_seg.nii.gz")
    assert np.unique(np.asanyarray(written.dataobj)).tolist() == [0, 3]


@pytest.fixture
def monai_label_environment(tmp_path, monkeypatch) -> None:
    """The environment of a MONAI Label server: ``monailabel start_server`` exports ``MONAI_LABEL_APP_DIR``."""
    monkeypatch.setenv(MONAI_LABEL_ENVIRONMENT_VARIABLE, str(tmp_path / "app"))


def monai_label_style_pipeline(bundle: Path, **overrides: str):
    """What MONAI Label runs: the config's preprocessing, inferer and network, postprocessing minus SaveImaged."""
    parser = ConfigParser()
    parser.read_config(BUNDLE_ROOT / "configs" / "inference.json")
    parser.update({"bundle_root": str(bundle), **overrides})
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    pre = parser.get_parsed_content("preprocessing")
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)])
    inferer = parser.get_parsed_content("inferer")

    def segment(path: str) -> dict:
        data = pre({"image": path})
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None], network.eval())[0]
        return post(data)

    return segment


@pytest.mark.parametrize("layout, sequence", [("brats2020", "t1ce"), ("brats2023", "t2f")])
def test_one_file_study_finds_its_sibling_sequences(
    tmp_path, make_brats_folder, monai_label_environment, layout, sequence
):
    bundle = constant_student(tmp_path / "bundle", 3)
    data = make_brats_folder(tmp_path / layout, layout, num_cases=1, shape=(20, 24, 8))
    study = next(data.glob(f"*/*{sequence}.nii.gz"))
    result = monai_label_style_pipeline(bundle)(str(study))
    pred = result["pred"]
    assert pred.dtype == torch.uint8
    assert tuple(pred.shape) == (1, 20, 24, 8)
    np.testing.assert_allclose(pred.affine.numpy(), nib.load(study).affine)
    assert torch.unique(pred).tolist() == [0, 3]  # 0 outside the brain; enhancing as channel_def names it (2020: 4)


@pytest.mark.parametrize(
    "layout, internal_class", [("brats2020", 3), ("brats2023", 3), ("msd", 1), ("msd", 2)]
)  # 2020's enhancing is 4 and MSD's core and edema are 2 and 1 in their releases
def test_monai_label_gets_labels_in_the_values_channel_def_names_for_every_layout(
    tmp_path, make_brats_folder, monai_label_environment, layout, internal_class
):
    bundle = constant_student(tmp_path / "bundle", internal_class)
    data = make_brats_folder(tmp_path / layout, layout, num_cases=1, labels_present=False)
    study = first_file(find_cases(data, require_label=False)[0])
    pred = monai_label_style_pipeline(bundle)(study)["pred"]
    names = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]
    expected_name = {1: "necrotic and non-enhancing tumour core", 2: "peritumoral edema", 3: "enhancing tumour"}
    [outside_the_brain, value] = torch.unique(pred).tolist()
    assert outside_the_brain == 0
    assert names["pred"]["channel_def"][str(value)] == expected_name[internal_class]


def test_label_convention_release_keeps_release_values_in_a_monai_label_environment(
    tmp_path, make_brats_folder, monai_label_environment
):
    bundle = constant_student(tmp_path / "bundle", 3)
    data = make_brats_folder(tmp_path / "brats2020", "brats2020", num_cases=1, labels_present=False)
    study = first_file(find_cases(data, require_label=False)[0])
    pred = monai_label_style_pipeline(bundle, label_convention="release")(study)["pred"]
    assert torch.unique(pred).tolist() == [0, 4]


def test_one_file_study_accepts_a_multichannel_nifti(tmp_path, monai_label_environment):
    bundle = constant_student(tmp_path / "bundle", 2)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    image = np.random.default_rng(0).normal(100, 10, (16, 32, 6, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "study.nii.gz")
    pred = monai_label_style_pipeline(bundle)(str(tmp_path / "study.nii.gz"))["pred"]
    assert tuple(pred.shape) == (1, 16, 32, 6)
    np.testing.assert_allclose(pred.affine.numpy(), affine)
    assert torch.unique(pred).tolist() == [2]


def test_one_file_study_with_a_missing_sibling_names_the_file(tmp_path, make_brats_folder):
    bundle = constant_student(tmp_path / "bundle", 3)
    data = make_brats_folder(tmp_path / "brats2020", "brats2020", num_cases=1)
    next(data.glob("*/*_t2.nii.gz")).unlink()
    study = next(data.glob("*/*_flair.nii.gz"))
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps the transform's error
        monai_label_style_pipeline(bundle)(str(study))
    assert isinstance(error.value.__cause__, BraTSDataError)
    assert re.search(
        r"BraTS20_Training_001.*missing t2 file .*BraTS20_Training_001_t2\.nii", str(error.value.__cause__)
    )


def test_single_channel_file_not_named_like_brats_is_rejected(tmp_path):
    bundle = constant_student(tmp_path / "bundle", 3)
    nib.save(nib.Nifti1Image(np.ones((16, 16, 4), np.float32), np.eye(4)), tmp_path / "scan.nii.gz")
    with pytest.raises(RuntimeError) as error:
        monai_label_style_pipeline(bundle)(str(tmp_path / "scan.nii.gz"))
    assert isinstance(error.value.__cause__, BraTSDataError)
    assert "scan.nii.gz is neither named like a BraTS sequence file" in str(error.value.__cause__)


@pytest.mark.slow
def test_challenge_convention_writes_what_the_official_command_line_scores(tmp_path, make_brats_folder):
    bundle = constant_student(tmp_path / "bundle", 3)  # enhancing tumour everywhere
    data = make_brats_folder(tmp_path / "brats2023", "brats2023", num_cases=2)
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out),
         "--output_convention", "challenge"],
        cwd=BUNDLE_ROOT, check=True, capture_output=True,
    )  # fmt: skip
    cases = find_cases(data)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([*(f"{c['case_id']}.nii.gz" for c in cases), "tumour_volumes.csv"])
    references = tmp_path / "references"  # the official tool reads one folder of reference files
    references.mkdir()
    for case in cases:
        (references / Path(case["label"]).name).write_bytes(Path(case["label"]).read_bytes())
    summary = tmp_path / "summary.json"
    subprocess.run(
        [sys.executable, "-m", "brats_evaluation.evaluation", "--ref_path", str(references), "--pred_path", str(out),
         "--config", "gli", "--summary_json", str(summary)],
        check=True, capture_output=True,
    )  # fmt: skip
    scored = json.loads(summary.read_text())
    assert scored["missings"] == []
    assert sorted(m["subject_name"] for m in scored["metrics"]) == sorted(Path(c["label"]).name for c in cases)
    # ET written as 3, on every brain voxel (background outside the brain)
    brain = {
        Path(c["label"]).name: int(np.any([nib.load(p).get_fdata() != 0 for p in c["image"]], axis=0).sum())
        for c in cases
    }
    assert all(m["et"]["global_bin_volume_pred"] == brain[m["subject_name"]] > 0 for m in scored["metrics"])


def test_challenge_convention_writes_brats2023_label_values_and_no_name_postfix_whatever_the_release():
    image = MetaTensor(torch.zeros(1, 4, 1, 1), meta={"brats_layout": "brats2020"})
    internal = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).reshape(1, 4, 1, 1)
    for convention, values in ((None, [0, 1, 2, 4]), ("challenge", [0, 1, 2, 3])):
        written = ToReleaseLabelsd("pred", convention)({"image": image, "pred": internal})["pred"]
        assert written.flatten().tolist() == values
    assert (output_postfix("challenge"), output_postfix(None), output_postfix("brats2023")) == ("", "seg", "seg")
