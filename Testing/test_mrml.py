"""The MRML bridge on real MRML (the slicer-core wheel): volumes and segmentations in and out
with exact voxels and geometry, the user's nodes untouched, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image, oblique_direction, real_sample

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from vtk.util import numpy_support  # noqa: E402

from TransferSegLib import jobrunner, jobs, mrml, segmentations, volumes  # noqa: E402
from TransferSegLib.errors import InputError  # noqa: E402

FLIP = np.diag([-1.0, -1.0, 1.0])
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}


def _read_node(scene, path: Path, name: str, node_class: str, storage_class: str):
    """A node read from ``path`` by Slicer's own storage node, as File > Add Data does."""
    node = scene.AddNewNodeByClass(node_class, name)
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def load_volume(scene, path: Path, name: str):
    return _read_node(scene, path, name, "vtkMRMLScalarVolumeNode",
                      "vtkMRMLVolumeArchetypeStorageNode")


def load_segmentation(scene, path: Path, name: str):
    return _read_node(scene, path, name, "vtkMRMLSegmentationNode",
                      "vtkMRMLSegmentationStorageNode")


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-9) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol)


def segments(node) -> list[tuple[str, tuple[float, ...]]]:
    segmentation = node.GetSegmentation()
    return [(segmentation.GetNthSegment(i).GetName(),
             tuple(round(c, 6) for c in segmentation.GetNthSegment(i).GetColor()))
            for i in range(segmentation.GetNumberOfSegments())]


def snapshot(node) -> list:
    """Everything a user sees of a segmentation node: segments, colours, labels, voxels."""
    segmentation = node.GetSegmentation()
    state = [node.GetName(), segmentation.GetSourceRepresentationName(),
             segmentation.GetConversionParameter(
                 slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())]
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        labelmap = segment.GetRepresentation(mrml.BINARY_LABELMAP)
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).copy()
        state.append((segment_id, segment.GetName(), tuple(segment.GetColor()),
                      segment.GetLabelValue(), segmentation.GetLayerIndex(segment_id),
                      tuple(labelmap.GetExtent()), voxels.tobytes()))
    return state


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


# ------------------------------------------------------------------------------------ volumes
def test_a_real_ct_read_by_slicer_matches_simpleitk_and_comes_back_exactly(scene):
    case = real_sample("slicerio_chest")
    path = case.extras["image_nrrd"]
    node = load_volume(scene, path, "CT")
    image = mrml.volume_to_image(node)
    reference = sitk.ReadImage(str(path))
    assert image.GetPixelID() == reference.GetPixelID()
    assert np.array_equal(array(image), array(reference))
    assert_same_geometry(image, reference)  # RAS in Slicer, LPS in ITK: converted right

    back = mrml.volume_to_image(mrml.image_to_volume(image, scene, "copy"))
    assert volumes.Geometry.of(back) == volumes.Geometry.of(image)  # bit for bit
    assert back.GetPixelID() == image.GetPixelID()
    assert np.array_equal(array(back), array(image))


def test_a_totalsegmentator_ct_and_its_41_labels_through_the_bridge(scene):
    case = real_sample("totalseg_ct")
    node = load_volume(scene, case.image, "CT")
    image = mrml.volume_to_image(node)
    reference = volumes.read_volume(case.image)
    assert np.array_equal(array(image), array(reference))
    assert_same_geometry(image, reference)

    label = volumes.read_label(case.label)
    seg = mrml.labelmap_to_segmentation(label, case.labels, scene, "TotalSegmentator",
                                        reference_volume=node)
    assert [name for name, _ in segments(seg)] == list(case.labels.values())
    out, names, colours = mrml.segmentation_to_labelmap(seg, node)
    assert list(names.values()) == list(case.labels.values())
    assert colours == {v: segmentations.default_color(value)
                       for v, value in zip(names, case.labels, strict=True)}
    assert_same_geometry(out, image)
    # Values 1..n in segment order; mapped back they are the file's values, voxel for voxel.
    lookup = np.zeros(max(names) + 1, np.int64)
    for value, original in zip(names, case.labels, strict=True):
        lookup[value] = original
    assert np.array_equal(lookup[array(out)], array(label))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32",
                                   "int64", "float32", "float64"])
def test_every_scalar_type_is_kept(scene, dtype):
    values = np.random.default_rng(1).integers(-100, 100, (3, 4, 5))
    if np.dtype(dtype).kind == "u":
        values = np.abs(values)
    image = make_image(values.astype(dtype), spacing=(0.5, 0.7, 3.0), origin=(1, 2, 3))
    back = mrml.volume_to_image(mrml.image_to_volume(image, scene, "v"))
    assert back.GetPixelID() == image.GetPixelID()
    assert np.array_equal(array(back), array(image))


def test_an_oblique_volume_keeps_its_direction_and_physical_positions(scene):
    direction = oblique_direction(25.0)
    values = np.random.default_rng(2).normal(size=(6, 7, 8)).astype(np.float32)
    image = make_image(values, spacing=(0.8, 1.1, 2.5), origin=(12.5, -30.0, 44.0),
                       direction=direction)
    node = mrml.image_to_volume(image, scene, "oblique")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    for index in [(0, 0, 0), (7, 0, 0), (0, 6, 0), (0, 0, 5), (7, 6, 5)]:
        ras = ijk_to_ras.MultiplyPoint((*index, 1.0))[:3]
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(FLIP @ np.array(ras), lps, atol=1e-9)
    back = mrml.volume_to_image(node)
    assert_same_geometry(back, image, atol=1e-12)
    assert np.array_equal(array(back), values)

    # A label map on that grid: to a segmentation and back on the volume's grid.
    label = make_image((values > 0.5).astype(np.uint8) + (values > 1.5), spacing=(0.8, 1.1, 2.5),
                       origin=(12.5, -30.0, 44.0), direction=direction)
    seg = mrml.labelmap_to_segmentation(label, {1: "low", 2: "high"}, scene, "s",
                                        reference_volume=node)
    out, names, _ = mrml.segmentation_to_labelmap(seg, node)
    assert names == {1: "low", 2: "high"}
    assert_same_geometry(out, image, atol=1e-9)
    assert np.array_equal(array(out), array(label))


def test_image_to_volume_fills_a_given_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mine")
    image = make_image(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), spacing=(2, 2, 2))
    assert mrml.image_to_volume(image, scene, "ignored", node=node) is node
    assert node.GetName() == "mine"
    assert np.array_equal(array(mrml.volume_to_image(node)), array(image))


# ------------------------------------------------------------------------------ segmentations
def test_the_slicerio_segmentation_exports_its_seven_named_segments(scene):
    case = real_sample("slicerio_chest")
    ct = load_volume(scene, case.extras["image_nrrd"], "CT")
    seg = load_segmentation(scene, case.extras["seg_nrrd"], "Segmentation")
    label, names, colours = mrml.segmentation_to_labelmap(seg, ct)
    assert names == case.labels  # ribs, ..., tissue
    assert len(names) == 7 and colours[1] == pytest.approx((0.992157, 0.909804, 0.619608))
    assert label.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(label, mrml.volume_to_image(ct))
    # The same voxels as the file itself, read without Slicer.
    from_file, table = segmentations.read_segmentation(case.extras["seg_nrrd"]).to_label_map()
    assert table == names
    assert_same_geometry(from_file, label)
    assert np.array_equal(array(from_file), array(label))


def test_segmentation_to_label_map_to_new_segmentation_keeps_names_colours_voxels(scene):
    case = real_sample("slicerio_chest")
    ct = load_volume(scene, case.extras["image_nrrd"], "CT")
    user = load_segmentation(scene, case.extras["seg_nrrd"], "Segmentation")
    label, names, colours = mrml.segmentation_to_labelmap(user, ct)
    copy = mrml.labelmap_to_segmentation(label, names, scene, "Segmentation", colours, ct)
    assert copy is not user and copy.GetID() != user.GetID()
    assert segments(copy) == segments(user)
    again, names_again, colours_again = mrml.segmentation_to_labelmap(copy, ct)
    assert names_again == names
    for value, colour in colours.items():
        assert colours_again[value] == pytest.approx(colour)
    assert np.array_equal(array(again), array(label))
    assert volumes.Geometry.of(again) == volumes.Geometry.of(label)


def test_the_users_nodes_are_never_modified(scene):
    case = real_sample("slicerio_chest")
    ct = load_volume(scene, case.extras["image_nrrd"], "CT")
    user = load_segmentation(scene, case.extras["seg_nrrd_overlapping"], "Segmentation")
    before, ct_time, nodes = snapshot(user), ct.GetMTime(), scene.GetNumberOfNodes()
    mrml.volume_to_image(ct)
    mrml.segmentation_to_labelmap(user, ct, strict=False)
    with pytest.raises(InputError):
        mrml.segmentation_to_labelmap(user, ct)  # the strict check exports layer by layer
    label, names, _ = mrml.segmentation_to_labelmap(user, ct, strict=False)
    new = mrml.labelmap_to_segmentation(label, names, scene, "Segmentation", None, ct)
    assert snapshot(user) == before and ct.GetMTime() == ct_time
    assert new is not user
    added = scene.GetNumberOfNodes() - nodes
    assert added == 2  # the new segmentation and its display node, nothing left behind


def test_overlapping_segments_are_refused_or_the_last_one_wins(scene):
    case = real_sample("slicerio_chest")
    ct = load_volume(scene, case.extras["image_nrrd"], "CT")
    seg = load_segmentation(scene, case.extras["seg_nrrd_overlapping"], "Overlapping")
    with pytest.raises(InputError, match=r"'left lung' and 'overlapping sphere' of segmentation "
                                         r"'Overlapping' overlap in 8723 voxels \(15514 voxels "
                                         r"in all belong to two segments\)"):
        mrml.segmentation_to_labelmap(seg, ct)
    label, names, _ = mrml.segmentation_to_labelmap(seg, ct, strict=False)
    assert names[1] == "ribs" and names[8] == "overlapping sphere"
    counts = np.bincount(array(label).ravel(), minlength=9)
    assert counts[8] == 19139 and counts[1] == 8487 - 491  # the sphere, listed last, wins
    # In the given order: ribs last, so the ribs win.
    ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in (7, 0)]
    label, names, _ = mrml.segmentation_to_labelmap(seg, ct, segment_ids=ids, strict=False)
    assert names == {1: "overlapping sphere", 2: "ribs"}
    assert np.bincount(array(label).ravel()).tolist()[1:] == [19139 - 491, 8487]
    # Segments that do not overlap pass the strict check.
    label, names, _ = mrml.segmentation_to_labelmap(seg, ct, segment_ids=ids[:1])
    assert names == {1: "overlapping sphere"}


def test_a_label_without_voxels_still_gets_its_segment(scene):
    label = make_image(np.pad(np.ones((2, 2, 2), np.uint8) * 3, 2), spacing=(1, 1, 1))
    seg = mrml.labelmap_to_segmentation(label, {0: "background", 3: "liver", 7: "tumour"},
                                        scene, "prediction", colours={7: (1.0, 0.0, 0.0)})
    assert segments(seg) == [("liver", segmentations.default_color(3)), ("tumour", (1.0, 0.0, 0.0))]
    out, names, _ = mrml.segmentation_to_labelmap(seg)  # the label map's own grid
    assert names == {1: "liver", 2: "tumour"}
    assert volumes.Geometry.of(out) == volumes.Geometry.of(label)
    assert np.array_equal(array(out) == 1, array(label) == 3) and not np.any(array(out) == 2)


# ------------------------------------------------------------------------------------- errors
def test_empty_and_missing_nodes_give_clear_errors(scene):
    with pytest.raises(InputError, match="No volume was given"):
        mrml.volume_to_image(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    with pytest.raises(InputError, match="Volume 'CT' has no image data; load or create"):
        mrml.volume_to_image(empty)
    nothing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    with pytest.raises(InputError, match="Segmentation 'Segmentation' has no segments; add"):
        mrml.segmentation_to_labelmap(nothing)
    with pytest.raises(InputError, match="No segmentation was given"):
        mrml.segmentation_to_labelmap(None)

    label = make_image(np.array([[[0, 1, 2]]], np.uint8))
    with pytest.raises(InputError, match=r"holds values \[2\] that have no name"):
        mrml.labelmap_to_segmentation(label, {1: "liver"}, scene, "s")
    with pytest.raises(InputError, match="No label names"):
        mrml.labelmap_to_segmentation(label, {0: "background"}, scene, "s")
    with pytest.raises(InputError, match="must be integer"):
        mrml.labelmap_to_segmentation(sitk.Cast(label, sitk.sitkFloat32), {1: "a", 2: "b"},
                                      scene, "s")
    seg = mrml.labelmap_to_segmentation(label, {1: "liver", 2: "spleen"}, scene, "Two")
    with pytest.raises(InputError, match=r"'Two' has no segment with ID \['nope'\]"):
        mrml.segmentation_to_labelmap(seg, segment_ids=["nope"])
    with pytest.raises(InputError, match="No segments of segmentation 'Two' were chosen"):
        mrml.segmentation_to_labelmap(seg, segment_ids=[])
    with pytest.raises(InputError, match="Volume 'CT' has no image data"):
        mrml.segmentation_to_labelmap(seg, empty)
    with pytest.raises(InputError, match="Volume 'CT' has no image data"):
        mrml.labelmap_to_segmentation(label, {1: "a", 2: "b"}, scene, "s", reference_volume=empty)

    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB")
    data = vtk.vtkImageData()
    data.SetDimensions(2, 2, 2)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(data)
    with pytest.raises(InputError, match="'RGB' has 3 values per voxel"):
        mrml.volume_to_image(vector)


def test_transformed_nodes_are_refused_with_the_fix(scene):
    image = make_image(np.zeros((2, 2, 2), np.int16))
    node = mrml.image_to_volume(image, scene, "CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="'CT' is under transform 'Registration'; harden"):
        mrml.volume_to_image(node)


# ------------------------------------------------------------------------ a job from the scene
def test_a_job_written_from_nodes_comes_back_as_a_new_segmentation_node(scene, tmp_path):
    """Nodes -> job folder -> fine-tune -> segment -> a new segmentation node, real data."""
    import torch

    from TransferSegLib import checkpoint, networks

    case = real_sample("totalseg_ct")
    ct = load_volume(scene, case.image, "CT")
    full = volumes.read_label(case.label)
    kept = array(full)
    kept[~np.isin(kept, list(ORGANS))] = 0
    reduced = sitk.GetImageFromArray(kept)
    reduced.CopyInformation(full)
    user = mrml.labelmap_to_segmentation(reduced, ORGANS, scene, "Organs", reference_volume=ct)
    before = snapshot(user)

    image = mrml.volume_to_image(ct)
    label, names, _ = mrml.segmentation_to_labelmap(user, ct)
    assert list(names.values()) == list(ORGANS.values())

    torch.manual_seed(1)
    arguments = networks.resolve_kwargs("unet", channels=[8, 16, 32], strides=[2, 2],
                                        num_res_units=1)
    labels = {0: "background", **{i + 1: n for i, n in enumerate(ORGANS.values())}}
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=len(labels), arguments=arguments,
        labels=labels, spacing=[6.0, 6.0, 6.0], patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-500.0, 400.0]}, modality="CT")
    base = checkpoint.save_model(tmp_path / "base.safetensors",
                                 networks.build_network("unet", 1, len(labels), **arguments),
                                 card)

    train = jobs.write_job(tmp_path / "train", "finetune", labels=names,
                           cases=[{"name": "CT", "image": image, "label": label}],
                           params={"base": str(base), "strategy": "finetune", "steps": 4,
                                   "val_every": 4, "batch_size": 1, "device": "cpu"})
    events = []
    assert jobrunner.run_job(train, events.append) == 0, events[-1]
    model = Path(events[-1]["model"])
    assert model.parent == train.parent / "output"

    segment = jobs.write_job(tmp_path / "segment", "segment",
                             cases=[{"name": "CT", "image": image}],
                             params={"model": str(model), "device": "cpu"})
    events = []
    assert jobrunner.run_job(segment, events.append) == 0, events[-1]
    done = next(e for e in events if e["event"] == "segmented")
    table = {int(v): n for v, n in done["labels"].items()}
    result, _ = segmentations.read_segmentation(done["path"]).to_label_map()
    new = mrml.labelmap_to_segmentation(result, table, scene, "CT segmentation",
                                        reference_volume=ct)
    assert new is not user and snapshot(user) == before
    assert [name for name, _ in segments(new)] == list(ORGANS.values())
    back, back_names, _ = mrml.segmentation_to_labelmap(new, ct)
    assert_same_geometry(back, image)
    lookup = {v: n for v, n in back_names.items()}
    value_of = {n: v for v, n in table.items()}
    expected = np.zeros_like(array(back))
    for value, name in lookup.items():
        expected[array(result) == value_of[name]] = value
    assert np.array_equal(array(back), expected)
    assert json.loads(segment.read_text(encoding="utf-8"))["kind"] == "segment"


def test_terminology_survives_seg_nrrd_and_the_scene(tmp_path):
    """Slicer's TerminologyEntry tags (SNOMED CT codes) of the slicerio sample: read from its
    .seg.nrrd, written back, and carried into and out of segmentation nodes."""

    chest = real_sample("slicerio_chest")
    original = segmentations.read_segmentation(chest.extras["seg_nrrd"])
    codes = original.terminology()
    assert len(codes) == 7 and "SCT^113197003^Rib" in codes["ribs"]
    again = segmentations.write_segmentation(original, tmp_path / "again.seg.nrrd")
    assert segmentations.read_segmentation(again).terminology() == codes
    assert all(s.tags.get("Segmentation.Status") == "inprogress"
               for s in segmentations.read_segmentation(again).segments)

    scene = slicer.vtkMRMLScene()
    label, table = original.to_label_map()
    node = mrml.labelmap_to_segmentation(label, table, scene, "chest", terminology=codes)
    # "tissue" holds Slicer's default entry for new segments, which counts as not coded.
    assert mrml.segment_terminology(node) == {n: c for n, c in codes.items() if n != "tissue"}
    assert mrml.segment_terminology(mrml.labelmap_to_segmentation(label, table, scene, "x")) == {}
    assert segmentations.parse_tags("A:1|B:x:y|bad|") == {"A": "1", "B": "x:y"}
    assert segmentations.format_tags({"A": "a|b", "C|D": "no"}) == "A:a b|"
