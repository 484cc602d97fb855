"""LinkNet3D: the 3D LinkNet of deepbet (Fisch et al., Comput Biol Med 2024), our implementation.

LinkNet (Chaurasia and Culurciello, 2017) is a ResNet-18-like encoder whose decoder blocks are
*added* to the encoder features of the same resolution instead of concatenated, which keeps it
small (deepbet's brain-extraction network has 2.1 M parameters). In 3D, with instance norm
(no affine parameters) after every convolution:

- ``stem``: 7x7x7 conv, stride 2 -> norm -> ReLU -> 3x3x3 max pool, stride 2 (1/4 resolution);
- ``encoder``: one stage per entry of ``channels``, each ``blocks_per_stage`` residual blocks
  (two 3x3x3 convs; the first block of every stage but the first halves the resolution, its
  shortcut a strided 1x1x1 conv + norm);
- ``decoder``: one block per stage, deepest first: 1x1x1 conv to a quarter of the channels,
  3x3x3 transposed conv (stride 2; stride 1 for the first stage, which did not downsample),
  1x1x1 conv to the channels of the next shallower stage, each followed by norm and ReLU; its
  output is added to that stage's encoder output;
- ``final_up`` (3x3x3 transposed conv, stride 2, half the channels) and ``final_conv``
  (3x3x3 conv), each with norm and ReLU, back at 1/2 resolution;
- ``head``: 2x2x2 transposed conv, stride 2, to ``out_channels`` logits at full resolution.

Shapes: (N, in_channels, Z, Y, X) -> (N, out_channels, Z, Y, X), each of Z, Y, X divisible by
``4 * 2 ** (len(channels) - 1)`` (32 for deepbet). deepbet's own file applies a softmax after
the head; this network returns the logits, as every network in the registry does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)


class ResidualBlock(nn.Module):
    """Two 3x3x3 convs (the first with ``stride``) + norms, added to the input, then ReLU.

    (N, in, Z, Y, X) -> (N, out, Z/stride, Y/stride, X/stride). When the shape changes the
    shortcut is a 1x1x1 conv with the same stride, followed by norm.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride, bias=False), _norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class DecoderBlock(nn.Module):
    """1x1x1 conv to ``in/4`` channels, 3x3x3 transposed conv (``stride``), 1x1x1 conv to
    ``out`` channels; each followed by norm and ReLU.

    (N, in, Z, Y, X) -> (N, out, Z*stride, Y*stride, X*stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        middle = max(in_channels // 4, 1)
        self.reduce = nn.Conv3d(in_channels, middle, 1, bias=False)
        self.norm1 = _norm(middle)
        self.upsample = nn.ConvTranspose3d(middle, middle, 3, stride, padding=1,
                                           output_padding=stride - 1, bias=False)
        self.norm2 = _norm(middle)
        self.expand = nn.Conv3d(middle, out_channels, 1, bias=False)
        self.norm3 = _norm(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.reduce(x)))
        x = self.act(self.norm2(self.upsample(x)))
        return self.act(self.norm3(self.expand(x)))


class Stem(nn.Module):
    """7x7x7 conv (stride 2) + norm + ReLU, then 3x3x3 max pool (stride 2): 1/4 resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 7, 2, padding=3, bias=False)
        self.norm = _norm(out_channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool3d(3, 2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class LinkNet3D(nn.Module):
    """deepbet's 3D LinkNet: (N, in_channels, Z, Y, X) -> logits (N, out_channels, Z, Y, X).

    ``channels``: features of each encoder stage, shallowest first (deepbet: 16, 32, 64, 128;
    the stem has ``channels[0]``). ``blocks_per_stage``: residual blocks per stage (2).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"LinkNet3D is 3D only, not spatial_dims={spatial_dims}")
        channels = [int(c) for c in channels]
        if len(channels) < 2 or any(c < 2 for c in channels):
            raise ValueError(f"channels needs at least two stages of >= 2 features, not {channels}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be at least 1, not {blocks_per_stage}")
        self.stem = Stem(in_channels, channels[0])
        self.encoder = nn.ModuleList()
        for index, width in enumerate(channels):
            previous = channels[max(index - 1, 0)]
            stride = 1 if index == 0 else 2
            blocks = [ResidualBlock(previous, width, stride)]
            blocks += [ResidualBlock(width, width) for _ in range(blocks_per_stage - 1)]
            self.encoder.append(nn.Sequential(*blocks))
        self.decoder = nn.ModuleList(
            DecoderBlock(channels[index], channels[max(index - 1, 0)], 1 if index == 0 else 2)
            for index in reversed(range(len(channels)))
        )
        half = max(channels[0] // 2, 1)
        self.final_up = nn.Sequential(
            nn.ConvTranspose3d(channels[0], half, 3, 2, padding=1, output_padding=1),
            _norm(half), nn.ReLU(),
        )
        self.final_conv = nn.Sequential(nn.Conv3d(half, half, 3, padding=1), _norm(half), nn.ReLU())
        self.head = nn.ConvTranspose3d(half, out_channels, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.stem(x)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        # skips: stem, stage 0, ..., deepest stage. Each decoder block's output is added to the
        # features of the resolution it restores: the next shallower stage, and for the first
        # stage (which kept the stem's resolution) the stem itself.
        y = skips.pop()
        for block in self.decoder:
            y = block(y) + skips.pop()
        return self.head(self.final_conv(self.final_up(y)))


# --- registry ---------------------------------------------------------------------------------

def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = {"channels": [16, 32, 64, 128], "blocks_per_stage": 2}
    resolved.update(kwargs)
    resolved["channels"] = [int(c) for c in resolved["channels"]]
    return resolved


def _divisor(kwargs: dict[str, Any]) -> int:
    return 4 * 2 ** (len(kwargs["channels"]) - 1)


def _encoder(model: LinkNet3D) -> list[nn.Module]:
    return [model.stem, *model.encoder]


def _decoder(model: LinkNet3D) -> list[nn.Module]:
    return [*model.decoder, model.final_up, model.final_conv]


def _head(model: LinkNet3D) -> nn.Module:
    return model.head


ARCHITECTURES = {
    "linknet3d": {
        "network_class": LinkNet3D,
        "resolve": _resolve,
        "divisor": _divisor,
        "encoder": _encoder,
        "decoder": _decoder,
        "head": _head,
    },
}
