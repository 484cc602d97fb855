"""MedicalNet (Med3D) 3D ResNet weights (``resnet_10_23dataset.pth``, ``resnet_50.pth`` ...) ->
``medicalnet``.

The published files hold ``{"state_dict": {...}}`` saved from a DataParallel model, so every
tensor name starts with ``module.``. The names follow the published code: ``conv1``/``bn1``
(the stem), ``layer1`` .. ``layer4`` (their blocks' ``conv1``, ``bn1``, ... and, with type-B
shortcuts, ``downsample.0``/``downsample.1``) and, in files that kept a segmentation branch,
``conv_seg.0`` (transposed convolution), ``conv_seg.1`` (norm), ``conv_seg.3`` (3x3x3
convolution), ``conv_seg.4`` (norm), ``conv_seg.6`` (the 1x1x1 output). The pretrained encoders
have no ``conv_seg``: the decoder and head keep their initialisation and the report lists them
as new. A head whose label count differs from the catalog entry's is dropped on purpose.

The file's depth and shortcut type are read from its tensor names (blocks per stage, bottleneck
or basic blocks, ``downsample`` tensors present or not): a catalog entry without ``depth``
takes the file's, and a file of another depth than the entry's is refused with a report naming
the tensors that do not fit.

How the published encoders were used: one channel; intensities z-scored with the mean and
standard deviation of the image's foreground, the zero background left at zero
(``{"kind": "zscore", "nonzero": true}``; the published training code takes the statistics over
voxels > 0 and fills the background with unit Gaussian noise, whose mean this is). The
published code resizes each volume to a fixed array shape rather than to a voxel spacing, so
the spacing and patch size of a card come from the catalog entry (the target task's).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import card_from_entry
from TransferSegLib.nets.medicalnet import DEPTHS
from TransferSegLib.weights import ImportReport, load_weights, read_torch_weights, strip_prefix

ARCHITECTURE = "medicalnet"

# What the published encoders need; a catalog entry's own fields win.
PUBLISHED = {
    "labels": {"0": "background", "1": "foreground"},
    "normalisation": {"kind": "zscore", "nonzero": True},
    "in_channels": 1,
}

# Published module prefix -> ours (the stages keep their names).
_RENAMED = {
    "conv1": "stem.conv",
    "bn1": "stem.bn",
    "conv_seg.0": "up.conv",
    "conv_seg.1": "up.bn",
    "conv_seg.3": "refine.conv",
    "conv_seg.4": "refine.bn",
    "conv_seg.6": "head",
}
_DECODER_PREFIXES = ("up.", "refine.", "head.")


def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published tensors (``module.`` already stripped) under our names; names without a
    counterpart are kept as they are, so the report shows them as unexpected."""
    renamed = {}
    for key, value in tensors.items():
        module, _, tensor = key.rpartition(".")
        renamed[f"{_RENAMED.get(module, module)}.{tensor}"] = value
    return renamed


def detect_variant(tensors: dict[str, torch.Tensor]) -> tuple[int | None, str]:
    """(depth, shortcut) of a published file from its tensor names (``module.`` stripped).

    depth is None when the blocks per stage match no published depth; shortcut is ``"B"``
    when any block has ``downsample`` tensors, else ``"A"``.
    """
    counts = [0, 0, 0, 0]
    bottleneck = False
    for key in tensors:
        match = re.match(r"layer([1-4])\.(\d+)\.(\w+)", key)
        if match:
            stage, block = int(match.group(1)) - 1, int(match.group(2))
            counts[stage] = max(counts[stage], block + 1)
            bottleneck |= match.group(3) == "conv3"
    kind = "bottleneck" if bottleneck else "basic"
    depth = next((d for d, spec in DEPTHS.items() if spec == (kind, tuple(counts))), None)
    shortcut = "B" if any(".downsample." in key for key in tensors) else "A"
    return depth, shortcut


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import one MedicalNet ``.pth`` file; see the module docstring for what the card says."""
    fields = {**PUBLISHED, **entry}
    labels = {int(k): str(v) for k, v in fields["labels"].items()}
    source = strip_prefix(read_torch_weights(path, key=None), "module.")
    depth, shortcut = detect_variant(source)
    requested = dict(entry.get("arguments", {}))
    if depth is not None:
        requested.setdefault("depth", depth)
        requested.setdefault("shortcut", shortcut)
    arguments = networks.resolve_kwargs(ARCHITECTURE, **requested)
    model = networks.build_network(ARCHITECTURE, int(fields["in_channels"]), len(labels),
                                   **arguments)
    tensors = convert(source)
    state = model.state_dict()
    expected_missing = {k for k in state if k.startswith(_DECODER_PREFIXES)}
    # PyTorch before 0.4.1 saved no batch-norm step counters; they only matter for momentum=None.
    expected_missing |= {k for k in state if k.endswith("num_batches_tracked")}
    dropped = []
    head = tensors.get("head.weight")
    if head is not None and head.shape[0] != len(labels):
        dropped.append("head.weight")  # another label set: a new head is initialised instead
    report = load_weights(model, tensors, source=Path(path).name,
                          expected_missing=expected_missing, dropped=dropped, strict=False)
    if not report.ok:
        found = (f"a MedicalNet ResNet-{depth} with shortcut type {shortcut}" if depth
                 else "no published MedicalNet depth")
        raise ModelFileError(
            f"The weights in {Path(path).name} do not fit the catalog's medicalnet "
            f"(depth {arguments['depth']}, shortcut {arguments['shortcut']}); the file looks "
            f"like {found}.\n{report.text()}\n"
            "Set the catalog entry's depth and shortcut to the file's, or pick the right file."
        )
    loaded_decoder = [k for k in report.loaded if k.startswith(_DECODER_PREFIXES)]
    report.notes.append(
        f"MedicalNet ResNet-{arguments['depth']}, shortcut type {arguments['shortcut']}; "
        + ("its segmentation branch was loaded too" if loaded_decoder
           else "encoder only: the decoder and the head are new")
    )
    card = card_from_entry(fields, architecture=ARCHITECTURE, arguments=arguments,
                           labels=labels, out_channels=len(labels),
                           in_channels=int(fields["in_channels"]))
    return model.eval(), card, report
