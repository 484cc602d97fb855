"""Tests for TransferSegLib.metrics: values known by construction, edge cases, errors, files, and
agreement with independent implementations (SimpleITK, MONAI) on real label maps."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import real_sample

from TransferSegLib import metrics
from TransferSegLib.errors import (
    GeometryError,
    InputError,
    OutputExistsError,
    TransferSegError,
)

# Exact Euclidean distances between the same voxel centres on both sides: the only differences
# are float32 rounding (SimpleITK's distance map and MONAI's results are float32), ~1e-7 relative.
DISTANCE_RTOL = 1e-5
DISTANCE_ATOL_MM = 1e-4


def image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A SimpleITK image from a (Z, Y, X) array; spacing and origin in SimpleITK's (X, Y, Z)."""
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(spacing)
    result.SetOrigin(origin)
    return result


def ball(shape, centre, radius_mm, spacing) -> np.ndarray:
    """Boolean ball in a (Z, Y, X) array; centre in voxels, spacing in array order (mm)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    squared = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True))
    return squared <= radius_mm**2


def sample(name: str):
    return real_sample(name)


# --------------------------------------------------------------------------------------------
# Known by construction
# --------------------------------------------------------------------------------------------


def test_dice_and_iou_of_half_overlapping_cubes():
    ref = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(ref)
    ref[2:12, 2:12, 2:12] = True
    pred[2:12, 2:12, 7:17] = True  # shifted by half its width: overlap 500 of 1000 voxels
    assert metrics.dice(pred, ref) == pytest.approx(0.5)
    assert metrics.iou(pred, ref) == pytest.approx(1 / 3)
    assert metrics.dice(ref, ref) == 1.0 and metrics.iou(ref, ref) == 1.0


def test_volume_of_a_box_in_millilitres():
    box = np.zeros((10, 30, 30), np.uint8)
    box[2:7, 5:25, 3:13] = 1  # 5 x 20 x 10 voxels = 1000 voxels of 2*2*3 = 12 mm³ -> 12 mL
    assert metrics.volume_ml(box.astype(bool), (3.0, 2.0, 2.0)) == pytest.approx(12.0)
    # Through a SimpleITK image, whose spacing is (X, Y, Z).
    [score] = metrics.evaluate(image(box, (2.0, 2.0, 3.0)), image(box, (2.0, 2.0, 3.0)))
    assert score.volume_ref_ml == pytest.approx(12.0)
    assert score.volume_pred_ml == pytest.approx(12.0)


@pytest.mark.parametrize("axis, expected_mm", [(0, 3 * 2.5), (1, 3 * 0.8), (2, 3 * 0.7)])
def test_hausdorff_of_a_shifted_sphere_is_the_shift_in_mm(axis, expected_mm):
    # A mask and its translate by t are at Hausdorff distance exactly |t|: the extreme surface
    # voxel opposite to t is |t| from everything in the translate, and each voxel has its twin.
    spacing_zyx = (2.5, 0.8, 0.7)
    ref = ball((24, 48, 48), (11, 23, 23), 12.0, spacing_zyx)
    pred = np.roll(ref, 3, axis=axis)
    assert metrics.hausdorff_distance(pred, ref, spacing_zyx) == pytest.approx(expected_mm)
    hd95 = metrics.hd95(pred, ref, spacing_zyx)
    assert 0 < hd95 <= expected_mm + 1e-6
    assert 0 < metrics.mean_surface_distance(pred, ref, spacing_zyx) <= hd95
    # evaluate() takes the spacing from the image, in SimpleITK's (X, Y, Z) order.
    spacing_xyz = spacing_zyx[::-1]
    [score] = metrics.evaluate(
        image(pred.astype(np.uint8), spacing_xyz), image(ref.astype(np.uint8), spacing_xyz)
    )
    assert score.hd95_mm == pytest.approx(hd95)


def test_surface_distances_of_nested_boxes():
    # Every surface voxel of the inner box is 5 voxels from the outer box's nearest face; the
    # outer box's corners are 5*sqrt(3) voxels from the inner box's corners.
    outer = np.zeros((30, 30, 30), bool)
    outer[5:26, 5:26, 5:26] = True
    inner = np.zeros_like(outer)
    inner[10:21, 10:21, 10:21] = True
    outer_to_inner, inner_to_outer = metrics.surface_distances(outer, inner, (2.0, 2.0, 2.0))
    assert inner_to_outer.size == 11**3 - 9**3
    np.testing.assert_allclose(inner_to_outer, 10.0, rtol=1e-6)
    assert outer_to_inner.size == 21**3 - 19**3
    assert outer_to_inner.min() == pytest.approx(10.0)
    assert outer_to_inner.max() == pytest.approx(10.0 * math.sqrt(3))
    assert metrics.hausdorff_distance(outer, inner, (2.0, 2.0, 2.0)) == pytest.approx(
        10.0 * math.sqrt(3)
    )


def test_mask_touching_the_image_border_has_a_closed_surface():
    full = np.ones((4, 5, 6), bool)
    pred_to_ref, ref_to_pred = metrics.surface_distances(full, full, (1.0, 1.0, 1.0))
    assert pred_to_ref.size == 4 * 5 * 6 - 2 * 3 * 4  # everything but the 2x3x4 interior
    assert not pred_to_ref.any() and not ref_to_pred.any()


def three_blobs() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((20, 40, 40), bool)
    ref[2:6, 2:6, 2:6] = True  # lesion A: 64 voxels
    ref[10:14, 20:24, 20:24] = True  # lesion B: 64 voxels
    ref[2:5, 30:33, 30:33] = True  # lesion C: 27 voxels
    pred = np.zeros_like(ref)
    pred[3:5, 3:5, 3:8] = True  # overlaps A by 2*2*3 = 12 voxels
    pred[15:18, 5:8, 30:33] = True  # touches nothing: a false positive
    return pred, ref


def test_lesion_detection_counts():
    pred, ref = three_blobs()
    found = metrics.lesion_detection(pred, ref, (2.0, 1.0, 1.0))
    assert (found.reference_lesions, found.predicted_lesions) == (3, 2)
    assert (found.detected, found.false_positives) == (1, 1)
    assert found.recall == pytest.approx(1 / 3)
    assert found.precision == pytest.approx(1 / 2)
    assert found.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert sorted(found.missed_volumes_ml) == pytest.approx([27 * 2e-3, 64 * 2e-3])
    # With a stricter overlap rule the 12-voxel overlap no longer counts.
    strict = metrics.lesion_detection(pred, ref, (2.0, 1.0, 1.0), min_overlap_voxels=13)
    assert (strict.detected, strict.false_positives, strict.f1) == (0, 2, 0.0)


def test_lesions_are_26_connected():
    ref = np.zeros((5, 5, 5), bool)
    ref[1, 1, 1] = ref[2, 2, 2] = True  # touch at a corner only: one lesion
    found = metrics.lesion_detection(ref, ref, (1.0, 1.0, 1.0))
    assert found.reference_lesions == 1 and found.f1 == 1.0


def test_evaluate_lesion_wise():
    pred, ref = three_blobs()
    [score] = metrics.evaluate(
        image(pred.astype(np.uint8)), image(ref.astype(np.uint8) * 2), {2: "nodule"},
        lesion_wise=True, ignore_unknown=True,  # the prediction uses 1, unknown to the table
    )
    assert score.name == "nodule" and score.dice == 0.0
    assert (score.lesions_reference, score.lesions_predicted) == (3, 0)
    assert score.lesion_recall == 0.0 and math.isnan(score.lesion_precision)
    [score] = metrics.evaluate(
        image(pred.astype(np.uint8)), image(ref.astype(np.uint8)), lesion_wise=True
    )
    assert score.lesion_recall == pytest.approx(1 / 3)
    assert score.lesion_precision == pytest.approx(1 / 2)
    assert metrics.evaluate(image(pred.astype(np.uint8)), image(ref.astype(np.uint8)))[
        0
    ].lesion_f1 is None


# --------------------------------------------------------------------------------------------
# Empty masks
# --------------------------------------------------------------------------------------------


def test_both_empty():
    empty = np.zeros((6, 6, 6), bool)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0
    assert metrics.mean_surface_distance(empty, empty, (1, 1, 1)) == 0.0
    found = metrics.lesion_detection(empty, empty, (1, 1, 1))
    assert (found.recall, found.precision, found.f1) == (1.0, 1.0, 1.0)
    # A table label found in neither image: scored as "both empty", not present.
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    scores = metrics.evaluate(image(labels), image(labels), {1: "liver", 2: "spleen"})
    spleen = scores[1]
    assert (spleen.value, spleen.present, spleen.dice, spleen.hd95_mm) == (2, False, 1.0, 0.0)
    assert metrics.mean_scores(scores)["labels"] == 1


def test_one_empty():
    empty = np.zeros((6, 6, 6), bool)
    cube = empty.copy()
    cube[1:4, 1:4, 1:4] = True
    for pred, ref in ((empty, cube), (cube, empty)):
        assert metrics.dice(pred, ref) == 0.0 and metrics.iou(pred, ref) == 0.0
        assert metrics.hd95(pred, ref, (1, 1, 1)) == math.inf
        assert metrics.mean_surface_distance(pred, ref, (1, 1, 1)) == math.inf
        assert metrics.lesion_detection(pred, ref, (1, 1, 1)).f1 == 0.0
    missed = metrics.lesion_detection(empty, cube, (1, 1, 1))
    assert missed.recall == 0.0 and math.isnan(missed.precision)
    assert missed.missed_volumes_ml == pytest.approx((27e-3,))
    [score] = metrics.evaluate(image(empty.astype(np.uint8)), image(cube.astype(np.uint8)))
    assert score.present and score.dice == 0.0 and score.hd95_mm == math.inf
    summary = metrics.mean_scores([score])
    assert summary["missed"] == 1 and summary["dice"] == 0.0 and math.isnan(summary["hd95_mm"])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda im: im.SetSpacing((1.0, 1.0, 1.2)), "spacing"),
        (lambda im: im.SetOrigin((0.0, 0.01, 0.0)), "origin"),
        (lambda im: im.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),
    ],
)
def test_grid_mismatch_is_a_geometry_error(change, words):
    labels = np.zeros((4, 5, 6), np.uint8)
    pred, ref = image(labels), image(labels)
    change(pred)
    with pytest.raises(GeometryError, match=words) as raised:
        metrics.evaluate(pred, ref, prediction_name="seg.nii.gz", reference_name="truth.nrrd")
    message = str(raised.value)
    assert "seg.nii.gz" in message and "truth.nrrd" in message and "resample" in message


def test_grid_size_mismatch_and_header_round_off():
    with pytest.raises(GeometryError, match="size 6x5x4 vs 6x5x3"):
        metrics.evaluate(image(np.zeros((4, 5, 6), np.uint8)), image(np.zeros((3, 5, 6), np.uint8)))
    # Float32 header round-off is not a different grid.
    pred = image(np.zeros((4, 5, 6), np.uint8), origin=(0.0, 1e-6, 0.0))
    assert metrics.evaluate(pred, image(np.zeros((4, 5, 6), np.uint8))) == []


def test_unknown_labels_are_an_input_error():
    ref = np.zeros((4, 5, 6), np.uint8)
    ref[1, 1, 1], ref[2, 2, 2] = 1, 7
    pred = ref.copy()
    pred[3, 3, 3] = 9
    with pytest.raises(InputError) as raised:
        metrics.evaluate(image(pred), image(ref), {1: "liver"}, prediction_name="model output")
    message = str(raised.value)
    assert "reference contains label values 7" in message
    assert "model output contains label values 7, 9" in message
    assert "label table" in message
    scores = metrics.evaluate(image(pred), image(ref), {0: "background", 1: "liver"},
                              ignore_unknown=True)
    assert [(s.value, s.name, s.dice) for s in scores] == [(1, "liver", 1.0)]


def test_label_maps_must_hold_integers():
    whole = np.zeros((4, 5, 6), np.float32)
    whole[1:3, 1:3, 1:3] = 2.0  # a float file of whole numbers is a label map
    [score] = metrics.evaluate(image(whole), image(whole.astype(np.uint8)))
    assert (score.value, score.dice) == (2, 1.0)
    with pytest.raises(InputError, match="probability"):
        metrics.evaluate(image(whole * 0.3), image(whole.astype(np.uint8)))


# --------------------------------------------------------------------------------------------
# Summaries and files
# --------------------------------------------------------------------------------------------


def two_label_scores() -> list[metrics.LabelScore]:
    ref = np.zeros((10, 12, 14), np.uint8)
    ref[1:5, 1:5, 1:5] = 1
    ref[6:9, 6:10, 6:10] = 2
    pred = ref.copy()
    pred[pred == 2] = 0  # label 2 missed entirely
    pred[1:5, 1:5, 5] = 1
    return metrics.evaluate(image(pred), image(ref), {1: "liver", 2: "spleen", 3: "kidney"},
                            lesion_wise=True)


def test_mean_scores_and_table():
    scores = two_label_scores()
    summary = metrics.mean_scores(scores)
    assert summary["labels"] == 2 and summary["missed"] == 1
    assert summary["dice"] == pytest.approx((scores[0].dice + 0.0) / 2)
    assert summary["hd95_mm"] == pytest.approx(scores[0].hd95_mm)  # the missed one left out
    assert summary["lesion_recall"] == pytest.approx(0.5)
    table = metrics.scores_table(scores)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["value", "name", "dice", "iou"]
    assert "spleen" in table and "inf" in table and "kidney *" in table
    assert "mean (2 labels, 1 missed)" in table
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned


def test_write_csv_and_json(tmp_path):
    scores = two_label_scores()
    written = metrics.write_scores(scores, tmp_path / "scores.csv")
    with open(written, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["liver", "spleen", "kidney"]
    assert float(rows[0]["dice"]) == pytest.approx(scores[0].dice)
    assert float(rows[1]["hd95_mm"]) == math.inf
    assert "lesion_f1" in rows[0]

    metrics.write_scores(scores, tmp_path / "scores.json")
    # strict: no NaN/Infinity
    document = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert document["labels"][1]["hd95_mm"] is None
    assert document["labels"][0]["dice"] == pytest.approx(scores[0].dice)
    assert document["mean"]["labels"] == 2
    assert not list(tmp_path.glob(".*partial*"))


def test_existing_output_is_refused(tmp_path):
    scores = two_label_scores()
    target = tmp_path / "scores.json"
    target.write_text("keep me")
    with pytest.raises(OutputExistsError):
        metrics.write_scores(scores, target)
    assert target.read_text(encoding="utf-8") == "keep me"
    metrics.write_scores(scores, target, overwrite=True)
    assert json.loads(target.read_text(encoding="utf-8"))["mean"]["labels"] == 2
    with pytest.raises(TransferSegError, match=".csv or .json"):
        metrics.write_scores(scores, tmp_path / "scores.txt")


# --------------------------------------------------------------------------------------------
# Real label maps against independent implementations
# --------------------------------------------------------------------------------------------


def monai_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> tuple[float, float]:
    """MONAI's HD95 and symmetric mean surface distance (mm) for two boolean (Z, Y, X) masks."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(ref)[None, None].float()
    spacing = [float(s) for s in spacing_zyx]
    hd95 = compute_hausdorff_distance(
        y_pred, y, include_background=True, percentile=95, spacing=spacing
    )
    msd = compute_average_surface_distance(
        y_pred, y, include_background=True, symmetric=True, spacing=spacing
    )
    return float(hd95), float(msd)


def assert_same_distance(ours: float, theirs: float):
    assert ours == pytest.approx(theirs, rel=DISTANCE_RTOL, abs=DISTANCE_ATOL_MM)


def sitk_hausdorff(pred: sitk.Image, ref: sitk.Image) -> float:
    """SimpleITK's (maximum) Hausdorff distance in mm between two binary images.

    It measures between all object voxels, not surfaces; the two definitions agree unless a
    mask has holes or cavities inside the other mask, which these organs and tumours do not.
    """
    measure = sitk.HausdorffDistanceImageFilter()
    measure.Execute(pred, ref)
    return measure.GetHausdorffDistance()


def test_totalsegmentator_fast_model_against_simpleitk_and_monai():
    case = sample("totalseg_ct")
    reference = sitk.ReadImage(str(case.label))
    prediction = sitk.ReadImage(str(case.extras["prediction_fast"]))
    scores = metrics.evaluate(prediction, reference, case.labels, prediction_name="fast model")
    assert len(scores) == len(case.labels) and all(s.name == case.labels[s.value] for s in scores)

    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(reference, prediction)
    ref_array = sitk.GetArrayFromImage(reference)
    pred_array = sitk.GetArrayFromImage(prediction)
    spacing_zyx = reference.GetSpacing()[::-1]
    compared = 0
    for score in scores:
        ref, pred = ref_array == score.value, pred_array == score.value
        if not (ref.any() and pred.any()):
            # The fast model misses a tiny structure that the full model found.
            assert score.dice == 0.0 and score.hd95_mm == math.inf
            continue
        assert score.dice == pytest.approx(overlap.GetDiceCoefficient(score.value), abs=1e-12)
        assert score.iou == pytest.approx(overlap.GetJaccardCoefficient(score.value), abs=1e-12)
        assert_same_distance(
            metrics.hausdorff_distance(pred, ref, spacing_zyx),
            sitk_hausdorff(prediction == score.value, reference == score.value),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's deprecation chatter
            hd95, msd = monai_distances(pred, ref, spacing_zyx)
        assert_same_distance(score.hd95_mm, hd95)
        assert_same_distance(score.msd_mm, msd)
        compared += 1
    assert compared >= 35
    summary = metrics.mean_scores(scores)
    assert 0.85 < summary["dice"] < 0.95  # the fast (3 mm) model is good but not perfect


def test_anisotropic_lung_tumour_against_simpleitk_and_monai():
    case = sample("pyradiomics_lung1")
    reference = sitk.ReadImage(str(case.label))  # 0.57 x 0.57 x 5 mm
    assert reference.GetSpacing()[2] / reference.GetSpacing()[0] > 5
    tumour = sitk.GetArrayFromImage(reference) == 1
    spacing_zyx = reference.GetSpacing()[::-1]
    # Plausible errors of a model: the tumour eroded by 2 in-plane voxels, and shifted by one
    # slice (5 mm) and 4 columns (2.3 mm).
    eroded = sitk.GetArrayFromImage(
        sitk.BinaryErode(reference == 1, (2, 2, 0), sitk.sitkBall)
    ).astype(bool)
    shifted = np.roll(np.roll(tumour, 1, axis=0), 4, axis=2)
    for pred in (eroded, shifted):
        prediction = sitk.GetImageFromArray(pred.astype(np.uint8))
        prediction.CopyInformation(reference)
        [score] = metrics.evaluate(prediction, reference, case.labels)
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(reference, prediction)
        assert score.dice == pytest.approx(overlap.GetDiceCoefficient(1), abs=1e-12)
        assert score.iou == pytest.approx(overlap.GetJaccardCoefficient(1), abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd95, msd = monai_distances(pred, tumour, spacing_zyx)
        assert_same_distance(score.hd95_mm, hd95)
        assert_same_distance(score.msd_mm, msd)
        assert_same_distance(
            metrics.hausdorff_distance(pred, tumour, spacing_zyx),
            sitk_hausdorff(prediction, reference == 1),
        )
    # The shift is along the coarse axis too, so the worst surface error is at least a slice.
    assert metrics.hausdorff_distance(shifted, tumour, spacing_zyx) >= 5.0


def test_lung_tumour_lesion_wise():
    case = sample("pyradiomics_lung1")
    reference = sitk.ReadImage(str(case.label))
    tumour = sitk.GetArrayFromImage(reference) == 1
    volume = metrics.volume_ml(tumour, reference.GetSpacing()[::-1])
    # Found (eroded) tumour plus a false alarm in a corner of the scan.
    pred = sitk.GetArrayFromImage(sitk.BinaryErode(reference == 1, (2, 2, 0))).astype(bool)
    pred[0:3, 0:10, 0:10] = True
    prediction = sitk.GetImageFromArray(pred.astype(np.uint8))
    prediction.CopyInformation(reference)
    [score] = metrics.evaluate(prediction, reference, case.labels, lesion_wise=True)
    assert score.volume_ref_ml == pytest.approx(volume)
    assert (score.lesions_reference, score.lesions_predicted) == (
        metrics.lesion_detection(tumour, tumour, (1, 1, 1)).reference_lesions, 2
    )
    assert score.lesion_recall == 1.0 and score.lesion_precision == 0.5
