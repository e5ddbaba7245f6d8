# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Convolution FLOP counting, shared by the model comparison and the benchmark."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["counting_conv_flops", "conv_gflops"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@contextlib.contextmanager
def counting_conv_flops(network: nn.Module) -> Iterator[list[int]]:
    """Count the multiply-adds of a network's convolutions while the block runs.

    Convolutions count ``output elements x in_channels / groups x kernel volume`` multiply-adds, transposed ones
    ``input elements x out_channels / groups x kernel volume``; biases, normalisation, activations, pooling and
    upsampling are left out.

    Args:
        network: the network whose forward passes inside the block are counted.

    Yields:
        a one-item list holding the running count of multiply-adds.
    """
    macs = [0]

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        kernel = math.prod(module.kernel_size)
        if isinstance(module, _CONV_TRANSPOSE):
            macs[0] += inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            macs[0] += output.numel() * module.in_channels // module.groups * kernel

    handles = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, _CONV + _CONV_TRANSPOSE)]
    try:
        yield macs
    finally:
        for handle in handles:
            handle.remove()


def conv_gflops(network: nn.Module, input_shape: Sequence[int]) -> float:
    """GFLOPs (2 x multiply-adds / 1e9) of a network's convolutions for one input, 1D, 2D or 3D.

    A copy of the network runs on the ``meta`` device, so nothing is computed and the network is left untouched.

    Args:
        network: the network.
        input_shape: the input's shape, batch dimension included, e.g. ``(1, 3, 128, 128)``.

    Returns:
        the GFLOPs of one forward pass on that input.
    """
    meta = copy.deepcopy(network).to("meta").eval()
    with counting_conv_flops(meta) as macs, torch.no_grad():
        meta(torch.zeros(tuple(input_shape), device="meta"))
    return 2 * macs[0] / 1e9
