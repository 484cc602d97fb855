"""TAPS: an ONNX SegResNetDS imported onto MONAI's own SegResNetDS, checked against onnxruntime."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import SimpleITK as sitk
import torch
from conftest import real_sample
from monai.networks.nets import SegResNetDS

from TransferSegLib import networks, preprocess, zoo
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import taps
from TransferSegLib.importers.onnx_weights import read_onnx_graph, read_onnx_initialisers

TAPS_ID = "taps-prostate-t2w-v1"
# TAPS's topology, smaller: three levels of 8, 16, 32 channels.
TINY = {"init_filters": 8, "blocks_down": [1, 2, 2], "norm": ["group", {"num_groups": 8}],
        "act": ["mish", {"inplace": True}]}
TINY_INPUT = (16, 16, 8)  # x, y, z, as TAPS's (128, 128, 32)
BACKGROUND = math.log(0.55 / 0.45)


def _published_like(tmp_path, random_norms: bool):
    """A small SegResNetDS exported as TAPS's file was: PyTorch's TorchScript exporter, opset
    17, a single sigmoid output, input (N, 1, x, y, z); deep-supervision heads unused."""
    torch.manual_seed(0)
    net = SegResNetDS(spatial_dims=3, init_filters=8, in_channels=1, out_channels=1,
                      norm=("GROUP", {"num_groups": 8}), act=("MISH", {"inplace": True}),
                      blocks_down=(1, 2, 2), dsdepth=2).eval()
    if random_norms:  # distinct values, so a norm mapped to the wrong place shows
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, torch.nn.GroupNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.5)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 1, *TINY_INPUT), str(path), input_names=["input"],
                          output_names=["output"], opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})
    return path, net


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ours(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Our network on an (N, 1, x, y, z) array: run on (z, y, x), given back as (x, y, z)."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 3, 2))))
    return out.numpy().transpose(0, 1, 4, 3, 2)


@pytest.mark.parametrize("random_norms", [True, False], ids=["distinct", "shared"])
def test_published_layout_lands_every_tensor(tmp_path, random_norms):
    # With default norms (all scales 1, shifts 0) the exporter stores each value once and
    # aliases the others through Identity nodes; those must be followed too.
    path, source = _published_like(tmp_path, random_norms)
    model, card, report = taps.load(path, {"id": "tiny", "arguments": TINY})

    state = model.state_dict()
    assert report.ok and not report.expected_missing and not report.dropped
    assert sorted(report.loaded) == sorted(state)
    for key, value in source.state_dict().items():
        if ".head." in key and not key.startswith("up_layers.1."):
            continue  # the unused deep-supervision head, not in the file
        if key.endswith("head.weight"):
            assert torch.equal(state[key][1:], value) and not state[key][0].any()
        elif key.endswith("head.bias"):
            assert torch.equal(state[key], torch.tensor([BACKGROUND, float(value[0])]))
        elif value.ndim == 5:
            assert torch.equal(state[key], value.permute(0, 1, 4, 3, 2)), key
        else:
            assert torch.equal(state[key], value), key
    assert card.patch_size == list(TINY_INPUT) and card.labels == {0: "background",
                                                                  1: "prostate"}
    assert card.orientation == "RAS" and card.spacing == [0.8, 0.8, 3.0]
    assert card.normalisation == {"kind": "zscore", "nonzero": True}

    x = np.random.default_rng(1).standard_normal((2, 1, *TINY_INPUT)).astype(np.float32)
    reference = _onnxruntime(onnx.load(str(path)), x)
    ours = _ours(model, x)
    assert ours.shape == (2, 2, *TINY_INPUT)
    np.testing.assert_allclose(ours[:, 1:], reference, atol=1e-4, rtol=0)
    assert np.all(ours[:, 0] == np.float32(BACKGROUND))


def test_argmax_of_the_two_channels_is_taps_threshold():
    logits = np.linspace(-2, 2, 4001, dtype=np.float32)
    weight, bias = taps._two_channel_head(np.ones((1, 1, 1, 1, 1), np.float32),
                                          np.zeros(1, np.float32))
    two = weight[:, 0, 0, 0, 0][:, None] * logits[None] + bias[:, None]
    assert np.array_equal(two.argmax(axis=0) == 1, 1 / (1 + np.exp(-logits)) > 0.55)


def test_taps_intensity_recipe_is_monais_nonzero_zscore():
    from monai.transforms import NormalizeIntensity

    rng = np.random.default_rng(2)
    array = rng.gamma(2.0, 100.0, (6, 7, 8)).astype(np.float32)
    array[:, :2] = 0  # the background outside the scan
    ours = preprocess.normalise(array, {"kind": "zscore", "nonzero": True})
    monai = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(array[None]))[0]
    np.testing.assert_allclose(ours, monai, rtol=1e-5, atol=1e-5)
    assert np.all(ours[:, :2] == 0) and abs(float(ours[:, 2:].mean())) < 1e-5
    assert not np.allclose(ours, preprocess.normalise(array, {"kind": "zscore"}))


def test_onnx_reader_gives_initialisers_and_graph(tmp_path):
    path, source = _published_like(tmp_path, random_norms=True)
    tensors = read_onnx_initialisers(path)
    np.testing.assert_array_equal(tensors["encoder.conv_init.weight"],
                                  source.encoder.conv_init.weight.detach().numpy())
    anonymous = [name for name in tensors if name.startswith("onnx::")]
    assert len(anonymous) == 2 * sum(isinstance(m, torch.nn.GroupNorm) for m in source.modules())
    graph = read_onnx_graph(path)
    assert graph.inputs == {"input": ["batch_size", 1, *TINY_INPUT]}
    conv = next(node for node in graph.nodes if node.op_type == "Conv")
    assert conv.inputs[1] == "encoder.conv_init.weight"
    assert [n.op_type for n in graph.consumers(conv.outputs[0])][:1] == ["Reshape"]


def test_unreadable_onnx_file_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07 this is not a protobuf model" * 10)
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        taps.load(path, {})
    with pytest.raises(ModelFileError, match="does not exist"):
        taps.load(tmp_path / "absent.onnx", {})


def test_segresnetds_is_registered_without_deep_supervision():
    arguments = networks.resolve_kwargs("segresnetds", **TINY)
    assert arguments["dsdepth"] == 1 and arguments["blocks_up"] == [1, 1]
    assert networks.patch_divisor("segresnetds", arguments) == 4
    model = networks.build_network("segresnetds", 1, 3, **arguments).train()
    output = model(torch.zeros(1, 1, 8, 12, 16))
    assert isinstance(output, torch.Tensor) and output.shape == (1, 3, 8, 12, 16)
    assert networks.head("segresnetds", model) is model.up_layers[-1]["head"]
    assert networks.encoder_blocks("segresnetds", model)[0] is model.encoder.conv_init
    with pytest.raises(InputError, match="dsdepth"):
        networks.resolve_kwargs("segresnetds", dsdepth=3)


def test_taps_file_matches_onnxruntime(published_file):
    path = published_file(TAPS_ID)
    started = time.perf_counter()
    model, card, report = taps.load(path, zoo.entry(TAPS_ID))
    assert report.ok and len(report.loaded) == 81
    assert card.patch_size == [128, 128, 32] and card.architecture == "segresnetds"

    # A real MR scan in TAPS's model space; a 64 x 64 x 16 window keeps the test fast (the
    # file's fixed input size is freed: its weights and graph do not depend on it).
    image = sitk.ReadImage(str(real_sample("totalseg_mr").image))
    array, _ = preprocess.to_model_space(image, card.spacing, card.normalisation,
                                         card.orientation)
    z, y, x = (c // 2 for c in array.shape)
    patch = array[z - 8:z + 8, y - 32:y + 32, x - 32:x + 32]
    window = np.ascontiguousarray(patch.transpose(2, 1, 0))[None, None]  # (1, 1, x, y, z)
    published = onnx.load(str(path))
    for value in [*published.graph.input, *published.graph.output]:
        for dim in value.type.tensor_type.shape.dim[2:]:
            dim.dim_param = "spatial"
    reference = _onnxruntime(published, window)[:, 0]
    ours = _ours(model, window)
    difference = float(np.abs(ours[:, 1] - reference).max())
    spread = float(reference.max() - reference.min())
    print(f"TAPS max abs logit difference {difference:.2e} over a range of {spread:.2f} "
          f"({time.perf_counter() - started:.1f} s)")
    assert spread > 1.0
    assert difference < 1e-4 * spread
