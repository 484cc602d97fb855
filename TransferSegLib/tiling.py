"""Whole-volume outputs of networks whose output is smaller than their input.

A network of valid (unpadded) convolutions, such as ``diag_unet``, maps an input window of
``input_size`` voxels to the ``output_size`` voxels at its centre, losing
``(input_size - output_size) / 2`` voxels, the margin, on each side. To cover a volume, it is
padded by the margin, then cut into output-sized blocks; each block is computed from the
input-sized window centred on it, and the blocks are put side by side. Every output voxel comes
from exactly one block; the last block along an axis is moved back to end at the volume's edge
(overlapping its neighbour) rather than reading past it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from TransferSegLib.errors import InputError, TransferSegError


def _three(size: int | Sequence[int], what: str) -> tuple[int, int, int]:
    sizes = [size] * 3 if isinstance(size, (int, np.integer)) else list(size)
    if len(sizes) != 3 or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise InputError(f"The {what} must be one or three positive whole numbers, not {size!r}.")
    return tuple(int(s) for s in sizes)  # type: ignore[return-value]


@dataclass(frozen=True)
class Windows:
    """How a network slides over a volume in MONAI's Gaussian-weighted windows.

    ``patch`` is in array order (Z, Y, X); ``batch_size`` windows go through the network at a
    time. A volume thinner than a patch is padded with zeros (``padding="constant"``, as
    published networks expect) or by repeating its edge voxels (``"edge"``: how TransferSeg
    trains, :func:`sampling.sample_patch`; a model card says which). Padded with air, a 9 cm
    slab of an abdomen reads to a network trained on whole scans as a body that ends there,
    and it finds lungs in it (bench/README.md).
    """

    patch: tuple[int, ...]
    overlap: float = 0.25
    batch_size: int = 2
    padding: str = "constant"


def evaluating(device: torch.device) -> contextlib.ExitStack:
    """How every tiler runs a network: without gradients, and under float16 autocast on CUDA."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())  # not inference_mode: callers update results in place
    if device.type == "cuda":
        stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
    return stack


# Where 3D convolutions run channels-last (training and the window tilers alike).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


def ready(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` (itself, moved) as the window tilers run it: on ``device``, in eval mode, and
    with its 3D convolution weights channels-last, as training keeps them. A CPU then runs a
    transposed convolution without an im2col buffer (a 32 -> 4 channel one over two 48^3
    windows: 37 instead of 173 MiB); the UNet of bench/inference.py adds 251 instead of 304
    MiB for two 96^3 windows, in no more time. The labels are those of the default layout but
    at near-ties (2 of 1.8 M voxels there)."""
    model = model.to(device).eval()
    if (device.type in CHANNELS_LAST_DEVICES
            and all(p.dim() == 5 for p in model.parameters() if p.dim() >= 4)):
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def channels_last(batch: torch.Tensor) -> torch.Tensor:
    """A batch (N, C, Z, Y, X) in the layout :func:`ready` and training give the weights."""
    if batch.device.type not in CHANNELS_LAST_DEVICES:
        return batch
    return batch.contiguous(memory_format=torch.channels_last_3d)


def groups(items: Sequence, batch_size: int, progress: bool = False, desc: str = "patches"):
    """``items`` in consecutive lists of ``batch_size`` (the last may be shorter), with a
    progress bar when ``progress``."""
    size = max(1, int(batch_size))
    firsts = range(0, len(items), size)
    if progress:
        from tqdm import tqdm

        firsts = tqdm(firsts, desc=desc, unit="batch")
    for first in firsts:
        yield items[first:first + size]


def block_starts(size: int, block: int) -> list[int]:
    """Start indices of ``block``-sized blocks covering ``size`` voxels: 0, block, 2 block...,
    the last moved back to end at ``size`` (so blocks may overlap there). A volume smaller than
    one block gets the single start 0 (the caller pads it)."""
    if size <= block:
        return [0]
    starts = list(range(0, size - block + 1, block))
    if starts[-1] + block < size:
        starts.append(size - block)
    return starts


def predict_logits_valid(
    model: torch.nn.Module,
    image: np.ndarray,
    input_size: int | Sequence[int],
    output_size: int | Sequence[int],
    *,
    device: torch.device | str = "cpu",
    out_channels: int | None = None,
    batch_size: int = 2,
    pad_value: float | Sequence[float] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Network outputs (C, Z, Y, X) float32 on the CPU for ``image`` (in_C, Z, Y, X).

    ``input_size`` and ``output_size`` (one size or (Z, Y, X)) are the window the network
    reads and the block it gives for it, centred on the window. Outside the volume the window
    reads ``pad_value`` (one value, or one per channel; default each channel's minimum, the air
    of a CT). ``out_channels`` is checked against the network's output when given.
    """
    window = _three(input_size, "network input size")
    block = _three(output_size, "network output size")
    margins = []
    for axis, (w, b) in enumerate(zip(window, block, strict=True)):
        if w < b or (w - b) % 2:
            raise InputError(
                f"A network reading {w} voxels cannot give a centred block of {b} along axis "
                f"{axis}: the difference must be even and not negative."
            )
        margins.append((w - b) // 2)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 4:
        raise InputError(f"Expected an image of shape (channels, Z, Y, X), not {array.shape}.")
    channels, shape = array.shape[0], array.shape[1:]
    if pad_value is None:
        values = [float(c.min()) if c.size else 0.0 for c in array]
    else:
        values = [float(v) for v in np.broadcast_to(np.asarray(pad_value, float), (channels,))]

    # The padded volume: margin on both sides, plus enough after the end for one whole block
    # when the volume is smaller than a block.
    extra = [max(b - s, 0) for b, s in zip(block, shape, strict=True)]
    padded = np.empty((channels, *(s + 2 * m + e for s, m, e in
                                   zip(shape, margins, extra, strict=True))), np.float32)
    for channel, value in enumerate(values):
        padded[channel] = value
    inner = tuple(slice(m, m + s) for m, s in zip(margins, shape, strict=True))
    padded[(slice(None), *inner)] = array

    covered = [s + e for s, e in zip(shape, extra, strict=True)]
    starts = list(itertools.product(*(block_starts(c, b) for c, b in zip(covered, block,
                                                                         strict=True))))
    device = torch.device(device)
    model = model.to(device).eval()
    result: torch.Tensor | None = None
    with evaluating(device):
        for group in groups(starts, batch_size, progress, desc="blocks"):
            windows = np.stack([padded[(slice(None), *(slice(o, o + w) for o, w in
                                                       zip(origin, window, strict=True)))]
                                for origin in group])
            outputs = model(torch.from_numpy(windows).to(device)).float().cpu()
            expected = (len(group), out_channels or outputs.shape[1], *block)
            if tuple(outputs.shape) != expected:
                raise TransferSegError(
                    f"The network gave outputs of shape {list(outputs.shape)} for windows of "
                    f"{list(window)} voxels, not the expected {list(expected)}; check the "
                    "model's input and output sizes."
                )
            if result is None:
                result = torch.empty((outputs.shape[1], *covered), dtype=torch.float32)
            for origin, output in zip(group, outputs, strict=True):
                result[(slice(None), *(slice(o, o + b) for o, b in
                                       zip(origin, block, strict=True)))] = output
    assert result is not None
    return result[(slice(None), *(slice(0, s) for s in shape))].contiguous()
