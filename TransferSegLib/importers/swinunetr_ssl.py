"""Swin UNETR's self-supervised Swin ViT encoder (``model_swinvit.pt``) -> ``swinunetr``.

Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image
Analysis", CVPR 2022: the Swin ViT of Swin UNETR pretrained on 5,050 CT volumes with masked
volume inpainting, rotation prediction and contrastive coding. Only the encoder was published;
the conv encoders, decoder and head of Swin UNETR keep their initialisation (the report lists
them as new).

Key layouts read (all found in published files or in MONAI's own loading code):

* ``{"state_dict": {"module.patch_embed.proj.weight", "module.layers1.0.blocks.0.attn.qkv.weight",
  ..., "module.layers1.0.blocks.0.mlp.fc1.weight", "module.layers1.0.downsample.reduction.weight",
  ...}}``: the published file, the Swin ViT alone saved from a DataParallel model;
* ``swin_vit.*`` (optionally behind ``module.``): a whole pretraining network, whose
  self-supervision heads (``rotation_head``, ``contrastive_head``, the reconstruction ``conv``)
  are dropped on purpose;
* ``swinViT.*``: the encoder as MONAI's SwinUNETR names it.

The multilayer perceptron of each block is ``fc1``/``fc2`` in the published file and
``linear1``/``linear2`` in MONAI's current SwinUNETR. The encoder's size (feature size, blocks
and heads per stage, window size, MLP ratio, patch size) is read from the tensor shapes, so a
catalog entry may leave it out; an entry that gives it must agree with the file.

How the encoder was pretrained (the card): CT, Hounsfield units clipped to [-1000, 1000] and
scaled to [0, 1], 1.5 x 1.5 x 2.0 mm voxels with the array axes toward the patient's right,
anterior and superior (MONAI's ``Orientationd(axcodes="RAS")`` on NIfTI data), 96^3 patches.
TransferSeg's networks read (Z, Y, X) arrays of the card's orientation, so the same array
layout is orientation ``"SAR"`` (x toward superior, y anterior, z right) with spacing
[2.0, 1.5, 1.5] mm.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import card_from_entry
from TransferSegLib.weights import ImportReport, load_weights, read_torch_weights, strip_prefix

ARCHITECTURE = "swinunetr"
ENCODER = "swinViT."

# What the published encoder needs; a catalog entry's own fields win.
PUBLISHED = {
    "labels": {"0": "background", "1": "foreground"},
    "spacing": [2.0, 1.5, 1.5],
    "orientation": "SAR",
    "patch_size": [96, 96, 96],
    "normalisation": {"kind": "ct", "window": [-1000.0, 1000.0]},
    "modality": "CT",
    "in_channels": 1,
}

# Parts of the pretraining network that are not the encoder.
_SELF_SUPERVISION_HEADS = ("rotation_pre.", "rotation_head.", "contrastive_pre.",
                           "contrastive_head.", "conv.")


def convert(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of any layout above under MONAI SwinUNETR names, and the names (ours) dropped
    on purpose (self-supervision heads, precomputed attention masks).

    Names that match no layout are kept as they are, so the report shows them as unexpected.
    """
    tensors = strip_prefix(tensors, "module.")
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in tensors.items():
        if key.startswith(_SELF_SUPERVISION_HEADS) or key.endswith(".attn_mask"):
            renamed[key] = value
            dropped.append(key)
            continue
        if key.startswith("swin_vit."):
            key = ENCODER + key[len("swin_vit."):]
        elif key.startswith(("patch_embed.", "layers")):
            key = ENCODER + key
        key = re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", key)
        renamed[key] = value
    return renamed, dropped


def encoder_arguments(tensors: dict[str, torch.Tensor]) -> dict:
    """The SwinUNETR arguments the encoder tensors (MONAI names) were made with."""
    embed = tensors.get(ENCODER + "patch_embed.proj.weight")
    if embed is None or embed.dim() != 5:
        raise ModelFileError(
            "The file has no 3D Swin ViT patch embedding (patch_embed.proj.weight); it is not "
            "a Swin UNETR encoder."
        )
    feature_size = int(embed.shape[0])
    depths, heads, window = [], [], None
    for stage in range(1, 5):
        prefix = f"{ENCODER}layers{stage}.0.blocks."
        blocks = {int(k[len(prefix):].split(".")[0]) for k in tensors if k.startswith(prefix)}
        depths.append(max(blocks) + 1 if blocks else 0)
        table = tensors.get(f"{prefix}0.attn.relative_position_bias_table")
        if table is not None:
            heads.append(int(table.shape[1]))
            # (2w - 1)^3 rows for a cubic window of w.
            window = (round(table.shape[0] ** (1 / 3)) + 1) // 2
    arguments: dict = {"feature_size": feature_size, "depths": depths}
    if len(heads) == 4:
        arguments["num_heads"] = heads
    if window is not None:
        arguments["window_size"] = window
    first_mlp = tensors.get(f"{ENCODER}layers1.0.blocks.0.mlp.linear1.weight")
    if first_mlp is not None:
        arguments["mlp_ratio"] = float(first_mlp.shape[0]) / feature_size
    if int(embed.shape[2]) != 2:
        arguments["patch_size"] = int(embed.shape[2])
    if ENCODER + "patch_embed.norm.weight" in tensors:
        arguments["patch_norm"] = True
    return arguments


def _same(a: object, b: object) -> bool:
    """Argument equality where a window of 7 equals [7, 7, 7] and 4 equals 4.0."""
    def norm(value: object) -> object:
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return float(value) if isinstance(value, (int, float)) else value
    if isinstance(a, int) and isinstance(b, (list, tuple)):
        a = [a] * len(b)
    if isinstance(b, int) and isinstance(a, (list, tuple)):
        b = [b] * len(a)
    left, right = norm(a), norm(b)
    if isinstance(left, float) and isinstance(right, float):
        return math.isclose(left, right)
    return left == right


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import a Swin UNETR self-supervised encoder file; see the module docstring."""
    fields = {**PUBLISHED, **entry}
    labels = {int(k): str(v) for k, v in fields["labels"].items()}
    tensors, dropped = convert(read_torch_weights(path))
    found = encoder_arguments(tensors)
    requested = dict(entry.get("arguments", {}))
    conflicts = [f"{name} {requested[name]!r} (the file's: {value!r})"
                 for name, value in found.items()
                 if name in requested and not _same(requested[name], value)]
    if conflicts:
        raise ModelFileError(
            f"The catalog entry's swinunetr arguments do not fit {Path(path).name}: "
            f"{'; '.join(conflicts)}. Fix the entry or pick the right file."
        )
    arguments = networks.resolve_kwargs(ARCHITECTURE, **{**found, **requested})
    model = networks.build_network(ARCHITECTURE, int(fields["in_channels"]), len(labels),
                                   **arguments)
    state = model.state_dict()
    # relative_position_index is derived from the window size; files may or may not carry it.
    expected_missing = [k for k in state if not k.startswith(ENCODER)
                        or k.endswith("relative_position_index")]
    report = load_weights(model, tensors, source=Path(path).name,
                          expected_missing=expected_missing, dropped=dropped)
    report.notes.append(
        f"self-supervised Swin ViT encoder (feature size {arguments['feature_size']}); "
        "the convolutional encoders, decoder and head of Swin UNETR are new"
    )
    for name in ("orientation", "spacing", "normalisation"):
        if name in entry and entry[name] != PUBLISHED[name]:
            report.notes.append(
                f"{name} {entry[name]!r} from the catalog; the pretraining's is "
                f"{PUBLISHED[name]!r}" + (" (the same arrays as MONAI's RAS)"
                                          if name == "orientation" else ""))
    card = card_from_entry(fields, architecture=ARCHITECTURE, arguments=arguments,
                           labels=labels, out_channels=len(labels),
                           in_channels=int(fields["in_channels"]))
    return model.eval(), card, report
