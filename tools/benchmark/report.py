# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""The benchmark's reports: ``benchmark.md`` (tables and how each figure was measured) and ``benchmark.png``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np

from scripts.atomic_files import atomic_path
from tools.benchmark.models import MODELS
from tools.benchmark.results import BenchmarkResults

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = ["markdown_report", "write_figure"]


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def markdown_report(results: BenchmarkResults) -> str:
    """The report: context line, inference table, speed-ups, training table and how each figure was measured.

    Args:
        results: a benchmark run's results (the student, its plain form, the teacher and SegResNet measured).

    Returns:
        markdown text.
    """
    machine, case, matmul = results.machine, results.case, results.matmul
    lines = [
        f"Measured {results.date_utc} on {machine.device} ({machine.gpu or machine.cpu_model}, {machine.cpu_count} "
        f"CPUs, {machine.torch_threads} torch threads{', AMP' if machine.amp else ''}), torch "
        f"{machine.torch_version}, MONAI {machine.monai_version}; case {case.source} "
        f"({'x'.join(str(n) for n in case.shape)}), median of {results.repeats} rounds after one warm-up, the "
        "models taking turns and each timed on the second of two runs in a row, random weights.",
        "",
        "| Model | Parameters | GFLOPs (unit) | GFLOPs / volume | Network only (s) | End to end (s) "
        "| Peak MiB network | Peak MiB end to end | Achieved GFLOP/s | % of matmul peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, model in results.models.items():
        lines.append(
            f"| {MODELS[key]} | {model.parameters:,} | {model.gflops_nominal:.2f} ({model.nominal_unit}) "
            f"| {model.gflops_volume:,.1f} | {model.network_s:.3f} | {model.end_to_end_s:.3f} "
            f"| {_mib(model.network_peak_mib)} | {_mib(model.end_to_end_peak_mib)} "
            f"| {model.achieved_gflops_per_s:.1f} | {100 * model.fraction_of_matmul_peak:.1f} |"
        )
    over_peer, over_teacher = results.speedup("student", "segresnet"), results.speedup("student", "teacher")
    fast_path, agreement = results.speedup("student", "student_plain"), results.fast_path_agreement
    sweep = results.teacher_batch_size
    lines += [
        "",
        f"Student speed-up: {over_peer.network:.2f}x over SegResNet and {over_teacher.network:.2f}x over the teacher "
        f"(network only); {over_peer.end_to_end:.2f}x and {over_teacher.end_to_end:.2f}x end to end (medians of the "
        f"ratios within each round, the models having run back to back). Practical peak: {matmul.gflops_per_s:.1f} "
        f"GFLOP/s (float32 {matmul.size}x{matmul.size} matmul, median of one measurement per network-only round; "
        f"range {min(matmul.runs_gflops_per_s):.1f} to {max(matmul.runs_gflops_per_s):.1f}).",
        "",
        f"Slices per forward pass: the student {results.student_batch_size} (`infer_batch_size`, as deployed); "
        f"the teacher {sweep.sw_batch_size}, its fastest of "
        + ", ".join(f"{size} ({seconds:.2f} s)" for size, seconds in sweep.sweep_s.items())
        + " in one network-only run each.",
        "",
        f"Fast path (`BrainSliceInferer`, as `configs/inference.json` deploys the student): {fast_path.network:.2f}x "
        f"faster than the plain `SliceInferer` (network only), {fast_path.end_to_end:.2f}x end to end; with "
        f"{agreement.weights} weights its labels agree with the plain path's on "
        f"{100 * agreement.label_agreement:.3f}% of the voxels ({100 * agreement.label_agreement_brain:.3f}% of the "
        f"brain voxels), largest logit difference {agreement.max_abs_logit_difference:.3g}.",
        "",
    ]
    if "student_onnxruntime" in results.models:
        onnx_peer = results.speedup("student_onnxruntime", "segresnet")
        onnx_teacher = results.speedup("student_onnxruntime", "teacher")
        lines += [
            "With the optional ONNX Runtime backend (`--inference_backend onnxruntime`): "
            f"{onnx_peer.network:.2f}x faster than SegResNet and {onnx_teacher.network:.2f}x faster than the teacher "
            f"(network only); {onnx_peer.end_to_end:.2f}x and {onnx_teacher.end_to_end:.2f}x end to end.",
            "",
        ]
    student_alone = results.training["student_alone"]
    lines += [
        f"| Training epoch ({student_alone.train_cases} case(s), {student_alone.patches_per_epoch} patches of "
        f"{results.training_patch_size}x{results.training_patch_size}) | s / epoch | slices / s | vs student alone "
        "| building the training data (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, epochs in results.training.items():
        lines.append(
            f"| {epochs.name} | {epochs.epoch_s:.3f} | {epochs.slices_per_s:.1f} "
            f"| {results.training_over_student_alone(key):.2f}x | {epochs.dataset_build_s:.1f} |"
        )
    cached = results.training["distillation_cached"]
    lines += [
        "",
        "Cached soft labels: one teacher pass per case when the training data is built "
        f"({cached.dataset_build_s - student_alone.dataset_build_s:.1f} s more than for the student alone here), "
        f"then each epoch costs {results.training_over_student_alone('distillation_cached'):.2f}x the student alone "
        f"(online distillation: {results.training_over_student_alone('distillation_online'):.2f}x).",
        "With unlabelled cases (half of each epoch's cases, their soft labels cached alike), an epoch costs "
        f"{results.patch_cost_over('distillation_cached_unlabelled', 'distillation_cached'):.2f}x an epoch of the "
        "same number of labelled patches with cached soft labels.",
        "",
        f"| Distillation loss, one iteration ({next(iter(results.loss_terms.values())).batch} patches of "
        f"{results.training_patch_size}x{results.training_patch_size}, forward and backward) | s | peak memory (MiB) |",
        "| --- | ---: | ---: |",
    ]
    for cost in results.loss_terms.values():
        lines.append(f"| {cost.name} | {cost.iteration_s:.4f} | {_mib(cost.peak_mib)} |")
    lines += [
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
        "cropped voxels not). Achieved GFLOP/s: volume GFLOPs / network-only latency. Peak memory: "
        f"{results.memory_method}. Training: the bundle's own trainers (teacher: `configs/train.json` with "
        "`configs/teacher.json`; students: `configs/train.json` with `configs/distill.json`), augmentation included, "
        f"no validation, random-weight teacher checkpoint, {len(student_alone.epoch_runs_s)} epochs each, the modes "
        "taking turns epoch by epoch; median of all epochs but the first.",
    ]
    return "\n".join(lines) + "\n"


def write_figure(path: Path, results: BenchmarkResults) -> None:
    """Grouped bars: network-only and end-to-end latency of each model, log scale, written atomically as PNG.

    Args:
        path: the PNG file.
        results: a benchmark run's results.
    """
    models = results.models
    x = np.arange(len(models))
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    for offset, (label, values) in zip(
        (-0.2, 0.2),
        (
            ("network only", [model.network_s for model in models.values()]),
            ("end to end", [model.end_to_end_s for model in models.values()]),
        ),
    ):
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f} s" for v in values], fontsize=8)
    ax.set_xticks(x, [textwrap.fill(MODELS[key], 22, break_long_words=False) for key in models], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency per volume (s, log scale)")
    shape = "x".join(str(n) for n in results.case.shape)
    ax.set_title(f"Inference latency, {shape} volume, {results.machine.device}", fontsize=10)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
