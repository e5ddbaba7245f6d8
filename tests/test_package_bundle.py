# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The Model Zoo release zip: packaged, served over HTTP, downloaded with ``monai.bundle download``, run."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.separable_unet import SeparableUNet
from tools.package_bundle import TORCHSCRIPT, WEIGHTS, file_md5, package_bundle
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
NAME = "brats_kd_test"
VERSION = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]
# localhost must never go through a proxy configured in the environment
LOCAL_ENV = {**os.environ, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def run_python(*args: str, cwd: Path = BUNDLE_ROOT) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in ``cwd``; on failure show its output."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=LOCAL_ENV)
    if result.returncode != 0:
        pytest.fail(f"python {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def make_bundle_copy(root: Path, with_model: bool = True) -> Path:
    """A copy of this bundle's repository files in ``root`` with a freshly initialised student as ``models/model.pt``.

    The developer tools and tests are copied too, so that the release can be checked to leave them out.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("configs", "scripts", "docs", "tools", "tests"):
        if (BUNDLE_ROOT / folder).is_dir():
            shutil.copytree(BUNDLE_ROOT / folder, root / folder, ignore=ignore)
    for file in ("LICENSE", "large_files.yml", "README.md", "pyproject.toml", "requirements.txt"):
        if (BUNDLE_ROOT / file).is_file():
            shutil.copy2(BUNDLE_ROOT / file, root / file)
    (root / "models").mkdir()
    if with_model:
        torch.manual_seed(0)
        torch.save(SeparableUNet(3, 4).state_dict(), root / "models" / "model.pt")
    return root


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (ephemeral port) in a thread; yields the base url."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """Package a bundle copy with the CLI, serve the zip, download it with ``monai.bundle download``."""
    source = make_bundle_copy(tmp_path_factory.mktemp("bundle"))
    (source / "scripts" / "__pycache__").mkdir()
    (source / "scripts" / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"\0")
    (source / "scripts" / "notes.txt").write_text("not a module")
    dist = tmp_path_factory.mktemp("dist")
    result = run_python(
        "-m", "tools.package_bundle", "--output_dir", str(dist), "--bundle_root", str(source), "--name", NAME,
        "--base_url", "https://example.org/release/v{version}",
    )  # fmt: skip
    zip_path = dist / f"{NAME}_v{VERSION}.zip"
    downloads = tmp_path_factory.mktemp("downloads")
    with serve_folder(dist) as base_url:
        run_python(
            "-m", "monai.bundle", "download", "--name", NAME, "--version", VERSION, "--url",
            f"{base_url}/{zip_path.name}", "--bundle_dir", str(downloads),
        )  # fmt: skip
    return {"source": source, "zip": zip_path, "stdout": result.stdout, "bundle": downloads / NAME}


@pytest.mark.slow
def test_release_zip_holds_the_runtime_only(released):
    source = released["source"]
    with zipfile.ZipFile(released["zip"]) as archive:
        names = sorted(archive.namelist())
    runtime = [p for folder in ("configs", "docs") for p in (source / folder).rglob("*") if p.is_file()]
    runtime += list((source / "scripts").glob("*.py")) + [source / "models" / "model.pt", source / "LICENSE"]
    expected = [f"{NAME}/{p.relative_to(source).as_posix()}" for p in runtime]
    expected += [f"{NAME}/large_files.yml", f"{NAME}/{TORCHSCRIPT}"]
    assert names == sorted(expected)
    # no developer tool, test or build file, and of scripts/ only the modules (no caches, no other files)
    assert not [n for n in names if n.split("/")[1] in ("tools", "tests", "README.md", "pyproject.toml")]
    assert not [n for n in names if n.startswith(f"{NAME}/scripts/") and not n.endswith(".py")]
    assert not [n for n in names if any(word in n for word in ("benchmark.py", "demo", "package_bundle"))]


@pytest.mark.slow
def test_cli_prints_the_md5_of_the_zip(released):
    assert re.search(rf"md5 {file_md5(released['zip'])}\s+{released['zip'].name}", released["stdout"])


@pytest.mark.slow
def test_printed_md5_lets_monai_verify_the_downloaded_zip(released, tmp_path):
    from monai.apps import download_url
    from monai.apps.utils import HashCheckError

    md5 = re.search(r"^md5 ([0-9a-f]{32})", released["stdout"], re.M).group(1)
    zip_path = released["zip"]
    with serve_folder(zip_path.parent) as base_url:
        url = f"{base_url}/{zip_path.name}"
        download_url(url, tmp_path / "ok.zip", hash_val=md5, hash_type="md5", progress=False)
        with pytest.raises(HashCheckError):
            download_url(url, tmp_path / "bad.zip", hash_val="0" * 32, hash_type="md5", progress=False)
    assert file_md5(tmp_path / "ok.zip") == md5
    assert not (tmp_path / "bad.zip").exists()


@pytest.mark.slow
def test_download_from_url_extracts_the_bundle_with_identical_files(released):
    source, bundle = released["source"], released["bundle"]
    assert file_md5(bundle / "models" / "model.pt") == file_md5(source / "models" / "model.pt")
    for config in sorted(p for p in (source / "configs").rglob("*") if p.is_file()):
        assert (bundle / config.relative_to(source)).read_bytes() == config.read_bytes()
    packaged_scripts = sorted(p.name for p in (bundle / "scripts").iterdir())
    assert packaged_scripts == sorted(p.name for p in (source / "scripts").glob("*.py"))


@pytest.mark.slow
def test_packaged_large_files_yml_records_the_md5_of_the_weights(released):
    bundle = released["bundle"]
    text = (bundle / "large_files.yml").read_text()
    for weights in ("model.pt", "model.ts"):
        assert f'hash_val: "{file_md5(bundle / "models" / weights)}"' in text
        assert f'url: "https://example.org/release/v{VERSION}/{weights}"' in text
    # MONAI's own reader checks the md5 of the files already present (nothing is downloaded)
    from monai.bundle import download_large_files

    download_large_files(bundle_path=str(bundle))


@pytest.mark.slow
def test_downloaded_bundle_runs_inference_on_a_folder(released, tmp_path):
    bundle = released["bundle"]
    if not (bundle / "configs" / "inference.json").is_file():
        pytest.fail("configs/inference.json is missing from the released bundle")
    data = tmp_path / "data"
    case_ids = write_synthetic_dataset(data, num_cases=2, shape=(32, 32, 16))
    out = tmp_path / "out"
    run_python(
        "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root",
        str(bundle), "--dataset_dir", str(data), "--output_dir", str(out), cwd=bundle,
    )  # fmt: skip
    written = sorted(out.rglob("*_seg.nii.gz"))
    assert [p.name for p in written] == [f"{case_id}_seg.nii.gz" for case_id in case_ids]
    segmentation = nib.load(str(written[0]))
    assert segmentation.shape == (32, 32, 16)  # the input's own grid
    assert segmentation.get_data_dtype() == np.uint8


def test_repository_large_files_yml_lists_the_weights_of_the_current_version():
    from monai.bundle import ConfigParser

    entries = ConfigParser.load_config_file(str(BUNDLE_ROOT / "large_files.yml"))["large_files"]
    assert [entry["path"] for entry in entries] == [*WEIGHTS, TORCHSCRIPT]
    for entry in entries:
        assert entry["hash_type"] == "md5"
        assert entry["url"].endswith(f"/v{VERSION}/{Path(entry['path']).name}"), "large_files.yml lags the version"


@pytest.mark.slow
def test_released_torchscript_segments_as_the_packaged_checkpoint(released):
    bundle = released["bundle"]
    network = SeparableUNet(3, 4)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(bundle / TORCHSCRIPT))
    slices = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(slices), network.eval()(slices), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_teacher_checkpoint_is_packaged_with_its_md5_when_present(tmp_path):
    source = make_bundle_copy(tmp_path / "bundle")
    (source / "models" / "teacher.pt").write_bytes(b"stand-in teacher weights")
    zip_path, _ = package_bundle(tmp_path / "dist", source, name=NAME)
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.read(f"{NAME}/models/teacher.pt") == b"stand-in teacher weights"
        large_files = archive.read(f"{NAME}/large_files.yml").decode()
    assert f'hash_val: "{file_md5(source / "models" / "teacher.pt")}"' in large_files
    assert 'path: "models/teacher.pt"' in large_files


@pytest.mark.slow
def test_packaging_the_same_files_twice_gives_the_same_zip(tmp_path):
    source = make_bundle_copy(tmp_path / "bundle")
    _, first = package_bundle(tmp_path / "a", source, name=NAME)
    _, second = package_bundle(tmp_path / "b", source, name=NAME)
    assert first == second


def test_packaging_without_model_pt_fails_naming_the_file_and_leaves_no_zip(tmp_path):
    source = make_bundle_copy(tmp_path / "bundle", with_model=False)
    with pytest.raises(FileNotFoundError, match="models/model.pt"):
        package_bundle(tmp_path / "dist", source, name=NAME)
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob("*.tmp"))


def test_version_other_than_the_metadata_version_is_refused(tmp_path):
    source = make_bundle_copy(tmp_path / "bundle")
    with pytest.raises(ValueError, match="differs from configs/metadata.json"):
        package_bundle(tmp_path / "dist", source, name=NAME, version="99.0.0")
    assert not (tmp_path / "dist").exists()
