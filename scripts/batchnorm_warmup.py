# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""BatchNorm running statistics that are an average of real batch statistics from the first training iteration.

PyTorch starts every BatchNorm's running statistics at mean 0 and variance 1 and moves them by ``momentum`` per
training batch, so after ``n`` batches a fraction ``(1 - momentum) ** n`` of them is still that initial guess (73 %
after 3 batches at momentum 0.1). The activations a freshly initialised ``SeparableUNet`` feeds its BatchNorm layers
have variances of 0.01 to 0.1 (PyTorch's default initialisation), so after 3 batches the running variances are about
18 times the real ones: in evaluation mode each of the 18 BatchNorm layers in series shrinks the features about
4-fold, they vanish, and the network outputs its head's biases, one class everywhere. That is what a short run
validates and saves (3 epochs of ``configs/train.json`` on one case, one batch each: every voxel enhancing tumour;
after 25 batches the running variances are still twice the real ones).

``BatchNormWarmup`` removes that bias the way Adam corrects its moment estimates: until a layer has seen
``1 / momentum`` batches its running statistics are the cumulative average of the batches seen (factor ``1 / n``
for the ``n``-th batch, as PyTorch's ``momentum=None``), then the usual exponential average with the layer's own
momentum. A network resumed or fine-tuned from a checkpoint keeps its ``num_batches_tracked``, so its well-settled
statistics are not reset.
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from torch import nn

__all__ = ["BatchNormWarmup"]


class BatchNormWarmup:
    """Ignite handler: cumulative-average BatchNorm statistics until each layer's momentum takes over.

    Before every training iteration, each BatchNorm layer of ``network`` that tracks running statistics with a
    momentum ``m`` gets the momentum ``max(m, 1 / (n + 1))``, ``n`` being the batches it has tracked so far.

    Args:
        network: the trained network (its BatchNorm momenta are read once, here).
    """

    def __init__(self, network: nn.Module) -> None:
        self.momenta = {
            module: module.momentum
            for module in network.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats
            and module.momentum is not None
        }

    def attach(self, engine: Engine) -> None:
        """Run before every iteration of ``engine`` (for ``train_handlers`` of a MONAI trainer)."""
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        """Set each layer's momentum for its next batch."""
        for module, momentum in self.momenta.items():
            module.momentum = max(momentum, 1.0 / (int(module.num_batches_tracked) + 1))
