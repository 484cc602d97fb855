"""MONAI's SegResNetDS (Myronenko, "3D MRI brain tumor segmentation using autoencoder
regularization", 2018, with deep supervision and optional anisotropic kernels) as ``segresnetds``.

Maps (N, in_channels, Z, Y, X) to logits (N, out_channels, Z, Y, X); Z, Y, X must each be
divisible by ``2 ** (len(blocks_down) - 1)`` (8 with the default four levels), or with
``resolution`` given by the per-axis products of the anisotropic strides.

Topology: a 3x3x3 convolution to ``init_filters`` channels, then one encoder level per entry of
``blocks_down`` (that many pre-activation residual blocks: norm, act, conv, norm, act, conv,
plus the input; then a stride-2 convolution doubling the channels, except at the bottom); the
decoder, deepest first, upsamples by 2 (transposed convolution by default), adds the encoder
level's output and runs ``blocks_up`` residual blocks; the head is a 1x1x1 convolution with bias.
Encoder blocks (for freezing): ``conv_init``, then each level's residual blocks and its stride-2
convolution; decoder blocks, deepest first: each level's upsampling and residual blocks.

Deep supervision is off here (``dsdepth`` 1): training and inference both give the final,
full-resolution output only, which is what the training loop expects. ``resolution`` (voxel
size per network axis, so (z, y, x) in mm) makes the first levels use anisotropic kernels;
it is stored with the other arguments.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
from monai.networks.layers.factories import Act, Norm, split_args
from monai.networks.nets import SegResNetDS
from monai.networks.nets.segresnet_ds import scales_for_resolution
from monai.utils import has_option
from torch import nn

from TransferSegLib.errors import InputError


def _layer_arguments(value: Any, factory: Any, option: str, default: bool) -> list:
    """``value`` (a name, or [name, {arguments}]) as [name, {arguments}] with ``option`` set.

    SegResNetDS sets ``affine``/``inplace`` itself in the dict it is given; filling them in here
    keeps the stored arguments equal to what the network really used.
    """
    name, arguments = split_args(copy.deepcopy(value if isinstance(value, str) else tuple(value)))
    arguments = dict(arguments)
    layer = factory[name, 3] if factory is Norm else factory[name]
    if has_option(layer, option):
        arguments.setdefault(option, default)
    return [str(name).lower(), arguments]


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    if "preprocess" in kwargs:
        raise InputError("segresnetds does not take 'preprocess': intensities are prepared by "
                         "the model card's normalisation recipe.")
    resolved: dict[str, Any] = {
        "init_filters": 16,
        "act": "relu",
        "norm": "instance",
        "blocks_down": [1, 2, 2, 4],
        "dsdepth": 1,
        "upsample_mode": "deconv",
        "resolution": None,
    }
    resolved.update(kwargs)
    if resolved["dsdepth"] != 1:
        raise InputError("segresnetds is used without deep supervision: dsdepth must be 1.")
    resolved["blocks_down"] = [int(b) for b in resolved["blocks_down"]]
    if resolved.get("blocks_up") is None:
        resolved["blocks_up"] = [1] * (len(resolved["blocks_down"]) - 1)
    resolved["blocks_up"] = [int(b) for b in resolved["blocks_up"]]
    if len(resolved["blocks_up"]) != len(resolved["blocks_down"]) - 1:
        raise InputError("segresnetds needs one entry of blocks_up per level below the top "
                         f"(len(blocks_down) - 1 = {len(resolved['blocks_down']) - 1}).")
    if resolved["resolution"] is not None:
        resolved["resolution"] = [float(r) for r in resolved["resolution"]]
    resolved["norm"] = _layer_arguments(resolved["norm"], Norm, "affine", True)
    resolved["act"] = _layer_arguments(resolved["act"], Act, "inplace", True)
    return resolved


def _divisor(kwargs: dict[str, Any]) -> int:
    levels = len(kwargs["blocks_down"])
    if kwargs.get("resolution") is None:
        return 2 ** (levels - 1)
    scales = scales_for_resolution(kwargs["resolution"], n_stages=levels)[:-1]
    if not scales:
        return 1
    per_axis = np.prod(np.array(scales), axis=0)
    return math.lcm(*(int(v) for v in per_axis))


def _encoder(model: SegResNetDS) -> list[nn.Module]:
    # Each level is its residual blocks then the stride-2 convolution into the next level
    # (the bottom level has none); the level itself is a ModuleDict, never called.
    blocks: list[nn.Module] = [model.encoder.conv_init]
    for level in model.encoder.layers:
        blocks.append(level["blocks"])
        if any(True for _ in level["downsample"].parameters()):
            blocks.append(level["downsample"])
    return blocks


def _decoder(model: SegResNetDS) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for level in model.up_layers:  # deepest first; heads above the last are off (Identity)
        blocks += [level["upsample"], level["blocks"]]
    return blocks


def _head(model: SegResNetDS) -> nn.Module:
    return model.up_layers[-1]["head"]


ARCHITECTURES = {
    "segresnetds": {
        "network_class": SegResNetDS,
        "resolve": _resolve,
        "divisor": _divisor,
        "encoder": _encoder,
        "decoder": _decoder,
        "head": _head,
    },
}
