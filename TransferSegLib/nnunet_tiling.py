"""nnU-Net's sliding window, so an imported nnU-Net model segments as nnU-Net's predictor does.

nnU-Net v2 (``nnunetv2.inference``) pads a volume smaller than the patch to the patch size
(zeros, centred), places tiles at the starts :func:`tile_starts` gives (at most half a patch
apart by default, spread evenly so that the last tile ends at the volume's edge), weighs each
tile's logits by :func:`gaussian_weights` (a Gaussian of sigma 1/8 of the patch, peak 10, zero
tails raised to the smallest nonzero weight), optionally averages each tile over its mirror
images along the allowed axes, and divides the weighted sum by the summed weights. The logits
are returned; the caller takes softmax and argmax. nnU-Net's predictor sums the weighted
logits in float16; with ``accumulate=torch.float16`` (what an imported nnU-Net model's card
asks for) this module does the same and gives its labels voxel for voxel; in float32 the sums
are more precise and the labels differ from nnU-Net's where two logits are within its float16
rounding (0.3 % of the voxels of the sample CT with the test fixture).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from TransferSegLib.tiling import evaluating


def tile_starts(size: int, tile: int, step_size: float = 0.5) -> list[int]:
    """Start indices of the tiles along one axis (``size`` >= ``tile``), as nnU-Net places them."""
    if size <= tile:
        return [0]
    count = math.ceil((size - tile) / (tile * step_size)) + 1
    step = (size - tile) / (count - 1)
    return [int(np.round(step * i)) for i in range(count)]


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """A unit impulse at ``size // 2`` filtered by a Gaussian of ``sigma`` truncated at four
    sigma, with zeros beyond the array (scipy's ``gaussian_filter``, mode constant)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.zeros(size, np.float64)
    centre = size // 2
    for offset, weight in zip(range(-radius, radius + 1), kernel, strict=True):
        if 0 <= centre + offset < size:
            out[centre + offset] = weight
    return out


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 1 / 8, peak: float = 10.0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """nnU-Net's importance map for a tile of ``patch`` (Z, Y, X) voxels in ``dtype``; weights
    that are zero in that type are raised to its smallest nonzero one, as nnU-Net does."""
    axes = [_gaussian_1d(int(p), int(p) * sigma_scale) for p in patch]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max() / peak
    weights = torch.from_numpy(weights).to(dtype)
    zero = weights == 0
    weights[zero] = weights[~zero].min()
    return weights


def _pad_to(array: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``array`` (C, Z, Y, X) padded with zeros to at least ``patch``, centred; and the slices
    of the original inside it."""
    pads, keep = [], []
    for size, tile in zip(array.shape[1:], patch, strict=True):
        missing = max(int(tile) - int(size), 0)
        below = missing // 2
        pads.append((below, missing - below))
        keep.append(slice(below, below + int(size)))
    flat = [v for pair in reversed(pads) for v in pair]
    if any(flat):
        array = torch.nn.functional.pad(array, flat)
    return array, tuple(keep)


def predict_logits(
    model: torch.nn.Module,
    array: np.ndarray,
    patch: Sequence[int],
    *,
    device: torch.device,
    out_channels: int,
    step_size: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    progress: bool = False,
    accumulate: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits (C, Z, Y, X) float32 on the CPU for a model-space array (in_C, Z, Y, X).

    ``patch`` and ``mirror_axes`` are in array order (0 = Z, 1 = Y, 2 = X); mirror images are
    averaged in the order nnU-Net takes them (each axis, then each pair, then all three).
    ``accumulate``: the type of the weighted sums; ``torch.float16`` is what nnU-Net's
    predictor uses (weights, sums and the final division in half precision), and gives its
    labels exactly."""
    inputs, keep = _pad_to(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
                           patch)
    shape = inputs.shape[1:]
    starts = [tile_starts(int(s), int(p), step_size) for s, p in zip(shape, patch, strict=True)]
    corners = list(itertools.product(*starts))
    weights = gaussian_weights(patch, dtype=accumulate)
    logits = torch.zeros((out_channels, *shape), dtype=accumulate)
    total = torch.zeros(shape, dtype=accumulate)
    flips = [tuple(a + 2 for a in c) for r in range(1, len(mirror_axes) + 1)
             for c in itertools.combinations(list(mirror_axes), r)]
    model = model.to(device).eval()
    done = 0
    with evaluating(device):
        for first in range(0, len(corners), max(int(batch_size), 1)):
            chunk = corners[first:first + max(int(batch_size), 1)]
            windows = [tuple(slice(c, c + int(p)) for c, p in zip(corner, patch, strict=True))
                       for corner in chunk]
            batch = torch.stack([inputs[(slice(None), *w)] for w in windows]).to(device)
            out = model(batch).float()
            for axes in flips:
                out += torch.flip(model(torch.flip(batch, axes)).float(), axes)
            out /= len(flips) + 1
            out = out.cpu()
            for window, tile in zip(windows, out, strict=True):
                tile *= weights  # in float32; the sum below rounds to the accumulation type
                logits[(slice(None), *window)] += tile
                total[window] += weights
            done += len(chunk)
            if progress:
                print(f"tiles {done}/{len(corners)}", flush=True)
    torch.div(logits, total, out=logits)
    return logits[(slice(None), *keep)].float().contiguous()
