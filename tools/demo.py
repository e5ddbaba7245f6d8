# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""End-to-end demo on synthetic BraTS-like data: teacher, distilled student, student alone, comparison.

Every step is the command a user would type, printed before it runs, so the demo doubles as a walk-through::

    python -m tools.demo                 # about 4 minutes on 2 CPU cores
    python -m tools.demo --epochs_scale 4  # longer training, better figures
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
# knobs that make the real configs fit a few CPU minutes: small patches, one case per batch, frequent validation
DEMO_KNOBS = ["--patch_size", "64", "--patches_per_case", "16", "--batch_size", "1"]
# the teacher: configs/train.json (which trains the deployed student) with the teacher's override merged on it
TEACHER_CONFIGS = "['configs/train.json','configs/teacher.json']"
TEACHER_EVALUATE_CONFIGS = "['configs/train.json','configs/teacher.json','configs/evaluate.json']"
# the distillation: configs/distill.json adds the teacher, soft labels and loss to configs/train.json
DISTILL_CONFIGS = "['configs/train.json','configs/distill.json']"
# the comparison's default folder: not the tracked docs/results, which holds the published demo run
DEMO_RESULTS_DIR = "runs/demo/results"


def _shell_text(command: list[str]) -> str:
    """The command as a user would type it (config lists in double quotes, as in the README)."""
    return " ".join(f'"{arg}"' if "'" in arg else shlex.quote(arg) for arg in command)


def _run(command: list[str]) -> None:
    """Print and run one command in the bundle root, stopping the demo if it fails."""
    print(f"\n$ {_shell_text(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=BUNDLE_ROOT)
    if result.returncode != 0:
        sys.exit(f"demo step failed with exit code {result.returncode}: {_shell_text(command)}")
    print(f"[{time.perf_counter() - start:.0f} s]", flush=True)


def main(
    dataset_dir: str = "data/synthetic",
    num_cases: int = 12,
    shape: tuple[int, int, int] = (96, 96, 64),
    teacher_epochs: int = 10,
    student_epochs: int = 30,
    epochs_scale: float = 1.0,
    results_dir: str = DEMO_RESULTS_DIR,
) -> None:
    """Generate synthetic data, train the teacher, distil the student, train the student alone, compare them.

    Args:
        dataset_dir: folder of the synthetic cases (BraTS 2020 layout), relative to the bundle root.
        num_cases: number of synthetic cases (patients): 60% train, 20% validation, 20% test.
        shape: shape of each synthetic volume.
        teacher_epochs: teacher training epochs.
        student_epochs: epochs of the distilled student and of the student trained alone.
        epochs_scale: multiplies both epoch counts.
        results_dir: where the three-way comparison (table, figure, JSON, CSV) is written, relative to the bundle
            root: by default a folder of its own under the git-ignored ``runs/``, so that a demo never replaces
            the published demo figures of ``docs/results`` (pass ``--results_dir docs/results`` to renew them).
    """
    start = time.perf_counter()
    python = sys.executable
    teacher_epochs, student_epochs = (max(1, round(e * epochs_scale)) for e in (teacher_epochs, student_epochs))
    shape_arg = ",".join(str(int(s)) for s in shape)
    data = ["--dataset_dir", dataset_dir]
    bundle_run = [python, "-m", "monai.bundle", "run"]
    _run(
        [
            python,
            "-m",
            "tools.synthetic_brats",
            "--output_dir",
            dataset_dir,
            "--num_cases",
            str(num_cases),
            "--shape",
            shape_arg,
        ]
    )
    teacher_val = str(max(1, teacher_epochs // 2))
    student_val = str(max(1, student_epochs // 5))
    _run(bundle_run + ["training", "--config_file", TEACHER_CONFIGS, *data, *DEMO_KNOBS,
                       "--epochs", str(teacher_epochs), "--val_interval", teacher_val])  # fmt: skip
    _run(bundle_run + ["evaluating", "--config_file", TEACHER_EVALUATE_CONFIGS, *data,
                       "--output_dir", "eval/teacher"])  # fmt: skip
    _run(bundle_run + ["training", "--config_file", DISTILL_CONFIGS, *data, *DEMO_KNOBS,
                       "--epochs", str(student_epochs), "--val_interval", student_val])  # fmt: skip
    _run(bundle_run + ["training", "--config_file", "configs/train.json", *data, *DEMO_KNOBS,
                       "--epochs", str(student_epochs), "--val_interval", student_val,
                       "--ckpt_name", "student_alone.pt", "--log_dir", "runs/student_alone"])  # fmt: skip
    _run([python, "-m", "tools.compare_models", *data, "--output_dir", results_dir])
    print(
        f"\nDemo finished in {time.perf_counter() - start:.0f} s.\n"
        f"  teacher checkpoint:          {BUNDLE_ROOT / 'models' / 'teacher.pt'}\n"
        f"  distilled student (deployed): {BUNDLE_ROOT / 'models' / 'model.pt'}\n"
        f"  student trained alone:       {BUNDLE_ROOT / 'models' / 'student_alone.pt'}\n"
        f"  teacher test metrics:        {BUNDLE_ROOT / 'eval' / 'teacher' / 'metrics_test.csv'}\n"
        f"  three-way comparison:        {BUNDLE_ROOT / results_dir / 'comparison.md'} (+ .png, .json)\n"
        f"  TensorBoard logs:            tensorboard --logdir {BUNDLE_ROOT / 'runs'}"
    )


if __name__ == "__main__":
    fire.Fire(main)
