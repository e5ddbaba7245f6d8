# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Every workflow config passes MONAI's bundle property checks, as the Model Zoo's unit tests require."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.separable_unet import SeparableUNet
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = BUNDLE_ROOT / "configs"
TRAIN = [str(CONFIG_DIR / "train.json")]
TEACHER = [*TRAIN, str(CONFIG_DIR / "teacher.json")]
DISTILL = [*TRAIN, str(CONFIG_DIR / "distill.json")]
EVALUATE = str(CONFIG_DIR / "evaluate.json")
CONFIGS = [TRAIN, TEACHER, DISTILL, [*TRAIN, EVALUATE], [*TEACHER, EVALUATE], [*DISTILL, EVALUATE]]


def check_properties(config_file, workflow_type: str, bundle_root: Path) -> list:
    """Initialise a config as the Model Zoo's unit tests do and return its missing or misreferenced properties."""
    workflow = ConfigWorkflow(
        config_file=config_file,
        meta_file=str(CONFIG_DIR / "metadata.json"),
        logging_file=str(CONFIG_DIR / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        dataset_dir=str(bundle_root / "data"),
    )
    workflow.initialize()
    return workflow.check_properties()


@pytest.mark.parametrize(
    "config_file", CONFIGS, ids=lambda c: "+".join(Path(p).stem for p in ([c] if isinstance(c, str) else c))
)
def test_workflow_config_defines_every_training_property(config_file, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)  # the configs' %configs/... macros are relative to the bundle root
    write_synthetic_dataset(tmp_path / "data", num_cases=3, shape=(32, 32, 16))
    (tmp_path / "models").mkdir()  # distillation loads the teacher when it initialises
    teacher = SeparableUNet(3, 4, channels=(64, 128, 256, 512, 1024), dropout=0.5)
    torch.save(teacher.state_dict(), tmp_path / "models" / "teacher.pt")
    assert check_properties(config_file, "train", tmp_path) == []


def test_inference_config_defines_every_inference_property(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset(tmp_path / "data", num_cases=1, shape=(32, 32, 16))
    assert check_properties(str(CONFIG_DIR / "inference.json"), "infer", tmp_path) == []


def parsed(config_file) -> ConfigParser:
    """A config (or list of configs merged in order) with its macros resolved, on CPU."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser["device"] = "$torch.device('cpu')"
    parser.resolve_macro_and_relative_ids()
    return parser


def best_checkpoint_file(parser: ConfigParser) -> str:
    """File name under which the validation's key-metric ``CheckpointSaver`` writes the best network."""
    [index] = [i for i, h in enumerate(parser["validate#checkpoint_handlers"]) if h.get("save_key_metric")]
    return parser.get_parsed_content(f"validate#checkpoint_handlers#{index}#key_metric_filename")


def shapes(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def test_train_config_trains_the_deployed_student_into_model_pt():
    train, distill, teacher = parsed(TRAIN), parsed(DISTILL), parsed(TEACHER)
    # MONAI Label runs configs/train.json and first loads models/model.pt (written by distill.json) into @network
    student = train.get_parsed_content("network_def")
    assert shapes(student) == shapes(distill.get_parsed_content("network_def"))
    assert sum(p.numel() for p in student.parameters()) == 605_679
    assert train.get_parsed_content("ckpt_name") == best_checkpoint_file(train) == "model.pt"
    assert best_checkpoint_file(distill) == "model.pt"
    # the teacher: configs/teacher.json trains train.json's teacher_def, which distill.json loads
    network = teacher.get_parsed_content("network_def")
    assert sum(p.numel() for p in network.parameters()) == 9_475_935
    assert shapes(network) == shapes(distill.get_parsed_content("teacher_def"))
    assert best_checkpoint_file(teacher) == "teacher.pt"
    assert teacher.get_parsed_content("last_ckpt_name") == "teacher_last.pt"
    assert train.get_parsed_content("last_ckpt_name") == "model_last.pt"


def test_training_loader_reads_one_file_studies_with_the_configs_modalities():
    # MONAI Label hands training one image file per study; its sibling sequences are chosen by `modalities`
    for config_file in (TRAIN, TEACHER, DISTILL):
        parser = parsed(config_file)
        parser["modalities"] = ["flair", "t1", "t1ce", "t2"]
        loader = parser.get_parsed_content("train#preprocessing_transforms")[0]
        assert loader.modalities == ["flair", "t1", "t1ce", "t2"]


def test_distill_config_overrides_only_what_distillation_adds():
    train = ConfigParser.load_config_file(CONFIG_DIR / "train.json")
    distill = ConfigParser.load_config_file(CONFIG_DIR / "distill.json")
    restated = [key for key, value in distill.items() if key in train and train[key] == value]
    assert restated == [], f"configs/distill.json restates configs/train.json's {restated}"
    assert not any(isinstance(v, str) and v.startswith("%") for v in distill.values()), "no cross-file macro"


def test_network_width_override_reaches_the_distilled_student():
    parser = ConfigParser()
    parser.read_config(DISTILL)
    parser["network_def#channels"] = [8, 16, 32, 64, 128]
    student = parser.get_parsed_content("network_def")
    assert student.head.in_channels == 8


def test_a_deeper_network_sets_the_padding_and_crop_grid_of_validation_and_inference():
    for config_file in (TRAIN, str(CONFIG_DIR / "inference.json")):
        parser = parsed(config_file)
        parser["network_def#channels"] = [8, 16, 32, 64, 128, 256]  # five poolings: H, W multiples of 32
        preprocessing = "validate#preprocessing_transforms" if config_file == TRAIN else "preprocessing#transforms"
        pad = next(t for t in parser.get_parsed_content(preprocessing) if type(t).__name__ == "DivisiblePadd")
        inferer = parser.get_parsed_content("validate#inferer" if config_file == TRAIN else "inferer")
        assert (list(pad.padder.k), inferer.divisor) == ([32, 32, 1], 32)


def test_one_knob_sets_the_mode_of_the_loss_and_of_the_cached_soft_labels():
    parser = parsed(DISTILL)
    parser["kd_mode"] = "sigmoid"
    parser["train#soft_label_transform#teacher"] = "$torch.nn.Conv2d(3, 4, 1)"
    assert parser.get_parsed_content("loss").mode == "sigmoid"
    assert parser.get_parsed_content("train#soft_label_transform").mode == "sigmoid"


def test_checkpoint_report_names_the_files_the_savers_write():
    for config_file in (TRAIN, TEACHER, DISTILL):
        parser = parsed(config_file)
        [index] = [i for i, h in enumerate(parser["train#handlers"]) if h["_target_"].endswith("CheckpointReport")]
        ckpt_dir = parser.get_parsed_content("ckpt_dir")
        report = f"train#handlers#{index}"
        assert parser.get_parsed_content(f"{report}#best_ckpt") == os.path.join(ckpt_dir, best_checkpoint_file(parser))
        assert parser.get_parsed_content(f"{report}#last_ckpt") == os.path.join(
            ckpt_dir, parser.get_parsed_content("last_ckpt_name")
        )
