# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Cached soft labels: the online teacher's targets on un-augmented input, computed once, stale files replaced."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose
from torch import nn

from scripts.distillation_loss import DistillationLoss
from scripts.soft_labels import TeacherSoftLabelsd, soft_labels_from_logits
from tools.bundle_config import DISTILL_CONFIGS, bundle_configs, load_config
from tools.synthetic_brats import write_synthetic_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 2.0
TEACHER_CHANNELS = (8, 16, 32, 64, 128)  # a small stand-in for the teacher


def _case(case_id: str = "BraTS20_Training_001") -> dict[str, MetaTensor]:
    """A (3, 64, 48, 10) z-scored-like volume: brain in slices 2..7 (and a box of rows 10..49, columns 8..39)."""
    generator = torch.Generator().manual_seed(2)
    image = torch.zeros(3, 64, 48, 10)
    image[:, 10:50, 8:40, 2:8] = torch.randn(3, 40, 32, 6, generator=generator)
    return {"image": MetaTensor(image, meta={"case_id": case_id})}


def _online_probs(teacher: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """What the online teacher gives on the un-augmented whole slices: (C_out, H, W, D) probabilities."""
    with torch.no_grad():
        logits = teacher(image.permute(3, 0, 1, 2))  # (D, C_out, H, W)
    return soft_labels_from_logits(logits, TEMPERATURE).permute(1, 2, 3, 0)


def test_cached_soft_labels_agree_with_the_online_teacher_on_unaugmented_input(tmp_path, trained_like_network):
    teacher, case = trained_like_network(TEACHER_CHANNELS, dropout=0.5), _case()
    cached = TeacherSoftLabelsd("image", teacher, str(tmp_path), TEMPERATURE, margin=4)(case)["teacher_probs"]
    expected = _online_probs(teacher, case["image"].as_tensor())
    assert cached.shape == expected.shape and cached.dtype == torch.float16
    box = (slice(6, 54), slice(4, 44), slice(2, 8))  # brain box plus the 4-voxel margin, in plane
    torch.testing.assert_close(cached[(slice(None), *box)].float(), expected[(slice(None), *box)], atol=2e-3, rtol=0)
    empty = [0, 1, 8, 9]
    torch.testing.assert_close(cached[..., empty].float(), expected[..., empty], atol=2e-3, rtol=0)


def test_kd_term_from_cached_soft_labels_matches_the_online_teacher_logits(tmp_path, trained_like_network):
    teacher, case = trained_like_network(TEACHER_CHANNELS, dropout=0.5), _case()
    cached = TeacherSoftLabelsd("image", teacher, str(tmp_path), TEMPERATURE, margin=64)(case)["teacher_probs"]
    slices = case["image"].as_tensor().permute(3, 0, 1, 2)
    with torch.no_grad():
        teacher_logits = teacher(slices)
    student_logits = torch.randn(teacher_logits.shape, generator=torch.Generator().manual_seed(3))
    loss = DistillationLoss(temperature=TEMPERATURE, kd_weight=1.0)
    online = loss.kd_term(student_logits, teacher_logits)
    from_cache = loss.kd_term(student_logits, None, teacher_probs=cached.permute(3, 0, 1, 2))
    torch.testing.assert_close(from_cache, online, atol=2e-3, rtol=2e-3)


def test_teacher_runs_once_per_case_and_again_when_its_weights_change(tmp_path, trained_like_network):
    teacher_ran = []  # per call: whether the teacher's forward ran

    def soft_labels(seed: int, temperature: float = TEMPERATURE) -> torch.Tensor:
        teacher = trained_like_network(TEACHER_CHANNELS, seed=seed, dropout=0.5)
        forwards = []
        teacher.register_forward_hook(lambda module, inputs, output: forwards.append(1))
        probs = TeacherSoftLabelsd("image", teacher, str(tmp_path), temperature)(_case())["teacher_probs"]
        teacher_ran.append(bool(forwards))
        return probs

    first, again = soft_labels(seed=0), soft_labels(seed=0)
    assert teacher_ran == [True, False] and torch.equal(first, again)
    assert [p.name for p in tmp_path.iterdir()] == ["BraTS20_Training_001.pt"]
    assert not torch.equal(first, soft_labels(seed=1)) and teacher_ran[-1]
    soft_labels(seed=1, temperature=TEMPERATURE * 2)
    assert teacher_ran[-1], "another temperature is another target"


def test_each_computation_is_logged_naming_the_case_and_its_cache_file_and_a_reused_file_is_silent(
    tmp_path, caplog, trained_like_network
):
    logging.getLogger("TeacherSoftLabelsd").disabled = False  # a bundle run in this process may have disabled it
    caplog.set_level(logging.INFO, logger="TeacherSoftLabelsd")
    transform = TeacherSoftLabelsd(
        "image", trained_like_network(TEACHER_CHANNELS, dropout=0.5), str(tmp_path), TEMPERATURE
    )
    transform(_case())
    cache_file = tmp_path / "BraTS20_Training_001.pt"
    starting, done = [r.getMessage() for r in caplog.records if r.name == "TeacherSoftLabelsd"]
    assert starting == f"case BraTS20_Training_001: computing the teacher's soft labels (once per case) -> {cache_file}"
    assert done.startswith("case BraTS20_Training_001: teacher soft labels computed in ") and done.endswith(
        f" s, cached in {cache_file}"
    )
    caplog.clear()
    transform(_case())
    assert [r for r in caplog.records if r.name == "TeacherSoftLabelsd"] == []


def test_truncated_cache_file_is_recomputed_with_a_warning_naming_it(tmp_path, trained_like_network):
    teacher = trained_like_network(TEACHER_CHANNELS, dropout=0.5)
    transform = TeacherSoftLabelsd("image", teacher, str(tmp_path), TEMPERATURE)
    expected = transform(_case())["teacher_probs"]
    cache_file = tmp_path / "BraTS20_Training_001.pt"
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated (a full disk, an interrupted copy)
    with pytest.warns(UserWarning, match=rf"{cache_file}.*computed again"):
        recomputed = transform(_case())["teacher_probs"]
    assert torch.equal(recomputed, expected)
    assert torch.equal(transform(_case())["teacher_probs"], expected), "the file was replaced by a readable one"


def test_volume_sides_not_divisible_by_the_network_grid_are_padded_for_the_teacher_only(tmp_path, trained_like_network):
    case = {"image": MetaTensor(torch.randn(3, 40, 36, 3), meta={"case_id": "odd"})}
    probs = TeacherSoftLabelsd(
        "image", trained_like_network(TEACHER_CHANNELS, dropout=0.5), str(tmp_path), TEMPERATURE
    )(case)["teacher_probs"]
    assert probs.shape == (4, 40, 36, 3)
    torch.testing.assert_close(probs.float().sum(dim=0), torch.ones(40, 36, 3), atol=5e-3, rtol=0)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kd_term_from_probabilities_equals_kd_term_from_logits(mode):
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    loss = DistillationLoss(temperature=TEMPERATURE, mode=mode)
    probs = soft_labels_from_logits(teacher, TEMPERATURE, mode)
    torch.testing.assert_close(loss.kd_term(student, None, teacher_probs=probs), loss.kd_term(student, teacher))


def test_all_zero_soft_labels_brought_in_by_padding_add_no_kd_target():
    student = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    probs = torch.zeros(1, 4, 6, 6)
    assert DistillationLoss(temperature=TEMPERATURE).kd_term(student, None, teacher_probs=probs).item() == 0.0


def test_kd_term_needs_exactly_one_kind_of_teacher_target():
    loss = DistillationLoss()
    logits = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        loss.kd_term(logits, logits, teacher_probs=logits)
    with pytest.raises(ValueError, match="exactly one"):
        loss.kd_term(logits, None)


def _distill_random_transforms(soft_labels: str, kd_weight: float = 0.5) -> tuple[ConfigParser, object]:
    parser = load_config(bundle_configs(str(BUNDLE_ROOT), DISTILL_CONFIGS), str(BUNDLE_ROOT), str(BUNDLE_ROOT))
    parser["soft_labels"] = soft_labels
    parser["kd_weight"] = kd_weight
    parser["patch_size"] = 32
    parser["patches_per_case"] = 4
    return parser, Compose(parser.get_parsed_content("train#random_transforms"))


def test_cached_mode_moves_the_soft_labels_with_every_spatial_augmentation():
    parser, transforms = _distill_random_transforms("cached")
    assert parser.get_parsed_content("spatial_keys") == ["image", "label", "teacher_probs"]
    label = torch.zeros(1, 48, 48, 6, dtype=torch.long)
    label[0, 10:30, 12:36] = 2
    label[0, 16:24, 18:28] = 3
    label[0, 20:22, 20:22] = 1
    one_hot = torch.nn.functional.one_hot(label[0], 4).permute(3, 0, 1, 2).half()  # a teacher that agrees
    data = {"image": torch.randn(3, 48, 48, 6).abs() + 0.1, "label": label.float(), "teacher_probs": one_hot}
    transforms.set_random_state(seed=0)
    for patch in transforms(data):  # flips, rotations, zooms and crops: labels and soft labels stay aligned
        probs, patch_label = patch["teacher_probs"], patch["label"][0].long()
        assert probs.shape[1:] == patch_label.shape
        confident = probs.float().max(dim=0).values > 0.6  # away from the bilinear blur of the label's edges
        assert (probs.float().argmax(dim=0)[confident] == patch_label[confident]).float().mean() > 0.99


@pytest.mark.parametrize("soft_labels, kd_weight", [("online", 0.5), ("cached", 0.0)])
def test_online_mode_and_the_student_alone_keep_the_teacher_out_of_the_data_pipeline(soft_labels, kd_weight):
    parser, _ = _distill_random_transforms(soft_labels, kd_weight)
    assert parser.get_parsed_content("spatial_keys") == ["image", "label"]
    assert parser.get_parsed_content("spatial_modes") == ["bilinear", "nearest"]
    parser["teacher"] = "$None"  # the pipeline must not need the teacher in online mode
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    assert not any(isinstance(t, TeacherSoftLabelsd) for t in transforms)


def test_random_training_transforms_leave_the_cached_volumes_untouched(tmp_path):
    """``train#dataset`` does not copy its cache each epoch (``copy_cache`` false): nothing may write into it."""
    write_synthetic_dataset(tmp_path / "data", num_cases=4, shape=(48, 48, 16))
    config = bundle_configs(str(BUNDLE_ROOT), DISTILL_CONFIGS)
    torch.save(load_config(config, str(BUNDLE_ROOT), str(tmp_path)).get_parsed_content("teacher_def").state_dict(),
               tmp_path / "teacher.pt")  # fmt: skip
    overrides = {"teacher_ckpt": str(tmp_path / "teacher.pt"), "soft_label_dir": str(tmp_path / "cache")}
    parser = load_config(config, str(BUNDLE_ROOT), str(tmp_path / "data"), {**overrides, "patch_size": 32})
    dataset, loader = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("train#dataloader")
    assert dataset.copy_cache is False

    def snapshot() -> list[tuple[str, bytes, int]]:
        return [
            (key, item[key].as_tensor().clone().numpy().tobytes(), len(item[key].applied_operations))
            for item in dataset._cache
            for key in ("image", "label", "teacher_probs")
        ]

    before = snapshot()
    for _ in range(3):
        for batch in loader:
            batch["image"].mul_(0)  # even a consumer writing into its batch
    assert snapshot() == before
