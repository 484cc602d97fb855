"""What a run costs: peak GPU and CPU memory, and whether the GPU has room for the next run.

Peaks are read where they are cheap (``torch.cuda.max_memory_allocated``, ``getrusage``) and
travel in the job events, the model card (``metrics``: ``train_gpu_peak_gb`` with the batch
and patch it was measured at) and the Slicer panel. Before a GPU run, the peak a model card
recorded is scaled to the run's batch and patch and compared with the GPU's free memory.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

GIB = 2**30
# What a model card records about its training's GPU memory (metrics keys).
TRAINING_KEYS = ("train_gpu_peak_gb", "train_batch_size", "train_patch_size")
MARGIN = 1.15  # the allocator's caching and fragmentation on top of the measured peak


def reset(device) -> None:
    """Start measuring the GPU peak afresh (a no-op off CUDA)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> dict:
    """``{"gpu_peak_gb": ...}`` on CUDA (tensors allocated, since the last :func:`reset`) and
    ``{"cpu_peak_rss_gb": ...}`` (this process's resident memory) where the OS tells it."""
    import torch

    found = {}
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        found["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
    rss = peak_rss_bytes()
    if rss:
        found["cpu_peak_rss_gb"] = round(rss / GIB, 3)
    return found


def peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)  # macOS: bytes; Linux: KiB


def free_gpu_gb(device) -> float | None:
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free / GIB


def training_need_gb(metrics: dict, patch_size: Sequence[int], batch_size: int) -> float | None:
    """The GPU memory a training step needs, from the peak a card recorded at its own batch
    and patch, scaled to ``batch_size`` and ``patch_size`` (activations grow with both)."""
    measured = metrics.get("train_gpu_peak_gb")
    batch, patch = metrics.get("train_batch_size"), metrics.get("train_patch_size")
    if not measured or not batch or not patch:
        return None
    scale = (batch_size / batch) * (math.prod(patch_size) / math.prod(patch))
    return float(measured) * scale * MARGIN


def memory_warning(metrics: dict, patch_size: Sequence[int], batch_size: int,
                   device) -> str | None:
    """A sentence when the GPU's free memory is below what training this model needs."""
    need = training_need_gb(metrics, patch_size, batch_size)
    free = free_gpu_gb(device)
    if need is None or free is None or free >= need:
        return None
    return (f"this GPU has {free:.1f} GB free and training this model at batch {batch_size} "
            f"and patch {'x'.join(map(str, patch_size))} took about {need:.1f} GB before: "
            "close other GPU programs, or lower the batch size or the patch")
