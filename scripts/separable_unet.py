# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""A 2D U-Net of depthwise-separable convolutions: the family of both the teacher and the student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SeparableConv2d", "SeparableBlock", "SeparableUNet", "UpBlock", "check_divisible"]

# Keras BatchNormalization defaults of the original Keras design: epsilon 1e-3, momentum 0.99 (== PyTorch 0.01).
BN_EPS = 1e-3
SEED_BN_MOMENTUM = 0.01
NEGATIVE_SLOPE = 0.01  # of the LeakyReLU after every BatchNorm


def check_divisible(x: torch.Tensor, divisor: int) -> None:
    """Check that a batch of slices can be pooled down a U-Net of size divisor ``divisor``.

    Args:
        x: images of shape (N, C, H, W).
        divisor: the network's size divisor (``2 ** number of poolings``).

    Raises:
        ValueError: if H or W is not divisible by ``divisor``.
    """
    if x.shape[-2] % divisor != 0 or x.shape[-1] % divisor != 0:
        raise ValueError(f"SeparableUNet needs H and W divisible by {divisor}, got input of shape {list(x.shape)}.")


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 convolution (no bias) followed by a pointwise 1x1 convolution (with bias).

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
        )


class SeparableBlock(nn.Sequential):
    """Two separable convolutions, each followed by BatchNorm and LeakyReLU(0.01).

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels of both convolutions.
        bn_momentum: BatchNorm running-statistics momentum (PyTorch convention).
    """

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = SEED_BN_MOMENTUM) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [
                SeparableConv2d(c_in, out_channels),
                nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=bn_momentum),
                nn.LeakyReLU(NEGATIVE_SLOPE),
            ]
        super().__init__(*layers)


class UpBlock(nn.Module):
    """Transposed-convolution upsampling to the skip's width, concatenation with the skip, separable block.

    Args:
        in_channels: channels of the coarser input.
        out_channels: channels of the skip connection and of the output.
        bn_momentum: BatchNorm running-statistics momentum (PyTorch convention).
    """

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = SEED_BN_MOMENTUM) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1)
        self.conv = SeparableBlock(2 * out_channels, out_channels, bn_momentum)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class SeparableUNet(nn.Module):
    """2D U-Net built from depthwise-separable convolutions (the seed's teacher and student family).

    The encoder has ``len(channels) - 1`` separable blocks each followed by 2x2 max pooling, then a bottleneck
    block of width ``channels[-1]`` followed by dropout. Each decoder stage upsamples with a 3x3 stride-2
    transposed convolution to the skip's width, concatenates the skip and applies a separable block. A 1x1
    convolution gives the class logits. Inputs must have H and W divisible by ``2 ** (len(channels) - 1)``.

    With the default (student) widths 16-32-64-128-256, 3 input channels and 2 classes the network has
    605,645 trainable parameters and 2,944 BatchNorm running-statistic values, as the seed. The teacher is the
    same family at 64-128-256-512-1024 with dropout 0.5.

    Args:
        in_channels: number of input channels (MRI sequences).
        out_channels: number of output classes (logits).
        channels: widths of the encoder stages, the last one being the bottleneck.
        dropout: dropout probability applied after the bottleneck.
        bn_momentum: BatchNorm running-statistics momentum (PyTorch convention). The default is the seed's Keras
            value (0.99 in Keras terms); it needs thousands of iterations before the evaluation-mode statistics
            settle, so short runs (demos, fine-tuning on few cases) should use PyTorch's usual 0.1.

    Raises:
        ValueError: if fewer than two widths are given or ``dropout`` is not in [0, 1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: float = 0.3,
        bn_momentum: float = SEED_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"channels must list at least two widths, got {channels}.")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.divisor = 2 ** (len(channels) - 1)
        widths_in = [in_channels] + channels[:-2]
        self.encoders = nn.ModuleList(
            SeparableBlock(c_in, c_out, bn_momentum) for c_in, c_out in zip(widths_in, channels[:-1])
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = SeparableBlock(channels[-2], channels[-1], bn_momentum)
        self.dropout = nn.Dropout(dropout)
        self.decoders = nn.ModuleList(
            UpBlock(c_in, c_out, bn_momentum) for c_in, c_out in zip(channels[:0:-1], channels[-2::-1])
        )
        self.head = nn.Conv2d(channels[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of slices.

        Args:
            x: images of shape (N, in_channels, H, W), H and W divisible by ``self.divisor``.

        Returns:
            logits of shape (N, out_channels, H, W).

        Raises:
            ValueError: if H or W is not divisible by ``self.divisor``.
        """
        check_divisible(x, self.divisor)
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for i, decoder in enumerate(self.decoders):
            x = decoder(x, skips[len(skips) - 1 - i])
        return self.head(x)
