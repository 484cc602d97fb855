"""From a scan as it was acquired to what a network sees, and back again exactly.

The forward path (:func:`to_model_space`) reorients a volume to the model's axis order
(``orientation``, DICOM convention: ``"LPS"`` means the axes point left, posterior, superior,
which is ITK's identity direction), resamples it to the model's voxel spacing (mm, x y z order)
and normalises intensities per modality. The inverse (:func:`label_to_input`,
:func:`probabilities_to_input`) resamples model-space outputs onto the input's exact voxel grid
(size, spacing, origin, direction), so a segmentation overlays its scan voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from TransferSegLib.errors import InputError
from TransferSegLib.isolation import sitk  # imported on first use
from TransferSegLib.volumes import Geometry, max_voxels

# Defaults per modality. CT: Hounsfield units clipped to a soft-tissue-and-bone window, scaled
# to [0, 1]. MR: arbitrary units, so clip to robust percentiles and z-score.
CT_WINDOW = (-1000.0, 1000.0)
MR_PERCENTILES = (0.5, 99.5)


def default_normalisation(modality: str) -> dict:
    """The normalisation recipe (a JSON-able dict) used for ``modality`` unless told otherwise."""
    if modality.upper() == "CT":
        return {"kind": "ct", "window": list(CT_WINDOW)}
    if modality.upper() in ("MR", "MRI"):
        return {"kind": "mr", "percentiles": list(MR_PERCENTILES)}
    return {"kind": "zscore"}


def normalise(array: np.ndarray, recipe: Mapping, in_place: bool = False) -> np.ndarray:
    """Intensities of ``array`` (any shape) normalised by ``recipe``; returns float32.

    Recipes: ``{"kind": "ct", "window": [lo, hi]}`` (HU clipped, mapped to [0, 1]; with
    ``"scale": false`` clipped only, kept in HU; with ``"mean"`` and ``"std"`` clipped, then
    ``(x - mean) / std``: nnU-Net's CTNormalization with its dataset's statistics);
    ``{"kind": "mr", "percentiles": [p_lo, p_hi]}`` (clipped to the volume's percentiles, then
    zero mean and unit variance, or ``"output_mean"`` and ``"output_std"`` if given);
    ``{"kind": "zscore"}`` (with ``"nonzero": true``: statistics
    of the nonzero voxels only, zeros kept, as MONAI's ``NormalizeIntensity(nonzero=True)``);
    ``{"kind": "rescale"}`` (the volume's minimum to 0, its maximum to 1);
    ``{"kind": "rgb"}`` (divided by 255); ``{"kind": "none"}``;
    ``{"kind": "channels", "channels": [recipe, ...]}`` holds one recipe per input channel
    (:func:`channel_recipe` picks one; :func:`to_model_space` takes the channel). With
    ``in_place`` a float32 ``array`` is overwritten instead of copied (saves memory).
    """
    kind = recipe.get("kind")
    data = np.asarray(array, dtype=np.float32)
    if not (in_place and data is array):
        data = data.copy()
    if kind == "ct":
        lo, hi = (float(v) for v in recipe.get("window", CT_WINDOW))
        if not hi > lo:
            raise InputError(f"CT window {lo}..{hi} is empty; the upper bound must be larger.")
        np.clip(data, lo, hi, out=data)
        if "mean" in recipe or "std" in recipe:
            data -= float(recipe.get("mean", 0.0))
            data /= max(float(recipe.get("std", 1.0)), 1e-8)
            return data
        if recipe.get("scale", True) is False:
            return data
        data -= lo
        data /= hi - lo
        return data
    if kind == "mr":
        p_lo, p_hi = recipe.get("percentiles", MR_PERCENTILES)
        lo, hi = np.percentile(data, [float(p_lo), float(p_hi)])
        np.clip(data, lo, hi, out=data)
        data = _zscore(data)
        if "output_mean" in recipe or "output_std" in recipe:  # deepbet: 0.449, 0.226
            data *= float(recipe.get("output_std", 1.0))
            data += float(recipe.get("output_mean", 0.0))
        return data
    if kind == "zscore":
        if recipe.get("nonzero"):
            inside = data != 0
            if inside.any():
                data[inside] = _zscore(data[inside])
            return data
        return _zscore(data)
    if kind == "rescale":
        lo, hi = float(data.min(initial=0.0)), float(data.max(initial=0.0))
        data -= lo
        data /= max(hi - lo, 1e-8)
        return data
    if kind == "rgb":
        data /= 255.0
        return data
    if kind == "none":
        return data
    raise InputError(
        f"Unknown intensity normalisation {kind!r}; use 'ct', 'mr', 'zscore', 'rescale', 'rgb' "
        "or 'none'."
    )


def channel_recipe(recipe: Mapping, channel: int) -> Mapping:
    """The normalisation of input channel ``channel``: ``recipe`` itself, or its entry in a
    ``{"kind": "channels", "channels": [...]}`` recipe."""
    if recipe.get("kind") != "channels":
        return recipe
    channels = recipe.get("channels")
    if not isinstance(channels, list) or not 0 <= channel < len(channels) or \
            not isinstance(channels[channel], Mapping):
        raise InputError(f"The normalisation has no recipe for input channel {channel}; the "
                         "model card lists one per channel.")
    return channels[channel]


def _zscore(data: np.ndarray) -> np.ndarray:
    """``data`` (float32, owned by the caller) standardised in place."""
    mean, std = float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))
    data -= mean
    data /= std if std > 1e-8 else 1.0
    return data


def model_grid(image: sitk.Image, spacing: Sequence[float], orientation: str = "LPS") -> Geometry:
    """The model-space grid covering ``image``: axes in ``orientation``, voxels of ``spacing``.

    The first voxel centre stays where it was and the grid covers the same physical extent
    (rounded to whole voxels), as nnU-Net does. Orientation ``""`` keeps the scan's axes.
    """
    oriented = _orient_information(image, orientation) if orientation else image
    old_spacing = np.array(oriented.GetSpacing())
    new_spacing = np.array([float(s) for s in spacing])
    if new_spacing.shape != (3,) or np.any(new_spacing <= 0):
        raise InputError(f"Model spacing {list(spacing)} must be three positive numbers (mm).")
    # A spacing equal but for float32 storage (NIfTI keeps 0.8 as 0.800000011920929) is the
    # scan's own: keeping it exactly spares a resampling there and back.
    same = np.isclose(new_spacing, old_spacing, rtol=1e-6, atol=0)
    new_spacing = np.where(same, old_spacing, new_spacing)
    size = np.maximum(1, np.round(np.array(oriented.GetSize()) * old_spacing / new_spacing))
    return Geometry(
        tuple(int(v) for v in size),
        tuple(float(v) for v in new_spacing),
        tuple(float(v) for v in oriented.GetOrigin()),
        tuple(float(v) for v in oriented.GetDirection()),
    )


def nnunet_grid(image: sitk.Image, spacing: Sequence[float]) -> Geometry:
    """The grid nnU-Net resamples ``image`` to (its own axes): ``round(size * old / new)``
    voxels per axis covering exactly the scan's extent (voxel edges aligned, so the voxel size
    is the extent over the count, within half a voxel of ``spacing``)."""
    old_spacing = np.array(image.GetSpacing(), dtype=np.float64)
    old_size = np.array(image.GetSize(), dtype=np.float64)
    target = np.array([float(s) for s in spacing])
    if target.shape != (3,) or np.any(target <= 0):
        raise InputError(f"Model spacing {list(spacing)} must be three positive numbers (mm).")
    size = np.round(old_spacing / target * old_size).astype(int)
    if np.array_equal(size, old_size.astype(int)):
        return Geometry.of(image)
    size = np.maximum(size, 1)
    new_spacing = old_size * old_spacing / size
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    return Geometry(tuple(int(v) for v in size), tuple(float(v) for v in new_spacing),
                    tuple(float(v) for v in origin), image.GetDirection())


def _orient_information(image: sitk.Image, orientation: str) -> sitk.Image:
    """A voxel-free stand-in for ``image`` reoriented (only its geometry is needed)."""
    stand_in = sitk.Image([int(s) for s in image.GetSize()], sitk.sitkUInt8)
    stand_in.CopyInformation(image)
    try:
        return sitk.DICOMOrient(stand_in, orientation)
    except RuntimeError:
        raise InputError(
            f"Orientation {orientation!r} is not a three-letter code such as 'LPS' or 'RAS'."
        ) from None


def resample(
    image: sitk.Image, grid: Geometry, interpolator: int | None = None, default: float = 0.0
) -> sitk.Image:
    """``image`` resampled onto ``grid`` (physical space unchanged; identity transform; linear
    unless ``interpolator``, a SimpleITK interpolator)."""
    interpolator = sitk.sitkLinear if interpolator is None else interpolator
    reference = grid.blank()
    # The grids cover the same extent up to half a voxel; voxels just outside the source take
    # the nearest edge value rather than ``default``.
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default,
                         image.GetPixelID(), True)


def to_model_space(
    image: sitk.Image,
    spacing: Sequence[float],
    normalisation: Mapping | None = None,
    orientation: str = "LPS",
    channel: int = 0,
    nnunet: bool = False,
) -> tuple[np.ndarray, Geometry]:
    """A scan as the network sees it: ``(array (Z, Y, X) float32, model-space grid)``.

    Linear interpolation for intensities; values outside the scan take its minimum. ``channel``
    picks the recipe of a per-channel normalisation. With ``nnunet`` (an imported nnU-Net
    model), as nnU-Net's preprocessing: intensities normalised on the scan's own grid, then
    resampled by cubic B-spline onto :func:`nnunet_grid` (the scan's axes; no reorientation).
    """
    if nnunet:
        return _nnunet_model_space(image, spacing, normalisation, channel)
    grid = model_grid(image, spacing, orientation)
    _check_budget(image, grid)
    if grid == Geometry.of(image):  # already in model space: no resampling, one copy
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    else:
        scan = sitk.Cast(image, sitk.sitkFloat32)
        background = float(np.min(sitk.GetArrayViewFromImage(scan)))
        array = sitk.GetArrayFromImage(resample(scan, grid, sitk.sitkLinear, background))
    if normalisation is not None:
        array = normalise(array, channel_recipe(normalisation, channel), in_place=True)
    return array, grid


def _nnunet_model_space(image: sitk.Image, spacing: Sequence[float],
                        normalisation: Mapping | None, channel: int
                        ) -> tuple[np.ndarray, Geometry]:
    grid = nnunet_grid(image, spacing)
    _check_budget(image, grid)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if normalisation is not None:
        array = normalise(array, channel_recipe(normalisation, channel),
                          in_place=array is not sitk.GetArrayViewFromImage(image))
    if grid == Geometry.of(image):
        return array, grid
    low, high = float(array.min()), float(array.max())
    normalised = sitk.GetImageFromArray(array)
    normalised.CopyInformation(image)
    # Edge values repeated beyond the scan, as scipy's spline ("nearest" mode) extends it; ITK
    # would mirror it. Ten voxels: the spline's prefilter has decayed to 2e-6 by then.
    normalised = sitk.ZeroFluxNeumannPad(normalised, [10] * 3, [10] * 3)
    resampled = sitk.GetArrayFromImage(resample(normalised, grid, sitk.sitkBSpline))
    # skimage's resize, which nnU-Net uses, clips the spline's overshoot to the input's range
    return np.clip(resampled, low, high, out=resampled), grid


def _check_budget(image: sitk.Image, grid: Geometry) -> None:
    """Refuse a model-space grid above ``TRANSFERSEG_MAX_VOXELS`` (finer voxels than the scan's
    multiply its size) before allocating it, naming the setting."""
    voxels = int(np.prod(grid.size, dtype=np.float64))
    if voxels > max_voxels():
        raise InputError(
            f"At the model's {' x '.join(f'{s:.3g}' for s in grid.spacing)} mm voxels this "
            f"{' x '.join(map(str, image.GetSize()))} scan becomes "
            f"{' x '.join(map(str, grid.size))} = {voxels:.3g} voxels, more than the memory "
            f"limit of {max_voxels():.3g} (TRANSFERSEG_MAX_VOXELS); crop the scan to the "
            "region to segment, or raise TRANSFERSEG_MAX_VOXELS if the computer has the memory."
        )


def label_to_model_space(label: sitk.Image, grid: Geometry) -> np.ndarray:
    """A label map on the model-space ``grid`` by nearest neighbour: (Z, Y, X), values kept."""
    return sitk.GetArrayFromImage(resample(label, grid, sitk.sitkNearestNeighbor, 0))


def label_fractions(label: sitk.Image, grid: Geometry, values: Sequence[int]) -> np.ndarray:
    """Per-label voxel fractions on the model grid: (len(values), Z, Y, X) float32 in [0, 1].

    Each label's mask is resampled linearly (after a Gaussian of half the spacing increase
    where the grid is coarser, so thin structures are averaged rather than skipped). Unlike
    nearest neighbour this keeps sub-voxel boundary positions, so :func:`probabilities_to_input`
    followed by argmax restores the label map (Dice >= 0.99 at 1 mm model spacing on the samples).
    """
    array = sitk.GetArrayViewFromImage(label)
    sigma = [max(new - old, 0.0) / 2 for old, new in zip(label.GetSpacing(), grid.spacing,
                                                             strict=True)]
    out = []
    for value in values:
        mask = sitk.GetImageFromArray((array == value).astype(np.float32))
        mask.CopyInformation(label)
        if max(sigma) > 0:
            mask = sitk.SmoothingRecursiveGaussian(mask, [max(s, 1e-3) for s in sigma])
        out.append(sitk.GetArrayFromImage(resample(mask, grid, sitk.sitkLinear, 0.0)))
    return np.stack(out)


def label_to_input(label: np.ndarray, grid: Geometry, reference: sitk.Image) -> sitk.Image:
    """A model-space label array (Z, Y, X) put back on the exact grid of ``reference``."""
    image = _on_grid(label, grid)
    back = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         image.GetPixelID(), True)
    return back


def probabilities_to_input(
    probabilities: np.ndarray, grid: Geometry, reference: sitk.Image
) -> np.ndarray:
    """Model-space class probabilities (C, Z, Y, X) linearly resampled onto ``reference``'s grid.

    Returns (C, Z', Y', X') float32 on the input grid; argmax of it is the segmentation. Done
    one channel at a time so memory stays at two volumes beyond the input.
    """
    channels = []
    for channel in probabilities:
        image = _on_grid(np.ascontiguousarray(channel, dtype=np.float32), grid)
        back = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32, True)
        channels.append(sitk.GetArrayFromImage(back))
    return np.stack(channels)


def _on_grid(array: np.ndarray, grid: Geometry) -> sitk.Image:
    if tuple(array.shape[::-1]) != grid.size:
        raise ValueError(f"array of shape {array.shape} does not fit grid of size {grid.size}")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image
