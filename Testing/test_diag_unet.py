"""The sparse-annotation 3D U-Net (diag_unet): sizes, the valid-convolution tiler, and importing
its published Keras (.h5) and ONNX files.

The published files are not on a registry this project can reach, so the tests write files in
their layout themselves: a Keras HDF5 file with the published layer names and Keras kernel
layout, and an ONNX graph of the whole published topology (built from ONNX operators, run by
ONNX Runtime as an independent implementation of the network).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from TransferSegLib import networks, preprocess, tiling
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import diag_unet as importer
from TransferSegLib.nets import diag_unet

PUBLISHED_PARAMETERS = 16_317_015  # the publishers' Keras summary, 23 outputs


# --- the published layout, written from the publishers' description -------------------------

def keras_plan(filters: int, classes: int) -> list[tuple[str, int, int, int]]:
    """(Keras layer name, kernel size, in, out) of every convolution, in the Keras model's order
    (its summary: conv3d .. conv3d_13, output_segm)."""
    f = filters
    shapes = [(1, f), (f, 2 * f), (2 * f, 2 * f), (2 * f, 4 * f), (4 * f, 4 * f), (4 * f, 8 * f),
              (8 * f, 8 * f), (8 * f, 16 * f), (16 * f + 8 * f, 8 * f), (8 * f, 8 * f),
              (8 * f + 4 * f, 4 * f), (4 * f, 4 * f), (4 * f + 2 * f, 2 * f), (2 * f, 2 * f)]
    plan = [("conv3d" if i == 0 else f"conv3d_{i}", 3, cin, cout)
            for i, (cin, cout) in enumerate(shapes)]
    return [*plan, ("output_segm", 1, 2 * f, classes)]


def keras_weights(filters: int, classes: int, seed: int = 0) -> list[tuple[str, np.ndarray,
                                                                           np.ndarray]]:
    """Random (name, kernel (k, k, k, in, out), bias) per convolution; the head's bias of
    output c is c, so each output channel can be recognised after the import."""
    rng = np.random.default_rng(seed)
    layers = []
    for name, k, cin, cout in keras_plan(filters, classes):
        kernel = rng.normal(0, np.sqrt(2 / (k**3 * cin)), (k, k, k, cin, cout)).astype(np.float32)
        bias = rng.normal(0, 0.05, cout).astype(np.float32)
        if name == "output_segm":
            bias = np.arange(cout, dtype=np.float32)
        layers.append((name, kernel, bias))
    return layers


def keras_layer_names() -> list[str]:
    """Every layer of the published Keras model, in its summary order."""
    convs = [name for name, _, _, _ in keras_plan(1, 1)]
    names = ["input_1", convs[0], convs[1], "max_pooling3d", convs[2], convs[3],
             "max_pooling3d_1", convs[4], convs[5], "max_pooling3d_2", convs[6], convs[7]]
    for level in range(3):
        suffix = "" if level == 0 else f"_{level}"
        names += [f"up_sampling3d{suffix}", f"cropping3d{suffix}", f"concatenate{suffix}",
                  *convs[8 + 2 * level: 10 + 2 * level]]
    return [*names, convs[14], "softmax"]


def write_keras_h5(path: Path, layers, whole_model: bool = True) -> Path:
    """A Keras 2 HDF5 file as ``model.save`` (``whole_model``) or ``save_weights`` writes it."""
    weights = {name: (kernel, bias) for name, kernel, bias in layers}
    with h5py.File(path, "w") as file:
        if whole_model:
            file.attrs["keras_version"] = b"2.4.0"
            file.attrs["backend"] = b"tensorflow"
            file.attrs["model_config"] = json.dumps({"class_name": "Functional"}).encode()
            group = file.create_group("model_weights")
        else:
            group = file
        convs = {name for name, _, _, _ in keras_plan(1, 1)}
        names = [n for n in keras_layer_names() if n in weights or n not in convs]
        group.attrs["layer_names"] = np.array([n.encode() for n in names])
        group.attrs["backend"] = b"tensorflow"
        for name in names:
            layer = group.create_group(name)
            if name not in weights:
                layer.attrs["weight_names"] = np.array([])
                continue
            kernel, bias = weights[name]
            layer.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(),
                                                    f"{name}/bias:0".encode()])
            layer.create_dataset(f"{name}/kernel:0", data=kernel)
            layer.create_dataset(f"{name}/bias:0", data=bias)
    return path


def onnx_graph(layers, size: int, folded: bool = True) -> onnx.ModelProto:
    """The published network as an ONNX graph for (1, 1, size, size, size) inputs, weights as a
    converter from Keras writes them: ``folded`` kernels already (out, in, z, y, x) with the
    bias in the Conv; otherwise the Keras kernel behind a Transpose and the bias in an Add."""
    nodes, inits = [], []
    counter = iter(range(10_000))

    def tensor(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], **attributes) -> str:
        out = f"{op.lower()}_{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"model/{out}", **attributes))
        return out

    def conv(x: str, index: int, relu: bool = True) -> str:
        name, kernel, bias = layers[index]
        w_name = f"model/{name}/Conv3D/ReadVariableOp:0"
        b_name = f"model/{name}/BiasAdd/ReadVariableOp:0"
        if folded:
            y = node("Conv", [x, tensor(w_name, kernel.transpose(4, 3, 0, 1, 2)),
                              tensor(b_name, bias)])
        else:
            w = node("Transpose", [tensor(w_name, kernel)], perm=[4, 3, 0, 1, 2])
            y = node("Conv", [x, w])
            y = node("Add", [y, tensor(b_name, bias.reshape(1, -1, 1, 1, 1))])
        return node("Relu", [y]) if relu else y

    def crop(x: str, have: int, want: int) -> str:
        start = (have - want) // 2
        starts = tensor(f"crop_starts_{have}", np.array([start] * 3, np.int64))
        ends = tensor(f"crop_ends_{have}", np.array([start + want] * 3, np.int64))
        axes = tensor(f"crop_axes_{have}", np.array([2, 3, 4], np.int64))
        return node("Slice", [x, starts, ends, axes])

    x, s, skips = "input_1", size, []
    for level in range(4):
        x = conv(conv(x, 2 * level), 2 * level + 1)
        s -= 4
        if level < 3:
            skips.append((x, s))
            x = node("MaxPool", [x], kernel_shape=[2, 2, 2], strides=[2, 2, 2])
            s //= 2
    scales = tensor("up_scales", np.array([1, 1, 2, 2, 2], np.float32))
    for level in range(3):
        skip, have = skips.pop()
        x = node("Resize", [x, "", scales], mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        s *= 2
        x = node("Concat", [x, crop(skip, have, s)], axis=1)
        x = conv(conv(x, 8 + 2 * level), 9 + 2 * level)
        s -= 4
    x = node("Softmax", [conv(x, 14, relu=False)], axis=1)
    graph = helper.make_graph(
        nodes, "model", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                       [1, 1, size, size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        initializer=list(reversed(inits)),  # initialiser order must not matter
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run_onnx(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"input_1": image.astype(np.float32)})[0]


def entry_for(classes: int, filters: int) -> dict:
    """A catalog entry for a published-layout file with ``classes`` outputs, background last."""
    labels = {"0": "background", **{str(c): f"structure_{c}" for c in range(1, classes)}}
    return {"id": "diag-test", "labels": labels, "background_index": classes - 1,
            "arguments": {"filters": filters}}


def ours_from_published(published: np.ndarray, background: int) -> np.ndarray:
    """Published output channels (N, C, ...) in TransferSeg's order, background first."""
    return published[:, importer.background_first(published.shape[1], background)]


# --- sizes and the registry ------------------------------------------------------------------

def test_published_cubes_give_the_published_outputs():
    assert [diag_unet.output_size(s) for s in diag_unet.allowed_input_sizes()] == [20, 44, 68, 92]
    assert diag_unet.margin() == 44
    valid = []
    for size in range(60, 150):
        try:
            valid.append((size, diag_unet.output_size(size)))
        except InputError:
            pass
    assert valid == [(s, s - 88) for s in range(92, 150, 8)]
    with pytest.raises(InputError, match="4 more than a multiple of 8"):
        diag_unet.output_size(128)


def test_network_runs_on_a_108_cube_and_refuses_other_sizes():
    model = networks.build_network("diag_unet", 1, 3, filters=2).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 108, 108, 108)).shape == (1, 3, 20, 20, 20)
        with pytest.raises(ValueError, match="cannot take an input of 104"):
            model(torch.zeros(1, 1, 108, 104, 108))


def test_parameters_and_parts_match_the_published_topology():
    model = networks.build_network("diag_unet", 1, 23)
    plan = keras_plan(32, 23)
    assert sum(k**3 * cin * cout + cout for _, k, cin, cout in plan) == PUBLISHED_PARAMETERS
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS
    assert [tuple(m.weight.shape) for _, m in model.convolutions()] == \
        [(cout, cin, k, k, k) for _, k, cin, cout in plan]
    encoder = networks.encoder_blocks("diag_unet", model)
    decoder = networks.decoder_blocks("diag_unet", model)
    head = networks.head("diag_unet", model)
    assert [block.conv2.out_channels for block in encoder] == [64, 128, 256, 512]
    assert [block.conv2.out_channels for block in decoder] == [256, 128, 64]
    assert isinstance(head, nn.Conv3d) and head.out_channels == 23
    ids = [id(p) for part in [*encoder, *decoder, head] for p in part.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert networks.resolve_kwargs("diag_unet") == {"filters": 32}


# --- the tiler -------------------------------------------------------------------------------

def small_valid_network() -> nn.Module:
    """Valid convolutions only (no pooling): shifting the input shifts the output, so tiles
    stitched side by side must equal one pass over the whole padded volume. Margin 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3), nn.ReLU(), nn.Conv3d(4, 3, 3)).eval()


@pytest.mark.parametrize("shape", [(19, 16, 9), (5, 23, 8)])
def test_tiles_stitch_to_the_whole_volume_pass(shape):
    model = small_valid_network()
    image = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    tiled = tiling.predict_logits_valid(model, image, (12, 10, 12), (8, 6, 8), out_channels=3,
                                        batch_size=3)
    lows = image.reshape(2, -1).min(1)
    padded = np.stack([np.pad(c, 2, constant_values=low) for c, low in
                        zip(image, lows, strict=True)])
    with torch.no_grad():
        whole = model(torch.from_numpy(padded)[None])[0]
    assert tiled.shape == (3, *shape) and tiled.dtype == torch.float32
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_windows_read_the_pad_value_outside_the_volume():
    # Output voxel i is the input at i - 2 (a kernel whose only weight is its first corner).
    shift = nn.Conv3d(2, 2, 5, bias=False, groups=2)
    with torch.no_grad():
        shift.weight.zero_()
        shift.weight[:, :, 0, 0, 0] = 1.0
    image = np.stack([np.full((6, 6, 6), 3.0), np.full((6, 6, 6), -7.0)]).astype(np.float32)
    image[:, 3, 3, 3] = [1.0, -9.0]  # each channel's minimum
    out = tiling.predict_logits_valid(shift, image, 8, 4)
    assert out[:, 0, 0, 0].tolist() == [1.0, -9.0]
    assert out[:, 5, 5, 5].tolist() == [1.0, -9.0]  # the input at (3, 3, 3)
    assert out[:, 5, 5, 4].tolist() == [3.0, -7.0]
    out = tiling.predict_logits_valid(shift, image, 8, 4, pad_value=-1000.0)
    assert out[:, 1, 2, 0].tolist() == [-1000.0, -1000.0]


def test_each_unet_block_is_the_output_of_its_window():
    torch.manual_seed(0)
    model = networks.build_network("diag_unet", 1, 2, filters=1).eval()
    for _, conv in model.convolutions():  # activations that survive the depth
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    image = np.random.default_rng(2).normal(size=(1, 30, 12, 20)).astype(np.float32)
    out = tiling.predict_logits_valid(model, image, 108, 20, out_channels=2)
    padded = np.pad(image[0], [(44, 44), (44, 52), (44, 44)], constant_values=image.min())
    # 30 voxels along z: blocks at 0 and, moved back to end at the edge, at 10. Pooling makes
    # the network's output depend on where its window starts, so the overlap (10..20) shows
    # which block was kept: the last, whole.
    window = torch.from_numpy(padded[10:118].copy())[None, None]
    with torch.no_grad():
        expected = model(window)[0][:, :, :12, :]
    torch.testing.assert_close(out[:, 10:30], expected, rtol=1e-5, atol=1e-5)


def test_tiler_refuses_sizes_that_do_not_fit():
    model = small_valid_network()
    image = np.zeros((2, 8, 8, 8), np.float32)
    with pytest.raises(InputError, match="difference must be even"):
        tiling.predict_logits_valid(model, image, 12, 7)
    with pytest.raises(InputError, match="difference must be even"):
        tiling.predict_logits_valid(model, image, 8, 12)
    with pytest.raises(tiling.TransferSegError, match="expected"):
        tiling.predict_logits_valid(model, image, 12, 6)  # the network gives 8, not 6
    assert tiling.block_starts(30, 20) == [0, 10]
    assert tiling.block_starts(40, 20) == [0, 20]
    assert tiling.block_starts(7, 20) == [0]


def test_ct_window_without_scaling_keeps_hounsfield_units():
    hu = np.array([-1000.0, -500.0, 0.0, 399.0, 3000.0])
    clipped = preprocess.normalise(hu, {"kind": "ct", "window": [-500, 400], "scale": False})
    np.testing.assert_array_equal(clipped, [-500.0, -500.0, 0.0, 399.0, 400.0])
    scaled = preprocess.normalise(hu, {"kind": "ct", "window": [-500, 400]})
    np.testing.assert_allclose(scaled, [0.0, 0.0, 500 / 900, 899 / 900, 1.0], rtol=1e-6)


# --- importing the published files -----------------------------------------------------------

def test_keras_kernel_axes_are_z_y_x(tmp_path):
    """A Keras kernel weight at (0, 1, 2) makes output (z, y, x) read input (z, y + 1, x + 2):
    channels-first Keras on SimpleITK arrays convolves over (Z, Y, X) as we do."""
    layers = keras_weights(1, 2)
    kernel = np.zeros_like(layers[0][1])
    kernel[0, 1, 2, 0, 0] = 1.0
    layers[0] = (layers[0][0], kernel, np.zeros(1, np.float32))
    model, _, _ = importer.load(write_keras_h5(tmp_path / "m.h5", layers), entry_for(2, 1))
    image = torch.randn(1, 1, 7, 8, 9)
    with torch.no_grad():
        out = model.encoder[0].conv1(image)
    torch.testing.assert_close(out[0, 0], image[0, 0, 0:5, 1:7, 2:9])


@pytest.mark.parametrize("whole_model", [True, False])
def test_keras_file_lands_every_tensor_and_moves_the_background(tmp_path, whole_model):
    layers = keras_weights(2, 5)
    path = write_keras_h5(tmp_path / "unet3d.h5", layers, whole_model)
    model, card, report = importer.load(path, entry_for(5, 2))
    assert report.ok and len(report.loaded) == 30 and not report.dropped
    assert any("background moved from published output 4" in n for n in report.notes)
    state = model.state_dict()
    for (key, _), (_, kernel, bias) in zip(model.convolutions(), layers, strict=True):
        if key == "head":
            kernel, bias = kernel[..., [4, 0, 1, 2, 3]], bias[[4, 0, 1, 2, 3]]
        np.testing.assert_array_equal(state[f"{key}.weight"].numpy(),
                                      kernel.transpose(4, 3, 0, 1, 2))
        np.testing.assert_array_equal(state[f"{key}.bias"].numpy(), bias)
    assert state["head.bias"].tolist() == [4.0, 0.0, 1.0, 2.0, 3.0]  # published channel numbers
    assert card.architecture == "diag_unet" and card.arguments == {"filters": 2}
    assert card.labels[0] == "background" and card.out_channels == 5
    assert card.normalisation == {"kind": "ct", "window": [-500, 400], "scale": False}
    assert card.patch_size == [132, 132, 132] and card.orientation == "LPS"
    card.to_json()  # a valid model card


def test_keras_import_matches_the_onnx_reference_network(tmp_path):
    layers = keras_weights(2, 5, seed=3)
    model, _, _ = importer.load(write_keras_h5(tmp_path / "m.h5", layers), entry_for(5, 2))
    image = np.random.default_rng(4).normal(size=(1, 1, 108, 108, 108)).astype(np.float32)
    reference = run_onnx(onnx_graph(layers, 108), image)
    with torch.no_grad():
        ours = torch.softmax(model(torch.from_numpy(image)), dim=1).numpy()
    assert ours.shape == (1, 5, 20, 20, 20)
    np.testing.assert_allclose(ours, ours_from_published(reference, 4), atol=1e-5)


@pytest.mark.parametrize("folded", [True, False])
def test_onnx_file_imports_like_the_keras_file(tmp_path, folded):
    layers = keras_weights(2, 5, seed=5)
    path = tmp_path / "unet3d.onnx"
    onnx.save(onnx_graph(layers, 108, folded), str(path))
    model, card, report = importer.load(path, entry_for(5, 2))
    keras_model, _, _ = importer.load(write_keras_h5(tmp_path / "m.h5", layers),
                                      entry_for(5, 2))
    assert report.ok and len(report.loaded) == 30
    for key, value in keras_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert card.labels == {0: "background", 1: "structure_1", 2: "structure_2",
                           3: "structure_3", 4: "structure_4"}


@pytest.mark.slow
def test_published_size_model_imports_and_runs_on_a_108_cube(tmp_path):
    """The full published network (32 filters, 23 outputs, background last) from its Keras
    file; the topology itself is checked against ONNX Runtime on the narrow network above."""
    layers = keras_weights(32, 23, seed=6)
    path = write_keras_h5(tmp_path / "unet3d_Isomulti1v810.h5", layers)
    model, card, report = importer.load(path, {"id": "diag-unet-sparse"})
    assert report.ok and len(report.loaded) == 30
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS
    assert card.labels == importer.LABELS and card.out_channels == 23
    assert model.head.bias.tolist() == [22.0, *range(22)]
    image = np.random.default_rng(7).uniform(-500, 400, (1, 1, 108, 108, 108))
    with torch.no_grad():
        logits = model(torch.from_numpy(image.astype(np.float32)))
    assert logits.shape == (1, 23, 20, 20, 20) and bool(torch.isfinite(logits).all())


def test_missing_layer_is_refused_naming_the_layers(tmp_path):
    layers = keras_weights(1, 3)
    del layers[5]  # conv3d_5: the second convolution of level 2
    with pytest.raises(ModelFileError) as caught:
        importer.load(write_keras_h5(tmp_path / "m.h5", layers), entry_for(3, 1))
    text = str(caught.value)
    assert "28 tensors loaded" in text
    assert "MISSING from the source: encoder.2.conv2.weight, encoder.2.conv2.bias\n" in text
    assert "SHAPE MISMATCH" not in text and "UNEXPECTED" not in text
    assert "the file has 14 convolution layers, the network 15" in text
    assert "conv3d_4 [4, 4, 3, 3, 3], conv3d_6 [8, 8, 3, 3, 3]" in text  # the file's layers


def test_wrong_kernel_shape_is_refused_naming_the_layer(tmp_path):
    layers = keras_weights(1, 3)
    name, kernel, bias = layers[3]
    layers[3] = (name, kernel[..., :3], bias[:3])  # conv3d_3 with 3 outputs instead of 4
    with pytest.raises(ModelFileError) as caught:
        importer.load(write_keras_h5(tmp_path / "m.h5", layers), entry_for(3, 1))
    text = str(caught.value)
    assert "encoder.1.conv2 was given file layer 'conv3d_3'" in text
    assert "encoder.1.conv2.weight source [3, 2, 3, 3, 3] network [4, 2, 3, 3, 3]" in text


def test_foreign_layers_and_files_are_refused(tmp_path):
    layers = keras_weights(1, 3)
    path = write_keras_h5(tmp_path / "m.h5", layers)
    with h5py.File(path, "a") as file:
        group = file["model_weights"]
        names = [n.decode() for n in group.attrs["layer_names"]]
        group.attrs["layer_names"] = np.array([n.encode() for n in [*names, "batch_norm"]])
        norm = group.create_group("batch_norm")
        norm.attrs["weight_names"] = np.array([b"batch_norm/gamma:0"])
        norm.create_dataset("batch_norm/gamma:0", data=np.ones(2, np.float32))
    with pytest.raises(ModelFileError, match="UNEXPECTED in the source: batch_norm/gamma"):
        importer.load(path, entry_for(3, 1))
    with pytest.raises(ModelFileError, match=r"head\.weight source \[3, 2, 1, 1, 1\] network "
                                             r"\[4, 2, 1, 1, 1\]"):
        importer.load(write_keras_h5(tmp_path / "n.h5", layers), entry_for(4, 1))
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ModelFileError, match="not a Keras model"):
        importer.load(tmp_path / "other.h5", entry_for(3, 1))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ModelFileError, match="not a readable ONNX file"):
        importer.load(tmp_path / "junk.onnx", entry_for(3, 1))


def test_a_valid_convolution_base_fine_tunes_and_segments_whole_volumes(tmp_path):
    """Training crops the target to the network's output; validation and segmentation tile."""
    from conftest import real_sample
    from test_training import organ_dataset, quick

    from TransferSegLib import checkpoint, inference, networks, recipes, volumes

    torch.manual_seed(0)
    arguments = networks.resolve_kwargs("diag_unet", filters=2)
    labels = {0: "background", 1: "liver", 2: "spleen"}
    model = networks.build_network("diag_unet", 1, 3, **arguments)
    card = checkpoint.ModelCard(
        architecture="diag_unet", in_channels=1, out_channels=3, arguments=arguments,
        labels=labels, spacing=[4.0, 4.0, 4.0], patch_size=[108, 108, 108],
        normalisation={"kind": "ct", "window": [-500, 400], "scale": False}, modality="CT")
    base = checkpoint.save_model(tmp_path / "base.safetensors", model, card)
    data = organ_dataset(tmp_path / "data", keep={1: "spleen", 5: "liver"})
    result = recipes.finetune(base, data, tmp_path / "run", "vanilla",
                               quick(steps=2, val_every=2))
    assert result.status == "done" and result.best_dice is not None
    tuned, tuned_card = checkpoint.load_model(result.model)
    image = volumes.read_volume(real_sample("totalseg_ct").image)
    segmentation = inference.segment(tuned, tuned_card, image, device="cpu")
    assert segmentation.label.GetSize() == image.GetSize()
    assert networks.output_size("diag_unet", arguments, [108, 132, 156]) == [20, 44, 68]
    assert networks.output_size("unet", None, [64, 64, 64]) is None
