# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import pytest
import torch

from scripts.separable_unet import SeparableUNet

TEACHER_CHANNELS = (64, 128, 256, 512, 1024)


def trainable_parameters(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def batchnorm_statistics(network: torch.nn.Module) -> int:
    return sum(b.numel() for name, b in network.named_buffers() if name.endswith(("running_mean", "running_var")))


def test_student_reproduces_seed_parameter_counts_for_binary_task():
    student = SeparableUNet(in_channels=3, out_channels=2)
    assert trainable_parameters(student) == 605_645
    assert batchnorm_statistics(student) == 2_944


def test_student_with_four_classes_has_documented_parameter_count():
    assert trainable_parameters(SeparableUNet(in_channels=3, out_channels=4)) == 605_679


def test_teacher_is_the_same_family_at_four_times_the_width():
    teacher = SeparableUNet(in_channels=3, out_channels=4, channels=TEACHER_CHANNELS, dropout=0.5)
    assert trainable_parameters(teacher) == 9_475_935


def test_batchnorm_uses_keras_defaults_of_the_seed():
    bn = [m for m in SeparableUNet().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bn)


@pytest.mark.parametrize("channels", [(16, 32, 64, 128, 256), (8, 16, 32)])
@pytest.mark.parametrize("size", [(128, 128), (96, 240), (16 * 15, 16 * 15)])
def test_output_keeps_spatial_size_for_sizes_divisible_by_the_depth(channels, size):
    network = SeparableUNet(in_channels=4, out_channels=4, channels=channels).eval()
    divisor = 2 ** (len(channels) - 1)
    size = tuple(s // divisor * divisor for s in size)
    with torch.no_grad():
        out = network(torch.randn(2, 4, *size))
    assert out.shape == (2, 4, *size)


def test_input_not_divisible_by_16_is_rejected_with_the_shape():
    with pytest.raises(ValueError, match=r"divisible by 16.*\[1, 3, 100, 128\]"):
        SeparableUNet()(torch.randn(1, 3, 100, 128))


@pytest.mark.parametrize("kwargs", [{"channels": (16,)}, {"dropout": 1.0}])
def test_invalid_configuration_is_rejected(kwargs):
    with pytest.raises(ValueError):
        SeparableUNet(**kwargs)


@pytest.mark.parametrize("channels, dropout", [((16, 32, 64, 128, 256), 0.3), (TEACHER_CHANNELS, 0.5)])
def test_torchscript_export_matches_eager_network(channels, dropout):
    torch.manual_seed(0)
    network = SeparableUNet(in_channels=3, out_channels=4, channels=channels, dropout=dropout).eval()
    scripted = torch.jit.script(network)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network(x), rtol=1e-4, atol=1e-4)
