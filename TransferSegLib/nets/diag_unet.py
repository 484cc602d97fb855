"""The sparse-annotation 3D U-Net of Humpire-Mamani et al. (DIAG Nijmegen, "Transfer learning
from a sparsely annotated dataset of 3D medical images", arXiv:2311.05032, 2023), after the
3D U-Net of Cicek et al. (MICCAI 2016).

A network of *valid* convolutions: it maps (N, in_channels, Z, Y, X) to logits
(N, out_channels, Z - 88, Y - 88, X - 88). Each spatial size must be 4 more than a multiple
of 8 and at least 92 (:func:`output_size` checks one); the publishers use cubes of
108, 132, 156 or 180 voxels, giving outputs of 20, 44, 68 or 92 (:func:`allowed_input_sizes`).
So an output voxel sees a cube of 88 + 1 voxels centred on it, and a volume is segmented by
output-sized tiles each read from an input-sized window (:mod:`TransferSegLib.tiling`).

Topology, as the published Keras definition describes it and its parameter count (16,317,015
for 23 outputs) confirms, with ``filters`` f = 32:

* encoder level k = 0, 1, 2: two 3x3x3 valid convolutions, each followed by a ReLU, from the
  level's input to f * 2**k and then 2f * 2**k channels (1 -> 32 -> 64, 64 -> 64 -> 128,
  128 -> 128 -> 256), then 2x2x2 max pooling. The activated output before the pooling is the
  level's skip connection.
* bottleneck: the same pair, 8f -> 8f -> 16f (256 -> 256 -> 512).
* decoder level k = 2, 1, 0 (deepest first): nearest-neighbour upsampling by 2 (each voxel
  repeated), concatenation with the skip of level k centre-cropped to the same size (the
  upsampled features first, then the skip), and two 3x3x3 valid convolutions with ReLU to
  2f * 2**k channels (768 -> 256 -> 256, 384 -> 128 -> 128, 192 -> 64 -> 64).
* head: a 1x1x1 convolution from 2f channels to ``out_channels`` (the published model has a
  softmax after it; this network returns the logits).

There is no normalisation layer and no dropout. Every convolution has a bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from TransferSegLib.errors import InputError

LEVELS = 4  # resolutions including the bottleneck; fixed by the published topology
PUBLISHED_INPUT_SIZES = (108, 132, 156, 180)
_KERNEL = 3


def output_size(input_size: int) -> int:
    """The output size (voxels) along one axis for an input of ``input_size`` voxels.

    Raises :class:`InputError` for a size the network cannot take: each max pooling needs an
    even size, and every convolution needs at least a 3-voxel input. The valid sizes are 92,
    100, 108, ... (4 more than a multiple of 8), giving ``input_size - 88``.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise InputError(f"diag_unet input sizes are whole numbers of voxels, not {input_size!r}.")
    shrink = 2 * (_KERNEL - 1)  # two valid convolutions per level
    size, skips = input_size, []
    for _ in range(LEVELS - 1):
        size -= shrink
        if size < 2 or size % 2:
            raise InputError(_size_message(input_size))
        skips.append(size)
        size //= 2
    size -= shrink
    for skip in reversed(skips):
        size *= 2
        if size < 1 or size > skip or (skip - size) % 2:
            raise InputError(_size_message(input_size))
        size -= shrink
    if size < 1:
        raise InputError(_size_message(input_size))
    return size


def _size_message(size: Any) -> str:
    sizes = ", ".join(map(str, PUBLISHED_INPUT_SIZES))
    return (
        f"diag_unet cannot take an input of {size} voxels: each size must be 4 more than a "
        f"multiple of 8 and at least 92 (the published sizes are {sizes})."
    )


def allowed_input_sizes() -> tuple[int, ...]:
    """The input cube sizes (voxels) the publishers list: 108, 132, 156, 180."""
    return PUBLISHED_INPUT_SIZES


def margin() -> int:
    """Voxels lost on each side of each axis: (input - output) / 2 = 44."""
    return (PUBLISHED_INPUT_SIZES[0] - output_size(PUBLISHED_INPUT_SIZES[0])) // 2


class ConvPair(nn.Sequential):
    """Two 3x3x3 valid convolutions, each followed by a ReLU: (N, in, D, H, W) ->
    (N, out, D - 4, H - 4, W - 4)."""

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, middle_channels, _KERNEL)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(middle_channels, out_channels, _KERNEL)
        self.act2 = nn.ReLU(inplace=True)


def _centre_crop(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The central ``size`` (D, H, W) voxels of a (N, C, D', H', W') tensor; the margins are
    even (checked by :func:`output_size`), so the crop is symmetric."""
    index = [slice(None), slice(None)]
    for have, want in zip(tensor.shape[2:], size, strict=True):
        start = (int(have) - int(want)) // 2
        index.append(slice(start, start + int(want)))
    return tensor[tuple(index)]


class DIAGUNet(nn.Module):
    """The sparse-annotation 3D U-Net of valid convolutions (see the module docstring).

    Args:
        spatial_dims: must be 3.
        in_channels: image channels (the published model: 1, CT).
        out_channels: logit channels (the published model: 23, background last in its files;
            background first once imported).
        filters: channels of the first convolution (32 published); level k has
            ``filters * 2**k`` and ``2 * filters * 2**k``.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 23,
                 filters: int = 32) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"diag_unet is 3D only, not {spatial_dims}D")
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"filters must be a positive whole number, not {filters!r}")
        widths = [filters * 2**level for level in range(LEVELS)]  # 32, 64, 128, 256
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.encoder.append(ConvPair(channels, width, 2 * width))
            channels = 2 * width
        self.bottleneck = ConvPair(channels, widths[-1], 2 * widths[-1])
        channels = 2 * widths[-1]
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):  # deepest first
            skip = 2 * width
            self.decoder.append(ConvPair(channels + skip, skip, skip))
            channels = skip
        self.head = nn.Conv3d(channels, out_channels, 1)

    def convolutions(self) -> list[tuple[str, nn.Conv3d]]:
        """(name, layer) of every convolution in data-flow order, the head last: the order of
        the published file's layers."""
        pairs = [*(f"encoder.{i}" for i in range(len(self.encoder))), "bottleneck",
                 *(f"decoder.{i}" for i in range(len(self.decoder)))]
        layers = []
        for name in pairs:
            pair = self.get_submodule(name)
            layers += [(f"{name}.conv1", pair.conv1), (f"{name}.conv2", pair.conv2)]
        return [*layers, ("head", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for size in x.shape[2:]:
            try:
                output_size(int(size))
            except InputError as error:
                raise ValueError(str(error)) from None
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.bottleneck(x)
        for level in self.decoder:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = level(torch.cat((x, _centre_crop(skips.pop(), x.shape[2:])), dim=1))
        return self.head(x)


# --- registry fields ------------------------------------------------------------------------

DEFAULTS = {"filters": 32}


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    resolved = dict(DEFAULTS)
    resolved.update(kwargs)
    filters = resolved["filters"]
    if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
        raise InputError(f"diag_unet needs filters to be a positive whole number, not {filters!r}.")
    return resolved


def _encoder(model: DIAGUNet) -> list[nn.Module]:
    return [*model.encoder, model.bottleneck]


def _decoder(model: DIAGUNet) -> list[nn.Module]:
    return list(model.decoder)  # built deepest first


def _head(model: DIAGUNet) -> nn.Module:
    return model.head


ARCHITECTURES = {
    "diag_unet": {
        "network_class": DIAGUNet,
        "resolve": _resolve,
        # Every valid size is a multiple of 4 (but not every multiple of 4 is valid: see
        # output_size, which inference and training must use for this network).
        "divisor": lambda kw: 4,
        "encoder": _encoder,
        "decoder": _decoder,
        "head": _head,
        "output_size": lambda kw, n: output_size(n),
    },
}
