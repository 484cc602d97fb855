"""TransferSeg model files and plain state_dicts of our own architectures.

``load`` takes a TransferSeg model file (``.safetensors`` with a model card: loaded as it is), or
a plain ``state_dict`` of a registered architecture (``.pt``/``.pth`` read without pickle, or
a ``.safetensors`` without a card), described by the catalog entry: architecture, arguments,
channels, labels, spacing, normalisation. :func:`import_state_dict` does the same with a model
card the user wrote.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from TransferSegLib import networks
from TransferSegLib.checkpoint import CARD_KEY, ModelCard, load_model
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import card_from_entry
from TransferSegLib.weights import ImportReport, load_weights, read_torch_weights, strip_prefix


def _safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.metadata() or {}, {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{path} is not a readable safetensors file: {error}.") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain weights file (``.safetensors``, or ``.pt``/``.pth`` read with
    ``weights_only``), with a DataParallel ``module.`` prefix removed when every name has it."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelFileError(f"Weights file {path} does not exist; check the path.")
        _, tensors = _safetensors(path)
    else:
        tensors = read_torch_weights(path)
    if tensors and all(key.startswith("module.") for key in tensors):
        tensors = strip_prefix(tensors, "module.")
    return tensors


def import_state_dict(path: str | Path, card: ModelCard) -> tuple[nn.Module, ModelCard,
                                                                   ImportReport]:
    """A plain state_dict at ``path`` loaded into the network ``card`` describes.

    Every tensor of the network must be in the file with its shape, and nothing else: a
    mismatch raises :class:`ModelFileError` with the report. Returns (network in eval mode,
    the card, the report).
    """
    card = ModelCard.from_json(card.to_json(), source="the given model card")  # validated
    try:
        model = networks.build_network(card.architecture, card.in_channels, card.out_channels,
                                       **card.arguments)
    except InputError as error:
        raise ModelFileError(f"The model card describes no buildable network: {error}") from None
    report = load_weights(model, read_state_dict(path), source=Path(path).name)
    return model.eval(), card, report


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """A TransferSeg model file as it is, or a plain state_dict described by ``entry``."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        metadata, _ = _safetensors(path)
        if CARD_KEY in metadata:
            model, card = load_model(path)
            report = ImportReport(source=path.name, loaded=list(model.state_dict()))
            report.notes.append("a TransferSeg model file, used as it is")
            return model, card, report
    if not entry.get("architecture"):
        raise InputError(
            f"{path.name} is a plain state_dict: its catalog entry must name the architecture "
            f"(one of {', '.join(networks.architectures())}) and its arguments."
        )
    arguments = networks.resolve_kwargs(entry["architecture"], **dict(entry.get("arguments", {})))
    card = card_from_entry(entry, arguments=arguments)
    return import_state_dict(path, card)
