"""deepbet: the TorchScript reader that runs nothing, our LinkNet3D, and the published weights.

The reader is tested on archives made here with ``torch.jit.save``; the published model on
the fetched ``deepbet-1.0.2`` file (``transferseg models fetch --registry``) and the ICBM152
sample.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from brainmask import icbm152_brain_mask
from conftest import real_sample
from torch import nn

from TransferSegLib import importers, inference, networks, preprocess, zoo
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import deepbet
from TransferSegLib.importers.torchscript import read_torchscript_tensors
from TransferSegLib.samples import sha256_of

MODEL_ID = "deepbet-1.0.2"
PARAMETERS = 2_126_258  # counted in the published file


class _Scripted(nn.Module):
    """Parameters, buffers of three dtypes, a non-contiguous tensor, a nested submodule and a
    list attribute: what a TorchScript module tree holds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3)
        self.norm = nn.BatchNorm3d(4)  # running stats (float) and num_batches_tracked (int64)
        self.body = nn.Sequential(nn.Conv3d(4, 2, 1), nn.ReLU())
        self.register_buffer("scale", torch.arange(3, dtype=torch.float16))
        self.table = nn.Parameter(torch.randn(5, 6).t())  # strides (1, 6)
        self.sizes = [1, 2, 3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(self.conv(x)))


def _saved_module(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = _Scripted()
    module.norm.running_mean.uniform_()
    module.norm.num_batches_tracked.fill_(7)
    path = tmp_path / "module.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    return path, module.state_dict()


def _rewrite(source: Path, target: Path, change) -> None:
    """Copy a zip archive member by member; ``change(name, data)`` returns the new bytes, or
    a list of (name, bytes) to write instead."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            result = change(info.filename, old.read(info))
            for name, data in result if isinstance(result, list) else [(info.filename, result)]:
                new.writestr(name, data)


# --- the reader --------------------------------------------------------------------------------

def test_torchscript_reader_gives_the_state_dict_of_a_scripted_module(tmp_path):
    path, state = _saved_module(tmp_path)
    tensors = read_torchscript_tensors(path, expected_sha256=sha256_of(path))
    assert sorted(tensors) == sorted(state)
    for key, value in state.items():
        assert tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key], value), key
    assert tensors["norm.num_batches_tracked"].item() == 7
    assert tensors["table"].is_contiguous()


def test_torchscript_reader_checks_the_pinned_sha256(tmp_path):
    path, _ = _saved_module(tmp_path)
    with pytest.raises(ModelFileError, match="sha256"):
        read_torchscript_tensors(path, expected_sha256="0" * 64)


def test_torchscript_reader_refuses_a_global_outside_the_allow_list(tmp_path):
    path, _ = _saved_module(tmp_path)
    witness = tmp_path / "ran"
    command = f"touch {witness}".encode()
    # GLOBAL os.system, MARK, the command, TUPLE, REDUCE, POP: a plain unpickler would run it
    # before anything else in the file.
    injected = (b"cos\nsystem\n(X" + struct.pack("<I", len(command)) + command + b"tR0")
    evil = tmp_path / "evil.pt"

    def inject(name: str, data: bytes) -> bytes:
        return data[:2] + injected + data[2:] if name.endswith("/data.pkl") else data

    _rewrite(path, evil, inject)
    with pytest.raises(ModelFileError, match=r"os\.system"):
        read_torchscript_tensors(evil)
    assert not witness.exists()


def test_torchscript_reader_refuses_a_call_it_does_not_know(tmp_path):
    path, _ = _saved_module(tmp_path)
    evil = tmp_path / "evil.pt"
    # A torch function that is not a tensor rebuilder, in place of OrderedDict.
    swap = (b"ccollections\nOrderedDict\n", b"ctorch\nload\n")
    _rewrite(path, evil, lambda name, data: data.replace(*swap) if name.endswith(".pkl") else data)
    with pytest.raises(ModelFileError, match=r"torch\.load"):
        read_torchscript_tensors(evil)


def test_torchscript_reader_refuses_a_member_outside_the_archive_folder(tmp_path):
    path, _ = _saved_module(tmp_path)
    evil = tmp_path / "evil.pt"

    def add_escape(name: str, data: bytes):
        extra = [("module/../../escaped.txt", b"x")] if name.endswith("/version") else []
        return [(name, data), *extra]

    _rewrite(path, evil, add_escape)
    with pytest.raises(ModelFileError, match="unsafe path"):
        read_torchscript_tensors(evil)


def test_torchscript_reader_refuses_other_and_damaged_files(tmp_path):
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, plain)  # a zip, but a state_dict, not a module
    with pytest.raises(ModelFileError, match="TorchScript"):
        read_torchscript_tensors(plain)
    (tmp_path / "text.pt").write_text("not a zip")
    with pytest.raises(ModelFileError, match="not a zip"):
        read_torchscript_tensors(tmp_path / "text.pt")
    path, _ = _saved_module(tmp_path)
    cut = tmp_path / "cut.pt"
    _rewrite(path, cut, lambda name, data: data[:300] if name.endswith("/data.pkl") else data)
    with pytest.raises(ModelFileError, match="damaged"):
        read_torchscript_tensors(cut)


# --- our network -------------------------------------------------------------------------------

def test_linknet3d_maps_a_patch_to_logits_and_knows_its_parts():
    arguments = {"channels": [4, 8, 16], "blocks_per_stage": 1}
    model = networks.build_network("linknet3d", 1, 3, **arguments).eval()
    assert networks.patch_divisor("linknet3d", arguments) == 16
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 16, 48)).shape == (1, 3, 32, 16, 48)
    encoder = networks.encoder_blocks("linknet3d", model)
    decoder = networks.decoder_blocks("linknet3d", model)
    head = networks.head("linknet3d", model)
    assert len(encoder) == 4 and len(decoder) == 5
    assert isinstance(head, nn.ConvTranspose3d) and head.weight.shape[1] == 3
    groups = [{id(p) for p in block.parameters()} for block in [*encoder, *decoder, head]]
    assert sum(len(g) for g in groups) == len(set().union(*groups))
    assert len(set().union(*groups)) == len(list(model.parameters()))


@pytest.mark.parametrize(("published", "ours"), [
    ("down1.block1.downsample.0.weight", "encoder.1.0.shortcut.0.weight"),
    ("down3.block2.double_conv.3.weight", "encoder.3.1.conv2.weight"),
    ("up2.tp_conv.0.weight", "decoder.2.upsample.weight"),
    ("tp_conv2.bias", "head.bias"),
    ("conv.0.bias", "final_conv.0.bias"),
    ("unknown.weight", "unknown.weight"),  # not one of deepbet's names: unchanged
])
def test_deepbet_names_map_onto_our_network(published, ours):
    assert deepbet.rename(published) == ours


def test_mr_recipe_moves_z_scores_to_a_target_mean_and_deviation():
    values = np.random.default_rng(0).normal(100, 30, size=(20, 20, 20)).astype(np.float32)
    recipe = {"kind": "mr", "percentiles": [0.5, 99.5], "output_mean": 0.449, "output_std": 0.226}
    result = preprocess.normalise(values, recipe)
    plain = preprocess.normalise(values, {"kind": "mr", "percentiles": [0.5, 99.5]})
    assert result.mean() == pytest.approx(0.449, abs=1e-4)
    assert result.std() == pytest.approx(0.226, abs=1e-4)
    np.testing.assert_allclose(result, plain * 0.226 + 0.449, atol=1e-5)


# --- the published weights ---------------------------------------------------------------------

def _import(published_file):
    path = published_file(MODEL_ID)
    model, card, report = importers.load("deepbet", path, zoo.entry(MODEL_ID))
    return path, model, card, report


def _icbm152_crop(case) -> tuple[sitk.Image, list[int]]:
    """The sample cut to its brain's bounding box widened by 10 % per side, as deepbet crops
    (the template is skull-stripped, so its nonzero voxels give the box deepbet's first
    network would find); returns the crop and its first voxel's index (x, y, z)."""
    image = sitk.ReadImage(str(case.image))
    values = sitk.GetArrayViewFromImage(image)
    inside = np.argwhere(values > 0)
    low, high = inside.min(0), inside.max(0) + 1
    centre, half = (low + high) / 2, (high - low) * (1 + 2 * deepbet.CROP_MARGIN) / 2
    start = np.maximum(0, np.round(centre - half)).astype(int)
    stop = np.minimum(values.shape, np.round(centre + half)).astype(int)
    crop = image[int(start[2]):int(stop[2]), int(start[1]):int(stop[1]),
                 int(start[0]):int(stop[0])]
    return crop, [int(v) for v in start[::-1]]


def test_deepbet_weights_load_completely(published_file):
    _, model, card, report = _import(published_file)
    assert report.ok and not report.expected_missing and not report.dropped
    assert len(report.loaded) == 38
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    assert card.architecture == "linknet3d" and card.labels == {0: "background", 1: "brain"}
    assert card.orientation == "SAR" and card.patch_size == [256, 256, 256]
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 64, 64, 64))
    assert logits.shape == (1, 2, 64, 64, 64) and torch.isfinite(logits).all()


def test_deepbet_port_matches_the_published_torchscript(published_file):
    path, model, card, _ = _import(published_file)
    crop, _ = _icbm152_crop(real_sample("icbm152"))
    # Half deepbet's resolution (128^3) keeps the test fast; the computation is the same.
    spacing = [2 * s for s in card.spacing]
    array, _ = preprocess.to_model_space(crop, spacing, card.normalisation, card.orientation)
    array = np.pad(array, [(0, max(0, 128 - n)) for n in array.shape], mode="edge")
    inputs = torch.from_numpy(np.ascontiguousarray(array[:128, :128, :128]))[None, None]
    with torch.no_grad():
        ours = model(inputs).double()
    pinned = zoo.entry(MODEL_ID)["files"][0]["sha256"]
    assert sha256_of(path) == pinned  # only the published file itself is ever run, here
    published = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        theirs = published(inputs).double()  # softmax probabilities
    probability_difference = (torch.softmax(ours, 1) - theirs).abs().max().item()
    # The published file ends with a softmax: compare the log-odds brain vs background,
    # where its probabilities are both representable.
    ours_log_odds = ours[:, 1] - ours[:, 0]
    theirs_log_odds = theirs[:, 1].log() - theirs[:, 0].log()
    finite = torch.isfinite(theirs_log_odds)
    logit_difference = (ours_log_odds - theirs_log_odds)[finite].abs().max().item()
    print(f"deepbet port vs TorchScript: max |dp| {probability_difference:.2e}, "
          f"max |d log-odds| {logit_difference:.2e} over {int(finite.sum())} voxels")
    assert finite.float().mean() > 0.99
    assert probability_difference < 1e-4
    assert logit_difference < 1e-3


def test_deepbet_extracts_the_icbm152_brain(published_file):
    _, model, card, _ = _import(published_file)
    case = real_sample("icbm152")
    crop, start = _icbm152_crop(case)
    result = inference.segment(model, card, crop, device="cpu", batch_size=1)
    reference = icbm152_brain_mask(case)
    label = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(reference)
    label = sitk.Paste(label, sitk.Cast(result.label, sitk.sitkUInt8), result.label.GetSize(),
                       [0, 0, 0], start)
    found = sitk.GetArrayViewFromImage(label) == 1
    truth = sitk.GetArrayViewFromImage(reference) == 1
    dice = 2 * np.logical_and(found, truth).sum() / (found.sum() + truth.sum())
    print(f"deepbet on ICBM152: Dice {dice:.4f} against nilearn's brain mask")
    assert result.labels == {1: "brain"}
    # 0.964 measured; 0.927 with the axes fed in the wrong order (orientation "RAS").
    assert dice >= 0.95
