"""Image, label map and segmentation IO: exact geometry through every format, clear errors."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image, oblique_direction, real_sample

from TransferSegLib import segmentations, volumes
from TransferSegLib.errors import GeometryError, InputError, OutputExistsError


def assert_same_geometry(a: sitk.Image, b: sitk.Image, exact: bool) -> None:
    if exact:  # NRRD and MetaImage print 15 significant digits: float64 to 1e-14
        assert a.GetSize() == b.GetSize()
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-14, atol=0)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-14, atol=1e-12)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-14)
    else:  # NIfTI and MGH store geometry as float32
        assert a.GetSize() == b.GetSize()
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def assert_same_voxels(a: sitk.Image, b: sitk.Image) -> None:
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix, exact", [
    (".nrrd", True), (".mha", True), (".nii.gz", False), (".mgz", False), (".nii", False),
])
@pytest.mark.parametrize("sample", ["slicerio_chest", "pyradiomics_brain1"])
def test_real_image_round_trip_keeps_voxels_and_geometry(tmp_path, sample, suffix, exact):
    case = real_sample(sample)
    original = volumes.read_volume(case.extras["image_nrrd"])  # NRRD: float64 geometry
    path = volumes.write_image(original, tmp_path / f"copy{suffix}")
    again = volumes.read_volume(path)
    assert_same_voxels(original, again)
    assert_same_geometry(original, again, exact)
    assert volumes.Geometry.of(original).matches(volumes.Geometry.of(again))


@pytest.mark.parametrize("suffix, exact", [(".nrrd", True), (".mha", True), (".nii.gz", False),
                                           (".mgz", False)])
def test_oblique_geometry_survives_every_format(tmp_path, suffix, exact):
    rng = np.random.default_rng(0)
    image = make_image(rng.integers(-1000, 1000, (7, 9, 11)).astype(np.int16),
                       spacing=(0.7, 0.9, 2.5), origin=(-12.25, 40.5, 101.0),
                       direction=oblique_direction(25))
    again = volumes.read_volume(volumes.write_image(image, tmp_path / f"oblique{suffix}"))
    assert_same_voxels(image, again)
    assert_same_geometry(image, again, exact)


def test_dicom_series_reads_like_its_nifti_conversion(tmp_path):
    case = real_sample("totalseg_dicom")
    series = volumes.read_volume(case.extras["dicom"])
    assert series.GetSize() == (512, 512, 20)
    converted = volumes.read_volume(case.image)
    assert_same_voxels(series, converted)
    assert_same_geometry(series, converted, exact=False)
    # DICOM -> NRRD keeps the float64 geometry exactly.
    again = volumes.read_volume(volumes.write_image(series, tmp_path / "ct.nrrd"))
    assert_same_geometry(series, again, exact=True)
    volumes.check_same_grid(series, volumes.read_label(case.label))


def test_dicom_series_with_missing_or_duplicate_slices_is_refused(tmp_path):
    source = real_sample("totalseg_dicom").extras["dicom"]
    files = sorted(source.iterdir())
    gap = tmp_path / "gap"
    shutil.copytree(source, gap)
    sitk_order = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(gap))
    (gap / sitk_order[10].split("/")[-1]).unlink()
    with pytest.raises(InputError, match="missing slices"):
        volumes.read_volume(gap)
    duplicate = tmp_path / "duplicate"
    shutil.copytree(source, duplicate)
    shutil.copy(files[5], duplicate / "copy_of_a_slice")
    with pytest.raises(InputError, match="duplicate slices"):
        volumes.read_volume(duplicate)


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError, match="no DICOM image series"):
        volumes.read_volume(tmp_path)


# ------------------------------------------------------------------------------ segmentations
def test_seg_nrrd_keeps_names_colours_and_values(tmp_path):
    case = real_sample("slicerio_chest")
    seg = segmentations.read_segmentation(case.extras["seg_nrrd"])
    names = [s.name for s in seg.segments]
    assert names == ["ribs", "cervical vertebral column", "thoracic vertebral column",
                     "lumbar vertebral column", "right lung", "left lung", "tissue"]
    assert seg.segments[4].color == pytest.approx((0.0862745, 0.772549, 0.278431))
    path = segmentations.write_segmentation(seg, tmp_path / "copy.seg.nrrd")
    again = segmentations.read_segmentation(path)
    assert [(s.name, s.value, s.layer) for s in again.segments] == [
        (s.name, s.value, s.layer) for s in seg.segments]
    for a, b in zip(seg.segments, again.segments, strict=True):
        assert a.color == pytest.approx(b.color, abs=1e-6)
    assert_same_voxels(seg.layers[0], again.layers[0])
    assert_same_geometry(seg.layers[0], again.layers[0], exact=True)
    label, table = again.to_label_map()
    assert table[5] == "right lung"
    assert int((sitk.GetArrayViewFromImage(label) == 5).sum()) == int(seg.mask("right lung").sum())


def test_overlapping_segments_keep_their_layers(tmp_path):
    case = real_sample("slicerio_chest")
    seg = segmentations.read_segmentation(case.extras["seg_nrrd_overlapping"])
    assert len(seg.layers) == 2 and len(seg.segments) == 8
    sphere = seg.mask("overlapping sphere")
    assert sphere.sum() > 0 and (sphere & seg.mask("tissue")).sum() > 0
    again = segmentations.read_segmentation(
        segmentations.write_segmentation(seg, tmp_path / "overlap.seg.nrrd"))
    assert len(again.layers) == 2
    for segment in seg.segments:
        np.testing.assert_array_equal(seg.mask(segment.name), again.mask(segment.name))
    with pytest.raises(InputError, match="overlap"):
        again.to_label_map()


def test_written_seg_nrrd_loads_in_real_mrml(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is part of the dev extra")
    case = real_sample("slicerio_chest")
    seg = segmentations.read_segmentation(case.extras["seg_nrrd_overlapping"])
    path = segmentations.write_segmentation(seg, tmp_path / "for_slicer.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    loaded = node.GetSegmentation()
    assert loaded.GetNumberOfSegments() == 8 and loaded.GetNumberOfLayers() == 2
    by_name = {loaded.GetNthSegment(i).GetName(): loaded.GetNthSegment(i)
               for i in range(loaded.GetNumberOfSegments())}
    assert set(by_name) == {s.name for s in seg.segments}
    assert by_name["left lung"].GetColor() == pytest.approx(seg.segments[5].color, abs=1e-5)


def test_label_map_saved_as_seg_nrrd_gets_named_segments(tmp_path):
    case = real_sample("totalseg_ct")
    label = volumes.read_label(case.label)
    seg = segmentations.Segmentation.from_label_map(label, case.labels)
    again = segmentations.read_segmentation(
        segmentations.write_segmentation(seg, tmp_path / "ts.seg.nrrd"))
    assert {s.value: s.name for s in again.segments} == case.labels
    assert_same_voxels(label, again.layers[0])


# ------------------------------------------------------------------------------- label maps
def test_label_maps_read_as_unsigned_integers(tmp_path):
    labels = make_image(np.array([[[0, 1], [2, 300]]], np.int32))
    path = volumes.write_image(labels, tmp_path / "l.nrrd")
    read = volumes.read_label(path)
    assert read.GetPixelID() == sitk.sitkUInt16
    assert volumes.label_values(read) == [1, 2, 300]
    whole = volumes.write_image(make_image(np.array([[[0.0, 2.0]]], np.float32)),
                                tmp_path / "f.nii.gz")
    assert volumes.label_values(volumes.read_label(whole)) == [2]


@pytest.mark.parametrize("values, message", [
    (np.array([[[0.0, 1.5]]], np.float32), "non-integer"),
    (np.array([[[0, -3]]], np.int16), "negative"),
])
def test_bad_label_values_are_refused(tmp_path, values, message):
    path = volumes.write_image(make_image(values), tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match=message) as error:
        volumes.read_label(path)
    assert "bad.nii.gz" in str(error.value)


def test_geometry_mismatch_is_an_error_or_an_explicit_resample():
    case = real_sample("totalseg_ct")
    image, label = volumes.read_volume(case.image), volumes.read_label(case.label)
    volumes.check_same_grid(image, label)
    shifted = sitk.Image(label)
    shifted.SetOrigin([o + 1.5 for o in label.GetOrigin()])
    with pytest.raises(GeometryError, match="not on the voxel grid") as error:
        volumes.check_same_grid(image, shifted, "ct.nii.gz", "seg.nii.gz")
    assert "ct.nii.gz" in str(error.value) and "resample" in str(error.value)
    # Resampling a flipped copy back is exact: same voxel centres, other axis order.
    flipped = sitk.Flip(label, [False, True, False], flipAboutOrigin=False)
    flipped.SetDirection(np.array(label.GetDirection()) * [1, -1, 1, 1, -1, 1, 1, -1, 1])
    flipped.SetOrigin(label.TransformIndexToPhysicalPoint([0, label.GetSize()[1] - 1, 0]))
    with pytest.raises(GeometryError):
        volumes.check_same_grid(image, flipped)
    back = volumes.resample_label_to(flipped, image)
    assert_same_voxels(back, label)


# ------------------------------------------------------------------------------- bad input
def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        volumes.read_volume(tmp_path / "nowhere.nii.gz")
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(InputError, match=r"\.png file.*NIfTI"):
        volumes.read_volume(png)


def test_2d_and_4d_images_are_refused_but_a_single_frame_4d_is_a_volume(tmp_path):
    flat = sitk.Image([8, 8], sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="2D image"):
        volumes.read_volume(tmp_path / "flat.nrrd")
    series = sitk.Image([4, 4, 4, 3], sitk.sitkInt16)
    sitk.WriteImage(series, str(tmp_path / "series.nii.gz"))
    with pytest.raises(InputError, match="4 dimensions"):
        volumes.read_volume(tmp_path / "series.nii.gz")
    single = sitk.Image([4, 5, 6, 1], sitk.sitkInt16)
    sitk.WriteImage(single, str(tmp_path / "single.nii.gz"))
    assert volumes.read_volume(tmp_path / "single.nii.gz").GetSize() == (4, 5, 6)


def test_colour_images_are_refused(tmp_path):
    rgb = sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match="3 values per voxel"):
        volumes.read_volume(tmp_path / "rgb.mha")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_voxels_are_refused(tmp_path, bad):
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3] = bad
    path = volumes.write_image(make_image(array), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="1 NaN or infinite") as error:
        volumes.read_volume(path)
    assert "nan.nii.gz" in str(error.value)
    assert volumes.read_volume(path, allow_nonfinite=True).GetSize() == (5, 4, 3)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    case = real_sample("totalseg_ct")
    raw = gzip.decompress(case.image.read_bytes())
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cut.nii"):
        volumes.read_volume(tmp_path / "cut.nii")
    (tmp_path / "noise.nrrd").write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(InputError, match="noise.nrrd"):
        volumes.read_volume(tmp_path / "noise.nrrd")


def test_huge_declared_size_is_refused_before_allocating(tmp_path):
    header = ("NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\n"
              "encoding: raw\nendian: little\n\n")
    (tmp_path / "huge.nrrd").write_bytes(header.encode() + b"\0" * 64)
    with pytest.raises(InputError, match="more than the limit"):
        volumes.read_volume(tmp_path / "huge.nrrd")


# ------------------------------------------------------------------------------- writing
def test_existing_output_is_refused_and_left_untouched(tmp_path):
    image = make_image(np.ones((2, 3, 4), np.int16))
    path = volumes.write_image(image, tmp_path / "out.nii.gz")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        volumes.write_image(make_image(np.zeros((2, 3, 4), np.int16)), path)
    assert path.read_bytes() == before
    volumes.write_image(make_image(np.zeros((2, 3, 4), np.int16)), path, overwrite=True)
    assert volumes.label_values(volumes.read_label(path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_failed_write_leaves_no_partial_file(tmp_path):
    image = make_image(np.ones((2, 3, 4), np.int16))
    with pytest.raises(InputError):
        volumes.write_image(image, tmp_path / "out.png")
    with pytest.raises(Exception, match="does not exist"):
        volumes.write_image(image, tmp_path / "missing" / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []
