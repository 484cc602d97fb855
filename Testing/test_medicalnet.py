"""MedicalNet (Med3D): the published topology, its parameter counts, and importing its files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image
from torch import nn
from torch.nn import functional as F

from TransferSegLib import inference, networks
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import medicalnet as importer
from TransferSegLib.nets.medicalnet import MedicalNet, ZeroPadShortcut

# MedicalNet's README, "Computational Cost": millions of weights per network (the encoder's
# parameters and batch-norm running statistics; the published files hold exactly these).
PUBLISHED_MILLIONS = {10: 14.36, 18: 32.99, 34: 63.31, 50: 46.21, 101: 85.31, 152: 117.51,
                      200: 126.74}
# The README's "network structure parameter settings".
PUBLISHED_SHORTCUTS = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B", 152: "B", 200: "B"}

# Our module prefix -> the published code's (``conv_seg`` is its nn.Sequential segmentation
# branch: 0 transposed conv, 1 norm, 2 ReLU, 3 conv, 4 norm, 5 ReLU, 6 output conv).
PUBLISHED_NAMES = {"stem.conv.": "conv1.", "stem.bn.": "bn1.", "up.conv.": "conv_seg.0.",
                   "up.bn.": "conv_seg.1.", "refine.conv.": "conv_seg.3.",
                   "refine.bn.": "conv_seg.4.", "head.": "conv_seg.6."}
LABELS = {"0": "background", "1": "liver", "2": "spleen"}


def encoder_weight_count(model: nn.Module) -> int:
    blocks = networks.encoder_blocks("medicalnet", model)
    return sum(v.numel() for block in blocks for k, v in block.state_dict().items()
               if not k.endswith("num_batches_tracked"))


def published_layout(model: nn.Module, with_head: bool, old_pytorch: bool = True) -> dict:
    """``model``'s weights as a published file: ``{"state_dict": {"module.<published name>"}}``,
    without batch-norm step counters (PyTorch 0.4, as published) and, unless ``with_head``,
    without the segmentation branch (the pretrained encoders)."""
    tensors = {}
    for key, value in model.state_dict().items():
        if old_pytorch and key.endswith("num_batches_tracked"):
            continue
        for ours, published in PUBLISHED_NAMES.items():
            if key.startswith(ours):
                key = published + key[len(ours):]
                break
        if not with_head and key.startswith("conv_seg."):
            continue
        tensors["module." + key] = value.clone()
    return {"state_dict": tensors}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every weight and running statistic set to distinct random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            elif value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.mark.parametrize("depth", sorted(PUBLISHED_MILLIONS))
def test_weight_counts_match_the_published_table(depth):
    with torch.device("meta"):
        model = networks.build_network("medicalnet", 1, 2, depth=depth)
    assert model.shortcut == PUBLISHED_SHORTCUTS[depth]
    assert round(encoder_weight_count(model) / 1e6, 2) == PUBLISHED_MILLIONS[depth]


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
def test_the_other_shortcut_type_would_not_match_the_table(depth):
    other = {"A": "B", "B": "A"}[PUBLISHED_SHORTCUTS[depth]]
    with torch.device("meta"):
        model = networks.build_network("medicalnet", 1, 2, depth=depth, shortcut=other)
    assert round(encoder_weight_count(model) / 1e6, 2) != PUBLISHED_MILLIONS[depth]


def test_shortcut_types_are_as_published():
    with torch.device("meta"):
        basic_b = networks.build_network("medicalnet", 1, 2, depth=10)
        basic_a = networks.build_network("medicalnet", 1, 2, depth=18)
        bottleneck = networks.build_network("medicalnet", 1, 2, depth=50)
    assert isinstance(basic_b.layer2[0].downsample, nn.Sequential)
    assert basic_b.layer2[0].downsample[0].kernel_size == (1, 1, 1)
    assert basic_b.layer1[0].downsample is None  # same width and stride: identity
    assert isinstance(basic_a.layer2[0].downsample, ZeroPadShortcut)
    assert not list(basic_a.layer2[0].downsample.parameters())
    assert isinstance(bottleneck.layer1[0].downsample, nn.Sequential)  # 64 -> 256 channels
    assert bottleneck.layer1[0].conv3.out_channels == 256


def test_zero_pad_shortcut_subsamples_and_pads_with_zero_channels():
    x = torch.randn(2, 3, 5, 6, 7)
    y = ZeroPadShortcut(8, 2)(x)
    assert y.shape == (2, 8, 3, 3, 4)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2, ::2])
    assert torch.count_nonzero(y[:, 3:]) == 0


def test_dilated_stages_keep_the_resolution_and_logits_come_back_full_size():
    model = randomised(networks.build_network("medicalnet", 1, 3, depth=10))
    sizes = {}

    def record(name):
        def hook(module, args, out):
            sizes[name] = tuple(out.shape[2:])
        return hook

    for name in ("stem", "layer1", "layer2", "layer3", "layer4", "up", "refine", "head"):
        getattr(model, name).register_forward_hook(record(name))
    with torch.no_grad():
        output = model(torch.randn(1, 1, 24, 32, 40))
    assert output.shape == (1, 3, 24, 32, 40)
    assert sizes["stem"] == sizes["layer1"] == sizes["up"] == (6, 8, 10)
    assert sizes["layer2"] == sizes["layer3"] == sizes["layer4"] == (3, 4, 5)
    assert sizes["refine"] == sizes["head"] == (24, 32, 40)
    assert model.layer3[0].conv1.dilation == (2, 2, 2)
    assert model.layer4[0].conv2.dilation == (4, 4, 4)
    assert networks.patch_divisor("medicalnet", {"depth": 10}) == 8


def test_logits_equal_the_published_quarter_resolution_logits_upsampled():
    model = randomised(networks.build_network("medicalnet", 1, 3, depth=10))
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        features = model.up(model.layer4(model.layer3(model.layer2(model.layer1(
            model.stem(x))))))
        quarter = model.head(F.relu(model.refine.bn(model.refine.conv(features))))
        published = F.interpolate(quarter, size=(16, 24, 32), mode="trilinear",
                                  align_corners=False)
        ours = model(x)
    assert quarter.shape[2:] == (4, 6, 8)
    torch.testing.assert_close(ours, published, rtol=1e-4, atol=1e-5)


def test_parts_are_registered_for_transfer_learning():
    model = networks.build_network("medicalnet", 1, 3, depth=10)
    assert networks.encoder_blocks("medicalnet", model) == [
        model.stem, model.layer1, model.layer2, model.layer3, model.layer4]
    assert networks.decoder_blocks("medicalnet", model) == [model.up, model.refine]
    head = networks.head("medicalnet", model)
    assert isinstance(head, nn.Conv3d) and head.weight.shape == (3, 32, 1, 1, 1)
    assert networks.resolve_kwargs("medicalnet", depth=34) == {"depth": 34, "shortcut": "A"}


# --- importing the published files ---------------------------------------------------------------

@pytest.fixture(scope="module")
def depth10():
    torch.manual_seed(0)
    return randomised(MedicalNet(in_channels=1, out_channels=3, depth=10))


def test_encoder_file_lands_tensor_by_tensor(tmp_path, depth10):
    data = published_layout(depth10, with_head=False)
    tensors = data["state_dict"]
    # Facts of the published layout: the stem, a type-B shortcut, no segmentation branch.
    assert tensors["module.conv1.weight"].shape == (64, 1, 7, 7, 7)
    assert tensors["module.layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1, 1)
    assert "module.bn1.num_batches_tracked" not in tensors
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save(data, path)

    model, card, report = importer.load(path, {"labels": LABELS, "spacing": [1.0, 1.0, 1.0],
                                               "patch_size": [64, 64, 32]})

    assert report.ok and len(report.loaded) == len(tensors)
    state = model.state_dict()
    assert torch.equal(state["stem.conv.weight"], tensors["module.conv1.weight"])
    assert torch.equal(state["stem.bn.running_var"], tensors["module.bn1.running_var"])
    for key, value in tensors.items():
        ours = importer.convert({key[len("module."):]: value})
        (name, tensor), = ours.items()
        assert torch.equal(state[name], tensor), name
    new = set(report.expected_missing)
    assert {"up.conv.weight", "up.conv.bias", "refine.conv.weight", "head.weight"} <= new
    assert all(k.startswith(("up.", "refine.", "head.")) or k.endswith("num_batches_tracked")
               for k in new)
    assert card.arguments == {"depth": 10, "shortcut": "B"}  # read from the file
    assert card.normalisation == {"kind": "zscore", "nonzero": True}
    assert card.labels == {0: "background", 1: "liver", 2: "spleen"}
    assert "encoder only" in report.text()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_file_with_its_segmentation_branch_reproduces_the_network(tmp_path, depth10):
    path = tmp_path / "resnet_10_finetuned.pth"
    torch.save(published_layout(depth10, with_head=True, old_pytorch=False), path)
    model, _, report = importer.load(path, {"labels": LABELS})
    assert report.ok and not report.expected_missing
    assert torch.equal(model.head.weight, depth10.head.weight)
    x = torch.randn(1, 1, 16, 24, 16)
    with torch.no_grad():
        assert torch.equal(model(x), depth10(x))


def test_head_for_other_labels_is_dropped_and_new(tmp_path, depth10):
    path = tmp_path / "resnet_10_brains18.pth"
    torch.save(published_layout(depth10, with_head=True), path)
    model, card, report = importer.load(path, {"labels": {"0": "background", "1": "tumour"}})
    assert report.dropped == ["head.weight"] and "head.weight" in report.expected_missing
    assert model.head.weight.shape == (2, 32, 1, 1, 1)
    assert torch.equal(model.refine.conv.weight, depth10.refine.conv.weight)
    assert card.out_channels == 2


def test_file_of_another_depth_is_refused_naming_what_does_not_fit(tmp_path):
    with torch.device("meta"):
        depth18 = MedicalNet(in_channels=1, out_channels=2, depth=18)
    # Zero-size storage views: the right names and shapes, next to nothing on disk.
    tensors = {"module." + k: torch.zeros((), dtype=v.dtype).expand(v.shape)
               for k, v in depth18.state_dict().items() if not k.startswith(("up.", "refine.",
                                                                             "head."))}
    tensors = {k.replace("module.stem.conv.", "module.conv1.")
               .replace("module.stem.bn.", "module.bn1."): v for k, v in tensors.items()}
    path = tmp_path / "resnet_18_23dataset.pth"
    torch.save({"state_dict": tensors}, path)
    with pytest.raises(ModelFileError) as caught:
        importer.load(path, {"labels": LABELS, "arguments": {"depth": 10}})
    message = str(caught.value)
    assert "ResNet-18 with shortcut type A" in message
    assert "layer1.1.conv1.weight" in message  # the second block of stage 1: not in depth 10
    assert "depth 10" in message


def test_file_needing_pickle_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(MedicalNet(depth=10), path)  # the nn.Module object itself
    with pytest.raises(ModelFileError, match="pickle"):
        importer.load(path, {"labels": LABELS})


def test_imported_encoder_segments_a_volume(tmp_path, depth10):
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save(published_layout(depth10, with_head=True), path)
    model, card, _ = importer.load(path, {"labels": LABELS, "spacing": [2.0, 2.0, 2.0],
                                          "patch_size": [32, 32, 32]})
    array = np.zeros((20, 30, 26), np.float32)
    array[4:16, 8:22, 6:20] = np.random.default_rng(0).normal(300, 40, (12, 14, 14))
    image = make_image(array, spacing=(2.0, 2.0, 2.0))
    result = inference.segment(model, card, image, device="cpu")
    assert result.label.GetSize() == image.GetSize()
    assert set(np.unique(inference.sitk.GetArrayViewFromImage(result.label))) <= {0, 1, 2}
