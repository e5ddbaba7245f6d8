# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The demo writes its comparison into a folder of its own, never over the tracked docs/results."""

from __future__ import annotations

from pathlib import Path

from tools import demo

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_its_comparison_into_an_ignored_folder_and_says_where(monkeypatch, capsys):
    commands: list[list[str]] = []
    monkeypatch.setattr(demo, "_run", commands.append)  # the commands, not their work
    demo.main()
    [compare] = [c for c in commands if "tools.compare_models" in c]
    results_dir = compare[compare.index("--output_dir") + 1]
    assert results_dir == "runs/demo/results" and not results_dir.startswith("docs")
    assert "runs/" in (BUNDLE_ROOT / ".gitignore").read_text().splitlines()  # git never sees a demo's results
    assert str(BUNDLE_ROOT / results_dir / "comparison.md") in capsys.readouterr().out
