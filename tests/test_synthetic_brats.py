# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Tests of the synthetic BraTS-like data generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest

from tools.synthetic_brats import SEQUENCES, main, make_synthetic_case, write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (48, 48, 32)
TINY = (32, 32, 16)


def _case_paths(root: Path, case_id: str) -> dict[str, Path]:
    return {name: root / case_id / f"{case_id}_{name}.nii.gz" for name in (*SEQUENCES, "seg")}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic_dataset(root, num_cases=3, shape=SHAPE, seed=0)


def test_written_cases_follow_brats2020_layout_and_load_with_nibabel(dataset: tuple[Path, list[str]]) -> None:
    root, case_ids = dataset
    assert case_ids == ["SynBraTS_000", "SynBraTS_001", "SynBraTS_002"]
    assert sorted(p.name for p in root.iterdir()) == case_ids
    classes = set()
    for case_id in case_ids:
        paths = _case_paths(root, case_id)
        assert sorted(p.name for p in (root / case_id).iterdir()) == sorted(p.name for p in paths.values())
        images = {name: nib.load(path) for name, path in paths.items()}
        for name, image in images.items():
            expected = np.uint8 if name == "seg" else np.int16
            assert image.get_data_dtype() == expected
            assert np.asanyarray(image.dataobj).dtype == expected
            assert image.shape == SHAPE
            np.testing.assert_array_equal(image.affine, images["seg"].affine)
            np.testing.assert_array_equal(image.get_qform(), image.get_sform())
            assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
            assert np.diag(image.affine)[0] < 0 and np.diag(image.affine)[1] < 0
            np.testing.assert_allclose(image.header.get_zooms(), (1.0, 1.0, 1.0))
        label_values = set(np.unique(np.asanyarray(images["seg"].dataobj)).tolist())
        assert label_values <= {0, 1, 2, 4}
        classes |= label_values
    assert classes == {0, 1, 2, 4}


def test_background_outside_brain_is_zero_and_tumour_lies_inside_brain() -> None:
    images, label = make_synthetic_case(SHAPE, seed=1)
    brain = images["flair"] > 0
    for name in SEQUENCES:
        assert images[name].min() == 0
        np.testing.assert_array_equal(images[name] > 0, brain, err_msg=name)
    assert 0.1 < brain.mean() < 0.6
    for axis in range(3):  # the brain does not touch the volume's faces
        assert not brain.take([0, -1], axis=axis).any()
    assert brain[label > 0].all()
    tumour_slices, brain_slices = (label > 0).any(axis=(0, 1)).sum(), brain.any(axis=(0, 1)).sum()
    assert tumour_slices >= 0.3 * brain_slices


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_contrast_resembles_brats(seed: int) -> None:
    images, label = make_synthetic_case(SHAPE, seed=seed)
    normal = (images["flair"] > 0) & (label == 0)

    def ratio(name: str, value: int) -> float:
        return float(images[name][label == value].mean() / images[name][normal].mean())

    assert ratio("t1ce", 4) > 1.5  # enhancing rim bright after contrast
    assert ratio("flair", 2) > 1.3  # edema bright in flair
    assert ratio("t2", 1) > 1.5  # necrosis bright in t2
    assert ratio("t1", 1) < 0.8 and ratio("t1ce", 1) < 0.9  # necrosis dark in t1 and t1ce


def test_one_case_in_six_lacks_necrosis_or_enhancement() -> None:
    assert set(np.unique(make_synthetic_case(TINY, seed=4)[1]).tolist()) == {0, 1, 2, 4}
    assert set(np.unique(make_synthetic_case(SHAPE, seed=5)[1]).tolist()) == {0, 2, 4}
    assert set(np.unique(make_synthetic_case(SHAPE, seed=11)[1]).tolist()) == {0, 1, 2}


def test_same_seed_gives_identical_arrays_and_other_seed_differs() -> None:
    images, label = make_synthetic_case(TINY, seed=3)
    images_again, label_again = make_synthetic_case(TINY, seed=3)
    images_other, label_other = make_synthetic_case(TINY, seed=4)
    np.testing.assert_array_equal(label, label_again)
    for name in SEQUENCES:
        np.testing.assert_array_equal(images[name], images_again[name])
        assert not np.array_equal(images[name], images_other[name])
    assert not np.array_equal(label, label_other)


def test_rerun_with_same_parameters_leaves_files_untouched(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path, num_cases=2, shape=TINY)
    before = _mtimes(tmp_path)
    assert write_synthetic_dataset(tmp_path, num_cases=2, shape=list(TINY)) == ["SynBraTS_000", "SynBraTS_001"]
    assert _mtimes(tmp_path) == before


def test_rerun_after_interruption_writes_only_missing_cases(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path, num_cases=2, shape=TINY)
    kept = _mtimes(tmp_path / "SynBraTS_000")
    for path in _case_paths(tmp_path, "SynBraTS_001").values():
        path.unlink()
    (tmp_path / "SynBraTS_001").rmdir()
    leftover = tmp_path / ".SynBraTS_001.x1y2.tmp"
    leftover.mkdir()
    (leftover / "SynBraTS_001_flair.nii.gz").write_bytes(b"truncated")

    write_synthetic_dataset(tmp_path, num_cases=2, shape=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SynBraTS_000", "SynBraTS_001"]
    assert _mtimes(tmp_path / "SynBraTS_000") == kept
    assert all(path.is_file() for path in _case_paths(tmp_path, "SynBraTS_001").values())


def test_other_content_raises_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a case")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        write_synthetic_dataset(tmp_path, num_cases=1, shape=TINY)
    write_synthetic_dataset(tmp_path, num_cases=1, shape=TINY, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SynBraTS_000"]
    with pytest.raises(FileExistsError, match="SynBraTS_000"):  # same name, other seed: stale, not reused
        write_synthetic_dataset(tmp_path, num_cases=1, shape=TINY, seed=7)
    _case_paths(tmp_path, "SynBraTS_000")["seg"].write_bytes(b"corrupt")
    with pytest.raises(FileExistsError, match="SynBraTS_000"):  # an unreadable case is not reused either
        write_synthetic_dataset(tmp_path, num_cases=1, shape=TINY)
    write_synthetic_dataset(tmp_path, num_cases=1, shape=TINY, overwrite=True)
    assert nib.load(_case_paths(tmp_path, "SynBraTS_000")["seg"]).shape == TINY
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_synthetic_dataset(tmp_path / "file", num_cases=1, shape=TINY, overwrite=True)


@pytest.mark.parametrize("shape", [(15, 32, 32), (32, 32), (32, 32, 32, 2), (32.5, 32, 32), "a,b,c", "32,32"])
def test_invalid_shape_raises_value_error(shape: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        write_synthetic_dataset(tmp_path, num_cases=1, shape=shape)
    assert not any(tmp_path.iterdir())


def test_invalid_num_cases_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_cases"):
        write_synthetic_dataset(tmp_path, num_cases=0, shape=TINY)


@pytest.mark.slow
def test_command_line_writes_cases_and_accepts_both_shape_spellings(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    args = ["--output_dir", str(out), "--num_cases", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "tools.synthetic_brats", *args, "--shape", "32,32,16"],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert str(out.resolve()) in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["SynBraTS_000", "SynBraTS_001"]
    assert nib.load(_case_paths(out, "SynBraTS_001")["t2"]).shape == TINY
    before = _mtimes(out)
    fire.Fire(main, command=[*args, "--shape", "[32,32,16]"])  # the list spelling parses to the same shape
    assert _mtimes(out) == before
