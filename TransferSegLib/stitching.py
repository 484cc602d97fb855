"""Labels from a sliding window that keeps one slab of scores in memory, not the whole volume.

The windows, their Gaussian weights and their padding are MONAI's ``sliding_window_inference``
(``mode="gaussian"``): the same patch starts (``dense_patch_slices``), the same importance map
(``compute_importance_map``, sigma 1/8 of the patch), a volume thinner than a patch padded
the same way. What differs is what is kept. MONAI blends every window into a (C, Z, Y, X)
score volume and a (Z, Y, X) weight volume and divides; the label of a voxel is then the
channel of the largest blended score. The weight is the same for every channel of a voxel, so
the division does not change which channel is largest, and it is left out. Windows come in
order of their first plane (z); once a window starts at plane ``z``, no later window touches
the planes before ``z``, so their labels are final: they are taken then, and their scores
dropped. The scores live in a ring of one patch's depth of planes (``patch_z`` x Y x X per
channel), reused as the windows move down the volume.

A ring that would take more than ``HALF_ABOVE`` bytes in float32 (a CT-sized scan, not a small
crop, where memory is no concern) holds float16 scores instead. Before a window's scores are
added, each voxel's largest score is subtracted from all of its channels: the same amount for
every channel of a voxel, so the blend's argmax is unchanged, and the scores that compete for
a voxel sit near zero, where float16 is finest. A score so far below its voxel's largest that
the sum could overflow is clipped (it cannot win there).

Memory: C x patch_z x Y x X scores for the ring instead of (C + 1) x Z x Y x X floats for
MONAI's output and weights (a 512 x 512 x 200 CT, 96^3 patches, 4 labels: 0.07 GiB of float16
instead of 1.0 GiB), and no full-volume argmax. The labels can differ from MONAI's only where
two channels' blended scores are within rounding of each other: float32's, or float16's
(``bench/inference.py`` counts the voxels that differ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from TransferSegLib.tiling import Windows, channels_last, evaluating, groups, ready

_PLANES = 16  # planes at a time when labels are taken from the ring
HALF_ABOVE = 64 * 2**20  # bytes of a float32 ring above which it holds float16


def _largest(scores: torch.Tensor) -> torch.Tensor:
    """Index of the first largest channel per voxel of ``scores`` (C, ...), as ``argmax``
    gives it, by a running maximum: on the ring's strided slices torch's argmax took 0.1 s per
    8 planes of a 512 x 512 CT, this a small fraction of it."""
    best_value = scores[0].clone()
    best = torch.zeros(best_value.shape, dtype=torch.uint8 if len(scores) < 256 else torch.int32,
                       device=scores.device)
    for channel in range(1, len(scores)):
        better = scores[channel] > best_value  # strictly: a tie keeps the first, as argmax
        best.masked_fill_(better, channel)
        torch.maximum(best_value, scores[channel], out=best_value)
    return best


def _pad_widths(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) per axis that make a volume at least one patch: MONAI's split of the
    difference (half before, the rest after)."""
    widths = []
    for size, roi in zip(shape, patch, strict=True):
        diff = max(roi - size, 0)
        widths.append((diff // 2, diff - diff // 2))
    return widths


def _ring(start: int, count: int, depth: int) -> list[tuple[slice, slice]]:
    """(ring slots, offsets) for ``count`` planes from plane ``start`` in a ring of ``depth``
    planes: one or two contiguous pieces."""
    first = start % depth
    head = min(count, depth - first)
    pieces = [(slice(first, first + head), slice(0, head))]
    if head < count:
        pieces.append((slice(0, count - head), slice(head, count)))
    return pieces


def predict_labels(model: torch.nn.Module, array: np.ndarray, windows: Windows, *,
                   device: torch.device, out_channels: int, progress: bool = False,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None,
                   accumulate: torch.dtype | None = None) -> np.ndarray:
    """Channel index of the largest blended score per voxel (Z, Y, X) for an array
    (in_C, Z, Y, X) in ``windows``; uint8, or uint16 past 255 channels.

    The labels are those of :func:`TransferSegLib.inference.predict_logits`'s argmax, without
    its (C, Z, Y, X) volume. With ``transform`` (a voxel-wise normalisation), ``array`` is the
    scan itself (e.g. int16 HU) and each batch of windows is normalised as it is cut: no float
    copy of the whole scan. It must then be at least one patch in size (padding happens in
    model space). ``accumulate`` is the ring's type, float16 (half the memory; the module's
    notes say what it changes) or float32; None: float16 for a ring of more than
    ``HALF_ABOVE`` bytes in float32.
    """
    from monai.data.utils import compute_importance_map, dense_patch_slices

    patch, overlap = tuple(int(v) for v in windows.patch), windows.overlap
    shape = tuple(array.shape[1:])
    pads = _pad_widths(shape, patch)
    inputs = np.asarray(array, dtype=None if transform else np.float32)
    if any(before or after for before, after in pads):
        if transform is not None:
            raise ValueError("a transformed array must be at least one patch in size")
        inputs = np.pad(inputs, [(0, 0), *pads],
                        mode="edge" if windows.padding == "edge" else "constant")
    padded = inputs.shape[1:]
    intervals = [roi if roi == size else max(int(roi * (1 - overlap)), 1)
                 for roi, size in zip(patch, padded, strict=True)]
    boxes = dense_patch_slices(padded, patch, intervals)  # MONAI's windows, z-major
    # The ring runs along the axis where it is thinnest against the volume (z for a volume of
    # few, thick slices; y or x for a CT of many): C x patch x the other two sides.
    axis = min(range(3), key=lambda a: patch[a] / padded[a])
    boxes = sorted(boxes, key=lambda w: w[axis].start)  # stable: MONAI's order within
    model = ready(model, device)
    stitch = device if device.type == "cuda" else torch.device("cpu")
    weights = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device=stitch,
                                     dtype=torch.float32)
    depth = patch[axis]
    ring_shape = [out_channels, *padded]
    ring_shape[1 + axis] = depth
    if accumulate is None:
        large = 4 * int(np.prod(ring_shape)) > HALF_ABOVE
        accumulate = torch.float16 if large else torch.float32
    ring = torch.zeros(ring_shape, dtype=accumulate, device=stitch)
    narrow = torch.finfo(accumulate).bits < 32
    # A voxel's blended score sums at most ``covering`` weighted outputs (weights <= 1): a
    # score is clipped where it would make the sum overflow the ring's type.
    covering = int(np.prod([-(-roi // step) for roi, step in zip(patch, intervals, strict=True)]))
    limit = float(torch.finfo(accumulate).max) / covering
    labels = np.zeros(padded, np.uint8 if out_channels < 256 else np.uint16)
    done = 0  # planes (along ``axis``) before this one have their labels

    def along(index: slice, rest: Sequence[slice] = (slice(None),) * 3) -> tuple[slice, ...]:
        return tuple(index if a == axis else rest[a] for a in range(3))

    def finish(stop: int) -> None:
        nonlocal done
        for slots, offsets in _ring(done, stop - done, depth):
            # a few planes at a time: the running maximum stays small
            for first in range(slots.start, slots.stop, _PLANES):
                last = min(first + _PLANES, slots.stop)
                scores = ring[(slice(None), *along(slice(first, last)))]
                plane = done + offsets.start + first - slots.start
                labels[along(slice(plane, plane + last - first))] = \
                    _largest(scores).cpu().numpy()
                scores.zero_()
        done = stop

    with evaluating(device):
        for group in groups(boxes, windows.batch_size, progress):
            batch = np.stack([inputs[(slice(None), *w)] for w in group])
            batch = torch.from_numpy(transform(batch) if transform else batch)
            outputs = model(channels_last(batch.to(device)))
            for window, output in zip(group, outputs, strict=True):
                start = window[axis].start
                if start > done:
                    finish(start)
                output = output.to(stitch, torch.float32)
                if narrow:  # see the module's notes
                    output -= output.amax(dim=0, keepdim=True)
                    output.clamp_(min=-limit)
                output.mul_(weights)
                for slots, offsets in _ring(start, depth, depth):
                    ring[(slice(None), *along(slots, window))] += \
                        output[(slice(None), *along(offsets))]
            del batch, outputs
    finish(padded[axis])
    inner = tuple(slice(before, before + size) for (before, _), size in zip(pads, shape,
                                                                            strict=True))
    return np.ascontiguousarray(labels[inner])
