# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Atomic checkpoints and outputs, resumable state, checked network loading, and the remaining bad-input cases."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from scripts.brats_data import BraTSDataError, find_cases, load_datalist
from scripts.brats_loading import LoadBraTSCased
from scripts.brats_output import AtomicNibabelWriter, OutsideBrainToBackgroundd
from scripts.checkpoints import (
    AtomicCheckpointSaver,
    BestMetricState,
    CheckpointMismatchError,
    atomic_torch_save,
    check_network_checkpoint,
)
from scripts.separable_unet import SeparableUNet

TINY = (4, 8, 16)


class _Boom:
    def __reduce__(self):
        raise RuntimeError("interrupted while writing")


def test_atomic_save_that_fails_midway_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_torch_save({"w": torch.zeros(3), "x": _Boom()}, path)
    torch.testing.assert_close(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_best_model_saver_replaces_the_file_without_deleting_it_first(tmp_path, monkeypatch):
    network = torch.nn.Linear(2, 1)
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": network}, save_key_metric=True, key_metric_name="dice",
        key_metric_filename="model.pt",
    )  # fmt: skip
    deleted = []  # every file the run deletes
    os_remove = os.remove

    def recording_remove(path, *args, **kwargs):
        deleted.append(str(path))
        os_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", recording_remove)
    monkeypatch.setattr(os, "unlink", recording_remove)
    engine = Engine(lambda e, b: None)
    scores = iter([0.2, 0.5, 0.3])
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(dice=next(scores)))
    saver.attach(engine)
    weights = []
    network.requires_grad_(False)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: network.bias.fill_(e.state.epoch))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: weights.append(float(network.bias)))
    engine.run([0], max_epochs=3)
    assert str(tmp_path / "model.pt") not in deleted  # the new best file replaced the old one by rename
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == {"weight", "bias"}  # a plain state dict of the network
    assert float(state["bias"]) == weights[1]  # epoch 2 had the best score
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_best_model_saver_of_a_resumed_run_keeps_the_restored_best(tmp_path):
    network = torch.nn.Linear(2, 1)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    before = (tmp_path / "model.pt").read_bytes()
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": network}, save_key_metric=True, key_metric_name="dice",
        key_metric_filename="model.pt",
    )  # fmt: skip
    engine = Engine(lambda e, b: None)
    engine.state.best_metric, engine.state.best_metric_epoch = 0.9, 4  # as BestMetricState restores them
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(dice=0.5))
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    assert (tmp_path / "model.pt").read_bytes() == before  # 0.5 < 0.9: not replaced


def test_best_metric_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.best_metric, engine.state.best_metric_epoch = 0.75, 3
    torch.save({"best": BestMetricState(engine).state_dict()}, tmp_path / "last.pt")
    other = Engine(lambda e, b: None)
    BestMetricState(other).load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["best"])
    assert (other.state.best_metric, other.state.best_metric_epoch) == (0.75, 3)


@pytest.mark.parametrize("saved_channels, config_channels", [(4, 3), (3, 4)])
def test_checkpoint_of_other_sequences_names_file_and_in_channels_mismatch(tmp_path, saved_channels, config_channels):
    torch.save(SeparableUNet(saved_channels, 4, channels=TINY).state_dict(), tmp_path / "model.pt")
    with pytest.raises(
        CheckpointMismatchError,
        match=rf"model\.pt was trained on {saved_channels} input channels but the config's network takes "
        rf"{config_channels} \(in_channels/modalities mismatch",
    ):
        check_network_checkpoint(SeparableUNet(config_channels, 4, channels=TINY), str(tmp_path / "model.pt"))


def test_checkpoint_of_other_classes_names_file_and_num_classes_mismatch(tmp_path):
    torch.save(SeparableUNet(3, 2, channels=TINY).state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointMismatchError, match=r"model\.pt predicts 2 classes .* 4 \(out_channels/num_classes"):
        check_network_checkpoint(SeparableUNet(3, 4, channels=TINY), str(tmp_path / "model.pt"))


def test_checkpoint_carrying_pickled_code_is_refused_naming_the_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointMismatchError, match=r"evil\.pt is refused: .*weights_only=True"):
        check_network_checkpoint(SeparableUNet(3, 4, channels=TINY), str(tmp_path / "evil.pt"))


def test_truncated_checkpoint_names_the_file(tmp_path):
    torch.save(SeparableUNet(3, 4, channels=TINY).state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:500])
    with pytest.raises(CheckpointMismatchError, match=r"cannot read checkpoint .*model\.pt \(corrupt or truncated"):
        check_network_checkpoint(SeparableUNet(3, 4, channels=TINY), str(tmp_path / "model.pt"))


def test_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    state = SeparableUNet(3, 4, channels=TINY).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][0] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(
        CheckpointMismatchError, match=rf"model\.pt holds NaN or infinite weights in 1 tensor\(s\) \({name}\)"
    ):
        check_network_checkpoint(SeparableUNet(3, 4, channels=TINY), str(tmp_path / "model.pt"))


def test_torchscript_archive_given_as_checkpoint_is_refused_saying_what_it_is(tmp_path):
    network = SeparableUNet(3, 4, channels=TINY).eval()
    torch.jit.trace(network, torch.zeros(1, 3, 16, 16)).save(str(tmp_path / "model.ts"))
    with pytest.raises(CheckpointMismatchError, match=r"model\.ts is a TorchScript archive .*not a checkpoint"):
        check_network_checkpoint(network, str(tmp_path / "model.ts"))


@pytest.mark.parametrize("name", ["image.nii.gz", "image.nii"])
def test_nifti_given_as_checkpoint_is_refused_saying_what_it_is(tmp_path, name):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / name))
    with pytest.raises(CheckpointMismatchError, match=rf"{name} is a NIfTI image, not a checkpoint"):
        check_network_checkpoint(SeparableUNet(3, 4, channels=TINY), str(tmp_path / name))


def test_atomic_writer_that_fails_keeps_the_previous_segmentation(tmp_path, monkeypatch):
    target = tmp_path / "case_seg.nii.gz"
    writer = AtomicNibabelWriter(output_dtype=np.uint8)
    writer.set_data_array(torch.ones(1, 4, 4, 2), channel_dim=0)
    writer.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
    writer.write(target)
    good = target.read_bytes()

    def fail(img, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    writer.set_data_array(torch.zeros(1, 4, 4, 2), channel_dim=0)
    with pytest.raises(OSError, match="disk full"):
        writer.write(target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_all_zero_case_is_loaded_and_segmented_as_background_with_a_warning(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1, labels_present=False)
    for path in folder.glob("*/*.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    data = LoadBraTSCased(keys="image")(find_cases(folder, require_label=False)[0])
    assert data["image"].meta["empty_brain"]
    data["pred"] = MetaTensor(torch.full((1, 16, 16, 8), 2))
    with pytest.warns(UserWarning, match=r"case BraTS20_Training_001: every voxel of .*_flair\.nii\.gz.* is 0"):
        out = OutsideBrainToBackgroundd(keys="pred")(data)
    assert not out["pred"].any()


def test_non_empty_case_keeps_its_prediction_in_the_brain_without_warning(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2020", num_cases=1, labels_present=False)
    data = LoadBraTSCased(keys="image")(find_cases(folder, require_label=False)[0])
    data["pred"] = torch.full((1, 16, 16, 8), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = OutsideBrainToBackgroundd(keys="pred")(data)["pred"]
    assert (pred[data["image"].any(dim=0, keepdim=True)] == 2).all()


def test_corrupt_non_nifti_file_names_case_and_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path, "brats2023", num_cases=1)
    t1c = next(folder.glob("*/*-t1c.nii.gz"))
    t1c.write_bytes(b"this is not a NIfTI file at all")
    with pytest.raises(BraTSDataError, match=rf"BraTS-GLI-00001-000: cannot read .*{t1c.name}"):
        LoadBraTSCased(keys=("image", "label"))(find_cases(folder)[0])


def test_datalist_naming_a_case_with_a_missing_file_names_case_and_file(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=3)
    next(folder.glob("BraTS20_Training_002/*_t1ce.nii.gz")).unlink()
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": ["BraTS20_Training_001", "BraTS20_Training_002"]}))
    with pytest.raises(BraTSDataError, match=r"Case BraTS20_Training_002: missing t1ce file .*_t1ce\.nii\.gz"):
        load_datalist(datalist, folder)
