# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The real-data study (tools.study): its models, schedules, stage commands, resume decisions, time estimates, CSV
reading, Dice gains and command line."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import fire
import pytest
import torch
from fire.parser import DefaultParseValue
from ignite.engine import Engine, Events

import tools.study
from tools.study import (
    MODELS,
    SCHEDULES,
    Schedule,
    StageAction,
    StudyError,
    StudyPaths,
    _gain_cell,
    _shell_join,
    datalist_unlabelled_cases,
    dice_gain,
    estimate_seconds_left,
    evaluation_command,
    read_evaluation_csv,
    read_training_state,
    run_study,
    select_models,
    study_models,
    trainer_epoch_seconds,
    training_action,
    training_command,
)
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
BY_KEY = {model.key: model for model in MODELS}
TEACHER, ALONE, KD = BY_KEY["teacher"], BY_KEY["student_alone"], BY_KEY["student_kd"]
KD_UNLABELLED, ALONE_LONG = BY_KEY["student_kd_unlabelled"], BY_KEY["student_alone_long"]
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
    assert [model.key for model in MODELS] == [
        "teacher",
        "student_alone",
        "student_kd",
        "student_kd_pairwise",
        "student_kd_unlabelled",
        "student_alone_long",
    ]
    assert [cpu.epochs(model) for model in MODELS] == [20, 40, 40, 40, 40, 120]  # the long one: 40 x (1 + 2.0)
    assert [cpu.val_interval(model) for model in MODELS] == [10, 4, 4, 4, 4, 12]
    assert [gpu.epochs(model) for model in MODELS] == [100, 100, 100, 100, 100, 300]
    assert [gpu.val_interval(model) for model in MODELS] == [1, 1, 1, 1, 1, 3]
    lead = Schedule("lead", teacher_epochs=20, student_epochs=40, teacher_val_interval=10, student_val_interval=4)
    assert [(lead.epochs(m), lead.val_interval(m)) for m in MODELS[:3]] == [(20, 10), (40, 4), (40, 4)]


def test_student_alone_long_trains_as_many_steps_as_the_unlabelled_student():
    models = {model.key: model for model in study_models(unlabelled_ratio=0.5)}
    long, unlabelled = models["student_alone_long"], models["student_kd_unlabelled"]
    schedule = Schedule("s", teacher_epochs=4, student_epochs=3, teacher_val_interval=2, student_val_interval=1)
    # 3 epochs over the labelled cases x 1.5 cases per labelled case = 4.5 epochs' steps: 5 epochs (rounded half up)
    assert (schedule.epochs(long), schedule.val_interval(long)) == (5, 2)
    assert (schedule.epochs(unlabelled), schedule.val_interval(unlabelled)) == (3, 1)
    assert unlabelled.epoch_length_factor == 1.5 and long.epoch_length_factor == 1.0
    command = training_command(long, schedule, "data", None, StudyPaths("out"))
    assert (option(command, "epochs"), option(command, "val_interval")) == ("5", "2")
    assert option(command, "config_file") == "configs/train.json"  # no teacher: the student alone, longer
    assert option(command, "ckpt_name") == "student_alone_long.pt" and "--teacher_ckpt" not in command
    one_epoch = Schedule("one", teacher_epochs=1, student_epochs=1, teacher_val_interval=1, student_val_interval=1)
    assert (one_epoch.epochs(ALONE_LONG), one_epoch.val_interval(ALONE_LONG)) == (3, 3)


def test_the_unlabelled_models_are_in_the_study_only_with_an_unlabelled_list(tmp_path):
    datalists = {
        "none": {"training": ["a"], "test": ["b"]},
        "empty": {"training": ["a"], "test": ["b"], "unlabelled": []},
        "listed": {"training": ["a"], "test": ["b"], "unlabelled": ["c", "d"]},
    }
    for name, content in datalists.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    four = ["teacher", "student_alone", "student_kd", "student_kd_pairwise"]
    for datalist, cases, keys in (
        (None, [], four),
        (str(tmp_path / "none.json"), [], four),
        (str(tmp_path / "empty.json"), [], four),
        (str(tmp_path / "listed.json"), ["c", "d"], list(BY_KEY)),
        (str(BUNDLE_ROOT / "configs/datalists/brats_real_few_labels.json"), 8, list(BY_KEY)),
    ):
        unlabelled = datalist_unlabelled_cases(datalist)
        assert (len(unlabelled) if isinstance(cases, int) else unlabelled) == cases
        assert [model.key for model in select_models(MODELS, None, bool(unlabelled))] == keys
    with pytest.raises(StudyError, match="student_kd_unlabelled need"):
        select_models(MODELS, "teacher,student_kd_unlabelled", unlabelled=False)
    with pytest.raises(StudyError, match="datalist .*missing.json not found"):
        datalist_unlabelled_cases(str(tmp_path / "missing.json"))


def test_asked_models_keep_the_training_order_and_bring_their_teacher():
    assert [m.key for m in select_models(MODELS, "student_kd_pairwise,student_alone")] == [
        "teacher",
        "student_alone",
        "student_kd_pairwise",
    ]
    assert [m.key for m in select_models(MODELS, ("student_alone",))] == ["student_alone"]


@pytest.mark.parametrize("keys", ["teacher,student_distilled", "", ["student_kd", "Teacher"]])
def test_an_unknown_model_key_is_refused_naming_the_valid_keys(keys):
    with pytest.raises(StudyError, match="unknown model") as error:
        select_models(MODELS, keys)
    assert all(model.key in str(error.value) for model in MODELS)


def test_model_overrides_reach_the_command_line_as_the_bundle_ids():
    models = {model.key: model for model in study_models(pairwise_weight=0.25, unlabelled_ratio=1.5)}
    paths, schedule = StudyPaths("out"), SCHEDULES["cpu"]
    expected = {
        "student_kd": (0.0, 0.0),
        "student_kd_pairwise": (0.0, 0.25),
        "student_kd_unlabelled": (1.5, 0.0),
    }
    for key, (ratio, weight) in expected.items():
        command = training_command(models[key], schedule, "data", None, paths, overrides={"temperature": 4.0})
        assert option(command, "config_file") == "['configs/train.json','configs/distill.json']"
        assert DefaultParseValue(option(command, "unlabelled_ratio")) == ratio
        assert DefaultParseValue(option(command, "pairwise_weight")) == weight
        assert option(command, "teacher_ckpt") == "out/models/teacher.pt"
        assert option(command, "soft_label_dir") == "out/cache/soft_labels"  # one cache for every distilled student
        assert option(command, "temperature") == "4.0"
        evaluation = evaluation_command(models[key], "data", None, paths)
        assert "--pairwise_weight" not in evaluation and "--unlabelled_ratio" not in evaluation
    for key in ("teacher", "student_alone", "student_alone_long"):
        command = training_command(models[key], schedule, "data", None, paths)
        assert "--pairwise_weight" not in command and "--unlabelled_ratio" not in command
    with pytest.raises(StudyError, match="pairwise_weight must be positive"):
        study_models(pairwise_weight=0.0)


def test_overrides_cannot_set_what_a_model_of_the_study_sets(tmp_path):
    with pytest.raises(ValueError, match=r"cannot set \['pairwise_weight'\]"):
        run_study(str(tmp_path), str(tmp_path / "out"), SCHEDULES["cpu"], overrides={"pairwise_weight": 2.0})


def test_teacher_and_student_epochs_override_the_schedule_and_shorten_its_validation_interval():
    cpu = SCHEDULES["cpu"]
    assert cpu.with_epochs() == cpu
    short = cpu.with_epochs(teacher_epochs=5)
    assert (short.epochs(TEACHER), short.val_interval(TEACHER)) == (5, 5)  # every 10 epochs would never validate
    assert (short.epochs(ALONE), short.val_interval(ALONE)) == (40, 4)
    longer = cpu.with_epochs(teacher_epochs=30, student_epochs=2)
    assert (longer.epochs(TEACHER), longer.val_interval(TEACHER)) == (30, 10)
    assert (longer.epochs(KD), longer.val_interval(KD), longer.epochs(ALONE_LONG)) == (2, 2, 6)
    assert longer.name == "cpu"
    with pytest.raises(ValueError, match="teacher_epochs must be at least 1"):
        cpu.with_epochs(teacher_epochs=0)


def test_the_command_line_hands_the_study_its_epochs_weights_and_models(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tools.study, "run_study", lambda *args: calls.append(args))
    datalist = tmp_path / "few.json"
    datalist.write_text(json.dumps({"training": ["a"], "unlabelled": ["b"]}))
    base = ["--dataset_dir", "data", "--output_dir", "out", "--datalist", str(datalist)]
    fire.Fire(tools.study.main, command=[*base, "--teacher_epochs", "5", "--models", "student_kd_unlabelled"])
    fire.Fire(
        tools.study.main, command=[*base, "--schedule", "gpu", "--student_epochs", "3", "--unlabelled_ratio", "1"]
    )
    (first, second) = calls
    assert (first[2].teacher_epochs, first[2].teacher_val_interval, first[2].student_epochs) == (5, 5, 40)
    assert [model.key for model in first[8]] == ["teacher", "student_kd_unlabelled"]
    assert dict(first[8][1].overrides) == {"unlabelled_ratio": 2.0, "pairwise_weight": 0.0}
    assert (second[2].name, second[2].teacher_epochs, second[2].student_epochs) == ("gpu", 100, 3)
    models = {model.key: model for model in second[8]}
    assert list(models) == list(BY_KEY) and second[2].epochs(models["student_alone_long"]) == 6
    for bad, message in (
        ({"models": "teacher,student_x"}, "unknown model.*'student_x'.*student_alone_long"),
        ({"student_epochs": 0}, "schedule 'cpu': student_epochs must be at least 1"),
        ({"pairwise_weight": -1.0}, "pairwise_weight must be positive"),
    ):
        with pytest.raises(SystemExit, match=f"tools.study: error: {message}"):
            tools.study.main("data", "out", **bad)
    assert len(calls) == 2


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
    distilled = training_command(KD, SCHEDULES["gpu"], *data, paths, overrides={"patch_size": 64})
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
    distilled = evaluation_command(KD, "data", "split.json", paths)
    assert option(distilled, "config_file") == "['configs/train.json','configs/evaluate.json']"
    assert (option(distilled, "ckpt_dir"), option(distilled, "ckpt_name")) == ("out/models", "student_kd.pt")
    assert (option(distilled, "output_dir"), option(distilled, "eval_split")) == ("out/eval/student_kd", "test")
    assert paths.eval_csv(KD) == "out/eval/student_kd/metrics_test.csv"
    assert paths.last_ckpt(ALONE_LONG) == "out/models/student_alone_long_last.pt"
    assert paths.tensorboard_dir(KD_UNLABELLED) == "out/logs/student_kd_unlabelled"


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
    left = {"teacher": 2, "student_alone": 0, "student_kd": 10}
    assert estimate_seconds_left(left, {"teacher": [100.0, 200.0], "student_alone": [30.0]}) == 2 * 150 + 10 * 30
    assert estimate_seconds_left(left, {"teacher": [100.0], "student_kd": [40.0]}) == 2 * 100 + 10 * 40
    assert estimate_seconds_left(left, {"student_alone": [30.0]}) is None  # the teacher is not timed yet


def test_time_left_scales_an_untimed_epoch_by_the_cases_it_draws():
    left = {"student_kd_unlabelled": 10, "student_alone_long": 30}
    # an epoch of student_kd_unlabelled draws 1 + 2.0 cases per labelled case: three times a labelled epoch
    assert estimate_seconds_left(left, {"student_alone": [20.0]}) == 10 * 60 + 30 * 20
    assert estimate_seconds_left(left, {"student_kd_unlabelled": [90.0]}) == 10 * 90 + 30 * 30


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


def test_a_student_s_dice_gain_is_its_mean_over_the_regions_minus_the_student_alone_s(tmp_path):
    header = CURRENT_HEADER + ["lesion_dice_wt", "lesion_dice_tc", "lesion_dice_et"]
    student = write_csv(
        tmp_path / "kd.csv", header, [["mean", "0.9", "0.8", "0.7", "1", "1", "1", "0.6", "0.5", "0.4"]]
    )
    alone = write_csv(
        tmp_path / "alone.csv", header, [["mean", "0.85", "0.75", "0.6", "1", "1", "1", "0.5", "0.5", "nan"]]
    )
    student_table, alone_table = (read_evaluation_csv(str(path), REGIONS) for path in (student, alone))
    assert dice_gain(student_table, alone_table) == pytest.approx(100 * (0.8 - 2.2 / 3))  # +6.7 points
    assert dice_gain(alone_table, student_table) == pytest.approx(-100 * (0.8 - 2.2 / 3))
    assert dice_gain(student_table, alone_table, "lesion_dice") is None  # ET undefined for the student alone
    assert dice_gain(student_table, student_table, "lesion_dice") == 0.0
    model = {"key": "student_kd", "dice_gain_vs_student_alone": {"legacy_dice": dice_gain(student_table, alone_table)}}
    assert _gain_cell(model, "legacy_dice") == "+6.7"
    assert _gain_cell(model | {"dice_gain_vs_student_alone": {"legacy_dice": -0.04}}, "legacy_dice") == "+0.0"
    assert _gain_cell({"key": "student_alone"}, "legacy_dice") == "reference"
    assert _gain_cell({"key": "teacher"}, "legacy_dice") == "—"


@pytest.mark.slow
def test_a_failing_stage_stops_the_study_naming_the_stage_and_its_log(tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    (tmp_path / "data").mkdir()  # a dataset folder without cases: the teacher's training fails at once
    with pytest.raises(StudyError, match=r"stage 1/9 teacher failed \(exit code [1-9]\d*\); its log is .*teacher\.log"):
        run_study(str(tmp_path / "data"), str(tmp_path / "out"), SCHEDULES["cpu"])
    assert not (tmp_path / "out" / "study.md").exists()


@pytest.mark.slow
def test_the_study_trains_evaluates_and_reports_then_reruns_as_a_no_op(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(BUNDLE_ROOT)
    case_ids = write_synthetic_dataset(tmp_path / "data", num_cases=4, shape=(32, 32, 16))
    datalist = tmp_path / "split.json"
    split = {"training": case_ids[:1], "validation": case_ids[1:2], "test": case_ids[2:3], "unlabelled": case_ids[3:]}
    datalist.write_text(json.dumps(split))
    schedule = Schedule("tiny", teacher_epochs=1, student_epochs=1, teacher_val_interval=1, student_val_interval=1)
    tiny = {"patch_size": 32, "patches_per_case": 2, "batch_size": 1, "infer_batch_size": 16}
    tiny["teacher_def#channels"] = [8, 16, 32, 64, 128]
    models = select_models(study_models(unlabelled_ratio=1.0), None, unlabelled=True)
    args = (str(tmp_path / "data"), str(tmp_path / "out"), schedule, str(datalist), tiny)
    kwargs = {"figure_cases": 1, "latency_repeats": 1, "models": models}

    results = run_study(*args, **kwargs)
    out = tmp_path / "out"
    reports = {"study.md", "study.json", "study.png", "study_dice.png"}
    assert {p.name for p in out.iterdir()} >= reports | {"models", "eval", "cache"}
    written = json.loads((out / "study.json").read_text())
    assert written["test_cases"] == case_ids[2:3] and written["figure_cases"] == case_ids[2:3]
    assert written["dice_figure"] == str(out / "study_dice.png") and written["unlabelled_cases"] == 1
    assert written["figure_models"] == [model.key for model in models[:5]]  # the teacher and 4 students
    assert list(written["models"]) == list(BY_KEY) and written["left_out_models"] == []
    for model in models:
        entry = written["models"][model.key]
        assert set(entry["metrics"]["legacy_dice"]) == set(REGIONS)
        assert entry["epochs"] == (2 if model.key == "student_alone_long" else 1)
        assert entry["training"]["epochs"] == entry["epochs"] and entry["training"]["wall_time_s"] > 0
        assert entry["overrides"] == dict(model.overrides)
        assert entry["parameters"] > 0 and entry["gflops_per_slice"] > 0 and entry["latency_s"] > 0
        assert (out / f"{model.key}.log").is_file() and (out / f"evaluate_{model.key}.log").is_file()
        gain = entry.get("dice_gain_vs_student_alone", {}).get("legacy_dice")
        assert (gain is not None) == (model.key not in ("teacher", "student_alone"))
    assert results["models"] == written["models"]
    table = (out / "study.md").read_text()
    assert "Schedule `tiny`" in table and "| Student KD + unlabelled | 1 |" in table and "Dice WT" in table
    assert "Δ mean Dice vs student alone" in table and "(study_dice.png)" in table
    assert "| Student alone | 1 |" in table and "| reference |" in table

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*.pt")} | {
        p: p.stat().st_mtime_ns for p in (out / "eval").rglob("*.csv")
    }
    capsys.readouterr()
    run_study(*args, **kwargs)
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert printed.count("skipped") == len(models) and printed.count("reused") == len(models)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing trained or evaluated again


def test_recorded_stage_commands_are_shell_lines_that_give_back_the_same_arguments():
    command = training_command(KD, SCHEDULES["cpu"], "data dir", None, StudyPaths("out"), overrides={"x": "$a'b"})
    line = _shell_join(command)
    assert line.startswith("python -m monai.bundle run training --config_file \"['configs/train.json',")
    assert shlex.split(line) == ["python", *command[1:]]
