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
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import extract_member, nnunet_plans, read_member
from TransferSegLib.samples import sha256_of
from TransferSegLib.weights import ImportReport, load_weights

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
DEFAULT_CONFIGURATION = "3d_fullres"
MAX_JSON_BYTES = 64 * 2**20  # plans.json / dataset.json in a zip
MAX_CHECKPOINT_BYTES = 8 * 2**30
STEP_SIZE = 0.5  # nnU-Net's predictor: tiles overlap by half a patch
# What torch's restricted unpickler raises for a global outside the allowlist (the library
# imports no pickle module itself).
_REFUSED = torch.serialization.pickle.UnpicklingError


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


# --- the importer ------------------------------------------------------------------------------

def load_source(source: Source, entry: dict, configuration_name: str | None = None
                ) -> tuple[nn.Module, ModelCard, ImportReport]:
    """A network, card and report from the parts of an nnU-Net model."""
    where = source.name
    init = source.checkpoint.get("init_args") if isinstance(
        source.checkpoint.get("init_args"), dict) else {}
    name = configuration_name or init.get("configuration") or DEFAULT_CONFIGURATION
    config = nnunet_plans.configuration(source.plans, str(name), f"plans of {where}")
    patch = config.get("patch_size")
    if not isinstance(patch, list) or len(patch) != 3:
        raise InputError(f"{where}: configuration {name!r} is "
                         f"{len(patch) if isinstance(patch, list) else '?'}D; TransferSeg "
                         "imports 3D configurations only (3d_fullres, 3d_lowres).")
    architecture, arguments = nnunet_plans.architecture_of(config, f"plans of {where}")
    labels, notes = nnunet_plans.labels_of(source.dataset, f"dataset.json of {where}")
    channels = nnunet_plans.channels_of(source.dataset, f"dataset.json of {where}")
    transpose = [int(t) for t in source.plans.get("transpose_forward", [0, 1, 2])]
    if sorted(transpose) != [0, 1, 2]:
        raise ModelFileError(f"plans of {where}: transpose_forward {transpose} is not a "
                             "permutation of 0, 1, 2.")
    arguments["transpose"] = transpose
    arguments = networks.resolve_kwargs(architecture, **arguments)
    weights = source.checkpoint["network_weights"]
    tensors, dropped, unknown = nnunet_plans.convert(weights, len(arguments["features_per_stage"]))
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
    spacing = [float(v) for v in
               nnunet_plans.card_axes([float(s) for s in config["spacing"]], transpose)]
    patch_size = [int(v) for v in nnunet_plans.card_axes([int(p) for p in patch], transpose)]
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
        normalisation=nnunet_plans.normalisation_of(config, source.plans, len(channels),
                                                    f"plans of {where}"),
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

