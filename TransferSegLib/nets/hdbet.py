"""HD-BET v1's network: a 3D residual U-Net for brain extraction (Isensee et al., Hum Brain
Mapp 2019, "Automated brain extraction of multisequence MRI using artificial neural networks").

Maps (N, in_channels, Z, Y, X) to logits (N, out_channels, Z, Y, X); Z, Y, X must be
divisible by ``2 ** (levels - 1)`` (16 for the published five levels).

Topology, as the paper describes it and the published weights' tensor names and shapes confirm
(``base_filters`` f = 21, five levels of f, 2f, 4f, 8f, 16f channels):

* encoder level 0: a 3x3x3 convolution from the image to f channels; levels 1..: a 3x3x3
  convolution of stride 2 doubling the channels. Each level then has a pre-activation residual
  block (norm, LeakyReLU, conv, norm, LeakyReLU, conv, plus its input) followed by a norm and a
  LeakyReLU; that activated output is the level's skip connection and the next level's input.
* decoder level k (deepest first): trilinear upsampling by 2 (corner-aligned), a 3x3x3
  convolution halving the channels, norm, LeakyReLU; concatenation with the skip of level k
  (skip first); then a "localisation" pair: a 3x3x3 convolution keeping the channels and a
  1x1x1 one halving them, each followed by norm and LeakyReLU. At full resolution the pair is
  two 3x3x3 convolutions keeping all 2f channels.
* head: a 1x1x1 convolution without bias from 2f channels to ``out_channels``.

Every norm is an instance norm with a learned scale and shift, computed from the image itself
at inference too (the published files carry running averages; the published inference does
not use them). LeakyReLU slopes: ``negative_slope`` (0.01) inside the encoder and decoder
levels, ``outer_negative_slope`` (0.1) after the bottleneck and in the full-resolution pair,
as in the published configuration.

The published network also has two deep-supervision outputs (1x1x1 convolutions after the
second and third decoder levels) used only in training; they are not part of this network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from TransferSegLib.errors import InputError


def _norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, affine=True)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + conv2(act(norm2(conv1(act(norm1(x)))))), C -> C."""

    def __init__(self, channels: int, negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.norm1 = _norm(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = _norm(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.leaky_relu(self.norm1(x), self.negative_slope))
        y = self.conv2(F.leaky_relu(self.norm2(y), self.negative_slope))
        return x + y


class EncoderLevel(nn.Module):
    """One resolution of the encoder: entry conv (stride 1 or 2), residual block, norm, act.

    (N, in_channels, D, H, W) -> (N, channels, D/s, H/s, W/s), s the entry stride; the output
    is both the skip connection of this level and the input of the next.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, negative_slope: float,
                 exit_negative_slope: float) -> None:
        super().__init__()
        self.exit_negative_slope = exit_negative_slope
        self.entry = nn.Conv3d(in_channels, channels, 3, stride=stride, padding=1)
        self.block = ResidualBlock(channels, negative_slope)
        self.norm = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.block(self.entry(x))), self.exit_negative_slope)


class DecoderLevel(nn.Module):
    """One resolution of the decoder: upsample and merge with the skip of that resolution.

    ``forward(x, skip)``: x (N, 2c, D/2, H/2, W/2), skip (N, c, D, H, W) -> (N, out, D, H, W)
    where c = ``channels`` and out is c (a 1x1x1 second convolution) or 2c (``final``: two
    3x3x3 convolutions keeping all channels, the full-resolution level).
    """

    def __init__(self, channels: int, final: bool, negative_slope: float,
                 merge_negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.merge_negative_slope = merge_negative_slope
        merged = 2 * channels
        self.up_conv = nn.Conv3d(merged, channels, 3, padding=1)
        self.up_norm = _norm(channels)
        self.conv1 = nn.Conv3d(merged, merged, 3, padding=1)
        self.norm1 = _norm(merged)
        out = merged if final else channels
        self.conv2 = nn.Conv3d(merged, out, 3 if final else 1, padding=1 if final else 0)
        self.norm2 = _norm(out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        x = F.leaky_relu(self.up_norm(self.up_conv(x)), self.negative_slope)
        x = torch.cat((skip, x), dim=1)
        x = F.leaky_relu(self.norm1(self.conv1(x)), self.merge_negative_slope)
        return F.leaky_relu(self.norm2(self.conv2(x)), self.merge_negative_slope)


class HDBETNet(nn.Module):
    """HD-BET v1's residual U-Net (see the module docstring).

    Args:
        spatial_dims: must be 3.
        in_channels: image channels (the published model: 1, any MR sequence).
        out_channels: logit channels (the published model: 2, background and brain).
        base_filters: channels at full resolution; doubled at each further level.
        levels: resolutions including the bottleneck (>= 2); the patch divisor is
            ``2 ** (levels - 1)``.
        negative_slope: LeakyReLU slope inside the levels.
        outer_negative_slope: LeakyReLU slope after the bottleneck and at the full-resolution
            decoder level.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 base_filters: int = 21, levels: int = 5, negative_slope: float = 0.01,
                 outer_negative_slope: float = 0.1) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"HD-BET's network is 3D only, not {spatial_dims}D")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be a whole number >= 2, not {levels!r}")
        if isinstance(base_filters, bool) or not isinstance(base_filters, int) or base_filters < 1:
            raise ValueError(f"base_filters must be a positive whole number, not {base_filters!r}")
        widths = [base_filters * 2**level for level in range(levels)]
        self.encoder = nn.ModuleList()
        for level, width in enumerate(widths):
            bottom = level == levels - 1
            self.encoder.append(EncoderLevel(
                in_channels if level == 0 else widths[level - 1], width, 1 if level == 0 else 2,
                negative_slope, outer_negative_slope if bottom else negative_slope,
            ))
        self.decoder = nn.ModuleList(
            DecoderLevel(widths[level], level == 0, negative_slope,
                         outer_negative_slope if level == 0 else negative_slope)
            for level in reversed(range(levels - 1))
        )
        self.head = nn.Conv3d(2 * base_filters, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        for level in self.decoder:
            x = level(x, skips.pop())
        return self.head(x)


# --- registry fields ------------------------------------------------------------------------

DEFAULTS = {"base_filters": 21, "levels": 5, "negative_slope": 0.01, "outer_negative_slope": 0.1}


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    resolved = dict(DEFAULTS)
    resolved.update(kwargs)
    levels = resolved["levels"]
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise InputError(f"hdbet needs levels to be a whole number >= 2, not {levels!r}.")
    return resolved


def _encoder(model: HDBETNet) -> list[nn.Module]:
    return list(model.encoder)


def _decoder(model: HDBETNet) -> list[nn.Module]:
    return list(model.decoder)  # built deepest first


def _head(model: HDBETNet) -> nn.Module:
    return model.head


ARCHITECTURES = {
    "hdbet": {
        "network_class": HDBETNet,
        "resolve": _resolve,
        "divisor": lambda kw: 2 ** (int(kw["levels"]) - 1),
        "encoder": _encoder,
        "decoder": _decoder,
        "head": _head,
    },
}
