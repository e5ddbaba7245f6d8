# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Model Zoo checks: TorchScript export with ``monai.bundle ckpt_export``, metadata schema, network in/out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from scripts.separable_unet import SeparableUNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
META_FILE = BUNDLE_ROOT / "configs" / "metadata.json"
SCHEMA = BUNDLE_ROOT.parent / "shared" / "modelzoo" / "schema" / "meta_schema_20240725.json"
needs_schema = pytest.mark.skipif(not SCHEMA.is_file(), reason="../shared/modelzoo/schema is not available")
TEACHER = {"channels": (64, 128, 256, 512, 1024), "dropout": 0.5}
TEACHER_CONFIGS = ["configs/train.json", "configs/teacher.json"]
ignore_jit_deprecation = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def export_and_compare(config: str | list[str], network: SeparableUNet, tmp_path: Path) -> None:
    """Save ``network``'s weights, export them with ``ckpt_export`` from ``config`` (a config, or a list merged in
    order), compare TorchScript and eager."""
    configs = [config] if isinstance(config, str) else config
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    ckpt = bundle / "models" / "model.pt"
    torch.save(network.state_dict(), ckpt)
    ts_file = tmp_path / "model.ts"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts_file),
        "--ckpt_file", str(ckpt), "--meta_file", "configs/metadata.json", "--config_file", str(configs),
        "--bundle_root", str(bundle),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ckpt_export failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    extra_files = {"metadata.json": "", **{Path(c).stem + ".json": "" for c in configs}}
    scripted = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra_files)
    assert json.loads(extra_files["metadata.json"])["version"] == json.loads(META_FILE.read_text())["version"]
    network.eval()
    scripted.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = network(x), scripted(x)
    assert actual.shape == (1, 4, 64, 64)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def randomised(network: SeparableUNet) -> SeparableUNet:
    """``network`` with non-trivial BatchNorm statistics, so that eval-mode export is really exercised."""
    generator = torch.Generator().manual_seed(1)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(1 + 0.5 * torch.rand(module.num_features, generator=generator))
    return network


@pytest.mark.slow
@ignore_jit_deprecation
def test_student_exports_to_torchscript_equal_to_the_eager_network(tmp_path):
    torch.manual_seed(0)
    export_and_compare("configs/inference.json", randomised(SeparableUNet(3, 4)), tmp_path)


@pytest.mark.slow
@ignore_jit_deprecation
def test_teacher_exports_to_torchscript_equal_to_the_eager_network(tmp_path):
    torch.manual_seed(0)
    export_and_compare(TEACHER_CONFIGS, randomised(SeparableUNet(3, 4, **TEACHER)), tmp_path)


def test_metadata_data_formats_match_the_student_and_teacher_networks():
    from monai.bundle import verify_net_in_out

    meta = json.loads(META_FILE.read_text())
    common = {"net_id": "network_def", "meta_file": str(META_FILE), "device": "cpu", "bundle_root": str(BUNDLE_ROOT)}
    verify_net_in_out(config_file=str(BUNDLE_ROOT / "configs" / "inference.json"), **common)
    teacher_format = {"_meta_#network_data_format": meta["teacher_data_format"]}
    teacher_configs = [str(BUNDLE_ROOT / c) for c in TEACHER_CONFIGS]
    verify_net_in_out(config_file=teacher_configs, **common, **teacher_format)


@needs_schema
def test_metadata_is_valid_against_the_model_zoo_schema():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    meta = json.loads(META_FILE.read_text())
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(meta), key=str)
    assert not errors, [e.message for e in errors]
    assert meta["version"] in meta["changelog"]


@needs_schema
def test_metadata_passes_monai_verify_metadata_with_a_local_schema(tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads(META_FILE.read_text())
    local = tmp_path / meta["schema"].rsplit("/", 1)[-1]  # verify_metadata downloads only when this is missing
    shutil.copyfile(SCHEMA.parent / local.name, local)
    with warnings.catch_warnings():  # "no hash value provided": the local copy is used as it is
        warnings.simplefilter("ignore", UserWarning)
        verify_metadata(meta_file=str(META_FILE), filepath=str(local))
