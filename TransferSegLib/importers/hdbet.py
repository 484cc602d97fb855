"""HD-BET v1 brain extraction weights (a plain PyTorch state_dict per fold) -> ``hdbet``.

The published files (``0.model`` .. ``4.model``, one per cross-validation fold) name their
tensors after the modules of the published code: ``init_conv``, ``context1..5`` (residual
blocks), ``down1..4`` (norm + strided conv), ``bn_after_context5``, ``up1..4`` (upsampling
conv + norm), ``loc1..3`` (localisation pairs), ``end_conv_1/2`` (the full-resolution pair),
``seg_layer`` (the output) and ``loc2_seg``/``loc3_seg`` (deep supervision). Each norm also has
``running_mean``/``running_var`` (and, from newer PyTorch, ``num_batches_tracked``), which the
published inference does not use: the norms are computed from the image. Those and the
deep-supervision outputs are dropped on purpose and listed as such in the report.

How the published model is used (its card): one channel (T1, T1-contrast, T2 or FLAIR), voxels
resampled to 1.5 mm isotropic, intensities z-scored over the whole resampled volume, axes in
the MNI152 standard orientation of FSL (``fslreorient2std``: x toward the left, y anterior,
z superior; "LAS"), spatial sizes divisible by 16, trained on 128^3 patches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.importers import card_from_entry, published_network
from TransferSegLib.weights import ImportReport, load_weights, read_torch_weights

ARCHITECTURE = "hdbet"

# What the published model needs; a catalog entry's own fields win.
PUBLISHED = {
    "labels": {"0": "background", "1": "brain"},
    "spacing": [1.5, 1.5, 1.5],
    "patch_size": [128, 128, 128],
    "normalisation": {"kind": "zscore"},
    "orientation": "LAS",
    "modality": "MR",
    "in_channels": 1,
}

_UNUSED_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def key_map(levels: int = 5) -> dict[str, str]:
    """Published module prefix -> our module prefix, for a network of ``levels`` resolutions.

    The deep-supervision outputs (``loc<k>_seg``) have no counterpart and are not listed.
    """
    bottom = levels - 1
    mapping = {"init_conv": "encoder.0.entry", "seg_layer": "head"}
    for level in range(levels):
        context = f"context{level + 1}"
        ours = f"encoder.{level}.block"
        mapping.update({f"{context}.bn_1": f"{ours}.norm1", f"{context}.conv1": f"{ours}.conv1",
                        f"{context}.bn_2": f"{ours}.norm2", f"{context}.conv2": f"{ours}.conv2"})
        if level < bottom:
            # down<k> normalises and activates level k-1's output, then convolves into level k.
            mapping[f"down{level + 1}.bn"] = f"encoder.{level}.norm"
            mapping[f"down{level + 1}.downsample"] = f"encoder.{level + 1}.entry"
    mapping[f"bn_after_context{levels}"] = f"encoder.{bottom}.norm"
    for index in range(bottom):  # decoder index 0 is the deepest
        up, ours = f"up{index + 1}", f"decoder.{index}"
        mapping.update({f"{up}.upsample_conv": f"{ours}.up_conv", f"{up}.bn": f"{ours}.up_norm"})
        if index < bottom - 1:
            loc = f"loc{index + 1}"
            mapping.update({f"{loc}.conv1": f"{ours}.conv1", f"{loc}.bn_1": f"{ours}.norm1",
                            f"{loc}.conv2": f"{ours}.conv2", f"{loc}.bn_2": f"{ours}.norm2"})
        else:
            mapping.update({"end_conv_1": f"{ours}.conv1", "end_conv_1_bn": f"{ours}.norm1",
                            "end_conv_2": f"{ours}.conv2", "end_conv_2_bn": f"{ours}.norm2"})
    return mapping


def _is_dropped(key: str) -> bool:
    module, _, tensor = key.rpartition(".")
    deep_supervision = module.startswith("loc") and module.endswith("_seg")
    return tensor in _UNUSED_STATISTICS or deep_supervision


def convert(tensors: dict[str, torch.Tensor], levels: int = 5) -> tuple[dict[str, torch.Tensor],
                                                                        list[str]]:
    """Published tensors renamed to ours, plus the (published) names dropped on purpose.

    Names with no counterpart are kept as they are, so the import report shows them as
    unexpected.
    """
    mapping = key_map(levels)
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in tensors.items():
        if _is_dropped(key):
            renamed[key] = value
            dropped.append(key)
            continue
        module, _, tensor = key.rpartition(".")
        target = mapping.get(module)
        renamed[f"{target}.{tensor}" if target else key] = value
    return renamed, dropped


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import one HD-BET v1 fold file; see the module docstring for what the card says."""
    model, arguments, labels, fields = published_network(ARCHITECTURE, PUBLISHED, entry)
    tensors, dropped = convert(read_torch_weights(path), int(arguments["levels"]))
    report = load_weights(model, tensors, source=Path(path).name, dropped=dropped)
    report.notes.append("instance-norm running averages and deep-supervision outputs are not "
                        "used at inference, as in the published code")
    card = card_from_entry(fields, architecture=ARCHITECTURE, arguments=arguments,
                           labels=labels, out_channels=len(labels))
    return model.eval(), card, report
