# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""A ``python -m monai.bundle run`` command line naming an id or run id the configs lack is refused at once."""

from __future__ import annotations

import json
import os

import monai.bundle
import pytest

from scripts.command_line import CommandLineError, check_command_line, parse_run_command

RUNNER = os.path.join(os.path.dirname(monai.bundle.__file__), "__main__.py")
TEACHER = "['configs/train.json','configs/teacher.json']"


@pytest.fixture(autouse=True)
def _bundle_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # config paths as in the README


def test_command_line_is_read_as_monai_runner_reads_it():
    argv = [RUNNER, "run", "training", "--config_file", TEACHER, "--epochs=3", "--dataset-dir", "/d", "--resume"]
    run_arguments, overrides = parse_run_command(argv)
    assert run_arguments == {"run_id": "training", "config_file": ["configs/train.json", "configs/teacher.json"]}
    assert overrides == {"epochs": 3, "dataset_dir": "/d", "resume": True}


def test_args_file_gives_defaults_that_the_command_line_overrides(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": "configs/train.json", "epochs": 5, "learning_rate": 0.1}))
    run_arguments, overrides = parse_run_command([RUNNER, "run", "--args_file", str(args_file), "--epochs", "7"])
    assert run_arguments["config_file"] == "configs/train.json"
    assert overrides == {"epochs": 7, "learning_rate": 0.1}


def test_typo_in_an_override_is_refused_naming_the_closest_id():
    with pytest.raises(CommandLineError, match=r"unknown config id 'epoch' \(--epoch\).*did you mean --epochs\?"):
        check_command_line([RUNNER, "run", "training", "--config_file", TEACHER, "--epoch", "3"])


def test_known_ids_nested_ids_and_tracking_settings_are_accepted():
    check_command_line(
        [RUNNER, "run", "training", "--config_file", "['configs/train.json','configs/distill.json']",
         "--kd_weight", "0", "--network_def#channels", "[8,16,32,64,128]", "--validate::dataloader::num_workers", "2",
         "--tracking", "mlflow", "--tracking_uri", "file:///tmp/mlruns"]
    )  # fmt: skip


def test_unknown_run_id_is_refused_naming_the_configs_workflows():
    with pytest.raises(CommandLineError, match=r"run id 'inference' is not defined.*the workflows they define: run "):
        check_command_line([RUNNER, "run", "inference", "--config_file", "configs/inference.json"])
    evaluation = "['configs/train.json','configs/distill.json','configs/evaluate.json']"
    with pytest.raises(CommandLineError, match=r"workflows they define: evaluating, run, training "):
        check_command_line([RUNNER, "run", "evaluate", "--config_file", evaluation])


def test_other_processes_are_not_checked():
    check_command_line(["pytest", "run", "--config_file", "configs/train.json", "--epoch", "3"])
    check_command_line([RUNNER, "verify_metadata", "--meta_file", "configs/metadata.json", "--epoch", "3"])


@pytest.mark.parametrize("value", ["false", "true", "FALSE"])
def test_lower_case_boolean_of_a_boolean_id_is_refused_naming_the_spelling_that_works(value):
    with pytest.raises(CommandLineError, match=rf"--resume {value}: .*write --resume {value.capitalize()}"):
        check_command_line([RUNNER, "run", "training", "--config_file", "configs/train.json", "--resume", value])


def test_python_booleans_are_accepted():
    check_command_line([RUNNER, "run", "training", "--config_file", "configs/train.json", "--resume", "False"])


@pytest.mark.slow
def test_the_bundle_runs_its_configs_without_python_fire():
    """MONAI Label and the Model Zoo's unit tests run the configs from Python, where python-fire need not exist."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['fire'] = None; sys.modules['fire.parser'] = None\n"  # import fire -> ImportError
        "import importlib, pkgutil, scripts\n"
        "for module in pkgutil.iter_modules(scripts.__path__): importlib.import_module(f'scripts.{module.name}')\n"
        "from scripts.command_line import check_command_line\n"
        "check_command_line(sys.argv)\n"  # not a runner's command line, as in MONAI Label: nothing to parse
    )
    bundle_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=bundle_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
