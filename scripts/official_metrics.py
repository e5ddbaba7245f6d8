# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The official BraTS metrics, computed by the challenges' own ``brats-evaluation`` package (built on panoptica).

Per case and region (WT, TC, ET): legacy Dice and HD95 (whole region), lesion-wise Dice and HD95 (26-connected
lesions matched one to one), and the true-positive, false-positive and false-negative lesion counts. A case is
scored in memory by panoptica's evaluator with the package's glioma configuration (``gli``), as the package's
command line does from NIfTI files (identically on isotropic voxels, see :func:`evaluate_case`); per-case values
and the mean, std and median rows are then those of the package's own parser (``brats_evaluation.parse_seg_results``):
a region empty in both reference and prediction is NaN and left out of the means, a legacy HD95 without any
overlapping voxel is 373, a lesion-wise HD95 without any matched lesion is infinite. As in the package, lesion-wise
distances are in mm but legacy HD95 is in voxels (panoptica computes its global metrics without the voxel size):
the same on BraTS's 1 mm data.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from brats_evaluation import config_path, parse_seg_results
from panoptica import Panoptica_Evaluator
from scripts.brats_data import LABEL_MAPS
from scripts.brats_loading import map_release_labels
from scripts.brats_output import internal_to_release
from scripts.brats_regions import REGION_NAMES

__all__ = [
    "LABEL_CONVENTIONS",
    "METRIC_COLUMNS",
    "SUMMARY_ROWS",
    "glioma_evaluator",
    "to_brats2023_labels",
    "evaluate_case",
    "metrics_table",
]

# label values a case can be given in: a release's (``LABEL_MAPS``) or the internal ones (equal to BraTS 2023+'s)
LABEL_CONVENTIONS = (*LABEL_MAPS, "internal")
# bundle column prefix -> column prefix of brats_evaluation.parse_seg_results
METRIC_COLUMNS = {
    "dice": "global_dsc",
    "hd95": "global_hd95",
    "lesion_dice": "lesionwise_dsc_mean",
    "lesion_hd95": "lesionwise_hd95_mean",
    "lesion_tp": "all_instance_tp",
    "lesion_fp": "all_instance_fp",
    "lesion_fn": "all_instance_fn",
}
SUMMARY_ROWS = ("mean", "std", "median")


@functools.cache
def glioma_evaluator() -> Panoptica_Evaluator:
    """The panoptica evaluator of the package's bundled glioma configuration (``config_gli.yaml``), loaded once.

    Returns:
        the evaluator, expecting BraTS 2023 label values (1 NETC, 2 SNFH, 3 ET, 4 resection cavity).
    """
    # the configuration merges labels 1-3 into TC and WT by design; panoptica prints a question about it on loading
    with contextlib.redirect_stdout(io.StringIO()):
        return Panoptica_Evaluator.load_from_config(config_path("gli"))


def _numpy_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    return labels[0] if labels.ndim == 4 and labels.shape[0] == 1 else labels


def to_brats2023_labels(
    labels: np.ndarray | torch.Tensor, convention: str = "internal", case_id: str = "?", name: str = "label map"
) -> np.ndarray:
    """Convert a label map to the BraTS 2023 values that the official evaluation expects (ET = 3).

    Args:
        labels: label map of shape (*spatial) or (1, *spatial).
        convention: the values of ``labels``, one of ``LABEL_CONVENTIONS``: ``brats2020`` (ET = 4), ``brats2023``,
            ``msd`` or ``internal`` (0 background, 1 necrotic core, 2 edema, 3 enhancing).
        case_id: case id, for error messages.
        name: what ``labels`` is (e.g. ``prediction``), for error messages.

    Returns:
        a uint8 array of shape (*spatial) in BraTS 2023 values.

    Raises:
        ValueError: if ``convention`` is unknown.
        scripts.brats_data.BraTSDataError: naming the case, if ``labels`` holds values outside its convention.
    """
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"Unknown label convention {convention!r}, expected one of {LABEL_CONVENTIONS}.")
    layout = convention if convention in LABEL_MAPS else "multichannel"  # multichannel studies carry internal values
    internal = map_release_labels(_numpy_labels(labels), layout, 4, case_id, name)
    return internal_to_release(torch.from_numpy(internal), "brats2023").numpy()


def evaluate_case(
    prediction: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    convention: str = "internal",
    spacing: Sequence[float] | None = None,
    regions: Sequence[str] = REGION_NAMES,
    case_id: str = "?",
) -> dict[str, dict[str, Any]]:
    """Score one case with the official evaluator, in memory, as ``brats_evaluation.evaluate_single_exam`` does.

    Args:
        prediction: predicted label map of shape (*spatial) or (1, *spatial).
        reference: reference label map of the same shape.
        convention: label values of both maps, one of ``LABEL_CONVENTIONS``.
        spacing: voxel size in mm along each axis of the arrays (1 mm by default), used by the lesion-wise
            distances. The package's command line reads files with SimpleITK, whose arrays are (z, y, x) while
            its spacing stays (x, y, z): on anisotropic voxels its lesion-wise HD95 differs from this one.
        regions: the regions to score, among ``WT``, ``TC``, ``ET``.
        case_id: case id, for error messages.

    Returns:
        ``{"wt": {...}, "tc": {...}, "et": {...}}``: each region's panoptica result as a dict (``to_dict(True)``),
        the per-subject entry of the package's command-line JSON without its ``subject_name``.

    Raises:
        ValueError: naming the case, for maps of different shapes, an unknown region or a failing evaluation.
        scripts.brats_data.BraTSDataError: naming the case, for label values outside ``convention``.
    """
    pred = to_brats2023_labels(prediction, convention, case_id, "prediction")
    ref = to_brats2023_labels(reference, convention, case_id, "reference")
    if pred.shape != ref.shape:
        raise ValueError(f"case {case_id}: prediction shape {list(pred.shape)} != reference {list(ref.shape)}.")
    groups = [r.lower() for r in regions]
    unknown = sorted(set(groups) - {r.lower() for r in REGION_NAMES})
    if unknown:
        raise ValueError(f"case {case_id}: unknown regions {unknown}, expected some of {REGION_NAMES}.")
    evaluator = glioma_evaluator()
    skip = [g for g in evaluator.segmentation_class_groups_names if g not in groups]
    voxelspacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * pred.ndim
    try:
        with warnings.catch_warnings():  # about the normalised surface Dice, which is not reported here
            warnings.filterwarnings("ignore", message="The threshold is set to 0.5", category=UserWarning)
            results = evaluator.evaluate(pred, ref, voxelspacing=voxelspacing, skip_groups=skip)
    except Exception as e:
        raise ValueError(f"case {case_id}: the official BraTS evaluation failed: {e}") from e
    return {group: results[group].to_dict(True) for group in groups}


def metrics_table(
    case_results: Mapping[str, Mapping[str, Mapping[str, Any]]], regions: Sequence[str] = REGION_NAMES
) -> list[dict[str, Any]]:
    """Per-case rows and the mean, std and median rows of the official metrics, by the package's own parser.

    The results are written as the package's command line writes its JSON summary and read back with
    ``brats_evaluation.parse_seg_results`` (in a temporary folder, its printing silenced), so every value and
    summary row is the package's: pandas means, standard deviations and medians over the cases, NaN left out.

    Args:
        case_results: ``{case_id: evaluate_case(...)}``, in the order of the rows.
        regions: the regions to report, among those scored.

    Returns:
        one dict per case, then one per ``SUMMARY_ROWS``, each with ``case_id`` then, metric by metric
        (``METRIC_COLUMNS`` order) and region by region, float values named ``<metric>_<region>``
        (e.g. ``dice_wt``, ``lesion_hd95_et``, ``lesion_fp_tc``).

    Raises:
        ValueError: if ``case_results`` is empty.
    """
    if not case_results:
        raise ValueError("no case to report.")
    summary = {
        "metrics": [{**results, "subject_name": case_id} for case_id, results in case_results.items()],
        "missings": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        json_path, csv_path = os.path.join(folder, "summary.json"), os.path.join(folder, "metrics.csv")
        with open(json_path, "w") as f:
            json.dump(summary, f)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the std of a column holding inf is NaN
            parse_seg_results(json_path, csv_path)
        table = pd.read_csv(csv_path, dtype={"subject_id": str}, keep_default_na=False, na_values=["", "NaN", "nan"])
    columns = {
        f"{name}_{region.lower()}": f"{official}_{region.lower()}"
        for name, official in METRIC_COLUMNS.items()
        for region in regions
    }
    rows = []
    for record in table.to_dict("records"):
        row: dict[str, Any] = {"case_id": record["subject_id"]}
        row.update({column: float(record.get(official, np.nan)) for column, official in columns.items()})
        rows.append(row)
    return rows
