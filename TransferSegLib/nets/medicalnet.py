"""MedicalNet (Med3D) 3D ResNets with their segmentation decoder (Chen, Ma and Zheng, "Med3D:
Transfer Learning for 3D Medical Image Analysis", arXiv:1904.00625, 2019).

Maps (N, in_channels, Z, Y, X) to logits (N, out_channels, Z, Y, X); Z, Y, X should be
divisible by 8 (the encoder's total stride), though any size runs.

Topology, as the paper describes it and the published weights' tensor names and shapes confirm:

* stem: a 7x7x7 convolution of stride 2 to 64 channels, batch norm, ReLU, a 3x3x3 max-pool of
  stride 2 (1/4 resolution).
* ``layer1`` .. ``layer4``: residual stages of 64, 128, 256 and 512 "planes". Only ``layer2``
  downsamples (stride 2, 1/8 resolution); ``layer3`` and ``layer4`` keep the resolution and
  dilate their 3x3x3 convolutions by 2 and 4 instead, as segmentation needs dense features.
  Depth 10/18/34 use basic blocks (two 3x3x3 convolutions), depth 50/101/152/200 bottleneck
  blocks (1x1x1, 3x3x3, 1x1x1 with four times the planes out; the stride on the 3x3x3).
  Blocks per stage: 10: 1-1-1-1, 18: 2-2-2-2, 34 and 50: 3-4-6-3, 101: 3-4-23-3,
  152: 3-8-36-3, 200: 3-24-36-3.
* shortcut of a block that changes stride or width: type ``"A"`` has no parameters (the input
  subsampled by the stride and zero-padded to the new width), type ``"B"`` is a 1x1x1
  convolution with batch norm. The published files use B for depth 10 and 50+, A for 18
  and 34 (MedicalNet's "network structure parameter settings").
* decoder (the published ``conv_seg`` branch): a 2x2x2 transposed convolution of stride 2 to
  32 channels + batch norm + ReLU (``up``, back to 1/4 resolution), a 3x3x3 convolution +
  batch norm + ReLU (``refine``), and a 1x1x1 convolution to the labels (``head``).

The published network ends at 1/4 of the input resolution (its training shrank the labels to
match). Here ``refine`` resizes its features trilinearly to the input size before the 1x1x1
head; the head is linear and has no bias, so this equals resizing the published logits
(``align_corners=False``), and the logits come out at the input's size.

All convolutions but the transposed one are without bias; every norm is batch norm, as
published (their running statistics are part of the pretrained weights).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from TransferSegLib.errors import InputError

# depth -> (block kind, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
# The shortcut type each published file was trained with.
PUBLISHED_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B", 152: "B", 200: "B"}
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)
DECODER_CHANNELS = 32
EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


class ZeroPadShortcut(nn.Module):
    """Type-A shortcut: (N, C, D, H, W) -> (N, channels, D/s, H/s, W/s), no parameters.

    Every ``stride``-th voxel (a 1x1x1 average pool of that stride), then zero channels up to
    ``channels``.
    """

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.channels = channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        # F.pad's last pair pads the channel axis (pairs run from the last axis backwards).
        return F.pad(x, [0, 0, 0, 0, 0, 0, 0, self.channels - x.shape[1]])


def _shortcut(kind: str, in_channels: int, channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == channels:
        return None
    if kind == "A":
        return ZeroPadShortcut(channels, stride)
    return nn.Sequential(nn.Conv3d(in_channels, channels, 1, stride=stride, bias=False),
                         nn.BatchNorm3d(channels))


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions (+ batch norm) and a shortcut: C_in -> ``planes`` channels."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int,
                 shortcut: str) -> None:
        super().__init__()
        self.conv1 = _conv3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = _shortcut(shortcut, in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1x1 -> 3x3x3 (strided, dilated) -> 1x1x1 convolutions and a shortcut:
    C_in -> 4 * ``planes`` channels."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int,
                 shortcut: str) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.downsample = _shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class Refine(nn.Module):
    """3x3x3 convolution + batch norm + ReLU, then trilinear resizing to ``size``.

    ``forward(x, size)``: (N, C, d, h, w) -> (N, C, *size).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)
        self.bn = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class MedicalNet(nn.Module):
    """A MedicalNet 3D ResNet with its segmentation decoder (see the module docstring).

    Args:
        spatial_dims: must be 3.
        in_channels: image channels (the published encoders: 1).
        out_channels: logit channels, one per label including the background.
        depth: 10, 18, 34, 50, 101, 152 or 200.
        shortcut: ``"A"`` (parameter-free) or ``"B"`` (1x1x1 convolution); None takes the one
            the published file of this depth uses.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 depth: int = 10, shortcut: str | None = None) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"MedicalNet is 3D only, not {spatial_dims}D")
        if isinstance(depth, bool) or depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, not {depth!r}")
        shortcut = PUBLISHED_SHORTCUT[depth] if shortcut is None else shortcut
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', not {shortcut!r}")
        kind, counts = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.shortcut = depth, shortcut
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            bn=nn.BatchNorm3d(64),
            relu=nn.ReLU(inplace=True),
            pool=nn.MaxPool3d(3, stride=2, padding=1),
        ))
        width = 64
        stages = zip(STAGE_PLANES, counts, STAGE_STRIDES, STAGE_DILATIONS, strict=True)
        for index, (planes, count, stride, dilation) in enumerate(stages, start=1):
            blocks = []
            for position in range(count):
                blocks.append(block(width, planes, stride if position == 0 else 1, dilation,
                                    shortcut))
                width = planes * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.up = nn.Sequential(OrderedDict(
            conv=nn.ConvTranspose3d(width, DECODER_CHANNELS, 2, stride=2),
            bn=nn.BatchNorm3d(DECODER_CHANNELS),
            relu=nn.ReLU(inplace=True),
        ))
        self.refine = Refine(DECODER_CHANNELS)
        self.head = nn.Conv3d(DECODER_CHANNELS, out_channels, 1, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.refine(self.up(x), size)
        return self.head(x)


# --- registry fields ------------------------------------------------------------------------

def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = {"depth": 10}
    resolved.update(kwargs)
    depth = resolved["depth"]
    if isinstance(depth, bool) or depth not in DEPTHS:
        raise InputError(
            f"medicalnet needs depth to be one of {', '.join(map(str, sorted(DEPTHS)))}, "
            f"not {depth!r}."
        )
    if resolved.get("shortcut") is None:
        resolved["shortcut"] = PUBLISHED_SHORTCUT[depth]
    if resolved["shortcut"] not in ("A", "B"):
        raise InputError(
            f"medicalnet needs shortcut 'A' (parameter-free) or 'B' (1x1x1 convolution), "
            f"not {resolved['shortcut']!r}."
        )
    return resolved


def _encoder(model: MedicalNet) -> list[nn.Module]:
    return [model.stem, model.layer1, model.layer2, model.layer3, model.layer4]


def _decoder(model: MedicalNet) -> list[nn.Module]:
    return [model.up, model.refine]


def _head(model: MedicalNet) -> nn.Module:
    return model.head


ARCHITECTURES = {
    "medicalnet": {
        "network_class": MedicalNet,
        "resolve": _resolve,
        "divisor": lambda kw: 8,
        "encoder": _encoder,
        "decoder": _decoder,
        "head": _head,
    },
}
