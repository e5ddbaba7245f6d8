# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""tools.benchmark: its measuring primitives on known inputs, and one quick end-to-end run (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import SegResNet

from scripts.fast_inference import BrainSliceInferer
from scripts.separable_unet import SeparableUNet
from tools.benchmark import benchmark
from tools.benchmark.inference import speedups
from tools.benchmark.models import MODELS, TEACHER_CHANNELS, BenchmarkModel, volume_gflops
from tools.benchmark.results import MatmulPeak, ModelLatency
from tools.benchmark.suite import REPORT_FILES, TEACHER_BATCH_SIZES
from tools.benchmark.timing import paired_ratio, peak_memory_mib, timed_runs
from tools.benchmark.training import TRAINING_MODES
from tools.flops import conv_gflops

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
PEAK = MatmulPeak(size=2, runs_gflops_per_s=[10.0], gflops_per_s=10.0)


def latency(network_runs_s: list[float], end_to_end_runs_s: list[float], gflops_volume: float = 1.0) -> ModelLatency:
    return ModelLatency.measured(1, 1.0, "slice", gflops_volume, network_runs_s, end_to_end_runs_s, None, None, PEAK)


def test_paired_ratio_is_the_median_of_the_ratios_within_each_round():
    assert paired_ratio([2.0, 10.0, 3.0], [1.0, 2.0, 1.0]) == 3.0  # rounds: 2, 5, 3
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def test_speedups_pair_the_rounds_and_skip_models_not_measured():
    measured = {"student": latency([1.0, 1.0, 2.0], [2.0, 2.0, 2.0]), "teacher": latency([8.0, 3.0, 4.0], [4.0] * 3)}
    (speedup,) = speedups(measured, ("student", "student_onnxruntime"), ("segresnet", "teacher"))
    assert (speedup.model, speedup.over) == ("student", "teacher")
    assert speedup.network == 3.0  # rounds 8, 3, 2: not the ratio of the medians (4 / 1)
    assert speedup.end_to_end == 2.0


def test_latency_record_is_the_median_and_its_share_of_the_matmul_peak():
    record = latency([3.0, 1.0, 2.0], [5.0, 4.0, 6.0], gflops_volume=8.0)
    assert (record.network_s, record.end_to_end_s) == (2.0, 5.0)
    assert record.achieved_gflops_per_s == 4.0
    assert record.fraction_of_matmul_peak == 0.4


def test_timed_runs_measure_each_call():
    times = timed_runs(lambda: time.sleep(0.02), 3, torch.device("cpu"))
    assert len(times) == 3 and all(t >= 0.02 for t in times)


def test_peak_memory_sees_a_large_allocation():
    peak = peak_memory_mib(lambda: torch.ones(50_000_000), torch.device("cpu"))  # 191 MiB
    if peak is None:
        pytest.skip("peak RSS cannot be reset on this OS")
    assert peak >= 150


def test_volume_gflops_count_the_slices_the_fast_path_runs_through_its_prepared_network(trained_like_network):
    network = trained_like_network()
    image = torch.zeros(1, 3, 32, 48, 6)
    image[..., 1:4] = 1.0  # 3 slices with brain, all brain
    model = BenchmarkModel(
        network=network,
        inferer=BrainSliceInferer(sw_batch_size=2, crop_to_brain=False),
        preprocessing=lambda case: {"image": MetaTensor(case)},
        postprocessing=lambda item: None,
        case=image[0],
        nominal_input=(1, 3, 32, 48),
        nominal_unit="slice",
    )
    per_slice = conv_gflops(network, (1, 3, 32, 48))
    gflops = volume_gflops(model, torch.device("cpu"), amp=False)
    assert gflops == pytest.approx(4 * per_slice)  # the 3 brain slices and the empty slice's forward pass
    assert model.inferer.fold_bn and model.inferer.channels_last  # the model's own inferer is left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_device_without_cuda_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        benchmark(str(tmp_path / "out"), quick=True, device="cuda", bundle_root=str(BUNDLE_ROOT))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One ``quick`` benchmark (32 x 32 x 16 synthetic case, one round) shared by the tests below."""
    output_dir = tmp_path_factory.mktemp("benchmark")
    return benchmark(str(output_dir), quick=True, repeats=1, bundle_root=str(BUNDLE_ROOT)), output_dir


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_png_of_the_same_results(quick_run):
    results, output_dir = quick_run
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(REPORT_FILES)
    assert json.loads((output_dir / "benchmark.json").read_text()) == json.loads(json.dumps(results.to_dict()))
    markdown = (output_dir / "benchmark.md").read_text()
    for key, model in results.models.items():
        assert f"| {MODELS[key]} | {model.parameters:,} |" in markdown
    for epochs in results.training.values():
        assert f"| {epochs.name} | {epochs.epoch_s:.3f} |" in markdown
    assert (output_dir / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_run_measures_the_deployed_networks(quick_run):
    results, _ = quick_run
    segresnet = SegResNet(
        blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2
    )
    models = results.models
    assert models["student"].parameters == models["student_plain"].parameters == 605_679
    assert models["teacher"].parameters == 9_475_935
    assert models["segresnet"].parameters == sum(p.numel() for p in segresnet.parameters())
    slice_shape = (1, 3, 128, 128)
    assert models["student"].gflops_nominal == pytest.approx(conv_gflops(SeparableUNet(3, 4), slice_shape))
    teacher = SeparableUNet(3, 4, channels=TEACHER_CHANNELS)
    assert models["teacher"].gflops_nominal == pytest.approx(conv_gflops(teacher, slice_shape))
    # the fast path skips the slices without brain and crops the rest: less work than the plain SliceInferer
    assert models["student"].gflops_volume < models["student_plain"].gflops_volume
    if "student_onnxruntime" in models:  # the same slices, batches and crops as the torch fast path
        assert models["student_onnxruntime"].gflops_volume == models["student"].gflops_volume
    assert results.student_batch_size == 4  # configs/inference.json's infer_batch_size on CPU
    assert set(results.teacher_batch_size.sweep_s) == set(TEACHER_BATCH_SIZES)
    agreement = results.fast_path_agreement
    assert agreement.label_agreement_brain >= 0.99 and agreement.max_abs_logit_difference < 1.0


@pytest.mark.slow
def test_quick_run_trains_each_mode_with_its_own_network_for_the_requested_epochs(quick_run):
    results, _ = quick_run
    assert list(results.training) == list(TRAINING_MODES)
    training = results.training
    assert training["teacher"].parameters == 9_475_935
    assert all(training[mode].parameters == 605_679 for mode in TRAINING_MODES if mode != "teacher")
    for epochs in training.values():
        assert len(epochs.epoch_runs_s) == 2  # quick: one warm-up epoch, one timed
        assert epochs.epoch_s == epochs.epoch_runs_s[1]
        assert epochs.patches_per_epoch == epochs.train_cases * 16  # configs/train.json's patches_per_case
    # the unlabelled mode trains on the training cases and as many unlabelled copies, the others on as many labelled
    # copies: the same patches per epoch
    assert len({epochs.train_cases for epochs in training.values()}) == 1
