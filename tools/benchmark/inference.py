# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Job: network-only and end-to-end latency, peak memory and convolution work of every model, and the matmul peak."""

from __future__ import annotations

from collections.abc import Callable

import torch

from scripts.fast_inference import BrainSliceInferer
from tools.benchmark.models import BenchmarkModel, inference_runs, volume_gflops
from tools.benchmark.results import MatmulPeak, ModelLatency, Speedup
from tools.benchmark.timing import matmul_gflops_per_s, matmul_peak, paired_ratio, peak_memory_mib, timed_runs
from tools.flops import conv_gflops

__all__ = ["MATMUL_REPEATS", "benchmark_inference", "speedups"]

MATMUL_REPEATS = 3  # products per matmul measurement (median), one measurement per network-only round


def benchmark_inference(
    models: dict[str, BenchmarkModel],
    repeats: int,
    device: torch.device,
    amp: bool,
    matmul_size: int,
    progress: Callable[[int], object] = lambda steps: None,
) -> tuple[dict[str, ModelLatency], MatmulPeak]:
    """Time every model on its case, the models taking turns.

    After one warm-up run of each kind per model, the models take turns (``repeats`` rounds), so that the machine's
    speed drifting during the benchmark affects every model alike and the ratios stay fair. In its turn a model runs
    twice and the second run is timed: a run straight after another model's is slower for the allocator's state
    (the student by about 20% after the teacher), while a deployed model runs volume after volume. In each
    network-only round the matmul peak is measured too, so that the achieved fraction of it compares like with like
    on a machine whose speed varies. One more run of each kind measures the peak memory.

    Args:
        models: model key -> model.
        repeats: rounds.
        device: where they run.
        amp: run under autocast.
        matmul_size: side of the matmul measuring the peak.
        progress: called with the number of steps done (``len(models) * (2 * repeats + 4)`` in all).

    Returns:
        each model's latency record, and the matmul peak.
    """
    runs = {key: inference_runs(model, device, amp) for key, model in models.items()}
    gflops_volume = {}
    for key, model in models.items():
        gflops_volume[key] = volume_gflops(model, device, amp)  # the network-only warm-up, unless the inferer prepares
        if isinstance(model.inferer, BrainSliceInferer):
            runs[key].network()  # warm-up of the prepared network the timed runs use
        runs[key].end_to_end()  # warm-up
        progress(2)
    network_s: dict[str, list[float]] = {key: [] for key in models}
    end_to_end_s: dict[str, list[float]] = {key: [] for key in models}
    matmul_runs = []
    for _ in range(repeats):
        for key in models:
            runs[key].network()  # untimed: the timed run then finds the memory state this model leaves behind
            network_s[key] += timed_runs(runs[key].network, 1, device)
            progress(1)
        matmul_runs.append(matmul_gflops_per_s(matmul_size, MATMUL_REPEATS, device))
    network_peak = {key: peak_memory_mib(runs[key].network, device) for key in models}
    progress(len(models))
    for _ in range(repeats):
        for key in models:
            runs[key].end_to_end()
            end_to_end_s[key] += timed_runs(runs[key].end_to_end, 1, device)
            progress(1)
    end_to_end_peak = {key: peak_memory_mib(runs[key].end_to_end, device) for key in models}
    progress(len(models))
    matmul = matmul_peak(matmul_size, matmul_runs)
    latency = {
        key: ModelLatency.measured(
            parameters=sum(p.numel() for p in model.network.parameters()),
            gflops_nominal=conv_gflops(model.network, model.nominal_input),
            nominal_unit=model.nominal_unit,
            gflops_volume=gflops_volume[key],
            network_runs_s=network_s[key],
            end_to_end_runs_s=end_to_end_s[key],
            network_peak_mib=network_peak[key],
            end_to_end_peak_mib=end_to_end_peak[key],
            matmul=matmul,
        )
        for key, model in models.items()
    }
    return latency, matmul


def speedups(latency: dict[str, ModelLatency], models: tuple[str, ...], others: tuple[str, ...]) -> list[Speedup]:
    """Speed-up of each of ``models`` over each of ``others``, both measured, round by round.

    Args:
        latency: the measured models.
        models: the faster models (e.g. the student's forms); those not measured are left out.
        others: the models they are compared with.

    Returns:
        one speed-up per measured pair, network only and end to end.
    """
    return [
        Speedup(
            model=model,
            over=other,
            network=paired_ratio(latency[other].network_runs_s, latency[model].network_runs_s),
            end_to_end=paired_ratio(latency[other].end_to_end_runs_s, latency[model].end_to_end_runs_s),
        )
        for model in models
        if model in latency
        for other in others
        if other in latency
    ]
