# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Custom components of the BraTS knowledge-distillation bundle, reached from the configs as ``scripts.<module>``.

Submodules are imported on first attribute access, so ``"$import scripts"`` in a config is enough to use
``scripts.brats_data.build_splits``, and importing one module loads only what that module needs. Importing the
package also installs ``scripts.error_summary``'s exception hook, so that the last line of a run that the bundle
refuses is the bundle's own message.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from scripts import error_summary

error_summary.install()


def __getattr__(name: str) -> ModuleType:
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from e
