"""Foreign weights into a TransferSeg network: reading PyTorch files without running their code,
copying tensors in by name, and the report of what was loaded, new, skipped or wrong.

The importers (:mod:`TransferSegLib.importers`) rename a published file's tensors onto our
networks and call :func:`load_weights`; :class:`ImportReport` is what every import prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from TransferSegLib.errors import ModelFileError


@dataclass
class ImportReport:
    """What loading foreign weights into a network did, tensor by tensor (names are the
    network's). ``expected_missing`` are tensors the source never had by design (a new head);
    ``dropped`` are source tensors left out on purpose (deep-supervision heads, a classifier)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when everything but the expected-missing tensors was loaded."""
        return not (self.missing or self.unexpected or self.mismatched)

    def text(self, limit: int = 8) -> str:
        """A few lines a user can read: counts, then the names of what went wrong."""

        def names(items: list) -> str:
            shown = ", ".join(str(item) for item in items[:limit])
            return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

        lines = [f"Weights from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.expected_missing:
            lines.append(f"  new (not in the source, initialised): {names(self.expected_missing)}")
        if self.dropped:
            lines.append(f"  skipped on purpose: {names(self.dropped)}")
        if self.missing:
            lines.append(f"  MISSING from the source: {names(self.missing)}")
        if self.unexpected:
            lines.append(f"  UNEXPECTED in the source: {names(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} source {s} network {n}" for k, s, n in self.mismatched]
            lines.append(f"  SHAPE MISMATCH: {names(shapes)}")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def load_weights(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str,
    expected_missing: Any = (),
    dropped: Any = (),
    strict: bool = True,
) -> ImportReport:
    """Copy ``tensors`` (already renamed to ``model``'s keys) into ``model``; return the report.

    ``expected_missing``: network keys the source does not have by design (they keep their
    initialisation). ``dropped``: source keys to leave out on purpose. Values are cast to the
    network's dtype. With ``strict`` (the default) anything else missing, unexpected or of the
    wrong shape raises :class:`ModelFileError` carrying the whole report, and the model is left
    unchanged.
    """
    expected_missing, dropped = set(expected_missing), set(dropped)
    state = model.state_dict()
    report = ImportReport(source=source)
    updates = {}
    for key, value in tensors.items():
        if key in dropped:
            report.dropped.append(key)
        elif key not in state:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(state[key].shape):
            report.mismatched.append((key, list(value.shape), list(state[key].shape)))
        else:
            updates[key] = value.detach().to(dtype=state[key].dtype, device=state[key].device)
            report.loaded.append(key)
    for key in state:
        if key not in tensors or key in dropped:
            (report.expected_missing if key in expected_missing else report.missing).append(key)
    if strict and not report.ok:
        raise ModelFileError(
            f"The weights in {source} do not fit the network:\n{report.text()}\n"
            "Check that the catalog entry (architecture, depth, channels) matches the file."
        )
    with torch.no_grad():
        for key, value in updates.items():
            state[key].copy_(value)
    return report


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with ``prefix`` removed from every key that has it (``module.`` from
    DataParallel checkpoints)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def read_torch_weights(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch ``.pt``/``.pth`` file, read without running any of its code.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; a file that
    needs anything else (a pickled class) is refused. ``key`` picks a nested dict (e.g.
    ``"state_dict"``); without it a single ``state_dict``/``model``/``network_weights`` entry is
    unwrapped when the top level is not itself the tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Weights file {path} does not exist; check the path.")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several kinds for a refused pickle
        # torch's own advice (load with weights_only=False) is exactly what must not be done:
        # keep only the unpickler's reason, on one line.
        text = str(error).split("WeightsUnpickler error:")[-1].split(". Please use")[0]
        text = text.split("Check the documentation")[0]
        text = " ".join(text.split())[:200] or type(error).__name__
        if "Unsupported global" in text:
            raise ModelFileError(
                f"{path} needs arbitrary Python objects to load (pickle), which TransferSeg never "
                f"runs ({text}); ask its publisher for a state_dict or safetensors file."
            ) from None
        raise ModelFileError(
            f"{path} is not a readable PyTorch weights file ({text}); check that it is the "
            "right file, or download it again."
        ) from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ModelFileError(f"{path} has no {key!r} entry; is it the right file?")
        data = data[key]
    elif isinstance(data, dict) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        for candidate in ("state_dict", "model", "network_weights", "model_state_dict"):
            if isinstance(data.get(candidate), dict):
                data = data[candidate]
                break
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} holds a {type(data).__name__}, not a dict of tensors.")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path} holds no tensors; is it a weights file?")
    return tensors
