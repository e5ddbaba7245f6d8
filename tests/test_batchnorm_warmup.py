# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""BatchNormWarmup: running statistics averaged over real batches from the first iteration, then the usual momentum."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from scripts.batchnorm_warmup import BatchNormWarmup


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(4, 2, 3, 3, generator=generator) * 0.01 * (k + 1) + k for k in range(count)]


def test_running_statistics_are_the_average_of_the_batches_seen_not_of_their_initial_values():
    norm = nn.BatchNorm2d(2, momentum=0.1)
    warmup = BatchNormWarmup(nn.Sequential(norm).train())
    seen = batches(3)
    for batch in seen:
        warmup()
        norm(batch)
    expected_mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in seen]).mean(dim=0)
    expected_var = torch.stack([b.var(dim=(0, 2, 3)) for b in seen]).mean(dim=0)  # BatchNorm keeps unbiased variance
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)


def test_the_layer_momentum_takes_over_after_one_over_momentum_batches():
    norm = nn.BatchNorm2d(2, momentum=0.25)
    warmup = BatchNormWarmup(nn.Sequential(norm).train())
    momenta = []
    for batch in batches(6):
        warmup()
        momenta.append(norm.momentum)
        norm(batch)
    assert momenta == pytest.approx([1.0, 1 / 2, 1 / 3, 0.25, 0.25, 0.25])


def test_a_fine_tuned_network_keeps_its_settled_statistics():
    norm = nn.BatchNorm2d(2, momentum=0.1)
    norm.num_batches_tracked.fill_(500)
    norm.running_mean.fill_(3.0)
    warmup = BatchNormWarmup(nn.Sequential(norm).train())
    (batch,) = batches(1)
    warmup()
    norm(batch)
    torch.testing.assert_close(norm.running_mean, 0.9 * 3.0 + 0.1 * batch.mean(dim=(0, 2, 3)))


def test_layers_without_running_statistics_or_momentum_are_left_alone():
    cumulative, untracked = nn.BatchNorm2d(2, momentum=None), nn.BatchNorm2d(2, track_running_stats=False)
    warmup = BatchNormWarmup(nn.Sequential(cumulative, untracked))
    warmup()
    assert warmup.momenta == {}
    assert cumulative.momentum is None and untracked.momentum == 0.1


def test_attached_handler_runs_before_every_iteration():
    norm = nn.BatchNorm2d(2, momentum=0.1)
    momenta = []
    engine = Engine(lambda engine, batch: (momenta.append(norm.momentum), norm(batch)))
    BatchNormWarmup(nn.Sequential(norm).train()).attach(engine)
    engine.run(batches(2), max_epochs=1)
    assert momenta == [1.0, 0.5]
