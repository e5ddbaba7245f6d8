# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Tests of BraTS case discovery, datalists and patient-level splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import pytest

from scripts.brats_data import (
    BraTSDataError,
    build_splits,
    canonical_sequences,
    detect_layout,
    find_cases,
    find_unlabelled_cases,
    load_datalist,
    select_split,
    split_cases,
)


def _synthetic_cases(num_patients: int) -> list[dict]:
    return [{"case_id": f"case_{i:02d}", "patient_id": f"patient_{i:02d}"} for i in range(num_patients)]


def _ids(cases: list[dict]) -> list[str]:
    return [c["case_id"] for c in cases]


@pytest.mark.parametrize("layout", ["brats2020", "brats2023", "msd"])
def test_detect_layout_recognises_each_release(tmp_path, make_brats_folder, layout):
    assert detect_layout(make_brats_folder(tmp_path / "data", layout)) == layout


def test_canonical_sequences_maps_aliases_case_insensitively_keeping_order():
    assert canonical_sequences(["T2F", "t1c", "t2w", "t1n"]) == ["flair", "t1ce", "t2", "t1"]
    assert canonical_sequences(("flair", "t1gd", "t2")) == ["flair", "t1ce", "t2"]


def test_canonical_sequences_rejects_unknown_name_listing_accepted_names():
    with pytest.raises(BraTSDataError, match=r"'dwi'.*t2f"):
        canonical_sequences(["flair", "dwi"])


def test_canonical_sequences_rejects_two_names_of_one_sequence():
    with pytest.raises(BraTSDataError, match="flair"):
        canonical_sequences(["flair", "t2f"])


@pytest.mark.parametrize(
    "layout, ids, names",
    [
        ("brats2020", ["BraTS20_Training_001", "BraTS20_Training_002"], ["_t2", "_flair", "_t1ce"]),
        ("brats2023", ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001"], ["-t2w", "-t2f", "-t1c"]),
    ],
)
def test_find_cases_lists_requested_sequences_in_requested_order(tmp_path, make_brats_folder, layout, ids, names):
    root = make_brats_folder(tmp_path / "data", layout, num_cases=2)
    cases = find_cases(root, modalities=("t2", "FLAIR", "t1c"))
    assert _ids(cases) == ids
    for case in cases:
        case_dir = root / case["case_id"]
        assert case["layout"] == layout
        assert case["image"] == [str(case_dir / f"{case['case_id']}{name}.nii.gz") for name in names]
        separator = names[0][0]
        assert case["label"] == str(case_dir / f"{case['case_id']}{separator}seg.nii.gz")
        assert "channel_indices" not in case


def test_find_cases_msd_gives_the_4d_file_and_requested_channels_ignoring_hidden_files(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "msd", num_cases=2)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork junk
    (root / "labelsTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    cases = find_cases(root, modalities=("t2", "flair", "t1ce"))
    assert _ids(cases) == ["BRATS_001", "BRATS_002"]
    assert cases[0]["image"] == str(root / "imagesTr" / "BRATS_001.nii.gz")
    assert cases[0]["label"] == str(root / "labelsTr" / "BRATS_001.nii.gz")
    assert cases[0]["channel_indices"] == [3, 0, 2]
    assert cases[0]["patient_id"] == "BRATS_001"


def test_find_cases_accepts_uncompressed_nii(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1)
    compressed = root / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz"
    nib.save(nib.load(compressed), str(compressed.with_suffix("")))
    compressed.unlink()
    assert find_cases(root)[0]["image"][0] == str(compressed.with_suffix(""))


def test_brats2023_case_ids_group_timepoints_of_one_patient(tmp_path, make_brats_folder):
    cases = find_cases(make_brats_folder(tmp_path / "data", "brats2023", num_cases=3))
    assert [c["patient_id"] for c in cases] == ["BraTS-GLI-00001", "BraTS-GLI-00001", "BraTS-GLI-00002"]


def test_brats2020_patient_id_is_the_case_id(tmp_path, make_brats_folder):
    case = find_cases(make_brats_folder(tmp_path / "data", "brats2020", num_cases=1))[0]
    assert case["patient_id"] == case["case_id"] == "BraTS20_Training_001"


def test_split_keeps_all_timepoints_of_a_patient_in_one_split(tmp_path, make_brats_folder):
    cases = find_cases(make_brats_folder(tmp_path / "data", "brats2023", num_cases=6))
    for seed in range(10):
        splits = split_cases(cases, seed=seed)
        holding = [s for s, members in splits.items() if "BraTS-GLI-00001-000" in _ids(members)]
        assert len(holding) == 1
        assert "BraTS-GLI-00001-001" in _ids(splits[holding[0]])


def test_split_is_seeded_disjoint_and_covers_every_case():
    cases = _synthetic_cases(10)
    splits = split_cases(cases, seed=3)
    assert splits == split_cases(list(reversed(cases)), seed=3)
    assert any(split_cases(cases, seed=s) != splits for s in range(4, 10))
    ids = [i for members in splits.values() for i in _ids(members)]
    assert sorted(ids) == _ids(cases)  # disjoint and complete
    assert [len(splits[s]) for s in ("training", "validation", "test")] == [6, 2, 2]


def test_split_gives_every_split_a_patient_from_three_patients():
    splits = split_cases(_synthetic_cases(3), val_fraction=0.1, test_fraction=0.1)
    assert [len(splits[s]) for s in ("training", "validation", "test")] == [1, 1, 1]


def test_split_rejects_fractions_that_leave_no_training_patient():
    with pytest.raises(ValueError, match="no patient for training"):
        split_cases(_synthetic_cases(3), val_fraction=0.5, test_fraction=0.5)


@pytest.mark.parametrize("num_cases", [1, 2])
def test_split_of_one_or_two_patients_warns_and_reuses_every_case(num_cases):
    cases = _synthetic_cases(num_cases)
    with pytest.warns(UserWarning, match=f"Only {num_cases} patient"):
        splits = split_cases(cases)
    assert all(_ids(members) == _ids(cases) for members in splits.values())


def test_split_of_two_timepoints_of_one_patient_warns(tmp_path, make_brats_folder):
    cases = find_cases(make_brats_folder(tmp_path / "data", "brats2023", num_cases=2))
    with pytest.warns(UserWarning, match=r"Only 1 patient\(s\) \(2 case"):
        split_cases(cases)


def test_split_rejects_no_cases():
    with pytest.raises(BraTSDataError, match="No cases"):
        split_cases([])


def test_missing_sequence_file_error_names_case_and_file(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020")
    missing = root / "BraTS20_Training_002" / "BraTS20_Training_002_t1ce.nii.gz"
    missing.unlink()
    with pytest.raises(BraTSDataError, match="BraTS20_Training_002") as error:
        find_cases(root, modalities=("flair", "t1ce"))
    assert str(missing) in str(error.value)
    assert len(find_cases(root, modalities=("flair", "t2"))) == 3  # an unrequested sequence may be missing


@pytest.mark.parametrize(
    "layout, label",
    [
        ("brats2023", "BraTS-GLI-00002-000/BraTS-GLI-00002-000-seg.nii.gz"),
        ("msd", "labelsTr/BRATS_003.nii.gz"),
    ],
)
def test_missing_label_error_names_case_and_file_unless_labels_are_optional(tmp_path, make_brats_folder, layout, label):
    root = make_brats_folder(tmp_path / "data", layout)
    (root / label).unlink()
    case_id = Path(label).name.removesuffix(".nii.gz").removesuffix("-seg")
    with pytest.raises(BraTSDataError, match=case_id) as error:
        find_cases(root)
    assert str(root / label) in str(error.value)
    cases = find_cases(root, require_label=False)
    assert [("label" in c) for c in cases] == [c["case_id"] != case_id for c in cases]


def test_msd_unlabelled_test_images_are_found_only_when_labels_are_optional(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "msd", num_cases=1)
    (root / "imagesTs").mkdir()
    (root / "imagesTr" / "BRATS_001.nii.gz").rename(root / "imagesTs" / "BRATS_900.nii.gz")
    assert _ids(find_cases(root, require_label=False)) == ["BRATS_900"]
    with pytest.raises(BraTSDataError, match="imagesTr"):
        find_cases(root)


def test_nonexistent_folder_error_names_folder(tmp_path):
    with pytest.raises(BraTSDataError, match=r"does_not_exist.*does not exist.*brats2020"):
        find_cases(tmp_path / "does_not_exist")


def test_empty_folder_error_names_folder_and_expected_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    with pytest.raises(BraTSDataError, match=r"empty.*is empty.*t2f.*imagesTr"):
        detect_layout(tmp_path / "empty")


def test_unrecognised_folder_error_lists_expected_layouts(tmp_path):
    (tmp_path / "data" / "patient1").mkdir(parents=True)
    (tmp_path / "data" / "patient1" / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(BraTSDataError, match=r"follows no known BraTS layout.*_flair.*-t2f.*imagesTr"):
        detect_layout(tmp_path / "data")


def test_folder_mixing_layouts_is_rejected(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1)
    make_brats_folder(root, "brats2023", num_cases=1)
    with pytest.raises(BraTSDataError, match="mixes layouts.*brats2020.*brats2023"):
        detect_layout(root)


def test_datalist_of_case_ids_gives_the_listed_split(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {"training": ["BraTS20_Training_003", "BraTS20_Training_001"], "validation": ["BraTS20_Training_002"]}
        )
    )
    splits = load_datalist(datalist, root, modalities=("t2f", "t1c", "t2w"))
    assert _ids(splits["training"]) == ["BraTS20_Training_003", "BraTS20_Training_001"]
    assert _ids(splits["validation"]) == ["BraTS20_Training_002"]
    assert splits["test"] == []
    assert splits["validation"] == [c for c in find_cases(root) if c["case_id"] == "BraTS20_Training_002"]


def test_msd_dataset_json_works_as_a_datalist(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "msd")
    splits = load_datalist(root / "dataset.json", root, modalities=("flair", "t1ce", "t2"))
    assert _ids(splits["training"]) == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert splits["training"][0]["channel_indices"] == [0, 2, 3]
    assert splits["validation"] == splits["test"] == []


def test_datalist_accepts_case_id_dicts_and_image_only_dicts(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "msd")
    datalist = tmp_path / "datalist.json"
    entries = {"training": [{"case_id": "BRATS_002"}], "test": [{"image": "imagesTr/BRATS_003.nii"}]}
    datalist.write_text(json.dumps(entries))
    splits = load_datalist(datalist, root, modalities=("flair",))
    assert (_ids(splits["training"]), _ids(splits["test"])) == (["BRATS_002"], ["BRATS_003"])


def test_datalist_checks_only_the_listed_cases(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020")
    (root / "BraTS20_Training_003" / "BraTS20_Training_003_seg.nii.gz").unlink()
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": ["BraTS20_Training_001"], "validation": ["BraTS20_Training_002"]}))
    assert _ids(load_datalist(datalist, root, modalities=("flair",))["training"]) == ["BraTS20_Training_001"]


def test_datalist_unknown_case_error_names_datalist_and_case(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2023")
    datalist = tmp_path / "my_split.json"
    datalist.write_text(json.dumps({"training": ["BraTS-GLI-00001-000"], "validation": ["BraTS-GLI-09999-000"]}))
    with pytest.raises(BraTSDataError, match=r"my_split\.json.*BraTS-GLI-09999-000"):
        load_datalist(datalist, root, modalities=("flair",))


@pytest.mark.parametrize(
    "content, message", [("{not json", "Cannot read datalist"), ('{"validation": []}', '"training" list')]
)
def test_invalid_datalist_error_names_the_file(tmp_path, make_brats_folder, content, message):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1)
    datalist = tmp_path / "bad_split.json"
    datalist.write_text(content)
    with pytest.raises(BraTSDataError, match=message) as error:
        load_datalist(datalist, root, modalities=("flair",))
    assert str(datalist) in str(error.value)


def test_build_splits_without_datalist_splits_every_case_automatically(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = build_splits(root, datalist="", seed=1)
    assert splits["all"] == find_cases(root)
    assert {k: splits[k] for k in ("training", "validation", "test")} == split_cases(find_cases(root), seed=1)


def test_build_splits_with_datalist_uses_it_and_lists_its_cases_once_in_all(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": ["BraTS20_Training_002"], "validation": ["BraTS20_Training_002"]}))
    splits = build_splits(root, modalities=("flair",), datalist=str(datalist))
    assert _ids(splits["all"]) == ["BraTS20_Training_002"]
    assert _ids(splits["training"]) == _ids(splits["validation"]) == ["BraTS20_Training_002"]


def test_unknown_eval_split_is_refused_naming_the_splits():
    splits = {"training": [], "validation": [], "test": [{"case_id": "a"}], "all": [{"case_id": "a"}]}
    assert select_split(splits, "test") == [{"case_id": "a"}]
    with pytest.raises(
        BraTSDataError, match=r"'bogus' is not a split; use --eval_split training \| validation \| test \| all"
    ):
        select_split(splits, "bogus")


def test_unlabelled_cases_of_a_datalist_carry_no_label_and_are_marked(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=3)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": ["BraTS20_Training_001"], "unlabelled": ["BraTS20_Training_003"]}))
    labelled = build_splits(root, datalist=datalist)["all"]
    cases = find_unlabelled_cases(root, datalist=datalist, labelled_cases=labelled)
    assert _ids(cases) == ["BraTS20_Training_003"]
    assert "label" not in cases[0] and cases[0]["labelled"] is False
    assert cases[0]["image"] == next(c["image"] for c in find_cases(root) if c["case_id"] == "BraTS20_Training_003")


def test_every_case_of_an_unlabelled_folder_is_used_without_label_files(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1)
    unlabelled_dir = make_brats_folder(tmp_path / "archive", "brats2023", num_cases=3, labels_present=False)
    cases = find_unlabelled_cases(root, unlabelled_dir=unlabelled_dir, labelled_cases=find_cases(root))
    assert _ids(cases) == [c["case_id"] for c in find_cases(unlabelled_dir, require_label=False)]
    assert all("label" not in c and c["labelled"] is False for c in cases)


def test_an_unlabelled_case_that_is_also_labelled_is_refused_naming_it(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=2)
    with pytest.raises(BraTSDataError, match="Unlabelled case BraTS20_Training_002 .* is also labelled case"):
        find_unlabelled_cases(root, unlabelled_dir=root, labelled_cases=find_cases(root)[1:])


def test_an_unlabelled_timepoint_of_a_labelled_patient_is_refused(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2023", num_cases=2)  # two timepoints of patient 00001
    first, second = find_cases(root)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "test": [first["case_id"]], "unlabelled": [second["case_id"]]}))
    with pytest.raises(BraTSDataError, match=f"Unlabelled case {second['case_id']} .* or the same patient"):
        find_unlabelled_cases(root, datalist=datalist, labelled_cases=[first])


def test_an_unlabelled_case_listed_twice_is_refused(tmp_path, make_brats_folder):
    root = make_brats_folder(tmp_path / "data", "brats2020", num_cases=2)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "unlabelled": ["BraTS20_Training_001"]}))
    with pytest.raises(BraTSDataError, match="Unlabelled case BraTS20_Training_001 is listed twice"):
        find_unlabelled_cases(root, datalist=datalist, unlabelled_dir=root)


def _move(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return source.rename(target)


def test_a_folder_without_nifti_files_is_skipped_with_a_warning(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=2)
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.txt").write_text("acquisition notes")
    with pytest.warns(UserWarning, match=r"docs holds no NIfTI file, so it is not a brats2020 case.*skipped"):
        cases = find_cases(folder)
    assert _ids(cases) == ["BraTS20_Training_001", "BraTS20_Training_002"]


def test_a_folder_of_nifti_files_not_named_after_it_is_refused(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=2)
    _move(folder / "BraTS20_Training_002", folder / "renamed")
    with pytest.raises(BraTSDataError, match=r"renamed holds NIfTI files, but none named after the folder"):
        find_cases(folder)


def test_brats2019_hgg_and_lgg_grouping_folders_are_searched(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=3)
    _move(folder / "BraTS20_Training_001", folder / "HGG" / "BraTS20_Training_001")
    _move(folder / "BraTS20_Training_002", folder / "LGG" / "BraTS20_Training_002")
    (folder / "name_mapping.csv").write_text("BraTS_2019_subject_ID\n")
    assert detect_layout(folder) == "brats2020"
    cases = find_cases(folder)
    assert _ids(cases) == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    assert "/LGG/BraTS20_Training_002/" in cases[1]["label"]


def test_a_case_unpacked_into_a_folder_of_its_own_name_is_found(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2023", num_cases=1)
    case = next(folder.iterdir())
    _move(case, tmp_path / "moved")
    _move(tmp_path / "moved", case / case.name)
    assert find_cases(folder)[0]["image"][0].startswith(str(case / case.name) + "/")


def test_one_case_id_in_two_grouping_folders_is_refused_naming_both(tmp_path, make_brats_folder):
    hgg = make_brats_folder(tmp_path / "data" / "HGG", "brats2020", num_cases=1)
    make_brats_folder(tmp_path / "data" / "LGG", "brats2020", num_cases=1)
    with pytest.raises(BraTSDataError, match=r"Case BraTS20_Training_001 is found twice: .*HGG.* and .*LGG"):
        find_cases(hgg.parent)


def test_upper_case_sequence_file_names_are_found(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1)
    for path in list(folder.glob("*/*.nii.gz")):
        case_id, suffix = path.name[: -len(".nii.gz")].rsplit("_", 1)
        path.rename(path.with_name(f"{case_id}_{suffix.upper()}.nii.gz"))
    case = find_cases(folder)[0]
    assert [Path(p).name for p in case["image"]] == [
        "BraTS20_Training_001_FLAIR.nii.gz",
        "BraTS20_Training_001_T1CE.nii.gz",
        "BraTS20_Training_001_T2.nii.gz",
    ]
    assert case["label"].endswith("BraTS20_Training_001_SEG.nii.gz")


def test_two_files_for_one_sequence_are_refused_naming_both(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=1)
    flair = next(folder.glob("*/*_flair.nii.gz"))
    nib.save(nib.load(str(flair)), str(flair.with_name(flair.name[: -len(".gz")])))
    with pytest.raises(BraTSDataError, match=r"Case BraTS20_Training_001: .*_flair.nii and .*_flair.nii.gz are two"):
        find_cases(folder)


def test_a_datalist_listing_a_case_twice_in_one_split_is_refused(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=2)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": ["BraTS20_Training_002"], "test": ["BraTS20_Training_001"] * 2}))
    with pytest.raises(BraTSDataError, match=r'datalist.json lists case BraTS20_Training_001 twice in "test"'):
        load_datalist(path, folder)


def test_a_datalist_listing_a_case_in_two_splits_is_warned_about(tmp_path, make_brats_folder):
    folder = make_brats_folder(tmp_path / "data", "brats2020", num_cases=2)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": ["BraTS20_Training_001"], "test": ["BraTS20_Training_001"]}))
    with pytest.warns(UserWarning, match=r"lists case BraTS20_Training_001 in training and test: the metrics"):
        load_datalist(path, folder)
