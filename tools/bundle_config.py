# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The bundle's configs as the tools read them: which files make each workflow, merged as ``monai.bundle run`` does."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["DISTILL_CONFIGS", "INFERENCE_CONFIGS", "TEACHER_CONFIGS", "bundle_configs", "load_config"]

# config files of each workflow, relative to the bundle root, merged in this order
TEACHER_CONFIGS = ("configs/train.json", "configs/teacher.json")
DISTILL_CONFIGS = ("configs/train.json", "configs/distill.json")
INFERENCE_CONFIGS = ("configs/inference.json",)


def bundle_configs(bundle_root: str, names: Sequence[str]) -> list[str]:
    """Absolute paths of config files given relative to the bundle root.

    Args:
        bundle_root: the bundle root.
        names: config files relative to it, e.g. ``DISTILL_CONFIGS``.

    Returns:
        the paths, in the order given.
    """
    return [os.path.join(os.path.abspath(bundle_root), name) for name in names]


def load_config(
    config_file: str | Sequence[str], bundle_root: str, dataset_dir: str, overrides: dict[str, Any] | None = None
) -> ConfigParser:
    """Read a config, or a list of configs merged in order, with ``bundle_root``, ``dataset_dir`` and further ids set.

    Args:
        config_file: one config, or configs merged in order as ``monai.bundle run`` merges them (e.g.
            ``configs/train.json`` then ``configs/distill.json``); relative paths are relative to the working directory.
        bundle_root: the bundle root.
        dataset_dir: the dataset folder.
        overrides: further config ids to set, e.g. ``{"teacher_def#channels": [8, 16, 32, 64, 128]}``.

    Returns:
        the parser, not yet parsed.
    """
    parser = ConfigParser()
    files = [config_file] if isinstance(config_file, str) else list(config_file)
    parser.read_config([os.path.abspath(f) for f in files])
    parser["bundle_root"] = os.path.abspath(bundle_root)
    parser["dataset_dir"] = os.path.abspath(dataset_dir)
    for config_id, value in (overrides or {}).items():
        parser[config_id] = value
    return parser
