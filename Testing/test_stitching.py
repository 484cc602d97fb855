"""Labels from a slab-at-a-time sliding window: the same label map as MONAI's whole-volume
blend and argmax, on every voxel, with a fraction of its memory."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from TransferSegLib import checkpoint, inference, preprocess, stitching
from TransferSegLib.tiling import Windows, ready


def _network(out_channels: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, out_channels, channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                norm="instance").eval()


def _monai_labels(model, array, patch, overlap, batch, padding) -> np.ndarray:
    """What a MONAI tutorial does: blend the whole volume, then argmax."""
    with torch.no_grad():
        logits = sliding_window_inference(
            torch.from_numpy(array)[None], patch, batch, model, overlap=overlap,
            mode="gaussian", padding_mode="replicate" if padding == "edge" else "constant")
    return logits[0].argmax(0).numpy()


@pytest.mark.parametrize(("shape", "patch", "overlap", "batch", "padding"), [
    ((40, 50, 60), (16, 32, 32), 0.25, 3, "constant"),  # ring along z
    ((20, 70, 30), (16, 16, 16), 0.5, 2, "constant"),  # ring along y
    ((10, 30, 70), (16, 16, 32), 0.5, 1, "edge"),  # thinner than a patch: padded; along x
    ((33, 33, 33), (32, 32, 32), 0.0, 4, "constant"),  # two windows per axis, no overlap
    ((16, 16, 16), (16, 16, 16), 0.25, 2, "constant"),  # exactly one patch
])
def test_labels_equal_monai_blend_then_argmax(shape, patch, overlap, batch, padding):
    """With float32 scores (a small ring's), every voxel; with float16 (a large ring's), all but
    the near-ties (a random network on noise has many: real scans far fewer,
    bench/inference.py)."""
    model = _network()
    array = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    expected = _monai_labels(model, array, patch, overlap, batch, padding)
    assert len(np.unique(expected)) > 1  # a network answering one label everywhere tests nothing
    windows = Windows(patch, overlap, batch, padding)
    options = {"device": torch.device("cpu"), "out_channels": 5}
    exact = stitching.predict_labels(model, array, windows, accumulate=torch.float32, **options)
    assert exact.shape == shape and exact.dtype == np.uint8
    np.testing.assert_array_equal(exact, expected)
    assert np.array_equal(stitching.predict_labels(model, array, windows, **options), exact)
    half = stitching.predict_labels(model, array, windows, accumulate=torch.float16, **options)
    assert half.shape == shape and half.dtype == np.uint8
    assert np.mean(half == expected) > 0.999


def test_ring_holds_one_patch_of_planes_not_the_volume(monkeypatch):
    """The score buffer is C x patch x the two other sides, along the axis where that is
    smallest; MONAI's is C x the whole volume (plus its weights). A ring over HALF_ABOVE bytes
    in float32 holds float16."""

    class Recorder(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, 1 - x], dim=1)

    real_zeros, made = torch.zeros, []

    def zeros(*args, **kwargs):
        tensor = real_zeros(*args, **kwargs)
        made.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    array = np.random.default_rng(0).random((1, 24, 100, 60), dtype=np.float32)
    ring = (2, 24, 16, 60)  # along y: 16 / 100 is the thinnest share
    monkeypatch.setattr(torch, "zeros", zeros)
    for limit, kind in ((4 * np.prod(ring), torch.float32), (4 * np.prod(ring) - 1, torch.float16)):
        made.clear()
        monkeypatch.setattr(stitching, "HALF_ABOVE", limit)
        stitching.predict_labels(Recorder(), array, Windows((16, 16, 16)),
                                 device=torch.device("cpu"), out_channels=2)
        assert (ring, kind) in made
        assert all(np.prod(shape) < 2 * 24 * 100 * 60 / 4 for shape, _ in made)


class Bins(torch.nn.Module):
    """300 channels; the largest is the one nearest 300 x the input (values 0 ... 299)."""

    def forward(self, x):
        centres = torch.arange(300, dtype=x.dtype).view(1, 300, 1, 1, 1)
        return -(x * 300 - centres) ** 2


def test_many_labels_come_back_as_uint16():
    model = Bins()
    array = np.random.default_rng(2).random((1, 8, 12, 12), dtype=np.float32)
    got = stitching.predict_labels(model, array, Windows((8, 8, 8)), device=torch.device("cpu"),
                                   out_channels=300)
    assert got.dtype == np.uint16 and got.max() > 255
    np.testing.assert_array_equal(got, _monai_labels(model, array, (8, 8, 8), 0.25, 2,
                                                     "constant"))


def test_half_ring_takes_scores_beyond_float16_range():
    """Scores far past float16's largest (65504) do not overflow into ties in the ring: each
    window's scores are taken relative to its voxel's largest before they are added. Windows
    that do not overlap leave nothing to round: every voxel is the float32 ring's."""
    network = _network(3)

    class Loud(torch.nn.Module):
        def forward(self, x):
            return network(x) * 1e6

    array = np.random.default_rng(5).random((1, 16, 32, 48), dtype=np.float32)
    windows, options = Windows((16, 16, 16), overlap=0.0), {"device": torch.device("cpu"),
                                                            "out_channels": 3}
    exact = stitching.predict_labels(Loud(), array, windows, accumulate=torch.float32,
                                     **options)
    half = stitching.predict_labels(Loud(), array, windows, accumulate=torch.float16,
                                    **options)
    assert len(np.unique(exact)) > 1
    np.testing.assert_array_equal(half, exact)


def test_window_normalisation_equals_normalising_the_scan():
    """A CT given as int16 HU, normalised one batch of windows at a time, gives the labels
    of the normalised float volume."""
    model = _network(3)
    hu = np.random.default_rng(3).integers(-1024, 2000, (1, 30, 40, 40)).astype(np.int16)
    recipe = {"kind": "ct", "window": [-1000.0, 1000.0]}
    whole = preprocess.normalise(hu, recipe)
    windows, options = Windows((16, 16, 16)), {"device": torch.device("cpu"), "out_channels": 3}
    lazily = stitching.predict_labels(model, hu, windows,
                                      transform=lambda b: preprocess.normalise(b, recipe),
                                      **options)
    np.testing.assert_array_equal(lazily, stitching.predict_labels(model, whole, windows,
                                                                   **options))
    with pytest.raises(ValueError, match="at least one patch"):
        stitching.predict_labels(model, hu[:, :8], windows, transform=lambda b: b, **options)


def test_segment_takes_the_slab_path_and_agrees_with_the_full_blend():
    """``segment`` on a scan already on the model's grid (labels only) uses the slab path;
    asking for probabilities takes the full blend: the label maps are the same."""
    image = sitk.GetImageFromArray(
        np.random.default_rng(4).integers(-1000, 1500, (24, 40, 36)).astype(np.int16))
    image.SetSpacing((1.5, 1.5, 2.0))
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=4,
        labels={0: "background", 1: "a", 2: "b", 3: "c"}, spacing=[1.5, 1.5, 2.0],
        patch_size=[16, 16, 16], normalisation={"kind": "ct", "window": [-1000.0, 1000.0]})
    model = _network(4)
    calls = []
    real = stitching.predict_labels

    def counted(*args, **kwargs):
        calls.append(kwargs.get("transform") is not None)
        return real(*args, **kwargs)

    stitching.predict_labels = counted
    try:
        slab = inference.segment(model, card, image, device="cpu")
        full = inference.segment(model, card, image, device="cpu", keep_probabilities=True)
    finally:
        stitching.predict_labels = real
    assert calls == [True]  # once, normalising windows of the int16 scan
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(slab.label),
                                  sitk.GetArrayViewFromImage(full.label))
    assert len(np.unique(sitk.GetArrayViewFromImage(slab.label))) > 1


def test_windows_run_channels_last_and_other_layouts_are_left_alone():
    """Both window paths feed the network channels-last batches with channels-last 3D weights
    (a CPU's transposed convolution then needs no im2col buffer); a network with 2D weights is
    left as it is."""
    model, seen = _network(), []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(
            memory_format=torch.channels_last_3d)))
    array = np.random.default_rng(0).random((1, 20, 20, 20), dtype=np.float32)
    windows = Windows((16, 16, 16), 0.25, 2)
    cpu = torch.device("cpu")
    stitching.predict_labels(model, array, windows, device=cpu, out_channels=5)
    inference.predict_logits(model, array, windows, device=cpu, out_channels=5)
    assert seen and all(seen)
    assert model.model[0].conv.unit0.conv.weight.is_contiguous(
        memory_format=torch.channels_last_3d)
    flat = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv3d(2, 2, 1))
    assert ready(flat, cpu)[0].weight.is_contiguous()
