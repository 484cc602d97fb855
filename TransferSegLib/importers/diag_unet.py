"""The sparse-annotation 3D U-Net of Humpire-Mamani et al. 2023 (DIAG Nijmegen) -> ``diag_unet``.

The publishers ship one Keras model in two files: the Keras HDF5 file
(``unet3d_Isomulti1v810.h5``) and its ONNX export. Both are read as data only (h5py datasets,
ONNX protobuf initialisers); no code from them runs.

* Keras HDF5 (``model.save`` or ``save_weights``): the attribute ``layer_names`` lists the
  layers in the model's order; each layer's group lists its ``weight_names``
  (``conv3d/kernel:0``, ``conv3d/bias:0``), stored at ``model_weights/<layer>/<weight name>``.
  The 15 convolutions (``conv3d`` .. ``conv3d_13``, ``output_segm``) come in data-flow order,
  as Keras itself loads them (by position, not by name). A Conv3D kernel is
  (kz, ky, kx, in, out): the model runs channels-first on arrays read with SimpleITK, whose
  spatial axes are (Z, Y, X) as ours, so the kernel becomes (out, in, kz, ky, kx) by moving the
  channel axes only.
* ONNX: the ``Conv`` nodes, in graph order, with their weight (already (out, in, kz, ky, kx))
  and bias initialisers. Names depend on the converter and are not relied on; a kernel still
  behind a ``Transpose`` node, or a bias added by a separate ``Add``, is followed.

The published head has 23 outputs: 22 structures then the background, last. TransferSeg puts
the background at channel 0, so the head's rows are reordered on import (catalog field
``background_index``, 22) and the report says so.

How the published model is used (its card): one CT channel, Hounsfield units clipped to
[-500, 400] and not rescaled (``{"kind": "ct", "window": [-500, 400], "scale": false}``),
arrays in SimpleITK's (Z, Y, X) order, input cubes of 132 voxels giving 44.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import card_from_entry, published_network
from TransferSegLib.weights import ImportReport, load_weights

ARCHITECTURE = "diag_unet"

# The published output channels, in the published order (README of the publishers' repository).
PUBLISHED_CHANNELS = (
    "Aorta", "Bladder", "Duodenum", "Gallbladder", "Heart", "Inferior vena cava",
    "Left adrenal gland", "Left kidney", "Left lung", "Left psoas major", "Liver", "Pancreas",
    "Portal vein and splenic vein", "Right adrenal gland", "Right kidney", "Right lung",
    "Right psoas muscle", "Spinal cord", "Spleen", "Sternum", "Stomach", "Trachea", "Background",
)
# Ours: background first, then the published channels 0..21 in their order, named as
# TotalSegmentator names them where it has the structure, so label matching finds them.
LABELS = {
    0: "background", 1: "aorta", 2: "urinary_bladder", 3: "duodenum", 4: "gallbladder",
    5: "heart", 6: "inferior_vena_cava", 7: "adrenal_gland_left", 8: "kidney_left",
    9: "lung_left", 10: "psoas_major_left", 11: "liver", 12: "pancreas",
    13: "portal_vein_and_splenic_vein", 14: "adrenal_gland_right", 15: "kidney_right",
    16: "lung_right", 17: "psoas_major_right", 18: "spinal_cord", 19: "spleen", 20: "sternum",
    21: "stomach", 22: "trachea",
}

# What the published model needs; a catalog entry's own fields win.
PUBLISHED = {
    "labels": {str(k): v for k, v in LABELS.items()},
    "background_index": 22,
    "spacing": [1.5, 1.5, 1.5],
    "patch_size": [132, 132, 132],
    "normalisation": {"kind": "ct", "window": [-500, 400], "scale": False},
    "orientation": "LPS",
    "modality": "CT",
    "in_channels": 1,
}

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class SourceLayer:
    """One convolution of the published file, in our layout."""

    name: str  # the layer (Keras) or node (ONNX) name in the file
    weight: np.ndarray  # (out, in, kz, ky, kx)
    bias: np.ndarray | None


# --- Keras HDF5 ------------------------------------------------------------------------------

def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _names_attribute(group: Any, name: str) -> list[str] | None:
    """A list-of-names attribute; Keras splits long ones into ``name0``, ``name1``..."""
    if name in group.attrs:
        return [_text(v) for v in group.attrs[name]]
    chunks, index = [], 0
    while f"{name}{index}" in group.attrs:
        chunks += [_text(v) for v in group.attrs[f"{name}{index}"]]
        index += 1
    return chunks if index else None


def _stored_here(group, name: str, path: str | Path):
    """The dataset ``name`` of ``group`` if its values are stored in this file: HDF5 external
    links, external raw storage and virtual datasets would let a file choose other files to
    read, so they are refused."""
    import h5py

    dataset, outside = group, False
    for part in [p for p in name.split("/") if p]:
        link = dataset.get(part, getlink=True) if isinstance(dataset, h5py.Group) else None
        if link is None:
            raise KeyError(f"no weights {name!r}")
        outside = not isinstance(link, h5py.HardLink)  # soft links may lead out, too
        if outside:
            break
        dataset = dataset[part]
    if outside or not isinstance(dataset, h5py.Dataset) or dataset.external or \
            dataset.is_virtual:
        raise ModelFileError(
            f"{Path(path).name} keeps the weights {name!r} outside itself (an HDF5 link, "
            "external or virtual dataset), which TransferSeg does not read; use the "
            "publishers' own file."
        )
    return dataset


def read_keras_h5(path: str | Path) -> tuple[list[SourceLayer], list[str]]:
    """The convolutions of a Keras HDF5 file in the file's layer order, and the names of any
    other weights (a model of this family has none)."""
    try:
        import h5py
    except ImportError:
        raise ModelFileError(
            f"Reading the Keras file {Path(path).name} needs the h5py package; install it with "
            "`pip install h5py`."
        ) from None
    try:
        with h5py.File(path, "r") as file:
            group = file["model_weights"] if "model_weights" in file else file
            layer_names = _names_attribute(group, "layer_names")
            if layer_names is None:
                raise ModelFileError(
                    f"{Path(path).name} is an HDF5 file but not a Keras model or weights file "
                    "(it has no layer list); use the publishers' .h5 or .onnx file."
                )
            layers, others = [], []
            for layer_name in layer_names:
                if layer_name not in group:
                    raise ModelFileError(
                        f"{Path(path).name} lists layer {layer_name!r} but holds no weights for "
                        "it; the file is damaged, download it again."
                    )
                layer = group[layer_name]
                weights = {}
                for weight_name in _names_attribute(layer, "weight_names") or []:
                    short = weight_name.rsplit("/", 1)[-1].split(":")[0]
                    weights[short] = np.asarray(_stored_here(layer, weight_name, path)[()])
                kernel = weights.pop("kernel", None)
                if kernel is not None and kernel.ndim == 5:
                    bias = weights.pop("bias", None)
                    # Keras (kz, ky, kx, in, out) -> (out, in, kz, ky, kx)
                    layers.append(SourceLayer(layer_name, kernel.transpose(4, 3, 0, 1, 2), bias))
                elif kernel is not None:
                    weights["kernel"] = kernel
                others += [f"{layer_name}/{short}" for short in weights]
    except (OSError, KeyError) as error:
        raise ModelFileError(f"{Path(path).name} is not a readable Keras HDF5 file: {error}.") \
            from None
    return layers, others


# --- ONNX ------------------------------------------------------------------------------------

# Nodes that carry weights this topology does not have.
_FOREIGN_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization",
                "GroupNormalization", "ConvTranspose", "Gemm", "MatMul")


def read_onnx(path: str | Path) -> tuple[list[SourceLayer], list[str]]:
    """The convolutions of an ONNX graph in graph (topological) order, and the names of nodes
    with weights this topology does not have."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelFileError(
            f"Reading the ONNX file {Path(path).name} needs the onnx package; install it with "
            "`pip install onnx`."
        ) from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # noqa: BLE001 - protobuf raises several kinds for a bad file
        raise ModelFileError(f"{Path(path).name} is not a readable ONNX file: {error}.") from None
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers, consumers = {}, {}
    for node in graph.node:
        for output in node.output:
            producers[output] = node
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)

    def constant(name: str, depth: int = 0) -> np.ndarray | None:
        if name in values:
            return values[name]
        node = producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Identity":
            return constant(node.input[0], depth + 1)
        if node.op_type == "Transpose":
            value = constant(node.input[0], depth + 1)
            if value is None:
                return None
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return value.transpose(perm) if perm else value.transpose()
        return None

    layers, others = [], []
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type in _FOREIGN_OPS:
            others.append(name)
        if node.op_type != "Conv":
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = constant(node.input[1])
        if weight is None or weight.ndim != 5 or groups != 1:
            others.append(name)
            continue
        bias = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if bias is None:
            bias = _added_bias(node, weight.shape[0], consumers, constant)
        layers.append(SourceLayer(name, weight, None if bias is None else bias.reshape(-1)))
    return layers, others


def _added_bias(node: Any, channels: int, consumers: dict, constant: Any) -> np.ndarray | None:
    """The bias of a Conv exported without one and followed by an ``Add`` of a constant."""
    following = consumers.get(node.output[0], [])
    if len(following) != 1 or following[0].op_type != "Add":
        return None
    for name in following[0].input:
        if name != node.output[0]:
            value = constant(name)
            if value is not None and value.size == channels:
                return value
    return None


# --- import ----------------------------------------------------------------------------------

def read_layers(path: str | Path) -> tuple[list[SourceLayer], list[str]]:
    """The file's convolutions and foreign weights, from a Keras HDF5 or an ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Weights file {path} does not exist; check the path.")
    with path.open("rb") as stream:
        is_hdf5 = stream.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    if is_hdf5 or path.suffix.lower() in (".h5", ".hdf5"):
        return read_keras_h5(path)
    return read_onnx(path)


def background_first(count: int, background_index: int) -> list[int]:
    """Published channel order -> ours: the published channel each of our channels reads."""
    return [background_index] + [c for c in range(count) if c != background_index]


def pair_layers(
    layers: list[SourceLayer], model: nn.Module
) -> tuple[list[tuple[str, SourceLayer]], list[SourceLayer]]:
    """(our convolution, file layer) pairs in order, and the file layers left over.

    Keras loads by position; pairing by position and kernel shape (the longest runs of equal
    shapes first, as a diff does) does the same for a well-formed file and, for a damaged one,
    reports the one missing or changed layer instead of every layer after it.
    """
    ours = [name for name, _ in model.convolutions()]
    state = model.state_dict()
    expected = [tuple(state[f"{name}.weight"].shape) for name in ours]
    found = [tuple(layer.weight.shape) for layer in layers]
    pairs, extra = [], []
    matcher = difflib.SequenceMatcher(a=expected, b=found, autojunk=False)
    for _, i1, i2, j1, j2 in matcher.get_opcodes():
        common = min(i2 - i1, j2 - j1)  # "equal" and "replace" pair up; the rest is left over
        pairs += [(ours[i1 + k], layers[j1 + k]) for k in range(common)]
        extra += layers[j1 + common:j2]
    return pairs, extra


def convert(
    layers: list[SourceLayer], model: nn.Module, background_index: int | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's convolutions as ``model``'s tensors (see :func:`pair_layers`), and notes
    naming the file layer behind each problem. File layers left over keep their file names, so
    the report lists them as unexpected."""
    pairs, extra = pair_layers(layers, model)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key, layer in pairs:
        weight, bias = layer.weight, layer.bias
        expected = tuple(state[f"{key}.weight"].shape)
        if key == "head" and background_index is not None and weight.shape == expected:
            if not 0 <= background_index < weight.shape[0]:
                raise ModelFileError(
                    f"The catalog puts the background at output {background_index}, but the "
                    f"file's head has {weight.shape[0]} outputs; fix the catalog entry."
                )
            order = background_first(weight.shape[0], background_index)
            weight = weight[order]
            bias = None if bias is None else bias[order]
        tensors[f"{key}.weight"] = torch.from_numpy(np.array(weight, order="C"))
        if bias is not None:
            tensors[f"{key}.bias"] = torch.from_numpy(np.array(bias, order="C"))
        if tuple(weight.shape) != expected:
            notes.append(f"{key} was given file layer {layer.name!r} "
                         f"(weight {list(weight.shape)} as (out, in, z, y, x))")
    for layer in extra:
        tensors[f"{layer.name} (file layer)"] = torch.from_numpy(np.array(layer.weight))
    if len(layers) != len(model.convolutions()):
        listed = ", ".join(f"{layer.name} {list(layer.weight.shape)}" for layer in layers)
        notes.append(f"the file has {len(layers)} convolution layers, the network "
                     f"{len(model.convolutions())}: {listed or 'none'}")
    return tensors, notes


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import the published Keras (.h5) or ONNX file; see the module docstring."""
    model, arguments, labels, fields = published_network(ARCHITECTURE, PUBLISHED, entry)
    layers, others = read_layers(path)
    background = fields.get("background_index")
    tensors, notes = convert(layers, model, None if background is None else int(background))
    for name in others:
        tensors[f"{name} (file weights)"] = torch.zeros(0)
    source = Path(path).name
    report = load_weights(model, tensors, source=source, strict=False)
    report.notes.extend(notes)
    if not report.ok:
        raise ModelFileError(
            f"The weights in {source} do not fit the {ARCHITECTURE} network:\n{report.text()}\n"
            "Check that the file is the publishers' 3D U-Net and that the catalog entry's labels "
            "and arguments match it."
        )
    if background is not None and len(labels) > 1:
        report.notes.append(
            f"background moved from published output {int(background)} to channel 0; the "
            "published outputs before it each move up by one"
        )
    report.notes.append("the published softmax is not part of the network (it gives logits)")
    card = card_from_entry(fields, architecture=ARCHITECTURE, arguments=arguments,
                           labels=labels, out_channels=len(labels))
    return model.eval(), card, report

