# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from scripts.distillation_loss import DistillationLoss, DistillationTarget

SHAPE = (2, 4, 3, 5)  # N, C, H, W: small enough for explicit loops over pixels


def random_logits(seed: int, shape: tuple[int, ...] = SHAPE, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=generator, dtype=torch.float64)


def class_label(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    return torch.randint(0, c, (n, 1, *spatial), generator=generator).to(torch.float64)


def region_label(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) > 0.5).to(torch.float64)


def loop_softmax_kl(student: np.ndarray, teacher: np.ndarray, temperature: float, mask: np.ndarray | None = None):
    """Mean over (masked) pixels of KL(softmax(t / T) || softmax(s / T)) summed over classes, by explicit loops."""
    n, c, h, w = student.shape
    total, count = 0.0, 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                weight = 1.0 if mask is None else float(mask[i, 0, y, x])
                if weight == 0:
                    continue
                s = [student[i, k, y, x] / temperature for k in range(c)]
                t = [teacher[i, k, y, x] / temperature for k in range(c)]
                zs = sum(math.exp(v) for v in s)
                zt = sum(math.exp(v) for v in t)
                kl = 0.0
                for k in range(c):
                    p_t, p_s = math.exp(t[k]) / zt, math.exp(s[k]) / zs
                    kl += p_t * math.log(p_t / p_s)
                total += weight * kl
                count += weight
    return total / max(count, 1.0)


def loop_bernoulli_kl(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """Mean over pixels of the per-channel Bernoulli KL summed over channels, by explicit loops."""
    n, c, h, w = student.shape
    total = 0.0
    for i, k, y, x in np.ndindex(n, c, h, w):
        p_t = 1 / (1 + math.exp(-teacher[i, k, y, x] / temperature))
        p_s = 1 / (1 + math.exp(-student[i, k, y, x] / temperature))
        total += p_t * math.log(p_t / p_s) + (1 - p_t) * math.log((1 - p_t) / (1 - p_s))
    return total / (n * h * w)


def channels_last_kl_div(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-pixel KL via ``F.kl_div`` on (pixels, classes) rows made by moving channels last before flattening."""
    c = student.shape[1]
    log_s = F.log_softmax(student.movedim(1, -1).reshape(-1, c) / temperature, dim=-1)
    log_t = F.log_softmax(teacher.movedim(1, -1).reshape(-1, c) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kd_term_is_zero_when_student_matches_teacher(mode):
    logits = random_logits(0)
    assert DistillationLoss(mode=mode).kd_term(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_softmax_kd_term_matches_explicit_loop_over_pixels(temperature):
    student, teacher = random_logits(1), random_logits(2)
    expected = temperature**2 * loop_softmax_kl(student.numpy(), teacher.numpy(), temperature)
    actual = DistillationLoss(temperature=temperature).kd_term(student, teacher)
    assert actual.item() == pytest.approx(expected, rel=1e-10)


def test_softmax_kd_term_matches_kl_div_on_channels_last_tensors():
    student, teacher = random_logits(3), random_logits(4)
    expected = 4.0 * channels_last_kl_div(student, teacher, temperature=2.0)
    torch.testing.assert_close(DistillationLoss(temperature=2.0).kd_term(student, teacher), expected)


def test_kd_term_does_not_mix_classes_and_pixels_like_a_plain_reshape():
    student, teacher = random_logits(5), random_logits(6)
    # the known pitfall: reshape (N, C, H, W) to (-1, C) without moving channels last
    wrong = F.kl_div(
        F.log_softmax(student.reshape(-1, SHAPE[1]), dim=1),
        F.log_softmax(teacher.reshape(-1, SHAPE[1]), dim=1),
        reduction="batchmean",
        log_target=True,
    )
    actual = DistillationLoss(temperature=1.0).kd_term(student, teacher)
    torch.testing.assert_close(actual, channels_last_kl_div(student, teacher, temperature=1.0))
    assert abs(actual.item() - wrong.item()) > 1e-3


@pytest.mark.parametrize(
    "shift_student, shift_teacher", [(True, False), (False, True), (True, True)], ids=["student", "teacher", "both"]
)
def test_softmax_kd_term_is_invariant_to_adding_a_constant_to_all_class_logits(shift_student, shift_teacher):
    student, teacher = random_logits(7), random_logits(8)
    loss = DistillationLoss(temperature=2.0)
    reference = loss.kd_term(student, teacher)
    n, _, h, w = SHAPE
    per_pixel_constant = 50.0 * random_logits(9, (n, 1, h, w))  # the same constant for every class of a pixel
    shifted = loss.kd_term(
        student + per_pixel_constant if shift_student else student,
        teacher - 7.5 + per_pixel_constant if shift_teacher else teacher,
    )
    torch.testing.assert_close(shifted, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kd_term_does_not_depend_on_image_size(mode):
    student, teacher = random_logits(10), random_logits(11)
    loss = DistillationLoss(mode=mode)
    tiled = loss.kd_term(student.repeat(1, 1, 2, 2), teacher.repeat(1, 1, 2, 2))  # twice H and W, same content
    torch.testing.assert_close(tiled, loss.kd_term(student, teacher))
    # and the batch size: duplicating the batch leaves the average unchanged
    torch.testing.assert_close(loss.kd_term(student.repeat(2, 1, 1, 1), teacher.repeat(2, 1, 1, 1)), tiled)


def test_kd_term_sums_over_classes_rather_than_averaging_them():
    student, teacher = random_logits(12), random_logits(13)
    temperature = 2.0
    log_s = torch.log_softmax(student / temperature, dim=1)
    log_t = torch.log_softmax(teacher / temperature, dim=1)
    class_mean = (log_t.exp() * (log_t - log_s)).mean()  # averaged over classes as well as pixels
    actual = DistillationLoss(temperature=temperature).kd_term(student, teacher)
    torch.testing.assert_close(actual, temperature**2 * SHAPE[1] * class_mean)
    assert actual.item() != pytest.approx(temperature**2 * class_mean.item())


def test_kd_term_averages_over_pixels_rather_than_summing_them():
    student, teacher = random_logits(14), random_logits(15)
    pixel_sum = 4.0 * loop_softmax_kl(student.numpy(), teacher.numpy(), 2.0) * SHAPE[0] * SHAPE[2] * SHAPE[3]
    actual = DistillationLoss(temperature=2.0).kd_term(student, teacher)
    assert actual.item() == pytest.approx(pixel_sum / (SHAPE[0] * SHAPE[2] * SHAPE[3]), rel=1e-10)
    assert actual.item() < pixel_sum / 10


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_softmax_student_gradient_is_temperature_times_probability_difference_per_pixel(temperature):
    student, teacher = random_logits(16).requires_grad_(), random_logits(17)
    DistillationLoss(temperature=temperature).kd_term(student, teacher).backward()
    n, _, h, w = SHAPE
    expected = (
        temperature * (torch.softmax(student / temperature, 1) - torch.softmax(teacher / temperature, 1)) / (n * h * w)
    )
    torch.testing.assert_close(student.grad, expected.detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sigmoid_student_gradient_is_temperature_times_probability_difference_per_pixel(temperature):
    student, teacher = random_logits(18).requires_grad_(), random_logits(19)
    DistillationLoss(temperature=temperature, mode="sigmoid").kd_term(student, teacher).backward()
    n, _, h, w = SHAPE
    expected = temperature * (torch.sigmoid(student / temperature) - torch.sigmoid(teacher / temperature)) / (n * h * w)
    torch.testing.assert_close(student.grad, expected.detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sigmoid_kd_term_matches_independent_bernoulli_kl(temperature):
    student, teacher = random_logits(20), random_logits(21)
    expected = temperature**2 * loop_bernoulli_kl(student.numpy(), teacher.numpy(), temperature)
    actual = DistillationLoss(temperature=temperature, mode="sigmoid").kd_term(student, teacher)
    assert actual.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kd_term_stays_finite_for_extreme_logits(mode):
    student, teacher = random_logits(22, scale=1e4).requires_grad_(), random_logits(23, scale=1e4)
    kd = DistillationLoss(temperature=1.0, mode=mode).kd_term(student.float(), teacher.float())
    kd.backward()
    assert torch.isfinite(kd) and torch.isfinite(student.grad).all()


def test_kd_weight_zero_is_exactly_dice_ce_and_needs_no_teacher():
    student, label = random_logits(24), class_label(25)
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(student, label)
    loss = DistillationLoss(kd_weight=0.0)
    assert torch.equal(loss(student, label, random_logits(26)), expected)
    assert torch.equal(loss(student, label, None), expected)


def test_integer_and_float_class_labels_give_the_same_loss():
    student, teacher, label = random_logits(27), random_logits(28), class_label(29)
    loss = DistillationLoss(kd_weight=0.3)
    torch.testing.assert_close(loss(student, label.long(), teacher), loss(student, label, teacher))


def test_sigmoid_mode_with_kd_weight_zero_is_exactly_sigmoid_dice_ce():
    student, label = random_logits(30), region_label(31)
    expected = DiceCELoss(sigmoid=True)(student, label)
    assert torch.equal(DistillationLoss(kd_weight=0.0, mode="sigmoid")(student, label, None), expected)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kd_weight_one_is_exactly_the_kd_term(mode):
    student, teacher = random_logits(32), random_logits(33)
    label = class_label(34) if mode == "softmax" else region_label(34)
    loss = DistillationLoss(temperature=3.0, kd_weight=1.0, mode=mode)
    assert torch.equal(loss(student, label, teacher), loss.kd_term(student, teacher))


@pytest.mark.parametrize("kd_weight", [0.25, 0.5, 0.9])
def test_intermediate_kd_weight_is_the_convex_combination(kd_weight):
    student, teacher, label = random_logits(35), random_logits(36), class_label(37)
    loss = DistillationLoss(temperature=2.0, kd_weight=kd_weight)
    supervised = DiceCELoss(to_onehot_y=True, softmax=True)(student, label)
    kd = 4.0 * loop_softmax_kl(student.numpy(), teacher.numpy(), 2.0)
    expected = (1 - kd_weight) * supervised.item() + kd_weight * kd
    assert loss(student, label, teacher).item() == pytest.approx(expected, rel=1e-10)


def test_custom_supervised_loss_replaces_dice_ce():
    student, teacher = random_logits(38), random_logits(39)
    target = torch.zeros(SHAPE, dtype=torch.float64)
    loss = DistillationLoss(kd_weight=0.5, supervised=torch.nn.MSELoss())
    expected = 0.5 * (student**2).mean() + 0.5 * loss.kd_term(student, teacher)
    torch.testing.assert_close(loss(student, target, teacher), expected)


@pytest.mark.parametrize("as_float", [False, True], ids=["bool", "float"])
def test_masked_kd_term_equals_kd_on_the_masked_pixels_alone(as_float):
    student, teacher = random_logits(40), random_logits(41)
    n, _, h, w = SHAPE
    mask = torch.rand((n, 1, h, w), generator=torch.Generator().manual_seed(42)) > 0.4
    loss = DistillationLoss(temperature=2.0)
    actual = loss.kd_term(student, teacher, mask.double() if as_float else mask)
    # the masked pixels gathered into a (pixels, C, 1, 1) batch of their own
    selected = mask[:, 0]
    alone = loss.kd_term(
        student.movedim(1, -1)[selected][..., None, None], teacher.movedim(1, -1)[selected][..., None, None]
    )
    torch.testing.assert_close(actual, alone)
    expected = 4.0 * loop_softmax_kl(student.numpy(), teacher.numpy(), 2.0, mask.numpy())
    assert actual.item() == pytest.approx(expected, rel=1e-10)
    assert actual.item() != pytest.approx(loss.kd_term(student, teacher).item())


def test_fractional_mask_weights_pixels():
    student, teacher = random_logits(43), random_logits(44)
    n, _, h, w = SHAPE
    weights = torch.rand((n, 1, h, w), generator=torch.Generator().manual_seed(45), dtype=torch.float64) + 0.5
    expected = 4.0 * loop_softmax_kl(student.numpy(), teacher.numpy(), 2.0, weights.numpy())
    assert DistillationLoss().kd_term(student, teacher, weights).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_all_zero_mask_gives_zero_kd_without_nan(mode):
    student, teacher = random_logits(46).requires_grad_(), random_logits(47)
    n, _, h, w = SHAPE
    kd = DistillationLoss(mode=mode).kd_term(student, teacher, torch.zeros((n, 1, h, w), dtype=torch.bool))
    kd.backward()
    assert kd.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_mask_restricts_only_the_kd_term_not_the_supervised_term():
    student, teacher, label = random_logits(48), random_logits(49), class_label(50)
    mask = torch.zeros((SHAPE[0], 1, *SHAPE[2:]), dtype=torch.bool)
    mask[:, :, 1:, 2:] = True
    loss = DistillationLoss(kd_weight=0.4)
    supervised = DiceCELoss(to_onehot_y=True, softmax=True)(student, label)
    expected = 0.6 * supervised + 0.4 * loss.kd_term(student, teacher, mask)
    torch.testing.assert_close(loss(student, label, teacher, mask=mask), expected)


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_teacher_logits_give_finite_float32_loss(teacher_dtype):
    student = random_logits(51).float().requires_grad_()
    teacher = random_logits(52).to(teacher_dtype)
    loss = DistillationLoss(kd_weight=0.5)
    total = loss(student, class_label(53), teacher)
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert torch.isfinite(student.grad).all()
    expected = 4.0 * loop_softmax_kl(student.detach().double().numpy(), teacher.double().numpy(), 2.0)
    assert loss.kd_term(student, teacher).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_teacher_logits_receive_no_gradient(mode):
    student, teacher = random_logits(54).requires_grad_(), random_logits(55).requires_grad_()
    label = class_label(56) if mode == "softmax" else region_label(56)
    DistillationLoss(mode=mode)(student, label, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_temperature_raises_naming_the_value(temperature):
    with pytest.raises(ValueError, match=f"temperature.*{temperature}"):
        DistillationLoss(temperature=temperature)


@pytest.mark.parametrize("kd_weight", [-0.1, 1.5, float("nan")])
def test_invalid_kd_weight_raises_naming_the_value(kd_weight):
    with pytest.raises(ValueError, match=f"kd_weight.*{kd_weight}"):
        DistillationLoss(kd_weight=kd_weight)


def test_invalid_mode_raises_naming_the_value():
    with pytest.raises(ValueError, match="mode.*'softmax2'"):
        DistillationLoss(mode="softmax2")


def test_shape_mismatch_between_student_and_teacher_raises_naming_both_shapes():
    student, teacher, label = random_logits(57), random_logits(58, (2, 4, 3, 4)), class_label(59)
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 5\).*\(2, 4, 3, 4\)"):
        DistillationLoss()(student, label, teacher)


def test_mask_with_wrong_shape_raises():
    student, teacher = random_logits(60), random_logits(61)
    with pytest.raises(ValueError, match="mask"):
        DistillationLoss().kd_term(student, teacher, torch.ones((2, 3, 5), dtype=torch.bool))


def test_missing_teacher_with_positive_kd_weight_raises():
    with pytest.raises(ValueError, match="teacher_logits"):
        DistillationLoss(kd_weight=0.5)(random_logits(62), class_label(63), None)


def loop_pairwise_affinity(student: np.ndarray, teacher: np.ndarray, pool: int) -> float:
    """The pairwise term by explicit loops: nodes of pool x pool pixels, cosine affinities, mean squared difference."""
    n, c, h, w = student.shape

    def nodes(probs: np.ndarray) -> list[np.ndarray]:
        feats = []
        for y0 in range(0, h, pool):
            for x0 in range(0, w, pool):
                block = probs[:, y0 : y0 + pool, x0 : x0 + pool].reshape(c, -1).mean(axis=1)
                feats.append(block / np.linalg.norm(block))
        return feats

    total = 0.0
    for i in range(n):
        s, t = nodes(student[i]), nodes(teacher[i])
        pairs = [(a, b) for a in range(len(s)) for b in range(len(s))]
        total += sum((s[a] @ s[b] - t[a] @ t[b]) ** 2 for a, b in pairs) / len(pairs)
    return total / n


def test_pairwise_term_matches_an_explicit_loop_over_node_pairs():
    student, teacher = random_logits(0, (2, 4, 8, 8)), random_logits(1, (2, 4, 8, 8))
    loss = DistillationLoss(temperature=2.0, pairwise_pool=4)
    term = loss.pairwise_term(student, teacher)
    expected = loop_pairwise_affinity(
        torch.softmax(student / 2, 1).numpy(), torch.softmax(teacher / 2, 1).numpy(), pool=4
    )
    assert term.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_pairwise_term_is_zero_when_student_matches_teacher(mode):
    logits = random_logits(2, (2, 3, 16, 16))
    assert DistillationLoss(mode=mode, pairwise_pool=4).pairwise_term(logits, logits.clone()).item() == 0.0


def test_pairwise_term_from_cached_soft_labels_equals_the_term_from_logits():
    student, teacher = random_logits(3, (2, 4, 16, 16)), random_logits(4, (2, 4, 16, 16))
    loss = DistillationLoss(temperature=3.0, pairwise_pool=8)
    cached = torch.softmax(teacher / 3.0, dim=1).half()
    assert loss.pairwise_term(student, None, cached).item() == pytest.approx(
        loss.pairwise_term(student, teacher).item(), rel=1e-2
    )


def test_pairwise_term_leaves_out_nodes_where_the_teacher_has_no_target():
    student, teacher = random_logits(5, (1, 4, 16, 16)), random_logits(6, (1, 4, 16, 16))
    probs = torch.softmax(teacher, dim=1)
    padded = probs.clone()
    padded[..., 8:] = 0  # right half brought in by augmentation padding: no target
    other_student = student.clone()
    other_student[..., 8:] = random_logits(7, (1, 4, 16, 8))
    loss = DistillationLoss(temperature=1.0, pairwise_pool=8)
    assert loss.pairwise_term(student, None, padded).item() == pytest.approx(
        loss.pairwise_term(other_student, None, padded).item()
    )


def test_pairwise_weight_adds_the_weighted_pairwise_term():
    shape = (2, 4, 8, 8)
    student, teacher, label = random_logits(8, shape), random_logits(9, shape), class_label(10, shape)
    plain = DistillationLoss(kd_weight=0.5)
    structured = DistillationLoss(kd_weight=0.5, pairwise_weight=2.0, pairwise_pool=4)
    expected = plain(student, label, teacher) + 2.0 * structured.pairwise_term(student, teacher)
    assert structured(student, label, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("weight, pool", [(-1.0, 8), (float("nan"), 8), (1.0, 0)])
def test_invalid_pairwise_settings_raise_naming_the_value(weight, pool):
    with pytest.raises(ValueError, match="pairwise_"):
        DistillationLoss(pairwise_weight=weight, pairwise_pool=pool)


def test_the_supervised_term_is_zero_for_samples_of_unlabelled_cases():
    student, teacher, label = random_logits(11), random_logits(12), class_label(13)
    loss = DistillationLoss(kd_weight=0.25)
    unlabelled = DistillationTarget(label, teacher_logits=teacher, labelled=torch.tensor([False, False]))
    assert loss(student, unlabelled).item() == pytest.approx(0.25 * loss.kd_term(student, teacher).item())
    other_label = DistillationTarget(1 - label, teacher_logits=teacher, labelled=torch.tensor([False, False]))
    assert loss(student, other_label).item() == loss(student, unlabelled).item()  # the label is not read


def test_a_mixed_batch_is_supervised_on_its_labelled_samples_only():
    student, teacher, label = random_logits(14), random_logits(15), class_label(16)
    loss = DistillationLoss(kd_weight=0.25)
    mixed = DistillationTarget(label, teacher_logits=teacher, labelled=torch.tensor([True, False]))
    expected = 0.75 * loss.supervised(student[:1], label[:1]) + 0.25 * loss.kd_term(student, teacher)
    assert loss(student, mixed).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_batch_without_labelled_sample_still_back_propagates_the_kd_term():
    student = random_logits(17).requires_grad_(True)
    target = DistillationTarget(class_label(18), teacher_logits=random_logits(19), labelled=torch.tensor([0, 0]))
    DistillationLoss(kd_weight=0.5)(student, target).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
