# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Per-case BraTS metrics (Dice and 95% Hausdorff distance per region) written as a CSV and printed as a table."""

from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance
from scripts.atomic_files import atomic_path
from scripts.brats_regions import region_names

__all__ = ["BraTSMetricsReport", "case_metrics", "format_table"]


def _spacing(volume: torch.Tensor) -> list[float]:
    if isinstance(volume, MetaTensor):
        return [float(s) for s in np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0)]
    return [1.0] * (volume.ndim - 1)


def _plain(volume: torch.Tensor) -> torch.Tensor:
    return volume.as_tensor() if isinstance(volume, MetaTensor) else volume


def case_metrics(pred: torch.Tensor, label: torch.Tensor, regions: tuple[str, ...]) -> dict[str, float]:
    """Dice and HD95 (mm) of one case for each region, with the BraTS conventions for empty regions.

    A region absent from both prediction and ground truth scores Dice 1 and HD95 0; absent from only one of
    them it scores Dice 0 and HD95 equal to the volume's diagonal in mm (the worst possible distance).

    Args:
        pred: binary region channels of shape (len(regions), *spatial).
        label: ground-truth region channels of the same shape.
        regions: region names of the channels.

    Returns:
        ``{"dice_wt": ..., "hd95_wt": ..., ...}`` in region order, Dice first.
    """
    spacing = _spacing(label)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(label.shape[1:], spacing)))
    pred, label = _plain(pred), _plain(label)
    dice = compute_dice(pred[None], label[None], include_background=True, ignore_empty=False)[0]
    result: dict[str, float] = {}
    for i, name in enumerate(regions):
        result[f"dice_{name.lower()}"] = float(dice[i])
    for i, name in enumerate(regions):
        has_pred, has_label = bool(pred[i].any()), bool(label[i].any())
        if not has_pred and not has_label:
            hd95 = 0.0
        elif has_pred != has_label:
            hd95 = diagonal
        else:
            hd95 = float(
                compute_hausdorff_distance(
                    pred[None, i : i + 1],
                    label[None, i : i + 1],
                    include_background=True,
                    percentile=95,
                    spacing=spacing,
                )[0, 0]
            )
        result[f"hd95_{name.lower()}"] = hd95
    return result


class BraTSMetricsReport:
    """Evaluator handler collecting per-case Dice and HD95 per region, written as a CSV with a mean row.

    The evaluator's post-processed output must hold, per case, ``pred`` and ``label`` as region channels
    (``scripts.brats_regions.LabelToRegionsd``); the ``case_id`` is read from the (decollated) input batch.
    When the run completes, the table is printed and the CSV is written to ``output_dir/filename`` in one atomic
    step, so an interrupted evaluation never leaves a partial file where a previous good one was. In a distributed
    run (``torch.distributed`` initialised) every process's rows are gathered and rank 0 alone writes them.

    Args:
        output_dir: folder of the CSV, created if needed.
        num_classes: 4 or 2, selecting the regions (see ``scripts.brats_regions.region_names``).
        filename: name of the CSV file.
        name: logger name used for the printed table.
    """

    def __init__(
        self, output_dir: str, num_classes: int, filename: str = "metrics.csv", name: str = "BraTSMetricsReport"
    ) -> None:
        self.output_dir = output_dir
        self.regions = region_names(num_classes)
        self.filename = filename
        self.logger = logging.getLogger(name)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on an evaluator.

        Args:
            engine: the evaluator.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    @property
    def path(self) -> str:
        """Path of the CSV file."""
        return os.path.join(self.output_dir, self.filename)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        for data, output in zip(engine.state.batch, engine.state.output):
            metrics = case_metrics(output["pred"], output["label"], self.regions)
            self.rows.append({"case_id": data["case_id"], **metrics})

    def _gather(self) -> list[dict[str, Any]] | None:
        """Every process's rows on rank 0 (None on the other ranks); the local rows when not distributed."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.rows
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, self.rows)
        if torch.distributed.get_rank() != 0:
            return None
        return [row for rows in gathered for row in rows]

    def _write(self, engine: Engine) -> None:
        rows = self._gather()
        if rows is None:  # another rank writes
            return
        if not rows:
            raise RuntimeError("BraTSMetricsReport: the evaluation produced no case, nothing to report.")
        columns = list(rows[0])
        rows = sorted(rows, key=lambda r: r["case_id"])
        mean = {"case_id": "mean", **{c: float(np.mean([r[c] for r in rows])) for c in columns[1:]}}
        os.makedirs(self.output_dir, exist_ok=True)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows + [mean]:
                writer.writerow({c: row[c] if c == "case_id" else f"{row[c]:.4f}" for c in columns})
        self.logger.info("\n%s\nper-case metrics written to %s", format_table(rows + [mean], columns), self.path)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Format metric rows as a fixed-width text table.

    Args:
        rows: one dict per row, with ``case_id`` and float metric values.
        columns: column order.

    Returns:
        the table as text.
    """
    width = max(len("case_id"), *(len(str(r["case_id"])) for r in rows))
    lines = ["  ".join([f"{'case_id':<{width}}"] + [f"{c:>8}" for c in columns[1:]])]
    for r in rows:
        lines.append("  ".join([f"{r['case_id']:<{width}}"] + [f"{r[c]:8.4f}" for c in columns[1:]]))
    return "\n".join(lines)
