# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The benchmarked models: a network with the pre-processing, inferer and post-processing it is deployed with."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import decollate_batch, list_data_collate
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks.nets import SegResNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    SaveImaged,
)
from torch import nn

from scripts.brats_data import find_cases
from scripts.fast_inference import BrainSliceInferer
from tools.bundle_config import INFERENCE_CONFIGS, bundle_configs, load_config
from tools.flops import counting_conv_flops

__all__ = [
    "MODELS",
    "PEER_SEQUENCES",
    "TEACHER_CHANNELS",
    "BenchmarkModel",
    "InferenceRuns",
    "bundle_model",
    "inference_runs",
    "peer_model",
    "volume_gflops",
]

# model key -> name in the reports
MODELS = {
    "student": "Student (SeparableUNet 16-256, 2D)",
    "student_plain": "Student, plain SliceInferer (before the fast path)",
    "student_onnxruntime": "Student, fast path on ONNX Runtime",
    "teacher": "Teacher (SeparableUNet 64-1024, 2D)",
    "segresnet": "SegResNet (Model Zoo brats_mri_segmentation, 3D)",
}
TEACHER_CHANNELS = [64, 128, 256, 512, 1024]
SLICE_SIZE = 128  # side of the slice the 2D networks' GFLOPs are reported for
PEER_SEQUENCES = ("flair", "t1", "t1ce", "t2")
PLAIN_INFERER = {"_target_": "SliceInferer", "roi_size": [-1, -1], "spatial_dim": 2, "sw_batch_size": 32}


@dataclasses.dataclass
class BenchmarkModel:
    """A network (random weights, eval mode) as deployed, with its case and the input its GFLOPs are quoted for."""

    network: nn.Module
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]]
    inferer: Inferer
    postprocessing: Callable[[dict[str, Any]], Any]
    case: dict[str, Any]
    nominal_input: tuple[int, ...]
    nominal_unit: str


@dataclasses.dataclass
class InferenceRuns:
    """The two timed calls of a model: the preprocessed case through the inferer, and NIfTI files to NIfTI label."""

    network: Callable[[], None]
    end_to_end: Callable[[], None]


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Autocast on ``device`` when ``amp``, else nothing."""
    return torch.autocast(device.type) if amp else contextlib.nullcontext()


def bundle_model(
    bundle_root: str,
    dataset_dir: str,
    output_dir: str,
    device: torch.device,
    channels: list[int] | None = None,
    plain_inferer: bool = False,
    backend: str | None = None,
) -> BenchmarkModel:
    """``configs/inference.json``'s network (random weights), pre-processing, inferer, post-processing and first case.

    Args:
        bundle_root: the bundle root.
        dataset_dir: the folder of the benchmark case.
        output_dir: where the post-processing writes labels.
        device: where the network runs.
        channels: ``network_def#channels`` (the teacher's widths), or None for the deployed student.
        plain_inferer: MONAI's ``SliceInferer`` (32 slices a batch) instead of the fast ``BrainSliceInferer``.
        backend: ``inference_backend``, or None for the config's.

    Returns:
        the model.
    """
    overrides: dict[str, Any] = {"output_dir": output_dir, "device": f"$torch.device('{device}')"}
    if channels is not None:
        overrides["network_def#channels"] = channels
    if plain_inferer:
        overrides["inferer"] = PLAIN_INFERER
    if backend is not None:
        overrides["inference_backend"] = backend
    parser = load_config(bundle_configs(bundle_root, INFERENCE_CONFIGS), bundle_root, dataset_dir, overrides)
    return BenchmarkModel(
        network=parser.get_parsed_content("network").eval(),
        preprocessing=parser.get_parsed_content("preprocessing"),
        inferer=parser.get_parsed_content("inferer"),
        postprocessing=parser.get_parsed_content("postprocessing"),
        case=parser.get_parsed_content("datalist")[0],
        nominal_input=(1, len(parser.get_parsed_content("modalities")), SLICE_SIZE, SLICE_SIZE),
        nominal_unit=f"{SLICE_SIZE}x{SLICE_SIZE} slice",
    )


def peer_model(dataset_dir: str, output_dir: str, device: torch.device, roi_size: Sequence[int]) -> BenchmarkModel:
    """The Model Zoo ``brats_mri_segmentation`` SegResNet (random weights) with its inferer and pre/post-processing.

    Args:
        dataset_dir: the folder of the benchmark case (four sequences).
        output_dir: where the post-processing writes labels.
        device: where the network runs.
        roi_size: the sliding window.

    Returns:
        the model.
    """
    case = find_cases(dataset_dir, PEER_SEQUENCES, require_label=False)[0]
    network = SegResNet(
        blocks_down=[1, 2, 2, 4],
        blocks_up=[1, 1, 1],
        init_filters=16,
        in_channels=len(PEER_SEQUENCES),
        out_channels=3,
        dropout_prob=0.2,
    )
    return BenchmarkModel(
        network=network.to(device).eval(),
        preprocessing=Compose(
            [
                LoadImaged(keys="image", image_only=True),
                EnsureChannelFirstd(keys="image"),
                NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            ]
        ),
        inferer=SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=1, overlap=0.5),
        postprocessing=Compose(
            [
                Activationsd(keys="pred", sigmoid=True),
                AsDiscreted(keys="pred", threshold=0.5),
                SaveImaged(
                    keys="pred",
                    output_dir=output_dir,
                    output_postfix="seg",
                    output_dtype=np.uint8,
                    separate_folder=False,
                    resample=False,
                    print_log=False,
                ),
            ]
        ),
        case={"image": case["image"]},
        nominal_input=(1, len(PEER_SEQUENCES), *roi_size),
        nominal_unit="x".join(str(n) for n in roi_size) + " window",
    )


def preprocessed_image(model: BenchmarkModel, device: torch.device) -> torch.Tensor:
    """The model's case after its pre-processing, batched, as a plain tensor on ``device``."""
    return list_data_collate([model.preprocessing(model.case)])["image"].as_tensor().to(device)


def inference_runs(model: BenchmarkModel, device: torch.device, amp: bool) -> InferenceRuns:
    """The network-only and end-to-end runs of one model on its case.

    Args:
        model: the model.
        device: where it runs.
        amp: run under autocast.

    Returns:
        the two calls; the network-only one reuses one pre-processed image.
    """
    image = preprocessed_image(model, device)

    def network_only() -> None:
        with torch.no_grad(), autocast(device, amp):
            model.inferer(image, model.network)

    def end_to_end() -> None:
        batch = list_data_collate([model.preprocessing(model.case)])
        inputs = batch["image"].to(device)
        with torch.no_grad(), autocast(device, amp):
            pred = model.inferer(inputs, model.network)
        for item in decollate_batch({"image": inputs, "pred": pred}):
            model.postprocessing(item)

    return InferenceRuns(network=network_only, end_to_end=end_to_end)


def volume_gflops(model: BenchmarkModel, device: torch.device, amp: bool) -> float:
    """GFLOPs of the convolutions one network-only run of ``model`` computes on its case.

    The count runs the model's own network: a ``BrainSliceInferer`` runs a prepared copy with other modules (a
    ``SeparableUNet`` becomes a ``SeparableUNetForInference``, or an ONNX Runtime session that runs no PyTorch hooks),
    so it is counted with the preparation turned off, which feeds the network the same slices, batches and crops.

    Args:
        model: the model; its inferer is left as it is.
        device: where it runs.
        amp: run under autocast.

    Returns:
        2 x the multiply-adds of the convolutions, / 1e9.
    """
    inferer = model.inferer
    if isinstance(inferer, BrainSliceInferer):
        inferer = copy.copy(inferer)
        inferer.fold_bn, inferer.channels_last, inferer.backend = False, False, "torch"
    with counting_conv_flops(model.network) as macs:
        inference_runs(dataclasses.replace(model, inferer=inferer), device, amp).network()
    return 2 * macs[0] / 1e9
