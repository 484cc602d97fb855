"""What to train: :func:`finetune` (a base model and a dataset -> a training run, with the
new model's card, head surgery and the transfer plan of the strategy) and :func:`pretrain`
(a base from several partially labelled datasets, optionally one head per dataset). Patch
checks and the modality and spacing rules of the new card live here too; the loop itself is
:func:`TransferSegLib.training.run_training`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from TransferSegLib import events as ev
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.datasets import Dataset
from TransferSegLib.errors import InputError
from TransferSegLib.preprocess import channel_recipe
from TransferSegLib.sampling import LabelledCase, labelled_cases, median_spacing, split_cases
from TransferSegLib.training import Events, TrainConfig, TrainResult, run_training


def finetune(
    base: Path | None,
    data: Path | Dataset,
    out_dir: Path,
    strategy: str = "finetune",
    config: TrainConfig | None = None,
    *,
    val_data: Path | Dataset | None = None,
    labels: Sequence[str] | None = None,
    architecture: str | None = None,
    arguments: dict | None = None,
    patch_size: Sequence[int] | None = None,
    events: Events = lambda event: None,
    resume: bool = False,
    overwrite: bool = False,
    cancel_file: Path | None = None,
    terminology: Mapping[str, str] | None = None,
) -> TrainResult:
    """Make a model for the labels of ``data`` (a dataset path, or a
    :class:`~TransferSegLib.datasets.Dataset` made in memory) from the base model file ``base``.

    ``strategy`` is one of :data:`TransferSegLib.transfer.STRATEGIES`; ``scratch`` uses only
    the base model's architecture and settings (or ``architecture``/``arguments`` without a
    base). The new model's labels are the dataset's (or ``labels``, a subset, in that order).
    ``patch_size`` (voxels, x y z) replaces the base's training and inference patch, e.g. a
    smaller one to fit a published model's training into a small GPU or a CPU.
    ``terminology`` (label name -> Slicer ``TerminologyEntry``) goes into the new model's card
    beside the base's entries for the labels they share.
    """
    from TransferSegLib import context, datasets, transfer
    from TransferSegLib.checkpoint import load_model
    from TransferSegLib.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        raise InputError(
            f"Unknown transfer strategy {strategy!r}; known: {', '.join(STRATEGIES)}.")
    config = (config or TrainConfig()).for_strategy(strategy)
    events = _rank_zero(events)
    if strategy == "two-stage" and not config.patience:
        config = replace(config, patience=2)  # the second stage starts on a plateau
        events(ev.message("two-stage: unfreezing after 2 validations without improvement "
                          "(set --patience to change)"))
    dataset = data if isinstance(data, datasets.Dataset) else datasets.discover(data)
    where = str(dataset.source or data)
    cases = labelled_cases(dataset, where)
    if val_data is not None:
        held = val_data if isinstance(val_data, datasets.Dataset) else datasets.discover(val_data)
        val_cases = labelled_cases(held, str(held.source or val_data))
    else:
        cases, val_cases, _ = split_cases(cases, config.seed)
    names = list(labels) if labels else list(dataset.labels.foreground.values())
    unknown = [n for n in names if n not in dataset.labels.names.values()]
    if unknown:
        raise InputError(f"Labels {unknown} are not in dataset {where}; it has "
                         f"{list(dataset.labels.foreground.values())}.")
    if labels:  # a chosen subset: the dataset's other labels become background
        for item in (*cases, *val_cases):
            item.others_background = True
    if base is not None:
        base_model, base_card = load_model(base)
    elif strategy == "scratch" and architecture:
        base_model, base_card = None, None
    else:
        raise InputError(f"Strategy {strategy!r} needs a base model (--base MODEL).")
    in_channels = len(dataset.channels) or len(cases[0].case.images)
    spacing = median_spacing(cases[:5])
    extra = (context.extra_labels(base_card, names)
             if config.base_labels != "drop" and strategy != "scratch" else [])
    target = {0: "background", **{i + 1: n for i, n in enumerate([*names, *extra])}}
    card = _target_card(base_card, target, dataset, in_channels, architecture, arguments,
                        cases, spacing, strategy, base, config)
    why_not = context.unusable(base_card, card) if extra else ""
    if why_not:
        events(ev.message(f"the base's other labels are dropped: {why_not}, so it cannot "
                          "label the scans"))
        extra, target = [], {0: "background", **{i + 1: n for i, n in enumerate(names)}}
        card = _target_card(base_card, target, dataset, in_channels, architecture, arguments,
                            cases, spacing, strategy, base, config)
    if extra:
        card = _with_base_labels(card, extra, config.base_labels)
    if patch_size is not None:
        card = replace(card, patch_size=_checked_patch(card, patch_size))
    elif base_card is not None:
        chosen = context_patch(card, cases)
        if chosen is not None and chosen != list(card.patch_size):
            events(ev.message(
                f"patch {' x '.join(map(str, chosen))} voxels: the training scans' extent at "
                f"the model's spacing (the base's {' x '.join(map(str, card.patch_size))}; "
                "--patch to choose)"))
            card = replace(card, patch_size=chosen)
        if chosen is not None and channel_recipe(card.normalisation, 0).get("kind") == "ct":
            # Patches of whole training scans teach their framing as well: a scan framed
            # otherwise (a wider field of view, the table, the arms) is segmented inside the
            # patient's body only (inference.body_box; bench/README.md, "Framing").
            card = replace(card, inference={**card.inference, "crop_body": True})
    if config.largest_component:
        single = one_piece_labels(cases, names)
        if single:
            card = replace(card, inference={**card.inference, "largest_component": single})
            events(ev.message(f"{', '.join(single)}: one piece in every training scan, so "
                              "segmentations keep only the largest piece of each"))
    if terminology:
        card = replace(card, terminology={**card.terminology, **{
            name: entry for name, entry in terminology.items()
            if name in card.labels.values() and entry}})
    ratio = max(s / m for s, m in zip(spacing, card.spacing, strict=True))
    if card.modality != (base_card.modality if base_card else card.modality):
        events(ev.message(
            f"cross-modality transfer ({base_card.modality} base, {card.modality} data): "
            f"intensities normalised as {card.normalisation['kind']}"))
    if ratio > 2 or ratio < 0.5:
        events(ev.message(
            f"the data's voxels ({' x '.join(f'{s:.2g}' for s in spacing)} mm) differ from "
            f"the model's ({' x '.join(f'{s:.2g}' for s in card.spacing)} mm): cases are "
            "resampled to the model's spacing"))
    plan = transfer.prepare(
        strategy, card.architecture, card.arguments, base_model, base_card, target,
        in_channels, lr=config.lr, head_lr_factor=config.head_lr_factor,
        freeze_depth=config.freeze_depth if strategy in ("finetune", "two-stage") else None,
        seed=config.seed,
    )
    if extra:
        channel_of = {name: channel for channel, name in card.labels.items()}
        plan.context = context.BaseContext(
            base_model, base_card,
            {c: channel_of[name] for c, name in base_card.labels.items() if name in extra},
            config.device, config.val_overlap)
        shown = "written as background" if config.base_labels == "context" else "segmented too"
        events(ev.message(f"the base's {len(extra)} other labels are kept, learnt from its own "
                          f"predictions on the training scans ({shown})"))
    if val_data is None and len(val_cases) and val_cases[0] is cases[0]:
        events(ev.message("fewer than 3 labelled cases: validation uses the training cases"))
    return run_training(plan, card, cases, val_cases, config, out_dir, events, resume, overwrite,
                        cancel_file)


# The most voxels a fine-tuning patch grows to from a small base patch (CPU-sized: a step of
# the shipped CT base at 96 x 80 x 32 takes ~0.4 s on 2 cores).
CONTEXT_VOXELS = 96 * 96 * 48


def context_patch(card: ModelCard, cases: Sequence[LabelledCase]) -> list[int] | None:
    """The fine-tuning patch (voxels, x y z) that shows the network the training scans whole:
    per axis the largest extent of the cases on the model's grid, rounded up to the network's
    divisor (at least twice the divisor, or the base's size where that is smaller). If that
    exceeds ``max(base patch voxels, CONTEXT_VOXELS)``, the longest axis (of two as long, the
    later: z before y before x) is shortened one divisor at a time until it fits. None (keep
    the base's patch) for networks that take one input size only or give a smaller output
    than their input.

    Why: a model fine-tuned on one scan learns from where an organ lies as much as from how it
    looks; in 48^3 patches at 4 mm (19 cm) the spleen and the liver look alike and the side of
    the body is not in view (bench/README.md: mean held-out Dice over three seeds of scratch
    0.157 -> 0.281 and of finetune 0.201 -> 0.264 on liver, spleen and stomach when the patch
    covers the scan).
    """
    from TransferSegLib import isolation, networks

    if networks.fixed_input_size(card.architecture, card.arguments) is not None or \
            networks.output_size(card.architecture, card.arguments,
                                 list(reversed(card.patch_size))) is not None:
        return None
    divisor = networks.patch_divisor(card.architecture, card.arguments)
    sizes = isolation.call(_model_sizes, [item.case.image for item in cases[:8]], card.spacing,
                           card.orientation, what="the training scans")["size"]
    extent = [int(v) for v in sizes.max(axis=0)]
    base = [int(v) for v in card.patch_size]
    floors = [min(b, 2 * divisor) for b in base]
    patch = [max(f, -(-e // divisor) * divisor) for e, f in zip(extent, floors, strict=True)]
    budget = max(base[0] * base[1] * base[2], CONTEXT_VOXELS)
    while patch[0] * patch[1] * patch[2] > budget:
        axis = max((a for a in range(3) if patch[a] - divisor >= floors[a]),
                   key=lambda a: (patch[a], a), default=None)
        if axis is None:
            return base
        patch[axis] -= divisor
    return patch


def one_piece_labels(cases: Sequence[LabelledCase], names: Sequence[str]) -> list[str]:
    """Those of ``names`` that are one connected piece (26-connected) in every training case
    that draws them (at least one does; at most 8 cases are read).

    Why: a model trained on one scan of the abdomen finds the liver in a scan of the chest and
    neck too, in the heart and the shoulders, as pieces apart from the organ (bench/README.md,
    "One piece"). An organ drawn as one piece in every training scan is one piece in a new
    scan; a label drawn in several pieces somewhere (lesions, vertebrae) keeps all of its own.
    """
    from TransferSegLib import isolation

    found: dict[str, list[int]] = {name: [] for name in names}
    for item in cases[:8]:
        drawn = item.case.annotated if item.case.annotated is not None else set(names)
        values = {name: item.table.value(name) for name in names
                  if name in drawn and name in item.table.names.values()}
        if values:
            pieces = isolation.call(_pieces, item.case.label, list(values.values()),
                                    what=f"the label map {item.case.label}")["pieces"]
            for name, count in zip(values, pieces, strict=True):
                if count:
                    found[name].append(int(count))
    return [name for name in names if found[name] and all(c == 1 for c in found[name])]


def _pieces(path: Path, values: Sequence[int]) -> dict[str, np.ndarray]:
    """How many 26-connected pieces each label value has in the label map ``path``."""
    from scipy import ndimage

    from TransferSegLib.isolation import sitk
    from TransferSegLib.volumes import read_label

    array = sitk.GetArrayFromImage(read_label(path))  # a copy: a view dies with its image
    return {"pieces": np.array([ndimage.label(array == value, np.ones((3, 3, 3), bool))[1]
                                for value in values], np.int64)}


def _model_sizes(paths: Sequence[Path], spacing: Sequence[float], orientation: str
                 ) -> dict[str, np.ndarray]:
    """Each scan's size (voxels, x y z) on the model's grid."""
    from TransferSegLib.preprocess import model_grid
    from TransferSegLib.volumes import read_volume

    return {"size": np.array([model_grid(read_volume(path), spacing, orientation).size
                              for path in paths], np.int64)}


def _checked_patch(card: ModelCard, patch_size: Sequence[int]) -> list[int]:
    """``patch_size`` if the card's network accepts it, else a clear error."""
    from TransferSegLib import networks

    patch = [int(v) for v in patch_size]
    divisor = networks.patch_divisor(card.architecture, card.arguments)
    fixed = networks.fixed_input_size(card.architecture, card.arguments)
    if len(patch) != 3 or any(v < 1 or v % divisor for v in patch):
        raise InputError(f"The patch {patch} does not fit the {card.architecture}: give three "
                         f"sizes, each a multiple of {divisor}.")
    if fixed is not None and list(reversed(patch)) != fixed:
        raise InputError(f"The {card.architecture} only takes patches of "
                         f"{list(reversed(fixed))} voxels.")
    if fixed is None and divisor > 1 and all(v == divisor for v in patch):
        # the deepest feature map would be one voxel, which instance norm cannot train on
        raise InputError(f"The patch {patch} is too small for the {card.architecture}: make at "
                         f"least one size {2 * divisor} or more.")
    networks.output_size(card.architecture, card.arguments, patch)  # valid-conv: checks it
    return patch


def _rank_zero(events: Events) -> Events:
    """``events`` for rank 0 only: other ranks of a torchrun job stay silent."""
    from TransferSegLib import distributed

    return events if distributed.rank() == 0 else (lambda event: None)


def _modality(name: str) -> str:
    """'CT', 'MR' or '' (unknown), from the many spellings datasets use."""
    name = (name or "").strip().upper()
    return "MR" if name.startswith("MR") or name in ("T1", "T2", "FLAIR", "T1W", "T2W") \
        else "CT" if name.startswith("CT") else name


def _target_card(base_card, target, dataset, in_channels, architecture, arguments, cases,
                 spacing, strategy, base, config) -> ModelCard:
    from TransferSegLib import networks, resources
    from TransferSegLib.preprocess import default_normalisation

    value_of = {name: value for value, name in dataset.labels.names.items()}
    label_values = {name: value_of.get(name, channel) for channel, name in target.items()}
    if base_card is not None:
        data = asdict(base_card)
        data.update(labels=target, out_channels=len(target), label_values=label_values,
                    terminology={name: entry for name, entry in base_card.terminology.items()
                                 if name in target.values()},
                    in_channels=in_channels, metrics={  # the base's GPU need, until measured
                        k: v for k, v in base_card.metrics.items()
                        if k in resources.TRAINING_KEYS}, created=ModelCard.__dataclass_fields__[
                        "created"].default_factory())
        if _modality(dataset.modality) and _modality(dataset.modality) != _modality(
                base_card.modality):
            # Cross-modality transfer: the data's intensities follow their own recipe.
            data.update(modality=_modality(dataset.modality),
                        normalisation=default_normalisation(_modality(dataset.modality)))
        lineage = list(base_card.lineage)
    else:
        modality = dataset.modality or "CT"
        arguments = networks.resolve_kwargs(architecture, **(arguments or {}))
        data = dict(architecture=architecture, arguments=arguments, in_channels=in_channels,
                    out_channels=len(target), labels=target, label_values=label_values,
                    spacing=spacing, patch_size=[64, 64, 64],
                    normalisation=default_normalisation(modality), modality=modality)
        lineage = []
    lineage.append({"strategy": strategy, "base": str(base) if base else None,
                    "steps": config.steps, "data": str(dataset.source),
                    "freeze_depth": config.freeze_depth, "lr": config.lr,
                    "head_lr_factor": config.head_lr_factor, "warmup": config.warmup})
    # Trained on edge-padded patches (sampling.sample_patch): inference pads the same way.
    data.update(lineage=lineage, training_cases=[c.case.name for c in cases],
                inference={**data.get("inference", {}), "padding": "edge"})
    return ModelCard(**data)


def _with_base_labels(card: ModelCard, extra: Sequence[str], mode: str) -> ModelCard:
    """``card`` with the base's ``extra`` labels written as background (``context``) or as
    values of their own above the user's (``keep``), and the mode in its lineage."""
    values = dict(card.label_values)
    top = max((v for n, v in values.items() if n not in extra), default=0)
    for index, name in enumerate(extra):
        values[name] = 0 if mode == "context" else top + 1 + index
    lineage = [*card.lineage[:-1], {**card.lineage[-1], "base_labels": mode}]
    return replace(card, label_values=values, lineage=lineage)


def pretrain(
    data: Sequence[Path],
    out_dir: Path,
    config: TrainConfig | None = None,
    *,
    architecture: str = "unet",
    arguments: dict | None = None,
    spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] = (64, 64, 64),
    modality: str | None = None,
    heads: str = "shared",
    hold_out: bool = True,
    title: str = "",
    description: str = "",
    events: Events = lambda event: None,
    resume: bool = False,
    overwrite: bool = False,
    cancel_file: Path | None = None,
) -> TrainResult:
    """Train a base model on one or several datasets whose label sets differ.

    ``hold_out``: validate on 20% of each dataset's cases (with 3 or more); False validates on
    the training cases themselves (when every case is too precious to hold out). ``title`` and
    ``description`` go into the model card.

    ``heads="shared"`` (partial labels): one output head whose labels are the union of the
    datasets' label names; each case is annotated only for its own dataset's labels (or the
    CSV's ``annotated`` column), so an organ one dataset does not draw is never taught as
    background. ``heads="per-dataset"`` (Med3D's multi-domain co-training): a shared network
    with one output head per dataset, each trained on its own dataset's cases and labels only;
    every head is written as a model file (see :func:`train`).
    """
    from TransferSegLib import datasets, multihead, networks, transfer
    from TransferSegLib.preprocess import default_normalisation

    if heads not in ("shared", "per-dataset"):
        raise InputError(f"heads must be 'shared' or 'per-dataset', not {heads!r}.")
    config = (config or TrainConfig()).for_strategy("scratch")
    cases: list[LabelledCase] = []
    names: list[str] = []
    label_sets: list[dict[int, str]] = []
    head_names: list[str] = []
    for index, path in enumerate(data):
        dataset = datasets.discover(path)
        labelled = labelled_cases(dataset, str(path))
        for item in labelled:
            item.head = index if heads == "per-dataset" else 0
        cases += labelled
        names += [n for n in dataset.labels.foreground.values() if n not in names]
        label_sets.append({0: "background", **{i + 1: n for i, n in enumerate(
            dataset.labels.foreground.values())}})
        folder = Path(path) if Path(path).is_dir() else Path(path).parent  # a CSV: its folder
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.resolve().name).strip("-") or "data"
        head_names.append(stem if stem not in head_names else f"{stem}{index}")
        modality = modality or dataset.modality
    # Split per dataset, so every head keeps validation cases of its own.
    groups = [[c for c in cases if c.head == k] for k in range(max(c.head for c in cases) + 1)]
    splits = [split_cases(group, config.seed) if hold_out else (group, group, False)
              for group in groups]
    cases = [c for train_part, _, _ in splits for c in train_part]
    val_cases = [c for _, val_part, _ in splits for c in val_part]
    target = {0: "background", **{i + 1: n for i, n in enumerate(names)}}
    arguments = networks.resolve_kwargs(architecture, **(arguments or {}))
    modality = modality or "CT"
    card = ModelCard(
        architecture=architecture, arguments=arguments, in_channels=1,
        out_channels=len(target), labels=target,
        spacing=list(spacing) if spacing else median_spacing(cases[:5]),
        patch_size=list(patch_size), normalisation=default_normalisation(modality),
        modality=modality, training_cases=[c.case.name for c in cases],
        lineage=[{"strategy": "pretrain", "data": [str(p) for p in data],
                  "steps": config.steps}],
        title=title, description=description,
        inference={"padding": "edge"},  # as its training patches (sampling.sample_patch)
    )
    card = replace(card, patch_size=_checked_patch(card, patch_size))
    if heads == "shared":
        plan = transfer.prepare("scratch", architecture, arguments, None, None, target, 1,
                                lr=config.lr, seed=config.seed)
        return run_training(plan, card, cases, val_cases, config, out_dir, events, resume,
                       overwrite, cancel_file)
    cards = []
    for k, (labels, name) in enumerate(zip(label_sets, head_names, strict=True)):
        head_card = asdict(card)
        head_card.update(labels=labels, out_channels=len(labels), label_values={},
                         training_cases=[c.case.name for c in cases if c.head == k])
        head_card["lineage"] = [dict(card.lineage[0], heads=head_names, head=name)]
        cards.append(ModelCard(**head_card))
    plan = multihead.prepare_multihead(architecture, arguments, 1, label_sets, head_names,
                                      lr=config.lr, seed=config.seed)
    return run_training(plan, cards[0], cases, val_cases, config, out_dir, events, resume,
                   overwrite, cancel_file, cards=cards)

