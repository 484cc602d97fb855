"""Importers: a published weights file -> a TransferSeg network, its model card and a report.

One module per published family. Each has

    load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]

where ``entry`` is the model's catalog entry (``Resources/models.json``: labels, spacing,
normalisation, architecture arguments...). ``load`` reads the file without running code from
it, maps its tensor names and layouts onto our own implementation of the topology, and fails
with :class:`~TransferSegLib.errors.ModelFileError` carrying the report unless only the expected
tensors (a new head) are missing. :mod:`TransferSegLib.zoo` saves the result as a TransferSeg
model file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from TransferSegLib.checkpoint import ImportReport, ModelCard
from TransferSegLib.errors import InputError

# catalog "importer" value -> module in this package
FAMILIES = {
    "transferseg": "native",
    "nnunet": "nnunet",
    "state_dict": "native",
    "medicalnet": "medicalnet",
    "diag_unet": "diag_unet",
    "swinunetr_ssl": "swinunetr_ssl",
    "monai_bundle": "monai_bundle",
    "hdbet": "hdbet",
    "deepbet": "deepbet",
    "taps": "taps",
    "astra": "astra",
}


def load(family: str, path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import the weights at ``path`` with the importer named ``family`` (see :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise InputError(
            f"Unknown importer {family!r} in the catalog; known: {', '.join(sorted(FAMILIES))}."
        )
    module = importlib.import_module(f"{__name__}.{FAMILIES[family]}")
    return module.load(Path(path), entry)


def card_from_entry(entry: dict, **overrides: Any) -> ModelCard:
    """A model card from a catalog entry's fields; ``overrides`` win (architecture, arguments,
    in_channels, out_channels, labels... as the importer found them in the file)."""
    labels = {int(k): str(v) for k, v in entry.get("labels", {}).items()}
    fields = {
        "architecture": entry.get("architecture"),
        "in_channels": int(entry.get("in_channels", 1)),
        "out_channels": len(labels),
        "labels": labels,
        "spacing": [float(s) for s in entry.get("spacing", [1.0, 1.0, 1.0])],
        "patch_size": [int(s) for s in entry.get("patch_size", [96, 96, 96])],
        "normalisation": dict(entry.get("normalisation", {"kind": "zscore"})),
        "arguments": dict(entry.get("arguments", {})),
        "orientation": entry.get("orientation", "LPS"),
        "modality": entry.get("modality", ""),
        "title": entry.get("title", ""),
        "description": entry.get("notes", ""),
        "lineage": [{"published": entry.get("id", ""), "citation": entry.get("citation", ""),
                     "licence": entry.get("licence", "")}],
    }
    fields.update(overrides)
    return ModelCard(**fields)
