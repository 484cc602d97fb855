"""The architecture registry: one name -> one ready 3D segmentation network (MONAI).

``build_network("unet", in_channels=1, out_channels=3)`` gives a network mapping a tensor of
shape (N, in_channels, Z, Y, X) to logits of shape (N, out_channels, Z, Y, X), where Z, Y, X
must each be divisible by :func:`patch_divisor` (UNETR: equal to its ``img_size``).

Each architecture also knows its parts, so transfer learning can work on them by name rather
than by parameter-name patterns: :func:`encoder_blocks` (shallowest first, for freezing an
encoder up to a depth), :func:`decoder_blocks` (deepest first) and :func:`head` (the layer
that produces the ``out_channels`` logits, for head surgery).

Defaults are sized to train from scratch on a CPU or a small GPU. Published models do not
depend on them: their model card stores the full arguments (:func:`resolve_kwargs`). Every
convolutional network uses instance normalisation: 3D training runs with batches of one or two
patches, where batch statistics are noise, and instance norm behaves the same in training and
inference. (MONAI's VNet has batch norm built in; it cannot be changed.)

Transformer networks (UNETR, SwinUNETR) need the ``einops`` package.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monai.networks.blocks import Convolution
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNETR, DynUNet, SegResNet, SwinUNETR, UNet, VNet
from torch import nn

from TransferSegLib import nets
from TransferSegLib.errors import InputError

# Set by build_network itself; a user value would silently contradict it.
_RESERVED = ("spatial_dims", "in_channels", "out_channels")


@dataclass(frozen=True)
class _Architecture:
    network_class: type[nn.Module]
    resolve: Callable[[dict[str, Any]], dict[str, Any]]  # user kwargs -> full constructor kwargs
    divisor: Callable[[dict[str, Any]], int]  # full kwargs -> patch size divisor
    encoder: Callable[[Any], list[nn.Module]]
    decoder: Callable[[Any], list[nn.Module]]
    head: Callable[[Any], nn.Module]
    extra_arguments: tuple[str, ...] = ()  # accepted besides the constructor's own parameters
    # Valid-convolution networks: (full kwargs, input size along an axis) -> output size.
    output_size: Callable[[dict[str, Any], int], int] | None = None


def _stride_product(strides: Sequence[int | Sequence[int]]) -> int:
    """The total downsampling of a list of per-level strides (an int or one per axis each)."""
    per_axis = [1, 1, 1]
    for stride in strides:
        axes = [stride] * 3 if isinstance(stride, int) else list(stride)
        per_axis = [total * int(s) for total, s in zip(per_axis, axes, strict=True)]
    return math.lcm(*per_axis)


def _with_defaults(**defaults: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A resolver that merges the user's arguments over (a fresh copy of) ``defaults``."""
    return lambda kwargs: {**copy.deepcopy(defaults), **kwargs}


# --- UNet ------------------------------------------------------------------------------------

def _resolve_unet(kwargs: dict[str, Any]) -> dict[str, Any]:
    resolved = _with_defaults(channels=[16, 32, 64, 128, 256], kernel_size=3, up_kernel_size=3,
                              num_res_units=2, act="prelu", norm="instance",
                              dropout=0.0)(kwargs)
    # A user who asks for fewer levels means halving at each: derive strides to match.
    if "strides" not in kwargs:
        resolved["strides"] = [2] * (len(resolved["channels"]) - 1)
    return resolved


def _unet_levels(model: UNet) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """MONAI nests each level as Sequential(down, SkipConnection(deeper levels), up).

    Returns (down blocks shallowest first, bottom block, up blocks shallowest first).
    """
    downs: list[nn.Module] = []
    ups: list[nn.Module] = []
    node = model.model
    while type(node) is nn.Sequential and len(node) == 3 and isinstance(node[1], SkipConnection):
        downs.append(node[0])
        ups.append(node[2])
        node = node[1].submodule
    return downs, node, ups


def _unet_encoder(model: UNet) -> list[nn.Module]:
    downs, bottom, _ = _unet_levels(model)
    return [*downs, bottom]


def _unet_decoder(model: UNet) -> list[nn.Module]:
    _, _, ups = _unet_levels(model)
    outermost = ups[0]
    # With residual units the outermost up block is (upsampling conv, unit holding the head);
    # without, the upsampling conv is itself the head. (MONAI's Convolution is a Sequential.)
    last = [] if isinstance(outermost, Convolution) else [outermost[0]]
    return [*reversed(ups[1:]), *last]


def _unet_head(model: UNet) -> nn.Module:
    _, _, ups = _unet_levels(model)
    return _last_conv(ups[0])


# --- DynUNet (nnU-Net-like) ------------------------------------------------------------------

def _resolve_dynunet(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``levels`` (a TransferSeg argument, default 5) derives nnU-Net's isotropic plan.

    Level 0 keeps full resolution (stride 1); each further level halves it; filters start at
    16 and double per level up to 320, as in nnU-Net but half as wide.
    """
    kwargs = dict(kwargs)
    levels = kwargs.pop("levels", None)
    if levels is None:
        levels = len(kwargs["strides"]) if "strides" in kwargs else 5
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise InputError(f"dynunet needs levels to be a whole number >= 2, not {levels!r}.")
    if "strides" in kwargs and len(kwargs["strides"]) != levels:
        raise InputError(
            f"dynunet got levels={levels} but {len(kwargs['strides'])} strides; give one or the "
            "other, or make them agree."
        )
    strides = kwargs.get("strides", [1] + [2] * (levels - 1))
    return _with_defaults(
        kernel_size=[3] * levels, strides=strides, upsample_kernel_size=list(strides[1:]),
        filters=[min(16 * 2**level, 320) for level in range(levels)], norm_name="instance",
        act_name="leakyrelu", deep_supervision=False, deep_supr_num=1, res_block=False,
    )(kwargs)


def _dynunet_encoder(model: DynUNet) -> list[nn.Module]:
    return [model.input_block, *model.downsamples, model.bottleneck]


def _dynunet_decoder(model: DynUNet) -> list[nn.Module]:
    return list(model.upsamples)  # MONAI builds them deepest first


def _dynunet_head(model: DynUNet) -> nn.Module:
    return _last_conv(model.output_block)


# --- VNet ------------------------------------------------------------------------------------

_resolve_vnet = _with_defaults(act="elu", dropout_prob_down=0.5, dropout_prob_up=[0.5, 0.5],
                               dropout_dim=3, bias=False)


def _vnet_encoder(model: VNet) -> list[nn.Module]:
    return [model.in_tr, model.down_tr32, model.down_tr64, model.down_tr128, model.down_tr256]


def _vnet_decoder(model: VNet) -> list[nn.Module]:
    # The 5x5x5 conv of the output transition already has out_channels outputs (MONAI's design);
    # it is the block before the 1x1x1 head.
    return [model.up_tr256, model.up_tr128, model.up_tr64, model.up_tr32, model.out_tr.conv_block]


def _vnet_head(model: VNet) -> nn.Module:
    return model.out_tr.conv2


# --- UNETR -----------------------------------------------------------------------------------

_resolve_unetr = _with_defaults(img_size=[96, 96, 96], feature_size=16, hidden_size=384,
                                mlp_dim=1536, num_heads=6, norm_name="instance", conv_block=True,
                                res_block=True, dropout_rate=0.0)


def _unetr_encoder(model: UNETR) -> list[nn.Module]:
    # Data-flow order: encoder1 reads the image itself; encoder2..4 read the ViT's hidden
    # states after blocks 3, 6 and 9, so they come after the ViT. The ViT is one block (its
    # output is the bottleneck), so freezing depth 2 freezes the whole transformer.
    return [model.encoder1, model.vit, model.encoder2, model.encoder3, model.encoder4]


def _unetr_decoder(model: UNETR) -> list[nn.Module]:
    return [model.decoder5, model.decoder4, model.decoder3, model.decoder2]


def _unetr_head(model: UNETR) -> nn.Module:
    return _last_conv(model.out)


# --- SwinUNETR -------------------------------------------------------------------------------

_resolve_swinunetr = _with_defaults(
    feature_size=24, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=7,
    norm_name="instance", drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0,
    normalize=True, use_checkpoint=False, use_v2=False)


def _swinunetr_encoder(model: SwinUNETR) -> list[nn.Module]:
    # Interleaved in data-flow order: each conv encoder follows the transformer stage whose
    # output it reads (encoder2 <- patch embedding, encoder3 <- stage 1, encoder4 <- stage 2,
    # encoder10 <- stage 4, the bottleneck). SwinUNETR-v2 adds a conv stage before each stage.
    vit = model.swinViT
    v2 = bool(getattr(vit, "use_v2", False))
    blocks: list[nn.Module] = [model.encoder1, vit.patch_embed, model.encoder2]
    readers = {1: model.encoder3, 2: model.encoder4, 3: None, 4: model.encoder10}
    for stage, reader in readers.items():
        # Each stage is a ModuleList of one layer; list the layer itself, which forward calls.
        if v2:
            blocks.extend(getattr(vit, f"layers{stage}c"))
        blocks.extend(getattr(vit, f"layers{stage}"))
        if reader is not None:
            blocks.append(reader)
    return blocks


def _swinunetr_decoder(model: SwinUNETR) -> list[nn.Module]:
    return [model.decoder5, model.decoder4, model.decoder3, model.decoder2, model.decoder1]


def _swinunetr_head(model: SwinUNETR) -> nn.Module:
    return _last_conv(model.out)


# --- SegResNet -------------------------------------------------------------------------------

def _resolve_segresnet(kwargs: dict[str, Any]) -> dict[str, Any]:
    resolved = _with_defaults(init_filters=16, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1],
                              norm="instance", act="relu", dropout_prob=None,
                              upsample_mode="nontrainable")(kwargs)
    if resolved.get("use_conv_final", True) is not True:
        # Without it the output has init_filters channels, not out_channels.
        raise InputError("segresnet needs use_conv_final=True: it is the layer giving the labels.")
    return resolved


def _segresnet_encoder(model: SegResNet) -> list[nn.Module]:
    return [model.convInit, *model.down_layers]


def _segresnet_decoder(model: SegResNet) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for upsample, layer in zip(model.up_samples, model.up_layers, strict=True):  # deepest first
        blocks += [upsample, layer]
    return blocks


def _segresnet_head(model: SegResNet) -> nn.Module:
    return _last_conv(model.conv_final)


# --- registry --------------------------------------------------------------------------------

def _last_conv(module: nn.Module) -> nn.Module:
    """The last convolution (plain or transposed) registered inside ``module``."""
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise TypeError(f"{type(module).__name__} holds no convolution")
    return convs[-1]


_ARCHITECTURES: dict[str, _Architecture] = {
    "unet": _Architecture(
        UNet, _resolve_unet, lambda kw: _stride_product(kw["strides"]),
        _unet_encoder, _unet_decoder, _unet_head,
    ),
    "dynunet": _Architecture(
        DynUNet, _resolve_dynunet, lambda kw: _stride_product(kw["strides"]),
        _dynunet_encoder, _dynunet_decoder, _dynunet_head, extra_arguments=("levels",),
    ),
    "vnet": _Architecture(
        VNet, _resolve_vnet, lambda kw: 16,
        _vnet_encoder, _vnet_decoder, _vnet_head,
    ),
    "unetr": _Architecture(
        UNETR, _resolve_unetr, lambda kw: 16,  # MONAI's UNETR has a fixed 16^3 ViT patch
        _unetr_encoder, _unetr_decoder, _unetr_head,
    ),
    "swinunetr": _Architecture(
        # Five halvings of the patch_size embedding; img_size is accepted (and dropped where
        # MONAI no longer takes it, >= 1.5) so model cards from older versions still load.
        SwinUNETR, _resolve_swinunetr, lambda kw: int(kw.get("patch_size", 2)) ** 5,
        _swinunetr_encoder, _swinunetr_decoder, _swinunetr_head, extra_arguments=("img_size",),
    ),
    "segresnet": _Architecture(
        SegResNet, _resolve_segresnet, lambda kw: 2 ** (len(kw["blocks_down"]) - 1),
        _segresnet_encoder, _segresnet_decoder, _segresnet_head,
    ),
}


def _register_published() -> None:
    """Add the architectures of every module in :mod:`TransferSegLib.nets` to the registry."""
    for module_info in pkgutil.iter_modules(nets.__path__):
        module = importlib.import_module(f"{nets.__name__}.{module_info.name}")
        for name, fields in getattr(module, "ARCHITECTURES", {}).items():
            if name in _ARCHITECTURES:
                raise RuntimeError(f"architecture {name!r} is registered twice")
            _ARCHITECTURES[name] = _Architecture(**fields)


_register_published()


def architectures() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_ARCHITECTURES)


def _architecture(name: str) -> _Architecture:
    try:
        return _ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise InputError(
            f"Unknown network architecture {name!r}; known: {', '.join(architectures())}."
        ) from None


def _sentence(error: BaseException) -> str:
    """An exception's message, first line only, without a closing full stop, to embed in ours."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].rstrip(".")


def _accepted_arguments(name: str) -> set[str]:
    arch = _architecture(name)
    params = inspect.signature(arch.network_class.__init__).parameters
    return (set(params) - {"self", *_RESERVED}) | set(arch.extra_arguments)


def resolve_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """The full constructor arguments for ``name``: defaults with ``kwargs`` merged over them.

    Derived arguments are filled in (UNet strides from the number of channels, DynUNet kernel
    sizes, strides and filters from ``levels``), so the result rebuilds the same network even if
    the defaults change later: store it in the model card. Unknown names, unknown or reserved
    arguments (``in_channels``, ``out_channels``, ``spatial_dims``) raise :class:`InputError`.
    """
    arch = _architecture(name)
    reserved = sorted(set(kwargs) & set(_RESERVED))
    if reserved:
        raise InputError(
            f"{name} argument {reserved[0]!r} is set by TransferSeg itself (networks are 3D; "
            "channels come from the image and the label table); remove it."
        )
    accepted = _accepted_arguments(name)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise InputError(
            f"{name} has no argument {unknown[0]!r}; its arguments are: "
            f"{', '.join(sorted(accepted))}."
        )
    try:
        return arch.resolve(dict(kwargs))
    except (TypeError, ValueError, KeyError) as error:
        raise InputError(f"Invalid arguments for {name}: {_sentence(error)}.") from error


def default_kwargs(name: str) -> dict[str, Any]:
    """The constructor arguments ``build_network(name, ...)`` uses when given none."""
    return resolve_kwargs(name)


def build_network(name: str, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """A new, randomly initialised network: (N, in_channels, Z, Y, X) -> (N, out_channels, Z, Y, X).

    ``kwargs`` override :func:`default_kwargs`; a bad name or argument raises
    :class:`InputError` naming it. Spatial sizes must be divisible by :func:`patch_divisor`.
    """
    arch = _architecture(name)
    for label, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} needs {label} to be a positive whole number, not {value!r}.")
    resolved = resolve_kwargs(name, **kwargs)
    constructor_params = inspect.signature(arch.network_class.__init__).parameters
    if name == "swinunetr" and "img_size" not in constructor_params:
        resolved.pop("img_size", None)
    elif name == "swinunetr" and "img_size" not in resolved:
        resolved["img_size"] = [96, 96, 96]  # MONAI < 1.5 requires it but only checks it
    try:
        return arch.network_class(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **resolved
        )
    except (TypeError, ValueError, AssertionError) as error:
        message = f"Cannot build {name} with these arguments: {_sentence(error)}."
        raise InputError(message) from error
    except ImportError as error:  # einops for the transformer networks
        raise InputError(
            f"Network {name} needs a package that is not installed ({_sentence(error)}); "
            "install it with pip."
        ) from error


def _checked(name: str, model: nn.Module) -> _Architecture:
    arch = _architecture(name)
    if not isinstance(model, arch.network_class):
        raise TypeError(f"expected a {arch.network_class.__name__} for {name!r}, got {type(model)}")
    return arch


def encoder_blocks(name: str, model: nn.Module) -> list[nn.Module]:
    """The encoder of ``model`` as blocks in depth order: shallowest first, bottleneck last.

    Freezing the first ``k`` blocks freezes the encoder up to depth ``k``. Blocks are disjoint
    submodules of ``model``; the order is data flow (a block comes after every block whose
    output it reads). For UNETR the bottleneck is the ViT, which feeds the later skip encoders,
    so it is not last: ``[encoder1, vit, encoder2, encoder3, encoder4]``. For SwinUNETR the conv
    skip encoders are interleaved with the transformer stages they read.
    """
    return _checked(name, model).encoder(model)


def decoder_blocks(name: str, model: nn.Module) -> list[nn.Module]:
    """The decoder of ``model`` as blocks, deepest first; the last one feeds :func:`head`.

    Disjoint from the encoder blocks and the head. Parameter-free glue (activations, norms
    without weights) between them may belong to neither.
    """
    return _checked(name, model).decoder(model)


def head(name: str, model: nn.Module) -> nn.Module:
    """The layer producing the ``out_channels`` logits: a leaf ``Conv3d`` (or ``ConvTranspose3d``).

    Its weight has shape (out_channels, C, k, k, k) for a Conv3d; for a ConvTranspose3d (MONAI
    UNet with ``num_res_units=0``) the out-channel axis is 1: (C, out_channels, k, k, k). In
    MONAI's UNet and VNet the block before the head also has ``out_channels`` outputs, so head
    surgery there must resize the last convolution of ``decoder_blocks(...)[-1]`` too.
    """
    return _checked(name, model).head(model)


def patch_divisor(name: str, kwargs: dict[str, Any] | None = None) -> int:
    """The number every spatial patch size (voxels) must be divisible by, for these arguments.

    Product of the strides for UNet and DynUNet, 16 for VNet and UNETR, ``patch_size**5`` (32)
    for SwinUNETR, ``2**(len(blocks_down) - 1)`` for SegResNet. UNETR also needs the patch to
    equal its ``img_size`` (see :func:`fixed_input_size`). Instance normalisation needs more
    than one voxel in the deepest feature map, so a patch of exactly the divisor on every axis
    fails (SwinUNETR: use 64 rather than 32).
    """
    resolved = resolve_kwargs(name, **(kwargs or {}))
    try:
        return _architecture(name).divisor(resolved)
    except (TypeError, ValueError) as error:
        raise InputError(f"Invalid strides or levels for {name}: {_sentence(error)}.") from error


def fixed_input_size(name: str, kwargs: dict[str, Any] | None = None) -> list[int] | None:
    """The one spatial input shape (Z, Y, X) the network accepts, or None if any divisible size
    works. Only UNETR has one: its position embeddings are sized for ``img_size``."""
    if name != "unetr":
        resolve_kwargs(name, **(kwargs or {}))  # still reject unknown names and arguments
        return None
    size = resolve_kwargs(name, **(kwargs or {}))["img_size"]
    return [int(size)] * 3 if isinstance(size, int) else [int(s) for s in size]


def output_size(name: str, kwargs: dict[str, Any] | None, size: Sequence[int]) -> list[int] | None:
    """The spatial output shape for an input of ``size`` (Z, Y, X) voxels, or None when the
    network keeps the input's size (every architecture but the valid-convolution ones)."""
    arch = _architecture(name)
    if arch.output_size is None:
        return None
    resolved = resolve_kwargs(name, **(kwargs or {}))
    return [int(arch.output_size(resolved, int(n))) for n in size]
