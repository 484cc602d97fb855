"""Model-space preprocessing and its inverse, on the real samples and on made volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image, oblique_direction, real_sample

from TransferSegLib import preprocess, volumes
from TransferSegLib.errors import InputError


def per_label_dice(a: np.ndarray, b: np.ndarray, values, voxel_ml: float, min_ml: float = 1.0):
    """{value: Dice} for labels whose reference volume exceeds ``min_ml``."""
    scores = {}
    for value in values:
        ref, out = a == value, b == value
        if ref.sum() * voxel_ml > min_ml:
            scores[value] = 2 * np.logical_and(ref, out).sum() / (ref.sum() + out.sum())
    return scores


def soft_round_trip(label: sitk.Image, spacing) -> np.ndarray:
    """Label map -> per-label fractions on the model grid -> back to the input grid -> argmax."""
    grid = preprocess.model_grid(label, spacing)
    values = [0, *volumes.label_values(label)]
    fractions = preprocess.label_fractions(label, grid, values)
    back = preprocess.probabilities_to_input(fractions, grid, label)
    return np.asarray(values)[back.argmax(0)]


@pytest.mark.parametrize("sample", ["totalseg_ct", "totalseg_mr", "slicerio_chest",
                                    "pyradiomics_breast1"])
def test_nearest_round_trip_through_a_finer_grid_is_exact(sample):
    label = volumes.read_label(real_sample(sample).label)
    spacing = [s / 2 for s in label.GetSpacing()]
    grid = preprocess.model_grid(label, spacing)
    back = preprocess.label_to_input(preprocess.label_to_model_space(label, grid), grid, label)
    assert volumes.Geometry.of(back) == volumes.Geometry.of(label)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back),
                                  sitk.GetArrayViewFromImage(label))


@pytest.mark.parametrize("sample", ["totalseg_ct", "totalseg_mr", "slicerio_chest",
                                    "pyradiomics_lung1", "pyradiomics_brain1", "totalseg_dicom"])
def test_resample_and_inverse_keeps_dice_on_real_labels(sample):
    """At 1 mm model spacing every label over 1 mL keeps Dice >= 0.99 (down- and upsampling)."""
    label = volumes.read_label(real_sample(sample).label)
    back = soft_round_trip(label, (1.0, 1.0, 1.0))
    array = sitk.GetArrayViewFromImage(label)
    voxel_ml = volumes.Geometry.of(label).voxel_volume_ml
    scores = per_label_dice(array, back, volumes.label_values(label), voxel_ml)
    assert scores, "no label over 1 mL"
    worst = min(scores, key=scores.get)
    assert scores[worst] >= 0.99, f"label {worst}: Dice {scores[worst]:.4f}"


def test_inverse_lands_on_the_exact_input_grid_for_oblique_scans():
    rng = np.random.default_rng(3)
    label = make_image(rng.integers(0, 3, (12, 14, 16)).astype(np.uint8), spacing=(0.8, 1.1, 2.4),
                       origin=(10.5, -33.25, 7.0), direction=oblique_direction(30))
    grid = preprocess.model_grid(label, (1.5, 1.5, 1.5), "RAS")
    back = preprocess.label_to_input(preprocess.label_to_model_space(label, grid), grid, label)
    assert volumes.Geometry.of(back) == volumes.Geometry.of(label)
    probabilities = preprocess.probabilities_to_input(
        preprocess.label_fractions(label, grid, [0, 1, 2]), grid, label)
    assert probabilities.shape == (3, 12, 14, 16)


def test_model_grid_reorients_and_covers_the_scan():
    case = real_sample("totalseg_ct")  # stored RAS-like (direction diag(-1, -1, 1))
    image = volumes.read_volume(case.image)
    grid = preprocess.model_grid(image, (1.5, 1.5, 1.5), "LPS")
    assert grid.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert grid.size == (244, 202, 60)  # 3 mm -> 1.5 mm doubles every axis
    extent_in = np.array(image.GetSize()) * image.GetSpacing()
    extent_out = np.array(grid.size) * grid.spacing
    np.testing.assert_allclose(extent_in, extent_out)
    array, grid2 = preprocess.to_model_space(image, (1.5, 1.5, 1.5), {"kind": "ct",
                                                                       "window": [-500, 400]})
    assert grid2 == grid and array.shape == (60, 202, 244) and array.dtype == np.float32
    assert array.min() == 0.0 and array.max() == 1.0


def test_ct_window_and_mr_zscore():
    hu = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    np.testing.assert_allclose(preprocess.normalise(hu, {"kind": "ct", "window": [-1000, 1000]}),
                               [0.0, 0.0, 0.5, 1.0, 1.0])
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, 100_000)
    mr[:10] = 1e6  # a few hot voxels must not dominate
    out = preprocess.normalise(mr, {"kind": "mr", "percentiles": [0.5, 99.5]})
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4
    assert out.max() < 5
    with pytest.raises(InputError, match="Unknown intensity normalisation"):
        preprocess.normalise(hu, {"kind": "sharpen"})
    with pytest.raises(InputError, match="empty"):
        preprocess.normalise(hu, {"kind": "ct", "window": [400, -500]})


def test_default_normalisation_per_modality():
    assert preprocess.default_normalisation("CT")["kind"] == "ct"
    assert preprocess.default_normalisation("MRI")["kind"] == "mr"
    assert preprocess.default_normalisation("PET")["kind"] == "zscore"


def test_bad_spacing_and_orientation_are_refused():
    image = make_image(np.zeros((4, 4, 4), np.int16))
    with pytest.raises(InputError, match="three positive numbers"):
        preprocess.model_grid(image, (1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="three-letter code"):
        preprocess.model_grid(image, (1.0, 1.0, 1.0), "XYZ")
