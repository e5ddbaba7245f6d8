# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The fast inference path gives the plain path's result (``SliceInferer``, ``AsDiscreted``); its crop stays on grid."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import AsDiscreted
from torch import nn

from scripts.brats_output import ArgmaxLabeld
from scripts.fast_inference import (
    BrainSliceInferer,
    brain_bounding_box,
    empty_output,
    fold_batchnorm,
    prepare_for_inference,
)
from scripts.separable_unet import SeparableUNet


def _volume_with_background() -> torch.Tensor:
    """(1, 3, 64, 64, 12) z-scored-like volume: a brain ellipsoid in slices 3..8, 0 elsewhere."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 64, 64, 12, generator=generator)
    rows, columns, slices = torch.meshgrid(torch.arange(64), torch.arange(64), torch.arange(12), indexing="ij")
    brain = ((rows - 30) / 14.0) ** 2 + ((columns - 36) / 11.0) ** 2 + ((slices - 5.5) / 3.0) ** 2 <= 1.0
    return image * brain


def test_fold_batchnorm_keeps_the_network_function(trained_like_network):
    network = trained_like_network()
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = network(batch)
        folded = prepare_for_inference(network, channels_last=True)
        actual = folded(batch.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    assert any(isinstance(module, nn.BatchNorm2d) for module in network.modules()), "the original is left alone"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_counts_every_batchnorm_of_the_student(trained_like_network):
    network = trained_like_network()
    batchnorms = sum(isinstance(module, nn.BatchNorm2d) for module in network.modules())
    assert fold_batchnorm(network) == batchnorms == 18


def test_fold_batchnorm_refuses_a_network_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(SeparableUNet(3, 2).train())


def test_uncropped_fast_path_matches_slice_inferer(trained_like_network):
    network = trained_like_network()
    volume = MetaTensor(_volume_with_background(), meta={"case_id": "case-1"})
    with torch.no_grad():
        expected = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=5)(volume.as_tensor(), network)
        actual = BrainSliceInferer(sw_batch_size=3, crop_to_brain=False)(volume, network)
    assert isinstance(actual, MetaTensor) and actual.meta["case_id"] == "case-1"
    torch.testing.assert_close(actual.as_tensor(), expected, rtol=1e-4, atol=1e-4)


class _RecordingNetwork(nn.Module):
    """Zero logits for 2 classes; records the first channel of every batch of slices it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x[:, 0, 0, 0].clone())
        return x.new_zeros(x.shape[0], 2, *x.shape[2:])


def test_batches_are_runs_of_consecutive_brain_slices_never_spanning_a_gap():
    has_brain = [0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0]
    volume = torch.zeros(1, 1, 16, 16, len(has_brain))
    for z, brain in enumerate(has_brain):
        volume[..., z] = (z + 1) * brain  # each brain slice holds its index + 1
    network = _RecordingNetwork()
    inferer = BrainSliceInferer(sw_batch_size=4, crop_to_brain=False, channels_last=False, fold_bn=False)
    inferer(volume, network)
    empty, *batches = network.batches  # the empty slice's forward pass comes first
    assert empty.tolist() == [0.0]
    assert [batch.tolist() for batch in batches] == [[2.0, 3.0], [6.0, 7.0, 8.0, 9.0], [10.0]]
    network.batches.clear()
    inferer(torch.zeros(1, 1, 16, 16, 5), network)
    assert len(network.batches) == 1  # only the empty slice's pass


def test_fast_path_matches_slice_inferer_with_empty_slices_between_brain_slices(trained_like_network):
    network = trained_like_network()
    volume = _volume_with_background()
    volume[..., 5] = 0  # two runs of brain slices, 3..4 and 6..8
    with torch.no_grad():
        expected = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=12)(volume, network)
        actual = BrainSliceInferer(sw_batch_size=4, crop_to_brain=False)(volume, network)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_cropped_fast_path_is_exact_on_empty_slices_and_keeps_the_brain_labels(trained_like_network):
    network = trained_like_network()
    volume = _volume_with_background()
    with torch.no_grad():
        expected = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=12)(volume, network)
        actual = BrainSliceInferer(sw_batch_size=4, crop_to_brain=True, margin=8)(volume, network)
    empty_slices = [0, 1, 2, 9, 10, 11]
    torch.testing.assert_close(actual[..., empty_slices], expected[..., empty_slices], rtol=1e-4, atol=1e-4)
    brain = (volume[0] != 0).any(dim=0)
    agreement = (actual.argmax(dim=1)[0][brain] == expected.argmax(dim=1)[0][brain]).float().mean()
    # Random weights on noise are far more sensitive to the lost context at the box's edge than trained weights on
    # MRI (99.99% of the brain voxels agree on the real case, docs/benchmark); a box written one row off agrees on
    # only 26 to 70% of them here.
    assert agreement >= 0.97


def test_fast_path_on_an_all_background_volume_is_the_empty_slice_output(trained_like_network):
    network = trained_like_network()
    volume = torch.zeros(1, 3, 32, 32, 4)
    with torch.no_grad():
        expected = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=4)(volume, network)
        actual = BrainSliceInferer()(volume, network)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_brain_bounding_box_is_widened_and_aligned_to_the_network_grid():
    brain = torch.zeros(240, 240, 5, dtype=torch.bool)
    brain[54:183, 51:213, 2] = True
    rows, columns = brain_bounding_box(brain, margin=16, divisor=16)
    for span, low, high in ((rows, 54, 182), (columns, 51, 212)):
        assert span.start % 16 == 0 and (span.stop - span.start) % 16 == 0
        assert span.start <= low - 16 and span.stop >= min(240, high + 1 + 16) and span.stop <= 240


def test_brain_bounding_box_at_the_border_keeps_a_divisible_size():
    brain = torch.zeros(40, 48, 1, dtype=torch.bool)
    brain[30:40, 0:3, 0] = True
    rows, columns = brain_bounding_box(brain, margin=4, divisor=16)
    # rows 26..39 grow to 32 on the grid from 16, clipped at 40 and shifted back to keep 32 rows
    assert (rows.start, rows.stop) == (8, 40) and (columns.start, columns.stop) == (0, 16)
    assert brain_bounding_box(torch.zeros(8, 8, 2, dtype=torch.bool), margin=0, divisor=4) is None


def test_brain_slice_inferer_rejects_inputs_that_are_not_volumes():
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        BrainSliceInferer()(torch.zeros(1, 3, 16, 16), SeparableUNet(3, 2).eval())


def test_argmax_label_map_equals_monai_as_discrete_including_ties():
    logits = torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(7))
    logits[:, 0, 0, 0] = 1.0  # a four-way tie: the first class wins in both
    logits[1:3, 1, 0, 0] = 5.0  # a tie between classes 1 and 2
    pred = MetaTensor(logits, meta={"case_id": "c"})
    expected = AsDiscreted(keys="pred", argmax=True)({"pred": pred.clone()})["pred"]
    actual = ArgmaxLabeld(keys="pred")({"pred": pred})["pred"]
    assert actual.dtype == torch.uint8 and actual.meta["case_id"] == "c"
    assert torch.equal(actual.as_tensor().long(), expected.as_tensor().long())


def test_onnxruntime_backend_matches_the_torch_fast_path(trained_like_network, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    network = trained_like_network()
    volume = _volume_with_background()
    inferer = BrainSliceInferer(sw_batch_size=4, backend="onnxruntime")
    exports = []
    export = torch.onnx.export

    def counted_export(*args, **kwargs):
        exports.append(args[0])
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counted_export)
    with torch.no_grad():
        expected = BrainSliceInferer(sw_batch_size=4)(volume, network)
        actual = inferer(volume, network)
        inferer(volume, network)
    assert len(exports) == 1, "the same weights are not exported again"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_onnxruntime_backend_exports_again_when_the_weights_change(trained_like_network):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    network = trained_like_network()
    volume = _volume_with_background()
    inferer = BrainSliceInferer(backend="onnxruntime")
    with torch.no_grad():
        before = inferer(volume, network)
        next(network.parameters()).mul_(0.5)
        after = inferer(volume, network)
        expected = BrainSliceInferer()(volume, network)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        BrainSliceInferer(backend="tensorrt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_empty_output_has_the_shape_dtype_and_device_asked_for_and_is_writable(dtype):
    output = empty_output((2, 3, 4, 5, 6), torch.zeros(1, dtype=dtype))
    assert (output.shape, output.dtype, output.device) == ((2, 3, 4, 5, 6), dtype, torch.device("cpu"))
    assert output.is_contiguous()
    output.fill_(1.5)
    assert torch.equal(output, torch.full_like(output, 1.5))
