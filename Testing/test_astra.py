"""Astra / Merlin CT encoder: byte shards of a bfloat16 ResNet file -> resnet_unet's encoder."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import real_sample
from monai.networks.nets import ResNet

from TransferSegLib import networks, preprocess, zoo
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import astra

ASTRA_ID = "astra-merlin-ct-encoder"
NAMES = [f"astra_encoder.part{i}.bin" for i in (1, 2, 3)]
# The published topology (bottleneck blocks, 3x7x7 stem of stride (1, 2, 2)), one block per
# layer and narrow.
TINY = {"block": "bottleneck", "layers": [1, 1, 1, 1], "block_inplanes": [8, 8, 16, 16],
        "conv1_t_size": [3, 7, 7], "conv1_t_stride": [1, 2, 2],
        "decoder_channels": [16, 8, 8, 8, 8]}


def _source_resnet() -> ResNet:
    """The published encoder's layout: MONAI ResNet names, three input channels, no classifier,
    no bias in the shortcut convolutions; norms with distinct statistics."""
    torch.manual_seed(0)
    net = ResNet("bottleneck", TINY["layers"], TINY["block_inplanes"], n_input_channels=3,
                 conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2), feed_forward=False,
                 bias_downsample=False).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return net


def _published_like(folder):
    """The source's state_dict in bfloat16, saved by torch.save and cut into three shards as the
    package does; returns (catalog-like entry, the bfloat16 state_dict, the joined bytes)."""
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in _source_resnet().state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for name, start, stop in zip(NAMES, cuts, cuts[1:], strict=False):
        (folder / name).write_bytes(data[start:stop])
    entry = {"id": "tiny", "arguments": TINY, "files": [{"name": name} for name in NAMES]}
    return entry, state, data


def _features(resnet: ResNet, x: torch.Tensor) -> torch.Tensor:
    """layer4's output of a MONAI ResNet (the encoder part of its forward)."""
    x = resnet.maxpool(resnet.act(resnet.bn1(resnet.conv1(x))))
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))


def test_published_layout_lands_every_encoder_tensor(tmp_path):
    entry, state, _ = _published_like(tmp_path)
    model, card, report = astra.load(tmp_path / NAMES[0], entry)

    ours = model.state_dict()
    new = sorted(k for k in ours if not k.startswith("encoder."))
    assert report.ok and sorted(report.loaded) == sorted(f"encoder.{k}" for k in state)
    assert sorted(report.expected_missing) == new and any(k.startswith("head.") for k in new)
    for key, value in state.items():
        expected = value.float() if value.is_floating_point() else value
        if expected.ndim == 5:
            expected = expected.transpose(-1, -2)  # Merlin's (z, x, y) -> (z, y, x)
        if key == "conv1.weight":
            expected = expected.sum(dim=1, keepdim=True)  # a grey image repeated 3 times
        assert ours[f"encoder.{key}"].dtype == (torch.float32 if value.is_floating_point()
                                                else value.dtype)
        assert torch.equal(ours[f"encoder.{key}"], expected), key
    assert card.architecture == "resnet_unet" and card.modality == "CT"
    assert card.spacing == [1.5, 1.5, 3.0] and card.orientation == "RAS"
    assert card.normalisation == {"kind": "ct", "window": [-1000.0, 1000.0]}

    # The encoder computes on (z, y, x) what the published one computes on (z, x, y) with the
    # image on three channels.
    source = _source_resnet()
    source.load_state_dict({k: v.float() if v.is_floating_point() else v
                            for k, v in state.items()})
    x = torch.rand(1, 1, 16, 64, 32)  # (z, x, y)
    with torch.no_grad():
        published = _features(source, x.expand(1, 3, -1, -1, -1))
        encoded = _features(model.encoder, x.transpose(-1, -2))
        output = model(x.transpose(-1, -2))
    torch.testing.assert_close(encoded.transpose(-1, -2), published, rtol=1e-4, atol=1e-5)
    assert output.shape == (1, 2, 16, 32, 64)


def test_shards_read_as_one_file(tmp_path):
    _, _, data = _published_like(tmp_path)
    stream = astra.JoinedFiles([tmp_path / name for name in NAMES])
    try:
        assert stream.size == len(data) and stream.read() == data
        rng = np.random.default_rng(0)
        for _ in range(50):
            start = int(rng.integers(0, len(data)))
            count = int(rng.integers(1, len(data) // 2))
            stream.seek(start)
            assert stream.read(count) == data[start:start + count]
            assert stream.tell() == min(start + count, len(data))
        stream.seek(-5, io.SEEK_END)
        assert stream.read() == data[-5:]
    finally:
        stream.close()


def test_missing_or_bad_shards_are_refused(tmp_path):
    entry, _, data = _published_like(tmp_path)
    (tmp_path / NAMES[2]).write_bytes(b"\0" * 100)  # a wrong third part
    with pytest.raises(ModelFileError, match="not a readable PyTorch weights file"):
        astra.load(tmp_path / NAMES[0], entry)
    (tmp_path / NAMES[1]).unlink()
    with pytest.raises(ModelFileError, match=NAMES[1]):
        astra.load(tmp_path, entry)
    joined = tmp_path / "astra_encoder.pt"  # a joined file the entry does not name: read alone
    joined.write_bytes(data)
    assert astra.shard_paths(joined, entry) == [joined]
    assert astra.load(joined, entry)[2].ok


def test_resnet_unet_architecture():
    arguments = networks.resolve_kwargs("resnet_unet", **TINY)
    assert networks.patch_divisor("resnet_unet", arguments) == 32
    assert networks.patch_divisor("resnet_unet", networks.resolve_kwargs(
        "resnet_unet", conv1_t_stride=2, no_max_pool=True)) == 16
    model = networks.build_network("resnet_unet", 2, 4, **arguments)
    assert model(torch.zeros(2, 2, 32, 64, 64)).shape == (2, 4, 32, 64, 64)
    blocks = networks.encoder_blocks("resnet_unet", model)
    assert blocks[0] is model.encoder.conv1 and blocks[-1] is model.encoder.layer4
    assert networks.decoder_blocks("resnet_unet", model) == list(model.decoder)
    assert networks.head("resnet_unet", model) is model.head
    assert all(k.startswith(("encoder.", "decoder.", "head.")) for k in model.state_dict())


def test_astra_encoder_loads_and_runs_on_ct(published_file):
    path = published_file(ASTRA_ID)
    entry = zoo.entry(ASTRA_ID)
    started = time.perf_counter()
    digest = hashlib.sha256()
    stream = astra.JoinedFiles(astra.shard_paths(path, entry))
    while block := stream.read(1 << 22):
        digest.update(block)
    stream.close()
    assert digest.hexdigest() == astra.JOINED_SHA256  # the parts, joined in order

    model, card, report = astra.load(path, entry)
    state = model.state_dict()
    assert report.ok and len(report.loaded) == 930
    loaded = sum(state[k].numel() for k in report.loaded)
    # The file's conv1 reads three (identical) channels; ours reads one.
    published = loaded + 2 * state["encoder.conv1.weight"].numel()
    assert published == 117_517_787 and round(published / 1e6, 1) == 117.5
    assert all(k.startswith(("decoder.", "head.")) for k in report.expected_missing)

    image = sitk.ReadImage(str(real_sample("totalseg_ct").image))
    array, _ = preprocess.to_model_space(image, card.spacing, card.normalisation,
                                         card.orientation)
    array = np.pad(array, [(0, max(0, 64 - s)) for s in array.shape])  # air beyond the scan
    z, y, x = (max(32, c // 2) for c in array.shape)
    patch = torch.from_numpy(np.ascontiguousarray(array[z - 32:z + 32, y - 32:y + 32,
                                                        x - 32:x + 32]))[None, None]
    seen = []
    hook = model.encoder.layer4.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        output = model(patch)
    hook.remove()
    features = seen[0]
    print(f"Astra encoder: {published:,} published values, {loaded:,} loaded "
          f"({time.perf_counter() - started:.1f} s)")
    assert features.shape == (1, 2048, 4, 2, 2) and float(features.std()) > 0
    assert output.shape == (1, 2, 64, 64, 64) and torch.isfinite(output).all()
