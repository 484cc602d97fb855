"""MONAI bundles (a folder, or its ``.zip``) -> the TransferSeg architecture of the same network.

A bundle holds ``configs/inference.json`` (or ``.yaml``), ``configs/metadata.json`` and
``models/model.pt``. The config is read as data, never run: its ``network_def`` must name a
MONAI network TransferSeg has (``SegResNet``, ``UNet``, ``SwinUNETR``, ``DynUNet``, ``UNETR``,
``VNet``), or one of TransferSeg's own networks (as :mod:`TransferSegLib.export` writes them),
with literal arguments (``@name`` references to other literal entries are followed;
any ``$`` expression is refused). Arguments the bundle leaves out take MONAI's defaults, not
TransferSeg's. The weights are read with ``weights_only``.

The card comes from the bundle where it says so plainly:

* labels: ``metadata.json`` ``network_data_format.outputs.pred.channel_def``;
* orientation, spacing: ``Orientationd`` axcodes and ``Spacingd`` pixdim. MONAI's arrays are
  (x, y, z) of the oriented image, TransferSeg's (z, y, x), so axcodes ``"RAS"`` becomes
  orientation ``"SAR"`` and pixdim (1.5, 1.5, 2.0) spacing (2.0, 1.5, 1.5): the network sees
  the same array either way;
* intensities: ``ScaleIntensityRanged`` to [0, 1] with clipping -> ``{"kind": "ct", "window":
  [a_min, a_max]}``; ``NormalizeIntensityd`` -> ``{"kind": "zscore"}`` (``nonzero`` kept);
* patch size: the ``SlidingWindowInferer`` ``roi_size`` (reversed, as above).

Where the bundle does not say (no ``Orientationd``, no intensity transform, no channel
names...) the catalog entry's value is used, or a default (orientation ``"SAR"``, MONAI's usual
RAS arrays; 1 mm; 96^3 patches; no intensity change), and the report says so in a note.
A bundle whose outputs are independent sigmoid channels (BraTS-style overlapping regions) is
refused: TransferSeg gives each voxel one label.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monai.networks.nets import UNETR, DynUNet, SegResNet, SwinUNETR, UNet, VNet
from torch import nn

from TransferSegLib import nets, networks
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import card_from_entry, extract_member, read_member
from TransferSegLib.importers.native import read_state_dict
from TransferSegLib.weights import ImportReport, load_weights

# MONAI network class name -> TransferSeg architecture
NETWORKS = {
    "SegResNet": "segresnet",
    "UNet": "unet",
    "Unet": "unet",
    "SwinUNETR": "swinunetr",
    "DynUNet": "dynunet",
    "DynUnet": "dynunet",
    "UNETR": "unetr",
    "VNet": "vnet",
}
_CLASSES = {"segresnet": SegResNet, "unet": UNet, "swinunetr": SwinUNETR, "dynunet": DynUNet,
            "unetr": UNETR, "vnet": VNet}
CONFIG_NAMES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
METADATA_NAME = "configs/metadata.json"
WEIGHTS_NAME = "models/model.pt"
_OLD_NAMES = {"dimensions": "spatial_dims"}  # MONAI's UNet before 0.6


# --- reading the bundle ------------------------------------------------------------------------

def _parse(text: str, name: str) -> dict:
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelFileError(f"The bundle's {name} is not valid JSON: {error}.") from None
    else:
        try:
            import yaml
        except ImportError:
            raise InputError(
                f"The bundle's config is {name}; reading YAML needs the PyYAML package "
                "(pip install pyyaml)."
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ModelFileError(f"The bundle's {name} is not valid YAML: {error}.") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"The bundle's {name} does not hold a mapping of settings.")
    return data


@contextmanager
def _bundle_files(path: Path) -> Iterator[tuple[dict, dict, Path, list[str]]]:
    """(config, metadata, weights file, notes) of a bundle folder or zip; the weights of a
    zip are extracted to a temporary file for the duration of the block."""
    notes: list[str] = []
    if path.is_dir():
        root = path
        config_name = next((n for n in CONFIG_NAMES if (root / n).is_file()), None)
        if config_name is None:
            raise ModelFileError(
                f"{path} is not a MONAI bundle: it has no {CONFIG_NAMES[0]} (or .yaml)."
            )
        config = _parse((root / config_name).read_text(encoding="utf-8"), config_name)
        metadata = {}
        if (root / METADATA_NAME).is_file():
            metadata = _parse((root / METADATA_NAME).read_text(encoding="utf-8"), METADATA_NAME)
        else:
            notes.append(f"the bundle has no {METADATA_NAME}")
        weights = root / WEIGHTS_NAME
        _check_weights(weights.is_file(), root / "models/model.ts", path)
        yield config, metadata, weights, notes
        return
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is neither a MONAI bundle folder nor a bundle .zip.")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()

        def member(suffix: str) -> str | None:
            # Zoo archives hold one top folder (<bundle name>/configs/...); take the shallowest.
            found = sorted((n for n in names if n == suffix or n.endswith("/" + suffix)), key=len)
            return found[0] if found else None

        config_member = next((m for m in map(member, CONFIG_NAMES) if m), None)
        if config_member is None:
            raise ModelFileError(f"{path.name} is not a MONAI bundle: no {CONFIG_NAMES[0]} in it.")
        config = _parse(_text(archive, config_member, path), config_member)
        metadata_member = member(METADATA_NAME)
        metadata = {}
        if metadata_member:
            metadata = _parse(_text(archive, metadata_member, path), METADATA_NAME)
        else:
            notes.append(f"the bundle has no {METADATA_NAME}")
        weights_member = member(WEIGHTS_NAME)
        _check_weights(weights_member is not None, member("models/model.ts"), path)
        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder) / "model.pt"
            extract_member(archive, weights_member, weights, path.name)
            yield config, metadata, weights, notes


def _text(archive: zipfile.ZipFile, member: str, path: Path) -> str:
    try:
        return read_member(archive, member, path.name).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFileError(f"{path.name}: {member} is not UTF-8 text; it is not a MONAI "
                             "bundle's configuration.") from None


def _check_weights(present: bool, torchscript: Any, bundle: Path) -> None:
    if present:
        return
    if torchscript and (not isinstance(torchscript, Path) or torchscript.is_file()):
        raise ModelFileError(
            f"The bundle {bundle.name} has only a TorchScript model (models/model.ts); import "
            "it with the torchscript importer, or get the bundle's models/model.pt."
        )
    raise ModelFileError(f"The bundle {bundle.name} has no {WEIGHTS_NAME}.")


# --- reading the config as data ----------------------------------------------------------------

def _lookup(config: dict, reference: str) -> Any:
    node: Any = config
    for part in reference.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(reference)
    return node


def resolve(config: dict, value: Any, where: str, depth: int = 0) -> Any:
    """``value`` with ``@name`` references to literal config entries replaced by them.

    ``"$@name"`` counts as a reference; any other ``$`` expression raises
    :class:`ModelFileError` naming ``where`` (an expression would have to be run).
    """
    if depth > 20:
        raise ModelFileError(f"The bundle's {where} refers to itself in a loop.")
    if isinstance(value, dict):
        return {k: resolve(config, v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(config, v, where, depth + 1) for v in value]
    if isinstance(value, str):
        reference = value[2:] if value.startswith("$@") else value[1:] if value.startswith(
            "@") else None
        if reference is not None and reference.replace("#", "").replace("_", "").isalnum():
            try:
                return resolve(config, _lookup(config, reference), where, depth + 1)
            except KeyError:
                raise ModelFileError(
                    f"The bundle's {where} refers to {value!r}, which the config does not "
                    "define."
                ) from None
        if value.startswith("$"):
            raise ModelFileError(
                f"The bundle's {where} is a Python expression ({value[:80]!r}); TransferSeg "
                "reads bundle configs without running them. Replace it with its value."
            )
    return value


def _class_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _transforms(config: dict) -> list[dict]:
    """The preprocessing transforms (dicts with ``_target_``), unresolved."""
    node = config.get("preprocessing")
    if isinstance(node, str) and node.startswith("@"):
        try:
            node = _lookup(config, node[1:])
        except KeyError:
            return []
    if isinstance(node, dict):
        node = node.get("transforms", [])
    if isinstance(node, str) and node.startswith("@"):
        try:
            node = _lookup(config, node[1:])
        except KeyError:
            return []
    return [t for t in node if isinstance(t, dict)] if isinstance(node, list) else []


def _jsonable(value: Any) -> Any:
    """A MONAI default as a JSON value (tuples as lists), or raise TypeError."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)  # MONAI's string enums become plain text
    raise TypeError(type(value).__name__)


def _own_networks() -> dict[str, tuple[str, type]]:
    """Dotted class path -> (architecture, class) of TransferSeg's own networks (bundles
    exported by TransferSeg name them)."""
    found = {}
    for module_info in pkgutil.iter_modules(nets.__path__):
        module = importlib.import_module(f"{nets.__name__}.{module_info.name}")
        for name, fields in getattr(module, "ARCHITECTURES", {}).items():
            cls = fields["network_class"]
            found[f"{cls.__module__}.{cls.__qualname__}"] = (name, cls)
    return found


def network_from_config(config: dict) -> tuple[str, int, int, dict[str, Any]]:
    """(architecture, in_channels, out_channels, arguments) of the bundle's ``network_def``."""
    if "network_def" not in config:
        raise ModelFileError("The bundle's config has no network_def; which network is it?")
    definition = resolve(config, config["network_def"], "network_def")
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise ModelFileError("The bundle's network_def is not a network (no _target_).")
    target = str(definition["_target_"])
    own = _own_networks()
    if target in own:
        architecture, network_class = own[target]
    elif _class_name(target) in NETWORKS and not target.startswith("TransferSegLib."):
        architecture = NETWORKS[_class_name(target)]
        network_class = _CLASSES[architecture]
    else:
        raise InputError(
            f"The bundle's network is {target!r}; TransferSeg can import "
            f"{', '.join(sorted(set(NETWORKS)))} from MONAI bundles, and its own networks."
        )
    given = {_OLD_NAMES.get(k, k): v for k, v in definition.items()
             if not k.startswith("_") and k not in ("_requires_", "_disabled_")}
    spatial_dims = given.pop("spatial_dims", 3)
    if spatial_dims != 3:
        raise InputError(f"The bundle's network is {spatial_dims}D; TransferSeg's are 3D.")
    try:
        in_channels, out_channels = int(given.pop("in_channels")), int(given.pop("out_channels"))
    except KeyError as error:
        raise ModelFileError(f"The bundle's network_def does not give {error.args[0]}.") from None
    # Arguments left out mean MONAI's defaults, which may not be TransferSeg's.
    ours = networks.resolve_kwargs(architecture, **given)
    for name, parameter in inspect.signature(network_class.__init__).parameters.items():
        if name in given or name not in ours or parameter.default is inspect.Parameter.empty:
            continue
        try:
            default = _jsonable(parameter.default)
        except TypeError:
            continue
        if default != _jsonable(ours[name]):
            given[name] = default
    return architecture, in_channels, out_channels, networks.resolve_kwargs(architecture,
                                                                             **given)


def _labels(metadata: dict, out_channels: int, notes: list[str]) -> dict[int, str] | None:
    channel_def = (metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
                   .get("channel_def"))
    if not isinstance(channel_def, dict) or not channel_def:
        return None
    try:
        labels = {int(k): str(v) for k, v in channel_def.items()}
    except (TypeError, ValueError):
        notes.append("metadata.json channel_def has channels that are not numbers; ignored")
        return None
    if sorted(labels) != list(range(out_channels)):
        raise ModelFileError(
            f"The bundle's metadata names channels {sorted(labels)} but its network has "
            f"{out_channels} outputs; the bundle is inconsistent."
        )
    return labels


def _postprocessing(config: dict) -> list[dict]:
    node = config.get("postprocessing")
    transforms = node.get("transforms", []) if isinstance(node, dict) else []
    return [t for t in transforms if isinstance(t, dict)] if isinstance(transforms, list) else []


def _uses_sigmoid(config: dict) -> bool:
    return any(_class_name(t.get("_target_")) in ("Activationsd", "Activations")
               and t.get("sigmoid") is True for t in _postprocessing(config))


def _label_values(config: dict, labels: dict[int, str], notes: list[str]) -> dict[str, int]:
    """Voxel value per label name from a ``MapLabelValued`` after the argmax, else {}."""
    for transform in _postprocessing(config):
        if _class_name(transform.get("_target_")) not in ("MapLabelValued", "MapLabelValue"):
            continue
        try:
            source = resolve(config, transform.get("orig_labels"), "MapLabelValued")
            target = resolve(config, transform.get("target_labels"), "MapLabelValued")
        except ModelFileError as error:
            notes.append(f"{error} Label values are the channel numbers.")
            return {}
        if (isinstance(source, list) and isinstance(target, list) and len(source) == len(target)
                and sorted(source) == sorted(labels) and all(isinstance(v, int) for v in target)):
            return {labels[c]: int(v) for c, v in zip(source, target, strict=True)}
        notes.append("MapLabelValued does not map every output channel to a whole number; "
                     "label values are the channel numbers")
    return {}


def preprocessing_from_config(config: dict, notes: list[str]) -> dict[str, Any]:
    """Card fields (orientation, spacing, normalisation, patch_size) the bundle states plainly.

    Each field is left out when the bundle does not state it, or states it in a form
    TransferSeg cannot reproduce exactly (then a note says why).
    """
    found: dict[str, Any] = {}
    ignored = []
    for transform in _transforms(config):
        name = _class_name(transform.get("_target_"))
        where = f"preprocessing {name}"
        try:
            if name in ("Orientationd", "Orientation"):
                axcodes = str(resolve(config, transform.get("axcodes", ""), where)).upper()
                if len(axcodes) == 3:
                    found["orientation"] = axcodes[::-1]
            elif name in ("Spacingd", "Spacing"):
                pixdim = resolve(config, transform.get("pixdim"), where)
                pixdim = [pixdim] * 3 if isinstance(pixdim, (int, float)) else list(pixdim)
                if len(pixdim) == 3 and all(isinstance(p, (int, float)) and p > 0
                                            for p in pixdim):
                    found["spacing"] = [float(p) for p in reversed(pixdim)]
                else:
                    notes.append(f"Spacingd pixdim {pixdim!r} is not three sizes; ignored")
            elif name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
                args = {k: resolve(config, transform.get(k, default), where)
                        for k, default in (("a_min", None), ("a_max", None), ("b_min", None),
                                           ("b_max", None), ("clip", False))}
                if args["b_min"] == 0 and args["b_max"] == 1 and args["clip"] is True:
                    found["normalisation"] = {
                        "kind": "ct", "window": [float(args["a_min"]), float(args["a_max"])]}
                else:
                    notes.append(
                        f"ScaleIntensityRanged {args} is not a clipped window scaled to [0, 1]; "
                        "its intensities cannot be reproduced, the catalog's are used")
            elif name in ("NormalizeIntensityd", "NormalizeIntensity"):
                nonzero = bool(resolve(config, transform.get("nonzero", False), where))
                extra = {k for k in transform if k not in ("_target_", "keys", "nonzero",
                                                           "channel_wise", "allow_missing_keys")}
                if extra:
                    notes.append(f"NormalizeIntensityd with {sorted(extra)} cannot be reproduced; "
                                 "the catalog's intensities are used")
                else:
                    found["normalisation"] = ({"kind": "zscore", "nonzero": True} if nonzero
                                              else {"kind": "zscore"})
            elif name not in ("LoadImaged", "LoadImage", "EnsureChannelFirstd",
                              "EnsureChannelFirst", "EnsureTyped", "EnsureType", "ToTensord",
                              "CastToTyped", "AddChanneld"):
                ignored.append(name)
        except ModelFileError as error:
            notes.append(f"{error} It was ignored.")
    if ignored:
        notes.append(f"preprocessing not reproduced by TransferSeg: {', '.join(ignored)}")
    inferer = config.get("inferer")
    if isinstance(inferer, dict) and "roi_size" in inferer:
        try:
            roi = resolve(config, inferer["roi_size"], "inferer roi_size")
            roi = [roi] * 3 if isinstance(roi, int) else list(roi)
            if len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi):
                found["patch_size"] = [int(r) for r in reversed(roi)]
        except ModelFileError as error:
            notes.append(f"{error} The catalog's patch size is used.")
    return found


# --- the importer ------------------------------------------------------------------------------

def _modality(metadata: dict) -> str:
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    image = inputs.get("image", {}) if isinstance(inputs, dict) else {}
    modality = str(image.get("modality", "")) if isinstance(image, dict) else ""
    return {"MRI": "MR"}.get(modality.upper(), modality.upper())


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import a MONAI bundle folder or zip; see the module docstring for what the card says."""
    path = Path(path)
    with _bundle_files(path) as (config, metadata, weights_path, notes):
        architecture, in_channels, out_channels, arguments = network_from_config(config)
        if _uses_sigmoid(config):
            raise InputError(
                f"The bundle {path.name} predicts independent (sigmoid) channels that may "
                "overlap; TransferSeg gives each voxel one label and cannot use it as it is."
            )
        tensors = read_state_dict(weights_path)
    labels = _labels(metadata, out_channels, notes)
    if labels is None:
        entry_labels = {int(k): str(v) for k, v in entry.get("labels", {}).items()}
        if len(entry_labels) == out_channels:
            labels = entry_labels
            notes.append("labels from the catalog entry (the bundle's metadata names none)")
        else:
            labels = {0: "background", **{c: f"label_{c}" for c in range(1, out_channels)}}
            notes.append("the bundle names no labels: channel 0 assumed background, the others "
                         "named label_1, label_2, ...")
    from_bundle = preprocessing_from_config(config, notes)
    fields: dict[str, Any] = {}
    # Without Orientationd MONAI keeps each file's own axis order, which TransferSeg cannot do;
    # MONAI's usual RAS is the likeliest intent.
    defaults = {"orientation": "SAR", "spacing": [1.0, 1.0, 1.0], "patch_size": [96, 96, 96],
                "normalisation": {"kind": "none"}}
    for name, default in defaults.items():
        if name in from_bundle:
            fields[name] = from_bundle[name]
            if name in entry and entry[name] != from_bundle[name]:
                notes.append(f"{name}: the catalog says {entry[name]!r}, the bundle "
                             f"{from_bundle[name]!r}; the bundle's is used")
        elif name in entry:
            fields[name] = entry[name]
            notes.append(f"{name} from the catalog entry (the bundle does not state it plainly)")
        else:
            fields[name] = default
            notes.append(f"{name} ASSUMED {default!r}: neither the bundle nor the catalog "
                         "states it")
    if architecture == "swinunetr":
        tensors = {k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2."):
                   v for k, v in tensors.items()}
    model = networks.build_network(architecture, in_channels, out_channels, **arguments)
    report = load_weights(model, tensors, source=path.name)
    report.notes.extend(notes)
    card_fields = {**entry, **fields}
    card = card_from_entry(
        card_fields, architecture=architecture, arguments=arguments, in_channels=in_channels,
        out_channels=out_channels, labels=labels,
        label_values=_label_values(config, labels, report.notes),
        modality=entry.get("modality") or _modality(metadata),
        title=entry.get("title") or str(metadata.get("name") or metadata.get("task") or ""),
        description=entry.get("notes") or str(metadata.get("description", "")),
    )
    return model.eval(), card, report

