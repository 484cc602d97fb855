"""Slicer segmentations (``.seg.nrrd``): segments with names, colours, layers (overlaps
allowed) and Slicer's segment tags (``TerminologyEntry``: the coded concept), read and written
with every field kept. Plain label maps are read as one-layer segmentations.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TransferSegLib.errors import InputError
from TransferSegLib.files import atomic_output, library_messages_held
from TransferSegLib.isolation import sitk  # imported on first use
from TransferSegLib.volumes import (
    as_label_pixels,
    as_volume,
    image_format,
    label_values,
    read_itk,
    read_label,
    require_exists,
    write_image,
)

TERMINOLOGY_TAG = "TerminologyEntry"  # Slicer's segment tag holding its coded meaning
STATUS_TAG = "Segmentation.Status"


@dataclass
class Segment:
    """One segment of a segmentation: a name, the value it has in its layer, an RGB colour,
    and Slicer's segment tags (``TerminologyEntry``: the coded concept, e.g. SNOMED CT)."""

    name: str
    value: int
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    layer: int = 0
    id: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def terminology(self) -> str:
        return self.tags.get(TERMINOLOGY_TAG, "")


def parse_tags(text: str) -> dict[str, str]:
    """Slicer's ``Segment<i>_Tags`` text (``key:value|key:value|``) as a dict."""
    tags = {}
    for item in text.split("|"):
        key, colon, value = item.partition(":")
        if colon and key.strip():
            tags[key.strip()] = value
    return tags


def format_tags(tags: Mapping[str, str]) -> str:
    """The ``Segment<i>_Tags`` text of ``tags`` (a '|' inside a value would end it: dropped)."""
    return "".join(f"{key}:{str(value).replace('|', ' ')}|" for key, value in tags.items()
                   if key and "|" not in key and ":" not in key)


@dataclass
class Segmentation:
    """Segments stored in one or more label-map layers on a shared grid (layers may overlap).

    ``layers[i]`` is a 3D unsigned-integer image; a segment is the voxels of its layer equal to
    its value. One layer suffices unless segments overlap.
    """

    layers: list[sitk.Image]
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def from_label_map(
        cls, label: sitk.Image, names: Mapping[int, str] | None = None,
        terminology: Mapping[str, str] | None = None,
    ) -> Segmentation:
        """A one-layer segmentation from a label map; unnamed values become ``Segment_<v>``.
        ``terminology`` gives segments their ``TerminologyEntry`` by name."""
        names, terminology = dict(names or {}), dict(terminology or {})
        segments = []
        for v in label_values(label):
            name = names.get(v, f"Segment_{v}")
            tags = {TERMINOLOGY_TAG: terminology[name]} if terminology.get(name) else {}
            segments.append(Segment(name, v, default_color(v), 0, f"Segment_{v}", tags))
        return cls([label], segments)

    def terminology(self) -> dict[str, str]:
        """Segment name -> ``TerminologyEntry``, for the segments that have one."""
        return {s.name: s.terminology for s in self.segments if s.terminology}

    def mask(self, name: str) -> np.ndarray:
        """Boolean (z, y, x) array of the segment called ``name``."""
        for segment in self.segments:
            if segment.name == name:
                return sitk.GetArrayViewFromImage(self.layers[segment.layer]) == segment.value
        raise KeyError(f"no segment named {name!r}; segments: {[s.name for s in self.segments]}")

    def to_label_map(self) -> tuple[sitk.Image, dict[int, str]]:
        """One label map and its table {value: name}; values are kept where they are unique.

        Raises InputError if segments overlap, since a label map holds one label per voxel.
        """
        if len(self.layers) == 1:
            return self.layers[0], {s.value: s.name for s in self.segments}
        reference = self.layers[0]
        out = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint16)
        table: dict[int, str] = {}
        next_free = max((s.value for s in self.segments), default=0) + 1
        for segment in self.segments:
            mask = sitk.GetArrayViewFromImage(self.layers[segment.layer]) == segment.value
            taken = out[mask] != 0
            if np.any(taken):
                other = table[int(out[mask][taken][0])]
                raise InputError(
                    f"Segments {other!r} and {segment.name!r} overlap in {int(taken.sum())} "
                    "voxels, so they cannot share one label map; remove the overlap in Segment "
                    "Editor or choose the segments to use."
                )
            value = segment.value if segment.value not in table else next_free
            next_free = max(next_free, value + 1)
            out[mask] = value
            table[value] = segment.name
        image = sitk.GetImageFromArray(out)
        image.CopyInformation(reference)
        return as_label_pixels(image, Path("segmentation")), table


def default_color(value: int) -> tuple[float, float, float]:
    """A stable, distinct colour for label ``value`` (golden-angle hues)."""
    import colorsys

    hue = (value * 0.61803398875) % 1.0
    return tuple(round(c, 6) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.95))


def _floats(text: str, count: int, path: Path, key: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split())
    except ValueError:
        values = ()
    if len(values) != count:
        raise InputError(f"Segmentation {path} has a malformed {key} ({text!r}); save it again.")
    return values


def read_segmentation(path: str | os.PathLike) -> Segmentation:
    """Read a segmentation: a ``.seg.nrrd`` with its segment metadata, or any label map."""
    path = Path(path)
    require_exists(path)
    if image_format(path) != "Slicer segmentation":
        return Segmentation.from_label_map(read_label(path))
    image = read_itk(path)
    image = as_volume(image, path)
    components = image.GetNumberOfComponentsPerPixel()
    layers = [
        as_label_pixels(sitk.VectorIndexSelectionCast(image, i) if components > 1 else image, path)
        for i in range(components)
    ]
    segments = []
    index = 0
    while image.HasMetaDataKey(f"Segment{index}_ID") or image.HasMetaDataKey(
        f"Segment{index}_Name"
    ):
        def meta(key: str, default: str = "", index: int = index) -> str:
            full = f"Segment{index}_{key}"
            return image.GetMetaData(full) if image.HasMetaDataKey(full) else default

        name = meta("Name", meta("ID", f"Segment_{index + 1}"))
        value = _whole(meta("LabelValue", str(index + 1)), 1, path, f"Segment{index}_LabelValue")
        layer = _whole(meta("Layer", "0"), 0, path, f"Segment{index}_Layer")
        if not 0 <= layer < len(layers):
            raise InputError(
                f"Segmentation {path}: segment {name!r} is in layer {layer}, but the file has "
                f"{len(layers)} layer(s); the file is inconsistent, save it again from Slicer."
            )
        color = _floats(meta("Color", " ".join(map(str, default_color(value)))), 3, path,
                        f"Segment{index}_Color")
        segments.append(Segment(name, value, color, layer, meta("ID", f"Segment_{index + 1}"),
                                parse_tags(meta("Tags"))))
        index += 1
    numbered = {int(found.group(1)) for key in image.GetMetaDataKeys()
                if (found := re.match(r"Segment(\d+)_", key))}
    if numbered - set(range(index)):
        raise InputError(
            f"Segmentation {path} describes segment {min(numbered - set(range(index)))} but not "
            f"segment {index}; the segment list is inconsistent, save it again from Slicer."
        )
    if not segments:  # a plain label map saved as .seg.nrrd
        return Segmentation.from_label_map(layers[0]) if len(layers) == 1 else Segmentation(layers)
    _check_segments(path, layers, segments)
    return Segmentation(layers, segments)


def _whole(text: str, low: int, path: Path, key: str) -> int:
    """A whole number from ``low`` to 2**32 - 1 in a segment field, or InputError naming it."""
    value = _floats(text, 1, path, key)[0]
    if not (np.isfinite(value) and value == round(value) and low <= value < 2**32):
        raise InputError(
            f"Segmentation {path} has a malformed {key} ({text!r}): it must be a whole number "
            f"from {low}; save it again from Slicer."
        )
    return int(value)


def _check_segments(path: Path, layers: list[sitk.Image], segments: list[Segment]) -> None:
    """Refuse metadata that would merge or drop voxels: two segments with one name or with one
    value in one layer, and voxel values that no segment names."""
    owner: dict[tuple[int, int], str] = {}
    names: set[str] = set()
    for segment in segments:
        if segment.name in names:
            raise InputError(
                f"Segmentation {path} has two segments named {segment.name!r}; rename one in "
                "Segment Editor and save it again."
            )
        names.add(segment.name)
        other = owner.setdefault((segment.layer, segment.value), segment.name)
        if other != segment.name:
            raise InputError(
                f"Segmentation {path}: segments {other!r} and {segment.name!r} both have label "
                f"value {segment.value} in layer {segment.layer}; the file is inconsistent, save "
                "it again from Slicer."
            )
    for number, layer in enumerate(layers):
        unnamed = sorted(set(label_values(layer)) - {v for n, v in owner if n == number})
        if unnamed:
            raise InputError(
                f"Segmentation {path} has voxels of value {unnamed[0]} in layer {number} that "
                "no segment names; the file is inconsistent, save it again from Slicer."
            )


def write_segmentation(
    segmentation: Segmentation, path: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``segmentation``: ``.seg.nrrd`` keeps names, colours and layers; others a label map."""
    path = Path(path)
    if image_format(path) != "Slicer segmentation":
        label, _ = segmentation.to_label_map()
        return write_image(label, path, overwrite=overwrite)
    layers = [sitk.Cast(layer, sitk.sitkUInt8 if _fits_uint8(layer) else sitk.sitkUInt16)
              for layer in segmentation.layers]
    if len({layer.GetPixelID() for layer in layers}) > 1:
        layers = [sitk.Cast(layer, sitk.sitkUInt16) for layer in layers]
    image = sitk.Compose(layers) if len(layers) > 1 else layers[0]
    image.CopyInformation(segmentation.layers[0])
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for i, segment in enumerate(segmentation.segments):
        array = sitk.GetArrayViewFromImage(segmentation.layers[segment.layer]) == segment.value
        image.SetMetaData(f"Segment{i}_ID", segment.id or f"Segment_{i + 1}")
        image.SetMetaData(f"Segment{i}_Name", segment.name)
        image.SetMetaData(f"Segment{i}_NameAutoGenerated", "0")
        image.SetMetaData(f"Segment{i}_Color", " ".join(f"{c:.6g}" for c in segment.color))
        image.SetMetaData(f"Segment{i}_ColorAutoGenerated", "0")
        image.SetMetaData(f"Segment{i}_LabelValue", str(segment.value))
        image.SetMetaData(f"Segment{i}_Layer", str(segment.layer))
        image.SetMetaData(f"Segment{i}_Extent", _extent(array))
        image.SetMetaData(f"Segment{i}_Tags",
                          format_tags({STATUS_TAG: "inprogress", **segment.tags}))
    with atomic_output(path, overwrite) as tmp:
        with library_messages_held():  # ITK's own lines on failure; ours says it once
            sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def _fits_uint8(layer: sitk.Image) -> bool:
    array = sitk.GetArrayViewFromImage(layer)
    return array.size == 0 or int(array.max()) < 256


def _extent(mask: np.ndarray) -> str:
    """Slicer's segment extent: 'x0 x1 y0 y1 z0 z1' voxel bounds (inclusive), or an empty one."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in (2, 1, 0):  # numpy (z, y, x) -> Slicer (x, y, z)
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        bounds += [int(present[0]), int(present[-1])]
    return " ".join(map(str, bounds))


