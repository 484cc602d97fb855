"""Datasets: the label table, and cases found in nnU-Net, MSD, CSV and image/label-pair layouts.

Every folder is built in ``tmp_path`` from real fetched samples, so paths, pairings and label
checks are exercised on real scans and real label maps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image, real_sample

from TransferSegLib import volumes
from TransferSegLib.datasets import Case, Dataset, LabelTable, discover
from TransferSegLib.errors import GeometryError, InputError


def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def populate(folder: Path, files: dict[str, Path]) -> Path:
    """``folder`` with a copy of each source file at its relative path."""
    for relative, source in files.items():
        copy(source, folder / relative)
    return folder


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def voxels(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


# ---------------------------------------------------------------------------------- label table
def test_label_table_reads_value_to_name_and_name_to_value_alike():
    value_json = '{"0": "background", "1": "liver", "5": "spleen"}'
    by_value = LabelTable.from_mapping(json.loads(value_json))
    by_name = LabelTable.from_mapping(json.loads('{"background": 0, "liver": 1, "spleen": 5}'))
    by_int = LabelTable.from_mapping({5: "spleen", 1: "liver"})
    assert by_value == by_name == by_int
    assert by_name.names == {0: "background", 1: "liver", 5: "spleen"}
    assert list(by_int.names) == [0, 1, 5]  # sorted by value
    assert by_name.foreground == {1: "liver", 5: "spleen"}
    assert by_name.value("spleen") == 5
    with pytest.raises(InputError, match="kidney.*liver"):
        by_name.value("kidney")


def test_label_table_adds_background_at_zero_and_keeps_a_given_zero_name():
    assert LabelTable.from_mapping({"tumour": 3}).names == {0: "background", 3: "tumour"}
    assert LabelTable({0: "air", 2: "lung"}).names == {0: "air", 2: "lung"}


@pytest.mark.parametrize("mapping", [
    {"1": "liver", "2": "liver"},  # {value: name}: one name twice
    {"liver": 1, "spleen": 1},  # {name: value}: one value twice would silently drop a name
    {"1": "background"},  # the implicit background at 0 would share the name
])
def test_label_table_refuses_two_labels_for_one_name_or_value(mapping):
    with pytest.raises(InputError, match="liver|background"):
        LabelTable.from_mapping(mapping)


def test_label_table_refuses_regions_non_integers_and_negatives():
    with pytest.raises(InputError, match="'whole tumour' is a region"):
        LabelTable.from_mapping({"background": 0, "whole tumour": [1, 2, 3], "core": 2})
    with pytest.raises(InputError, match="region"):
        LabelTable.from_mapping({"1": ["a", "b"]})
    with pytest.raises(InputError, match="'liver' has a non-integer value 'one'"):
        LabelTable.from_mapping({"liver": "one"})
    with pytest.raises(InputError, match="negative"):
        LabelTable.from_mapping({"-1": "outside"})
    with pytest.raises(InputError, match="negative"):
        LabelTable.from_mapping({"outside": -2})


def test_label_table_check_names_unknown_values_and_the_label_map():
    table = LabelTable.from_mapping({"liver": 1, "spleen": 2})
    table.check([0, 1, 2, 2], "case1.nii.gz")  # all known: no error
    with pytest.raises(InputError) as caught:
        table.check(np.array([0, 1, 9, 5, 9]), "labelsTr/case7.nii.gz")
    message = str(caught.value)
    assert "[5, 9]" in message
    assert "labelsTr/case7.nii.gz" in message
    assert "1=liver" in message and "2=spleen" in message


def test_label_table_json_round_trip_of_a_real_table():
    table = LabelTable(real_sample("totalseg_ct").labels)
    text = json.dumps(table.to_json())
    data = json.loads(text)
    assert all(isinstance(key, str) for key in data)
    assert data["0"] == "background" and data["117"] == "costal_cartilages"
    assert LabelTable.from_mapping(data) == table
    assert len(table.names) == len(real_sample("totalseg_ct").labels) + 1


# ------------------------------------------------------------------------------------- nnU-Net
def nnunet_manifest(table: dict[int, str], **changes) -> dict:
    """A dataset.json for ``table`` ({value: name}); a change to None removes that key."""
    data = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: value for value, name in table.items()}},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.fixture
def nnunet_folder(tmp_path) -> Path:
    """Dataset001: chest (slicerio) and abdomen (TotalSegmentator) labelled, mr unlabelled.

    The label table is the chest's, so the abdomen's label map holds values it lacks.
    """
    chest, abdomen, mr = (real_sample(n) for n in ("slicerio_chest", "totalseg_ct", "totalseg_mr"))
    folder = tmp_path / "Dataset001_Mixed"
    copy(chest.image, folder / "imagesTr" / "chest_0000.nii.gz")
    copy(chest.label, folder / "labelsTr" / "chest.nii.gz")
    copy(abdomen.image, folder / "imagesTr" / "abdomen_0000.nii.gz")
    copy(abdomen.label, folder / "labelsTr" / "abdomen.nii.gz")
    copy(mr.image, folder / "imagesTs" / "mr_0000.nii.gz")
    write_json(folder / "dataset.json", nnunet_manifest(chest.labels))
    return folder


def test_discover_reads_an_nnunet_folder(nnunet_folder):
    dataset = discover(nnunet_folder)
    assert dataset.kind == "nnunet"
    assert dataset.source == nnunet_folder
    assert dataset.modality == "CT" and dataset.channels == ["CT"]
    assert dataset.labels == LabelTable(real_sample("slicerio_chest").labels)
    by_name = {case.name: case for case in dataset.cases}
    assert sorted(by_name) == ["abdomen", "chest", "mr"]
    assert by_name["chest"].images == (nnunet_folder / "imagesTr" / "chest_0000.nii.gz",)
    assert by_name["chest"].label == nnunet_folder / "labelsTr" / "chest.nii.gz"
    assert by_name["abdomen"].image == nnunet_folder / "imagesTr" / "abdomen_0000.nii.gz"
    assert by_name["abdomen"].label == nnunet_folder / "labelsTr" / "abdomen.nii.gz"
    assert by_name["mr"].image == nnunet_folder / "imagesTs" / "mr_0000.nii.gz"
    assert by_name["mr"].label is None
    assert all(case.modality == "CT" and case.annotated is None for case in dataset.cases)
    assert sorted(case.name for case in dataset.labelled()) == ["abdomen", "chest"]


def test_nnunet_case_loads_image_and_label_on_one_grid(nnunet_folder):
    dataset = discover(nnunet_folder)
    chest = next(case for case in dataset.cases if case.name == "chest")
    images, label = chest.load(dataset.labels)
    sample = real_sample("slicerio_chest")
    assert len(images) == 1 and label is not None
    assert volumes.Geometry.of(images[0]).matches(volumes.Geometry.of(label))
    np.testing.assert_array_equal(voxels(images[0]), voxels(volumes.read_volume(sample.image)))
    assert volumes.label_values(label) == sorted(sample.labels)
    test_case = next(case for case in dataset.cases if case.name == "mr")
    images, label = test_case.load(dataset.labels)
    assert label is None and images[0].GetSize() == real_sample("totalseg_mr").size


def test_nnunet_label_values_missing_from_the_table_are_refused(nnunet_folder):
    dataset = discover(nnunet_folder)
    abdomen = next(case for case in dataset.cases if case.name == "abdomen")
    abdomen.load()  # without a table nothing is checked
    with pytest.raises(InputError) as caught:
        abdomen.load(dataset.labels)
    message = str(caught.value)
    assert str(nnunet_folder / "labelsTr" / "abdomen.nii.gz") in message
    assert "[8, 9, 10," in message and "117]" in message  # 1-7 are in the chest's table
    assert "dataset.json" in message


def test_nnunet_missing_channel_file_is_refused(nnunet_folder):
    labels = real_sample("slicerio_chest").labels
    write_json(nnunet_folder / "dataset.json",
               nnunet_manifest(labels, channel_names={"0": "CT", "1": "PET"}))
    with pytest.raises(InputError, match=r"lacks channel file .*_0001\.nii\.gz"):
        discover(nnunet_folder)
    copy(nnunet_folder / "imagesTr" / "abdomen_0000.nii.gz",
         nnunet_folder / "imagesTr" / "abdomen_0001.nii.gz")
    with pytest.raises(InputError, match=r"Case chest lacks channel file .*chest_0001\.nii\.gz"):
        discover(nnunet_folder)


def test_nnunet_manifest_without_file_ending_or_matching_images_is_refused(nnunet_folder):
    labels = real_sample("slicerio_chest").labels
    write_json(nnunet_folder / "dataset.json", nnunet_manifest(labels, file_ending=None))
    with pytest.raises(InputError, match=r"dataset\.json lacks 'file_ending'"):
        discover(nnunet_folder)
    write_json(nnunet_folder / "dataset.json", nnunet_manifest(labels, file_ending=".nrrd"))
    with pytest.raises(InputError, match=r"no images named imagesTr/<case>_0000\.nrrd"):
        discover(nnunet_folder)
    (nnunet_folder / "dataset.json").write_text('{"channel_names": {"0": "CT"},')
    with pytest.raises(InputError, match="fix the JSON"):
        discover(nnunet_folder)


def test_nnunet_region_labels_are_refused(nnunet_folder):
    write_json(nnunet_folder / "dataset.json", nnunet_manifest(
        {}, labels={"background": 0, "lungs": [5, 6], "right lung": 5, "left lung": 6}))
    with pytest.raises(InputError, match="'lungs' is a region"):
        discover(nnunet_folder)


# ----------------------------------------------------------------------------------------- MSD
MSD_MANIFEST = {
    "name": "BrainTumour",
    "modality": {"0": "MRI"},
    "labels": {"0": "background", "1": "tumour"},
    "numTraining": 1,
    "training": [{"image": "./imagesTr/brain1.nii.gz", "label": "./labelsTr/brain1.nii.gz"}],
    "test": ["./imagesTs/brain2.nii.gz"],
}


@pytest.fixture
def msd_folder(tmp_path) -> Path:
    one, two = real_sample("pyradiomics_brain1"), real_sample("pyradiomics_brain2")
    folder = populate(tmp_path / "Task01_BrainTumour", {
        "imagesTr/brain1.nii.gz": one.image, "labelsTr/brain1.nii.gz": one.label,
        "imagesTs/brain2.nii.gz": two.image})
    write_json(folder / "dataset.json", MSD_MANIFEST)
    return folder


def test_discover_reads_an_msd_folder(msd_folder):
    dataset = discover(msd_folder)
    assert dataset.kind == "msd"
    assert dataset.modality == "MRI" and dataset.channels == ["MRI"]
    assert dataset.labels.names == {0: "background", 1: "tumour"}
    assert [case.name for case in dataset.cases] == ["brain1", "brain2"]
    train, test = dataset.cases
    assert train.images == (msd_folder / "imagesTr" / "brain1.nii.gz",)
    assert train.label == msd_folder / "labelsTr" / "brain1.nii.gz"
    assert test.image == msd_folder / "imagesTs" / "brain2.nii.gz" and test.label is None
    assert dataset.labelled() == [train]
    images, label = train.load(dataset.labels)
    assert volumes.Geometry.of(images[0]).matches(volumes.Geometry.of(label))
    assert volumes.label_values(label) == [1]


def test_msd_symlinked_files_keep_their_own_names(tmp_path):
    one = real_sample("pyradiomics_brain1")
    folder = tmp_path / "Task02_Linked"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "imagesTr" / "case7.nii.gz").symlink_to(one.image)
    (folder / "labelsTr" / "case7.nii.gz").symlink_to(one.label)
    write_json(folder / "dataset.json", {
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": "./imagesTr/case7.nii.gz", "label": "./labelsTr/case7.nii.gz"}],
    })
    (case,) = discover(folder).cases
    assert case.name == "case7"  # not the name of the file the link points to
    assert case.image == folder / "imagesTr" / "case7.nii.gz"


def test_msd_listed_file_that_does_not_exist_is_refused(msd_folder):
    (msd_folder / "labelsTr" / "brain1.nii.gz").unlink()
    with pytest.raises(InputError, match=r"dataset\.json lists .*labelsTr/brain1\.nii\.gz"):
        discover(msd_folder)
    data = dict(MSD_MANIFEST, training=[], test=["./imagesTs/brain3.nii.gz"])
    write_json(msd_folder / "dataset.json", data)
    with pytest.raises(InputError, match=r"imagesTs/brain3\.nii\.gz, which does not exist"):
        discover(msd_folder)


# ----------------------------------------------------------------------------------------- CSV
@pytest.fixture
def csv_folder(tmp_path) -> Path:
    ct, mr = real_sample("totalseg_ct"), real_sample("totalseg_mr")
    folder = populate(tmp_path / "study", {
        "scans/ct.nii.gz": ct.image, "masks/ct_seg.nii.gz": ct.label,
        "scans/mr.nii.gz": mr.image, "masks/mr_seg.nii.gz": mr.label})
    write_json(folder / "labels.json", {str(v): n for v, n in ct.labels.items()})
    return folder


def test_discover_reads_a_csv_with_partial_annotations(csv_folder):
    # The second row stops before its 'annotated' cell: every class counts as annotated.
    (csv_folder / "cases.csv").write_text(
        "image,label,annotated\n"
        "scans/ct.nii.gz,masks/ct_seg.nii.gz, liver; spleen \n"
        "scans/mr.nii.gz,masks/mr_seg.nii.gz\n"
    )
    dataset = discover(csv_folder / "cases.csv")
    assert dataset.kind == "csv" and dataset.source == csv_folder / "cases.csv"
    ct, mr = dataset.cases
    assert (ct.name, mr.name) == ("ct", "mr")
    assert ct.images == (csv_folder / "scans" / "ct.nii.gz",)
    assert ct.label == csv_folder / "masks" / "ct_seg.nii.gz"
    assert mr.label == csv_folder / "masks" / "mr_seg.nii.gz"
    assert ct.annotated == frozenset({"liver", "spleen"})
    assert mr.annotated is None
    assert dataset.labels == LabelTable(real_sample("totalseg_ct").labels)
    images, label = ct.load(dataset.labels)
    assert volumes.Geometry.of(images[0]).matches(volumes.Geometry.of(label))


def test_csv_name_and_modality_columns_and_a_table_from_the_label_maps(tmp_path):
    brain = real_sample("pyradiomics_brain1")
    copy(brain.image, tmp_path / "b.nii.gz")
    copy(brain.label, tmp_path / "b_label.nii.gz")
    (tmp_path / "list.csv").write_text("name,image,label,modality\n"
                                       "patient 4,b.nii.gz,b_label.nii.gz,MR\n")
    dataset = discover(tmp_path / "list.csv")
    (case,) = dataset.cases
    assert (case.name, case.modality, dataset.modality) == ("patient 4", "MR", "MR")
    assert dataset.labels.names == {0: "background", 1: "label_1"}  # no labels.json


def test_csv_missing_file_is_refused_naming_the_line(csv_folder):
    (csv_folder / "cases.csv").write_text(
        "image,label,annotated\n"
        "scans/ct.nii.gz,masks/ct_seg.nii.gz,liver\n"
        "scans/mr.nii.gz,masks/mr_label.nii.gz,\n"
    )
    with pytest.raises(InputError, match=r"cases\.csv line 3: .*mr_label\.nii\.gz does not exist"):
        discover(csv_folder / "cases.csv")


def test_csv_without_an_image_column_or_with_an_empty_image_cell_is_refused(csv_folder):
    (csv_folder / "bad.csv").write_text("scan,label\nscans/ct.nii.gz,masks/ct_seg.nii.gz\n")
    with pytest.raises(InputError, match="'image' column"):
        discover(csv_folder / "bad.csv")
    (csv_folder / "empty.csv").write_text("image,label\n ,masks/ct_seg.nii.gz\n")
    with pytest.raises(InputError, match=r"empty\.csv line 2: the 'image' cell is empty"):
        discover(csv_folder / "empty.csv")


# --------------------------------------------------------------------------------------- pairs
def test_discover_pairs_images_with_their_label_maps(tmp_path):
    one, two = real_sample("pyradiomics_brain1"), real_sample("pyradiomics_brain2")
    copy(one.image, tmp_path / "a.nii.gz")
    copy(one.label, tmp_path / "a_label.nii.gz")
    copy(two.extras["image_nrrd"], tmp_path / "b_image.nrrd")
    copy(two.extras["label_nrrd"], tmp_path / "b_seg.nrrd")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = discover(tmp_path)
    assert dataset.kind == "pairs" and dataset.source == tmp_path
    by_name = {case.name: case for case in dataset.cases}
    assert sorted(by_name) == ["a", "b"]
    assert by_name["a"].images == (tmp_path / "a.nii.gz",)
    assert by_name["a"].label == tmp_path / "a_label.nii.gz"
    assert by_name["b"].images == (tmp_path / "b_image.nrrd",)
    assert by_name["b"].label == tmp_path / "b_seg.nrrd"
    assert dataset.labels.names == {0: "background", 1: "label_1"}
    for case, sample in ((by_name["a"], one), (by_name["b"], two)):
        images, label = case.load(dataset.labels)  # brain1 and brain2 differ in size
        assert images[0].GetSize() == sample.size
        assert volumes.label_values(label) == [1]


def test_pairs_use_labels_json_beside_them(tmp_path):
    one = real_sample("pyradiomics_brain1")
    copy(one.image, tmp_path / "x_img.nii.gz")
    copy(one.label, tmp_path / "x_mask.nii.gz")
    write_json(tmp_path / "labels.json", {"tumour": 1})
    dataset = discover(tmp_path)
    assert [(c.name, c.image.name, c.label.name) for c in dataset.cases] == [
        ("x", "x_img.nii.gz", "x_mask.nii.gz")]
    assert dataset.labels.names == {0: "background", 1: "tumour"}


def test_folder_without_pairs_is_refused(tmp_path):
    copy(real_sample("pyradiomics_brain1").image, tmp_path / "a.nii.gz")
    (tmp_path / "b_label.txt").write_text("not an image")
    with pytest.raises(InputError, match="no image/label pairs"):
        discover(tmp_path)


# -------------------------------------------------------------------------------------- discover
def test_discover_refuses_missing_paths_other_files_and_unmarked_nnunet_folders(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nowhere")
    image = copy(real_sample("pyradiomics_brain1").image, tmp_path / "scan.nii.gz")
    with pytest.raises(InputError, match=r"scan\.nii\.gz is a file; give a dataset folder"):
        discover(image)
    copy(image, tmp_path / "Dataset002" / "imagesTr" / "c_0000.nii.gz")
    with pytest.raises(InputError, match="imagesTr/ but no dataset.json"):
        discover(tmp_path / "Dataset002")


# -------------------------------------------------------------------------------------- geometry
def test_case_load_refuses_label_and_channels_on_other_grids(tmp_path):
    one, two = real_sample("pyradiomics_brain1"), real_sample("pyradiomics_brain2")
    with pytest.raises(GeometryError, match=str(two.label)):
        Case("mixed", (one.image,), two.label).load()
    with pytest.raises(GeometryError, match=str(two.image)):
        Case("channels", (one.image, two.image)).load()
    # One voxel's shift of the origin is enough to be refused.
    image = volumes.read_volume(one.image)
    shifted = make_image(voxels(volumes.read_label(one.label)), image.GetSpacing(),
                         np.add(image.GetOrigin(), (image.GetSpacing()[0], 0, 0)),
                         image.GetDirection())
    label = volumes.write_image(shifted, tmp_path / "shifted_label.nii.gz")
    with pytest.raises(GeometryError, match="not on the voxel grid"):
        Case("shifted", (one.image,), label).load()
    images, same = Case("same", (one.image,), one.label).load()
    assert same is not None and images[0].GetSize() == same.GetSize()


def test_dataset_checks_case_names_and_annotated_labels(tmp_path):
    case = real_sample("pyradiomics_brain1")
    table = LabelTable({1: "tumour"})
    one = Case("a", (case.image,), case.label)
    with pytest.raises(InputError, match="two cases named 'a'"):
        Dataset([one, Case("a", (case.image,), case.label)], table)
    with pytest.raises(InputError, match=r"annotated for \['tumor'\]"):
        Dataset([Case("b", (case.image,), case.label, frozenset({"tumor"}))], table)


def test_empty_label_map_is_refused_unless_allowed(tmp_path):
    case = real_sample("pyradiomics_brain1")
    label = volumes.read_label(case.label)
    empty = sitk.Image(label.GetSize(), label.GetPixelID())
    empty.CopyInformation(label)
    path = volumes.write_image(empty, tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="empty.nii.gz is empty"):
        Case("x", (case.image,), path).load()
    images, loaded = Case("x", (case.image,), path).load(allow_empty=True)
    assert volumes.label_values(loaded) == []
