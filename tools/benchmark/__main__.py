# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Command line of the benchmark: ``python -m tools.benchmark --output_dir docs/benchmark --repeats 5``."""

from __future__ import annotations

import fire

from tools.benchmark.suite import benchmark


def main(
    output_dir: str = "docs/benchmark",
    case_dir: str | None = None,
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
    amp: bool = False,
    bundle_root: str = ".",
) -> None:
    """Benchmark student, teacher and SegResNet and write the reports; see :func:`tools.benchmark.benchmark`.

    Args:
        output_dir: folder of the reports.
        case_dir: a four-sequence BraTS case folder; default the shared sample, else a synthetic case.
        repeats: timed rounds per measurement, after one warm-up.
        quick: small synthetic case and workloads, for tests.
        device: ``cpu`` or ``cuda``.
        amp: mixed precision on CUDA; ignored on CPU.
        bundle_root: the bundle root.
    """
    benchmark(
        output_dir, case_dir=case_dir, repeats=repeats, quick=quick, device=device, amp=amp, bundle_root=bundle_root
    )


if __name__ == "__main__":
    fire.Fire(main)
