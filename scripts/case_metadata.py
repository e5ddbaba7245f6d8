# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The metadata keys ``LoadBraTSCased`` writes on each case's image and the transforms and handlers after it read.

They travel in the image's ``MetaTensor.meta`` (and so in batches, ``Invertd`` and ``SaveImage``'s metadata).
"""

from __future__ import annotations

__all__ = ["BRATS_LAYOUT", "CASE_ID", "EMPTY_BRAIN", "SOURCE_FILES"]

CASE_ID = "case_id"  # the case's id: names outputs, soft-label cache files and messages
BRATS_LAYOUT = "brats_layout"  # the release layout the case was read in (scripts.brats_data.LAYOUTS, multichannel)
EMPTY_BRAIN = "empty_brain"  # True when every voxel of every sequence is 0: segmented as background
SOURCE_FILES = "source_files"  # the case's image files, comma-separated, for messages
