"""Shared test helpers: real samples (never downloaded here) and small volumes made in tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TransferSegLib.errors import MissingSampleError


def real_sample(name: str):
    """The fetched sample ``name``; fails (not skips) with the fetch command if it is missing."""
    from TransferSegLib.samples import require_sample

    try:
        return require_sample(name)
    except MissingSampleError as error:
        pytest.fail(str(error), pytrace=False)


def published_weights(model_id: str, index: int = 0) -> Path:
    """The fetched original weights file of a published model; fails (not skips) with the
    fetch command if it is missing."""
    from TransferSegLib.zoo import published_file as find

    try:
        return find(model_id, index)
    except MissingSampleError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def published_file():
    """``published_file("hd-bet-v1-fold0") -> Path`` (see :func:`published_weights`)."""
    return published_weights


def reduced_label(sample: str, keep, path: Path) -> Path:
    """The label map of a real sample with only the label values in ``keep`` (others become
    background), written to ``path``; the sample's own file is not touched."""
    from TransferSegLib import volumes

    label = volumes.read_label(real_sample(sample).label)
    array = sitk.GetArrayFromImage(label)
    array[~np.isin(array, list(keep))] = 0
    reduced = sitk.GetImageFromArray(array)
    reduced.CopyInformation(label)
    return volumes.write_image(reduced, path, overwrite=True)


def catalog_entry(model_id: str, weights: Path, file_name: str, task: str,
                  urls: list[str] | None = None) -> dict:
    """A catalog entry (Resources/models.json layout) for a TransferSeg model file made in a
    test, its facts read from the file's card and its sha256 and size from its bytes."""
    import hashlib

    from TransferSegLib.checkpoint import read_card
    from TransferSegLib.networks import patch_divisor

    card = read_card(weights)
    payload = weights.read_bytes()
    file = {"name": file_name, "sha256": hashlib.sha256(payload).hexdigest(),
            "size": len(payload)}
    if urls:
        file["urls"] = urls
    return {
        "id": model_id, "title": model_id, "modality": card.modality, "anatomy": "abdomen",
        "task": task, "labels": {str(k): v for k, v in card.labels.items()},
        "background_index": 0, "architecture": card.architecture, "arguments": card.arguments,
        "in_channels": card.in_channels, "spacing": card.spacing,
        "orientation": card.orientation, "normalisation": card.normalisation,
        "patch_size": card.patch_size,
        "divisor": patch_divisor(card.architecture, card.arguments), "importer": "transferseg",
        "files": [file], "licence": "CC0", "citation": "none", "notes": "", "unverified": [],
    }


def write_catalog(folder: Path, *entries: dict) -> Path:
    """``folder/models.json`` holding ``entries``; point TRANSFERSEG_RESOURCES at ``folder``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "models.json"
    path.write_text(json.dumps({"format": "transferseg-catalog", "version": 1,
                                "models": list(entries)}), encoding="utf-8")
    return path


def make_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=None) -> sitk.Image:
    """A SimpleITK image from a (Z, Y, X) array with the given geometry (x, y, z order)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    return image


def oblique_direction(degrees: float = 20.0) -> tuple[float, ...]:
    """A rotation about z then x, as a row-major 3x3 direction matrix (not axis-aligned)."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).flatten())
