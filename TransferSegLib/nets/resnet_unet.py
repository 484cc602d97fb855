"""A segmentation network on MONAI's 3D ResNet: ``resnet_unet``.

Maps (N, in_channels, Z, Y, X) to logits (N, out_channels, Z, Y, X); Z, Y, X must each be
divisible by :func:`divisor` (the encoder's total stride: 32 for the default stem, also 32 for
a stem of stride (1, 2, 2)).

* encoder: ``monai.networks.nets.ResNet`` without its classifier, stored as ``encoder``, so its
  tensors keep MONAI's names (``encoder.conv1.weight``, ``encoder.layer3.7.bn2.running_mean``)
  and published ResNet weights in that layout load by name. Stem: a convolution of
  ``conv1_t_size`` and stride ``conv1_t_stride`` (per axis, network order z, y, x), norm, ReLU,
  then a 3x3x3 max pool of stride 2 (unless ``no_max_pool``); then ``layer1`` .. ``layer4``
  (``layers`` residual blocks each, of ``block`` type "basic" or "bottleneck", widths
  ``block_inplanes`` times the block's expansion, layer2..4 halving the resolution). Its norms
  are batch norms, as in the published ResNets (MONAI's ResNet builds its residual layers with
  batch norm whatever its ``norm`` argument); in training every feature map, the deepest
  included, needs more than one value per channel, so patches of twice the divisor or more.
* decoder: five light blocks, deepest first, one per skip: the outputs of layer3, layer2,
  layer1, the stem, and finally the image itself. Each block projects the deeper features to
  its width (1x1x1 convolution), upsamples them trilinearly to the skip's size, adds the skip
  projected to the same width, then runs two 3x3x3 convolution + norm + ReLU. Widths are
  ``decoder_channels``.
* head: a 1x1x1 convolution with bias to ``out_channels``.

The stem has no module of its own (MONAI's ResNet keeps ``conv1`` and ``bn1`` side by side),
so the encoder blocks are ``[conv1, bn1, layer1, layer2, layer3, layer4]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn
from torch.nn import functional as F

from TransferSegLib.errors import InputError

_BLOCKS = {"basic": ResNetBlock, "bottleneck": ResNetBottleneck}
_DECODER_LEVELS = 5  # layer3, layer2, layer1, stem, image


class DecoderBlock(nn.Module):
    """(deeper (N, in_channels, ...), skip (N, skip_channels, Z, Y, X)) -> (N, channels, Z, Y, X).

    The deeper features are upsampled to the skip's size, whatever the ratio per axis.
    """

    def __init__(self, in_channels: int, skip_channels: int, channels: int, norm: Any) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(in_channels, channels, 1, bias=False)
        self.lateral = nn.Conv3d(skip_channels, channels, 1, bias=False)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = get_norm_layer(copy.deepcopy(norm), spatial_dims=3, channels=channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = get_norm_layer(copy.deepcopy(norm), spatial_dims=3, channels=channels)
        self.act = get_act_layer(("relu", {"inplace": True}))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=skip.shape[2:], mode="trilinear",
                          align_corners=False)
        x = x + self.lateral(skip)
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class ResNetUNet(nn.Module):
    """MONAI ResNet encoder + light U-Net decoder; see the module docstring."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        block: str = "basic",
        layers: Sequence[int] = (1, 1, 1, 1),
        block_inplanes: Sequence[int] = (32, 64, 128, 256),
        conv1_t_size: int | Sequence[int] = 7,
        conv1_t_stride: int | Sequence[int] = 2,
        no_max_pool: bool = False,
        shortcut_type: str = "B",
        bias_downsample: bool = False,
        decoder_channels: Sequence[int] = (128, 64, 32, 16, 16),
        decoder_norm: Any = ("instance", {"affine": True}),
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("resnet_unet is a 3D network (spatial_dims=3)")
        if block not in _BLOCKS:
            raise ValueError(f"block must be 'basic' or 'bottleneck', not {block!r}")
        if len(layers) != 4 or len(block_inplanes) != 4:
            raise ValueError("layers and block_inplanes need four entries (layer1..layer4)")
        if len(decoder_channels) != _DECODER_LEVELS:
            raise ValueError(f"decoder_channels needs {_DECODER_LEVELS} entries, deepest first")
        self.encoder = ResNet(
            block, list(layers), list(block_inplanes), spatial_dims=3,
            n_input_channels=in_channels, conv1_t_size=_tuple(conv1_t_size),
            conv1_t_stride=_tuple(conv1_t_stride), no_max_pool=no_max_pool,
            shortcut_type=shortcut_type, feed_forward=False, bias_downsample=bias_downsample,
        )
        expansion = _BLOCKS[block].expansion
        widths = [int(w) * expansion for w in block_inplanes]
        skips = [widths[2], widths[1], widths[0], int(block_inplanes[0]), in_channels]
        deeper = [widths[3], *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(d, s, c, _tuple(decoder_norm))
            for d, s, c in zip(deeper, skips, decoder_channels, strict=True)
        )
        self.head = nn.Conv3d(decoder_channels[-1], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        stem = encoder.act(encoder.bn1(encoder.conv1(x)))
        y = stem if encoder.no_max_pool else encoder.maxpool(stem)
        f1 = encoder.layer1(y)
        f2 = encoder.layer2(f1)
        f3 = encoder.layer3(f2)
        out = encoder.layer4(f3)
        for block, skip in zip(self.decoder, (f3, f2, f1, stem, x), strict=True):
            out = block(out, skip)
        return self.head(out)


def _tuple(value: Any) -> Any:
    """JSON lists back to the tuples MONAI's factories and ResNet expect (nested)."""
    if isinstance(value, list):
        return tuple(_tuple(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = {
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [32, 64, 128, 256],
        "conv1_t_size": 7,
        "conv1_t_stride": 2,
        "no_max_pool": False,
        "shortcut_type": "B",
        "bias_downsample": False,
        "decoder_channels": [128, 64, 32, 16, 16],
        "decoder_norm": ["instance", {"affine": True}],
    }
    resolved.update(kwargs)
    for key in ("conv1_t_size", "conv1_t_stride"):
        value = resolved[key]
        resolved[key] = [int(v) for v in value] if isinstance(value, (list, tuple)) else int(value)
        if isinstance(resolved[key], list) and len(resolved[key]) != 3:
            raise InputError(f"resnet_unet needs {key} as one number or three (z, y, x).")
    if resolved["block"] not in _BLOCKS:
        raise InputError(f"resnet_unet block must be 'basic' or 'bottleneck', not "
                         f"{resolved['block']!r}.")
    return _jsonable(resolved)


def divisor(kwargs: dict[str, Any]) -> int:
    """The encoder's total stride: stem stride x max pool (2) x 2 ** 3 (layer2..4), as one
    number that every axis's stride divides."""
    stride = kwargs["conv1_t_stride"]
    per_axis = [int(s) for s in stride] if isinstance(stride, list) else [int(stride)] * 3
    pool = 1 if kwargs["no_max_pool"] else 2
    return math.lcm(*(s * pool * 8 for s in per_axis))


def _encoder(model: ResNetUNet) -> list[nn.Module]:
    e = model.encoder
    return [e.conv1, e.bn1, e.layer1, e.layer2, e.layer3, e.layer4]


def _decoder(model: ResNetUNet) -> list[nn.Module]:
    return list(model.decoder)


def _head(model: ResNetUNet) -> nn.Module:
    return model.head


ARCHITECTURES = {
    "resnet_unet": {
        "network_class": ResNetUNet,
        "resolve": _resolve,
        "divisor": divisor,
        "encoder": _encoder,
        "decoder": _decoder,
        "head": _head,
    },
}
