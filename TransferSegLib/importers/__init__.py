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
import zipfile
from pathlib import Path
from typing import Any

from torch import nn

from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.weights import ImportReport

MAX_TEXT_BYTES = 64 * 2**20  # a configuration, plans or metadata file inside an archive
MAX_WEIGHTS_BYTES = 8 * 2**30  # a weights member of an archive

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


def published_network(architecture: str, published: dict, entry: dict
                      ) -> tuple[nn.Module, dict, dict[int, str], dict]:
    """The new network a family's catalog ``entry`` describes, over the family's ``published``
    defaults: (network, its resolved arguments, labels by index, the merged fields)."""
    from TransferSegLib import networks

    fields = {**published, **entry}
    labels = {int(k): str(v) for k, v in fields["labels"].items()}
    arguments = networks.resolve_kwargs(architecture, **dict(fields.get("arguments", {})))
    model = networks.build_network(architecture, int(fields["in_channels"]), len(labels),
                                   **arguments)
    return model, arguments, labels, fields


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


def read_member(archive: zipfile.ZipFile, name: str, where: str,
                cap: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of archive member ``name``, refusing one that declares or inflates to more
    than ``cap`` bytes (a few kilobytes of zip can inflate to gigabytes)."""
    info = archive.getinfo(name)
    if info.file_size > cap:
        raise ModelFileError(f"{where}: {name} declares {info.file_size:,} bytes, more than the "
                             f"{cap:,} allowed; this is not a model's file.")
    with archive.open(info) as stream:
        data = stream.read(cap + 1)
    if len(data) > cap:
        raise ModelFileError(f"{where}: {name} inflates past {cap:,} bytes; refused.")
    return data


def extract_member(archive: zipfile.ZipFile, name: str, target: Path, where: str,
                   cap: int = MAX_WEIGHTS_BYTES) -> Path:
    """Member ``name`` copied to ``target`` in chunks, stopping past ``cap`` bytes."""
    info = archive.getinfo(name)
    if info.file_size > cap:
        raise ModelFileError(f"{where}: {name} declares {info.file_size:,} bytes, more than "
                             f"any model's weights ({cap:,}); refused.")
    written = 0
    with archive.open(info) as stream, open(target, "wb") as out:
        while chunk := stream.read(1 << 20):
            written += len(chunk)
            if written > cap:
                raise ModelFileError(f"{where}: {name} inflates past {cap:,} bytes; refused.")
            out.write(chunk)
    return target
