# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Per-case official BraTS metrics (``scripts.official_metrics``) of an evaluation, written as a CSV and printed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from scripts.brats_regions import region_names, regions_to_labels
from scripts.case_report import CaseReport
from scripts.official_metrics import evaluate_case, metrics_table

__all__ = ["BraTSMetricsReport", "case_metrics", "region_case_results", "format_table"]


def _spacing(volume: torch.Tensor) -> list[float]:
    if isinstance(volume, MetaTensor):
        return [float(s) for s in np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0)]
    return [1.0] * (volume.ndim - 1)


def region_case_results(
    pred: torch.Tensor, label: torch.Tensor, regions: Sequence[str], case_id: str = "?"
) -> dict[str, dict[str, Any]]:
    """Official BraTS results of one case given as region channels (what the evaluators' postprocessing gives).

    Args:
        pred: binary region channels of shape (len(regions), *spatial), as ``scripts.brats_regions.labels_to_regions``
            gives them.
        label: ground-truth region channels of the same shape; a ``MetaTensor``'s affine gives the voxel size in mm
            (1 mm otherwise).
        regions: region names of the channels.
        case_id: case id, for error messages.

    Returns:
        the per-region results of ``scripts.official_metrics.evaluate_case``.

    Raises:
        ValueError: if ``regions`` is neither ``("WT",)`` nor ``("WT", "TC", "ET")`` (``region_names``).
    """
    if tuple(regions) not in (region_names(2), region_names(4)):
        raise ValueError(
            f"case {case_id}: region channels must be {region_names(2)} or {region_names(4)}, got {regions}."
        )
    return evaluate_case(
        regions_to_labels(pred), regions_to_labels(label), "internal", _spacing(label), regions, case_id
    )


def case_metrics(pred: torch.Tensor, label: torch.Tensor, regions: Sequence[str]) -> dict[str, float]:
    """Official BraTS metrics of one case given as region channels, one value per metric and region.

    Args:
        pred: binary region channels of shape (len(regions), *spatial).
        label: ground-truth region channels of the same shape (see :func:`region_case_results`).
        regions: region names of the channels.

    Returns:
        ``{"dice_wt": ..., ..., "lesion_fn_et": ...}``: the columns of ``scripts.official_metrics.metrics_table``.
    """
    row = metrics_table({"case": region_case_results(pred, label, regions)}, regions)[0]
    return {name: value for name, value in row.items() if name != "case_id"}


class BraTSMetricsReport(CaseReport):
    """Evaluator handler scoring each case with the official BraTS metrics, written as a CSV with summary rows.

    The evaluator's post-processed output must hold, per case, ``pred`` and ``label`` as region channels
    (``scripts.brats_regions.LabelToRegionsd``); the ``case_id`` is read from the (decollated) input batch. Each
    case is scored by ``brats-evaluation`` (:func:`region_case_results`): per region, legacy Dice and HD95,
    lesion-wise Dice and HD95 and the lesion counts. When the run completes, the rows and the mean, std and
    median rows of the package's parser (``scripts.official_metrics.metrics_table``) are printed as a table and
    written, at full precision, to the CSV ``output_dir/filename`` in one atomic step, so an interrupted
    evaluation never leaves a partial file where a previous good one was. In a distributed run
    (``torch.distributed`` initialised) every process's results are gathered and rank 0 alone writes them.

    Args:
        output_dir: folder of the CSV, created if needed.
        num_classes: 4 or 2, selecting the regions (see ``scripts.brats_regions.region_names``).
        filename: name of the CSV file.
        name: logger name used for the printed table.
    """

    def __init__(
        self, output_dir: str, num_classes: int, filename: str = "metrics.csv", name: str = "BraTSMetricsReport"
    ) -> None:
        super().__init__(output_dir, filename, name)
        self.regions = region_names(num_classes)
        self.results: list[tuple[str, dict[str, dict[str, Any]]]] = []

    def _reset(self, engine: Engine) -> None:
        self.results = []

    def _collect(self, engine: Engine) -> None:
        for data, output in zip(engine.state.batch, engine.state.output):
            case_id = str(data["case_id"])
            self.results.append((case_id, region_case_results(output["pred"], output["label"], self.regions, case_id)))

    def _gather(self) -> list[tuple[str, dict[str, dict[str, Any]]]] | None:
        """Every process's results on rank 0 (None on the other ranks); the local ones when not distributed."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.results
        gathered: list[list[tuple[str, dict[str, dict[str, Any]]]]] = [
            [] for _ in range(torch.distributed.get_world_size())
        ]
        torch.distributed.all_gather_object(gathered, self.results)
        if torch.distributed.get_rank() != 0:
            return None
        return [result for results in gathered for result in results]

    def _write(self, engine: Engine) -> None:
        results = self._gather()
        if results is None:  # another rank writes
            return
        if not results:
            raise RuntimeError("BraTSMetricsReport: the evaluation produced no case, nothing to report.")
        rows = metrics_table(dict(sorted(results)), self.regions)
        columns = list(rows[0])
        self._write_csv(columns, rows)
        self.logger.info("\n%s\nper-case metrics written to %s", format_table(rows, columns), self.path)


_COUNT_PREFIXES = ("lesion_tp_", "lesion_fp_", "lesion_fn_")


def _format_value(column: str, value: float) -> str:
    if column.startswith(_COUNT_PREFIXES) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}"


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Format metric rows as a fixed-width text table (4 decimals; whole lesion counts without).

    Args:
        rows: one dict per row, with ``case_id`` and float metric values (NaN and infinity allowed).
        columns: column order.

    Returns:
        the table as text.
    """
    width = max(len("case_id"), *(len(str(r["case_id"])) for r in rows))
    cells = {c: max(8, len(c)) for c in columns[1:]}
    lines = ["  ".join([f"{'case_id':<{width}}"] + [f"{c:>{cells[c]}}" for c in columns[1:]])]
    for r in rows:
        values = [f"{_format_value(c, r[c]):>{cells[c]}}" for c in columns[1:]]
        lines.append("  ".join([f"{r['case_id']:<{width}}"] + values))
    return "\n".join(lines)
