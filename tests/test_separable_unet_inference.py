# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""``SeparableUNetForInference`` computes the eval-mode ``SeparableUNet``'s logits, and leaves the source alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.separable_unet import SeparableUNet
from scripts.separable_unet_inference import SeparableUNetForInference, max_pool_2x2


@pytest.mark.parametrize(
    "channels, shape",
    [((16, 32, 64, 128, 256), (3, 3, 32, 48)), ((8, 16, 24), (1, 3, 20, 12)), ((4, 6), (2, 3, 6, 10))],
    ids=["student, non-square", "three levels, one slice", "two levels"],
)
def test_inference_form_gives_the_networks_logits(trained_like_network, channels, shape):
    network = trained_like_network(channels)
    batch = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network(batch)
        actual = SeparableUNetForInference(network)(batch)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_inference_form_gives_the_networks_logits_in_channels_last_memory(trained_like_network):
    network = trained_like_network()
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prepared = SeparableUNetForInference(network).to(memory_format=torch.channels_last)
    with torch.no_grad():
        actual = prepared(batch.contiguous(memory_format=torch.channels_last))
        expected = network(batch)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_inference_form_has_no_batchnorm_no_dropout_and_no_trainable_parameters(trained_like_network):
    prepared = SeparableUNetForInference(trained_like_network())
    assert not any(isinstance(module, (nn.BatchNorm2d, nn.Dropout)) for module in prepared.modules())
    assert not any(parameter.requires_grad for parameter in prepared.parameters())


def test_building_the_inference_form_leaves_the_source_network_unchanged(trained_like_network):
    network = trained_like_network()
    before = {name: value.clone() for name, value in network.state_dict().items()}
    prepared = SeparableUNetForInference(network)
    with torch.no_grad():
        prepared(torch.randn(1, 3, 16, 16))
    assert not network.training
    assert all(torch.equal(network.state_dict()[name], value) for name, value in before.items())
    assert all(parameter.requires_grad for parameter in network.parameters())


def test_inference_form_refuses_a_network_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        SeparableUNetForInference(SeparableUNet(3, 2).train())


def test_inference_form_rejects_a_size_the_network_cannot_pool():
    prepared = SeparableUNetForInference(SeparableUNet(3, 2).eval())
    with pytest.raises(ValueError, match="divisible by 16"):
        prepared(torch.zeros(1, 3, 24, 32))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
def test_max_pool_2x2_equals_max_pool2d_and_keeps_the_memory_format(memory_format):
    x = torch.randn(2, 5, 6, 8, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=memory_format)
    pooled = max_pool_2x2(x)
    assert torch.equal(pooled, nn.functional.max_pool2d(x, 2))
    assert pooled.is_contiguous(memory_format=memory_format)


def test_max_pool_2x2_rejects_an_odd_size():
    with pytest.raises(ValueError, match="even height and width"):
        max_pool_2x2(torch.zeros(1, 1, 4, 5))
