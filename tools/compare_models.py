# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Teacher vs student trained alone vs distilled student, on the same split: size, cost, accuracy and CPU latency.

The three checkpoints are evaluated on one split of the distillation config (the exact split of training, from its
``split_seed``) with the config's own validation preprocessing, slice inferer and post-processing, and the results
are written as docs-ready files in ``output_dir``: ``comparison.md`` (a markdown table), ``comparison.json`` (the same
figures plus per-case metrics), ``comparison_cases.csv`` (one row per model and case) and ``comparison.png`` (label
overlays on the axial slice with most tumour of each case). Example::

    python -m tools.compare_models --dataset_dir data/synthetic --output_dir docs/results
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import fire
import matplotlib
import numpy as np
import torch
from monai.data import decollate_batch, list_data_collate
from monai.inferers import Inferer
from torch import nn
from tqdm import tqdm

from scripts.atomic_files import atomic_path, write_text_atomic
from scripts.brats_data import canonical_sequences
from scripts.brats_regions import region_names, regions_to_labels
from scripts.metrics_report import case_metrics
from scripts.teacher import TeacherCheckpointError, load_teacher
from tools.bundle_config import DISTILL_CONFIGS, bundle_configs, load_config
from tools.flops import conv_gflops

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

__all__ = ["LABEL_CMAP", "LABEL_COLOURS", "MODELS", "compare_models", "main", "save_label_figure"]

# model key -> (name in the reports, config id of its architecture, default checkpoint in <bundle_root>/models)
MODELS = {
    "teacher": ("Teacher", "teacher_def", "teacher.pt"),
    "student_alone": ("Student alone", "network_def", "student_alone.pt"),
    "student_kd": ("Student distilled (KD)", "network_def", "model.pt"),
}
_TRAINING_HINTS = {
    "teacher": "train the teacher first (configs/train.json with configs/teacher.json merged on it)",
    "student_alone": "train the student without a teacher first (configs/train.json --ckpt_name student_alone.pt)",
    "student_kd": "distil the student first (configs/train.json with configs/distill.json merged on it)",
}
FIGURE_MAX_CASES = 6
SLICE_SIZE = 128  # side of the slice the GFLOPs are reported for
# internal label -> (colour, name); label 0 is left transparent
LABEL_COLOURS = {1: ("#e41a1c", "necrotic / non-enhancing core"), 2: ("#4daf4a", "edema"), 3: ("#ffd700", "enhancing")}
LABEL_CMAP = ListedColormap([(0.0, 0.0, 0.0, 0.0)] + [colour for colour, _ in LABEL_COLOURS.values()])


def _load_network(key: str, network: nn.Module, path: str) -> nn.Module:
    """Load one model's checkpoint into its (fresh) network, frozen in eval mode."""
    try:
        return load_teacher(network, path)
    except TeacherCheckpointError as e:
        name, config_id, _ = MODELS[key]
        raise TeacherCheckpointError(f"cannot load the {name} checkpoint {path} into {config_id}: {e}") from e


def _markdown(results: dict[str, Any], regions: tuple[str, ...], csv_name: str) -> str:
    """The markdown report: a context line, the table, and how GFLOPs and latency were measured."""
    machine = results["machine"]
    shapes = ", ".join("x".join(str(n) for n in shape) for shape in results["volume_shapes"])
    header = (
        ["Model", "Parameters", f"GFLOPs / {SLICE_SIZE}x{SLICE_SIZE} slice"]
        + [f"Dice {r}" for r in regions]
        + [f"HD95 {r} (mm)" for r in regions]
        + ["CPU latency / volume (s)"]
    )
    lines = [
        f"Split `{results['split']}` ({results['num_cases']} cases) of `{results['dataset_dir']}`, volume shape(s) "
        f"{shapes}; evaluated {results['date_utc']} on {machine['processor']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads. Per-case metrics: `{csv_name}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
    ]
    for model in results["models"].values():
        metrics = model["metrics"]
        cells = (
            [model["name"], f"{model['parameters']:,}", f"{model['gflops_per_slice']:.2f}"]
            + [f"{metrics[f'dice_{r.lower()}']:.3f}" for r in regions]
            + [f"{metrics[f'hd95_{r.lower()}']:.2f}" for r in regions]
            + [f"{model['latency_s']:.3f}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Parameters: learnable ones (BatchNorm running statistics excluded). GFLOPs: 2 x multiply-adds of the "
        f"convolutions for one {SLICE_SIZE}x{SLICE_SIZE} slice. Latency: median wall time of the network over the "
        f"slices of one preprocessed volume (inferer call only), over {results['num_cases']} cases x "
        f"{results['latency_repeats']} repeats after one warm-up. Dice and HD95: means over cases, BraTS conventions "
        "for empty regions.",
    ]
    return "\n".join(lines) + "\n"


def _write_csv(path: str, results: dict[str, Any]) -> None:
    rows = [{"model": key, **case} for key, model in results["models"].items() for case in model["cases"]]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, str) else f"{v:.4f}" for k, v in row.items()})


def _write_figure(path: str, slices: list[dict[str, Any]], results: dict[str, Any], image_name: str) -> None:
    """One row per case: the image channel, then ground truth and each model's labels over it."""
    models = results["models"]
    columns = ["ground truth"] + list(models)
    fig, axes = plt.subplots(
        len(slices), 1 + len(columns), figsize=(2.6 * (1 + len(columns)), 2.8 * len(slices) + 0.4), layout="constrained"
    )
    axes = np.atleast_2d(axes)
    for row, case in zip(axes, slices):
        image = case["image"].T
        vmin, vmax = np.percentile(image, (1, 99))
        for ax in row:
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            ax.set_axis_off()
        row[0].set_title(f"{case['case_id']}\n{image_name}, z={case['z']}", fontsize=8)
        for ax, column in zip(row[1:], columns):
            ax.imshow(
                case["labels"][column].T,
                cmap=LABEL_CMAP,
                vmin=0,
                vmax=3,
                alpha=0.7,
                origin="lower",
                interpolation="nearest",
            )
            if column == "ground truth":
                ax.set_title("ground truth", fontsize=8)
            else:
                ax.set_title(f"{models[column]['name']}\nDice WT {case['dice_wt'][column]:.3f}", fontsize=8)
    save_label_figure(fig, path, results["num_classes"])


def save_label_figure(fig: plt.Figure, path: str, num_classes: int) -> None:
    """Add the label colours' legend to a figure of label overlays, write it as a PNG atomically and close it.

    Args:
        fig: the figure, its overlays drawn with :data:`LABEL_CMAP`.
        path: the PNG file.
        num_classes: 4 (the BraTS classes) or 2 (whole tumour).
    """
    labels = LABEL_COLOURS if num_classes > 2 else {1: (LABEL_COLOURS[1][0], "tumour")}
    fig.legend(
        handles=[Patch(color=colour, label=name) for colour, name in labels.values()],
        loc="outside lower center",
        ncol=len(labels),
        fontsize=8,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _timed(inferer: Inferer, image: torch.Tensor, network: nn.Module, repeats: int) -> tuple[torch.Tensor, list[float]]:
    """Run the inferer ``repeats`` times; return its last output and the wall time of each run in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = inferer(image, network)
        times.append(time.perf_counter() - start)
    return output, times


def compare_models(
    dataset_dir: str,
    output_dir: str,
    bundle_root: str = ".",
    eval_split: str = "test",
    teacher_ckpt: str | None = None,
    baseline_ckpt: str | None = None,
    student_ckpt: str | None = None,
    config_file: str | Sequence[str] | None = None,
    latency_repeats: int = 3,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the teacher, the student trained alone and the distilled student on one split, and report.

    All three run on CPU, in eval mode under ``torch.no_grad``, on the split of ``data_splits`` built from the
    config (same ``split_seed`` and fractions as training), with the config's ``validate#preprocessing``,
    ``validate#inferer`` and ``validate#postprocessing``; each case is preprocessed once for the three models.

    Args:
        dataset_dir: the dataset folder.
        output_dir: folder of the reports, created if needed.
        bundle_root: the bundle root.
        eval_split: ``training``, ``validation``, ``test`` or ``all``.
        teacher_ckpt: teacher checkpoint (architecture ``teacher_def``, which the distillation config takes from
            ``configs/teacher.json``); default ``<bundle_root>/models/teacher.pt``.
        baseline_ckpt: checkpoint of the student trained without distillation (architecture ``network_def``);
            default ``<bundle_root>/models/student_alone.pt``.
        student_ckpt: distilled student checkpoint (architecture ``network_def``); default
            ``<bundle_root>/models/model.pt``.
        config_file: the distillation config, or configs merged in order; default ``configs/train.json`` then
            ``configs/distill.json`` of the bundle root.
        latency_repeats: timed runs of each network per case, after one warm-up run per network.
        overrides: further config ids to set (see :func:`tools.bundle_config.load_config`).

    Returns:
        the results, as written to ``comparison.json``, plus ``files``: the paths written.

    Raises:
        FileNotFoundError: if a checkpoint is missing (the message names the model and the path).
        TeacherCheckpointError: if a checkpoint does not fit its architecture.
        ValueError: if ``eval_split`` is unknown or empty, or ``latency_repeats`` < 1.
    """
    if latency_repeats < 1:
        raise ValueError(f"latency_repeats must be at least 1, got {latency_repeats}.")
    models_dir = os.path.join(bundle_root, "models")
    checkpoints = {
        key: path or os.path.join(models_dir, MODELS[key][2])
        for key, path in (("teacher", teacher_ckpt), ("student_alone", baseline_ckpt), ("student_kd", student_ckpt))
    }
    for key, path in checkpoints.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{MODELS[key][0]} checkpoint {path} not found: {_TRAINING_HINTS[key]} or pass its path."
            )
    config_file = config_file or bundle_configs(bundle_root, DISTILL_CONFIGS)
    parser = load_config(config_file, bundle_root, dataset_dir, overrides)
    num_classes = parser.get_parsed_content("num_classes")
    regions = region_names(num_classes)
    modalities = canonical_sequences(parser.get_parsed_content("modalities"))
    image_channel = modalities.index("flair") if "flair" in modalities else 0

    definitions = {key: parser.get_parsed_content(config_id) for key, (_, config_id, _) in MODELS.items()}
    networks = {key: _load_network(key, copy.deepcopy(net), checkpoints[key]) for key, net in definitions.items()}

    splits = parser.get_parsed_content("data_splits")
    if eval_split not in splits:
        raise ValueError(f"eval_split must be one of {sorted(splits)}, got {eval_split!r}.")
    cases = splits[eval_split]
    if not cases:
        raise ValueError(f"split {eval_split!r} of {dataset_dir} holds no case.")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    postprocessing = parser.get_parsed_content("validate#postprocessing")

    per_case: dict[str, list[dict[str, Any]]] = {key: [] for key in MODELS}
    times: dict[str, list[float]] = {key: [] for key in MODELS}
    shapes: dict[tuple[int, ...], None] = {}  # distinct volume shapes, in order of appearance
    slices: list[dict[str, Any]] = []
    with torch.no_grad():
        for index, case in enumerate(tqdm(cases, desc=f"comparing models on {eval_split}")):
            batch = list_data_collate([preprocessing(case)])
            image = batch["image"].as_tensor()  # plain tensor: the timing is the network's, without metadata tracking
            label = batch["label"][0, 0]
            shapes[tuple(label.shape)] = None
            z = int((label > 0).sum(dim=(0, 1)).argmax())
            figure_slice = None
            if index < FIGURE_MAX_CASES:
                figure_slice = {
                    "case_id": case["case_id"],
                    "z": z,
                    "image": image[0, image_channel, :, :, z].numpy(),
                    "labels": {"ground truth": label[:, :, z].numpy()},
                    "dice_wt": {},
                }
                slices.append(figure_slice)
            for key, network in networks.items():
                if index == 0:  # warm-up, untimed
                    inferer(image, network)
                logits, runs = _timed(inferer, image, network, latency_repeats)
                times[key] += runs
                item = decollate_batch({"pred": logits, "label": batch["label"], "image": batch["image"]})[0]
                regions_out = postprocessing(item)  # argmax, background outside the brain, regions
                argmax = regions_to_labels(regions_out["pred"])[0]
                metrics = case_metrics(regions_out["pred"], regions_out["label"], regions)
                per_case[key].append({"case_id": case["case_id"], **metrics, "latency_s": statistics.median(runs)})
                if figure_slice is not None:
                    figure_slice["labels"][key] = argmax[:, :, z].numpy()
                    figure_slice["dice_wt"][key] = metrics["dice_wt"]

    in_channels = len(modalities)
    metric_names = [f"dice_{r.lower()}" for r in regions] + [f"hd95_{r.lower()}" for r in regions]
    models = {}
    for key, (name, config_id, _) in MODELS.items():
        summary = {m: float(np.mean([c[m] for c in per_case[key]])) for m in metric_names}
        summary["mean_dice"] = float(np.mean([summary[f"dice_{r.lower()}"] for r in regions]))
        summary["mean_hd95"] = float(np.mean([summary[f"hd95_{r.lower()}"] for r in regions]))
        models[key] = {
            "name": name,
            "architecture": config_id,
            "checkpoint": checkpoints[key],
            "parameters": sum(p.numel() for p in networks[key].parameters()),
            "gflops_per_slice": conv_gflops(networks[key], (1, in_channels, SLICE_SIZE, SLICE_SIZE)),
            "latency_s": statistics.median(times[key]),
            "metrics": summary,
            "cases": per_case[key],
        }
    results: dict[str, Any] = {
        "split": eval_split,
        "num_cases": len(cases),
        "dataset_dir": dataset_dir,
        "config_file": config_file,
        "overrides": overrides or {},
        "num_classes": num_classes,
        "regions": list(regions),
        "volume_shapes": [list(shape) for shape in shapes],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "latency_repeats": latency_repeats,
        "models": models,
    }

    os.makedirs(output_dir, exist_ok=True)
    files = {
        name: os.path.join(output_dir, f"comparison{suffix}")
        for name, suffix in (("markdown", ".md"), ("json", ".json"), ("csv", "_cases.csv"), ("figure", ".png"))
    }
    table = _markdown(results, regions, os.path.basename(files["csv"]))
    _write_csv(files["csv"], results)
    write_text_atomic(files["json"], json.dumps(results, indent=4) + "\n")
    _write_figure(files["figure"], slices, results, modalities[image_channel].upper())
    write_text_atomic(files["markdown"], table)
    print(table)
    for path in files.values():
        print(f"written: {path}")
    return {**results, "files": files}


def main(
    dataset_dir: str,
    output_dir: str,
    bundle_root: str = ".",
    eval_split: str = "test",
    teacher_ckpt: str | None = None,
    baseline_ckpt: str | None = None,
    student_ckpt: str | None = None,
    config_file: str | list[str] | None = None,
    latency_repeats: int = 3,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Command-line entry: compare teacher, student alone and distilled student; see :func:`compare_models`.

    Args:
        dataset_dir: the dataset folder.
        output_dir: folder of the reports.
        bundle_root: the bundle root.
        eval_split: ``training``, ``validation``, ``test`` or ``all``.
        teacher_ckpt: teacher checkpoint; default ``<bundle_root>/models/teacher.pt``.
        baseline_ckpt: student-alone checkpoint; default ``<bundle_root>/models/student_alone.pt``.
        student_ckpt: distilled student checkpoint; default ``<bundle_root>/models/model.pt``.
        config_file: the distillation config (or a list); default ``configs/train.json`` then ``configs/distill.json``.
        latency_repeats: timed runs of each network per case.
        overrides: further config ids, e.g. ``--overrides '{"num_classes": 2}'``.
    """
    compare_models(
        dataset_dir,
        output_dir,
        bundle_root=bundle_root,
        eval_split=eval_split,
        teacher_ckpt=teacher_ckpt,
        baseline_ckpt=baseline_ckpt,
        student_ckpt=student_ckpt,
        config_file=config_file,
        latency_repeats=latency_repeats,
        overrides=overrides,
    )


if __name__ == "__main__":
    fire.Fire(main)
