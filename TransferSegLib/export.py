"""A TransferSeg model for tools outside TransferSeg: a MONAI bundle, or a TorchScript file.

:func:`export_bundle` writes a folder MONAI's bundle runner can run::

    python -m monai.bundle run --config_file liver/configs/inference.json \\
        --meta_file liver/configs/metadata.json --bundle_root liver \\
        --datalist "['scan.nii.gz']" --output_dir out

``configs/inference.json`` reproduces :func:`TransferSegLib.inference.segment`: the network
(``network_def``: the MONAI class for MONAI architectures, TransferSeg's own class otherwise,
which then needs TransferSegLib installed where the bundle runs), the card's orientation,
spacing and intensity recipe as MONAI transforms, a Gaussian sliding-window inferer with the
card's patch size, overlap 0.25 and 2 patches per batch, softmax, inversion of the spatial
transforms with linear interpolation of the probabilities, argmax, the card's label values,
and a NIfTI label map per input. ``configs/metadata.json`` names the output channels
(``channel_def``); ``models/model.pt`` holds the weights as a plain state_dict (loadable with
``weights_only=True``); ``configs/transferseg_card.json`` keeps the whole model card.

MONAI's arrays are (x, y, z) of the oriented image while TransferSeg's are (z, y, x), so the
card's orientation, spacing and patch size are written reversed (orientation ``"LPS"`` is
``Orientationd(axcodes="SPL")``): the network sees the same array. On a scan already on the
model's grid (same orientation and spacing), the bundle's segmentation equals ``segment``'s.
On other scans both keep the first voxel centre, but MONAI's ``Spacingd`` may give the
resampled grid one voxel less or more along an axis than ``segment`` (which rounds the
extent), which moves the sliding windows: the labels then differ where the network is unsure.
Inputs with several channels are read as one multi-channel image (a 4D NIfTI), not one file
per channel.

:func:`export_torchscript` writes the network alone, compiled (``torch.jit.script``) or, where
that is not possible, traced at the card's patch size (a traced network then takes that input
size only, as a sliding window gives it); the card is inside as the extra file
``transferseg_card.json``.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from TransferSegLib import __version__
from TransferSegLib.checkpoint import ModelCard, load_model
from TransferSegLib.errors import InputError, TransferSegError
from TransferSegLib.files import atomic_output, refuse_existing, write_error

CARD_FILE = "transferseg_card.json"
OVERLAP = 0.25  # as inference.segment
BATCH_SIZE = 2
# MONAI's runner reads it by default; the standard form its checks accept.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
               "0.8.1/meta_schema_20220324.json")


# --- MONAI bundle --------------------------------------------------------------------------------

def network_definition(card: ModelCard, model_class: type[nn.Module]) -> dict[str, Any]:
    """The bundle's ``network_def``: ``_target_`` and every constructor argument.

    ``model_class`` is the class of the card's network (``type(model)``).
    """
    arguments = dict(card.arguments)
    if "img_size" in arguments and "img_size" not in _parameters(model_class):
        arguments.pop("img_size")  # as networks.build_network does for MONAI >= 1.5
    module = model_class.__module__
    target = (f"monai.networks.nets.{model_class.__name__}" if module.startswith("monai.")
              else f"{module}.{model_class.__qualname__}")
    inert(arguments, "the model card's 'arguments'")
    return {"_target_": target, "spatial_dims": 3, "in_channels": card.in_channels,
            "out_channels": card.out_channels, **arguments}


# MONAI's ConfigParser evaluates "$..." as Python, resolves "@..." and "%..." as references,
# and instantiates any object with a "_target_" (or other "_..._" key).
_EVALUATED_PREFIXES = ("$", "@", "%")


def inert(value: Any, where: str) -> None:
    """Refuse a value from a model card that MONAI's ConfigParser would evaluate when the
    bundle is loaded: a string starting with ``$``, ``@`` or ``%``, or a key starting with
    ``_``, at any depth. A model file from elsewhere must not become code on the machine of
    whoever exports it or runs the bundle."""
    if isinstance(value, str):
        if value.startswith(_EVALUATED_PREFIXES):
            raise InputError(
                f"{where[0].upper()}{where[1:]} holds {value[:40]!r}, which a MONAI bundle would "
                "run as code or a reference; the model file is not safe to export.")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("_"):
                raise InputError(
                    f"{where[0].upper()}{where[1:]} holds the key {str(key)[:40]!r}, which a MONAI "
                    "bundle would use to build objects; the model file is not safe to export.")
            inert(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            inert(item, where)


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def intensity_transforms(normalisation: dict[str, Any]) -> list[dict[str, Any]]:
    """MONAI transforms computing the card's intensity recipe on key ``image``."""
    kind = normalisation.get("kind")
    if kind == "ct":
        lo, hi = (float(v) for v in normalisation.get("window", (-1000.0, 1000.0)))
        if "mean" in normalisation or "std" in normalisation:  # clip, then (x - mean) / std
            mean = float(normalisation.get("mean", 0.0))
            std = max(float(normalisation.get("std", 1.0)), 1e-8)
            return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo,
                     "a_max": hi, "b_min": (lo - mean) / std, "b_max": (hi - mean) / std,
                     "clip": True}]
        scaled = normalisation.get("scale", True) is not False
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
                 "b_min": 0.0 if scaled else lo, "b_max": 1.0 if scaled else hi,
                 "clip": True}]
    if kind == "mr":
        p_lo, p_hi = (float(v) for v in normalisation.get("percentiles", (0.5, 99.5)))
        transforms = [
            {"_target_": "ClipIntensityPercentilesd", "keys": "image", "lower": p_lo,
             "upper": p_hi},
            {"_target_": "NormalizeIntensityd", "keys": "image"},
        ]
        if "output_mean" in normalisation or "output_std" in normalisation:
            transforms += [
                {"_target_": "ScaleIntensityd", "keys": "image", "minv": None, "maxv": None,
                 "factor": float(normalisation.get("output_std", 1.0)) - 1.0},
                {"_target_": "ShiftIntensityd", "keys": "image",
                 "offset": float(normalisation.get("output_mean", 0.0))},
            ]
        return transforms
    if kind == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": "image",
                 "nonzero": bool(normalisation.get("nonzero", False))}]
    if kind == "rescale":
        return [{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}]
    if kind == "rgb":
        return [{"_target_": "ScaleIntensityd", "keys": "image", "minv": None, "maxv": None,
                 "factor": 1 / 255 - 1}]
    if kind == "none":
        return []
    raise InputError(f"Intensity recipe {kind!r} has no MONAI equivalent; cannot export it.")


def inference_config(card: ModelCard, model_class: type[nn.Module]) -> dict[str, Any]:
    """The bundle's ``configs/inference.json`` for a model with this card and network class."""
    roi = [int(v) for v in reversed(card.patch_size)]
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        # The letters say where each array axis points, as in nibabel (and DICOM); a card
        # without an orientation (nnU-Net's) takes each scan's axes as they are.
        *([{"_target_": "Orientationd", "keys": "image", "axcodes": card.orientation[::-1],
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]]}] if card.orientation else []),
        {"_target_": "Spacingd", "keys": "image", "pixdim": [float(s) for s in
                                                               reversed(card.spacing)],
         "mode": "bilinear"},
        *intensity_transforms(card.normalisation),
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    values = [int(card.label_values.get(card.labels[c], c)) for c in range(card.out_channels)]
    postprocessing: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
         "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    if values != list(range(card.out_channels)):
        postprocessing.append({"_target_": "MapLabelValued", "keys": "pred",
                               "orig_labels": list(range(card.out_channels)),
                               "target_labels": values})
    postprocessing.append({
        "_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
        "output_ext": "@output_ext", "output_postfix": "@output_postfix",
        "output_dtype": "$numpy.uint8" if max(values) < 256 else "$numpy.uint16",
        "separate_folder": False, "resample": False, "print_log": False,
    })
    return {
        "imports": ["$import glob", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_postfix": "seg",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_definition(card, model_class),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi,
                    "sw_batch_size": BATCH_SIZE, "overlap": OVERLAP, "mode": "gaussian",
                    # as TransferSeg pads a volume thinner than the patch for this card
                    "padding_mode": "replicate" if card.inference.get("padding") == "edge"
                    else "constant"},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "amp": "$torch.cuda.is_available()"},
        "checkpointloader": {"_target_": "CheckpointLoader",
                             "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}, "map_location": "cpu"},
        "initialize": ["$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def _versions() -> dict[str, str]:
    import monai
    import numpy

    optional = {}
    for name, module in (("nibabel", "nibabel"), ("pytorch-ignite", "ignite")):
        if importlib.util.find_spec(module) is not None:
            optional[name] = __import__(module).__version__
    return {"monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__, "required_packages_version": optional}


def metadata(card: ModelCard, name: str) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (MONAI's metadata schema)."""
    roi = [int(v) for v in reversed(card.patch_size)]
    ct = card.normalisation.get("kind") == "ct"
    data = {
        "schema": META_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from TransferSeg {__version__}"},
        **_versions(),
        "name": card.title or name,
        "task": card.title or name,
        "description": card.description or f"A {card.architecture} exported from TransferSeg.",
        "authors": "",
        "copyright": "",
        "intended_use": "Research; not for diagnostic use unless validated.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if ct else "magnitude",
                "modality": card.modality, "num_channels": card.in_channels,
                "spatial_shape": roi, "dtype": "float32",
                "value_range": [0, 1] if ct else [], "is_patch_data": True,
                "channel_def": {str(c): f"channel {c}" if card.in_channels > 1 else "image"
                                for c in range(card.in_channels)},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": card.out_channels,
                "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {str(c): label for c, label in sorted(card.labels.items())},
            }},
        },
    }
    lineage = [item.get("citation") for item in card.lineage if item.get("citation")]
    if lineage:
        data["references"] = lineage
    inert(data, "the model card (title, description, labels or lineage)")
    return data


def _readme(card: ModelCard, name: str, target: str) -> str:
    labels = ", ".join(f"{c}: {n}" for c, n in sorted(card.labels.items()))
    return (
        f"# {card.title or name}\n\n"
        f"A {card.architecture} exported from TransferSeg {__version__}.\n\n"
        f"- labels: {labels}\n"
        f"- spacing {card.spacing} mm (x, y, z), orientation {card.orientation}, "
        f"patch {card.patch_size} voxels, intensities {json.dumps(card.normalisation)}\n\n"
        "Run it on NIfTI scans:\n\n"
        "    python -m monai.bundle run --config_file <bundle>/configs/inference.json \\\n"
        "        --meta_file <bundle>/configs/metadata.json --bundle_root <bundle> \\\n"
        "        --datalist \"['scan.nii.gz']\" --output_dir out\n\n"
        "It needs monai, nibabel, pytorch-ignite (and fire for the command line)"
        + ("" if target.startswith("monai.")
           else ", and TransferSegLib, whose class the network is") + ".\n"
    )


def export_bundle(model_path: str | os.PathLike, folder: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Write the TransferSeg model at ``model_path`` as a MONAI bundle folder; return it.

    The folder appears complete or not at all; an existing one is refused unless
    ``overwrite``.
    """
    folder = Path(folder)
    refuse_existing(folder, overwrite)
    if not folder.parent.is_dir():
        raise TransferSegError(f"Cannot write {folder}: {folder.parent} does not exist.")
    model, card = load_model(model_path)
    name = folder.name
    config = inference_config(card, type(model))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return _write_folder(folder, overwrite, {
        "configs/inference.json": _json_text(config),
        "configs/metadata.json": _json_text(metadata(card, name)),
        "configs/logging.conf": LOGGING_CONF,
        f"configs/{CARD_FILE}": card.to_json() + "\n",
        "docs/README.md": _readme(card, name, config["network_def"]["_target_"]),
        "models/model.pt": _serialised(torch.save, state),
    })


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def _write_folder(folder: Path, overwrite: bool, files: dict[str, str | bytes]) -> Path:
    """Write ``files`` ({relative path: text or bytes}) as the folder ``folder``, which appears
    complete or not at all (staged beside it, then renamed); an existing one is replaced only
    with ``overwrite``."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        for relative, content in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        if folder.exists():
            refuse_existing(folder, overwrite)
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except OSError as error:
        raise write_error(folder, error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _serialised(save, value, **options) -> bytes:
    """What ``save(value, file)`` (torch.save, torch.jit.save) writes, as bytes. Their C++
    writer aborts the whole process when a write fails (a full disk) while it closes the file;
    written by Python instead, a full disk is an ordinary error."""
    buffer = io.BytesIO()
    save(value, buffer, **options)
    return buffer.getvalue()


# --- TorchScript ---------------------------------------------------------------------------------

def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def compile_network(model: nn.Module, card: ModelCard) -> tuple[torch.jit.ScriptModule, str]:
    """``model`` as TorchScript and how: ``"script"``, or ``"trace"`` at the card's patch size.

    The result is checked against ``model`` on a random patch; a difference above 1e-4 of
    the logits' range raises :class:`TransferSegError`.
    """
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, card.in_channels, *reversed(card.patch_size), generator=generator)
    with torch.no_grad():
        expected = model(example)
        try:
            compiled, how = torch.jit.script(model), "script"
        except Exception:  # noqa: BLE001 - scripting fails in many ways on Python-only code
            compiled, how = torch.jit.trace(model, example, check_trace=False), "trace"
        got = compiled(example)
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if got.shape != expected.shape or _largest_difference(got, expected) > tolerance:
        raise TransferSegError(
            f"The TorchScript {card.architecture} ({how}) does not reproduce the network "
            "(largest logit difference "
            f"{_largest_difference(got, expected) if got.shape == expected.shape else 'n/a'}); "
            "this is a bug."
        )
    return compiled, how


def export_torchscript(model_path: str | os.PathLike, file: str | os.PathLike,
                       overwrite: bool = False) -> str:
    """Write the network of the TransferSeg model at ``model_path`` as TorchScript at ``file``
    (atomically); returns ``"script"`` or ``"trace"`` (see the module docstring)."""
    model, card = load_model(model_path)
    compiled, how = compile_network(model, card)
    with atomic_output(file, overwrite) as temporary:
        temporary.write_bytes(_serialised(torch.jit.save, compiled,
                                          _extra_files={CARD_FILE: card.to_json()}))
    return how


# --- nnU-Net v2 ------------------------------------------------------------------------------

NNUNET_CONFIGURATION = "3d_fullres"
NNUNET_TRAINER = "nnUNetTrainer"


def _nnunet_scheme(recipe: dict[str, Any]) -> tuple[str, bool, dict[str, float] | None]:
    """(nnU-Net normalisation scheme, use_mask_for_norm, foreground properties) for a recipe."""
    kind = recipe.get("kind")
    if kind == "ct":
        lo, hi = (float(v) for v in recipe.get("window", (-1000.0, 1000.0)))
        if "mean" in recipe or "std" in recipe:
            mean, std = float(recipe.get("mean", 0.0)), float(recipe.get("std", 1.0))
        elif recipe.get("scale", True) is False:
            mean, std = 0.0, 1.0
        else:  # clipped and mapped to [0, 1]: (x - lo) / (hi - lo)
            mean, std = lo, hi - lo
        return "CTNormalization", False, {"percentile_00_5": lo, "percentile_99_5": hi,
                                          "mean": mean, "std": std, "min": lo, "max": hi,
                                          "median": (lo + hi) / 2}
    if kind == "zscore":
        return "ZScoreNormalization", bool(recipe.get("nonzero", False)), None
    if kind == "none":
        return "NoNormalization", False, None
    if kind == "rescale":
        return "RescaleTo01Normalization", False, None
    if kind == "rgb":
        return "RGBTo01Normalization", False, None
    raise InputError(f"Intensity recipe {kind!r} has no nnU-Net equivalent; cannot export it "
                     "as an nnU-Net model.")


def nnunet_folder_files(card: ModelCard, tensors: dict[str, torch.Tensor]
                        ) -> tuple[dict, dict, dict]:
    """(plans.json, dataset.json, checkpoint dict) of an nnU-Net v2 result folder for a model
    whose architecture is an nnU-Net topology."""
    from TransferSegLib.importers import nnunet_plans

    names = {v: k for k, v in nnunet_plans.ARCHITECTURES.items()}
    if card.architecture not in names:
        raise InputError(
            f"A {card.architecture} model cannot be written as an nnU-Net folder: nnU-Net "
            f"runs {', '.join(names.values())} only (architectures "
            f"{', '.join(names)}). Export it as a MONAI bundle instead."
        )
    args = card.arguments
    transpose = [int(t) for t in args.get("transpose", [0, 1, 2])]
    backward = [transpose.index(a) for a in range(3)]

    def transposed(values: list) -> list:  # card (x, y, z) -> nnU-Net's transposed axes
        array = list(values)[::-1]
        return [array[t] for t in transpose]

    recipes = (card.normalisation.get("channels", []) if card.normalisation.get("kind") ==
               "channels" else [card.normalisation] * card.in_channels)
    schemes, masks, properties = [], [], {}
    for index, recipe in enumerate(recipes):
        scheme, mask, stats = _nnunet_scheme(recipe)
        schemes.append(scheme)
        masks.append(mask)
        properties[str(index)] = stats or {"mean": 0.0, "std": 1.0, "min": 0.0, "max": 0.0,
                                           "median": 0.0, "percentile_00_5": 0.0,
                                           "percentile_99_5": 0.0}
    residual = card.architecture == "nnunet-resenc"
    stages = len(args["features_per_stage"])
    arch_kwargs = {
        "n_stages": stages,
        "features_per_stage": list(args["features_per_stage"]),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in args["kernel_sizes"]],
        "strides": [list(s) for s in args["strides"]],
        ("n_blocks_per_stage" if residual else "n_conv_per_stage"):
            list(args["n_conv_per_stage"]),
        "n_conv_per_stage_decoder": list(args["n_conv_per_stage_decoder"]),
        "conv_bias": bool(args["conv_bias"]),
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": float(args["norm_eps"]), "affine": bool(args["norm_affine"])},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"negative_slope": float(args["negative_slope"]), "inplace": True},
    }
    if not residual:
        arch_kwargs["nonlin_first"] = bool(args.get("nonlin_first", False))
    module = "unet"
    spacing, patch = transposed(card.spacing), transposed(card.patch_size)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": f"nnUNetPlans_{NNUNET_CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [int(p) for p in patch],
        "median_image_size_in_voxels": [int(p) for p in patch],
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": schemes,
        "use_mask_for_norm": masks,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {
            "network_class_name":
                f"dynamic_network_architectures.architectures.{module}."
                f"{names[card.architecture]}",
            "arch_kwargs": arch_kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    dataset_name = "Dataset900_" + "".join(
        c if c.isalnum() else "_" for c in (card.title or "TransferSeg"))[:60]
    plans = {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [int(p) for p in patch],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose,
        "transpose_backward": backward,
        "configurations": {NNUNET_CONFIGURATION: config},
        "experiment_planner_used": f"TransferSeg {__version__}",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": properties,
    }
    channel_name = card.modality or "image"
    dataset = {
        "channel_names": {str(i): channel_name if card.in_channels == 1 else
                          f"{channel_name}{i}" for i in range(card.in_channels)},
        "labels": {card.labels[c]: c for c in range(card.out_channels)},
        "numTraining": len(card.training_cases),
        "file_ending": ".nii.gz",
        "name": card.title,
        "description": card.description,
        "transferseg_card": json.loads(card.to_json()),
    }
    mirror = [backward[a] for a in card.inference.get("mirror_axes", [])]
    init_args = {"plans": plans, "configuration": NNUNET_CONFIGURATION, "fold": 0,
                 "dataset_json": dataset}
    checkpoint = {
        "network_weights": nnunet_plans.theirs(tensors, {**args, "residual": residual},
                                         card.out_channels),
        "init_args": init_args,
        "trainer_name": NNUNET_TRAINER,
        "inference_allowed_mirroring_axes": tuple(sorted(mirror)),
        "current_epoch": 0,
    }
    return plans, dataset, checkpoint


def export_nnunet(model_path: str | os.PathLike, folder: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Write the TransferSeg model at ``model_path`` as an nnU-Net v2 result folder
    (``plans.json``, ``dataset.json``, ``fold_0/checkpoint_final.pth``) that nnU-Net's
    predictor (``nnUNetv2_predict_from_modelfolder``) and Slicer's NNUNet extension run.

    The folder appears complete or not at all; an existing one is refused unless ``overwrite``.
    """
    folder = Path(folder)
    refuse_existing(folder, overwrite)
    if not folder.parent.is_dir():
        raise TransferSegError(f"Cannot write {folder}: {folder.parent} does not exist.")
    model, card = load_model(model_path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    plans, dataset, checkpoint = nnunet_folder_files(card, tensors)
    return _write_folder(folder, overwrite, {
        "plans.json": _json_text(plans),
        "dataset.json": _json_text(dataset),
        "fold_0/checkpoint_final.pth": _serialised(torch.save, checkpoint),
    })
