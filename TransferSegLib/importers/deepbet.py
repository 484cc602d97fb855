"""deepbet brain extraction (Fisch et al., Comput Biol Med 2024) -> ``linknet3d``.

The published weights are a TorchScript archive (``data/models/model.pt`` of the ``deepbet``
package). It is read with :func:`~TransferSegLib.importers.torchscript.read_torchscript_tensors`,
which never runs the archive's code; its tensors are named after the published modules:
``init`` (stem), ``down0..3`` (encoder stages of two residual ``block1``/``block2``, each a
``double_conv`` and, where the resolution halves, a ``downsample`` shortcut), ``up0..3``
(decoder blocks, deepest first: ``conv1``, ``tp_conv``, ``conv2``), ``tp_conv1`` and ``conv``
(the half-resolution pair) and ``tp_conv2`` (the output), renamed here onto
:class:`~TransferSegLib.nets.deepbet.LinkNet3D`.

How deepbet uses the network (``deepbet/bet.py``, ``utils.py``, version 1.0.2), and what the
card keeps of it:

- axes: the volume in nibabel's closest canonical orientation (voxel axes toward R, A, S) is
  fed as a (R, A, S) array. TransferSeg feeds (Z, Y, X) arrays, so the card's orientation is
  ``"SAR"`` (x toward superior, y anterior, z right): its (Z, Y, X) array is deepbet's.
- intensities: clipped to the 0.5 and 99.5 percentiles, z-scored, then moved to mean 0.449 and
  standard deviation 0.226 (ImageNet's grey values): ``{"kind": "mr", "percentiles": [0.5,
  99.5], "output_mean": 0.449, "output_std": 0.226}``. (deepbet takes the percentiles of the
  whole volume and the mean and deviation of its crop; the network's first convolution has no
  bias and is followed by instance norm, so it is insensitive to the latter.)
- grid: deepbet finds the brain's bounding box with a second, coarse network (not imported),
  widens it by 10 % of its size on each side and resizes that crop to 256^3 voxels (nearest
  neighbour), so the voxel size depends on the head. The card's spacing is that of an average
  adult brain (the ICBM152 template's brain mask, 145 x 181 x 155 mm, widened likewise; see
  :data:`PUBLISHED`), and its patch is deepbet's 256^3 input, so a brain-centred crop of a
  typical T1 is one window, as in deepbet.
- output: two channels; deepbet takes the softmax's channel 1 (brain) above 0.5, then keeps the
  largest connected component and fills holes (post-processing not applied here).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.importers import card_from_entry, published_network
from TransferSegLib.importers.torchscript import read_torchscript_tensors
from TransferSegLib.weights import ImportReport, load_weights

ARCHITECTURE = "linknet3d"
INPUT_SIZE = 256  # deepbet resizes its brain crop to 256^3 voxels
CROP_MARGIN = 0.1  # of the box size, added on each side

# ICBM152 2009a brain mask (nilearn's definition: template > 0.2 of its maximum) extent in mm,
# (R, A, S); widened by the crop margin and divided over the input size gives the spacing at
# which deepbet sees an average adult brain. The card's axes are (S, A, R): see the docstring.
_AVERAGE_BRAIN_MM = {"R": 145.0, "A": 181.0, "S": 155.0}
_SPACING = {axis: round(size * (1 + 2 * CROP_MARGIN) / INPUT_SIZE, 3)
            for axis, size in _AVERAGE_BRAIN_MM.items()}

# What the published model needs; a catalog entry's own fields win.
PUBLISHED = {
    "labels": {"0": "background", "1": "brain"},
    "spacing": [_SPACING["S"], _SPACING["A"], _SPACING["R"]],
    "patch_size": [INPUT_SIZE] * 3,
    "normalisation": {"kind": "mr", "percentiles": [0.5, 99.5],
                      "output_mean": 0.449, "output_std": 0.226},
    "orientation": "SAR",
    "modality": "MR",
    "in_channels": 1,
}


def _block(match: re.Match) -> str:
    return f"encoder.{match[1]}.{int(match[2]) - 1}."  # published blocks count from 1


# Published module path (regular expression) -> our module path.
_RENAMES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"init\.0\.", lambda m: "stem.conv."),
    (r"down(\d+)\.block(\d+)\.double_conv\.0\.", lambda m: _block(m) + "conv1."),
    (r"down(\d+)\.block(\d+)\.double_conv\.3\.", lambda m: _block(m) + "conv2."),
    (r"down(\d+)\.block(\d+)\.downsample\.0\.", lambda m: _block(m) + "shortcut.0."),
    (r"up(\d+)\.conv1\.0\.", lambda m: f"decoder.{m[1]}.reduce."),
    (r"up(\d+)\.tp_conv\.0\.", lambda m: f"decoder.{m[1]}.upsample."),
    (r"up(\d+)\.conv2\.0\.", lambda m: f"decoder.{m[1]}.expand."),
    (r"tp_conv1\.0\.", lambda m: "final_up.0."),
    (r"conv\.0\.", lambda m: "final_conv.0."),
    (r"tp_conv2\.", lambda m: "head."),
]


def rename(key: str) -> str:
    """Our name for a published tensor name (``down1.block1.downsample.0.weight`` ->
    ``encoder.1.0.shortcut.0.weight``); names without a counterpart are returned unchanged."""
    for pattern, target in _RENAMES:
        match = re.match(pattern, key)
        if match:
            return target(match) + key[match.end():]
    return key


def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published tensors under our names."""
    return {rename(key): value for key, value in tensors.items()}


def _pinned_sha256(path: Path, entry: dict) -> str | None:
    """The sha256 the catalog entry pins for ``path`` (by file name, else its only file)."""
    files = [f for f in entry.get("files", []) if isinstance(f, dict)]
    named = [f for f in files if f.get("name") == path.name]
    chosen = named or (files if len(files) == 1 else [])
    return chosen[0].get("sha256") if chosen else None


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import deepbet's ``model.pt``; see the module docstring for what the card says."""
    path = Path(path)
    model, arguments, labels, fields = published_network(ARCHITECTURE, PUBLISHED, entry)
    tensors = read_torchscript_tensors(path, expected_sha256=_pinned_sha256(path, entry))
    report = load_weights(model, convert(tensors), source=path.name)
    report.notes.append(
        "deepbet's bounding-box network, its crop to the brain and its post-processing "
        "(largest component, holes filled) are not part of this model"
    )
    card = card_from_entry(fields, architecture=ARCHITECTURE, arguments=arguments,
                           labels=labels, out_channels=len(labels))
    return model.eval(), card, report
