# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Tumour volume per BraTS region of every segmentation an inference writes: logged, checked, written as a CSV.

``configs/inference.json`` measures each prediction with :class:`TumourVolumesd` (in its postprocessing, on the
internal labels, after ``scripts.brats_output.OutsideBrainToBackgroundd``) and reports the volumes with
:class:`TumourVolumeReport` (one of its evaluator's handlers): one log line per case naming the file written, a
warning when the whole tumour is an implausible share of the brain, and ``tumour_volumes.csv`` in the output folder.

No check is made for tumour outside the brain: ``OutsideBrainToBackgroundd`` sets every voxel there to background
before the volumes are measured, and the later transforms (``Invertd``: reorientation and unpadding, nearest
neighbour) move voxels without resampling them, so the written segmentation cannot have any.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scripts.brats_output import brain_mask
from scripts.brats_regions import region_names, region_voxel_counts
from scripts.case_metadata import CASE_ID
from scripts.case_report import CaseReport

__all__ = [
    "BRAIN_COLUMN",
    "TUMOUR_VOLUMES_KEY",
    "TumourVolumeReport",
    "TumourVolumesd",
    "voxel_volume_ml",
    "volume_columns",
]

TUMOUR_VOLUMES_KEY = "tumour_volumes"
BRAIN_COLUMN = "brain_ml"
# the largest whole tumour of the 22 shared real BraTS 2018 cases is 16.6% of its brain (median 8.1%), and BraTS
# gliomas stay below about 30%: half the brain is far beyond any real case
DEFAULT_MAX_TUMOUR_SHARE = 0.5
MAX_NAMED_CASES = 10  # implausible cases named in the run's last line (each has its own warning above)


def volume_columns(num_classes: int) -> list[str]:
    """The volume columns of a task: ``wt_ml``, ``tc_ml``, ``et_ml`` (4 classes) or ``wt_ml`` (2), then ``brain_ml``.

    Args:
        num_classes: 4 or 2, see ``scripts.brats_regions.region_names``.

    Returns:
        the column names, in order.
    """
    return [f"{name.lower()}_ml" for name in region_names(num_classes)] + [BRAIN_COLUMN]


def voxel_volume_ml(image: torch.Tensor) -> float:
    """The volume of one voxel in mL, from a ``MetaTensor``'s affine (1 mm^3 for a plain tensor).

    Args:
        image: a channel-first image whose affine maps voxel indices to mm.

    Returns:
        ``|det(affine[:3, :3])| / 1000``.
    """
    if not isinstance(image, MetaTensor):
        return 1e-3
    affine = np.asarray(image.affine, dtype=np.float64)
    return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


class TumourVolumesd(MapTransform):
    """The volume in mL of each BraTS region of a predicted label map, and of the brain, under ``volumes_key``.

    Place it after ``scripts.brats_output.OutsideBrainToBackgroundd`` and before the labels are converted to a
    release's values (``ToReleaseLabelsd``): the label map must hold internal classes (0 background, 1 necrotic
    core, 2 edema, 3 enhancing; or 0/1 for the binary task) on the grid of the input image. Regions are those of
    ``scripts.brats_regions`` (WT 1+2+3, TC 1+3, ET 3); the brain is where any input sequence is not 0
    (``scripts.brats_output.brain_mask``); the voxel size comes from the image's affine.

    Args:
        keys: the predicted label map (exactly one key), (1, *spatial).
        num_classes: 4 or 2, see ``scripts.brats_regions.region_names``.
        ref_key: the input image, (C_in, *spatial), a ``MetaTensor`` with its affine.
        volumes_key: where ``{"wt_ml": ..., "tc_ml": ..., "et_ml": ..., "brain_ml": ...}`` is stored.

    Raises:
        ValueError: if more than one key is given.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int = 4,
        ref_key: Hashable = "image",
        volumes_key: Hashable = TUMOUR_VOLUMES_KEY,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"TumourVolumesd takes one label key, got {self.keys}.")
        self.num_classes = num_classes
        self.ref_key = ref_key
        self.volumes_key = volumes_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.ref_key]
        voxel_ml = voxel_volume_ml(image)
        counts = region_voxel_counts(d[self.first_key(d)], self.num_classes)
        volumes = {f"{name.lower()}_ml": count * voxel_ml for name, count in counts.items()}
        volumes[BRAIN_COLUMN] = int(brain_mask(image).sum()) * voxel_ml
        d[self.volumes_key] = volumes
        return d


class TumourVolumeReport(CaseReport):
    """Evaluator handler reporting the volumes of :class:`TumourVolumesd` for every segmentation written.

    For each case it logs one line (the case, its volumes and the file ``SaveImaged`` wrote, which
    ``savepath_in_metadict`` records), and a warning naming the case and the file when the whole tumour is more
    than ``max_tumour_share`` of the brain (an implausible prediction: wrong or misordered sequences, or a
    checkpoint of another task). When the run completes, the volumes are written in one atomic step to the CSV
    ``output_dir/filename``: columns ``case_id``, ``file``, ``wt_ml``, ``tc_ml``, ``et_ml`` (the task's regions)
    and ``brain_ml``. Its ``.csv`` name cannot be one of a segmentation (``.nii.gz``) in the same folder.

    Args:
        output_dir: the folder of the segmentations and of the CSV.
        num_classes: 4 or 2, selecting the region columns.
        filename: the CSV's name.
        max_tumour_share: the share of the brain above which a whole tumour is reported as implausible.
        volumes_key: the output key :class:`TumourVolumesd` stores the volumes under.
        pred_key: the output key of the saved segmentation, whose metadata holds ``saved_to``.
        name: logger name.

    Raises:
        ValueError: if ``filename`` does not end with ``.csv``, or ``max_tumour_share`` is not in (0, 1].
    """

    def __init__(
        self,
        output_dir: str,
        num_classes: int = 4,
        filename: str = "tumour_volumes.csv",
        max_tumour_share: float = DEFAULT_MAX_TUMOUR_SHARE,
        volumes_key: str = TUMOUR_VOLUMES_KEY,
        pred_key: str = "pred",
        name: str = "TumourVolumeReport",
    ) -> None:
        if not filename.endswith(".csv"):
            raise ValueError(f"the tumour volume file must be a .csv, beside the segmentations; got {filename!r}.")
        if not 0.0 < max_tumour_share <= 1.0:
            raise ValueError(f"max_tumour_share must be in (0, 1], got {max_tumour_share}.")
        super().__init__(output_dir, filename, name)
        self.columns = ["case_id", "file", *volume_columns(num_classes)]
        self.max_tumour_share = float(max_tumour_share)
        self.volumes_key = volumes_key
        self.pred_key = pred_key
        self.rows: list[dict[str, Any]] = []
        self.implausible: list[str] = []

    def _reset(self, engine: Engine) -> None:
        self.rows, self.implausible = [], []

    def _collect(self, engine: Engine) -> None:
        for data, output in zip(engine.state.batch, engine.state.output):
            pred = output.get(self.pred_key)
            meta = pred.meta if isinstance(pred, MetaTensor) else {}
            case_id = str(data.get("case_id") or meta.get(CASE_ID, "?"))
            self._report(case_id, str(meta.get("saved_to", "")), output[self.volumes_key])

    def _report(self, case_id: str, file: str, volumes: Mapping[str, float]) -> None:
        row = {"case_id": case_id, "file": file, **{c: volumes[c] for c in self.columns[2:]}}
        self.rows.append(row)
        regions = ", ".join(f"{c[:-3].upper()} {row[c]:.1f} mL" for c in self.columns[2:-1])
        brain = row[BRAIN_COLUMN]
        share = row["wt_ml"] / brain if brain > 0 else 0.0
        of_brain = f"{share:.1%} of the brain's {brain:.1f} mL" if brain > 0 else "empty brain"
        self.logger.info(f"case {case_id}: {regions} ({of_brain}) in {file or '(not saved)'}")
        if share > self.max_tumour_share:
            self.implausible.append(case_id)
            self.logger.warning(
                f"case {case_id}: implausible segmentation {file or '(not saved)'}: its whole tumour is {share:.0%} "
                f"of the brain, above max_tumour_share {self.max_tumour_share:.0%} (real gliomas are at most about "
                "30%); check that the input sequences are those --modalities names, in that order, skull-stripped, "
                "and that the checkpoint was trained on them."
            )

    def _write(self, engine: Engine) -> None:
        rounded = ({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()} for r in self.rows)
        self._write_csv(self.columns, rounded)
        implausible = ""
        if self.implausible:
            named = ", ".join(self.implausible[:MAX_NAMED_CASES])
            more = len(self.implausible) - MAX_NAMED_CASES
            implausible = f"; implausible: {named}{f' and {more} more' if more > 0 else ''}"
        self.logger.info(f"tumour volumes of {len(self.rows)} case(s) written to {self.path}{implausible}")
