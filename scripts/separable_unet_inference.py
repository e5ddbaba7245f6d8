# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The inference form of a ``SeparableUNet``: the same function with fewer passes over memory.

The student's separable layers are narrow (16 to 64 channels at the two finest levels), so on a CPU they run at
memory bandwidth rather than at arithmetic speed: every pass over a full-resolution activation costs about as much
as a convolution. ``SeparableUNetForInference`` computes what the eval-mode network computes, up to float rounding,
with these passes removed:

- every BatchNorm is folded into the pointwise convolution before it;
- no decoder concatenation: the first separable convolution of a decoder block is split into the half that reads
  the upsampled input and the half that reads the skip. The depthwise convolution works per channel and the
  pointwise one is linear, so the sum of the two halves is the convolution of the concatenation;
- the skip's half runs right after its encoder block, while the skip is still in cache, and only its result
  (as many channels as the skip) is kept for the decoder, which adds the upsampled half into it in place;
- LeakyReLU runs in place, and dropout (the identity in eval mode) is dropped;
- 2x2 max pooling is two elementwise maxima of strided views: ``max_pool2d`` on CPU also computes and writes the
  indices of the maxima, which costs more than the pooling itself on the narrow full-resolution activations.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from scripts.separable_unet import NEGATIVE_SLOPE, SeparableBlock, SeparableUNet, UpBlock, check_divisible
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["SeparableUNetForInference", "max_pool_2x2"]


def _folded_block(block: SeparableBlock) -> list[nn.Conv2d]:
    """The four convolutions of ``block`` (depthwise, pointwise, depthwise, pointwise), BatchNorm folded in."""
    first, first_norm, _, second, second_norm, _ = block
    return [
        copy.deepcopy(first[0]),
        fuse_conv_bn_eval(first[1], first_norm),
        copy.deepcopy(second[0]),
        fuse_conv_bn_eval(second[1], second_norm),
    ]


def _conv_with_weight(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A 'same'-padded convolution like ``template`` (kernel, padding) holding ``weight`` and ``bias``."""
    out_channels, in_channels_per_group, kernel, _ = weight.shape
    groups = out_channels if template.groups > 1 else 1  # depthwise stays depthwise at its new width
    conv = nn.Conv2d(
        in_channels_per_group * groups,
        out_channels,
        kernel,
        padding=template.padding,
        groups=groups,
        bias=bias is not None,
    )
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return conv


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling with stride 2 of (N, C, H, W) ``x``, H and W even: ``F.max_pool2d(x, 2)`` without indices.

    Args:
        x: the activations, in any memory format (the result keeps it).

    Returns:
        the pooled activations, (N, C, H / 2, W / 2).

    Raises:
        ValueError: if H or W is odd.
    """
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"max_pool_2x2 needs an even height and width, got shape {list(x.shape)}.")
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class _FoldedBlock(nn.Module):
    """A ``SeparableBlock`` with its BatchNorm folded: (depthwise, pointwise, LeakyReLU) twice."""

    def __init__(self, block: SeparableBlock) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_folded_block(block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for depthwise, pointwise in zip(self.convs[::2], self.convs[1::2]):
            x = F.leaky_relu(pointwise(depthwise(x)), NEGATIVE_SLOPE, inplace=True)
        return x


class _SplitUpBlock(nn.Module):
    """An ``UpBlock`` whose concatenation is replaced by the sum of its first separable convolution's two halves."""

    def __init__(self, block: UpBlock) -> None:
        super().__init__()
        depthwise, pointwise, second_depthwise, second_pointwise = _folded_block(block.conv)
        width = block.up.out_channels  # the upsampled input's channels come first in the concatenation
        self.up = copy.deepcopy(block.up)
        self.upsampled_depthwise = _conv_with_weight(depthwise, depthwise.weight[:width], None)
        self.upsampled_pointwise = _conv_with_weight(pointwise, pointwise.weight[:, :width], pointwise.bias)
        self.skip_depthwise = _conv_with_weight(depthwise, depthwise.weight[width:], None)
        self.skip_pointwise = _conv_with_weight(pointwise, pointwise.weight[:, width:], None)
        self.second_depthwise, self.second_pointwise = second_depthwise, second_pointwise

    def project_skip(self, skip: torch.Tensor) -> torch.Tensor:
        """The skip's share of the block's first separable convolution (before its bias and LeakyReLU)."""
        return self.skip_pointwise(self.skip_depthwise(skip))

    def forward(self, x: torch.Tensor, projected_skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` and finish the block; ``projected_skip`` (from ``project_skip``) is overwritten."""
        x = projected_skip.add_(self.upsampled_pointwise(self.upsampled_depthwise(self.up(x))))
        x = F.leaky_relu(x, NEGATIVE_SLOPE, inplace=True)
        return F.leaky_relu(self.second_pointwise(self.second_depthwise(x)), NEGATIVE_SLOPE, inplace=True)


class SeparableUNetForInference(nn.Module):
    """A ``SeparableUNet`` in eval mode, rebuilt to compute the same logits with fewer passes over memory.

    See the module's docstring for what changes. The source network is left as it is (its weights are copied), and
    the copy's parameters do not require gradients: this form is for inference only, and its in-place operations
    overwrite intermediate activations.

    Args:
        network: a ``SeparableUNet`` in eval mode.

    Raises:
        ValueError: when ``network`` is in training mode (its BatchNorm and dropout behave differently then).
    """

    def __init__(self, network: SeparableUNet) -> None:
        super().__init__()
        if network.training:
            raise ValueError("SeparableUNetForInference needs a network in eval mode (call network.eval() first).")
        self.divisor = network.divisor
        self.encoders = nn.ModuleList(_FoldedBlock(encoder) for encoder in network.encoders)
        self.bottleneck = _FoldedBlock(network.bottleneck)
        self.decoders = nn.ModuleList(_SplitUpBlock(decoder) for decoder in network.decoders)
        self.head = copy.deepcopy(network.head)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of slices as ``SeparableUNet.forward`` does in eval mode: same input, logits and errors."""
        check_divisible(x, self.divisor)
        projected_skips: list[torch.Tensor] = []
        for encoder, decoder in zip(self.encoders, reversed(self.decoders)):
            x = encoder(x)
            projected_skips.append(decoder.project_skip(x))  # now, while the skip is still in cache
            x = max_pool_2x2(x)
        x = self.bottleneck(x)
        for decoder, projected_skip in zip(self.decoders, reversed(projected_skips)):
            x = decoder(x, projected_skip)
        return self.head(x)
