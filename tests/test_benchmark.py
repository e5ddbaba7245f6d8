# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""scripts/benchmark.py: one quick run writes consistent figures for the three models; the counters it relies on."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import SegResNet

from scripts import benchmark
from scripts.fast_inference import BrainSliceInferer
from scripts.flops import conv_gflops
from scripts.separable_unet import SeparableUNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--quick`` benchmark (small synthetic case, one repeat) shared by the tests of this module."""
    output_dir = tmp_path_factory.mktemp("benchmark")
    return benchmark.benchmark(str(output_dir), quick=True, repeats=1, bundle_root=str(BUNDLE_ROOT))


def test_quick_run_times_the_three_models_network_only_and_end_to_end(quick_run):
    assert set(quick_run["models"]) - {"student_onnxruntime"} == {"student", "student_plain", "teacher", "segresnet"}
    for model in quick_run["models"].values():
        assert model["network_s"] > 0 and model["end_to_end_s"] > 0
        assert model["gflops_volume"] > 0 and model["achieved_gflops_per_s"] > 0
    assert quick_run["matmul"]["gflops_per_s"] > 0
    assert set(quick_run["training"]) >= {"teacher", "student_alone", "distillation"}
    assert all(quick_run["training"][mode]["slices_per_s"] > 0 for mode in benchmark.TRAINING_MODES)


def test_fast_path_is_compared_with_the_plain_slice_inferer_on_the_same_weights(quick_run):
    agreement = quick_run["fast_path_agreement"]
    assert agreement["weights"] in ("random", "trained models/model.pt")
    assert 0.0 <= agreement["label_agreement"] <= 1.0 and 0.0 <= agreement["label_agreement_brain"] <= 1.0
    assert agreement["max_abs_logit_difference"] >= 0.0
    assert quick_run["models"]["student_plain"]["parameters"] == quick_run["models"]["student"]["parameters"]
    assert "faster than the plain `SliceInferer`" in Path(quick_run["files"]["md"]).read_text()


def test_teacher_training_row_trains_the_teacher_and_cached_distillation_is_timed(quick_run):
    training = quick_run["training"]
    assert training["teacher"]["parameters"] == 9_475_935
    assert all(training[mode]["parameters"] == 605_679 for mode in ("student_alone", "distillation_cached"))
    expected = training["distillation_cached"]["iteration_s"] / training["student_alone"]["iteration_s"]
    assert training["distillation_cached_over_student_alone"] == pytest.approx(expected)


def test_epochs_of_the_real_distillation_trainer_are_timed_for_each_soft_label_mode(quick_run):
    epochs = quick_run["epochs"]
    assert set(benchmark.EPOCH_MODES) <= set(epochs)
    for mode in benchmark.EPOCH_MODES:
        assert len(epochs[mode]["epoch_runs_s"]) == epochs["epochs"] == 2
        assert epochs[mode]["epoch_s"] > 0 and epochs[mode]["patches_per_epoch"] > 0
    ratio = epochs["distillation_cached"]["epoch_s"] / epochs["student_alone"]["epoch_s"]
    assert epochs["distillation_cached_over_student_alone"] == pytest.approx(ratio)
    assert "Distillation from cached soft labels" in Path(quick_run["files"]["md"]).read_text()


def test_onnxruntime_row_does_the_same_work_as_the_torch_fast_path(quick_run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    models = quick_run["models"]
    assert models["student_onnxruntime"]["gflops_volume"] == models["student"]["gflops_volume"]
    assert quick_run["ratios"]["segresnet_over_student_onnxruntime_network"] == pytest.approx(
        models["segresnet"]["network_s"] / models["student_onnxruntime"]["network_s"]
    )


def test_parameter_counts_are_those_of_the_student_teacher_and_model_zoo_segresnet(quick_run):
    segresnet = SegResNet(
        blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2
    )
    models = quick_run["models"]
    assert models["student"]["parameters"] == 605_679
    assert models["teacher"]["parameters"] == 9_475_935
    assert models["segresnet"]["parameters"] == sum(p.numel() for p in segresnet.parameters())


def test_ratios_are_peer_and_teacher_latency_over_student_latency_round_by_round(quick_run):
    models, ratios = quick_run["models"], quick_run["ratios"]
    for other in ("segresnet", "teacher"):
        for kind in ("network", "end_to_end"):
            expected = benchmark.paired_ratio(models[other][f"{kind}_runs_s"], models["student"][f"{kind}_runs_s"])
            assert ratios[f"{other}_over_student_{kind}"] == pytest.approx(expected)
    training = quick_run["training"]
    expected = training["distillation"]["iteration_s"] / training["student_alone"]["iteration_s"]
    assert training["distillation_over_student_alone"] == pytest.approx(expected)


def test_paired_ratio_is_the_median_of_the_ratios_within_each_round():
    assert benchmark.paired_ratio([2.0, 10.0, 3.0], [1.0, 2.0, 1.0]) == 3.0  # rounds: 2, 5, 3
    with pytest.raises(ValueError):
        benchmark.paired_ratio([1.0, 2.0], [1.0])


def test_teacher_runs_at_its_fastest_batch_size_and_the_peak_is_measured_every_round(quick_run):
    sweep = quick_run["teacher_batch_size"]
    assert set(sweep["sweep_s"]) == {str(size) for size in benchmark.TEACHER_BATCH_SIZES}
    assert sweep["sweep_s"][str(sweep["sw_batch_size"])] == min(sweep["sweep_s"].values())
    assert quick_run["student_batch_size"] == 4  # configs/inference.json's infer_batch_size on CPU
    matmul = quick_run["matmul"]
    assert len(matmul["runs_gflops_per_s"]) == quick_run["repeats"]
    assert matmul["gflops_per_s"] == statistics.median(matmul["runs_gflops_per_s"])


def test_2d_gflops_per_slice_agree_with_the_comparison_reports_counter(quick_run):
    models = quick_run["models"]
    slice_shape = (1, 3, 128, 128)
    assert models["student"]["gflops_nominal"] == pytest.approx(conv_gflops(SeparableUNet(3, 4), slice_shape))
    teacher = SeparableUNet(3, 4, channels=benchmark.TEACHER_CHANNELS)
    assert models["teacher"]["gflops_nominal"] == pytest.approx(conv_gflops(teacher, slice_shape))


def test_volume_gflops_count_the_slices_the_fast_path_runs_through_its_prepared_network(trained_like_network):
    network = trained_like_network()
    image = torch.zeros(1, 3, 32, 48, 6)
    image[..., 1:4] = 1.0  # 3 slices with brain, all brain
    model = {
        "network": network,
        "inferer": BrainSliceInferer(sw_batch_size=2, crop_to_brain=False),
        "preprocessing": lambda case: {"image": MetaTensor(case)},
        "postprocessing": None,
        "case": image[0],
    }
    per_slice = conv_gflops(network, (1, 3, 32, 48))
    gflops = benchmark.volume_gflops(model, torch.device("cpu"), amp=False)
    assert gflops == pytest.approx(4 * per_slice)  # the 3 brain slices and the empty slice's forward pass
    assert model["inferer"].fold_bn and model["inferer"].channels_last  # the model's own inferer is left as it was


def test_reports_are_written_as_json_markdown_and_png(quick_run):
    files = quick_run["files"]
    written = json.loads(Path(files["json"]).read_text())
    assert written == json.loads(json.dumps({k: v for k, v in quick_run.items() if k != "files"}))
    assert Path(files["json"]).read_text().endswith("}\n")
    markdown = Path(files["md"]).read_text()
    assert all(name in markdown for name in benchmark.MODELS.values())
    assert "605,679" in markdown and "9,475,935" in markdown
    assert Path(files["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_memory_sees_a_large_allocation():
    peak = benchmark.peak_memory_mib(lambda: torch.ones(50_000_000), torch.device("cpu"))  # 191 MiB
    if peak is None:
        pytest.skip("peak RSS cannot be reset on this OS")
    assert peak >= 150


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_device_without_cuda_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        benchmark.benchmark(str(tmp_path), quick=True, device="cuda", bundle_root=str(BUNDLE_ROOT))
    assert not (tmp_path / "benchmark.json").exists()
