# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""scripts.official_metrics against the brats-evaluation package's own file-based entry points, on crafted cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from brats_evaluation import config_path, evaluate_single_exam, parse_seg_results
from conftest import RELEASE_LABELS
from panoptica import Panoptica_Evaluator
from scipy import ndimage

from scripts.brats_data import BraTSDataError
from scripts.official_metrics import METRIC_COLUMNS, SUMMARY_ROWS, evaluate_case, metrics_table

SHAPE = (40, 36, 24)
CLASSES = ("necrotic", "edema", "enhancing")  # internal labels 1, 2, 3


def tumour(with_enhancing: bool = True) -> np.ndarray:
    """Internal label map with two lesions: a large one (edema around an enhancing rim around a necrotic core)
    and a small one (edema around an enhancing spot); without enhancing tumour, enhancing becomes necrotic."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:22, 6:20, 4:16] = 2
    label[9:19, 9:17, 6:14] = 3
    label[11:17, 11:15, 8:12] = 1
    label[28:35, 26:32, 14:20] = 2
    label[30:33, 28:30, 16:18] = 3
    if not with_enhancing:
        label[label == 3] = 1
    return label


def eroded(label: np.ndarray) -> np.ndarray:
    return np.where(ndimage.binary_erosion(label > 0), label, 0).astype(np.uint8)


def dilated(label: np.ndarray) -> np.ndarray:
    grown = ndimage.binary_dilation(label > 0, iterations=2) & (label == 0)
    return np.where(grown, 2, label).astype(np.uint8)


def disjoint() -> np.ndarray:
    """A tumour where the reference's (:func:`tumour`) has none: no overlapping voxel."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[30:38, 2:10, 2:10] = 2
    label[32:36, 4:8, 4:8] = 3
    label[33:35, 5:7, 5:7] = 1
    return label


def crafted_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{case_id: (prediction, reference)}`` in internal labels."""
    reference, empty = tumour(), np.zeros(SHAPE, dtype=np.uint8)
    without_et = tumour(with_enhancing=False)
    return {
        "perfect": (reference, reference),
        "eroded": (eroded(reference), reference),
        "dilated": (dilated(reference), reference),
        "shifted": (np.roll(reference, (2, -1, 1), axis=(0, 1, 2)), reference),
        "empty": (empty, reference),
        "disjoint": (disjoint(), reference),
        "both_empty": (empty, empty),
        "no_et": (eroded(without_et), without_et),
        "false_positive_et": (reference, without_et),
    }


def in_release(internal: np.ndarray, release: str) -> np.ndarray:
    """The label map in a release's values, from the tests' own table (independent of the bundle's)."""
    out = np.zeros_like(internal)
    for index, name in enumerate(CLASSES, start=1):
        out[internal == index] = RELEASE_LABELS[release][name]
    return out


def package_table(folder, spacing: tuple[float, float, float], as_files: bool) -> pd.DataFrame:
    """What the package's own entry points give: NIfTI images, ``evaluate_single_exam``, ``parse_seg_results``.

    With ``as_files``, the images are given as file paths, as the package's command line does.
    """
    evaluator = Panoptica_Evaluator.load_from_config(config_path("gli"))
    affine = np.diag([*spacing, 1.0])
    metrics = []
    for case_id, (prediction, reference) in crafted_cases().items():
        images = {}
        for name, volume in (("pred", prediction), ("ref", reference)):
            image = nib.Nifti1Image(in_release(volume, "brats2023"), affine)
            images[name] = str(folder / f"{case_id}_{name}.nii.gz") if as_files else image
            nib.save(image, folder / f"{case_id}_{name}.nii.gz")
        metrics.append(evaluate_single_exam(images["pred"], images["ref"], case_id, evaluator))
    assert not [m for m in metrics if "error" in m]
    (folder / "summary.json").write_text(json.dumps({"metrics": metrics, "missings": []}))
    parse_seg_results(str(folder / "summary.json"), str(folder / "parsed.csv"))
    return pd.read_csv(folder / "parsed.csv", dtype={"subject_id": str})


def bundle_rows(spacing: tuple[float, float, float]) -> list[dict]:
    """Ours: in memory, from label maps in BraTS 2020 values (enhancing 4), converted before scoring."""
    results = {
        case_id: evaluate_case(in_release(p, "brats2020"), in_release(r, "brats2020"), "brats2020", spacing)
        for case_id, (p, r) in crafted_cases().items()
    }
    return metrics_table(results)


def assert_same_metrics(rows: list[dict], table: pd.DataFrame) -> None:
    assert [r["case_id"] for r in rows] == list(crafted_cases()) + list(SUMMARY_ROWS)
    assert table["subject_id"].tolist() == [r["case_id"] for r in rows]
    for name, official in METRIC_COLUMNS.items():
        for region in ("wt", "tc", "et"):
            ours = [r[f"{name}_{region}"] for r in rows]
            theirs = table[f"{official}_{region}"].to_numpy(dtype=float)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, equal_nan=True, err_msg=f"{name}_{region}")


@pytest.fixture(scope="module")
def isotropic_rows() -> list[dict]:
    return bundle_rows((1.0, 1.0, 1.0))


def test_every_metric_and_summary_row_agrees_with_the_package_scoring_files(tmp_path, isotropic_rows):
    assert_same_metrics(isotropic_rows, package_table(tmp_path, (1.0, 1.0, 1.0), as_files=True))


def test_distances_in_mm_agree_with_the_package_on_anisotropic_voxels(tmp_path):
    # nibabel images, not paths: panoptica reads paths with SimpleITK, whose arrays are (z, y, x) but whose spacing
    # stays (x, y, z), so the package's file route mixes up anisotropic spacings (BraTS data are 1 mm isotropic)
    spacing = (1.0, 1.0, 2.0)
    assert_same_metrics(bundle_rows(spacing), package_table(tmp_path, spacing, as_files=False))


def test_official_conventions_for_empty_and_disjoint_regions(isotropic_rows):
    rows = {r["case_id"]: r for r in isotropic_rows}
    assert rows["perfect"]["dice_et"] == 1.0 and rows["perfect"]["lesion_tp_wt"] == 2.0
    for region in ("wt", "tc", "et"):  # a region empty in both is NaN ...
        assert math.isnan(rows["both_empty"][f"dice_{region}"]) and math.isnan(rows["both_empty"][f"hd95_{region}"])
    assert math.isnan(rows["no_et"]["dice_et"]) and math.isnan(rows["no_et"]["lesion_dice_et"])
    case_dice = [r["dice_et"] for r in isotropic_rows[: -len(SUMMARY_ROWS)]]  # ... and left out of the mean
    assert rows["mean"]["dice_et"] == pytest.approx(np.nanmean(case_dice))
    assert rows["disjoint"]["dice_wt"] == 0.0 and rows["disjoint"]["hd95_wt"] == 373.0  # no overlap: 373 mm
    assert math.isinf(rows["disjoint"]["lesion_hd95_wt"])  # no matched lesion: infinite, as the package's parser
    assert (rows["disjoint"]["lesion_fp_wt"], rows["disjoint"]["lesion_fn_wt"]) == (1.0, 2.0)
    assert rows["empty"]["hd95_tc"] == 373.0 and rows["empty"]["lesion_fn_wt"] == 2.0
    assert rows["false_positive_et"]["dice_et"] == 0.0 and rows["false_positive_et"]["lesion_fp_et"] == 2.0


@pytest.mark.parametrize("release", ["brats2023", "msd"])
def test_a_case_scores_the_same_in_every_release_convention(release):
    prediction, reference = crafted_cases()["shifted"]
    internal = evaluate_case(prediction, reference, "internal")
    other = evaluate_case(in_release(prediction, release), in_release(reference, release), release)
    assert metrics_table({"case": other})[0] == metrics_table({"case": internal})[0]


def test_label_values_outside_the_convention_are_an_error_naming_the_case():
    reference = in_release(tumour(), "brats2020")  # enhancing is 4, which BraTS 2023 uses for resection cavity
    with pytest.raises(BraTSDataError, match=r"case BraTS20_X: .*prediction.*\[4\]"):
        evaluate_case(reference, reference, "brats2023", case_id="BraTS20_X")


SHARED_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brats_sample"


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="../shared/data/brats_sample is not available")
def test_a_real_case_scores_as_the_package_scores_its_files(tmp_path):
    label_file = next(SHARED_SAMPLE.glob("*/*_seg.nii.gz"))  # BraTS 2020 values, 1 mm
    image = nib.load(label_file)
    reference = np.asarray(image.dataobj).astype(np.uint8)
    prediction = np.roll(np.where(ndimage.binary_erosion(reference > 0), reference, 0), 2, axis=0).astype(np.uint8)
    ours = metrics_table({"case": evaluate_case(prediction, reference, "brats2020", image.header.get_zooms())})
    files = {}
    for name, volume in (("pred", prediction), ("ref", reference)):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.where(volume == 4, 3, volume).astype(np.uint8), image.affine), files[name])
    evaluator = Panoptica_Evaluator.load_from_config(config_path("gli"))
    summary = {"metrics": [evaluate_single_exam(files["pred"], files["ref"], "case", evaluator)], "missings": []}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    parse_seg_results(str(tmp_path / "summary.json"), str(tmp_path / "parsed.csv"))
    theirs = pd.read_csv(tmp_path / "parsed.csv", dtype={"subject_id": str})
    for name, official in METRIC_COLUMNS.items():
        for region in ("wt", "tc", "et"):
            np.testing.assert_allclose(ours[0][f"{name}_{region}"], theirs[f"{official}_{region}"][0], atol=1e-6)
