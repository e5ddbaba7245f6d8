# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The bundle's own error message as the last line of a failed run.

MONAI's ``python -m monai.bundle run`` lets every exception end the process, wrapped by the config machinery
(``Failed to evaluate ConfigExpression ...``, ``applying transform <... object at 0x...>``), so the message the
bundle raised (naming the case, the file and what to do) sits in the middle of a long chained traceback.
:func:`install` (called when the configs' ``imports`` load the ``scripts`` package) replaces ``sys.excepthook`` by
:func:`report_uncaught`: the full traceback is printed as before, then one line, :func:`summary_line` of the
bundle's error, so that the last line of a refused run is the bundle's message. The exit status stays 1.
"""

from __future__ import annotations

import os
import re
import sys
from types import TracebackType

__all__ = ["bundle_error", "install", "report_uncaught", "summary_line"]

_SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
# torch re-raises an exception of a DataLoader worker process with the worker's traceback in its message
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def _raised_by_bundle(exception: BaseException) -> bool:
    if type(exception).__module__.split(".")[0] == __package__:
        return True
    tb = exception.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == _SCRIPTS_DIR


def bundle_error(exception: BaseException) -> BaseException | None:
    """The outermost exception of ``exception``'s chain raised by the bundle itself.

    An exception is the bundle's when its class is defined in the ``scripts`` package (``BraTSDataError``,
    ``CheckpointMismatchError``...) or when it was raised by code of the ``scripts`` package. The chain is followed
    from ``exception`` through ``__cause__`` and ``__context__`` as Python prints it.

    Args:
        exception: the exception that ended the run.

    Returns:
        the bundle's exception, or None when no exception of the chain is the bundle's.
    """
    seen: set[int] = set()
    current: BaseException | None = exception
    while current is not None and id(current) not in seen:
        if _raised_by_bundle(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def summary_line(exception: BaseException) -> str:
    """One line ``<ExceptionClass>: <message>``, the message's whitespace and line breaks collapsed.

    The message of an exception re-raised from a DataLoader worker process is reduced to the worker's own
    exception message, without the worker's traceback.

    Args:
        exception: the exception to summarise.

    Returns:
        the line, without a line break.
    """
    message = str(exception)
    if _WORKER_TRACEBACK in message:
        worker_lines = message.split(_WORKER_TRACEBACK, 1)[1].splitlines()
        last_frame_line = max((i for i, line in enumerate(worker_lines) if line.startswith(" ")), default=-1)
        message = re.sub(r"^[\w.]+: ", "", " ".join(worker_lines[last_frame_line + 1 :]).strip())
    return f"{type(exception).__name__}: {' '.join(message.split())}"


def _close_progress_bars() -> None:
    """Close the tqdm progress bars a failed run left open (ignite's ``ProgressBar``), which would otherwise
    print their last state when the interpreter exits, after the summary line."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()


def report_uncaught(exc_type: type[BaseException], exception: BaseException, traceback: TracebackType | None) -> None:
    """``sys.excepthook``: print the traceback as Python does, then the bundle's error on the last line.

    Args:
        exc_type: the exception's class.
        exception: the exception that ended the process.
        traceback: its traceback.
    """
    _close_progress_bars()
    sys.__excepthook__(exc_type, exception, traceback)
    error = bundle_error(exception)
    if error is not None:
        print(f"\n{summary_line(error)}", file=sys.stderr, flush=True)


def install() -> None:
    """Make :func:`report_uncaught` the process's ``sys.excepthook`` (unless another hook than Python's own is set)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = report_uncaught
