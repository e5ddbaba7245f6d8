# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""What the benchmark measures with: wall time, peak memory, the device's practical peak and paired ratios."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tools.benchmark.results import MatmulPeak

__all__ = ["MEMORY_METHOD", "matmul_peak", "paired_ratio", "peak_memory_mib", "timed_runs"]

MEMORY_METHOD = {
    "cpu": (
        "peak resident set size (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) minus the resident "
        "size just before the run, after gc and malloc_trim; it includes allocator slack and counts memory the "
        "process already held only once, so it is the extra RAM the run needed, not the bytes torch allocated"
    ),
    "cuda": "torch.cuda.max_memory_allocated minus the memory allocated before the run (tensors only, no cache)",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(run: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Wall time of ``repeats`` calls of ``run``, the device synchronised before each clock reading.

    Args:
        run: the call to time.
        repeats: how many calls.
        device: the device ``run`` computes on.

    Returns:
        the seconds of each call, in order.
    """
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def paired_ratio(slower_runs_s: Sequence[float], faster_runs_s: Sequence[float]) -> float:
    """Median over rounds of ``slower / faster``, the two runs of a round having run back to back.

    Args:
        slower_runs_s: one model's times, round by round.
        faster_runs_s: the other model's times, same rounds.

    Returns:
        the median of the per-round ratios.

    Raises:
        ValueError: if the two lists differ in length.
    """
    return statistics.median(slower / faster for slower, faster in zip(slower_runs_s, faster_runs_s, strict=True))


def _release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS, so later allocations show in RSS."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field} line.")


def peak_memory_mib(run: Callable[[], Any], device: torch.device) -> float | None:
    """Extra memory one call of ``run`` needed at its peak, in MiB (``MEMORY_METHOD`` says what is counted).

    Args:
        run: the call to measure.
        device: ``cpu`` (peak RSS increase, Linux only) or ``cuda`` (``torch.cuda.max_memory_allocated``).

    Returns:
        the peak increase in MiB, or None on a CPU whose OS cannot reset the peak RSS (not Linux); ``run`` is called
        once either way.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        before = _status_kib("VmRSS")
    except OSError:
        run()
        return None
    run()
    return (_status_kib("VmHWM") - before) / 1024


def matmul_gflops_per_s(size: int, repeats: int, device: torch.device) -> float:
    """GFLOP/s of a float32 ``size`` x ``size`` by ``size`` x ``size`` matmul: the device's practical peak.

    Args:
        size: side of the square matrices.
        repeats: timed products after one warm-up product; the median is used.
        device: where the product runs.

    Returns:
        ``2 * size**3 / 1e9`` over the median seconds of one product.
    """
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    torch.mm(a, b)
    return 2 * size**3 / 1e9 / statistics.median(timed_runs(lambda: torch.mm(a, b), repeats, device))


def matmul_peak(size: int, runs_gflops_per_s: Sequence[float]) -> MatmulPeak:
    """The practical peak from one matmul measurement per round.

    Args:
        size: side of the matrices measured.
        runs_gflops_per_s: GFLOP/s of each round (:func:`matmul_gflops_per_s`).

    Returns:
        the measurements and their median.
    """
    runs = list(runs_gflops_per_s)
    return MatmulPeak(size=size, runs_gflops_per_s=runs, gflops_per_s=statistics.median(runs))
