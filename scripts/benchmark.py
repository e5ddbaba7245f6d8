# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Speed, memory and cost of the student, the teacher and MONAI's BraTS SegResNet, measured in one process.

All figures come from one real-sized four-sequence case (the shared BraTS sample when present, else a synthetic
240 x 240 x 155 one) on one device, with random weights (weights do not change the timing):

- inference latency per volume, network only (the preprocessed tensor through the inferer) and end to end (NIfTI
  files in, NIfTI label out), median over ``repeats`` rounds in which the models take turns, each timed on the
  second of two runs in a row (so that the machine's drift hits all alike, and each model is timed in its own
  steady state; speed ratios are the medians of the ratios within each round), and
  the peak memory of one more run; the teacher runs at its fastest slice batch size, the student at the deployed one;
- parameters, GFLOPs (per 128 x 128 slice for the 2D networks, per 240 x 240 x 160 window for SegResNet) and the
  achieved GFLOP/s against the practical peak of the device (a large float32 matmul, timed in every round);
- training throughput (slices per second) of teacher training, student-alone training and online distillation.

The 2D networks run exactly as ``configs/inference.json`` deploys them (its preprocessing, ``BrainSliceInferer`` and
post-processing with the atomic writer); the peer is the Model Zoo ``brats_mri_segmentation`` bundle's network
and ``SlidingWindowInferer``. Results go to ``output_dir``: ``benchmark.json``, ``benchmark.md`` (printed at the
end) and ``benchmark.png``. Example::

    python -m scripts.benchmark --output_dir docs/benchmark --repeats 5
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fire
import matplotlib
import monai
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
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
from tqdm import tqdm

from scripts.atomic_files import atomic_path, write_text_atomic
from scripts.brats_data import find_cases
from scripts.checkpoints import CheckpointMismatchError, check_network_checkpoint
from scripts.compare_models import load_config
from scripts.fast_inference import BrainSliceInferer, has_onnxruntime
from scripts.flops import conv_gflops, counting_conv_flops
from scripts.soft_labels import soft_labels_from_logits
from scripts.synthetic_brats import write_synthetic_dataset

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = ["MODELS", "benchmark", "main", "matmul_gflops_per_s", "paired_ratio", "peak_memory_mib", "volume_gflops"]

DEFAULT_CASE_DIR = os.path.join("..", "shared", "data", "brats_sample", "TCGA-DU-7294")
SYNTHETIC_SHAPE = (240, 240, 155)
QUICK_SHAPE = (32, 32, 16)
TEACHER_CHANNELS = [64, 128, 256, 512, 1024]
SLICE_SIZE = 128  # side of the slice the 2D networks' GFLOPs are reported for
PEER_ROI = (240, 240, 160)  # the Model Zoo brats_mri_segmentation bundle's sliding window
PEER_DIVISOR = 8  # SegResNet with 4 down levels needs every side of its input divisible by 2 ** 3
PEER_SEQUENCES = ("flair", "t1", "t1ce", "t2")
MATMUL_SIZE, QUICK_MATMUL_SIZE = 2048, 256
MATMUL_REPEATS = 3  # products per matmul measurement (median), one measurement per inference round
TEACHER_BATCH_SIZES = (1, 2, 4, 8)  # slice batch sizes tried for the teacher
TRAIN_BATCH, TRAIN_PATCH = 16, 128
QUICK_TRAIN_BATCH, QUICK_TRAIN_PATCH = 2, 16
# model key -> name in the reports
MODELS = {
    "student": "Student (SeparableUNet 16-256, 2D)",
    "student_plain": "Student, plain SliceInferer (before the fast path)",
    "student_onnxruntime": "Student, fast path on ONNX Runtime",
    "teacher": "Teacher (SeparableUNet 64-1024, 2D)",
    "segresnet": "SegResNet (Model Zoo brats_mri_segmentation, 3D)",
}
PLAIN_INFERER = {"_target_": "SliceInferer", "roi_size": [-1, -1], "spatial_dim": 2, "sw_batch_size": 32}
TRAINING_MODES = {
    "teacher": "Teacher training",
    "student_alone": "Student alone",
    "distillation": "Online distillation (student + frozen teacher)",
    "distillation_cached": "Distillation from cached soft labels",
}
EPOCH_NAMES = {
    "student_alone": "Student alone (kd_weight 0)",
    "distillation_online": "Online distillation (soft_labels online)",
    "distillation_cached": "Distillation from cached soft labels (soft_labels cached)",
}
# configs/distill.json overrides of the per-epoch comparison
EPOCH_MODES = {
    "student_alone": {"kd_weight": 0.0, "soft_labels": "online"},
    "distillation_online": {"soft_labels": "online"},
    "distillation_cached": {"soft_labels": "cached"},
}
MEMORY_METHOD = {
    "cpu": (
        "peak resident set size (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) minus the resident "
        "size just before the run, after gc and malloc_trim; it includes allocator slack and counts memory the "
        "process already held only once, so it is the extra RAM the run needed, not the bytes torch allocated"
    ),
    "cuda": "torch.cuda.max_memory_allocated minus the memory allocated before the run (tensors only, no cache)",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(run: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Wall time of ``repeats`` calls of ``run`` in seconds (the device synchronised before each clock reading)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS, so later allocations show in RSS."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field} line.")


def peak_memory_mib(run: Callable[[], Any], device: torch.device) -> float | None:
    """Extra memory one call of ``run`` needed at its peak, in MiB (see ``MEMORY_METHOD`` for what is counted).

    Args:
        run: the call to measure.
        device: ``cpu`` (peak RSS increase, Linux only) or ``cuda`` (``torch.cuda.max_memory_allocated``).

    Returns:
        the peak increase in MiB, or None on a CPU whose OS cannot reset the peak RSS (not Linux); ``run`` is called
        once either way.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        before = _status_kib("VmRSS")
    except OSError:
        run()
        return None
    run()
    return (_status_kib("VmHWM") - before) / 1024


def matmul_gflops_per_s(size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Practical float32 peak of the device: GFLOP/s of a ``size`` x ``size`` by ``size`` x ``size`` matmul.

    Args:
        size: side of the square matrices.
        repeats: timed products after one warm-up product; the median is reported.
        device: where the product runs.

    Returns:
        ``size``, ``median_s`` and ``gflops_per_s`` (``2 * size**3 / 1e9 / median_s``).
    """
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    torch.mm(a, b)
    median = statistics.median(_timed_runs(lambda: torch.mm(a, b), repeats, device))
    return {"size": size, "median_s": median, "gflops_per_s": 2 * size**3 / 1e9 / median}


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type) if amp else contextlib.nullcontext()


def _bundle_model(
    bundle_root: str,
    dataset_dir: str,
    output_dir: str,
    device: torch.device,
    channels: list[int] | None,
    plain_inferer: bool = False,
    backend: str | None = None,
) -> dict[str, Any]:
    """``configs/inference.json``'s network (random weights), preprocessing, inferer, post-processing and case.

    ``plain_inferer`` swaps the fast ``BrainSliceInferer`` for MONAI's ``SliceInferer`` (32 slices a batch);
    ``backend`` sets ``inference_backend``.
    """
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, "configs", "inference.json"))
    parser["bundle_root"] = bundle_root
    parser["dataset_dir"] = dataset_dir
    parser["output_dir"] = output_dir
    parser["device"] = f"$torch.device('{device}')"
    if channels is not None:
        parser["network_def#channels"] = channels
    if plain_inferer:
        parser["inferer"] = PLAIN_INFERER
    if backend is not None:
        parser["inference_backend"] = backend
    return {
        "network": parser.get_parsed_content("network").eval(),
        "preprocessing": parser.get_parsed_content("preprocessing"),
        "inferer": parser.get_parsed_content("inferer"),
        "postprocessing": parser.get_parsed_content("postprocessing"),
        "case": parser.get_parsed_content("datalist")[0],
        "nominal_input": (1, len(parser.get_parsed_content("modalities")), SLICE_SIZE, SLICE_SIZE),
        "nominal_unit": f"{SLICE_SIZE}x{SLICE_SIZE} slice",
    }


def _peer_model(dataset_dir: str, output_dir: str, device: torch.device, roi_size: Sequence[int]) -> dict[str, Any]:
    """The Model Zoo ``brats_mri_segmentation`` SegResNet (random weights) with its inferer and pre/post-processing."""
    case = find_cases(dataset_dir, PEER_SEQUENCES, require_label=False)[0]
    network = SegResNet(
        blocks_down=[1, 2, 2, 4],
        blocks_up=[1, 1, 1],
        init_filters=16,
        in_channels=len(PEER_SEQUENCES),
        out_channels=3,
        dropout_prob=0.2,
    )
    return {
        "network": network.to(device).eval(),
        "preprocessing": Compose(
            [
                LoadImaged(keys="image", image_only=True),
                EnsureChannelFirstd(keys="image"),
                NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            ]
        ),
        "inferer": SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=1, overlap=0.5),
        "postprocessing": Compose(
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
        "case": {"image": case["image"]},
        "nominal_input": (1, len(PEER_SEQUENCES), *roi_size),
        "nominal_unit": "x".join(str(n) for n in roi_size) + " window",
    }


def _inference_runs(model: dict[str, Any], device: torch.device, amp: bool) -> dict[str, Callable[[], None]]:
    """The network-only and end-to-end runs of one model on its case."""
    network: nn.Module = model["network"]
    inferer: Inferer = model["inferer"]
    preprocessing, postprocessing, case = model["preprocessing"], model["postprocessing"], model["case"]
    image = list_data_collate([preprocessing(case)])["image"].as_tensor().to(device)

    def network_only() -> None:
        with torch.no_grad(), _autocast(device, amp):
            inferer(image, network)

    def end_to_end() -> None:
        batch = list_data_collate([preprocessing(case)])
        inputs = batch["image"].to(device)
        with torch.no_grad(), _autocast(device, amp):
            pred = inferer(inputs, network)
        for item in decollate_batch({"image": inputs, "pred": pred}):
            postprocessing(item)

    return {"network": network_only, "end_to_end": end_to_end}


def volume_gflops(model: dict[str, Any], device: torch.device, amp: bool) -> float:
    """GFLOPs of the convolutions one network-only run of ``model`` computes on its case.

    The count runs the model's own network: a ``BrainSliceInferer`` runs a prepared copy with other modules (a
    ``SeparableUNet`` becomes a ``SeparableUNetForInference``), so it is counted with the preparation turned off,
    which feeds the network the same slices, batches and crops.

    Args:
        model: a model of the benchmark (its ``network``, ``inferer``, ``preprocessing`` and ``case``).
        device: where it runs.
        amp: run under autocast.

    Returns:
        2 x the multiply-adds of the convolutions, / 1e9.
    """
    inferer = model["inferer"]
    if isinstance(inferer, BrainSliceInferer):
        inferer = copy.copy(inferer)
        inferer.fold_bn, inferer.channels_last, inferer.backend = False, False, "torch"
    with counting_conv_flops(model["network"]) as macs:
        _inference_runs({**model, "inferer": inferer}, device, amp)["network"]()
    return 2 * macs[0] / 1e9


def _fastest_batch_size(
    model: dict[str, Any], candidates: Sequence[int], device: torch.device, amp: bool
) -> dict[str, Any]:
    """Set the model's ``BrainSliceInferer`` to its fastest slice batch size among ``candidates``.

    One timed network-only run each, after one warm-up run; used for the teacher, so that the student is compared
    with the teacher at its best rather than at the student's setting.

    Returns:
        ``sw_batch_size`` (the one set) and ``sweep_s``, the time of each candidate.
    """
    run = _inference_runs(model, device, amp)["network"]
    inferer = model["inferer"]
    run()  # warm-up
    times = {}
    for batch_size in candidates:
        inferer.sw_batch_size = batch_size
        times[batch_size] = _timed_runs(run, 1, device)[0]
    inferer.sw_batch_size = min(times, key=times.get)
    return {"sw_batch_size": inferer.sw_batch_size, "sweep_s": {str(size): t for size, t in times.items()}}


def _benchmark_inference(
    models: dict[str, dict[str, Any]],
    repeats: int,
    device: torch.device,
    amp: bool,
    progress: tqdm,
    matmul_size: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Network-only and end-to-end latency, peak memory and FLOPs of every model on its case, and the matmul peak.

    After one warm-up run of each kind per model, the models take turns (``repeats`` rounds), so that the machine's
    speed drifting during the benchmark affects every model alike and the ratios stay fair. In its turn a model runs
    twice and the second run is timed: a run straight after another model's is slower for the allocator's state
    (the student by about 20% after the teacher), while a deployed model runs volume after volume. In each
    network-only round the matmul peak is measured too, so that the achieved fraction of it compares like with like
    on a machine whose speed varies.
    """
    runs = {key: _inference_runs(model, device, amp) for key, model in models.items()}
    results: dict[str, dict[str, Any]] = {}
    for key, model in models.items():
        network = model["network"]
        gflops_volume = volume_gflops(model, device, amp)  # the network-only warm-up, unless the inferer prepares
        if isinstance(model["inferer"], BrainSliceInferer):
            runs[key]["network"]()  # warm-up of the prepared network the timed runs use
        runs[key]["end_to_end"]()  # warm-up
        progress.update(2)
        results[key] = {
            "parameters": sum(p.numel() for p in network.parameters()),
            "gflops_nominal": conv_gflops(network, model["nominal_input"]),
            "nominal_unit": model["nominal_unit"],
            "gflops_volume": gflops_volume,
        }
    matmul_runs = []
    for kind in ("network", "end_to_end"):
        for key in models:
            results[key][f"{kind}_runs_s"] = []
        for _ in range(repeats):
            for key in models:
                runs[key][kind]()  # untimed: the timed run then finds the memory state this model leaves behind
                results[key][f"{kind}_runs_s"] += _timed_runs(runs[key][kind], 1, device)
                progress.update()
            if kind == "network":
                matmul_runs.append(matmul_gflops_per_s(matmul_size, MATMUL_REPEATS, device)["gflops_per_s"])
        for key in models:
            results[key][f"{kind}_s"] = statistics.median(results[key][f"{kind}_runs_s"])
            results[key][f"{kind}_peak_mib"] = peak_memory_mib(runs[key][kind], device)
            progress.update()
    matmul = {"size": matmul_size, "runs_gflops_per_s": matmul_runs, "gflops_per_s": statistics.median(matmul_runs)}
    for result in results.values():
        result["achieved_gflops_per_s"] = result["gflops_volume"] / result["network_s"]
    return results, matmul


def paired_ratio(slower_runs_s: Sequence[float], faster_runs_s: Sequence[float]) -> float:
    """Median over rounds of ``slower / faster``, the two runs of a round having run back to back.

    Args:
        slower_runs_s: one model's times, round by round.
        faster_runs_s: the other model's times, same rounds.

    Returns:
        the median of the per-round ratios.
    """
    return statistics.median(slower / faster for slower, faster in zip(slower_runs_s, faster_runs_s, strict=True))


def _onnxruntime_model(
    bundle_root: str, dataset_dir: str, output_dir: str, device: torch.device, student: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The student through the fast path's ONNX Runtime backend, same weights; none where it cannot run."""
    if device.type != "cpu" or not has_onnxruntime:
        return {}
    model = _bundle_model(bundle_root, dataset_dir, output_dir, device, None, backend="onnxruntime")
    model["network"] = student["network"]
    return {"student_onnxruntime": model}


def _fast_path_agreement(
    student: dict[str, Any], plain: dict[str, Any], bundle_root: str, device: torch.device
) -> dict[str, Any]:
    """How far the fast path's output is from the plain ``SliceInferer``'s, with the trained student if present.

    Uses ``models/model.pt`` of the bundle when it exists (a trained network exercises the crop's edge effects as
    deployed), else the benchmark's random weights; the network's own weights are restored afterwards.
    """
    network: nn.Module = student["network"]
    original = {name: value.clone() for name, value in network.state_dict().items()}
    checkpoint = Path(bundle_root) / "models" / "model.pt"
    weights = "random"
    if checkpoint.is_file():
        with contextlib.suppress(CheckpointMismatchError):
            network.load_state_dict(check_network_checkpoint(network, str(checkpoint)))
            weights = "trained models/model.pt"
    image = list_data_collate([student["preprocessing"](student["case"])])["image"].as_tensor().to(device)
    with torch.no_grad():
        fast = student["inferer"](image, network).float()
        reference = plain["inferer"](image, network).float()
    network.load_state_dict(original)
    brain = (image[0] != 0).any(dim=0)
    same = fast.argmax(dim=1)[0] == reference.argmax(dim=1)[0]
    return {
        "weights": weights,
        "max_abs_logit_difference": float((fast - reference).abs().max()),
        "label_agreement": float(same.float().mean()),
        "label_agreement_brain": float(same[brain].float().mean()) if bool(brain.any()) else 1.0,
    }


def _training_setup(
    config_file: str | list[str], bundle_root: str, device: torch.device, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, ConfigParser]:
    """A training config's network (random weights, train mode), optimizer and loss."""
    parser = load_config(config_file, bundle_root, bundle_root, overrides)
    parser["device"] = f"$torch.device('{device}')"
    network = parser.get_parsed_content("network").train()
    return network, parser.get_parsed_content("optimizer"), parser.get_parsed_content("loss"), parser


def _benchmark_training(
    bundle_root: str, batch: int, patch: int, iterations: int, device: torch.device, amp: bool, progress: tqdm
) -> dict[str, Any]:
    """Seconds per iteration and slices per second of teacher, student-alone and distillation training."""
    train_json, teacher_json, distill_json = (
        os.path.join(bundle_root, "configs", name) for name in ("train.json", "teacher.json", "distill.json")
    )
    setups = {
        "teacher": _training_setup([train_json, teacher_json], bundle_root, device),
        "student_alone": _training_setup(distill_json, bundle_root, device, {"kd_weight": 0.0}),
        "distillation": _training_setup(distill_json, bundle_root, device),
        "distillation_cached": _training_setup(distill_json, bundle_root, device),
    }
    distill_parser = setups["distillation"][3]
    teacher = distill_parser.get_parsed_content("teacher_def").to(device).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    in_channels = len(distill_parser.get_parsed_content("modalities"))
    num_classes = distill_parser.get_parsed_content("num_classes")
    images = torch.randn(batch, in_channels, patch, patch, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch, 1, patch, patch), generator=generator).to(device)
    with torch.no_grad():  # what the cache hands the loss: the teacher's softened probabilities, float16
        temperature = distill_parser.get_parsed_content("temperature")
        cached_probs = soft_labels_from_logits(teacher(images), temperature).half()

    results: dict[str, Any] = {"batch": batch, "patch_size": patch, "iterations": iterations}
    for mode, (network, optimizer, loss_function, _) in setups.items():
        scaler = torch.amp.GradScaler(device.type, enabled=amp)

        def step(network=network, optimizer=optimizer, loss_function=loss_function, scaler=scaler, mode=mode) -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                if mode == "teacher":
                    loss = loss_function(network(images), labels)
                elif mode == "distillation_cached":  # as FrozenTeacherHandler with cached soft labels
                    loss = loss_function(network(images), labels, None, teacher_probs=cached_probs)
                else:  # as FrozenTeacherHandler online: the teacher on the same batch, unless kd_weight is 0
                    with torch.no_grad():
                        teacher_logits = teacher(images) if mode == "distillation" else None
                    loss = loss_function(network(images), labels, teacher_logits)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        step()  # warm-up
        runs = _timed_runs(step, iterations, device)
        progress.update(1 + iterations)
        seconds = statistics.median(runs)
        results[mode] = {
            "iteration_s": seconds,
            "iteration_runs_s": runs,
            "slices_per_s": batch / seconds,
            "parameters": sum(p.numel() for p in network.parameters()),  # of the network being trained
        }
    for mode in ("distillation", "distillation_cached"):
        results[f"{mode}_over_student_alone"] = results[mode]["iteration_s"] / results["student_alone"]["iteration_s"]
    return results


class _EpochTimer:
    """Ignite handler recording the wall time of every epoch of a trainer (validation excluded by the caller)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine: Any) -> None:
        self._start = time.perf_counter()

    def _completed(self, engine: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _benchmark_epochs(
    bundle_root: str,
    dataset_dir: str,
    workdir: Path,
    epochs: int,
    patch: int,
    device: torch.device,
    amp: bool,
    progress: tqdm,
) -> dict[str, Any]:
    """Time per training epoch of ``configs/distill.json`` as users run it: student alone, online and cached KD.

    Each mode runs the real trainer (data pipeline and augmentation included, ``cache_rate`` 1, no validation) on the
    benchmark case with a random-weight teacher checkpoint, the three taking turns epoch by epoch for ``epochs``
    epochs; the first epoch is a warm-up.
    Building the training dataset is timed apart: in cached mode it includes the teacher's one pass per case.
    """
    distill_json = os.path.join(bundle_root, "configs", "distill.json")
    teacher_ckpt = workdir / "teacher.pt"
    teacher = load_config(distill_json, bundle_root, dataset_dir).get_parsed_content("teacher_def")
    torch.save(teacher.state_dict(), teacher_ckpt)
    common = {
        "device": f"$torch.device('{device}')",
        "amp": amp,
        "epochs": epochs,
        "val_interval": epochs + 1,
        "teacher_validation": False,
        "teacher_ckpt": str(teacher_ckpt),
        "patch_size": patch,
        "cache_rate": 1.0,
        "num_workers": 0,
        "ckpt_dir": str(workdir / "epoch_models"),
        "log_dir": str(workdir / "epoch_runs"),
        "soft_label_dir": str(workdir / "soft_labels"),
    }
    results: dict[str, Any] = {"epochs": epochs, "patch_size": patch}
    trainers, timers = {}, {}
    for mode, overrides in EPOCH_MODES.items():
        parser = load_config(distill_json, bundle_root, dataset_dir, {**common, **overrides})
        start = time.perf_counter()
        dataset = parser.get_parsed_content("train#dataset")
        results[mode] = {
            "dataset_build_s": time.perf_counter() - start,
            "train_cases": len(dataset),
            "patches_per_epoch": len(dataset) * parser.get_parsed_content("patches_per_case"),
        }
        trainers[mode], timers[mode] = parser.get_parsed_content("train#trainer"), _EpochTimer()
        timers[mode].attach(trainers[mode])
    for epoch in range(1, epochs + 1):  # the modes take turns, epoch by epoch, so the machine's drift hits all alike
        for trainer in trainers.values():
            trainer.state.max_epochs = epoch  # run() then resumes for one more epoch
            trainer.run()
        progress.update()
    for mode, timer in timers.items():
        steady = timer.seconds[1:] or timer.seconds
        results[mode].update({"epoch_s": statistics.median(steady), "epoch_runs_s": timer.seconds})
    for mode in ("distillation_online", "distillation_cached"):
        results[f"{mode}_over_student_alone"] = results[mode]["epoch_s"] / results["student_alone"]["epoch_s"]
    results["soft_label_pass_s"] = (
        results["distillation_cached"]["dataset_build_s"] - results["student_alone"]["dataset_build_s"]
    )
    return results


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _machine(device: torch.device, amp: bool) -> dict[str, Any]:
    machine = {
        "device": str(device),
        "amp": amp,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _markdown(results: dict[str, Any]) -> str:
    """The report: context line, inference table, ratios, training table and how each figure was measured."""
    machine, case, matmul, training = results["machine"], results["case"], results["matmul"], results["training"]
    device = machine.get("gpu", machine["cpu_model"])
    lines = [
        f"Measured {results['date_utc']} on {machine['device']} ({device}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads{', AMP' if machine['amp'] else ''}), torch "
        f"{machine['torch_version']}, MONAI {machine['monai_version']}; case {case['source']} "
        f"({'x'.join(str(n) for n in case['shape'])}), median of {results['repeats']} rounds after one warm-up, the "
        "models taking turns and each timed on the second of two runs in a row, random weights.",
        "",
        "| Model | Parameters | GFLOPs (unit) | GFLOPs / volume | Network only (s) | End to end (s) "
        "| Peak MiB network | Peak MiB end to end | Achieved GFLOP/s | % of matmul peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, model in results["models"].items():
        lines.append(
            f"| {MODELS[key]} | {model['parameters']:,} | {model['gflops_nominal']:.2f} ({model['nominal_unit']}) "
            f"| {model['gflops_volume']:,.1f} | {model['network_s']:.3f} | {model['end_to_end_s']:.3f} "
            f"| {_mib(model['network_peak_mib'])} | {_mib(model['end_to_end_peak_mib'])} "
            f"| {model['achieved_gflops_per_s']:.1f} | {100 * model['fraction_of_matmul_peak']:.1f} |"
        )
    ratios, agreement, teacher_batch = results["ratios"], results["fast_path_agreement"], results["teacher_batch_size"]
    lines += [
        "",
        f"Student speed-up: {ratios['segresnet_over_student_network']:.2f}x over SegResNet and "
        f"{ratios['teacher_over_student_network']:.2f}x over the teacher (network only); "
        f"{ratios['segresnet_over_student_end_to_end']:.2f}x and {ratios['teacher_over_student_end_to_end']:.2f}x "
        f"end to end (medians of the ratios within each round, the models having run back to back). Practical peak: "
        f"{matmul['gflops_per_s']:.1f} GFLOP/s (float32 {matmul['size']}x{matmul['size']} matmul, median of one "
        f"measurement per network-only round; range {min(matmul['runs_gflops_per_s']):.1f} to "
        f"{max(matmul['runs_gflops_per_s']):.1f}).",
        "",
        f"Slices per forward pass: the student {results['student_batch_size']} (`infer_batch_size`, as deployed); "
        f"the teacher {teacher_batch['sw_batch_size']}, its fastest of "
        + ", ".join(f"{size} ({seconds:.2f} s)" for size, seconds in teacher_batch["sweep_s"].items())
        + " in one network-only run each.",
        "",
        f"Fast path (`BrainSliceInferer`, as `configs/inference.json` deploys the student): "
        f"{ratios['student_plain_over_student_network']:.2f}x faster than the plain `SliceInferer` (network only), "
        f"{ratios['student_plain_over_student_end_to_end']:.2f}x end to end; with {agreement['weights']} weights "
        f"its labels agree with the plain path's on {100 * agreement['label_agreement']:.3f}% of the voxels "
        f"({100 * agreement['label_agreement_brain']:.3f}% of the brain voxels), largest logit difference "
        f"{agreement['max_abs_logit_difference']:.3g}.",
        "",
    ]
    if "segresnet_over_student_onnxruntime_network" in ratios:
        lines += [
            "With the optional ONNX Runtime backend (`--inference_backend onnxruntime`): "
            f"{ratios['segresnet_over_student_onnxruntime_network']:.2f}x faster than SegResNet and "
            f"{ratios['teacher_over_student_onnxruntime_network']:.2f}x faster than the teacher (network only); "
            f"{ratios['segresnet_over_student_onnxruntime_end_to_end']:.2f}x and "
            f"{ratios['teacher_over_student_onnxruntime_end_to_end']:.2f}x end to end.",
            "",
        ]
    lines += [
        f"| Training ({training['batch']} patches of {training['patch_size']}x{training['patch_size']}) "
        "| s / iteration | slices / s |",
        "| --- | ---: | ---: |",
    ]
    for mode, name in TRAINING_MODES.items():
        lines.append(f"| {name} | {training[mode]['iteration_s']:.3f} | {training[mode]['slices_per_s']:.1f} |")
    epochs = results["epochs"]
    lines += [
        "",
        f"Distillation / student-alone time per iteration: {training['distillation_over_student_alone']:.2f} online, "
        f"{training['distillation_cached_over_student_alone']:.2f} from cached soft labels.",
        "",
        f"| Training epoch (`configs/distill.json`, {epochs['student_alone']['train_cases']} case(s), "
        f"{epochs['student_alone']['patches_per_epoch']} patches of {epochs['patch_size']}x{epochs['patch_size']}) "
        "| s / epoch | vs student alone | building the training data (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode, name in EPOCH_NAMES.items():
        ratio = epochs[mode]["epoch_s"] / epochs["student_alone"]["epoch_s"]
        lines.append(
            f"| {name} | {epochs[mode]['epoch_s']:.3f} | {ratio:.2f}x | {epochs[mode]['dataset_build_s']:.1f} |"
        )
    lines += [
        "",
        "Cached soft labels: one teacher pass per case when the training data is built "
        f"({epochs['soft_label_pass_s']:.1f} s more than for the student alone here), then each epoch costs "
        f"{epochs['distillation_cached_over_student_alone']:.2f}x the student alone "
        f"(online distillation: {epochs['distillation_online_over_student_alone']:.2f}x).",
        "",
        "Network only: the preprocessed volume through the inferer (student and teacher: `configs/inference.json`'s "
        "`BrainSliceInferer` with its defaults for the device, i.e. the network as `SeparableUNetForInference` "
        "(BatchNorm folded, no decoder concatenation), channels-last, slices without "
        "brain skipped, each batch of brain slices cropped to its brain's box plus `crop_margin` voxels; plain "
        "student: MONAI's `SliceInferer`, 32 slices a batch, on the `DivisiblePad`ded volume; SegResNet: "
        "`SlidingWindowInferer`, one window a batch, overlap 0.5). End to end: NIfTI files in, NIfTI label out "
        "(`configs/inference.json`'s preprocessing, inferer and post-processing with the atomic writer; for "
        "SegResNet: load the 4 sequences, z-score, inferer, sigmoid, threshold, save). GFLOPs: 2 x multiply-adds of "
        "the convolutions; per volume, counted in one run of the model's own network on the slices, batches and crops "
        "its inferer makes (the work actually done: padding and overlapping windows included, skipped slices and "
        "cropped voxels not). Achieved GFLOP/s: volume GFLOPs / "
        "network-only latency. Peak memory: "
        f"{MEMORY_METHOD[machine['device'].split(':')[0]]}. Training: {training['iterations']} timed iterations "
        "(Adam, configs' losses: DiceCE, distillation loss with the frozen teacher's forward pass) after one warm-up, "
        "same random batch for all (the cached mode gets the teacher's float16 probabilities of that batch). Epochs: "
        "the real trainer of `configs/distill.json` (augmentation included, no validation, random-weight teacher "
        f"checkpoint) for {epochs['epochs']} epochs; median of all but the first.",
    ]
    return "\n".join(lines) + "\n"


def _write_figure(path: Path, results: dict[str, Any]) -> None:
    """Grouped bars: network-only and end-to-end latency of each model, log scale."""
    models = results["models"]
    x = np.arange(len(models))
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    for offset, (key, label) in zip((-0.2, 0.2), (("network_s", "network only"), ("end_to_end_s", "end to end"))):
        values = [model[key] for model in models.values()]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f} s" for v in values], fontsize=8)
    ax.set_xticks(x, [textwrap.fill(MODELS[key], 22, break_long_words=False) for key in models], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency per volume (s, log scale)")
    shape = "x".join(str(n) for n in results["case"]["shape"])
    ax.set_title(f"Inference latency, {shape} volume, {results['machine']['device']}", fontsize=10)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _prepare_case(case_dir: str | None, quick: bool, bundle_root: str, workdir: Path) -> tuple[str, str]:
    """A dataset folder holding the one benchmark case, and where the case comes from."""
    dataset_dir = workdir / "data"
    if not quick:
        source = Path(case_dir) if case_dir is not None else Path(bundle_root) / DEFAULT_CASE_DIR
        if case_dir is not None and not source.is_dir():
            raise FileNotFoundError(f"case_dir {case_dir} is not a folder.")
        if source.is_dir():
            dataset_dir.mkdir()
            (dataset_dir / source.name).symlink_to(source.resolve(), target_is_directory=True)
            return str(dataset_dir), str(source)
    shape = QUICK_SHAPE if quick else SYNTHETIC_SHAPE
    write_synthetic_dataset(dataset_dir, num_cases=1, shape=shape)
    return str(dataset_dir), "synthetic " + "x".join(str(n) for n in shape)


def benchmark(
    output_dir: str,
    case_dir: str | None = None,
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
    amp: bool = False,
    bundle_root: str = ".",
) -> dict[str, Any]:
    """Measure the three models on one case in this process and write the reports; see the module docstring.

    Args:
        output_dir: folder of ``benchmark.json``, ``benchmark.md`` and ``benchmark.png``, created if needed.
        case_dir: a BraTS 2020/2021 or 2023 case folder (four sequences); default: the shared sample
            ``../shared/data/brats_sample/TCGA-DU-7294`` when present, else a synthetic 240 x 240 x 155 case.
        repeats: timed runs per measurement (and timed training iterations), after one warm-up.
        quick: a small synthetic 32 x 32 x 16 case, a 256 x 256 matmul, 2 training patches of 16 x 16 and
            SegResNet's window fitted to the volume, for tests; ``case_dir`` is then ignored.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        amp: mixed precision (autocast, and gradient scaling in training) on CUDA; ignored on CPU, as in the configs.
        bundle_root: the bundle root (its ``configs/`` are read).

    Returns:
        the results, as written to ``benchmark.json``, plus ``files``: the paths written.

    Raises:
        ValueError: if ``repeats`` < 1, the device is neither CPU nor CUDA, or CUDA is requested but not available.
        FileNotFoundError: if ``case_dir`` is given but is not a folder.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    torch_device = torch.device(device)
    if torch_device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}.")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here (torch {torch.__version__}).")
    amp = amp and torch_device.type == "cuda"  # as the configs' use_amp: ignored on CPU
    bundle_root = os.path.abspath(bundle_root)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(torch_device, amp),
        "repeats": repeats,
        "quick": quick,
    }
    with tempfile.TemporaryDirectory(prefix="brats_benchmark_") as tmp:
        workdir = Path(tmp)
        dataset_dir, source = _prepare_case(case_dir, quick, bundle_root, workdir)
        seg_dir = str(workdir / "segmentations")
        student = _bundle_model(bundle_root, dataset_dir, seg_dir, torch_device, None)
        shape = list(student["preprocessing"](student["case"])["image"].shape[1:])
        roi = [math.ceil(n / PEER_DIVISOR) * PEER_DIVISOR for n in shape] if quick else list(PEER_ROI)
        results["case"] = {"source": source, "shape": shape}
        plain = _bundle_model(bundle_root, dataset_dir, seg_dir, torch_device, None, plain_inferer=True)
        plain["network"] = student["network"]  # the same weights through both inferers
        models = {
            "student": student,
            "student_plain": plain,
            **_onnxruntime_model(bundle_root, dataset_dir, seg_dir, torch_device, student),
            "teacher": _bundle_model(bundle_root, dataset_dir, seg_dir, torch_device, TEACHER_CHANNELS),
            "segresnet": _peer_model(dataset_dir, seg_dir, torch_device, roi),
        }
        iterations = repeats
        epochs = 2 if quick else 3 * repeats + 1
        steps = len(models) * (2 * repeats + 4) + len(TRAINING_MODES) * (1 + iterations) + epochs + 1
        with tqdm(total=steps, desc="benchmark") as progress:
            results["fast_path_agreement"] = _fast_path_agreement(student, plain, bundle_root, torch_device)
            results["student_batch_size"] = student["inferer"].sw_batch_size
            progress.set_postfix_str("teacher batch size")
            results["teacher_batch_size"] = _fastest_batch_size(
                models["teacher"], TEACHER_BATCH_SIZES, torch_device, amp
            )
            progress.update()
            progress.set_postfix_str("inference")
            results["models"], results["matmul"] = _benchmark_inference(
                models, repeats, torch_device, amp, progress, QUICK_MATMUL_SIZE if quick else MATMUL_SIZE
            )
            progress.set_postfix_str("training")
            results["training"] = _benchmark_training(
                bundle_root,
                QUICK_TRAIN_BATCH if quick else TRAIN_BATCH,
                QUICK_TRAIN_PATCH if quick else TRAIN_PATCH,
                iterations,
                torch_device,
                amp,
                progress,
            )
            progress.set_postfix_str("epochs")
            results["epochs"] = _benchmark_epochs(
                bundle_root,
                dataset_dir,
                workdir,
                epochs,
                QUICK_TRAIN_PATCH if quick else TRAIN_PATCH,
                torch_device,
                amp,
                progress,
            )
    latency = results["models"]
    if "student_onnxruntime" in latency:  # ONNX Runtime runs no PyTorch hooks: it does the torch fast path's work
        onnx = latency["student_onnxruntime"]
        onnx["gflops_volume"] = latency["student"]["gflops_volume"]
        onnx["achieved_gflops_per_s"] = onnx["gflops_volume"] / onnx["network_s"]
    for model in latency.values():
        model["fraction_of_matmul_peak"] = model["achieved_gflops_per_s"] / results["matmul"]["gflops_per_s"]
    results["ratios"] = {
        f"{other}_over_{student}_{kind}": paired_ratio(
            latency[other][f"{kind}_runs_s"], latency[student][f"{kind}_runs_s"]
        )
        for student in ("student", "student_onnxruntime")
        if student in latency
        for other in ("segresnet", "teacher", "student_plain")
        for kind in ("network", "end_to_end")
    }
    results["memory_method"] = MEMORY_METHOD[torch_device.type]

    files = {name: output / f"benchmark.{name}" for name in ("json", "md", "png")}
    report = _markdown(results)
    write_text_atomic(files["json"], json.dumps(results, indent=4) + "\n")
    write_text_atomic(files["md"], report)
    _write_figure(files["png"], results)
    print(report)
    for path in files.values():
        print(f"written: {path}")
    return {**results, "files": {name: str(path) for name, path in files.items()}}


def main(
    output_dir: str = "docs/benchmark",
    case_dir: str | None = None,
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
    amp: bool = False,
    bundle_root: str = ".",
) -> None:
    """Command-line entry: benchmark student, teacher and SegResNet; see :func:`benchmark`.

    Args:
        output_dir: folder of the reports.
        case_dir: a four-sequence BraTS case folder; default the shared sample, else a synthetic case.
        repeats: timed runs per measurement, after one warm-up.
        quick: small synthetic case and workloads, for tests.
        device: ``cpu`` or ``cuda``.
        amp: mixed precision on CUDA; ignored on CPU.
        bundle_root: the bundle root.
    """
    benchmark(
        output_dir, case_dir=case_dir, repeats=repeats, quick=quick, device=device, amp=amp, bundle_root=bundle_root
    )


if __name__ == "__main__":
    fire.Fire(main)
