# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Which label values a run reads and writes: each study's release values, or the one set ``channel_def`` names.

The configs' top-level ``label_convention`` is one of ``LABEL_CONVENTIONS``:

- ``release``: label files hold the values of the study's release (BraTS 2020/2021 1/2/4, BraTS 2023+ 1/2/3, MSD
  Task01 with 1 edema and 2 non-enhancing core) and segmentations are written back in them. What the command line
  reads and writes.
- ``channel_def``: every label, read or written, holds the values that ``network_data_format.outputs.pred.channel_def``
  of ``configs/metadata.json`` names (0 background, 1 necrotic and non-enhancing core, 2 edema, 3 enhancing: the
  internal classes), whatever the study's release. What MONAI Label needs: it shows a returned label with the
  names of ``channel_def`` and hands training the labels annotators painted with them (``labels/final/``).

``default_label_convention`` tells which applies. ``monailabel start_server`` exports its settings as environment
variables, ``MONAI_LABEL_APP_DIR`` among them (monailabel 0.8.5 ``main.py``), before it loads the app; its bundle
inference (``BundleInferTask``) and training (``BundleTrainTask``, in-process or through ``torchrun``) run in that
environment, so the default is ``channel_def`` there and ``release`` everywhere else. ``--label_convention`` sets it
explicitly.
"""

from __future__ import annotations

import os

__all__ = [
    "LABEL_CONVENTIONS",
    "MONAI_LABEL_ENVIRONMENT_VARIABLE",
    "check_label_convention",
    "default_label_convention",
    "written_convention",
]

LABEL_CONVENTIONS = ("release", "channel_def")
MONAI_LABEL_ENVIRONMENT_VARIABLE = "MONAI_LABEL_APP_DIR"


def default_label_convention() -> str:
    """``channel_def`` inside a MONAI Label server (its settings are in the environment), ``release`` otherwise.

    Returns:
        one of ``LABEL_CONVENTIONS``.
    """
    return "channel_def" if os.environ.get(MONAI_LABEL_ENVIRONMENT_VARIABLE) else "release"


def check_label_convention(label_convention: str) -> str:
    """Check a ``label_convention`` value.

    Args:
        label_convention: the value to check.

    Returns:
        ``label_convention``.

    Raises:
        ValueError: if it is not one of ``LABEL_CONVENTIONS``.
    """
    if label_convention not in LABEL_CONVENTIONS:
        raise ValueError(f"label_convention must be one of {LABEL_CONVENTIONS}, got {label_convention!r}.")
    return label_convention


def written_convention(label_convention: str, output_convention: str | None = None) -> str | None:
    """The label values segmentations are written in (``scripts.brats_output.ToReleaseLabelsd``'s ``convention``).

    Args:
        label_convention: one of ``LABEL_CONVENTIONS``.
        output_convention: an explicit output convention (``scripts.brats_output.OUTPUT_CONVENTIONS``), or None.

    Returns:
        ``output_convention`` when given; otherwise ``internal`` (the values ``channel_def`` names) for
        ``channel_def`` and None (each study's release) for ``release``.

    Raises:
        ValueError: if ``label_convention`` is not one of ``LABEL_CONVENTIONS``.
    """
    check_label_convention(label_convention)
    if output_convention is not None:
        return output_convention
    return "internal" if label_convention == "channel_def" else None
