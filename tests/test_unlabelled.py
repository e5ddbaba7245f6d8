# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from collections import Counter

import pytest
import torch
from monai.data import MetaTensor

from scripts.soft_labels import SOFT_LABEL_KEY
from scripts.unlabelled import (
    LABELLED_KEY,
    LabelledUnlabelledSampler,
    TeacherPredictedLabeld,
    classes_from_soft_labels,
)


def cases(num_labelled: int, num_unlabelled: int) -> list[dict]:
    labelled = [{"case_id": f"l{i}"} for i in range(num_labelled)]
    return labelled + [{"case_id": f"u{i}", LABELLED_KEY: False} for i in range(num_unlabelled)]


def test_softmax_soft_labels_give_the_most_probable_class():
    probs = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.6, 0.1], [0.1, 0.2, 0.3], [0.1, 0.1, 0.4]]).reshape(4, 3, 1, 1)
    classes = classes_from_soft_labels(probs)
    assert classes.dtype == torch.uint8 and classes.shape == (1, 3, 1, 1)
    assert classes.flatten().tolist() == [0, 1, 3]


def test_sigmoid_region_probabilities_give_the_nested_classes():
    # voxels: outside WT, edema only (WT), core without enhancing (WT and TC), enhancing (WT, TC and ET)
    wt, tc, et = [0.2, 0.9, 0.9, 0.9], [0.1, 0.3, 0.8, 0.9], [0.0, 0.1, 0.2, 0.7]
    probs = torch.tensor([wt, tc, et]).reshape(3, 4, 1, 1)
    assert classes_from_soft_labels(probs, "sigmoid").flatten().tolist() == [0, 2, 1, 3]
    assert classes_from_soft_labels(probs[:1], "sigmoid").flatten().tolist() == [0, 1, 1, 1]  # WT alone


def test_a_labelled_case_keeps_its_label_and_is_marked_labelled():
    label = torch.ones(1, 2, 2, 1)
    data = TeacherPredictedLabeld()({"label": label, SOFT_LABEL_KEY: torch.zeros(4, 2, 2, 1)})
    assert data["label"] is label and data[LABELLED_KEY] is True


def test_an_unlabelled_case_gets_the_teachers_classes_with_the_images_geometry():
    affine = torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0]))
    probs = MetaTensor(torch.softmax(torch.randn(4, 3, 3, 2), dim=0), affine=affine)
    data = TeacherPredictedLabeld()({"case_id": "u0", "image": torch.zeros(3, 3, 3, 2), SOFT_LABEL_KEY: probs})
    assert data[LABELLED_KEY] is False
    assert isinstance(data["label"], MetaTensor) and torch.equal(data["label"].affine, affine)
    torch.testing.assert_close(data["label"].as_tensor(), probs.as_tensor().argmax(0, keepdim=True).to(torch.uint8))


def test_an_unlabelled_case_without_soft_labels_is_refused_naming_it():
    with pytest.raises(KeyError, match="case u7 has no label and no 'teacher_probs'"):
        TeacherPredictedLabeld()({"case_id": "u7", "image": torch.zeros(3, 2, 2, 1)})


def test_an_epoch_holds_every_labelled_case_once_and_the_ratio_of_unlabelled_ones():
    sampler = LabelledUnlabelledSampler(cases(4, 10), unlabelled_ratio=1.5, seed=0)
    epoch = list(sampler)
    assert len(epoch) == len(sampler) == 4 + 6
    assert sorted(i for i in epoch if i < 4) == [0, 1, 2, 3]
    assert len(set(epoch)) == len(epoch)  # fewer unlabelled cases asked for than there are: no repeat


def test_unlabelled_cases_are_drawn_evenly_across_epochs():
    sampler = LabelledUnlabelledSampler(cases(2, 3), unlabelled_ratio=1.5, seed=1)  # 3 unlabelled per epoch
    counts = Counter(i for _ in range(4) for i in sampler if i >= 2)
    assert counts == {2: 4, 3: 4, 4: 4}


def test_a_ratio_asking_for_more_unlabelled_cases_than_there_are_repeats_them_evenly():
    sampler = LabelledUnlabelledSampler(cases(2, 2), unlabelled_ratio=2.0, seed=0)
    epoch = list(sampler)
    assert Counter(epoch) == {0: 1, 1: 1, 2: 2, 3: 2}


def test_the_order_of_an_epoch_is_shuffled_reproducibly():
    first = [list(LabelledUnlabelledSampler(cases(4, 8), 1.0, seed=3)) for _ in range(2)]
    assert first[0] == first[1]
    assert sorted(first[0][:4]) != first[0][:4] or first[0][4:] != sorted(first[0][4:])


def test_ratio_zero_trains_on_the_labelled_cases_only():
    assert sorted(LabelledUnlabelledSampler(cases(3, 5), unlabelled_ratio=0.0)) == [0, 1, 2]


@pytest.mark.parametrize("ratio", [-1.0, float("nan"), float("inf")])
def test_an_invalid_ratio_is_refused_naming_it(ratio):
    with pytest.raises(ValueError, match="unlabelled_ratio must be finite and >= 0"):
        LabelledUnlabelledSampler(cases(1, 1), unlabelled_ratio=ratio)
