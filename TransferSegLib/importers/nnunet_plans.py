"""What an nnU-Net v2 model's plans and ``dataset.json`` say, in TransferSeg's terms, and its
tensor names both ways.

- :func:`configuration`: a configuration of ``plans.json`` with ``inherits_from`` resolved;
- :func:`architecture_of`: the network (new plans format or the old one) as our architecture
  name and its arguments (:mod:`TransferSegLib.nets.nnunet`);
- :func:`labels_of`, :func:`channels_of`, :func:`normalisation_of`, :func:`card_axes`: the
  card's labels, input channels, normalisation and (x, y, z) values;
- :func:`convert` / :func:`theirs`: nnU-Net's state dict to ours and back (its aliases and
  deep-supervision heads included on the way out).

:mod:`TransferSegLib.importers.nnunet` reads the files; :mod:`TransferSegLib.export` writes
them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from TransferSegLib.errors import InputError, ModelFileError

ARCHITECTURES = {"PlainConvUNet": "nnunet-plain", "ResidualEncoderUNet": "nnunet-resenc"}

# What nnU-Net does per channel -> the card's normalisation recipe (see preprocess.normalise).
SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
           "RescaleTo01Normalization", "RGBTo01Normalization")


# --- plans -> network and card -----------------------------------------------------------------

def configuration(plans: dict, name: str, where: str) -> dict:
    """The configuration ``name`` of ``plans`` with ``inherits_from`` resolved as nnU-Net does
    (the parent's entries, overridden by the child's)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        known = ", ".join(sorted(configurations)) if isinstance(configurations, dict) else "none"
        raise InputError(f"{where} has no configuration {name!r} (it has: {known}).")
    chain, current = [], name
    while True:
        if current in chain:
            raise ModelFileError(f"{where}: configurations inherit from each other in a circle "
                                 f"({' -> '.join([*chain, current])}).")
        chain.append(current)
        config = configurations.get(current)
        if not isinstance(config, dict):
            raise ModelFileError(f"{where}: configuration {current!r} (inherited by {name!r}) "
                                 "is missing.")
        if "inherits_from" not in config:
            break
        current = config["inherits_from"]
    resolved: dict = {}
    for link in reversed(chain):
        resolved.update(configurations[link])
    resolved.pop("inherits_from", None)
    return resolved


def _class_name(dotted: Any) -> str:
    return str(dotted).rsplit(".", 1)[-1]


def architecture_of(config: dict, where: str) -> tuple[str, dict]:
    """(our architecture name, its arguments) for a configuration in either plans format."""
    if "architecture" in config:
        arch = config["architecture"]
        if not isinstance(arch, dict) or not isinstance(arch.get("arch_kwargs"), dict):
            raise ModelFileError(f"{where}: 'architecture' has no 'arch_kwargs'.")
        cls = _class_name(arch.get("network_class_name", ""))
        kwargs = dict(arch["arch_kwargs"])
    elif "UNet_class_name" in config:  # plans written before nnU-Net 2.3
        cls = str(config["UNet_class_name"])
        stages = len(config["n_conv_per_stage_encoder"])
        kwargs = {
            "n_stages": stages,
            "features_per_stage": [min(int(config["UNet_base_num_features"]) * 2 ** i,
                                       int(config["unet_max_num_features"]))
                                   for i in range(stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{len(config['patch_size'])}d",
            "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            ("n_conv_per_stage" if cls == "PlainConvUNet" else "n_blocks_per_stage"):
                config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        }
    else:
        raise ModelFileError(f"{where}: the configuration names no network (neither "
                             "'architecture' nor 'UNet_class_name').")
    if cls not in ARCHITECTURES:
        raise InputError(
            f"{where} uses the network {cls}, which TransferSeg cannot build; supported: "
            f"{', '.join(ARCHITECTURES)}."
        )
    conv = _class_name(kwargs.get("conv_op", "Conv3d"))
    if conv != "Conv3d":
        raise InputError(f"{where} is a {conv[-2:]} configuration; TransferSeg segments "
                         "volumes with 3D networks only: import a 3d_fullres or 3d_lowres "
                         "configuration.")
    norm = _class_name(kwargs.get("norm_op") or "")
    if norm != "InstanceNorm3d":
        raise InputError(f"{where}: normalisation layer {norm or 'none'} is not supported "
                         "(nnU-Net's default InstanceNorm3d is).")
    nonlin = _class_name(kwargs.get("nonlin") or "")
    nonlin_kwargs = kwargs.get("nonlin_kwargs") or {}
    if nonlin not in ("LeakyReLU", "ReLU"):
        raise InputError(f"{where}: activation {nonlin or 'none'} is not supported "
                         "(LeakyReLU and ReLU are).")
    for key in ("block", "bottleneck_channels", "stem_channels"):
        if kwargs.get(key) not in (None, "BasicBlockD") and _class_name(kwargs.get(key)) != \
                "BasicBlockD":
            raise InputError(f"{where}: {key} = {kwargs[key]!r} is not supported (the default "
                             "residual block BasicBlockD is).")
    blocks = kwargs.get("n_conv_per_stage", kwargs.get("n_blocks_per_stage"))
    stages = int(kwargs["n_stages"])

    def per_stage(value: Any, count: int) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value] * count

    norm_kwargs = kwargs.get("norm_op_kwargs") or {}
    arguments = {
        "features_per_stage": [int(v) for v in per_stage(kwargs["features_per_stage"], stages)],
        "kernel_sizes": per_stage(kwargs["kernel_sizes"], stages),
        "strides": per_stage(kwargs["strides"], stages),
        "n_conv_per_stage": [int(v) for v in per_stage(blocks, stages)],
        "n_conv_per_stage_decoder": [int(v) for v in per_stage(
            kwargs["n_conv_per_stage_decoder"], stages - 1)],
        "conv_bias": bool(kwargs.get("conv_bias", False)),
        "norm_eps": float(norm_kwargs.get("eps", 1e-5)),
        "norm_affine": bool(norm_kwargs.get("affine", False)),
        "negative_slope": (float(nonlin_kwargs.get("negative_slope", 0.01))
                           if nonlin == "LeakyReLU" else 0.0),
        "nonlin_first": bool(kwargs.get("nonlin_first", False)),
    }
    return ARCHITECTURES[cls], arguments


def labels_of(dataset: dict, where: str) -> tuple[dict[int, str], list[str]]:
    """Output channel -> label name from ``dataset.json`` (value order; ``ignore`` left out),
    and notes. Region-based models (a label with several values) are refused."""
    raw = dataset.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise ModelFileError(f"{where} has no 'labels'.")
    if "regions_class_order" in dataset or any(isinstance(v, (list, tuple)) for v in
                                               raw.values()):
        raise InputError(f"{where} describes a region-based model (overlapping regions with "
                         "sigmoid outputs); TransferSeg supports nnU-Net models with one label "
                         "per voxel.")
    notes = []
    table: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelFileError(f"{where}: label {name!r} has the value {value!r}, not a "
                                 "whole number >= 0.")
        if name == "ignore":
            notes.append(f"the 'ignore' label ({value}) is not an output: nnU-Net's network "
                         "has no channel for it")
            continue
        table[value] = str(name)
    if sorted(table) != list(range(len(table))):
        raise ModelFileError(f"{where}: label values {sorted(table)} are not 0, 1, 2, ... as "
                             "nnU-Net requires.")
    return dict(sorted(table.items())), notes


def channels_of(dataset: dict, where: str) -> list[str]:
    raw = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise ModelFileError(f"{where} has no 'channel_names'.")
    try:
        keys = sorted(int(k) for k in raw)
    except (TypeError, ValueError):
        raise ModelFileError(f"{where}: 'channel_names' keys must be 0, 1, ... not "
                             f"{sorted(raw)!r}.") from None
    if keys != list(range(len(keys))):
        raise ModelFileError(f"{where}: 'channel_names' keys must be 0, 1, ... not {keys}.")
    return [str(raw[str(k)]) for k in keys]


def normalisation_of(config: dict, plans: dict, channels: int, where: str) -> dict:
    """The card's normalisation: one recipe, or ``{"kind": "channels", ...}`` when they differ."""
    schemes = config.get("normalization_schemes")
    masks = config.get("use_mask_for_norm", [False] * channels)
    if not isinstance(schemes, list) or len(schemes) != channels or len(masks) != channels:
        raise ModelFileError(f"{where}: 'normalization_schemes' and 'use_mask_for_norm' need one "
                             f"entry per input channel ({channels}).")
    properties = plans.get("foreground_intensity_properties_per_channel") or {}
    recipes = []
    for index, (scheme, mask) in enumerate(zip(schemes, masks, strict=True)):
        scheme = _class_name(scheme)
        if scheme == "CTNormalization":
            stats = properties.get(str(index))
            needed = ("percentile_00_5", "percentile_99_5", "mean", "std")
            if not isinstance(stats, dict) or not all(
                    isinstance(stats.get(k), (int, float)) for k in needed):
                raise ModelFileError(f"{where}: CTNormalization of channel {index} needs the "
                                     "dataset's foreground intensity properties "
                                     "(foreground_intensity_properties_per_channel).")
            recipes.append({"kind": "ct", "window": [float(stats["percentile_00_5"]),
                                                     float(stats["percentile_99_5"])],
                            "mean": float(stats["mean"]), "std": float(stats["std"])})
        elif scheme == "ZScoreNormalization":
            recipes.append({"kind": "zscore", "nonzero": bool(mask)})
        elif scheme == "NoNormalization":
            recipes.append({"kind": "none"})
        elif scheme == "RescaleTo01Normalization":
            recipes.append({"kind": "rescale"})
        elif scheme == "RGBTo01Normalization":
            recipes.append({"kind": "rgb"})
        else:
            raise InputError(f"{where}: intensity normalisation {scheme} is not supported; "
                             f"supported: {', '.join(SCHEMES)}.")
    if all(r == recipes[0] for r in recipes):
        return recipes[0]
    return {"kind": "channels", "channels": recipes}


def card_axes(values: list, transpose: list[int]) -> list:
    """Values per transposed array axis -> per card axis (x, y, z)."""
    array = [None] * 3
    for j, axis in enumerate(transpose):
        array[axis] = values[j]
    return array[::-1]


# --- tensor names ------------------------------------------------------------------------------

_ALIAS = re.compile(r"\.all_modules\.\d+\.")
_OURS = [  # nnU-Net's module path -> ours; anything else is unexpected
    (r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.", r"encoder.\1.\2.\3."),
    (r"encoder\.stem\.convs\.0\.(conv|norm)\.", r"stem.\1."),
    (r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.(conv1|conv2)\.(conv|norm)\.",
     r"encoder.\1.\2.\3.\4."),
    (r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.\d+\.(conv|norm)\.",
     r"encoder.\1.\2.shortcut.\3."),
    (r"decoder\.transpconvs\.(\d+)\.", r"decoder.\1.up."),
    (r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.", r"decoder.\1.convs.\2.\3."),
]


def convert(weights: dict[str, torch.Tensor], stages: int) -> tuple[dict[str, torch.Tensor],
                                                                     list[str], list[str]]:
    """nnU-Net's state dict -> (our tensors, dropped deep-supervision keys, unknown keys).

    Aliases (``all_modules.N``, ``decoder.encoder.``) must equal the tensor they alias."""
    plain: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        plain[key] = value
    canonical = {k: v for k, v in plain.items()
                 if not _ALIAS.search(k) and not k.startswith("decoder.encoder.")}
    for key, value in plain.items():
        if key in canonical:
            continue
        target = key.removeprefix("decoder.")
        if key.startswith("decoder.encoder."):
            target = key[len("decoder."):]
        if _ALIAS.search(target):
            continue  # an all_modules alias: its conv/norm twin is compared below
        twin = canonical.get(target)
        if twin is None or not torch.equal(twin, value):
            raise ModelFileError(f"nnU-Net tensor {key} differs from the tensor it should "
                                 f"duplicate ({target}); the checkpoint is inconsistent.")
    ours, dropped, unknown = {}, [], []
    last_seg = stages - 2
    for key, value in canonical.items():
        seg = re.match(r"decoder\.seg_layers\.(\d+)\.(.*)", key)
        if seg:
            if int(seg[1]) == last_seg:
                ours[f"head.{seg[2]}"] = value
            else:
                dropped.append(key)
            continue
        for pattern, target in _OURS:
            match = re.match(pattern, key)
            if match:
                ours[match.expand(target) + key[match.end():]] = value
                break
        else:
            unknown.append(key)
    return ours, dropped, unknown


def theirs(tensors: dict[str, torch.Tensor], arguments: dict, out_channels: int
           ) -> dict[str, torch.Tensor]:
    """Our state dict -> nnU-Net's, with the aliases its modules register and zero
    deep-supervision outputs (nnU-Net loads checkpoints strictly; they are unused when
    predicting)."""
    residual = bool(arguments.get("residual"))
    strides = arguments["strides"]
    features = arguments["features_per_stage"]
    out: dict[str, torch.Tensor] = {}

    def unit(prefix: str, ours_prefix: str, kind: str, param: str, value: torch.Tensor,
             duplicate_in_decoder: bool) -> None:
        index = 0 if kind == "conv" else 1
        names = [f"{prefix}.{kind}.{param}", f"{prefix}.all_modules.{index}.{param}"]
        for name in names:
            out[name] = value
            if duplicate_in_decoder:
                out[f"decoder.{name}"] = value

    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] == "head":
            out[f"decoder.seg_layers.{len(features) - 2}.{parts[1]}"] = value
        elif parts[0] == "stem":
            unit("encoder.stem.convs.0", key, parts[1], parts[2], value, True)
        elif parts[0] == "encoder" and not residual:
            s, i, kind, param = parts[1:]
            unit(f"encoder.stages.{s}.0.convs.{i}", key, kind, param, value, True)
        elif parts[0] == "encoder":
            s, b, name = parts[1:4]
            if name == "shortcut":
                strided = int(b) == 0 and any(int(v) != 1 for v in strides[int(s)])
                prefix = f"encoder.stages.{s}.blocks.{b}.skip.{1 if strided else 0}"
            else:
                prefix = f"encoder.stages.{s}.blocks.{b}.{name}"
            unit(prefix, key, parts[-2], parts[-1], value, True)
        elif parts[0] == "decoder" and parts[2] == "up":
            out[f"decoder.transpconvs.{parts[1]}.{parts[3]}"] = value
        elif parts[0] == "decoder":
            s, _, i, kind, param = parts[1:]
            unit(f"decoder.stages.{s}.convs.{i}", key, kind, param, value, False)
        else:
            raise ModelFileError(f"tensor {key} has no nnU-Net counterpart; this is a bug.")
    for s in range(len(features) - 2):
        width = features[-(s + 2)]
        out[f"decoder.seg_layers.{s}.weight"] = torch.zeros(out_channels, width, 1, 1, 1)
        out[f"decoder.seg_layers.{s}.bias"] = torch.zeros(out_channels)
    return out
