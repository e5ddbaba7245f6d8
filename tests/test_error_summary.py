# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The last line of a failed run is the bundle's own message, found through MONAI's and torch's wrappers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from torch.utils.data._utils import ExceptionWrapper

from scripts.brats_data import find_cases
from scripts.brats_loading import LoadBraTSCased
from scripts.error_summary import bundle_error, report_uncaught, summary_line

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def _raised(function) -> BaseException:
    with pytest.raises(Exception) as info:
        function()
    return info.value


def test_bundle_error_is_found_through_the_config_and_transform_wrappers(tmp_path, make_brats_folder):
    dataset = make_brats_folder(tmp_path, "brats2020", num_cases=1, labels_present=False)
    corrupt = dataset / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz"
    corrupt.write_bytes(b"not a NIfTI")
    parser = ConfigParser({"case": find_cases(dataset, require_label=False)[0]})
    parser["load"] = Compose([LoadBraTSCased(keys="image")])
    parser["run"] = "$@load(@case)"
    error = _raised(lambda: parser.get_parsed_content("run"))
    assert str(error).startswith("Failed to evaluate ConfigExpression")
    line = summary_line(bundle_error(error))
    assert line.startswith(f"BraTSDataError: case BraTS20_Training_001: cannot read {corrupt}")
    assert "\n" not in line and "replace the file" in line


def test_value_error_raised_by_bundle_code_counts_as_the_bundles():
    from scripts.distillation_loss import DistillationLoss

    error = _raised(
        lambda: ConfigParser({"loss": {"_target_": DistillationLoss, "kd_weight": 2.0}}).get_parsed_content("loss")
    )
    assert summary_line(bundle_error(error)) == "ValueError: kd_weight must be in [0, 1], got 2.0."


def test_errors_outside_the_bundle_get_no_summary():
    error = _raised(lambda: torch.zeros(2) @ torch.zeros(3))
    assert bundle_error(error) is None


def test_multi_line_message_becomes_one_line():
    from scripts.brats_data import BraTSDataError

    assert summary_line(BraTSDataError("case a: b.nii.gz has a different affine:\n[[1 0]\n [0 1]]")) == (
        "BraTSDataError: case a: b.nii.gz has a different affine: [[1 0] [0 1]]"
    )


def test_error_of_a_dataloader_worker_is_summarised_without_the_workers_traceback():
    from scripts.brats_data import BraTSDataError, select_split

    try:
        select_split({"training": []}, "bogus")
    except BraTSDataError:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    error = _raised(wrapper.reraise)
    assert "Original Traceback" in str(error)
    assert summary_line(bundle_error(error)) == (
        "BraTSDataError: eval_split 'bogus' is not a split; use --eval_split training."
    )


def test_hook_prints_the_traceback_then_the_bundle_message_last(capsys):
    parser = ConfigParser({"run": "$scripts.brats_data.select_split({'test': []}, 'bogus')"})
    parser["imports"] = ["$import scripts"]
    error = _raised(lambda: parser.get_parsed_content("run"))
    report_uncaught(type(error), error, error.__traceback__)
    stderr = capsys.readouterr().err.splitlines()
    assert stderr[0] == "Traceback (most recent call last):"
    assert any(line.startswith("RuntimeError: Failed to evaluate ConfigExpression") for line in stderr)
    assert stderr[-1] == "BraTSDataError: eval_split 'bogus' is not a split; use --eval_split test."


def test_importing_the_bundle_package_installs_the_hook():
    check = "import sys, scripts; print(sys.excepthook is scripts.error_summary.report_uncaught)"
    result = subprocess.run([sys.executable, "-c", check], cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "True"
