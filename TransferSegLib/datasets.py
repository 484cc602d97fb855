"""Training data: cases (image + label map + which classes are annotated) and the label table.

A dataset is found from a path by :func:`discover`, which understands:

- nnU-Net v2 folders: ``dataset.json`` (``channel_names``, ``labels`` name -> value,
  ``file_ending``), ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``;
- Medical Segmentation Decathlon folders: ``dataset.json`` with ``modality``, ``labels``
  value -> name and a ``training`` list of ``{"image", "label"}``;
- a CSV file with columns ``image``, ``label`` and optionally ``name``, ``modality`` and
  ``annotated`` (label names separated by ``;``: classes not listed are unannotated in that case);
- a plain folder of image/label pairs matched by suffix (``x.nii.gz`` + ``x_label.nii.gz``,
  ``x_image.nrrd`` + ``x_label.nrrd``, ``_seg``, ``_mask``, ``_labels``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from TransferSegLib import volumes
from TransferSegLib.errors import InputError
from TransferSegLib.files import full_suffix, require_regular

if TYPE_CHECKING:
    import SimpleITK as sitk

BACKGROUND = "background"
# A label with this name marks voxels whose class is unknown: they are left out of training
# and validation (nnU-Net v2's "ignore" label), e.g. an organ hidden from a base model.
IGNORE_NAME = "ignore"
LABEL_SUFFIXES = ("_label", "_labels", "_seg", "_mask", "-label", "-seg", "_gt")
IMAGE_SUFFIXES = ("", "_image", "_img", "_0000", "-image")


@dataclass(frozen=True)
class LabelTable:
    """Label names <-> voxel values; value 0 is always the background."""

    names: dict[int, str]

    def __post_init__(self) -> None:
        names = {int(v): str(n) for v, n in self.names.items()}
        names.setdefault(0, BACKGROUND)
        if len(set(names.values())) != len(names):
            raise InputError(f"Label table {names} gives two values the same name.")
        if any(v < 0 for v in names):
            raise InputError(f"Label table {names} has negative values; labels are >= 0.")
        object.__setattr__(self, "names", dict(sorted(names.items())))

    @classmethod
    def from_mapping(cls, mapping: Mapping) -> LabelTable:
        """From ``{value: name}`` or ``{name: value}`` (keys may be strings, as in JSON)."""
        table: dict[int, str] = {}
        for key, item in mapping.items():
            if isinstance(item, (list, tuple)):
                raise InputError(
                    f"Label {key!r} is a region ({item}); TransferSeg needs one value per label."
                )
            if str(key).lstrip("-").isdigit():
                table[int(key)] = str(item)
            else:
                try:
                    value = int(item)
                except (TypeError, ValueError):
                    raise InputError(f"Label {key!r} has a non-integer value {item!r}.") from None
                if value in table:  # {name: value} would otherwise drop a name silently
                    raise InputError(
                        f"Labels {table[value]!r} and {key!r} both have value {value}; give each "
                        "label its own value."
                    )
                table[value] = str(key)
        return cls(table)

    @property
    def foreground(self) -> dict[int, str]:
        """The labels to learn: every value but background and the ``ignore`` label."""
        return {v: n for v, n in self.names.items() if v != 0 and n != IGNORE_NAME}

    @property
    def ignore_value(self) -> int | None:
        """The value of the ``ignore`` label (voxels of unknown class), None without one."""
        return next((v for v, n in self.names.items() if n == IGNORE_NAME), None)

    def value(self, name: str) -> int:
        for value, known in self.names.items():
            if known == name:
                return value
        raise InputError(f"No label called {name!r}; labels: {', '.join(self.names.values())}.")

    def check(self, values: Iterable[int], source: str) -> None:
        """InputError if ``values`` (found in ``source``) holds values the table lacks."""
        unknown = sorted(set(int(v) for v in values) - set(self.names))
        if unknown:
            raise InputError(
                f"Label map {source} holds values {unknown} that the label table "
                f"({', '.join(f'{v}={n}' for v, n in self.names.items())}) does not name; add "
                "them to the table (dataset.json / labels) or fix the label map."
            )

    def to_json(self) -> dict[str, str]:
        return {str(v): n for v, n in self.names.items()}


@dataclass
class Case:
    """One training or test case: image channel files, an optional label map, metadata.

    ``annotated`` lists the label names drawn in this case; ``None`` means every label of the
    dataset. Classes outside it are unknown in this case, not background (partial labels).
    """

    name: str
    images: tuple[Path, ...]
    label: Path | None = None
    annotated: frozenset[str] | None = None
    modality: str = ""

    @property
    def image(self) -> Path:
        return self.images[0]

    def load(
        self, table: LabelTable | None = None, allow_empty: bool = False
    ) -> tuple[list[sitk.Image], sitk.Image | None]:
        """Read the channel images and the label map; geometry and label values checked.

        An all-background label map is refused unless ``allow_empty`` (a negative case).
        """
        images = [volumes.read_volume(path) for path in self.images]
        for path, image in zip(self.images[1:], images[1:], strict=True):
            volumes.check_same_grid(images[0], image, str(self.images[0]), str(path))
        if self.label is None:
            return images, None
        label = volumes.read_label(self.label)
        volumes.check_same_grid(images[0], label, str(self.image), str(self.label))
        values = volumes.label_values(label)
        if not values and not allow_empty:
            raise InputError(
                f"Label map {self.label} is empty (all background); label the case, or drop it "
                "from the training set."
            )
        if table is not None:
            table.check(values, str(self.label))
        return images, label


@dataclass
class Dataset:
    """Cases sharing one label table; ``kind`` says how the folder was read."""

    cases: list[Case]
    labels: LabelTable
    modality: str = ""
    kind: str = ""
    source: Path | None = None
    channels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = self.source or "the dataset"
        seen: set[str] = set()
        for case in self.cases:
            if case.name in seen:
                raise InputError(
                    f"{where} has two cases named {case.name!r}; give each case its own name."
                )
            seen.add(case.name)
            unknown = sorted((case.annotated or set()) - set(self.labels.names.values()))
            if unknown:
                raise InputError(
                    f"{where}: case {case.name!r} is annotated for {unknown}, which the label "
                    f"table ({', '.join(self.labels.names.values())}) does not name; fix the "
                    "spelling or add them to labels.json."
                )

    def labelled(self) -> list[Case]:
        return [case for case in self.cases if case.label is not None]


def _read_json(path: Path) -> dict:
    require_regular(path, "Label table")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # as Excel/Notepad save it
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"Could not read {path}: {error}; fix the JSON.") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object.")
    return data


def discover(path: str | os.PathLike) -> Dataset:
    """Find the cases at ``path`` (a dataset folder or a CSV file); see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Dataset {path} does not exist; check the path.")
    require_regular(path, "Case list" if path.suffix.lower() == ".csv" else "Dataset",
                    folder_ok=True)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return from_csv(path)
        raise InputError(f"{path} is a file; give a dataset folder or a .csv list of cases.")
    manifest = path / "dataset.json"
    if manifest.exists():
        data = _read_json(manifest)
        if "training" in data and "channel_names" not in data:
            return from_msd(path, data)
        return from_nnunet(path, data)
    if (path / "imagesTr").is_dir():
        raise InputError(f"{path} has imagesTr/ but no dataset.json; add one (nnU-Net v2 format).")
    return from_pairs(path)


def from_nnunet(folder: Path, data: dict) -> Dataset:
    """An nnU-Net v2 raw dataset folder."""
    for key in ("channel_names", "labels", "file_ending"):
        if key not in data:
            raise InputError(f"{folder / 'dataset.json'} lacks {key!r} (nnU-Net v2 format).")
    table = _table_in(data["labels"], folder / "dataset.json")
    channels = [data["channel_names"][k] for k in sorted(data["channel_names"], key=int)]
    ending = data["file_ending"]
    cases = []
    for split, label_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        image_dir = folder / split
        if not image_dir.is_dir():
            continue
        names = sorted({p.name[: -len(ending) - 5] for p in image_dir.glob(f"*_0000{ending}")})
        for name in names:
            images = tuple(image_dir / f"{name}_{i:04d}{ending}" for i in range(len(channels)))
            for image in images:
                if not image.exists():
                    raise InputError(f"Case {name} lacks channel file {image}.")
            label = folder / label_dir / f"{name}{ending}"
            cases.append(Case(name, images, label if label.exists() else None,
                              modality=channels[0]))
    if not cases:
        raise InputError(f"{folder} has no images named imagesTr/<case>_0000{ending}.")
    return Dataset(cases, table, channels[0], "nnunet", folder, channels)


def from_msd(folder: Path, data: dict) -> Dataset:
    """A Medical Segmentation Decathlon task folder."""
    if "labels" not in data:
        raise InputError(f"{folder / 'dataset.json'} lacks 'labels'.")
    table = _table_in(data["labels"], folder / "dataset.json")
    modality = data.get("modality", {})
    channels = [modality[k] for k in sorted(modality, key=int)] if modality else ["CT"]
    cases = []
    # abspath, not resolve: a symlinked file keeps its own name (the case name) and folder.
    for entry in data.get("training", []):
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(f"{folder / 'dataset.json'}: a 'training' entry has no 'image'.")
        image = Path(os.path.abspath(folder / entry["image"]))
        label = Path(os.path.abspath(folder / entry["label"])) if entry.get("label") else None
        cases.append(Case(_stem(image), (image,), label, modality=channels[0]))
    for entry in data.get("test", []):
        entry = entry if isinstance(entry, str) else entry["image"]
        image = Path(os.path.abspath(folder / entry))
        cases.append(Case(_stem(image), (image,), None, modality=channels[0]))
    for case in cases:
        for file in (*case.images, case.label):
            if file is not None and not file.exists():
                raise InputError(f"{folder / 'dataset.json'} lists {file}, which does not exist.")
    return Dataset(cases, table, channels[0], "msd", folder, channels)


def from_csv(path: Path) -> Dataset:
    """Cases listed in a CSV file; relative paths are relative to the file's folder."""
    require_regular(path, "Case list")
    try:  # utf-8-sig: a byte-order mark, as Excel writes "CSV UTF-8", is not part of a name
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text (byte {error.start}); save the case list "
                         "as CSV UTF-8.") from None
    if not rows:
        raise InputError(f"{path} lists no cases; add one line per case under its header row.")
    if "image" not in rows[0]:
        raise InputError(f"{path} needs a header row with at least an 'image' column.")
    cases, values = [], set()
    for number, row in enumerate(rows, start=2):
        # A short row gives None for its missing cells; an empty image would be the folder.
        row = {key: (text or "").strip() for key, text in row.items() if key is not None}
        if not row["image"]:
            raise InputError(f"{path} line {number}: the 'image' cell is empty.")
        image = path.parent / row["image"]
        label = path.parent / row["label"] if row.get("label") else None
        for file in (image, label):
            if file is not None and not file.exists():
                raise InputError(f"{path} line {number}: {file} does not exist; fix the path "
                                 "(relative to the list's folder) or remove the line.")
        annotated = row.get("annotated", "")
        cases.append(Case(
            row.get("name", "") or _stem(image), (image,), label,
            frozenset(n.strip() for n in annotated.split(";") if n.strip()) or None,
            row.get("modality", ""),
        ))
    table = _table_beside(path.parent)
    if table is None:
        for case in cases:
            if case.label is not None:
                values.update(volumes.label_values(volumes.read_label(case.label)))
        table = LabelTable({v: f"label_{v}" for v in values})
    return Dataset(cases, table, cases[0].modality, "csv", path)


def from_pairs(folder: Path) -> Dataset:
    """Image/label pairs in one folder, matched by the label file's suffix."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and _readable(p)]
    cases = []
    for label in files:
        suffix = full_suffix(label)
        stem = label.name[: len(label.name) - len(suffix)]
        marker = next((m for m in LABEL_SUFFIXES if stem.lower().endswith(m)), None)
        if marker is None:
            continue
        base = stem[: len(stem) - len(marker)]
        candidates = (folder / f"{base}{tail}{ext}" for tail in IMAGE_SUFFIXES
                      for ext in (suffix, ".nii.gz", ".nrrd", ".nii", ".mha"))
        image = next((c for c in candidates if c.exists() and c != label), None)
        if image is None:
            continue
        cases.append(Case(base, (image,), label))
    if not cases:
        raise InputError(
            f"Found no image/label pairs in {folder}; name label maps like <case>_label.nii.gz "
            "beside <case>.nii.gz, or use an nnU-Net/MSD folder or a CSV list."
        )
    table = _table_beside(folder)
    if table is None:
        values: set[int] = set()
        for case in cases:
            values.update(volumes.label_values(volumes.read_label(case.label)))
        table = LabelTable({v: f"label_{v}" for v in values})
    return Dataset(cases, table, "", "pairs", folder)


def _table_beside(folder: Path) -> LabelTable | None:
    """``labels.json`` next to the data ({value: name} or {name: value}), if there is one."""
    path = folder / "labels.json"
    return _table_in(_read_json(path), path) if path.exists() else None


def _table_in(mapping: object, source: Path) -> LabelTable:
    """:meth:`LabelTable.from_mapping` of a table read from ``source``, named in its errors."""
    if not isinstance(mapping, Mapping):
        raise InputError(
            f"{source}: the labels must map values to names ({{\"1\": \"liver\"}}) or names to "
            f"values, not be a {type(mapping).__name__}; fix the label table there."
        )
    try:
        return LabelTable.from_mapping(mapping)
    except InputError as error:
        raise InputError(f"{source}: {error} Fix the label table there.") from None


def _readable(path: Path) -> bool:
    try:
        volumes.image_format(path)
        return True
    except InputError:
        return False


def _stem(path: Path) -> str:
    suffix = full_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name
