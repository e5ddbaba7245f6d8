# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import pytest
from torch import nn

from scripts.separable_unet import SeparableUNet
from tools.flops import conv_gflops


def test_counter_counts_multiply_adds_of_2d_convolutions_twice():
    network = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, groups=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),
    )
    macs = 16 * 16 * 8 * 3 * 9 + 16 * 16 * 8 * 1 * 9 + 16 * 16 * 8 * 4 * 9
    assert conv_gflops(network, (1, 3, 16, 16)) == pytest.approx(2 * macs / 1e9)


def test_counter_counts_3d_and_transposed_convolutions():
    network = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ConvTranspose3d(4, 1, 2, stride=2))
    macs = 8**3 * 4 * 2 * 27 + 8**3 * 4 * 1 * 8  # conv: output x in x kernel; transposed: input x out x kernel
    assert conv_gflops(network, (1, 2, 8, 8, 8)) == pytest.approx(2 * macs / 1e9)


def test_student_and_teacher_cost_the_documented_gflops_per_128_slice():
    slice_shape = (1, 3, 128, 128)
    assert conv_gflops(SeparableUNet(3, 4), slice_shape) == pytest.approx(0.3528, rel=1e-3)
    teacher = SeparableUNet(3, 4, channels=(64, 128, 256, 512, 1024))
    assert conv_gflops(teacher, slice_shape) == pytest.approx(5.1332, rel=1e-3)


def test_counting_leaves_the_network_untouched():
    network = SeparableUNet(3, 4, channels=(4, 8, 16))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    network.train()
    conv_gflops(network, (1, 3, 32, 32))
    assert network.training
    assert all((v == before[k]).all() for k, v in network.state_dict().items())
