# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""A progress bar over the cases of one validation, listed among an evaluator's handlers."""

from __future__ import annotations

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

__all__ = ["EvaluationProgressBar"]


class EvaluationProgressBar(ProgressBar):
    """Ignite's tqdm ``ProgressBar`` over the cases of each run of an evaluator, one of its ``val_handlers``.

    A validation during training runs its evaluator as epoch ``N`` of ``N`` (``ValidationHandler`` passes the
    trainer's epoch), so ignite's bar, closed at ``EPOCH_COMPLETED``, would read ``validation [N/N]`` as if it were the
    last of N validations. This bar closes when the evaluator's run completes instead: it shows ``desc`` and the
    cases done, ``validation[2/4]  50%|...``. With ``persist`` False it is cleared when the validation ends (the
    metrics are logged then). Disable it on all but one process of a distributed run (``_disabled_`` in a config).

    Args:
        desc: the bar's description, e.g. ``validation``.
        persist: whether the bar stays on screen when the run completes.
        tqdm_kwargs: other arguments of ignite's ``ProgressBar`` (``bar_format``, tqdm's own).
    """

    def __init__(self, desc: str = "validation", persist: bool = False, **tqdm_kwargs) -> None:
        super().__init__(persist=persist, desc=desc, **tqdm_kwargs)

    def attach(self, engine: Engine, **kwargs) -> None:  # type: ignore[override]
        """Attach to an evaluator: one step per iteration (case), closed when the run completes.

        Args:
            engine: the evaluator.
            kwargs: as ignite's ``ProgressBar.attach`` (``metric_names``, ``output_transform``, ``event_name``).
        """
        kwargs.setdefault("closing_event_name", Events.COMPLETED)
        super().attach(engine, **kwargs)
