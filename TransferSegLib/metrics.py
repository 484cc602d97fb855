"""Per-label segmentation metrics: Dice, IoU, HD95, mean surface distance, volume, lesion detection.

Two layers:

* mask functions (:func:`dice`, :func:`iou`, :func:`surface_distances`, :func:`hd95`,
  :func:`hausdorff_distance`, :func:`mean_surface_distance`, :func:`volume_ml`,
  :func:`lesion_detection`) take boolean numpy arrays of one shape and a ``spacing`` in
  millimetres **in array axis order** (for an array from ``sitk.GetArrayFromImage`` that is
  ``(Z, Y, X)``, i.e. ``image.GetSpacing()[::-1]``), like ``scipy.ndimage`` and MONAI;
* :func:`evaluate` scores every label of a prediction against a reference label map (two
  SimpleITK images on one voxel grid) and returns one :class:`LabelScore` per label, which
  :func:`mean_scores`, :func:`scores_table` and :func:`write_scores` summarise.

Definitions (chosen to match MONAI's ``compute_hausdorff_distance`` and
``compute_average_surface_distance``, so that numbers are comparable with published ones):

* *surface* of a mask: its voxels with at least one face-adjacent (6-neighbourhood) voxel
  outside the mask; voxels on the image border count as surface (outside the image is
  background).
* *directed surface distances* A -> B: for each surface voxel of A, the Euclidean distance in mm
  between its centre and the nearest surface-voxel centre of B.
* ``hausdorff_distance(percentile=p)``: the larger of the two directed p-th percentiles
  (linear interpolation between order statistics, as ``numpy.percentile`` / ``torch.quantile``);
  ``p=100`` is the classical Hausdorff distance, ``hd95`` uses ``p=95``.
* ``mean_surface_distance``: the mean over the union of both directed distance sets
  (MONAI's ``symmetric=True`` average surface distance).
* lesions: connected components with 26-connectivity (face, edge and corner neighbours), so a
  lesion drawn slice by slice with diagonal steps stays one lesion.

Empty masks: both empty gives Dice = IoU = 1, distances 0 (nothing to find, nothing wrong);
exactly one empty gives Dice = IoU = 0 and distances ``inf`` (no surface to measure to).
JSON output writes non-finite numbers as ``null``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from TransferSegLib.errors import GeometryError, InputError, TransferSegError
from TransferSegLib.events import json_safe
from TransferSegLib.files import atomic_output
from TransferSegLib.isolation import sitk  # imported on first use

HD_PERCENTILE = 95.0

Spacing = Sequence[float]


# --------------------------------------------------------------------------------------------
# Mask metrics
# --------------------------------------------------------------------------------------------


def _as_masks(pred_mask: np.ndarray, ref_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred_mask, dtype=bool)
    ref = np.asarray(ref_mask, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"Masks differ in shape: {pred.shape} vs {ref.shape}.")
    return pred, ref


def _as_spacing(spacing: Spacing, ndim: int) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != ndim or not np.all(values > 0):
        raise ValueError(f"Spacing must be {ndim} positive values in mm, got {tuple(spacing)}.")
    return values


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice coefficient 2|P∩R| / (|P|+|R|) of two boolean masks; 1.0 when both are empty."""
    pred, ref = _as_masks(pred_mask, ref_mask)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def iou(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Intersection over union (Jaccard) |P∩R| / |P∪R|; 1.0 when both are empty."""
    pred, ref = _as_masks(pred_mask, ref_mask)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, ref).sum()) / union


def volume_ml(mask: np.ndarray, spacing: Spacing) -> float:
    """Volume of a boolean mask in millilitres (1 mL = 1000 mm³); ``spacing`` in mm."""
    mask = np.asarray(mask, dtype=bool)
    voxel_mm3 = float(np.prod(_as_spacing(spacing, mask.ndim)))
    return int(mask.sum()) * voxel_mm3 / 1000.0


def _union_crop(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union, padded by one background voxel.

    Distances between surfaces only involve voxels inside that box, so the distance
    transforms run on the box instead of the whole volume (a small organ in a 512x512x200 CT
    costs a few thousand voxels, not 50 million). The padding makes the image border act as
    background, so masks touching it still have a closed surface.
    """
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(hits[0], hits[-1] + 1))
    box = tuple(box)
    return np.pad(pred[box], 1), np.pad(ref[box], 1)


def _surface(padded: np.ndarray) -> np.ndarray:
    """Voxels of a mask (padded with one background voxel all round) with a background face
    neighbour; same shape as the input, the padding ring is never surface."""
    inner = tuple(slice(1, -1) for _ in range(padded.ndim))
    eroded = padded[inner].copy()
    for axis in range(padded.ndim):
        for shifted in (slice(0, -2), slice(2, None)):
            neighbour = list(inner)
            neighbour[axis] = shifted
            eroded &= padded[tuple(neighbour)]
    surface = np.zeros_like(padded)
    surface[inner] = padded[inner] & ~eroded
    return surface


def _distance_to(surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance in mm from every voxel centre to the nearest voxel of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing[::-1]])  # SimpleITK wants (X, Y, Z)
    # Maurer's transform is exact. Outside the object it gives the distance to the nearest
    # object voxel (always one with a background face neighbour, which Maurer's own contour
    # includes); the object's own voxels are at distance 0, whatever sign Maurer gives them.
    signed = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    distance = np.abs(sitk.GetArrayFromImage(signed)).astype(np.float64)
    distance[surface] = 0.0
    return distance


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Spacing
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(prediction -> reference, reference -> prediction)``.

    Each array has one value per surface voxel of its source mask (in no particular order): the
    distance from that voxel's centre to the nearest surface voxel of the other mask. If the
    other mask is empty the distances are ``inf``; an empty source gives an empty array.
    ``spacing`` is in mm, in the masks' axis order.
    """
    pred, ref = _as_masks(pred_mask, ref_mask)
    step = _as_spacing(spacing, pred.ndim)
    if not pred.any() and not ref.any():
        return np.zeros(0), np.zeros(0)
    pred, ref = _union_crop(pred, ref)
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    if not ref.any():
        return np.full(int(pred_surface.sum()), np.inf), np.zeros(0)
    if not pred.any():
        return np.zeros(0), np.full(int(ref_surface.sum()), np.inf)
    pred_to_ref = _distance_to(ref_surface, step)[pred_surface]
    ref_to_pred = _distance_to(pred_surface, step)[ref_surface]
    return pred_to_ref, ref_to_pred


def _hausdorff(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, percentile: float) -> float:
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"Percentile must be within 0..100, got {percentile}.")
    if pred_to_ref.size == 0 and ref_to_pred.size == 0:
        return 0.0
    if pred_to_ref.size == 0 or ref_to_pred.size == 0:
        return math.inf
    return float(
        max(np.percentile(pred_to_ref, percentile), np.percentile(ref_to_pred, percentile))
    )


def _mean_distance(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    if pred_to_ref.size == 0 and ref_to_pred.size == 0:
        return 0.0
    if pred_to_ref.size == 0 or ref_to_pred.size == 0:
        return math.inf
    return float(np.concatenate([pred_to_ref, ref_to_pred]).mean())


def hausdorff_distance(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Spacing, percentile: float = 100.0
) -> float:
    """Hausdorff distance in mm: max of the two directed ``percentile``-th surface distances.

    ``percentile=100`` is the classical (maximum) Hausdorff distance. 0.0 if both masks are
    empty, ``inf`` if exactly one is. ``spacing`` is in mm, in the masks' axis order.
    """
    return _hausdorff(*surface_distances(pred_mask, ref_mask, spacing), percentile)


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile Hausdorff distance in mm, as MONAI's ``compute_hausdorff_distance(
    percentile=95)``: ``max(P95(pred -> ref), P95(ref -> pred))``; see the module docstring."""
    return hausdorff_distance(pred_mask, ref_mask, spacing, HD_PERCENTILE)


def mean_surface_distance(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Spacing) -> float:
    """Symmetric mean surface distance in mm: the mean over both directed distance sets
    together. 0.0 if both masks are empty, ``inf`` if exactly one is."""
    return _mean_distance(*surface_distances(pred_mask, ref_mask, spacing))


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection of one label (lesion = 26-connected component).

    ``recall`` = detected reference lesions / reference lesions, ``precision`` = predicted
    lesions that touch a reference lesion / predicted lesions, ``f1`` their harmonic mean.
    Both without lesions: all 1.0. A ratio with no lesions to count is ``nan`` (undefined),
    and then ``f1`` is 0.0 (all misses or all false alarms).
    """

    reference_lesions: int
    predicted_lesions: int
    detected: int  # reference lesions overlapped by the prediction
    false_positives: int  # predicted lesions touching no reference lesion
    recall: float
    precision: float
    f1: float
    missed_volumes_ml: tuple[float, ...]  # the reference lesions that were missed, in mL


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected (in 3D; 8 in 2D) components of a mask: label array 1..n and n."""
    labeller = sitk.ConnectedComponentImageFilter()
    labeller.SetFullyConnected(True)
    labelled = labeller.Execute(sitk.GetImageFromArray(mask.astype(np.uint8)))
    return sitk.GetArrayFromImage(labelled), labeller.GetObjectCount()


def lesion_detection(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Spacing, min_overlap_voxels: int = 1
) -> LesionDetection:
    """Count found and false lesions of a prediction against a reference (boolean masks).

    A reference lesion is detected when at least ``min_overlap_voxels`` predicted voxels lie in
    it; a predicted lesion is a true positive when at least ``min_overlap_voxels`` of its voxels
    lie in the reference. ``spacing`` (mm, the masks' axis order) sizes the missed lesions.
    """
    pred, ref = _as_masks(pred_mask, ref_mask)
    step = _as_spacing(spacing, pred.ndim)
    if min_overlap_voxels < 1:
        raise ValueError(f"min_overlap_voxels must be at least 1, got {min_overlap_voxels}.")
    ref_labels, n_ref = _components(ref)
    pred_labels, n_pred = _components(pred)
    # Voxels of each component that the other mask covers: index 0 is background, dropped.
    ref_hits = np.bincount(ref_labels[pred], minlength=n_ref + 1)[1:]
    pred_hits = np.bincount(pred_labels[ref], minlength=n_pred + 1)[1:]
    detected = int((ref_hits >= min_overlap_voxels).sum())
    true_positive = int((pred_hits >= min_overlap_voxels).sum())
    voxel_ml = float(np.prod(step)) / 1000.0
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:]
    missed = tuple(float(size * voxel_ml) for size in ref_sizes[ref_hits < min_overlap_voxels])

    if n_ref == 0 and n_pred == 0:
        recall = precision = f1 = 1.0
    else:
        recall = detected / n_ref if n_ref else math.nan
        precision = true_positive / n_pred if n_pred else math.nan
        if n_ref and n_pred and recall + precision > 0:
            f1 = 2.0 * recall * precision / (recall + precision)
        else:
            f1 = 0.0
    return LesionDetection(
        reference_lesions=n_ref,
        predicted_lesions=n_pred,
        detected=detected,
        false_positives=n_pred - true_positive,
        recall=recall,
        precision=precision,
        f1=f1,
        missed_volumes_ml=missed,
    )


# --------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelScore:
    """The scores of one label. Distances in mm, volumes in mL.

    ``present`` says whether the reference contains the label; only those labels enter
    :func:`mean_scores`. Lesion fields are ``None`` unless ``evaluate(lesion_wise=True)``.
    """

    value: int
    name: str
    present: bool
    dice: float
    iou: float
    hd95_mm: float
    msd_mm: float
    volume_pred_ml: float
    volume_ref_ml: float
    lesions_reference: int | None = None
    lesions_predicted: int | None = None
    lesion_recall: float | None = None
    lesion_precision: float | None = None
    lesion_f1: float | None = None


def _check_same_grid(
    prediction: sitk.Image, reference: sitk.Image, prediction_name: str, reference_name: str
) -> None:
    """The library's one same-grid rule (:meth:`TransferSegLib.volumes.Geometry.matches`),
    with the fix that fits scoring."""
    from TransferSegLib.volumes import Geometry

    if prediction.GetDimension() != reference.GetDimension():
        problem = f"{prediction.GetDimension()}D vs {reference.GetDimension()}D"
    else:
        problem = "; ".join(Geometry.of(prediction).differences(Geometry.of(reference)))
    if problem:
        raise GeometryError(
            f"{prediction_name} and {reference_name} are not on the same voxel grid "
            f"({problem}); resample the prediction onto the reference grid "
            "(nearest neighbour: transferseg evaluate --resample) before evaluating."
        )


def _label_array(image: sitk.Image, name: str) -> np.ndarray:
    """The label map as an integer array in (Z, Y, X) order; InputError if it is not one."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a label map with one integer label per voxel."
        )
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        # Label maps saved as float (some NIfTI writers do) are fine if every value is whole.
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(
                f"{name} holds non-integer values, so it is not a label map; give the "
                "segmentation (integer labels), not an image or a probability map."
            )
        array = array.astype(np.int64)
    return array


def _label_boxes(image: sitk.Image, array: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Bounding box (array-order slices) of every non-zero label value.

    ``array`` is ``image`` as checked by :func:`_label_array`; the image itself is used when it
    already holds integers, which spares a copy of a large volume.
    """
    if not np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.integer):
        image = sitk.GetImageFromArray(array.astype(np.int32))
    # One linear pass in C++ instead of a comparison of the whole volume per label.
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.SetComputePerimeter(False)
    shapes.Execute(image)
    boxes = {}
    ndim = array.ndim
    for value in shapes.GetLabels():
        box = shapes.GetBoundingBox(value)  # (x, y, z, size_x, size_y, size_z)
        start, size = box[:ndim][::-1], box[ndim:][::-1]
        boxes[int(value)] = tuple(slice(b, b + n) for b, n in zip(start, size, strict=True))
    return boxes


def _merge_boxes(
    a: tuple[slice, ...] | None, b: tuple[slice, ...] | None
) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(
        slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )


def _unknown_label_message(values: Iterable[int], image_name: str) -> str:
    listed = ", ".join(str(v) for v in sorted(values))
    return f"{image_name} contains label values {listed} that are not in the label table"


def evaluate(
    prediction: sitk.Image,
    reference: sitk.Image,
    labels: dict[int, str] | None = None,
    *,
    prediction_name: str = "prediction",
    reference_name: str = "reference",
    lesion_wise: bool = False,
    ignore_unknown: bool = False,
) -> list[LabelScore]:
    """Score every label of ``prediction`` against ``reference`` (label maps on one grid).

    ``labels`` maps label values to names; by default every non-zero value found in either
    image, named ``label_<value>``. Value 0 is background and never scored. A value present in
    an image but missing from a given table raises :class:`InputError` unless
    ``ignore_unknown``; a table value absent from both images is scored as "both empty".
    ``prediction_name`` / ``reference_name`` (file names, say) name the images in error
    messages. Raises :class:`GeometryError` if the grids differ.
    Returns one :class:`LabelScore` per label, in increasing label value.
    """
    _check_same_grid(prediction, reference, prediction_name, reference_name)
    pred_array = _label_array(prediction, prediction_name)
    ref_array = _label_array(reference, reference_name)
    pred_boxes = _label_boxes(prediction, pred_array)
    ref_boxes = _label_boxes(reference, ref_array)

    if labels is None:
        table = {v: f"label_{v}" for v in sorted(set(pred_boxes) | set(ref_boxes))}
    else:
        table = {int(v): str(n) for v, n in sorted(labels.items()) if int(v) != 0}
        unknown = [
            _unknown_label_message(sorted(set(boxes) - set(table)), name)
            for boxes, name in ((ref_boxes, reference_name), (pred_boxes, prediction_name))
            if set(boxes) - set(table)
        ]
        if unknown and not ignore_unknown:
            raise InputError(
                "; ".join(unknown) + "; pass a label table that contains them "
                "(or --ignore-unknown to skip them)."
            )

    spacing = np.asarray(reference.GetSpacing(), dtype=np.float64)[::-1]  # array order
    scores = []
    for value, name in table.items():
        box = _merge_boxes(pred_boxes.get(value), ref_boxes.get(value))
        if box is None:  # in neither image
            pred = ref = np.zeros((1,) * pred_array.ndim, dtype=bool)
        else:
            pred, ref = pred_array[box] == value, ref_array[box] == value
        pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
        lesion_fields = {}
        if lesion_wise:
            found = lesion_detection(pred, ref, spacing)
            lesion_fields = dict(
                lesions_reference=found.reference_lesions,
                lesions_predicted=found.predicted_lesions,
                lesion_recall=found.recall,
                lesion_precision=found.precision,
                lesion_f1=found.f1,
            )
        scores.append(
            LabelScore(
                value=value,
                name=name,
                present=bool(ref.any()),
                dice=dice(pred, ref),
                iou=iou(pred, ref),
                hd95_mm=_hausdorff(pred_to_ref, ref_to_pred, HD_PERCENTILE),
                msd_mm=_mean_distance(pred_to_ref, ref_to_pred),
                volume_pred_ml=volume_ml(pred, spacing),
                volume_ref_ml=volume_ml(ref, spacing),
                **lesion_fields,
            )
        )
    return scores


# --------------------------------------------------------------------------------------------
# Summaries and files
# --------------------------------------------------------------------------------------------

_LESION_FIELDS = ("lesion_recall", "lesion_precision", "lesion_f1")


def mean_scores(scores: Sequence[LabelScore]) -> dict[str, float | int]:
    """Means over the labels present in the reference.

    Dice and IoU average all of them (a missed label counts as 0). The distances average the
    labels with a finite distance, i.e. those the prediction did not miss entirely; ``missed``
    counts the others, so one missed organ does not turn the mean into ``inf``. Lesion ratios
    (if scored) average the labels where they are defined. Empty means are ``nan``.
    """
    present = [s for s in scores if s.present]

    def mean(values: Iterable[float | None]) -> float:
        kept = [v for v in values if v is not None and math.isfinite(v)]
        return float(np.mean(kept)) if kept else math.nan

    summary: dict[str, float | int] = {
        "labels": len(present),
        "missed": sum(1 for s in present if not math.isfinite(s.hd95_mm)),
        "dice": mean(s.dice for s in present),
        "iou": mean(s.iou for s in present),
        "hd95_mm": mean(s.hd95_mm for s in present),
        "msd_mm": mean(s.msd_mm for s in present),
    }
    if any(s.lesion_f1 is not None for s in scores):
        for field in _LESION_FIELDS:
            summary[field] = mean(getattr(s, field) for s in present)
    return summary


def _cell(value: float | int | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def scores_table(scores: Sequence[LabelScore]) -> str:
    """An aligned plain-text table (one row per label, then the mean row) for a terminal.

    Labels absent from the reference are marked ``*`` and left out of the mean.
    """
    lesion = any(s.lesion_f1 is not None for s in scores)
    header = ["value", "name", "dice", "iou", "hd95 mm", "msd mm", "pred mL", "ref mL"]
    if lesion:
        header += ["lesions ref", "lesions pred", "recall", "precision", "F1"]
    rows = []
    for s in scores:
        row = [str(s.value), s.name + ("" if s.present else " *"), _cell(s.dice, 4),
               _cell(s.iou, 4), _cell(s.hd95_mm, 2), _cell(s.msd_mm, 2),
               _cell(s.volume_pred_ml, 2), _cell(s.volume_ref_ml, 2)]
        if lesion:
            row += [_cell(s.lesions_reference, 0), _cell(s.lesions_predicted, 0),
                    _cell(s.lesion_recall, 3), _cell(s.lesion_precision, 3),
                    _cell(s.lesion_f1, 3)]
        rows.append(row)
    summary = mean_scores(scores)
    missed = f", {summary['missed']} missed" if summary["missed"] else ""
    mean_row = ["", f"mean ({summary['labels']} labels{missed})", _cell(summary["dice"], 4),
                _cell(summary["iou"], 4), _cell(summary["hd95_mm"], 2),
                _cell(summary["msd_mm"], 2), "", ""]
    if lesion:
        mean_row += ["", ""] + [_cell(summary[f], 3) for f in _LESION_FIELDS]
    widths = [max(len(r[i]) for r in [header, *rows, mean_row]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Names left-aligned, numbers right-aligned so decimal points line up.
        padded = (
            c.ljust(w) if i == 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), rule, *(line(r) for r in rows), rule, line(mean_row)]
    if any(not s.present for s in scores):
        lines.append("* not in the reference: not part of the mean")
    return "\n".join(lines) + "\n"


def write_scores(
    scores: Sequence[LabelScore], path: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write the scores to ``path``: CSV (``.csv``) or JSON (``.json``); returns the path.

    CSV: one row per label, columns named as the :class:`LabelScore` fields (lesion columns only
    if scored); non-finite values as ``inf`` / ``nan``, missing ones empty. JSON:
    ``{"labels": [...one object per label...], "mean": mean_scores(...)}`` with non-finite
    values as ``null`` so every JSON reader accepts it. The file appears in one step; an
    existing file is refused unless ``overwrite``.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise TransferSegError(
            f"Cannot write scores to {target}: give a file name ending in .csv or .json."
        )
    lesion = any(s.lesion_f1 is not None for s in scores)
    columns = [
        f.name for f in fields(LabelScore) if lesion or not f.name.startswith("lesion")
    ]
    rows = [{c: asdict(s)[c] for c in columns} for s in scores]
    with atomic_output(target, overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            if suffix == ".csv":
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            else:
                document = {"labels": rows, "mean": mean_scores(scores)}
                json.dump(json_safe(document), handle, indent=2, allow_nan=False)
                handle.write("\n")
    return target
