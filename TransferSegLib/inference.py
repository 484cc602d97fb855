"""Segmenting a whole volume with a TransferSeg model, back in the input's exact geometry.

The scan is taken to model space (orientation, spacing, normalisation from the model card),
cut into overlapping patches of the model's patch size, each patch run through the network
(on the GPU when there is one), and the patch outputs blended with Gaussian weights into one
probability volume (MONAI's ``sliding_window_inference``). When the stitched volume would not
fit in GPU memory it is stitched in CPU memory while the patches still run on the GPU. The
probabilities are then resampled onto the input grid and the most likely label taken per voxel.
When the scan is already on the model's grid and only labels are wanted, the same windows and
weights are blended a slab at a time and each voxel's label taken as soon as it is final
(:mod:`TransferSegLib.stitching`): no whole-volume scores, and a CT is normalised a window at
a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from TransferSegLib import networks, preprocess, segmentations, volumes
from TransferSegLib.errors import InputError, TransferSegError
from TransferSegLib.files import refuse_existing
from TransferSegLib.isolation import sitk  # imported on first use
from TransferSegLib.tiling import Windows, channels_last, evaluating, ready


def select_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; or a torch device string."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {name!r} was asked for, but no CUDA GPU is available; use cpu.")
    return device


@dataclass
class SegmentationResult:
    """A label map on the input grid, its table {value: name}, optional probabilities.

    ``probabilities`` is (C, Z, Y, X) float32 on the input grid, channel order of the model.
    """

    label: sitk.Image
    labels: dict[int, str]
    probabilities: np.ndarray | None = None

    def volumes_ml(self) -> dict[str, float]:
        """Each label's volume in mL, in the table's order (background left out); 0.0 for a
        label the model found nowhere in the scan."""
        counts = np.bincount(sitk.GetArrayViewFromImage(self.label).ravel().astype(np.int64),
                             minlength=max(self.labels, default=0) + 1)
        voxel_ml = float(np.prod(self.label.GetSpacing())) / 1000.0
        return {name: float(counts[value]) * voxel_ml
                for value, name in self.labels.items() if value != 0}


def describe_volumes(volumes_ml: dict[str, float]) -> str:
    """What a segmentation found, for a log line: each structure's volume, and the structures
    found nowhere named apart, since a model fine-tuned on a scan or two can miss a structure
    on a scan unlike them."""
    found = [f"{name} {value:,.1f} mL" if value >= 0.1 else f"{name} < 0.1 mL"
             for name, value in volumes_ml.items() if value > 0]
    missing = [name for name, value in volumes_ml.items() if value <= 0]
    text = ", ".join(found) if found else "nothing found"
    if missing:
        them = "it" if len(missing) == 1 else "them"
        text += (f"; NOT FOUND: {', '.join(missing)} (if the scan shows {them}, draw {them} "
                 "in Segment Editor and fine-tune again with this scan added)")
    return text


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out (CPU, CUDA or Apple MPS)."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        words in text for words in ("out of memory", "can't allocate memory",
                                    "defaultcpuallocator", "not enough memory"))


def _stitch_device(device: torch.device, channels: int, shape: Sequence[int]) -> torch.device:
    """Stitch on the GPU when the output and its weight map take < half its free memory."""
    if device.type != "cuda":
        return device
    need = (channels + 1) * int(np.prod(shape)) * 4
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free // 2 else torch.device("cpu")


def predict_logits(model: torch.nn.Module, array: np.ndarray, windows: Windows, *,
                   device: torch.device, out_channels: int, progress: bool = False
                   ) -> torch.Tensor:
    """Blended network outputs (C, Z, Y, X) float32 on the CPU for an array (in_C, Z, Y, X),
    in ``windows`` (MONAI's ``sliding_window_inference``)."""
    from monai.inferers import sliding_window_inference

    inputs = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    model = ready(model, device)
    stitch = _stitch_device(device, out_channels, inputs.shape[2:])
    with evaluating(device):  # callers update the result in place (softmax_)
        logits = sliding_window_inference(
            inputs, roi_size=tuple(windows.patch), sw_batch_size=windows.batch_size,
            predictor=lambda batch: model(channels_last(batch)), overlap=windows.overlap,
            mode="gaussian", sw_device=device,
            device=stitch, padding_mode="replicate" if windows.padding == "edge" else "constant",
            progress=progress,
        )
    return logits[0].float().cpu()


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the channel axis (dim 0) computed in place: no second volume."""
    logits -= logits.amax(dim=0, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=0, keepdim=True)
    return logits


def argmax_channels(scores: Iterable[np.ndarray], count: int) -> np.ndarray:
    """Index of the largest of ``count`` score volumes per voxel, as uint8 (uint16 past 255).

    A running maximum over channels given one at a time (a generator may compute each on
    demand): two volumes of memory instead of an int64 argmax over a stacked array.
    """
    scores = iter(scores)
    best_value = np.array(next(scores), dtype=np.float32, copy=True)
    best = np.zeros(best_value.shape, np.uint8 if count < 256 else np.uint16)
    for index, score in enumerate(scores, start=1):
        better = score > best_value
        best[better] = index
        np.maximum(best_value, score, out=best_value)
    return best


def keep_largest(labels: np.ndarray, channels: Iterable[int]) -> np.ndarray:
    """``labels`` (channel indices) with each of ``channels`` cut to its largest connected
    piece (26-connected); the other pieces become background. In place; returns it."""
    from scipy import ndimage

    for channel in channels:
        mask = labels == channel
        if not mask.any():
            continue
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(mask))
        pieces, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
        if count > 1:
            largest = 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
            inner = labels[box]
            inner[(pieces > 0) & (pieces != largest)] = 0
    return labels


def largest_channels(card) -> list[int]:
    """The channels ``card.inference["largest_component"]`` names (labels that were one
    piece in every training scan: :func:`TransferSegLib.recipes.one_piece_labels`)."""
    names = set(card.inference.get("largest_component", ()))
    return [channel for channel, name in card.labels.items() if channel and name in names]


def predict_prepared(model: torch.nn.Module, card, image: np.ndarray,
                     device: torch.device, overlap: float) -> np.ndarray:
    """Labels (channel indices) of an image already in the model's space (C, Z, Y, X), as
    validation and :mod:`TransferSegLib.context` need them: padded as the card says."""
    from TransferSegLib.stitching import predict_labels
    from TransferSegLib.tiling import predict_logits_valid

    patch = tuple(int(v) for v in reversed(card.patch_size))
    valid_output = networks.output_size(card.architecture, card.arguments, patch)
    if valid_output:
        logits = predict_logits_valid(model, image, patch, valid_output, device=device,
                                      out_channels=card.out_channels)
        labels = argmax_channels(logits.numpy(), card.out_channels)
    else:
        windows = Windows(patch, overlap, padding=card.inference.get("padding", "constant"))
        labels = predict_labels(model, image, windows, device=device,
                                out_channels=card.out_channels)
    return keep_largest(labels, largest_channels(card))


def segment(
    model: torch.nn.Module,
    card,
    images: sitk.Image | Sequence[sitk.Image],
    *,
    device: str | torch.device = "auto",
    overlap: float = 0.25,
    batch_size: int = 2,
    keep_probabilities: bool = False,
    progress: bool = False,
    mirror: bool | None = None,
    crop_body: bool | None = None,
    largest_component: bool | None = None,
) -> SegmentationResult:
    """Segment ``images`` (one scan, or one per input channel on a shared grid) with a model.

    ``card`` is the model's :class:`~TransferSegLib.checkpoint.ModelCard`. The label map has
    the input's size, spacing, origin and direction, and values from ``card.label_values``.
    A card with nnU-Net's ``inference`` settings is segmented as nnU-Net does (crop to the
    nonzero region, its tiling; ``overlap`` is then unused); ``mirror`` turns its mirroring
    on or off (default: as the card says). A CT card with ``inference.crop_body`` (a model
    fine-tuned on whole training scans, which learnt their framing) segments the patient's
    body (:func:`body_box`) and gives background outside it; ``crop_body`` overrides the card.
    The labels a card names in ``inference.largest_component`` keep only their largest piece
    (:func:`keep_largest`); ``largest_component=False`` keeps every piece.
    """
    images = [images] if isinstance(images, sitk.Image) else list(images)
    check_options(overlap, batch_size)
    if len(images) != card.in_channels:
        raise InputError(
            f"Model {card.title or card.architecture} takes {card.in_channels} input channel(s) "
            f"but {len(images)} image(s) were given; give one image per channel."
        )
    options = {"device": device, "overlap": overlap, "batch_size": batch_size,
               "keep_probabilities": keep_probabilities, "progress": progress, "mirror": mirror,
               "crop_body": False, "largest_component": largest_component}
    if card.inference.get("crop_body") if crop_body is None else crop_body:
        if preprocess.channel_recipe(card.normalisation or {"kind": "none"}, 0).get(
                "kind") != "ct":
            raise InputError(f"Model {card.title or card.architecture} does not read CT "
                             "intensities: its scans cannot be cropped to the body by HU; "
                             "segment without --body-crop.")
        box = body_box(images[0])
        if box is not None:
            result = segment(model, card, [image[box] for image in images], **options)
            return _uncropped(result, box, images[0])
    if card.inference.get("crop_nonzero"):
        box = nonzero_box(images)
        if box is not None:
            inner = replace(card, inference={**card.inference, "crop_nonzero": False})
            result = segment(model, inner, [image[box] for image in images], **options)
            return _uncropped(result, box, images[0])
    device = select_device(device) if isinstance(device, str) else device
    reference = images[0]
    nnunet = card.inference.get("tiling") == "nnunet" and not card.orientation
    patch = tuple(int(v) for v in reversed(card.patch_size))  # card: (x, y, z)
    valid_output = networks.output_size(card.architecture, card.arguments, patch)
    # Only the labels are wanted: on the grid the network runs on, they are stitched a slab at
    # a time (stitching.py); a CT scan already on that grid is normalised a window at a time.
    labels_wanted = (not keep_probabilities and valid_output is None
                     and card.inference.get("tiling") != "nnunet")
    recipe = preprocess.channel_recipe(card.normalisation or {"kind": "none"}, 0)
    transform = None
    if (labels_wanted and not nnunet and len(images) == 1 and recipe.get("kind") == "ct"
            and all(s >= p for s, p in zip(reversed(reference.GetSize()), patch, strict=True))
            and preprocess.model_grid(reference, card.spacing, card.orientation)
            == volumes.Geometry.of(reference)):
        inputs, grid = sitk.GetArrayViewFromImage(reference)[None], volumes.Geometry.of(reference)

        def transform(batch: np.ndarray) -> np.ndarray:
            return preprocess.normalise(batch, recipe, in_place=batch.dtype == np.float32)
    else:
        channels, grid = [], None
        for channel, image in enumerate(images):
            array, grid = preprocess.to_model_space(image, card.spacing, card.normalisation,
                                                    card.orientation, channel, nnunet=nnunet)
            channels.append(array)
        inputs = channels[0][None] if len(channels) == 1 else np.stack(channels)
        del channels
    same_grid = grid.matches(volumes.Geometry.of(reference), tolerance=0)
    labels_only = same_grid and labels_wanted

    def predict(array: np.ndarray, batch: int) -> torch.Tensor | np.ndarray:
        windows = Windows(patch, overlap, batch, card.inference.get("padding", "constant"))
        if labels_only:
            from TransferSegLib.stitching import predict_labels

            return predict_labels(model, array, windows, device=device,
                                  out_channels=card.out_channels, progress=progress,
                                  transform=transform)
        if card.inference.get("tiling") == "nnunet":
            from TransferSegLib import nnunet_tiling

            use_mirror = mirror if mirror is not None else True
            return nnunet_tiling.predict_logits(
                model, array, patch, device=device, out_channels=card.out_channels,
                step_size=float(card.inference.get("step_size", 0.5)),
                mirror_axes=card.inference.get("mirror_axes", []) if use_mirror else [],
                batch_size=batch, progress=progress,
                accumulate=(torch.float16 if card.inference.get("accumulate") == "float16"
                            else torch.float32))
        if valid_output is None:
            return predict_logits(model, array, windows, device=device,
                                  out_channels=card.out_channels, progress=progress)
        from TransferSegLib.tiling import predict_logits_valid  # valid convolutions

        return predict_logits_valid(model, array, patch, valid_output, device=device,
                                    out_channels=card.out_channels, batch_size=batch,
                                    progress=progress)

    try:
        try:
            logits = predict(inputs, batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            # One patch at a time needs less GPU memory and gives the same segmentation.
            torch.cuda.empty_cache()
            warnings.warn(f"the GPU ran out of memory with {batch_size} patches at a time; "
                          "segmenting one patch at a time", RuntimeWarning, stacklevel=2)
            logits = predict(inputs, 1)
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        size = " x ".join(map(str, grid.size))
        if isinstance(error, torch.cuda.OutOfMemoryError):
            raise TransferSegError(
                f"The GPU ran out of memory segmenting a {size} volume with patches of "
                f"{card.patch_size}, even one patch at a time; use --device cpu."
            ) from None
        need = (card.out_channels + 1 + card.in_channels) * 4 * float(np.prod(grid.size))
        raise TransferSegError(
            f"The computer ran out of memory segmenting a {size} volume in model space "
            f"({card.out_channels} labels, about {need / 2**30:.1f} GiB of scores); close other "
            "programs, use --batch-size 1, or crop the scan to the region to segment."
        ) from None
    del inputs
    count, on_input = card.out_channels, None
    if labels_only:
        best = logits
    elif same_grid and not keep_probabilities:
        best = argmax_channels(logits.numpy(), count)  # softmax keeps the order: skip it
    elif nnunet and not same_grid:
        # As nnU-Net: the logits go back to the scan's grid (linear), then softmax and argmax.
        # nnU-Net keeps the resampled logits in its float16 type.
        rounded = np.float16 if card.inference.get("accumulate") == "float16" else np.float32
        back = [preprocess.probabilities_to_input(c[None], grid, reference)[0]
                .astype(rounded).astype(np.float32) for c in logits.numpy()]
        best = argmax_channels(back, count)
        if keep_probabilities:
            on_input = softmax_(torch.from_numpy(np.stack(back))).numpy()
        del back
    else:
        probabilities = softmax_(logits).numpy()
        if not same_grid:
            # Interpolate probabilities, not labels: boundaries keep sub-voxel positions.
            back = (preprocess.probabilities_to_input(c[None], grid, reference)[0]
                    for c in probabilities)
            probabilities = np.stack(list(back)) if keep_probabilities else back
        best = argmax_channels(probabilities, count)
        on_input = probabilities if keep_probabilities else None
        del probabilities
    del logits
    if largest_component is not False:
        keep_largest(best, largest_channels(card))
    label_of_channel = np.array(
        [int(card.label_values.get(card.labels[c], c)) for c in range(card.out_channels)]
    )
    dtype = np.uint8 if label_of_channel.max(initial=0) < 256 else np.uint16
    label = sitk.GetImageFromArray(label_of_channel.astype(dtype)[best])
    label.CopyInformation(reference)
    table = {int(label_of_channel[c]): card.labels[c] for c in range(len(label_of_channel))
             if label_of_channel[c] != 0}
    return SegmentationResult(label, table, on_input)


def check_options(overlap: float, batch_size: int) -> None:
    """Refuse an overlap outside [0, 1) or a batch below one patch, in the flags' words."""
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or \
            not 0 <= overlap < 1:
        raise InputError(f"--overlap must be at least 0 and below 1 (a share of the patch), "
                         f"not {overlap!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be a whole number of at least 1, not "
                         f"{batch_size!r}.")


def nonzero_box(images: Sequence[sitk.Image]) -> tuple[slice, slice, slice] | None:
    """The (x, y, z) slices of the smallest box holding every nonzero voxel of ``images``
    (nnU-Net's crop), or None when that is the whole volume or nothing is nonzero."""
    inside = None
    for image in images:
        nonzero = sitk.GetArrayViewFromImage(image) != 0
        inside = nonzero if inside is None else inside | nonzero
    if inside is None or not inside.any():
        return None
    box = []
    for axis in range(3):  # array axes (z, y, x)
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(inside.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, inside.shape, strict=True)):
        return None
    return tuple(box[::-1])  # SimpleITK indexes (x, y, z)


BODY_HU = -300.0  # above it: the patient (and the table, the arms), below it air and lung
BODY_MARGIN_MM = 10.0


def body_box(image: sitk.Image) -> tuple[slice, slice, slice] | None:
    """The (x, y, z) slices of the patient's body in a CT (values in HU): the bounding box of
    the largest connected region above :data:`BODY_HU`, widened by :data:`BODY_MARGIN_MM`, so
    the scanner's table, arms held apart from the trunk and the air are left out. Found on a
    grid of about 2 mm whose cells count as body only if all their voxels do (a narrow gap
    between trunk and arm or table stays open). None when that box is the whole scan, or no
    region holds a thousandth of the scan (not a CT of a body)."""
    from scipy import ndimage

    spacing, size = image.GetSpacing(), image.GetSize()
    factors = [min(n, max(1, int(2.0 // s))) for s, n in zip(spacing, size, strict=True)]
    array = sitk.GetArrayViewFromImage(image)
    fz, fy, fx = factors[::-1]
    shape = [n // f for n, f in zip(array.shape, (fz, fy, fx), strict=True)]
    inside = np.empty(shape, bool)
    for z in range(0, shape[0], 8):  # a few slices at a time: no whole-scan copy
        block = array[z * fz:(z + 8) * fz, :shape[1] * fy, :shape[2] * fx]
        depth = block.shape[0] // fz
        inside[z:z + depth] = block[:depth * fz].reshape(
            depth, fz, shape[1], fy, shape[2], fx).min(axis=(1, 3, 5)) > BODY_HU
    regions, count = ndimage.label(inside)
    if not count:
        return None
    sizes = np.bincount(regions.ravel())[1:]
    if sizes.max() < inside.size / 1000:
        return None
    found = ndimage.find_objects((regions == 1 + int(sizes.argmax())).astype(np.uint8))[0]
    box = []
    for axis, cells in zip(range(3), reversed(found), strict=True):  # x, y, z
        margin = factors[axis] + int(np.ceil(BODY_MARGIN_MM / spacing[axis]))
        box.append(slice(max(0, cells.start * factors[axis] - margin),
                         min(size[axis], cells.stop * factors[axis] + margin)))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, size, strict=True)):
        return None
    return tuple(box)


def _uncropped(result: SegmentationResult, box: tuple[slice, slice, slice],
               reference: sitk.Image) -> SegmentationResult:
    """A result computed inside ``box`` put back on ``reference``'s grid: background outside."""
    inside = tuple(box[::-1])  # array order
    array = np.zeros(sitk.GetArrayViewFromImage(reference).shape,
                     sitk.GetArrayViewFromImage(result.label).dtype)
    array[inside] = sitk.GetArrayViewFromImage(result.label)
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(reference)
    probabilities = None
    if result.probabilities is not None:
        probabilities = np.zeros((result.probabilities.shape[0], *array.shape), np.float32)
        probabilities[0] = 1.0
        probabilities[(slice(None), *inside)] = result.probabilities
    return SegmentationResult(label, result.labels, probabilities)


def segment_file(
    model_path: str | Path,
    image_paths: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    overwrite: bool = False,
    probabilities_output: str | Path | None = None,
    device: str = "auto",
    overlap: float = 0.25,
    batch_size: int = 2,
    progress: bool = False,
    mirror: bool | None = None,
    crop_body: bool | None = None,
    largest_component: bool | None = None,
) -> SegmentationResult:
    """Segment image file(s) with the model file and write the label map (atomically).

    A ``.seg.nrrd`` output keeps the model's label names and colours; other formats write a
    label map. Existing outputs are refused unless ``overwrite`` (checked before any work).
    ``mirror``, ``crop_body`` and ``largest_component`` as in :func:`segment`.
    """
    from TransferSegLib.checkpoint import load_model

    check_options(overlap, batch_size)  # before reading anything
    paths = [image_paths] if isinstance(image_paths, (str, Path)) else list(image_paths)
    outputs = [Path(output)] + ([Path(probabilities_output)] if probabilities_output else [])
    for path in outputs:
        volumes.image_format(path)
        refuse_existing(path, overwrite)
        if any(Path(path).resolve() == Path(p).resolve() for p in paths):
            raise InputError(f"Output {path} is also an input; choose another output name.")
    images = [volumes.read_volume(path) for path in paths]
    for path, image in zip(paths[1:], images[1:], strict=True):
        volumes.check_same_grid(images[0], image, str(paths[0]), str(path))
    model, card = load_model(model_path, device="cpu")
    result = segment(model, card, images, device=device, overlap=overlap, batch_size=batch_size,
                     keep_probabilities=probabilities_output is not None, progress=progress,
                     mirror=mirror, crop_body=crop_body, largest_component=largest_component)
    segmentation = segmentations.Segmentation.from_label_map(result.label, result.labels,
                                                       card.terminology)
    segmentations.write_segmentation(segmentation, output, overwrite=overwrite)
    if probabilities_output is not None:
        probabilities = sitk.GetImageFromArray(
            np.moveaxis(result.probabilities, 0, -1), isVector=True
        )
        probabilities.CopyInformation(images[0])
        volumes.write_image(probabilities, probabilities_output, overwrite=overwrite)
    return result
