# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import pickle

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer

from scripts.distillation_loss import DistillationLoss, DistillationTarget
from scripts.separable_unet import SeparableUNet
from scripts.soft_labels import SOFT_LABEL_KEY
from scripts.teacher import TeacherCheckpointError, TeacherTargets, load_teacher
from scripts.unlabelled import LABELLED_KEY

TINY_TEACHER = (8, 16, 32)
TINY_STUDENT = (4, 8, 16)


def tiny_teacher() -> SeparableUNet:
    torch.manual_seed(0)
    return SeparableUNet(in_channels=3, out_channels=4, channels=TINY_TEACHER, dropout=0.5)


def save_trained_teacher(path) -> dict[str, torch.Tensor]:
    """A teacher checkpoint whose BatchNorm statistics differ from a fresh network's."""
    teacher = tiny_teacher().train()
    with torch.no_grad():
        for _ in range(3):
            teacher(torch.randn(4, 3, 16, 16) * 3 + 1)
    torch.save(teacher.state_dict(), path)
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def test_loaded_teacher_is_frozen_in_eval_mode(tmp_path):
    saved = save_trained_teacher(tmp_path / "teacher.pt")
    teacher = load_teacher(tiny_teacher(), str(tmp_path / "teacher.pt"))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_checkpoint_with_a_model_entry_is_accepted(tmp_path):
    saved = save_trained_teacher(tmp_path / "plain.pt")
    torch.save({"model": saved, "epoch": 3}, tmp_path / "resumable.pt")
    teacher = load_teacher(tiny_teacher(), str(tmp_path / "resumable.pt"))
    torch.testing.assert_close(teacher.head.weight, saved["head.weight"])


def test_missing_teacher_checkpoint_names_the_file_and_how_to_make_it(tmp_path):
    with pytest.raises(
        TeacherCheckpointError, match=r"absent\.pt not found.*'configs/train\.json','configs/teacher\.json'"
    ):
        load_teacher(tiny_teacher(), str(tmp_path / "absent.pt"))


def test_student_checkpoint_given_as_teacher_names_file_and_first_mismatching_keys(tmp_path):
    student = SeparableUNet(in_channels=3, out_channels=4, channels=TINY_STUDENT)
    torch.save(student.state_dict(), tmp_path / "model.pt")
    with pytest.raises(TeacherCheckpointError, match=r"model\.pt does not fit.*shape mismatch \(\d+\): encoders\.0"):
        load_teacher(tiny_teacher(), str(tmp_path / "model.pt"))


def test_teacher_of_another_depth_lists_missing_and_unexpected_keys(tmp_path):
    torch.save(SeparableUNet(3, 4, channels=(8, 16, 32, 64)).state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(TeacherCheckpointError, match=r"unexpected keys \(\d+\): encoders\.2"):
        load_teacher(tiny_teacher(), str(tmp_path / "deeper.pt"))


def test_checkpoint_carrying_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(TeacherCheckpointError, match=r"teacher checkpoint .*evil\.pt is refused"):
        load_teacher(tiny_teacher(), str(tmp_path / "evil.pt"))


def make_trainer(
    teacher: torch.nn.Module, kd_weight: float, epochs: int = 1, soft_labels: str = "online", cached_probs=None
) -> SupervisedTrainer:
    torch.manual_seed(1)
    student = SeparableUNet(in_channels=3, out_channels=4, channels=TINY_STUDENT)
    images = torch.randn(4, 3, 16, 16)
    labels = torch.randint(0, 4, (4, 1, 16, 16)).float()
    loader = [{"image": images[i : i + 2], "label": labels[i : i + 2]} for i in (0, 2)]
    if cached_probs is not None:
        for batch, i in zip(loader, (0, 2)):
            batch[SOFT_LABEL_KEY] = cached_probs[i : i + 2]
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.Adam(student.parameters(), 1e-2),
        loss_function=DistillationLoss(kd_weight=kd_weight),
        inferer=SimpleInferer(),
        prepare_batch=TeacherTargets(teacher, soft_labels=soft_labels, enabled=kd_weight > 0),
        decollate=False,  # keep the last iteration's batch and output whole for the checks
    )


def test_distillation_epoch_leaves_teacher_weights_and_batchnorm_statistics_untouched(tmp_path):
    save_trained_teacher(tmp_path / "teacher.pt")
    teacher = load_teacher(tiny_teacher(), str(tmp_path / "teacher.pt"))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(teacher, kd_weight=0.5, epochs=2)
    student_before = trainer.network.head.weight.clone()
    trainer.run()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed during distillation"
    assert not teacher.training
    assert not torch.equal(trainer.network.head.weight, student_before), "the student did not learn"


def test_teacher_logits_of_the_students_batch_reach_the_loss(tmp_path):
    save_trained_teacher(tmp_path / "teacher.pt")
    teacher = load_teacher(tiny_teacher(), str(tmp_path / "teacher.pt"))
    trainer = make_trainer(teacher, kd_weight=1.0)
    trainer.run()
    output = trainer.state.output
    with torch.no_grad():
        expected = teacher(output["image"])
    target = output["label"]
    assert isinstance(target, DistillationTarget) and target.teacher_probs is None
    torch.testing.assert_close(target.teacher_logits, expected)
    # kd_weight 1: the loss is the KD term between the student's prediction and these teacher logits
    kd = DistillationLoss(kd_weight=1.0).kd_term(output["pred"].detach(), expected)
    assert output["loss"].item() == pytest.approx(kd.item(), rel=1e-5)


def test_cached_soft_labels_of_the_batch_reach_the_loss_without_running_the_teacher(tmp_path):
    save_trained_teacher(tmp_path / "teacher.pt")
    teacher = load_teacher(tiny_teacher(), str(tmp_path / "teacher.pt"))
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    probs = torch.softmax(torch.randn(4, 4, 16, 16), dim=1)
    trainer = make_trainer(teacher, kd_weight=1.0, soft_labels="cached", cached_probs=probs)
    trainer.run()
    assert calls == []
    target = trainer.state.output["label"]
    assert target.teacher_logits is None
    torch.testing.assert_close(target.teacher_probs, probs[2:4])
    kd = DistillationLoss(kd_weight=1.0).kd_term(trainer.state.output["pred"].detach(), None, teacher_probs=probs[2:4])
    assert trainer.state.output["loss"].item() == pytest.approx(kd.item(), rel=1e-5)


def test_cached_mode_without_soft_labels_in_the_batch_names_the_missing_transform(tmp_path):
    targets = TeacherTargets(tiny_teacher(), soft_labels="cached")
    batch = {"image": torch.zeros(1, 3, 16, 16), "label": torch.zeros(1, 1, 16, 16)}
    with pytest.raises(KeyError, match="TeacherSoftLabelsd"):
        targets(batch)


def test_unknown_soft_label_source_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"\('online', 'cached'\)"):
        TeacherTargets(tiny_teacher(), soft_labels="cache")


def test_student_alone_baseline_does_not_run_the_teacher(tmp_path):
    save_trained_teacher(tmp_path / "teacher.pt")
    teacher = load_teacher(tiny_teacher(), str(tmp_path / "teacher.pt"))
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    trainer = make_trainer(teacher, kd_weight=0.0)
    trainer.run()
    assert calls == []
    assert trainer.state.output["label"].teacher_logits is None


@pytest.mark.parametrize("soft_labels, enabled", [("cached", True), ("online", True), ("cached", False)])
def test_the_batchs_labelled_flags_reach_the_loss(soft_labels, enabled):
    targets = TeacherTargets(tiny_teacher(), soft_labels=soft_labels, enabled=enabled)
    batch = {
        "image": torch.zeros(2, 3, 16, 16),
        "label": torch.zeros(2, 1, 16, 16),
        SOFT_LABEL_KEY: torch.full((2, 4, 16, 16), 0.25),
        LABELLED_KEY: torch.tensor([True, False]),
    }
    _, target = targets(batch)
    assert target.labelled.tolist() == [True, False]
    del batch[LABELLED_KEY]
    assert targets(batch)[1].labelled is None  # a batch of labelled cases only
