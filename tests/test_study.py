# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The real-data study (tools.study): schedules, stage commands, resume decisions, time estimates, CSV reading."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch
from fire.parser import DefaultParseValue
from ignite.engine import Engine, Events

from tools.study import (
    MODELS,
    SCHEDULES,
    Schedule,
    StageAction,
    StudyError,
    StudyPaths,
    _shell_join,
    estimate_seconds_left,
    evaluation_command,
    read_evaluation_csv,
    read_training_state,
    run_study,
    trainer_epoch_seconds,
    training_action,
    training_command,
)
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TEACHER, ALONE, DISTILLED = MODELS
REGIONS = ("WT", "TC", "ET")


def option(command: list[str], name: str) -> str:
    """The value following ``--name`` in a command."""
    return command[command.index(f"--{name}") + 1]


def save_last_checkpoint(path: Path, epochs_done: int, max_epochs: int, epoch_length: int = 3) -> None:
    """A last checkpoint as the bundle's saver writes it: a real ignite trainer's state after ``epochs_done``."""
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epochs_done), lambda engine: engine.terminate())
    trainer.run(range(epoch_length), max_epochs=max_epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    best = {"best_metric": 0.5, "best_metric_epoch": epochs_done}
    torch.save({"model": {"w": torch.zeros(1)}, "trainer": trainer.state_dict(), "best_metric": best}, path)


def test_schedules_train_the_teacher_and_each_student_for_their_epochs():
    cpu, gpu = SCHEDULES["cpu"], SCHEDULES["gpu"]
    assert [cpu.epochs(model) for model in MODELS] == [20, 40, 40]
    assert [cpu.val_interval(model) for model in MODELS] == [10, 4, 4]
    assert [gpu.epochs(model) for model in MODELS] == [100, 100, 100]
    assert [gpu.val_interval(model) for model in MODELS] == [1, 1, 1]
    lead = Schedule("lead", teacher_epochs=20, student_epochs=40, teacher_val_interval=10, student_val_interval=4)
    assert [(lead.epochs(m), lead.val_interval(m)) for m in MODELS] == [(20, 10), (40, 4), (40, 4)]


@pytest.mark.parametrize(
    "epochs, val_interval, message", [(0, 1, "teacher_epochs must be at least 1"), (2, 3, "the teacher would never")]
)
def test_a_schedule_that_would_never_train_or_validate_is_refused(epochs, val_interval, message):
    with pytest.raises(ValueError, match=f"schedule 'bad': {message}"):
        Schedule(
            "bad", teacher_epochs=epochs, student_epochs=10, teacher_val_interval=val_interval, student_val_interval=1
        )


def test_training_commands_are_the_bundle_runs_of_the_study_layout():
    paths = StudyPaths("runs/study_cpu")
    data = ("../shared/data/brats_real", "configs/datalists/brats_real_split.json")
    teacher = training_command(TEACHER, SCHEDULES["cpu"], *data, paths)
    assert teacher[:5] == [sys.executable, "-m", "monai.bundle", "run", "training"]
    assert option(teacher, "config_file") == "['configs/train.json','configs/teacher.json']"
    expected = {"dataset_dir": data[0], "datalist": data[1], "epochs": "20", "val_interval": "10"}
    expected |= {
        "ckpt_dir": "runs/study_cpu/models",
        "ckpt_name": "teacher.pt",
        "log_dir": "runs/study_cpu/logs/teacher",
    }
    assert {name: option(teacher, name) for name in expected} == expected
    assert "--resume" not in teacher and "--teacher_ckpt" not in teacher

    alone = training_command(ALONE, SCHEDULES["cpu"], *data, paths, resume=True)
    assert option(alone, "config_file") == "configs/train.json"
    assert (option(alone, "epochs"), option(alone, "ckpt_name")) == ("40", "student_alone.pt")
    assert DefaultParseValue(option(alone, "resume")) is True  # a real bool, as fire hands it to the bundle

    schedule = Schedule("s", teacher_epochs=20, student_epochs=40, teacher_val_interval=10, student_val_interval=4)
    assert option(training_command(TEACHER, schedule, *data, paths), "val_interval") == "10"
    distilled = training_command(DISTILLED, SCHEDULES["gpu"], *data, paths, overrides={"patch_size": 64})
    assert option(distilled, "teacher_ckpt") == "runs/study_cpu/models/teacher.pt"
    assert option(distilled, "soft_label_dir") == "runs/study_cpu/cache/soft_labels"
    assert (option(distilled, "epochs"), option(distilled, "val_interval"), option(distilled, "patch_size")) == (
        "100",
        "1",
        "64",
    )


@pytest.mark.parametrize("model", MODELS, ids=[m.key for m in MODELS])
def test_config_file_arguments_reach_the_bundle_as_the_model_configs_in_order(model):
    paths = StudyPaths("out")
    for command, configs in (
        (training_command(model, SCHEDULES["cpu"], "data", None, paths), model.training_configs),
        (evaluation_command(model, "data", None, paths), model.evaluation_configs),
    ):
        parsed = DefaultParseValue(option(command, "config_file"))
        assert (parsed if isinstance(parsed, list) else [parsed]) == list(configs)
        assert all((BUNDLE_ROOT / config).is_file() for config in configs)
        assert "--datalist" not in command  # None: the bundle's own seeded split


def test_evaluation_commands_score_each_checkpoint_on_the_test_split_into_its_folder():
    paths = StudyPaths("out")
    teacher = evaluation_command(TEACHER, "data", "split.json", paths)
    assert teacher[4] == "evaluating"
    assert option(teacher, "config_file") == "['configs/train.json','configs/teacher.json','configs/evaluate.json']"
    distilled = evaluation_command(DISTILLED, "data", "split.json", paths)
    assert option(distilled, "config_file") == "['configs/train.json','configs/evaluate.json']"
    assert (option(distilled, "ckpt_dir"), option(distilled, "ckpt_name")) == ("out/models", "student_distilled.pt")
    assert (option(distilled, "output_dir"), option(distilled, "eval_split")) == ("out/eval/student_distilled", "test")
    assert paths.eval_csv(DISTILLED) == "out/eval/student_distilled/metrics_test.csv"


def test_a_training_without_last_checkpoint_starts(tmp_path):
    assert training_action(TEACHER, SCHEDULES["cpu"], StudyPaths(str(tmp_path))) == (StageAction.START, 0)


def test_a_partly_done_training_resumes_after_its_last_epoch(tmp_path):
    paths = StudyPaths(str(tmp_path))
    save_last_checkpoint(Path(paths.last_ckpt(ALONE)), epochs_done=12, max_epochs=40)
    assert training_action(ALONE, SCHEDULES["cpu"], paths) == (StageAction.RESUME, 12)
    state = read_training_state(paths.last_ckpt(ALONE))
    assert (state.epochs_done, state.max_epochs, state.best_metric, state.best_epoch) == (12, 40, 0.5, 12)


def test_a_finished_training_is_skipped(tmp_path):
    paths = StudyPaths(str(tmp_path))
    save_last_checkpoint(Path(paths.last_ckpt(TEACHER)), epochs_done=20, max_epochs=20)
    torch.save({}, paths.best_ckpt(TEACHER))
    assert training_action(TEACHER, SCHEDULES["cpu"], paths) == (StageAction.SKIP, 20)


def test_a_finished_training_without_its_best_checkpoint_stops_naming_it(tmp_path):
    paths = StudyPaths(str(tmp_path))
    save_last_checkpoint(Path(paths.last_ckpt(TEACHER)), epochs_done=20, max_epochs=20)
    with pytest.raises(StudyError, match="teacher.pt is missing"):
        training_action(TEACHER, SCHEDULES["cpu"], paths)


def test_a_training_of_another_schedule_in_the_output_folder_stops_the_study(tmp_path):
    paths = StudyPaths(str(tmp_path))
    save_last_checkpoint(Path(paths.last_ckpt(TEACHER)), epochs_done=5, max_epochs=30)
    with pytest.raises(StudyError, match="training of 30 epochs but schedule 'gpu' trains the teacher for 100"):
        training_action(TEACHER, SCHEDULES["gpu"], paths)


def test_a_last_checkpoint_without_trainer_state_is_refused_naming_the_file(tmp_path):
    paths = StudyPaths(str(tmp_path))
    os.makedirs(paths.models_dir)
    torch.save({"model": {"w": torch.zeros(1)}}, paths.last_ckpt(ALONE))
    with pytest.raises(StudyError, match=f"{paths.last_ckpt(ALONE)} holds no trainer state"):
        training_action(ALONE, SCHEDULES["cpu"], paths)


def test_epoch_times_are_read_from_the_trainer_lines_of_a_log():
    log = (
        "2026-12-02 13:48:47,587 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. "
        "Time taken: 00:01:35.311\n"
        "2026-12-02 13:52:53,224 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[2] Complete. "
        "Time taken: 00:02:33.471\r"
        "Epoch [2/30]: [6/6] 100%\r"
        "2026-12-02 13:52:53,537 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[2] Complete. "
        "Time taken: 01:04:05.950\n"
    )
    assert trainer_epoch_seconds(log) == pytest.approx({1: 95.311, 2: 3845.95})


def test_time_left_counts_each_training_from_its_own_or_its_architecture_epoch_times():
    left = {"teacher": 2, "student_alone": 0, "student_distilled": 10}
    assert estimate_seconds_left(left, {"teacher": [100.0, 200.0], "student_alone": [30.0]}) == 2 * 150 + 10 * 30
    assert estimate_seconds_left(left, {"teacher": [100.0], "student_distilled": [40.0]}) == 2 * 100 + 10 * 40
    assert estimate_seconds_left(left, {"student_alone": [30.0]}) is None  # the teacher is not timed yet


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n")
    return path


CURRENT_HEADER = ["case_id", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"]


def test_the_current_evaluation_csv_gives_the_legacy_metrics_from_its_mean_row(tmp_path):
    rows = [["case_b", "0.8", "0.7", "nan", "5", "6", ""], ["mean", "0.85", "0.75", "0.6", "4.5", "5.5", "7"]]
    rows.insert(0, ["case_a", "0.9", "0.8", "0.6", "4", "5", "7"])
    table = read_evaluation_csv(str(write_csv(tmp_path / "m.csv", CURRENT_HEADER, rows)), REGIONS)
    assert table.means == {
        "legacy_dice": {"WT": 0.85, "TC": 0.75, "ET": 0.6},
        "legacy_hd95": {"WT": 4.5, "TC": 5.5, "ET": 7.0},
    }
    assert table.cases["case_b"]["legacy_dice"]["ET"] is None  # NaN: undefined for the case
    assert table.cases["case_b"]["legacy_hd95"]["ET"] is None  # empty cell: the same
    assert sorted(table.cases) == ["case_a", "case_b"]


def test_lesion_wise_columns_are_read_wherever_they_are_in_the_header(tmp_path):
    header = (
        ["case_id"] + [f"lesion_{m}_{r}" for m in ("dice", "hd95") for r in ("et", "tc", "wt")] + CURRENT_HEADER[1:]
    )
    values = ["0.3", "0.2", "0.1", "30", "20", "10", "0.9", "0.8", "0.7", "1", "2", "3"]
    table = read_evaluation_csv(str(write_csv(tmp_path / "m.csv", header, [["mean", *values]])), REGIONS)
    assert table.means["lesion_dice"] == {"WT": 0.1, "TC": 0.2, "ET": 0.3}
    assert table.means["lesion_hd95"] == {"WT": 10.0, "TC": 20.0, "ET": 30.0}
    assert table.means["legacy_dice"] == {"WT": 0.9, "TC": 0.8, "ET": 0.7}


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (["case_id", "dice_wt"], [["mean", "0.9"]], "lacks column"),
        (CURRENT_HEADER + ["lesion_dice_wt"], [["mean"] + ["1"] * 7], "lesion_dice_tc, lesion_dice_et of lesion_dice"),
        (CURRENT_HEADER, [["case_a"] + ["1"] * 6], "no 'mean' row"),
        (CURRENT_HEADER, [["mean", "x"] + ["1"] * 5], "column 'dice_wt' holds 'x'"),
        (["case"] + CURRENT_HEADER[1:], [["mean"] + ["1"] * 6], "no 'case_id' column"),
    ],
    ids=["missing-required", "some-regions-only", "no-mean-row", "not-a-number", "no-case-id"],
)
def test_an_evaluation_csv_without_what_the_study_reads_is_refused_naming_it(tmp_path, header, rows, message):
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(StudyError, match=message) as error:
        read_evaluation_csv(str(path), REGIONS)
    assert str(path) in str(error.value)


@pytest.mark.slow
def test_a_failing_stage_stops_the_study_naming_the_stage_and_its_log(tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    (tmp_path / "data").mkdir()  # a dataset folder without cases: the teacher's training fails at once
    with pytest.raises(StudyError, match=r"stage 1/7 teacher failed \(exit code [1-9]\d*\); its log is .*teacher\.log"):
        run_study(str(tmp_path / "data"), str(tmp_path / "out"), SCHEDULES["cpu"])
    assert not (tmp_path / "out" / "study.md").exists()


@pytest.mark.slow
def test_the_study_trains_evaluates_and_reports_then_reruns_as_a_no_op(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(BUNDLE_ROOT)
    case_ids = write_synthetic_dataset(tmp_path / "data", num_cases=3, shape=(32, 32, 16))
    datalist = tmp_path / "split.json"
    datalist.write_text(json.dumps({"training": case_ids[:1], "validation": case_ids[1:2], "test": case_ids[2:]}))
    schedule = Schedule("tiny", teacher_epochs=1, student_epochs=1, teacher_val_interval=1, student_val_interval=1)
    tiny = {"patch_size": 32, "patches_per_case": 2, "batch_size": 1, "infer_batch_size": 16}
    tiny["teacher_def#channels"] = [8, 16, 32, 64, 128]
    args = (str(tmp_path / "data"), str(tmp_path / "out"), schedule, str(datalist), tiny)

    results = run_study(*args, figure_cases=1, latency_repeats=1)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"study.md", "study.json", "study.png", "models", "eval", "cache"}
    written = json.loads((out / "study.json").read_text())
    assert written["test_cases"] == case_ids[2:] and written["figure_cases"] == case_ids[2:]
    for model in MODELS:
        entry = written["models"][model.key]
        assert set(entry["metrics"]["legacy_dice"]) == set(REGIONS)
        assert entry["training"]["epochs"] == 1 and entry["training"]["wall_time_s"] > 0
        assert entry["parameters"] > 0 and entry["gflops_per_slice"] > 0 and entry["latency_s"] > 0
        assert (out / f"{model.key}.log").is_file() and (out / f"evaluate_{model.key}.log").is_file()
    assert results["models"] == written["models"]
    table = (out / "study.md").read_text()
    assert "Schedule `tiny`" in table and "| Student distilled (KD) |" in table and "Dice WT" in table

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*.pt")} | {
        p: p.stat().st_mtime_ns for p in (out / "eval").rglob("*.csv")
    }
    capsys.readouterr()
    run_study(*args, figure_cases=1, latency_repeats=1)
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert printed.count("skipped") == 3 and printed.count("reused") == 3
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing trained or evaluated again


def test_recorded_stage_commands_are_shell_lines_that_give_back_the_same_arguments():
    command = training_command(
        DISTILLED, SCHEDULES["cpu"], "data dir", None, StudyPaths("out"), overrides={"x": "$a'b"}
    )
    line = _shell_join(command)
    assert line.startswith("python -m monai.bundle run training --config_file \"['configs/train.json',")
    assert shlex.split(line) == ["python", *command[1:]]
