"""The TransferSeg model file: one ``.safetensors`` file that carries everything to use a model.

The tensors are the network's ``state_dict``; the safetensors header metadata holds

- ``"format": "transferseg-model"`` and ``"format_version": "1"``,
- ``"transferseg.card"``: the :class:`ModelCard` as JSON (architecture and its arguments, label
  table, spacing, orientation, patch size, normalisation, lineage, training cases, metrics).

So a model file needs no side files, and the card can be read without the weights
(:func:`read_card`). Reading uses safetensors only: a model file can never run code.
Example name: ``liver-ct.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from TransferSegLib import __version__, networks
from TransferSegLib.errors import InputError, ModelFileError, TransferSegError
from TransferSegLib.files import atomic_output

FORMAT = "transferseg-model"
FORMAT_VERSION = "1"
CARD_KEY = "transferseg.card"
MAX_LABEL_VALUE = 65535  # label maps and Slicer's segmentation layers are at most 16-bit
MAX_PATCH_VOXELS = 512**3  # larger patches are a card error, not a network anyone trains


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelCard:
    """What a model is and how to use it; stored as JSON inside the model file.

    Axis orders follow ITK physical space: ``spacing`` and ``patch_size`` are (x, y, z), while
    tensors are (N, C, Z, Y, X). Equality after a JSON round trip holds for JSON-native values
    (lists, not tuples, in ``arguments``).
    """

    architecture: str  # a name from networks.architectures()
    in_channels: int  # image channels (modalities) the network reads
    out_channels: int  # logit channels, one per label including background
    labels: dict[int, str]  # output channel -> label name; channel 0 is the background
    spacing: list[float]  # voxel size the network was trained at, mm, (x, y, z)
    patch_size: list[int]  # training and sliding-window patch, voxels, (x, y, z)
    normalisation: dict[str, Any]  # {"kind": "ct", "window": [-1000, 1000]}, {"kind": "none"}
    arguments: dict[str, Any] = field(default_factory=dict)  # networks.resolve_kwargs(...)
    label_values: dict[str, int] = field(default_factory=dict)  # name -> voxel value written
    # label name -> Slicer's TerminologyEntry (coded concept, e.g. SNOMED CT), where known
    terminology: dict[str, str] = field(default_factory=dict)
    # Direction each voxel axis (x, y, z) points to, patient-based as in DICOM: "LPS" means x
    # grows toward the patient's left, y posterior, z superior (ITK's physical space). "" keeps
    # each scan's own voxel axes, as nnU-Net does.
    orientation: str = "LPS"
    modality: str = ""  # "CT", "MR", ...
    lineage: list[dict[str, Any]] = field(default_factory=list)  # base model and strategy/step
    # How to segment when not the default (MONAI tiling at the caller's overlap): nnU-Net's
    # {"tiling": "nnunet", "step_size": 0.5, "mirror_axes": [0, 1, 2], "crop_nonzero": true,
    # "accumulate": "float16"}.
    inference: dict[str, Any] = field(default_factory=dict)
    training_cases: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    title: str = ""
    description: str = ""
    created: str = field(default_factory=_now)  # ISO 8601, UTC
    transferseg_version: str = __version__

    def __post_init__(self) -> None:
        if not self.label_values and isinstance(self.labels, dict):
            # Default: a label map holds the channel index of each voxel's label.
            self.label_values = {name: index for index, name in self.labels.items()}

    def written_labels(self) -> dict[int, str]:
        """Output channel -> name of the labels a segmentation holds: not the background,
        nor labels the model only learns beside them (value 0, :mod:`TransferSegLib.context`)."""
        return {channel: name for channel, name in sorted(self.labels.items())
                if channel and self.label_values.get(name, channel)}

    def to_json(self) -> str:
        """The card as JSON text; raises :class:`ModelFileError` naming the first bad field."""
        checked = _validated(asdict(self), "the model card")
        checked["labels"] = {str(k): v for k, v in checked["labels"].items()}
        return json.dumps(checked)

    @classmethod
    def from_json(cls, text: str, source: str = "the model card") -> ModelCard:
        """Parse and validate a card; ``source`` (a file name) is named in every error."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as error:
            raise ModelFileError(
                f"The model card of {source} is not valid JSON ({error}); "
                "re-export or re-download the model."
            ) from None
        if not isinstance(data, dict):
            raise ModelFileError(f"The model card of {source} is not a JSON object; re-export it.")
        return cls(**_validated(data, f"the model card of {source}"))


# --- validation --------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be text")
    return value


def _positive_int(value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError("must be a positive whole number")
    return value


def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be a JSON object")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError("must hold only JSON values (text, numbers, lists, objects)") from None
    return value


def _three(kind: str, check: Any, convert: type) -> Any:
    def checked(value: Any) -> list:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ValueError(f"must be a list of 3 positive {kind} (x, y, z)")
        if not all(check(v) and v > 0 for v in value):
            raise ValueError(f"must be a list of 3 positive {kind} (x, y, z), not {value!r}")
        return [convert(v) for v in value]

    return checked


def _labels(value: Any) -> dict[int, str]:
    if not isinstance(value, dict) or not value:
        raise ValueError("must map output channel numbers to label names")
    labels: dict[int, str] = {}
    for key, name in value.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"has a channel {key!r} that is not a whole number") from None
        if isinstance(key, bool) or index < 0 or not isinstance(name, str) or not name:
            raise ValueError(f"has a bad entry {key!r}: {name!r}")
        labels[index] = name
    if len(set(labels.values())) != len(labels):
        raise ValueError("names a label twice")
    return dict(sorted(labels.items()))


def _label_values(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError("must map label names to voxel values")
    if not all(isinstance(k, str) and _is_int(v) and 0 <= v <= MAX_LABEL_VALUE
               for k, v in value.items()):
        raise ValueError(f"must map each label name to a voxel value 0..{MAX_LABEL_VALUE} "
                         "(what a label map or a Slicer segmentation stores)")
    written = [v for v in value.values() if v]  # 0: written as background (context labels)
    if len(set(written)) != len(written):
        raise ValueError("gives two labels the same voxel value")
    return dict(value)


def _terminology(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) < 2000 for k, v in value.items()):
        raise ValueError("must map label names to terminology entries (text)")
    return dict(value)


def _orientation(value: Any) -> str:
    if value == "":
        return value  # the scan's own voxel axes
    if not isinstance(value, str) or len(value) != 3:
        raise ValueError("must be three letters such as 'LPS'")
    axes = [{"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}.get(c) for c in value.upper()]
    if sorted(a for a in axes if a is not None) != [0, 1, 2]:
        raise ValueError(f"must take one letter from each of L/R, P/A, S/I, not {value!r}")
    return value.upper()


def _pair(value: Any, name: str, low: float = -math.inf, high: float = math.inf) -> None:
    if not isinstance(value, list) or len(value) != 2 or not all(map(_is_number, value)) or \
            not low <= value[0] < value[1] <= high:
        bounds = f" within {low:g}..{high:g}" if math.isfinite(low) else ""
        raise ValueError(f"must have '{name}' as two increasing numbers{bounds}, not {value!r}")


# kind -> the fields it may have (each checked below)
_RECIPE_FIELDS = {"ct": {"window", "scale", "mean", "std"},
                  "mr": {"percentiles", "output_mean", "output_std"},
                  "zscore": {"nonzero"}, "rescale": set(), "rgb": set(), "none": set(),
                  "channels": {"channels"}}


def _recipe(value: Any, nested: bool = False) -> dict[str, Any]:
    value = _json_object(value)
    kind = value.get("kind")
    if kind not in _RECIPE_FIELDS or (nested and kind == "channels"):
        raise ValueError(f"must have a 'kind' among {', '.join(_RECIPE_FIELDS)}, not {kind!r}")
    unknown = sorted(set(value) - _RECIPE_FIELDS[kind] - {"kind"})
    if unknown:
        raise ValueError(f"of kind {kind!r} has the unknown field {unknown[0]!r}")
    if "window" in value:
        _pair(value["window"], "window")
    if "percentiles" in value:
        _pair(value["percentiles"], "percentiles", 0, 100)
    for name in ("mean", "output_mean", "output_std"):
        if name in value and not _is_number(value[name]):
            raise ValueError(f"must have '{name}' a number, not {value[name]!r}")
    if "std" in value and not (_is_number(value["std"]) and value["std"] > 0):
        raise ValueError(f"must have 'std' a positive number, not {value['std']!r}")
    for name in ("scale", "nonzero"):
        if name in value and not isinstance(value[name], bool):
            raise ValueError(f"must have '{name}' true or false, not {value[name]!r}")
    if kind == "channels":
        if not isinstance(value["channels"], list) or not value["channels"]:
            raise ValueError("of kind 'channels' must list one recipe per input channel")
        value["channels"] = [_recipe(item, nested=True) for item in value["channels"]]
    return value


def _normalisation(value: Any) -> dict[str, Any]:
    return _recipe(value)


def _inference(value: Any) -> dict[str, Any]:
    value = _json_object(value)
    if value.get("tiling", "monai") not in ("monai", "nnunet"):
        raise ValueError("must have 'tiling' 'monai' or 'nnunet'")
    step = value.get("step_size", 0.5)
    if not _is_number(step) or not 0 < step <= 1:
        raise ValueError("must have a 'step_size' above 0 and at most 1")
    axes = value.get("mirror_axes", [])
    if not isinstance(axes, list) or not all(_is_int(a) and 0 <= a < 3 for a in axes) or \
            len(set(axes)) != len(axes):
        raise ValueError("must have 'mirror_axes' a list of distinct array axes 0, 1, 2")
    if not isinstance(value.get("crop_nonzero", False), bool):
        raise ValueError("must have 'crop_nonzero' true or false")
    if value.get("accumulate", "float32") not in ("float32", "float16"):
        raise ValueError("must have 'accumulate' 'float32' or 'float16'")
    if value.get("padding", "constant") not in ("constant", "edge"):
        raise ValueError("must have 'padding' 'constant' or 'edge'")
    return value


def _list_of(kind: str, check: Any) -> Any:
    def checked(value: Any) -> list:
        if not isinstance(value, list) or not all(check(v) for v in value):
            raise ValueError(f"must be a list of {kind}")
        return list(value)

    return checked


# Field -> check returning the value in its in-memory form; raises ValueError("must ...").
_CHECKS = {
    "architecture": _string,
    "in_channels": _positive_int,
    "out_channels": _positive_int,
    "labels": _labels,
    "spacing": _three("numbers (mm)", _is_number, float),
    "patch_size": _three("whole numbers (voxels)", _is_int, int),
    "normalisation": _normalisation,
    "arguments": _json_object,
    "label_values": _label_values,
    "terminology": _terminology,
    "orientation": _orientation,
    "modality": _string,
    "lineage": _list_of("JSON objects", _is_dict),
    "inference": _inference,
    "training_cases": _list_of("case names", lambda v: isinstance(v, str)),
    "metrics": _json_object,
    "title": _string,
    "description": _string,
    "created": _string,
    "transferseg_version": _string,
}


def _validated(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check every field of a card given as a dict; ``where`` names the card in errors."""
    unknown = [key for key in data if key not in _CHECKS]
    if unknown:
        raise ModelFileError(
            f"In {where}, field {unknown[0]!r} is unknown (made by a newer TransferSeg?); "
            "update TransferSeg or re-export the model."
        )
    required = [
        f.name for f in fields(ModelCard) if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ModelFileError(f"In {where}, required field {missing[0]!r} is missing; re-export it.")
    checked: dict[str, Any] = {}
    for key, value in data.items():
        try:
            checked[key] = _CHECKS[key](value)
        except ValueError as error:
            raise ModelFileError(
                f"In {where}, field {key!r} {error}; re-export or re-download the model."
            ) from None
    _check_consistency(checked, where)
    return checked


def _check_consistency(card: dict[str, Any], where: str) -> None:
    """Checks across fields: known architecture and arguments, one label per output channel."""
    if card["architecture"] not in networks.architectures():
        raise ModelFileError(
            f"{where[0].upper()}{where[1:]} names unknown architecture {card['architecture']!r}; "
            f"known: {', '.join(networks.architectures())}. Update TransferSeg."
        )
    try:
        networks.resolve_kwargs(card["architecture"], **card.get("arguments", {}))
    except InputError as error:
        raise ModelFileError(f"In {where}, field 'arguments' is invalid: {error}") from None
    patch = card["patch_size"]
    if patch[0] * patch[1] * patch[2] > MAX_PATCH_VOXELS:
        raise ModelFileError(
            f"In {where}, field 'patch_size' {patch} is more than {MAX_PATCH_VOXELS:,} voxels; "
            "no network is trained or run on patches that large. Fix the card.")
    recipe = card["normalisation"]
    if recipe["kind"] == "channels" and len(recipe["channels"]) != card["in_channels"]:
        raise ModelFileError(
            f"In {where}, field 'normalisation' lists {len(recipe['channels'])} channel "
            f"recipes for {card['in_channels']} input channel(s); re-export the model.")
    count = card["out_channels"]  # compared by length first: a hostile count may be 2**40
    if len(card["labels"]) != count or sorted(card["labels"]) != list(range(count)):
        raise ModelFileError(
            f"In {where}, field 'labels' must name each output channel 0..{count - 1} "
            f"once, not {sorted(card['labels'])[:20]}; re-export the model."
        )
    unknown = sorted(set(card.get("terminology") or {}) - set(card["labels"].values()))
    if unknown:
        raise ModelFileError(
            f"In {where}, field 'terminology' names {unknown[0]!r}, which is not one of the "
            "model's labels; re-export the model.")
    values = card.get("label_values")
    if values and set(values) != set(card["labels"].values()):
        raise ModelFileError(
            f"In {where}, field 'label_values' must give a voxel value for exactly the labels "
            f"{sorted(card['labels'].values())}; re-export the model."
        )


# --- saving and loading ------------------------------------------------------------------------

def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as independent, contiguous CPU tensors (safetensors refuses shared or
    strided storage; cloning every entry also unties tied weights, which load back equal)."""
    tensors = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TransferSegError(
                f"Cannot save the model: its state {key!r} is not a tensor; this is a bug."
            )
        tensors[key] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return tensors


# Besides InputError, MONAI's constructors refuse impossible arguments with these: an even
# kernel size raises NotImplementedError (a RuntimeError), a negative channel count
# RuntimeError, zero attention heads ZeroDivisionError.
_BUILD_ERRORS = (InputError, RuntimeError, ZeroDivisionError, KeyError, IndexError)


class _SmallTablesOnCPU(TorchFunctionMode):
    """Inside ``torch.device("meta")``: ``arange``, ``linspace`` and ``logspace`` still make
    real CPU tensors, because constructors read them (Swin UNETR's drop-path rates with
    ``.item()``, its relative-position tables). They are as small as the network's
    hyper-parameters, never as its weights."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.arange, torch.linspace, torch.logspace):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _reference_network(card: ModelCard) -> nn.Module:
    """The network the card describes, on the meta device: its shapes without its memory, so
    a card asking for a huge network over a small file allocates nothing."""
    with torch.device("meta"), _SmallTablesOnCPU():
        return networks.build_network(card.architecture, card.in_channels, card.out_channels,
                                      **card.arguments)


def _mismatch(expected: dict[str, tuple], actual: dict[str, tuple]) -> str:
    """One phrase naming the first difference between two {key: shape} maps, or ''."""
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    shapes = [k for k in expected if k in actual and expected[k] != actual[k]]
    if missing:
        return f"{len(missing)} tensors missing (first {missing[0]!r})"
    if extra:
        return f"{len(extra)} unexpected tensors (first {extra[0]!r})"
    if shapes:
        key = shapes[0]
        return f"{key!r} has shape {list(actual[key])}, the card's network {list(expected[key])}"
    return ""


def save_model(
    path: str | os.PathLike, model: nn.Module, card: ModelCard, overwrite: bool = False
) -> Path:
    """Write ``model``'s weights and ``card`` to one safetensors file at ``path``; return it.

    The card is validated and checked against the model (same tensor names and shapes as the
    network it describes) before anything is written. The file appears complete or not at all;
    an existing ``path`` raises :class:`OutputExistsError` unless ``overwrite``.
    """
    card_json = card.to_json()
    tensors = _state_tensors(model)
    expected = {k: tuple(v.shape) for k, v in _reference_network(card).state_dict().items()}
    difference = _mismatch(expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if difference:
        raise ModelFileError(
            f"Not saving {path}: the model is not the {card.architecture} its card describes "
            f"({difference}); fix the card's architecture, channels or arguments."
        )
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, CARD_KEY: card_json}
    with atomic_output(path, overwrite) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return Path(path)


def _corrupt(path: Path, error: BaseException) -> ModelFileError:
    return ModelFileError(
        f"{path} is not a complete TransferSeg model file (truncated or corrupt): {error}; "
        "re-export or re-download it."
    )


def _read(path: str | os.PathLike, with_tensors: bool) -> tuple[dict[str, str], dict]:
    """The header metadata and (if asked) the tensors of a safetensors file, on the CPU."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ModelFileError(f"Model file {path} is not a regular file (a folder, pipe or "
                             "device); give the .safetensors file.")
    if not path.is_file():
        raise ModelFileError(f"Model file {path} does not exist; check the path or fetch it again.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        with open(path, "rb") as handle:
            start = handle.read(4)
        if start.startswith((b"PK\x03\x04", b"\x80")):  # a zip (torch.save) or a raw pickle
            raise ModelFileError(
                f"{path} is a PyTorch (pickle) file named .safetensors, not a TransferSeg model "
                "file; import it as foreign weights (transferseg models import), which reads it "
                "without running code."
            ) from None
        raise _corrupt(path, error) from None
    return metadata, tensors


def _card(metadata: dict[str, str], path: Path) -> ModelCard:
    if metadata.get("format") != FORMAT or CARD_KEY not in metadata:
        raise ModelFileError(
            f"{path} holds weights but no TransferSeg model card; "
            "import it as foreign weights or re-export it from TransferSeg."
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} is in TransferSeg model format version {version!r}, this TransferSeg reads "
            f"version {FORMAT_VERSION}; update TransferSeg."
        )
    return ModelCard.from_json(metadata[CARD_KEY], source=str(path))


def read_card(path: str | os.PathLike) -> ModelCard:
    """The model card of the file at ``path``, reading only its header (fast for big models)."""
    metadata, _ = _read(path, with_tensors=False)
    return _card(metadata, Path(path))


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """The network in the file at ``path``, in eval mode on ``device``, and its card.

    Every problem with the file (missing, truncated, no or bad card, weights that do not fit
    the card's network) raises :class:`ModelFileError` naming the file.
    """
    metadata, tensors = _read(path, with_tensors=True)
    card = _card(metadata, Path(path))
    try:
        # Shapes first, on the meta device: a card asking for a huge network whose weights
        # the file does not hold must not allocate it.
        reference = _reference_network(card).state_dict()
        expected = {k: tuple(v.shape) for k, v in reference.items()}
    except _BUILD_ERRORS as error:
        raise ModelFileError(
            f"The model card of {path} describes no buildable network: {error}"
        ) from None
    difference = _mismatch(expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if difference:
        raise ModelFileError(
            f"The weights in {path} do not fit the {card.architecture} its card describes "
            f"({difference}); re-export or re-download it."
        )
    _check_values(tensors, {k: v.is_floating_point() for k, v in reference.items()}, path)
    model = networks.build_network(
        card.architecture, card.in_channels, card.out_channels, **card.arguments
    )
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), card


def _check_values(tensors: dict[str, torch.Tensor], floating: dict[str, bool],
                  path: str | os.PathLike) -> None:
    """Refuse weights that would silently give garbage: integer or boolean tensors where the
    card's network holds floating-point ones (``floating``: key -> whether it does), and NaN or
    infinite values."""
    for key, value in tensors.items():
        if not floating.get(key, True):
            continue  # an integer buffer of the network (counters, index tables)
        if not value.is_floating_point():
            raise ModelFileError(
                f"The weights in {path} hold {key} as {str(value.dtype).replace('torch.', '')}, "
                "not floating point; the file is damaged or was not written by TransferSeg.")
        if not bool(torch.isfinite(value).all()):
            raise ModelFileError(
                f"The weights in {path} hold NaN or infinite values (first in {key}); the model "
                "is broken (a training that diverged?): use an earlier model file.")
