"""Whole-volume segmentation: model space and back, exact output geometry, model-file use."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_image, oblique_direction, real_sample

from TransferSegLib import checkpoint, inference, networks, segmentations, volumes
from TransferSegLib.errors import InputError, OutputExistsError


class Threshold(torch.nn.Module):
    """A stand-in network whose answer is known: label 1 where the normalised input > 0.5.

    Logits (N, 2, Z, Y, X): channel 0 is 0.5 everywhere, channel 1 the input, sharpened.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 0.5), x], dim=1) * 50.0


def threshold_card(spacing, orientation="LPS", patch=(32, 32, 16)) -> checkpoint.ModelCard:
    return checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=2, labels={0: "background", 1: "dense"},
        spacing=list(spacing), patch_size=list(patch),
        normalisation={"kind": "ct", "window": [-1000.0, 1000.0]}, orientation=orientation,
        label_values={"background": 0, "dense": 7},
    )


def test_a_result_gives_each_structures_volume_and_names_those_found_nowhere():
    array = np.zeros((10, 20, 20), np.uint8)
    array[2:6, 5:15, 5:15] = 1  # 400 voxels of 2 x 2 x 2.5 mm = 4 mL
    array[0, 0, 0] = 3  # one voxel: 0.01 mL
    label = sitk.GetImageFromArray(array)
    label.SetSpacing((2.0, 2.0, 2.5))
    result = inference.SegmentationResult(label, {1: "liver", 2: "stomach", 3: "spleen"})
    assert result.volumes_ml() == pytest.approx({"liver": 4.0, "stomach": 0.0, "spleen": 0.01})
    text = inference.describe_volumes(result.volumes_ml())
    assert text.startswith("liver 4.0 mL, spleen < 0.1 mL; NOT FOUND: stomach (if the scan "
                           "shows it, draw it in Segment Editor")
    assert "NOT FOUND" not in inference.describe_volumes({"liver": 4.0})
    assert inference.describe_volumes({"liver": 0.0, "spleen": 0.0}).startswith(
        "nothing found; NOT FOUND: liver, spleen (if the scan shows them")


def test_segmentation_at_the_scan_spacing_is_exact_despite_reorientation():
    """totalseg_ct is stored with flipped x and y; the model works in LPS and must undo it."""
    image = volumes.read_volume(real_sample("totalseg_ct").image)
    result = inference.segment(Threshold(), threshold_card(image.GetSpacing()), image,
                               device="cpu")
    assert volumes.Geometry.of(result.label) == volumes.Geometry.of(image)
    expected = np.where(sitk.GetArrayViewFromImage(image) > 0, 7, 0)  # HU > 0 <=> x > 0.5
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.label), expected)
    assert result.labels == {7: "dense"}


@pytest.mark.parametrize("sample", ["pyradiomics_brain1", "slicerio_chest"])
def test_segmentation_at_another_spacing_lands_on_the_input_grid(sample):
    image = volumes.read_volume(real_sample(sample).image)
    card = threshold_card((2.0, 2.0, 2.0), orientation="RAS")
    card.normalisation = {"kind": "mr", "percentiles": [1, 99]} if sample.startswith("pyr") \
        else card.normalisation
    result = inference.segment(Threshold(), card, image, device="cpu", keep_probabilities=True)
    assert volumes.Geometry.of(result.label) == volumes.Geometry.of(image)
    assert result.probabilities.shape == (2, *sitk.GetArrayViewFromImage(image).shape)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-4)
    # The probabilities' argmax is the label map.
    np.testing.assert_array_equal(np.where(result.probabilities.argmax(0) == 1, 7, 0),
                                  sitk.GetArrayViewFromImage(result.label))
    assert 0 < (sitk.GetArrayViewFromImage(result.label) == 7).mean() < 1


def test_oblique_volume_smaller_than_a_patch_is_padded_and_restored():
    array = np.full((5, 9, 11), -500, np.int16)
    array[2:4, 3:7, 4:9] = 500
    image = make_image(array, spacing=(1.2, 0.9, 3.0), origin=(5, -7, 2),
                       direction=oblique_direction(35))
    result = inference.segment(Threshold(), threshold_card(image.GetSpacing()), image,
                               device="cpu")
    assert volumes.Geometry.of(result.label) == volumes.Geometry.of(image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.label) == 7, array > 0)


def _ct_with_table_and_arm() -> tuple[sitk.Image, dict[str, tuple[int, int]]]:
    """A CT of 0.8 x 0.8 x 2.5 mm: a trunk (soft tissue, air-filled lungs inside it), an arm
    4 mm beside it and the table 3 mm under it, in air; and where each lies (x and y voxel
    ranges, array order reversed)."""
    z, y, x = np.mgrid[0:12, 0:260, 0:300]
    array = np.full(x.shape, -1000, np.int16)
    trunk = ((x - 140) / 100.0) ** 2 + ((y - 120) / 70.0) ** 2 <= 1
    array[trunk] = 40
    array[trunk & ((x - 110) ** 2 + (y - 110) ** 2 < 30 ** 2)] = -800  # a lung
    arm = (x - 265) ** 2 + (y - 120) ** 2 <= 21 ** 2  # 240 + 4 mm of air to 244
    array[arm] = 60
    array[(y >= 194) & (y < 240) & (x >= 20) & (x < 280)] = 100  # the table, 190 + 4 mm on
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    return image, {"trunk_x": (40, 241), "trunk_y": (50, 191), "arm_x": (244, 287),
                   "table_y": (194, 240)}


def test_a_ct_is_cropped_to_the_body_without_the_table_or_the_arms():
    image, where = _ct_with_table_and_arm()
    box = inference.body_box(image)
    margin = inference.BODY_MARGIN_MM / 0.8 + 2 + 1  # the margin, a 2 mm cell, rounding
    for axis, (start, stop) in ((0, where["trunk_x"]), (1, where["trunk_y"])):
        assert start - margin <= box[axis].start <= start
        assert stop <= box[axis].stop <= stop + margin
    assert box[0].stop < where["arm_x"][1] and box[1].stop < where["table_y"][1]
    assert box[2] == slice(0, 12)
    assert inference.body_box(image[35:244, 45:194]) is None  # framed to the body already
    air = sitk.GetImageFromArray(np.full((4, 50, 50), -1000, np.int16))
    assert inference.body_box(air) is None  # no body: the scan is left as it is


def test_a_model_that_learnt_its_scans_framing_segments_only_the_body():
    image, where = _ct_with_table_and_arm()
    card = threshold_card(image.GetSpacing())
    everything = sitk.GetArrayFromImage(
        inference.segment(Threshold(), card, image, device="cpu").label)
    assert everything[:, slice(*where["table_y"]), 100].all()  # the table is "dense"
    card.inference = {"crop_body": True}
    result = inference.segment(Threshold(), card, image, device="cpu", keep_probabilities=True)
    assert volumes.Geometry.of(result.label) == volumes.Geometry.of(image)
    label = sitk.GetArrayFromImage(result.label)
    box = inference.body_box(image)
    inside = (slice(None), box[1], box[0])
    np.testing.assert_array_equal(label[inside], everything[inside])  # as before inside
    outside = np.ones(label.shape, bool)
    outside[inside] = False
    assert not label[outside].any() and everything[outside].any()  # table and arm dropped
    assert (result.probabilities[0][outside] == 1).all()
    kept = inference.segment(Threshold(), card, image, device="cpu", crop_body=False).label
    np.testing.assert_array_equal(sitk.GetArrayFromImage(kept), everything)  # the override
    card.normalisation = {"kind": "mr", "percentiles": [1, 99]}
    with pytest.raises(InputError, match="cannot be cropped to the body"):
        inference.segment(Threshold(), card, image, device="cpu")


def test_validation_scores_a_body_cropping_model_on_what_segment_gives_it(tmp_path):
    """Validation Dice (the training curves, the steps-to-Dice ratio) of a model whose card
    crops to the body is measured on the body, as its segmentations are: the table and the arm
    outside the box do not count against it, as they never reach the user."""
    from TransferSegLib.datasets import Case, LabelTable
    from TransferSegLib.sampling import prepare_case
    from TransferSegLib.training import validate

    image, where = _ct_with_table_and_arm()
    array = sitk.GetArrayFromImage(image)
    reference = np.zeros(array.shape, np.uint8)
    reference[:, slice(*where["trunk_y"]), slice(*where["trunk_x"])] = 1
    reference &= (array > 0)  # the trunk's soft tissue, not the arm or the table
    label = sitk.GetImageFromArray(reference)
    label.CopyInformation(image)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "ct_label.nii.gz"))
    case = Case("ct", (tmp_path / "ct.nii.gz",), tmp_path / "ct_label.nii.gz")
    table = LabelTable({1: "dense"})
    card = threshold_card(image.GetSpacing())
    for crop in (False, True):
        card.inference = {"crop_body": True} if crop else {}
        label = sitk.GetArrayFromImage(inference.segment(Threshold(), card, image,
                                                         device="cpu").label) == 7
        expected = 2 * (label & (reference == 1)).sum() / (label.sum() + reference.sum())
        prepared = prepare_case(case, table, card, body_crop=crop)
        scored = validate(Threshold(), [prepared], card, torch.device("cpu"), 0.25)["dense"]
        assert scored == pytest.approx(expected, abs=1e-6)
        assert (scored > 0.9) == crop  # uncropped, the table and the arm count (0.74)
    assert all(n < m for n, m in zip(prepared.image.shape[2:], array.shape[1:], strict=True))


def test_model_file_round_trip_gives_identical_segmentations(tmp_path):
    torch.manual_seed(0)
    model = networks.build_network("unet", 1, 3, channels=[4, 8, 16], strides=[2, 2],
                                   num_res_units=1)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=3,
        labels={0: "background", 1: "liver", 2: "spleen"},
        arguments=networks.resolve_kwargs("unet", channels=[4, 8, 16], strides=[2, 2],
                                          num_res_units=1),
        spacing=[4.0, 4.0, 4.0], patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-500.0, 400.0]}, modality="CT",
    )
    path = checkpoint.save_model(tmp_path / "model.safetensors", model, card)
    image = volumes.read_volume(real_sample("totalseg_ct").image)
    direct = inference.segment(model, card, image, device="cpu", keep_probabilities=True)
    loaded, loaded_card = checkpoint.load_model(path)
    again = inference.segment(loaded, loaded_card, image, device="cpu", keep_probabilities=True)
    np.testing.assert_array_equal(direct.probabilities, again.probabilities)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(direct.label),
                                  sitk.GetArrayViewFromImage(again.label))

    output = tmp_path / "seg.seg.nrrd"
    result = inference.segment_file(path, real_sample("totalseg_ct").image, output,
                                    probabilities_output=tmp_path / "p.nrrd")
    written = segmentations.read_segmentation(output)
    assert {s.name for s in written.segments} <= {"liver", "spleen"}
    assert set(result.labels.values()) == {"liver", "spleen"}
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(written.layers[0]),
                                  sitk.GetArrayViewFromImage(direct.label))
    probabilities = sitk.ReadImage(str(tmp_path / "p.nrrd"))
    assert probabilities.GetNumberOfComponentsPerPixel() == 3


def test_existing_output_is_refused_before_any_work(tmp_path):
    case = real_sample("pyradiomics_breast1")
    output = tmp_path / "seg.nii.gz"
    output.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        inference.segment_file(tmp_path / "no-model.safetensors", case.image, output)
    assert output.read_bytes() == b"keep me"
    with pytest.raises(InputError, match="also an input"):
        inference.segment_file(tmp_path / "m.safetensors", case.image, case.image,
                               overwrite=True)


def test_channel_count_must_match_the_model():
    image = make_image(np.zeros((4, 4, 4), np.int16))
    card = threshold_card((1, 1, 1))
    with pytest.raises(InputError, match="1 input channel"):
        inference.segment(Threshold(), card, [image, image], device="cpu")


def test_device_selection():
    assert inference.select_device("cpu").type == "cpu"
    assert inference.select_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(InputError, match="Unknown device"):
        inference.select_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            inference.select_device("cuda")
