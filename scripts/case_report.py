# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The base of the evaluator handlers that collect one row per case and write them as a CSV when the run ends."""

from __future__ import annotations

import csv
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from ignite.engine import Engine, Events
from scripts.atomic_files import atomic_path

__all__ = ["CaseReport"]


class CaseReport(ABC):
    """An evaluator handler that starts afresh with each run, collects each iteration's cases and writes a CSV at
    its end.

    Subclasses implement ``_reset`` (``EPOCH_STARTED``), ``_collect`` (``ITERATION_COMPLETED``) and ``_write``
    (``EPOCH_COMPLETED``), which writes with :meth:`_write_csv`: in one atomic step, so an interrupted run never
    leaves a partial file where a previous good one was.

    Args:
        output_dir: folder of the CSV, created when it is written.
        filename: name of the CSV file.
        name: logger name.
    """

    def __init__(self, output_dir: str, filename: str, name: str) -> None:
        self.output_dir = output_dir
        self.filename = filename
        self.logger = logging.getLogger(name)

    @property
    def path(self) -> str:
        """Path of the CSV file."""
        return os.path.join(self.output_dir, self.filename)

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on an evaluator.

        Args:
            engine: the evaluator.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    @abstractmethod
    def _reset(self, engine: Engine) -> None:
        """Start afresh (``EPOCH_STARTED``)."""

    @abstractmethod
    def _collect(self, engine: Engine) -> None:
        """Collect the iteration's cases (``ITERATION_COMPLETED``)."""

    @abstractmethod
    def _write(self, engine: Engine) -> None:
        """Write the CSV (``EPOCH_COMPLETED``)."""

    def _write_csv(self, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
        """Write ``rows`` under a header of ``columns`` to :attr:`path`, atomically.

        Args:
            columns: the CSV's columns, in order.
            rows: one dict per row, keyed by column.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
