# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Speed, memory and cost of the student, the teacher and MONAI's BraTS SegResNet, measured in one process.

All figures come from one real-sized four-sequence case (the shared BraTS sample when present, else a synthetic
240 x 240 x 155 one) on one device, with random weights (weights do not change the timing):

- inference latency per volume, network only (the preprocessed tensor through the inferer) and end to end (NIfTI
  files in, NIfTI label out), median over ``repeats`` rounds in which the models take turns, each timed on the
  second of two runs in a row, and the peak memory of one more run (``inference``); the teacher runs at its fastest
  slice batch size (``batch_size``), the student at the deployed one;
- parameters, GFLOPs and the achieved GFLOP/s against the practical peak of the device, a large float32 matmul
  timed in every round (``timing``);
- how far the student's fast path is from MONAI's plain ``SliceInferer`` (``agreement``);
- seconds per epoch of the bundle's own trainers: teacher, student alone, online and cached distillation
  (``training``).

The 2D networks run exactly as ``configs/inference.json`` deploys them; the peer is the Model Zoo
``brats_mri_segmentation`` bundle's network and ``SlidingWindowInferer`` (``models``). Results (``results``) go to
``output_dir``: ``benchmark.json``, ``benchmark.md`` (printed at the end) and ``benchmark.png`` (``report``)::

    python -m tools.benchmark --output_dir docs/benchmark --repeats 5
"""

from tools.benchmark.results import BenchmarkResults
from tools.benchmark.suite import benchmark

__all__ = ["BenchmarkResults", "benchmark"]
