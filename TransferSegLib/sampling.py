"""The training data in model space: cases prepared (resampled, normalised, labels mapped to
channels) and cached, patches drawn with foreground oversampling, augmentation, and the
train/validation split. Used by the loop in :mod:`TransferSegLib.training`.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from TransferSegLib import isolation, preprocess
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.datasets import Case, LabelTable
from TransferSegLib.errors import InputError
from TransferSegLib.losses import IGNORE  # target of padding voxels: not in the loss


@dataclass
class PreparedCase:
    """A case in model space: image (C, Z, Y, X) float32, target (Z, Y, X) int16 of channel
    indices, the channels annotated in it (bool, (out_channels,)), and its foreground voxels
    per channel (flat indices), for class-balanced patch sampling."""

    name: str
    image: np.ndarray
    target: np.ndarray
    annotated: np.ndarray
    foreground: dict[int, np.ndarray]  # annotated channel -> flat indices of its voxels

    @property
    def nbytes(self) -> int:
        return (self.image.nbytes + self.target.nbytes
                + sum(v.nbytes for v in self.foreground.values()))


def channel_map(card: ModelCard, table: LabelTable, source: str,
                others_background: bool = False) -> dict[int, int]:
    """Dataset label value -> model output channel, matched by label name.

    Labels the model lacks are an error, or background with ``others_background`` (when the
    user chose to learn a subset of the dataset's labels).
    """
    channel_of = {name: channel for channel, name in card.labels.items()}
    mapping = {}
    for value, name in table.names.items():
        if value == table.ignore_value:
            mapping[value] = IGNORE
        elif name not in channel_of and others_background:
            mapping[value] = 0
        elif name not in channel_of:
            raise InputError(
                f"Label {name!r} (value {value}) of {source} is not among the model's labels "
                f"({', '.join(card.labels.values())}); add it with --labels or rename it."
            )
        else:
            mapping[value] = channel_of[name]
    return mapping


def prepare_case(case: Case, table: LabelTable, card: ModelCard,
                 others_background: bool = False, body_crop: bool = False) -> PreparedCase:
    """Read ``case``, take it to the model's space and map its labels to output channels.

    ``others_background``: labels the model does not have count as background. Voxels of the
    table's ``ignore`` label get the target :data:`IGNORE`: no loss, no validation score.
    ``body_crop``: a CT cut to the patient's body first (:func:`inference.body_box`), so a
    model whose card crops to the body is validated on the very input ``segment`` gives it
    (windows moved by a few voxels can change its answer); labels outside the
    box, none in a CT of a body, are not scored. Read in a short-lived child process where
    :func:`isolation.separate` (the training process never loads SimpleITK).
    """
    arrays = isolation.call(_prepared_arrays, case, table, card, others_background, body_crop,
                            what=f"case {case.name} ({case.image})")
    foreground = {int(key.removeprefix("foreground_")): value
                  for key, value in arrays.items() if key.startswith("foreground_")}
    return PreparedCase(case.name, arrays["image"], arrays["target"], arrays["annotated"],
                        foreground)


def _prepared_arrays(case: Case, table: LabelTable, card: ModelCard,
                     others_background: bool, body_crop: bool = False) -> dict[str, np.ndarray]:
    images, label = case.load(table)
    if len(images) != card.in_channels:
        raise InputError(
            f"Case {case.name} has {len(images)} image channel(s); the model takes "
            f"{card.in_channels}."
        )
    if body_crop:
        from TransferSegLib.inference import body_box

        box = body_box(images[0])
        if box is not None:
            images, label = [image[box] for image in images], label[box]
    arrays, grid = [], None
    for channel, image in enumerate(images):
        array, grid = preprocess.to_model_space(image, card.spacing, card.normalisation,
                                                card.orientation, channel)
        arrays.append(array)
    values = preprocess.label_to_model_space(label, grid)
    mapping = channel_map(card, table, str(case.label), others_background)
    lookup = np.zeros(int(values.max()) + 1, np.int16)
    for value, channel in mapping.items():
        if value < lookup.size:
            lookup[value] = channel
    target = lookup[values]
    annotated_names = case.annotated if case.annotated is not None else set(table.names.values())
    annotated = np.zeros(card.out_channels, bool)
    annotated[0] = True
    for name in annotated_names:
        if mapping[table.value(name)] != IGNORE:
            annotated[mapping[table.value(name)]] = True
    annotated[0] = True
    return {"image": np.stack(arrays), "target": target, "annotated": annotated,
            **{f"foreground_{int(c)}": np.flatnonzero(target == c) for c in np.unique(target)
               if c > 0 and annotated[c]}}


class CaseCache:
    """Prepared cases kept in memory up to ``budget`` bytes (least recently used go first)."""

    def __init__(self, loader: Callable[[int], PreparedCase], count: int, budget: float):
        self.loader, self.count, self.budget = loader, count, budget
        self._cases: OrderedDict[int, PreparedCase] = OrderedDict()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> PreparedCase:
        if index in self._cases:
            self._cases.move_to_end(index)
            return self._cases[index]
        case = self.loader(index)
        self._cases[index] = case
        while len(self._cases) > 1 and sum(c.nbytes for c in self._cases.values()) > self.budget:
            self._cases.popitem(last=False)
        return case


def sample_patch(
    case: PreparedCase, patch: Sequence[int], rng: np.random.Generator, foreground: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A patch (C, *patch) and its target (*patch) from ``case``; ``patch`` is (Z, Y, X).

    Centred near a voxel of a random annotated foreground class when ``foreground`` (classes
    drawn with equal chance, so small organs are seen as often as large ones), else anywhere.
    Parts outside the volume are padded: the image by repeating its edge voxels (as inference
    pads a volume thinner than a patch), the target with IGNORE (no loss there).
    """
    shape = np.array(case.target.shape)
    size = np.array(patch)
    if foreground and case.foreground:
        voxels = case.foreground[sorted(case.foreground)[rng.integers(len(case.foreground))]]
        centre = np.array(np.unravel_index(voxels[rng.integers(voxels.size)],
                                           case.target.shape))
        start = centre - size // 2 + rng.integers(-(size // 4), size // 4 + 1)
    else:
        start = np.array([rng.integers(min(0, s - p), max(0, s - p) + 1)
                          for s, p in zip(shape, size, strict=True)])
    start = np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
    target = np.full(tuple(size), IGNORE, np.int16)
    src = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, size, shape,
                                                                   strict=True))
    dst = tuple(slice(max(a, 0) - a, min(a + p, s) - a) for a, p, s in zip(start, size, shape,
                                                                            strict=True))
    target[dst] = case.target[src]
    image = np.array(case.image[(slice(None), *src)], np.float32)  # a copy: the cache stays
    pad = [(0, 0)] + [(d.start, p - d.stop) for d, p in zip(dst, size, strict=True)]
    if any(before or after for before, after in pad):
        image = np.pad(image, pad, mode="edge")
    return image, target


@functools.lru_cache(maxsize=4)
def _augmentations(mirror: bool, spatial: bool, field: bool = False):
    from monai.transforms import (
        Compose,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    flips = [RandFlipd(["image", "target"], prob=0.5, spatial_axis=axis) for axis in range(3)]
    # the target keeps its values (nearest); past the patch's edge both repeat the edge voxels
    affine = RandAffined(["image", "target"], prob=0.3, rotate_range=(0.26, 0.26, 0.26),
                         scale_range=(0.15, 0.15, 0.15), mode=("bilinear", "nearest"),
                         padding_mode="border")
    # A smooth multiplicative field over the patch: on a [0, 1] CT window, soft tissue moves by
    # up to ~140 HU, differently from place to place, as contrast enhancement moves an organ.
    bias = RandBiasFieldd("image", degree=3, coeff_range=(0.0, 0.05), prob=0.5)
    return Compose([
        *([affine] if spatial else []),
        *(flips if mirror else []),
        *([bias] if field else []),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.2, std=0.02),
    ])


def augment(image: np.ndarray, target: np.ndarray, rng: np.random.Generator,
            mirror: bool = False, spatial: bool = False, field: bool = False):
    """Intensity scale and shift, Gaussian noise; with ``spatial``, random rotation and
    scaling; with ``mirror``, random flips on each axis; with ``field``, a smooth random
    intensity field (MONAI transforms).

    The transforms are reseeded from ``rng`` on every call, so a step's augmentation depends
    only on the step's seed (what makes resuming exact).
    """
    transforms = _augmentations(mirror, spatial, field)
    transforms.set_random_state(seed=int(rng.integers(2**31)))
    out = transforms({"image": image, "target": target[None]})
    return np.asarray(out["image"], np.float32), np.asarray(out["target"][0], np.int16)


@dataclass
class LabelledCase:
    """A case with the label table of the dataset it came from (datasets differ in labels)."""

    case: Case
    table: LabelTable
    others_background: bool = False  # labels the model lacks are background (a chosen subset)
    head: int = 0  # which output head trains on it (multi-domain co-training)


def split_cases(cases: list, seed: int, fraction: float = 0.2) -> tuple[list, list, bool]:
    """Training and validation cases; with fewer than 3 cases validation reuses training.

    Returns (train, validation, held_out) where ``held_out`` says whether validation cases
    are separate from training ones.
    """
    if len(cases) < 3:
        return cases, cases, False
    order = np.random.default_rng(seed).permutation(len(cases))
    count = max(1, round(len(cases) * fraction))
    val = [cases[i] for i in sorted(order[:count])]
    train = [cases[i] for i in sorted(order[count:])]
    return train, val, True


def labelled_cases(dataset, source: str) -> list[LabelledCase]:
    cases = [LabelledCase(case, dataset.labels) for case in dataset.labelled()]
    if not cases:
        raise InputError(
            f"Dataset {source} has no labelled case; training needs at least one image with "
            "its label map."
        )
    return cases


def median_spacing(cases: list[LabelledCase]) -> list[float]:
    """Median voxel size (mm, x y z) of the cases' first image channel."""
    spacings = isolation.call(_spacings, [item.case.image for item in cases],
                              what="the training scans")["spacing"]
    return [float(v) for v in np.median(spacings, axis=0)]


def _spacings(paths: Sequence) -> dict[str, np.ndarray]:
    from TransferSegLib.volumes import read_volume

    return {"spacing": np.array([read_volume(path).GetSpacing() for path in paths], float)}

