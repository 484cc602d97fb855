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
