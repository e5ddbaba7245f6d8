# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The bundle's unit test in the Model Zoo's format, for ``ci/unit_tests/`` of Project-MONAI/model-zoo.

Run there by the zoo's runner from the zoo root (``python ci/unit_tests/runner.py --b brats_kd_segmentation``), with
the bundle in ``models/brats_kd_segmentation``; ``.ci/zoo_ci`` does so on the packaged bundle. Every config runs
through ``ConfigWorkflow`` (initialize, ``check_properties``, run, finalize, with the zoo's ``check_workflow``) on a
tiny synthetic BraTS 2020 folder, in the order a user runs them: the student alone, the teacher, distillation,
evaluation and inference. Outputs go to a temporary folder, never into the bundle.
"""

import os
import shutil
import sys
import tempfile
import unittest

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow
from utils import check_workflow

BUNDLE = "models/brats_kd_segmentation"
SHAPE = (32, 32, 16)
TINY = {"epochs": 1, "patch_size": 32, "patches_per_case": 2, "batch_size": 2, "infer_batch_size": 16}
WORKFLOWS = [  # (workflow type, configs, override), in the order a user runs them
    ("train", ["train.json"], TINY),
    ("train", ["train.json", "teacher.json"], TINY),
    ("train", ["train.json", "distill.json"], TINY),
    ("train", ["train.json", "evaluate.json"], {}),
    ("infer", ["inference.json"], {}),
]


def write_case(folder: str, case_id: str, rng: np.random.Generator) -> None:
    """One BraTS 2020 case: four sequences with a zero background around an ellipsoid brain, and a tumour label."""
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    brain = sum(((g - (s - 1) / 2) / (0.45 * s)) ** 2 for g, s in zip(grid, SHAPE)) <= 1
    label = np.zeros(SHAPE, np.uint8)
    centre = tuple(slice(s // 2 - 3, s // 2 + 3) for s in SHAPE)
    label[centre] = 2  # edema
    label[tuple(slice(s // 2 - 1, s // 2 + 1) for s in SHAPE)] = 4  # enhancing
    os.makedirs(os.path.join(folder, case_id))
    for sequence in ("flair", "t1", "t1ce", "t2"):
        volume = np.where(brain, rng.normal(100.0, 10.0, SHAPE) + 50.0 * (label > 0), 0.0).astype(np.float32)
        path = os.path.join(folder, case_id, f"{case_id}_{sequence}.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    nib.save(nib.Nifti1Image(label, np.eye(4)), os.path.join(folder, case_id, f"{case_id}_seg.nii.gz"))


class TestBratsKdSegmentation(unittest.TestCase):
    def setUp(self):
        self.work_dir = tempfile.mkdtemp()
        self.dataset_dir = os.path.join(self.work_dir, "data")
        rng = np.random.default_rng(0)
        for index in range(1, 5):
            write_case(self.dataset_dir, f"BraTS20_Training_{index:03d}", rng)
        sys.path = [BUNDLE] + sys.path  # the configs import the bundle's scripts package

    def tearDown(self):
        shutil.rmtree(self.work_dir)

    def test_every_config_in_the_order_users_run_them(self):
        output_root = os.path.join(self.work_dir, "run")  # checkpoints, metrics and segmentations
        for workflow_type, configs, override in WORKFLOWS:
            workflow = ConfigWorkflow(
                workflow_type=workflow_type,
                config_file=[os.path.join(BUNDLE, "configs", name) for name in configs],
                logging_file=os.path.join(BUNDLE, "configs/logging.conf"),
                meta_file=os.path.join(BUNDLE, "configs/metadata.json"),
                bundle_root=output_root,
                dataset_dir=self.dataset_dir,
                **override,
            )
            check_workflow(workflow, check_properties=True)
        written = [name for _, _, names in os.walk(os.path.join(output_root, "eval")) for name in names]
        self.assertEqual(len([name for name in written if name.endswith("_seg.nii.gz")]), 4)
        self.assertTrue(os.path.isfile(os.path.join(output_root, "models", "model.pt")))


if __name__ == "__main__":
    unittest.main()
