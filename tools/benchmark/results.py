# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Typed results of the benchmark's jobs, written to ``benchmark.json`` as they are (``dataclasses.asdict``)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BatchSizeSweep",
    "BenchmarkResults",
    "Case",
    "FastPathAgreement",
    "LossTermCost",
    "Machine",
    "MatmulPeak",
    "ModelLatency",
    "Speedup",
    "TrainingEpochs",
]


@dataclasses.dataclass
class Machine:
    """Where the benchmark ran."""

    device: str
    amp: bool
    cpu_model: str
    cpu_count: int | None
    torch_threads: int
    platform: str
    python_version: str
    torch_version: str
    monai_version: str
    gpu: str | None = None


@dataclasses.dataclass
class Case:
    """The one case every model runs on: where it comes from and its preprocessed shape."""

    source: str
    shape: list[int]


@dataclasses.dataclass
class FastPathAgreement:
    """How far the student's fast path (``BrainSliceInferer``) is from MONAI's plain ``SliceInferer``."""

    weights: str  # "random" or "trained models/model.pt"
    max_abs_logit_difference: float
    label_agreement: float  # fraction of all voxels with the same label
    label_agreement_brain: float  # same, brain voxels only


@dataclasses.dataclass
class BatchSizeSweep:
    """The slice batch size a model's ``BrainSliceInferer`` was set to: the fastest of those tried."""

    sw_batch_size: int
    sweep_s: dict[int, float]  # batch size -> seconds of one network-only run


@dataclasses.dataclass
class MatmulPeak:
    """The device's practical float32 peak: a square matmul, measured once per network-only round."""

    size: int
    runs_gflops_per_s: list[float]
    gflops_per_s: float  # median of the runs


@dataclasses.dataclass
class ModelLatency:
    """One model's inference latency (median over rounds), peak memory and convolution work on the case."""

    parameters: int
    gflops_nominal: float  # per ``nominal_unit``
    nominal_unit: str
    gflops_volume: float  # the convolutions of one network-only run on the case
    network_runs_s: list[float]
    end_to_end_runs_s: list[float]
    network_peak_mib: float | None
    end_to_end_peak_mib: float | None
    network_s: float
    end_to_end_s: float
    achieved_gflops_per_s: float
    fraction_of_matmul_peak: float

    @classmethod
    def measured(
        cls,
        parameters: int,
        gflops_nominal: float,
        nominal_unit: str,
        gflops_volume: float,
        network_runs_s: Sequence[float],
        end_to_end_runs_s: Sequence[float],
        network_peak_mib: float | None,
        end_to_end_peak_mib: float | None,
        matmul: MatmulPeak,
    ) -> ModelLatency:
        """The latency record of timed runs: medians, achieved GFLOP/s and their fraction of the matmul peak."""
        network_s = statistics.median(network_runs_s)
        achieved = gflops_volume / network_s
        return cls(
            parameters=parameters,
            gflops_nominal=gflops_nominal,
            nominal_unit=nominal_unit,
            gflops_volume=gflops_volume,
            network_runs_s=list(network_runs_s),
            end_to_end_runs_s=list(end_to_end_runs_s),
            network_peak_mib=network_peak_mib,
            end_to_end_peak_mib=end_to_end_peak_mib,
            network_s=network_s,
            end_to_end_s=statistics.median(end_to_end_runs_s),
            achieved_gflops_per_s=achieved,
            fraction_of_matmul_peak=achieved / matmul.gflops_per_s,
        )


@dataclasses.dataclass
class Speedup:
    """How many times faster ``model`` ran than ``over``: medians of the ratios within each round."""

    model: str
    over: str
    network: float
    end_to_end: float


@dataclasses.dataclass
class TrainingEpochs:
    """Epochs of one training mode run by the bundle's own trainer (validation off)."""

    name: str
    configs: list[str]
    overrides: dict[str, Any]
    parameters: int  # of the network being trained
    train_cases: int
    patches_per_epoch: int
    dataset_build_s: float  # building ``train#dataset`` (the teacher's pass per case in cached mode)
    epoch_runs_s: list[float]
    epoch_s: float  # median of all epochs but the first
    slices_per_s: float


@dataclasses.dataclass
class LossTermCost:
    """One training iteration's distillation loss (forward and backward) on cached soft labels."""

    name: str
    settings: dict[str, Any]  # the configs/distill.json ids it sets
    batch: int  # patches per iteration
    patch: int  # side of a patch
    iteration_runs_s: list[float]
    iteration_s: float  # median of the runs
    peak_mib: float | None  # extra memory of one iteration at its peak (``memory_method``); None where unknown


@dataclasses.dataclass
class BenchmarkResults:
    """Everything one benchmark run measured, as written to ``benchmark.json``."""

    date_utc: str
    machine: Machine
    repeats: int
    quick: bool
    case: Case
    fast_path_agreement: FastPathAgreement
    student_batch_size: int
    teacher_batch_size: BatchSizeSweep
    models: dict[str, ModelLatency]
    matmul: MatmulPeak
    speedups: list[Speedup]
    training_patch_size: int
    training: dict[str, TrainingEpochs]
    loss_terms: dict[str, LossTermCost]
    memory_method: str

    def speedup(self, model: str, over: str) -> Speedup:
        """The speed-up of ``model`` over ``over``.

        Raises:
            KeyError: if that pair was not measured.
        """
        for speedup in self.speedups:
            if speedup.model == model and speedup.over == over:
                return speedup
        raise KeyError(f"no speed-up of {model} over {over} was measured.")

    def training_over_student_alone(self, mode: str) -> float:
        """Seconds per epoch of a training mode over those of the student trained alone."""
        return self.training[mode].epoch_s / self.training["student_alone"].epoch_s

    def patch_cost_over(self, mode: str, reference: str) -> float:
        """Seconds per training patch of a training mode over those of another (epochs of different sizes)."""
        return self.training[reference].slices_per_s / self.training[mode].slices_per_s

    def to_dict(self) -> dict[str, Any]:
        """The results as plain JSON-ready data."""
        return dataclasses.asdict(self)
