"""TAPS prostate MRI segmentation (an ONNX file) -> ``segresnetds``.

TAPS (Laviolette lab, package ``lavlab-taps``, MIT) ships ``taps/resources/model_v1.onnx``: MONAI's
SegResNetDS with 32 initial filters, four levels (1, 2, 2, 4 encoder blocks), GroupNorm of 8
groups and Mish activations, exported from PyTorch, with one output channel: the prostate logit
(sigmoid). Its input is (N, 1, 128, 128, 32): MONAI arrays in RAS orientation, so the axes are
x, y, z and the window is 128 x 128 voxels in-plane by 32 slices.

How TAPS prepares a T2-weighted scan, and so what the card says: axes to RAS, resampled to
0.8 x 0.8 x 3 mm (x, y, z), intensities z-scored over the nonzero voxels (zeros stay zero),
128 x 128 x 32 sliding windows. TAPS also crops to the foreground before the windows and
smooths the logits (Gaussian, sigma 2.5 voxels) before its threshold of 0.55 on the sigmoid;
TransferSeg does neither.

What the import does to the tensors:

* most keep their PyTorch names, which are MONAI SegResNetDS's own (``encoder.layers.0...``);
* each GroupNorm was exported as reshape, instance norm, reshape, then ``Mul`` and ``Add`` by
  anonymous tensors (``onnx::Mul_517``) of shape (C, 1, 1, 1): those are the norm's scale and
  shift. A residual block's ``norm<k>`` feeds, through the activation, its ``conv<k>``; the
  norm is named after the first convolution downstream of it;
* convolution kernels are reordered from MONAI's (x, y, z) axes to TransferSeg's (z, y, x), so
  the network computes on TransferSeg's arrays exactly what TAPS computes on its own;
* the single sigmoid output becomes two channels, background and prostate: the prostate
  channel is TAPS's logit, the background channel a constant logit(0.55), so softmax and argmax
  decide exactly as TAPS's threshold of 0.55 on the sigmoid does (before its smoothing).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import card_from_entry
from TransferSegLib.importers.onnx_weights import OnnxGraph, read_onnx_graph
from TransferSegLib.weights import ImportReport, load_weights

ARCHITECTURE = "segresnetds"
ARGUMENTS = {
    "init_filters": 32,
    "blocks_down": [1, 2, 2, 4],
    "norm": ["group", {"num_groups": 8}],
    "act": ["mish", {"inplace": True}],
}
THRESHOLD = 0.55  # TAPS's cut-off on the sigmoid of its (smoothed) logit

# What the published model needs; a catalog entry's own fields win.
PUBLISHED = {
    "labels": {"0": "background", "1": "prostate"},
    "spacing": [0.8, 0.8, 3.0],
    "patch_size": [128, 128, 32],
    "normalisation": {"kind": "zscore", "nonzero": True},
    "orientation": "RAS",
    "modality": "MR",
    "in_channels": 1,
    "arguments": ARGUMENTS,
}

_CONV_WEIGHT = re.compile(r"^(?P<block>.+)\.conv(?P<index>\d+)\.weight$")


def _norm_affines(graph: OnnxGraph, named: set[str]) -> dict[str, np.ndarray]:
    """{``<block>.norm<k>.weight``/``.bias``: array (C,)} from the anonymous Mul/Add tensors."""
    def anonymous(names: tuple[str, ...]) -> list[str]:
        stored = [graph.stored(name) for name in names]
        return [name for name in stored if name is not None and name not in named]

    found: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.op_type != "Mul":
            continue
        scales = anonymous(node.inputs)
        if len(scales) != 1:
            continue  # not an affine scale (Mish's x * tanh(softplus(x)) reads no tensor)
        adds = [n for n in graph.consumers(node.outputs[0]) if n.op_type == "Add"]
        shifts = [name for add in adds for name in anonymous(add.inputs)]
        conv = next((n for n in graph.downstream(node.outputs[0]) if n.op_type == "Conv"), None)
        match = _CONV_WEIGHT.match(conv.inputs[1]) if conv is not None else None
        if len(shifts) != 1 or match is None:
            raise ModelFileError(
                f"The ONNX file has a scale tensor {scales[0]} that is not a norm before a "
                "residual block's convolution; is it the TAPS model?"
            )
        prefix = f"{match['block']}.norm{match['index']}"
        found[f"{prefix}.weight"] = graph.initialisers[scales[0]].reshape(-1)
        found[f"{prefix}.bias"] = graph.initialisers[shifts[0]].reshape(-1)
    return found


def _to_zyx(array: np.ndarray) -> np.ndarray:
    """A kernel (out, in, x, y, z) -> (out, in, z, y, x); other tensors unchanged."""
    return np.ascontiguousarray(array.transpose(0, 1, 4, 3, 2)) if array.ndim == 5 else array


def _two_channel_head(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A one-logit sigmoid head (1, C, 1, 1, 1) -> two channels [background, foreground]."""
    background = math.log(THRESHOLD / (1 - THRESHOLD))
    weight = np.concatenate([np.zeros_like(weight), weight])
    bias = np.concatenate([np.full_like(bias, background), bias])
    return weight, bias


def convert(graph: OnnxGraph, model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    """The ONNX file's tensors under ``model``'s state_dict names, in its layouts.

    ``head`` is the state_dict prefix of the output convolution. Tensors that find no place keep
    their ONNX names, so the import report lists them as unexpected.
    """
    state = model.state_dict()
    named = {name for name in graph.initialisers if name in state}
    arrays = {name: graph.initialisers[name] for name in named}
    arrays.update(_norm_affines(graph, named))
    used = {graph.stored(n) for node in graph.nodes if node.op_type in ("Mul", "Add")
            for n in node.inputs}
    for name, array in graph.initialisers.items():
        if name not in named and name not in used:
            arrays[name] = array
    weight, bias = f"{head}.weight", f"{head}.bias"
    if weight in arrays and bias in arrays:
        if arrays[weight].shape[0] != 1:
            raise ModelFileError(
                f"The TAPS file's output has {arrays[weight].shape[0]} channels; one (the "
                "prostate logit) was expected. Is it the published model_v1.onnx?"
            )
        arrays[weight], arrays[bias] = _two_channel_head(arrays[weight], arrays[bias])
    return {name: torch.from_numpy(_to_zyx(np.array(a, np.float32))) for name, a in
            arrays.items()}


def _patch_size(graph: OnnxGraph) -> list[int] | None:
    """The fixed spatial input size (x, y, z) of the file, if it has one."""
    shapes = list(graph.inputs.values())
    if len(shapes) != 1 or len(shapes[0]) != 5:
        raise ModelFileError("The ONNX file does not take one (N, C, x, y, z) image; is it the "
                             "TAPS model?")
    spatial = shapes[0][2:]
    return [int(s) for s in spatial] if all(isinstance(s, int) for s in spatial) else None


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import TAPS's ``model_v1.onnx``; see the module docstring for the card and the mapping."""
    graph = read_onnx_graph(path)
    patch = _patch_size(graph)
    fields = {**PUBLISHED, **({"patch_size": patch} if patch else {}), **entry}
    labels = {int(k): str(v) for k, v in fields["labels"].items()}
    arguments = networks.resolve_kwargs(ARCHITECTURE, **dict(fields["arguments"]))
    model = networks.build_network(ARCHITECTURE, int(fields["in_channels"]), len(labels),
                                   **arguments)
    output_layer = networks.head(ARCHITECTURE, model)
    head = next(name for name, module in model.named_modules() if module is output_layer)
    tensors = convert(graph, model, head)
    report = load_weights(model, tensors, source=Path(path).name)
    report.notes.append("GroupNorm scales and shifts found by where the graph uses them; "
                        "kernels reordered from (x, y, z) to (z, y, x)")
    report.notes.append(f"the single sigmoid output became [background, prostate] logits; "
                        f"argmax equals TAPS's threshold of {THRESHOLD} on the sigmoid")
    card = card_from_entry(fields, architecture=ARCHITECTURE, arguments=arguments,
                           labels=labels, out_channels=len(labels))
    return model.eval(), card, report
