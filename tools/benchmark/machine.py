# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The machine and software versions a benchmark ran on."""

from __future__ import annotations

import contextlib
import os
import platform

import monai
import torch

from tools.benchmark.results import Machine

__all__ = ["describe_machine"]


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device, amp: bool) -> Machine:
    """The CPU (and GPU on CUDA), thread count and versions of this process.

    Args:
        device: the benchmark's device.
        amp: whether mixed precision is on.

    Returns:
        the description.
    """
    return Machine(
        device=str(device),
        amp=amp,
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        python_version=platform.python_version(),
        torch_version=torch.__version__,
        monai_version=monai.__version__,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
