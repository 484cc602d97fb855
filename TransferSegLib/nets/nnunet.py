"""nnU-Net v2's two U-Net topologies (Isensee et al., Nat Methods 2021; "nnU-Net revisited",
MICCAI 2024) as ``nnunet-plain`` (PlainConvUNet) and ``nnunet-resenc`` (ResidualEncoderUNet).

Maps (N, in_channels, Z, Y, X) to logits (N, out_channels, Z, Y, X); Z, Y, X must be divisible
by the product of the ``strides`` along each axis (32 for five stride-2 levels).

Topology, as nnU-Net's plans (``architecture.arch_kwargs``) describe it and its checkpoints'
tensor names and shapes confirm:

* a *conv unit* is a 3D convolution (``kernel_sizes[s]``, "same" padding, bias if
  ``conv_bias``), an instance norm (``norm_eps``, learned scale and shift) and a LeakyReLU
  (``negative_slope``; 0 is a ReLU); ``nonlin_first`` swaps norm and activation.
* ``nnunet-plain`` encoder: stage s is ``n_conv_per_stage[s]`` conv units, the first with
  stride ``strides[s]`` (1 at stage 0), with ``features_per_stage[s]`` channels.
* ``nnunet-resenc`` encoder: a stem (one conv unit to ``features_per_stage[0]``), then stage s
  is ``n_blocks_per_stage[s]`` residual blocks (ResNet-D): conv unit (stride in the first
  block), conv unit without activation, plus the shortcut (average pooling where strided, a
  1x1x1 conv unit without bias or activation where the width changes), then the activation.
* decoder, deepest first: a transposed convolution (kernel = stride of the stage it comes from)
  to the skip's width, concatenation with the skip (upsampled first), then
  ``n_conv_per_stage_decoder`` conv units.
* head: a 1x1x1 convolution with bias at full resolution (nnU-Net's last ``seg_layers``
  entry). nnU-Net also keeps one such output per lower decoder stage for deep supervision in
  training; they are not part of this network (the importer says so).

``transpose`` is nnU-Net's ``transpose_forward`` for the array axes: the network permutes its
input's spatial axes by it, runs, and permutes the output back, so it reads the same arrays
as any TransferSeg network while its convolutions see nnU-Net's axis order. ``kernel_sizes``
and ``strides`` are in that (transposed) order, as in the plans.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from TransferSegLib.errors import InputError


def _triple(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * 3


class ConvUnit(nn.Module):
    """Convolution, instance norm, LeakyReLU (or norm after the activation, or none)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int],
                 *, bias: bool, eps: float, affine: bool, negative_slope: float | None,
                 nonlin_first: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride,
                              padding=[(k - 1) // 2 for k in kernel], bias=bias)
        self.norm = nn.InstanceNorm3d(out_channels, eps=eps, affine=affine)
        self.negative_slope = negative_slope
        self.nonlin_first = nonlin_first

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.negative_slope is None:
            return x
        return F.leaky_relu(x, self.negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.nonlin_first:
            return self.norm(self._act(x))
        return self._act(self.norm(x))


class ResidualBlock(nn.Module):
    """ResNet-D block: act(conv2(conv1(x)) + shortcut(x)); shortcut = avg-pool and/or 1x1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int],
                 **unit: Any) -> None:
        super().__init__()
        slope = unit.pop("negative_slope")
        self.negative_slope = slope
        self.conv1 = ConvUnit(in_channels, out_channels, kernel, stride, negative_slope=slope,
                              **unit)
        self.conv2 = ConvUnit(out_channels, out_channels, kernel, [1, 1, 1], negative_slope=None,
                              **unit)
        self.pool = nn.AvgPool3d(stride, stride) if any(s != 1 for s in stride) else None
        self.shortcut = (ConvUnit(in_channels, out_channels, [1, 1, 1], [1, 1, 1],
                                  negative_slope=None, **{**unit, "bias": False})
                         if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.pool is None else self.pool(x)
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        out = self.conv2(self.conv1(x)) + residual
        if self.negative_slope is None:
            return out
        return F.leaky_relu(out, self.negative_slope, inplace=True)


class DecoderStage(nn.Module):
    """Transposed convolution up to the skip's resolution, concatenation, conv units."""

    def __init__(self, below: int, skip: int, stride: list[int], kernel: list[int], convs: int,
                 **unit: Any) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(below, skip, stride, stride, bias=unit["bias"])
        self.convs = nn.Sequential(*[
            ConvUnit(2 * skip if i == 0 else skip, skip, kernel, [1, 1, 1], **unit)
            for i in range(convs)
        ])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.up(x), skip), 1))


class NNUNet(nn.Module):
    """nnU-Net's PlainConvUNet (``residual=False``) or ResidualEncoderUNet (``residual=True``)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features_per_stage: list[int] = (32, 64, 128, 256, 320),
        kernel_sizes: list[list[int]] = ((3, 3, 3),) * 5,
        strides: list[list[int]] = ((1, 1, 1),) + ((2, 2, 2),) * 4,
        n_conv_per_stage: list[int] = (2,) * 5,
        n_conv_per_stage_decoder: list[int] = (2,) * 4,
        residual: bool = False,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        norm_affine: bool = True,
        negative_slope: float = 0.01,
        nonlin_first: bool = False,
        transpose: list[int] = (0, 1, 2),
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("nnU-Net networks are used here in 3D only")
        stages = len(features_per_stage)
        for name, value, count in (("kernel_sizes", kernel_sizes, stages),
                                   ("strides", strides, stages),
                                   ("n_conv_per_stage", n_conv_per_stage, stages),
                                   ("n_conv_per_stage_decoder", n_conv_per_stage_decoder,
                                    stages - 1)):
            if len(value) != count:
                raise ValueError(f"{name} needs {count} entries, one per stage, not {len(value)}")
        if sorted(transpose) != [0, 1, 2]:
            raise ValueError(f"transpose must be a permutation of 0, 1, 2, not {list(transpose)}")
        kernels = [_triple(k) for k in kernel_sizes]
        steps = [_triple(s) for s in strides]
        unit = {"bias": bool(conv_bias), "eps": float(norm_eps), "affine": bool(norm_affine),
                "negative_slope": float(negative_slope), "nonlin_first": bool(nonlin_first)}
        self.transpose = [int(t) for t in transpose]
        self.residual = residual
        channels = in_channels
        if residual:
            self.stem = ConvUnit(in_channels, features_per_stage[0], kernels[0], [1, 1, 1],
                                 **unit)
            channels = features_per_stage[0]
        blocks = []
        for s, width in enumerate(features_per_stage):
            if residual:
                block_unit = {k: v for k, v in unit.items() if k != "nonlin_first"}
                stage = nn.Sequential(*[
                    ResidualBlock(channels if b == 0 else width, width, kernels[s],
                                  steps[s] if b == 0 else [1, 1, 1], **dict(block_unit))
                    for b in range(int(n_conv_per_stage[s]))
                ])
            else:
                stage = nn.Sequential(*[
                    ConvUnit(channels if i == 0 else width, width, kernels[s],
                             steps[s] if i == 0 else [1, 1, 1], **unit)
                    for i in range(int(n_conv_per_stage[s]))
                ])
            blocks.append(stage)
            channels = width
        self.encoder = nn.ModuleList(blocks)
        decoder_unit = dict(unit, nonlin_first=bool(nonlin_first) and not residual)
        self.decoder = nn.ModuleList(
            DecoderStage(features_per_stage[-s], features_per_stage[-s - 1], steps[-s],
                         kernels[-s - 1], int(n_conv_per_stage_decoder[s - 1]), **decoder_unit)
            for s in range(1, stages)
        )
        self.head = nn.Conv3d(features_per_stage[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.transpose == [0, 1, 2]
        if not identity:
            x = x.permute(0, 1, *[t + 2 for t in self.transpose])
        if self.residual:
            x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for stage in self.decoder:
            x = stage(x, skips.pop())
        x = self.head(x)
        if not identity:
            back = [self.transpose.index(a) for a in range(3)]
            x = x.permute(0, 1, *[t + 2 for t in back])
        return x


class NNUNetEnsemble(nn.Module):
    """Several folds of one nnU-Net configuration whose logits are averaged, as nnU-Net's
    predictor ensembles folds (``folds`` copies of :class:`NNUNet`, ``members.<i>.``)."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 folds: int = 2, **arguments: Any) -> None:
        super().__init__()
        if folds < 2:
            raise ValueError("an ensemble needs at least two folds")
        self.members = nn.ModuleList(NNUNet(spatial_dims, in_channels, out_channels, **arguments)
                                     for _ in range(folds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for member in self.members[1:]:
            total = total + member(x)
        return total / len(self.members)


def _not_for_transfer(model: NNUNetEnsemble) -> list[nn.Module]:
    raise InputError("An average of several nnU-Net folds segments but cannot be fine-tuned; "
                     "import one fold (--fold 0) as the base model.")


def _resolve(kwargs: dict[str, Any], residual: bool) -> dict[str, Any]:
    levels = len(kwargs.get("features_per_stage", [32, 64, 128, 256, 320]))
    if levels < 2:
        raise InputError("An nnU-Net network needs at least two stages in features_per_stage.")
    resolved: dict[str, Any] = {
        "features_per_stage": [min(32 * 2 ** i, 320) for i in range(levels)],
        "kernel_sizes": [[3, 3, 3]] * levels,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (levels - 1),
        "n_conv_per_stage": ([1] + [2] * (levels - 1)) if residual else [2] * levels,
        "n_conv_per_stage_decoder": [1 if residual else 2] * (levels - 1),
        "residual": residual,
        "conv_bias": True,
        "norm_eps": 1e-5,
        "norm_affine": True,
        "negative_slope": 0.01,
        "nonlin_first": False,
        "transpose": [0, 1, 2],
    }
    resolved.update(kwargs)
    if bool(resolved["residual"]) != residual:
        raise InputError("Set 'residual' by the architecture's name: nnunet-plain or "
                         "nnunet-resenc.")
    for key in ("kernel_sizes", "strides"):
        resolved[key] = [_triple(v) for v in resolved[key]]
    for key in ("features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder",
                "transpose"):
        resolved[key] = [int(v) for v in resolved[key]]
    return resolved


def divisor(kwargs: dict[str, Any]) -> int:
    """The patch size divisor: the lcm over axes of each axis's total stride."""
    per_axis = [1, 1, 1]
    for stride in kwargs["strides"]:
        per_axis = [p * int(s) for p, s in zip(per_axis, _triple(stride), strict=True)]
    return math.lcm(*per_axis)


def _encoder(model: NNUNet) -> list[nn.Module]:
    return ([model.stem] if model.residual else []) + list(model.encoder)


ARCHITECTURES = {
    name: {
        "network_class": NNUNet,
        "resolve": (lambda kw, r=residual: _resolve(kw, r)),
        "divisor": divisor,
        "encoder": _encoder,
        "decoder": lambda model: list(model.decoder),
        "head": lambda model: model.head,
    }
    for name, residual in (("nnunet-plain", False), ("nnunet-resenc", True))
}


def _resolve_ensemble(kwargs: dict[str, Any], residual: bool) -> dict[str, Any]:
    kwargs = dict(kwargs)
    folds = kwargs.pop("folds", 2)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise InputError(f"An nnU-Net fold ensemble needs folds >= 2, not {folds!r}.")
    return {**_resolve(kwargs, residual), "folds": folds}


# The ensemble's constructor takes the member's arguments by keyword.
_MEMBER_ARGUMENTS = tuple(p for p in NNUNet.__init__.__code__.co_varnames[
    4:NNUNet.__init__.__code__.co_argcount])

ARCHITECTURES.update({
    f"{name}-ensemble": {
        "network_class": NNUNetEnsemble,
        "resolve": (lambda kw, r=residual: _resolve_ensemble(kw, r)),
        "divisor": divisor,
        "encoder": _not_for_transfer,
        "decoder": _not_for_transfer,
        "head": _not_for_transfer,
        "extra_arguments": _MEMBER_ARGUMENTS,
    }
    for name, residual in (("nnunet-plain", False), ("nnunet-resenc", True))
})
