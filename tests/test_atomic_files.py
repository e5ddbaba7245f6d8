# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.atomic_files import atomic_path, remove_stale_temporary_files, write_text_atomic

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def test_successful_write_replaces_the_file_with_usual_permissions(tmp_path):
    target = tmp_path / "report.csv"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_temporary_file_keeps_the_suffix_writers_choose_formats_by(tmp_path):
    with atomic_path(tmp_path / "case_seg.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "wb").close()
    assert (tmp_path / "case_seg.nii.gz").exists()


def test_temporary_file_left_by_a_killed_write_is_removed_by_the_next_run(tmp_path):
    killed_mid_write = (
        "import os, signal\n"
        "from scripts.atomic_files import atomic_path\n"
        f"with atomic_path({str(tmp_path / 'model_last.pt')!r}, suffix='.partial') as tmp:\n"
        "    open(tmp, 'wb').write(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", killed_mid_write], cwd=BUNDLE_ROOT)
    assert result.returncode == -signal.SIGKILL
    [leftover] = tmp_path.iterdir()
    assert leftover.name.startswith(".model_last.pt.") and leftover.name.endswith(".partial")
    assert remove_stale_temporary_files(tmp_path) == [str(leftover)]
    assert list(tmp_path.iterdir()) == []


def test_temporary_file_of_a_write_in_progress_is_kept(tmp_path):
    with atomic_path(tmp_path / "case_seg.nii.gz", suffix=".nii.gz") as tmp:
        open(tmp, "wb").close()
        assert remove_stale_temporary_files(tmp_path) == []
        assert os.path.exists(tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["case_seg.nii.gz"]
