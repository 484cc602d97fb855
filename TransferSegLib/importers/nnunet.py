"""nnU-Net v2 result folders (and lone checkpoints) -> ``nnunet-plain`` / ``nnunet-resenc``.

What nnU-Net v2 writes, and what is read here:

- a *result folder* ``<Trainer>__<Plans>__<configuration>/`` holds ``plans.json``,
  ``dataset.json`` and one folder per fold (``fold_0`` .. ``fold_4``, ``fold_all``) with
  ``checkpoint_final.pth`` and often ``checkpoint_best.pth``. Published models
  (TotalSegmentator, MultiTalent, STU-Net...) ship it as a zip, read here without unpacking
  anything but the chosen checkpoint (each member's size capped).
- a *checkpoint* is a ``torch.save`` pickle: ``network_weights`` (the state dict),
  ``init_args`` (``plans``, ``configuration``, ``fold``, ``dataset_json``), ``trainer_name``,
  ``inference_allowed_mirroring_axes``, plus the optimiser state and training logs, which
  hold numpy scalars. It is read with torch's restricted unpickler (``weights_only``) and an
  explicit allowlist of exactly the numpy names such logs need (numpy 2's ``numpy._core`` and
  numpy 1's ``numpy.core`` spellings); anything else in the pickle is refused. Nothing is ever
  read from ``postprocessing.pkl``.
- *plans*: the configuration (``3d_fullres`` by default; ``inherits_from`` resolved as nnU-Net
  does) in the new format (``architecture.network_class_name`` + ``arch_kwargs``) or the old
  one (``UNet_class_name``, ``UNet_base_num_features``, ``n_conv_per_stage_encoder``,
  ``pool_op_kernel_sizes``, ``conv_kernel_sizes``, ``unet_max_num_features``), converted as
  nnU-Net converts it.

The model card carries nnU-Net's preprocessing: no reorientation (orientation ``""``: the
scan's own voxel axes, as nnU-Net reads them), ``transpose_forward`` (inside the network,
see :mod:`TransferSegLib.nets.nnunet`), the configuration's spacing and patch (in the card's
x, y, z order), the normalisation of each channel (``CTNormalization``: clipped to the
dataset's foreground 0.5 and 99.5 percentiles, minus its mean, over its std;
``ZScoreNormalization``: the scan's own mean and std, inside the nonzero region where
``use_mask_for_norm``; ``NoNormalization``; ``RescaleTo01Normalization``;
``RGBTo01Normalization``), and in ``inference``: nnU-Net's tiling (step 0.5 of the patch, its
Gaussian weights), the mirroring axes its predictor averages over, and the crop to the nonzero
region, and the predictor's float16 sums of the tiles. Labels and their values come from
``dataset.json``; an ``ignore`` label is not an
output (nnU-Net's networks have no channel for it).

The network's deep-supervision outputs (``seg_layers`` of the lower decoder stages) are left
out, with the report saying so; the full-resolution ``seg_layers`` entry is the head that head
surgery replaces. nnU-Net's modules register each convolution and norm twice
(``conv``/``norm`` and ``all_modules.N``) and the decoder holds the encoder again
(``decoder.encoder``); those copies are checked to be identical and read once.
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.checkpoint import ImportReport, ModelCard, load_weights
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import extract_member, read_member
from TransferSegLib.samples import sha256_of

ARCHITECTURES = {"PlainConvUNet": "nnunet-plain", "ResidualEncoderUNet": "nnunet-resenc"}
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
DEFAULT_CONFIGURATION = "3d_fullres"
MAX_JSON_BYTES = 64 * 2**20  # plans.json / dataset.json in a zip
MAX_CHECKPOINT_BYTES = 8 * 2**30
STEP_SIZE = 0.5  # nnU-Net's predictor: tiles overlap by half a patch
# What torch's restricted unpickler raises for a global outside the allowlist (the library
# imports no pickle module itself).
_REFUSED = torch.serialization.pickle.UnpicklingError

# What nnU-Net does per channel -> the card's normalisation recipe (see preprocess.normalise).
SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
           "RescaleTo01Normalization", "RGBTo01Normalization")


# --- safe reading ------------------------------------------------------------------------------

def _numpy_globals() -> list:
    """The numpy callables an nnU-Net checkpoint's logs pickle, under every name numpy 1 and
    numpy 2 give them (torch's restricted unpickler refuses all other globals)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed: list = [np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((multiarray.scalar, f"{module}.scalar"))
        allowed.append((multiarray._reconstruct, f"{module}._reconstruct"))
    allowed.append(np.ndarray)
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        allowed.extend(getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType"))
    return allowed


def read_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint's contents, read without running code from it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"nnU-Net checkpoint {path} does not exist or is not a file.")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except _REFUSED as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if not found:
            raise ModelFileError(f"{path.name} is not a PyTorch checkpoint (the pickle in it "
                                 "cannot be read); give nnU-Net's checkpoint_final.pth.") from None
        what = f" ({found[1]})"
        raise ModelFileError(
            f"{path.name} asks to run code{what} when read, which TransferSeg never does; "
            "an nnU-Net checkpoint holds only tensors, numbers and text, so this file is not "
            "one or was altered. Use the checkpoint nnU-Net wrote."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelFileError(
            f"{path.name} cannot be read as an nnU-Net checkpoint "
            f"({(str(error).splitlines() or [type(error).__name__])[0]}); "
            "it may be truncated: copy or download it again."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("network_weights"), dict):
        raise ModelFileError(
            f"{path.name} has no 'network_weights': it is not an nnU-Net v2 checkpoint."
        )
    return data


# --- finding the parts of a result folder -----------------------------------------------------

@dataclass
class Source:
    """Where the parts of one nnU-Net model are: plans, dataset description, checkpoint."""

    name: str  # what the user gave (folder, zip or .pth), for messages
    plans: dict
    dataset: dict
    checkpoint: dict
    checkpoint_name: str
    fold: str
    sha256: str


def _json(text: bytes, name: str) -> dict:
    try:
        value = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{name} is not valid JSON ({error}); copy the result folder "
                             "again.") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{name} is not a JSON object; it is not nnU-Net's.")
    return value


def _fold_name(fold: str | int | None, available: list[str], where: str) -> str:
    if not available:
        raise InputError(
            f"{where} has no fold_* folder with {' or '.join(CHECKPOINTS)}; give an nnU-Net "
            "result folder (the one holding plans.json and fold_0, fold_1, ...)."
        )
    if fold is None:
        return "all" if "all" in available else sorted(available)[0]
    fold = str(fold)
    if fold not in available:
        raise InputError(f"{where} has no fold {fold}; it has folds "
                         f"{', '.join(sorted(available))}.")
    return fold


def _checkpoint_of(files: dict[str, Any], fold: str, checkpoint: str | None) -> str:
    names = [checkpoint] if checkpoint else list(CHECKPOINTS)
    for name in names:
        if name in files.get(fold, {}):
            return name
    raise InputError(f"fold_{fold} has no {' or '.join(names)}.")


@contextmanager
def _opened(path: Path, fold: str | int | None, checkpoint: str | None) -> Iterator[Source]:
    """The parts of the nnU-Net model at ``path`` (result folder, its zip, or a .pth)."""
    path = Path(path)
    if path.is_dir():
        yield _from_folder(path, fold, checkpoint)
    elif path.is_file() and path.suffix != ".pth" and zipfile.is_zipfile(path):
        # (a checkpoint written by torch.save is a zip too, named .pth)
        with tempfile.TemporaryDirectory(prefix="transferseg-nnunet-") as scratch:
            yield _from_zip(path, fold, checkpoint, Path(scratch))
    elif path.is_file() and path.suffix not in (".pth", ".pt", ".model"):
        raise InputError(f"{path.name} is neither an nnU-Net result folder, its .zip, nor a "
                         "checkpoint (.pth); give the folder that holds plans.json.")
    elif path.is_file():
        data = read_checkpoint(path)
        init = data.get("init_args")
        if not isinstance(init, dict) or not all(
                isinstance(init.get(k), dict) for k in ("plans", "dataset_json")):
            raise ModelFileError(
                f"{path.name} has no plans and dataset description in its 'init_args'; give "
                "the result folder it came from (with plans.json and dataset.json) instead."
            )
        yield Source(path.name, init["plans"], init["dataset_json"], data, path.name,
                     str(init.get("fold", "?")), sha256_of(path))
    else:
        raise InputError(f"{path} does not exist; give an nnU-Net result folder, its zip or a "
                         "checkpoint (.pth).")


def _from_folder(folder: Path, fold: str | int | None, checkpoint: str | None) -> Source:
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise InputError(
                f"{folder} has no {name}, so it is not an nnU-Net v2 result folder; give the "
                "folder named <Trainer>__<Plans>__<configuration> that holds plans.json, "
                "dataset.json and fold_0, fold_1, ..."
            )
    files = {child.name[len("fold_"):]: {f.name: f for f in child.iterdir() if f.is_file()}
             for child in folder.iterdir() if child.is_dir() and child.name.startswith("fold_")}
    available = [f for f, names in files.items() if any(c in names for c in CHECKPOINTS)]
    chosen = _fold_name(fold, available, str(folder))
    name = _checkpoint_of(files, chosen, checkpoint)
    file = files[chosen][name]
    return Source(folder.name, _json((folder / "plans.json").read_bytes(), str(folder /
                  "plans.json")), _json((folder / "dataset.json").read_bytes(),
                  str(folder / "dataset.json")), read_checkpoint(file), name, chosen,
                  sha256_of(file))


def _from_zip(path: Path, fold: str | int | None, checkpoint: str | None,
              scratch: Path) -> Source:
    with zipfile.ZipFile(path) as archive:
        members = {PurePosixPath(i.filename): i for i in archive.infolist() if not i.is_dir()}
        roots = sorted({p.parent for p in members if p.name == "plans.json"
                        and p.parent / "dataset.json" in members},
                       key=lambda p: (len(p.parts), str(p)))
        if not roots:
            raise InputError(f"{path.name} holds no nnU-Net result folder (no plans.json beside "
                             "a dataset.json); give the zip nnU-Net's export wrote.")
        if len(roots) > 1:
            names = ", ".join(str(r) for r in roots)
            raise InputError(f"{path.name} holds several nnU-Net result folders ({names}); "
                             "unpack it and import one folder.")
        root = roots[0]
        files: dict[str, dict[str, zipfile.ZipInfo]] = {}
        for member, info in members.items():
            if member.parent.parent == root and member.parent.name.startswith("fold_"):
                files.setdefault(member.parent.name[len("fold_"):], {})[member.name] = info
        available = [f for f, names in files.items() if any(c in names for c in CHECKPOINTS)]
        chosen = _fold_name(fold, available, path.name)
        name = _checkpoint_of(files, chosen, checkpoint)
        target = extract_member(archive, files[chosen][name].filename, scratch / name,
                                path.name, MAX_CHECKPOINT_BYTES)
        plans = _json(read_member(archive, str(root / "plans.json"), path.name, MAX_JSON_BYTES),
                      f"{path.name}:{root / 'plans.json'}")
        dataset = _json(read_member(archive, str(root / "dataset.json"), path.name,
                                    MAX_JSON_BYTES), f"{path.name}:{root / 'dataset.json'}")
        return Source(path.name, plans, dataset, read_checkpoint(target), name, chosen,
                      sha256_of(target))


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


def _architecture(config: dict, where: str) -> tuple[str, dict]:
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


def _channels(dataset: dict, where: str) -> list[str]:
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


def _axes(values: list, transpose: list[int]) -> list:
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


# --- the importer ------------------------------------------------------------------------------

def load_source(source: Source, entry: dict, configuration_name: str | None = None
                ) -> tuple[nn.Module, ModelCard, ImportReport]:
    """A network, card and report from the parts of an nnU-Net model."""
    where = source.name
    init = source.checkpoint.get("init_args") if isinstance(
        source.checkpoint.get("init_args"), dict) else {}
    name = configuration_name or init.get("configuration") or DEFAULT_CONFIGURATION
    config = configuration(source.plans, str(name), f"plans of {where}")
    patch = config.get("patch_size")
    if not isinstance(patch, list) or len(patch) != 3:
        raise InputError(f"{where}: configuration {name!r} is "
                         f"{len(patch) if isinstance(patch, list) else '?'}D; TransferSeg "
                         "imports 3D configurations only (3d_fullres, 3d_lowres).")
    architecture, arguments = _architecture(config, f"plans of {where}")
    labels, notes = labels_of(source.dataset, f"dataset.json of {where}")
    channels = _channels(source.dataset, f"dataset.json of {where}")
    transpose = [int(t) for t in source.plans.get("transpose_forward", [0, 1, 2])]
    if sorted(transpose) != [0, 1, 2]:
        raise ModelFileError(f"plans of {where}: transpose_forward {transpose} is not a "
                             "permutation of 0, 1, 2.")
    arguments["transpose"] = transpose
    arguments = networks.resolve_kwargs(architecture, **arguments)
    weights = source.checkpoint["network_weights"]
    tensors, dropped, unknown = convert(weights, len(arguments["features_per_stage"]))
    model = networks.build_network(architecture, len(channels), len(labels), **arguments)
    report = load_weights(model, {**tensors, **{k: weights[k] for k in unknown}},
                          source=f"{where} ({source.checkpoint_name}, fold {source.fold})",
                          strict=False)
    if not report.ok:
        first = (f"{report.mismatched[0][0]} is {report.mismatched[0][1]} in the checkpoint "
                 f"but {report.mismatched[0][2]} in the plans' network" if report.mismatched
                 else f"{len(report.missing)} tensors are missing (first {report.missing[0]})"
                 if report.missing else
                 f"{len(report.unexpected)} tensors are unexpected (first {report.unexpected[0]})")
        raise ModelFileError(
            f"The checkpoint {source.checkpoint_name} of {where} (fold {source.fold}) does not "
            f"fit the network its plans describe: {first}; the plans and the checkpoint come "
            "from different runs. Use the plans.json saved beside the fold folders."
        )
    report.dropped.extend(dropped)
    if dropped:
        report.notes.append(f"{len(dropped)} deep-supervision outputs (lower decoder stages' "
                            "seg_layers) are used only in nnU-Net's training and were left out")
    report.notes.extend(notes)
    report.notes.append(
        "postprocessing (largest-component filtering from postprocessing.pkl) is not applied; "
        "that file is never read")
    mirror = source.checkpoint.get("inference_allowed_mirroring_axes")
    mirror_axes = ([transpose[int(a)] for a in mirror] if isinstance(mirror, (list, tuple))
                   else [])
    spacing = [float(v) for v in _axes([float(s) for s in config["spacing"]], transpose)]
    patch_size = [int(v) for v in _axes([int(p) for p in patch], transpose)]
    lineage = {"published": entry.get("id") or f"nnU-Net {source.plans.get('dataset_name', '')}",
               "framework": "nnU-Net v2",
               "dataset": str(source.plans.get("dataset_name", "")),
               "plans": str(source.plans.get("plans_name", "")),
               "configuration": str(name),
               "trainer": str(source.checkpoint.get("trainer_name", "")),
               "fold": source.fold, "checkpoint": source.checkpoint_name,
               "checkpoint_sha256": source.sha256,
               "citation": entry.get("citation", "Isensee et al., nnU-Net, Nat Methods 2021"),
               "licence": entry.get("licence", "")}
    modality = entry.get("modality") or ("CT" if channels[0].upper() == "CT" else
                                         "MR" if channels[0].upper() in ("MR", "MRI", "T1", "T2",
                                                                        "FLAIR", "ADC") else "")
    card = ModelCard(
        architecture=architecture, in_channels=len(channels), out_channels=len(labels),
        labels=labels, spacing=spacing, patch_size=patch_size,
        normalisation=normalisation_of(config, source.plans, len(channels), f"plans of {where}"),
        arguments=arguments, orientation=entry.get("orientation", ""), modality=modality,
        inference={"tiling": "nnunet", "step_size": STEP_SIZE, "mirror_axes": mirror_axes,
                   "crop_nonzero": True, "accumulate": "float16"},
        title=entry.get("title") or f"nnU-Net {source.plans.get('dataset_name', where)} "
                                    f"{name} fold {source.fold}",
        description=entry.get("notes", str(source.dataset.get("description", ""))),
        lineage=[lineage],
    )
    saved = source.dataset.get("transferseg_card")
    if isinstance(saved, dict):  # written by TransferSeg's export: its own card's descriptions
        own = ModelCard.from_json(json.dumps(saved), f"dataset.json of {where}")
        if own.labels == card.labels:
            card = replace(card, **{name: getattr(own, name) for name in _DESCRIPTIVE})
            report.notes.append("written by TransferSeg: its model card's labels, terminology, "
                                "lineage and metrics are restored")
    return model.eval(), card, report


# Card fields a TransferSeg export keeps in dataset.json and an import restores as they were.
_DESCRIPTIVE = ("label_values", "terminology", "orientation", "modality", "lineage",
                "training_cases", "metrics", "title", "description", "created", "inference")


def available_folds(path: str | Path) -> list[str]:
    """The folds of a result folder (or its zip) that hold a checkpoint, sorted."""
    path = Path(path)
    if path.is_dir():
        return sorted(child.name[len("fold_"):] for child in path.iterdir()
                      if child.is_dir() and child.name.startswith("fold_")
                      and any((child / c).is_file() for c in CHECKPOINTS))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [PurePosixPath(n) for n in archive.namelist()]
        return sorted({m.parent.name[len("fold_"):] for m in members
                       if m.name in CHECKPOINTS and m.parent.name.startswith("fold_")})
    return []


def _requested_folds(path: Path, fold: str | int | None) -> list[str | None]:
    """``fold`` as a list: None (the default fold), one fold, ``"0,1,2"`` or ``"average"``
    (every fold with a checkpoint, as nnU-Net's predictor uses by default)."""
    if fold is None:
        return [None]
    text = str(fold).strip()
    if text == "average":
        folds = [f for f in available_folds(path) if f != "all"]
        if len(folds) < 2:
            raise InputError(f"{path} has {len(folds)} cross-validation fold(s) with a "
                             "checkpoint; averaging needs two or more.")
        return folds
    folds = [f.strip() for f in text.split(",") if f.strip()]
    if len(set(folds)) != len(folds) or not folds:
        raise InputError(f"Folds {text!r}: name each fold once, e.g. 0 or 0,1,2 or average.")
    return folds


def load_folder(path: str | Path, entry: dict | None = None, *, fold: str | int | None = None,
                checkpoint: str | None = None, configuration_name: str | None = None
                ) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import the nnU-Net model at ``path``: a result folder, its zip, or one checkpoint.

    ``fold``: which ``fold_*`` (default ``all`` if present, else the first); several
    (``"0,1,2"``, or ``"average"`` for every fold) give one model that averages their logits,
    as nnU-Net's predictor ensembles folds (it segments; fine-tuning needs one fold).
    ``checkpoint``: ``checkpoint_final.pth`` (default, else ``checkpoint_best.pth``)."""
    folds = _requested_folds(Path(path), fold)
    parts = []
    for one in folds:
        with _opened(Path(path), one, checkpoint) as source:
            parts.append(load_source(source, entry or {}, configuration_name))
    if len(parts) == 1:
        return parts[0]
    return _ensemble(parts)


def _ensemble(parts: list[tuple[nn.Module, ModelCard, ImportReport]]
              ) -> tuple[nn.Module, ModelCard, ImportReport]:
    _, card, report = parts[0]
    same = ("architecture", "arguments", "labels", "normalisation", "spacing", "patch_size",
            "in_channels")
    for _, other, other_report in parts[1:]:
        differs = [f for f in same if getattr(other, f) != getattr(card, f)]
        if differs:
            raise ModelFileError(f"{other_report.source} differs from {report.source} in "
                                 f"{differs[0]}; only folds of one configuration can be "
                                 "averaged.")
    architecture = f"{card.architecture}-ensemble"
    arguments = {**card.arguments, "folds": len(parts)}
    model = networks.build_network(architecture, card.in_channels, card.out_channels,
                                   **arguments)
    with torch.no_grad():
        for member, (part, _, _) in zip(model.members, parts, strict=True):
            member.load_state_dict(part.state_dict())
    folds = [c.lineage[-1]["fold"] for _, c, _ in parts]
    lineage = {**card.lineage[-1], "fold": ",".join(folds),
               "checkpoint_sha256": ",".join(c.lineage[-1]["checkpoint_sha256"]
                                             for _, c, _ in parts)}
    merged = ImportReport(source=report.source.replace(f"fold {folds[0]}",
                                                       f"folds {', '.join(folds)}"))
    for _, _, part in parts:
        merged.loaded += part.loaded
        merged.dropped += part.dropped
    merged.notes = [*report.notes, f"{len(parts)} folds averaged (their logits), as nnU-Net's "
                    "predictor ensembles them"]
    title = card.title.replace(f"fold {folds[0]}", f"folds {', '.join(folds)}")
    card = replace(card, architecture=architecture, arguments=arguments, lineage=[lineage],
                   title=title)
    return model.eval(), card, merged


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """The catalog importer: ``path`` is the fetched zip (or folder); the entry may name
    ``fold``, ``checkpoint`` and ``configuration``."""
    return load_folder(path, entry, fold=entry.get("fold"), checkpoint=entry.get("checkpoint"),
                       configuration_name=entry.get("configuration"))


def is_nnunet(path: str | Path) -> bool:
    """Whether ``path`` looks like an nnU-Net result folder or checkpoint (not a model file)."""
    path = Path(path)
    if path.is_dir():
        return (path / "plans.json").is_file()
    if path.suffix == ".zip" and path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(PurePosixPath(n).name == "plans.json" for n in archive.namelist())
    return path.suffix == ".pth" and path.is_file()

