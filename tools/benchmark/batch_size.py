# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Job: set a model's ``BrainSliceInferer`` to its fastest slice batch size (the teacher is compared at its best)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tools.benchmark.models import BenchmarkModel, inference_runs
from tools.benchmark.results import BatchSizeSweep
from tools.benchmark.timing import timed_runs

__all__ = ["fastest_batch_size"]


def fastest_batch_size(
    model: BenchmarkModel, candidates: Sequence[int], device: torch.device, amp: bool
) -> BatchSizeSweep:
    """Time one network-only run per candidate batch size, after one warm-up run, and keep the fastest.

    Args:
        model: a model whose inferer has ``sw_batch_size`` (a ``BrainSliceInferer``); it is set to the fastest.
        candidates: the slice batch sizes tried.
        device: where it runs.
        amp: run under autocast.

    Returns:
        the batch size set and the time of each candidate.
    """
    run = inference_runs(model, device, amp).network
    run()  # warm-up
    times = {}
    for batch_size in candidates:
        model.inferer.sw_batch_size = batch_size
        times[batch_size] = timed_runs(run, 1, device)[0]
    model.inferer.sw_batch_size = min(times, key=times.get)
    return BatchSizeSweep(sw_batch_size=model.inferer.sw_batch_size, sweep_s=times)
