# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""A training handler that kills its own process at a chosen point, for the resume tests (run in a subprocess)."""

from __future__ import annotations

import os
import signal

from ignite.engine import Engine, Events


class KillDuringEpoch:
    """SIGKILL the process after the first iteration of epoch ``epoch``: the previous epochs are done and saved.

    Args:
        epoch: the epoch (1-based) in which the process dies.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._kill_in_epoch)

    def _kill_in_epoch(self, engine: Engine) -> None:
        if engine.state.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
