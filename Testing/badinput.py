"""A corpus of bad input: files, folders and command lines TransferSeg must refuse clearly.

Each :class:`BadCase` writes its input into an empty folder and returns the call that reads it.
The expected outcome is either an error (a :class:`~TransferSegLib.errors.TransferSegError`
subclass and a regular expression its message must match: the file's name and what to do) or
a documented recovery (a ``recovery`` check of what the call returned). Command-line cases
(``cli=True``) return ``(exit status, stdout, stderr)`` and must end with status 2 and one line
``error: ...`` without a traceback.

``huge`` cases declare sizes that would take terabytes (or gigabytes from a few bytes): they are
run under a memory cap and must not grow the process by more than a few megabytes.

``Testing/test_badinput.py`` runs every case in a child process with a time limit. Write the
whole corpus to a folder, one sub-folder per case, to try it by hand or in Slicer::

    python Testing/badinput.py CORPUS_FOLDER
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import pickle
import shutil
import struct
import sys
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors.torch import save_file

from TransferSegLib import checkpoint, datasets, metrics, networks, segmentations, volumes, weights
from TransferSegLib.errors import GeometryError, InputError, ModelFileError, TransferSegError

Call = Callable[[], object]


@dataclass(frozen=True)
class BadCase:
    """One bad input: ``make(folder)`` writes it and returns the call that must handle it."""

    name: str
    area: str  # volumes, segmentations, label maps, datasets, model files, importers, cli
    input: str  # what the input is, in words
    make: Callable[[Path], Call]
    error: type[TransferSegError] | None = None
    match: str = ""  # re.search on the message (cli: on the one stderr line)
    recovery: Callable[[object], None] | None = None  # checks the call's result
    outcome: str = ""  # the documented recovery, in words
    huge: bool = False
    cli: bool = False


CASES: list[BadCase] = []

# Tests elsewhere that already cover a kind of bad input with a real file; not repeated here.
COVERED_ELSEWHERE = {
    "TorchScript archive with a forbidden global (os.system), not executed":
        "Testing/test_deepbet.py::test_torchscript_reader_refuses_a_global_outside_the_allow_list",
    "TorchScript archive with a member outside its folder":
        "Testing/test_deepbet.py::test_torchscript_reader_refuses_a_member_outside_the_archive_"
        "folder",
    "DICOM series of a real CT with a slice removed or copied":
        "Testing/test_volumes.py::test_dicom_series_with_missing_or_duplicate_slices_is_refused",
    "model file of a newer format version":
        "Testing/test_checkpoint.py::test_newer_format_version_asks_for_an_update",
    "card fields of the wrong type, one by one":
        "Testing/test_checkpoint.py::test_bad_card_field_is_named_with_the_file",
}


def case(name: str, area: str, input: str, *, error: type[TransferSegError] | None = None,
         match: str = "", recovery: Callable[[object], None] | None = None, outcome: str = "",
         huge: bool = False, cli: bool = False) -> Callable[[Callable[[Path], Call]], Callable]:
    """Register the decorated ``make(folder) -> call`` as a corpus case."""
    if (error is None) == (recovery is None) and not cli:
        raise ValueError(f"case {name}: give an error or a recovery, not both")

    def register(make: Callable[[Path], Call]) -> Callable[[Path], Call]:
        CASES.append(BadCase(name, area, input, make, error, match, recovery, outcome, huge,
                             cli))
        return make

    return register


# --------------------------------------------------------------------------------- helpers
def small_volume(shape=(4, 5, 6), dtype=np.float32) -> sitk.Image:
    """A (Z, Y, X) ramp volume with a non-trivial geometry."""
    image = sitk.GetImageFromArray(np.arange(np.prod(shape)).reshape(shape).astype(dtype))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    return image


def small_label(values=(0, 1, 2), shape=(4, 5, 6), dtype=np.uint8) -> sitk.Image:
    array = np.zeros(shape, dtype)
    for index, value in enumerate(values):
        array[index % shape[0], 1:3, 1 + index:3 + index] = value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    return image


def write(image: sitk.Image, path: Path, compress: bool = False) -> Path:
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def patched(source: Path, target: Path, old: bytes, new: bytes) -> Path:
    data = source.read_bytes()
    if old not in data:
        raise ValueError(f"{old!r} not in {source}")
    target.write_bytes(data.replace(old, new, 1))
    return target


def nifti_with_dims(folder: Path, name: str, dims: tuple[int, ...]) -> Path:
    """A valid small float32 ``.nii`` whose header ``dim`` field is then set to ``dims``."""
    source = write(small_volume(), folder / "valid.nii")
    header = bytearray(source.read_bytes())
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    source.unlink()
    (folder / name).write_bytes(bytes(header))
    return folder / name


def nrrd_header(sizes: str, kind: str = "float", extra: str = "") -> bytes:
    return (f"NRRD0004\ntype: {kind}\ndimension: {len(sizes.split())}\nsizes: {sizes}\n"
            f"encoding: raw\nendian: little\n{extra}\n").encode()


def dicom_series(folder: Path, count: int = 6, step: float = 2.5) -> list[Path]:
    """``count`` 8x8 CT slices of one series, ``step`` mm apart along z."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for index in range(count):
        image = sitk.GetImageFromArray(np.full((8, 8), 10 * index, np.int16))
        tags = {
            "0008|0060": "CT", "0020|000d": study, "0020|000e": series,
            "0008|0018": f"{series}.{index + 1}", "0020|0013": str(index + 1),
            "0020|0032": f"-5\\-5\\{index * step:.3f}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.8\\0.8", "0018|0050": f"{step}",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        paths.append(folder / f"slice{index:03d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(image)
    return paths


def segmentation_file(folder: Path, name: str = "valid.seg.nrrd") -> Path:
    """A valid two-segment ``.seg.nrrd`` (liver = 1, spleen = 2 in one layer)."""
    segmentation = segmentations.Segmentation.from_label_map(small_label(),
                                                             {1: "liver", 2: "spleen"})
    return segmentations.write_segmentation(segmentation, folder / name)


TINY_UNET = {"channels": [4, 8], "strides": [2], "num_res_units": 0}


def tiny_card(**changes) -> dict:
    """A valid model card (as a JSON-ready dict) for a tiny 2-label UNet."""
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=2, labels={0: "background", 1: "liver"},
        spacing=[2.0, 2.0, 2.0], patch_size=[16, 16, 16], normalisation={"kind": "ct"},
        arguments=networks.resolve_kwargs("unet", **TINY_UNET), modality="CT",
    )
    data = json.loads(card.to_json())
    data.update(changes)
    return data


def tiny_model_file(path: Path) -> Path:
    """A valid TransferSeg model file of the tiny UNet."""
    torch.manual_seed(0)
    card = checkpoint.ModelCard.from_json(json.dumps(tiny_card()))
    model = networks.build_network("unet", 1, 2, **card.arguments)
    return checkpoint.save_model(path, model, card)


def model_file_with_card(path: Path, card_text: str, tensors: dict | None = None) -> Path:
    """A safetensors file with the given card text (written without TransferSeg's checks)."""
    if tensors is None:
        reference = networks.build_network("unet", 1, 2, **TINY_UNET)
        tensors = {k: v.clone().contiguous() for k, v in reference.state_dict().items()}
    save_file(tensors, str(path), metadata={
        "format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION,
        checkpoint.CARD_KEY: card_text})
    return path


class _Touch:
    """Unpickling this touches ``witness``: proof that a reader ran code from a file."""

    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return (Path.touch, (self.witness,))


def without_witness(call: Call, witness: Path) -> Call:
    """``call``, then fail if it created ``witness`` (ran code from the file)."""

    def checked():
        try:
            return call()
        finally:
            if witness.exists():
                raise AssertionError(f"reading the file ran its code: {witness} was created")

    return checked


def pickle_trap(path: Path, read: Callable[[Path], object]) -> Call:
    """``read(path)`` of a raw pickle at ``path`` that would touch a witness file if
    unpickled, failing if it did."""
    witness = path.parent / "code_ran"
    path.write_bytes(pickle.dumps(_Touch(witness), protocol=2))
    return without_witness(lambda: read(path), witness)


def segment_cli(folder: Path, *extra) -> Call:
    """``transferseg segment`` of a small scan with the tiny model (made unless it is there),
    plus ``extra`` flags."""
    if not (folder / "model.safetensors").exists():
        tiny_model_file(folder / "model.safetensors")
    write(small_volume(), folder / "scan.nrrd")
    return cli("segment", "--model", folder / "model.safetensors", "--image",
               folder / "scan.nrrd", *extra)


def cli(*argv: str) -> Call:
    """Run ``transferseg argv`` in this process: returns (exit status, stdout, stderr)."""

    def run() -> tuple[int, str, str]:
        from TransferSegLib.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    return run


# ------------------------------------------------------------------------- volumes: NIfTI
@case("nifti_truncated", "volumes", ".nii cut 30 bytes short of its voxel data",
      error=InputError, match=r"cut\.nii.*truncated.*export it again")
def _(folder):
    data = write(small_volume(), folder / "whole.nii").read_bytes()
    (folder / "cut.nii").write_bytes(data[:-30])
    return lambda: volumes.read_volume(folder / "cut.nii")


@case("nifti_gz_truncated", "volumes", ".nii.gz whose gzip stream stops half way",
      error=InputError, match=r"cut\.nii\.gz.*(truncated|damaged).*export it again")
def _(folder):
    data = gzip.compress(write(small_volume((20, 20, 20)), folder / "whole.nii").read_bytes())
    (folder / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return lambda: volumes.read_volume(folder / "cut.nii.gz")


@case("nifti_header_only", "volumes", ".nii of the 348-byte header alone",
      error=InputError, match=r"header\.nii.*export it again")
def _(folder):
    data = write(small_volume(), folder / "whole.nii").read_bytes()
    (folder / "header.nii").write_bytes(data[:348])
    return lambda: volumes.read_volume(folder / "header.nii")


@case("nifti_dims_lying", "volumes", ".nii of 120 voxels whose header claims 640^3 float32 "
      "(1 GB, under the voxel limit)", error=InputError,
      match=r"lie\.nii declares 640 x 640 x 640 voxels.*truncated.*export it again", huge=True)
def _(folder):
    path = nifti_with_dims(folder, "lie.nii", (640, 640, 640))
    return lambda: volumes.read_volume(path)


@case("nifti_huge_dims", "volumes", ".nii header declaring 32767^3 voxels (NIfTI-1 maximum, "
      "140 TB)", error=InputError,
      match=r"huge\.nii declares.*more than the limit.*raise TRANSFERSEG_MAX_VOXELS",
      huge=True)
def _(folder):
    path = nifti_with_dims(folder, "huge.nii", (32767, 32767, 32767))
    return lambda: volumes.read_volume(path)


@case("nifti_huge_dims_gz", "volumes", ".nii.gz whose 2 kB holds 1000 x 1000 x 1000 float32",
      error=InputError,
      match=r"lie\.nii\.gz declares 1000 x 1000 x 1000.*truncated.*export it again",
      huge=True)
def _(folder):
    path = nifti_with_dims(folder, "lie.nii", (1000, 1000, 1000))
    (folder / "lie.nii.gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return lambda: volumes.read_volume(folder / "lie.nii.gz")


@case("nifti_zero_axis", "volumes", ".nii whose header gives the y axis length 0",
      error=InputError, match=r"zero\.nii declares an empty image.*export it again")
def _(folder):
    path = nifti_with_dims(folder, "zero.nii", (6, 0, 4))
    return lambda: volumes.read_volume(path)


@case("nifti_negative_axis", "volumes", ".nii whose header gives an axis length -6",
      error=InputError, match=r"negative\.nii.*not a valid NIfTI.*export it again")
def _(folder):
    path = nifti_with_dims(folder, "negative.nii", (-6, 5, 4))
    return lambda: volumes.read_volume(path)


@case("nifti_nan", "volumes", "float32 .nii.gz with one NaN voxel (ITK reads it as 0)",
      error=InputError, match=r"nan\.nii\.gz has 1 NaN or infinite voxels; replace them")
def _(folder):
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    path = write(sitk.GetImageFromArray(array), folder / "nan.nii.gz", compress=True)
    return lambda: volumes.read_volume(path)


@case("nifti_inf", "volumes", "float64 .nii with +Inf and -Inf voxels",
      error=InputError, match=r"inf\.nii has 2 NaN or infinite voxels; replace them")
def _(folder):
    array = np.zeros((4, 5, 6), np.float64)
    array[0, 0, 0], array[3, 4, 5] = np.inf, -np.inf
    path = write(sitk.GetImageFromArray(array), folder / "inf.nii")
    return lambda: volumes.read_volume(path)


@case("nan_allowed_on_request", "volumes", "the NaN .nii.gz read with allow_nonfinite=True",
      recovery=lambda image: np.testing.assert_array_equal(image.GetSize(), (6, 5, 4)),
      outcome="read as asked (allow_nonfinite=True), for tools that mask NaN themselves")
def _(folder):
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    path = write(sitk.GetImageFromArray(array), folder / "nan.nii.gz", compress=True)
    return lambda: volumes.read_volume(path, allow_nonfinite=True)


@case("image_2d", "volumes", "a 2D NRRD slice", error=InputError,
      match=r"slice\.nrrd is a 2D image.*give the whole series")
def _(folder):
    path = write(sitk.Image([8, 8], sitk.sitkInt16), folder / "slice.nrrd")
    return lambda: volumes.read_volume(path)


@case("image_4d", "volumes", "a 4D .nii.gz with 3 time points", error=InputError,
      match=r"series\.nii\.gz has 4 dimensions.*split the time points")
def _(folder):
    path = write(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), folder / "series.nii.gz", True)
    return lambda: volumes.read_volume(path)


def _single_frame(image: sitk.Image) -> None:
    assert image.GetDimension() == 3 and image.GetSize() == (4, 5, 6)


@case("image_4d_one_frame", "volumes", "a 4D .nii.gz with a single time point",
      recovery=_single_frame, outcome="read as the 3D volume it is (the length-1 axis dropped)")
def _(folder):
    path = write(sitk.Image([4, 5, 6, 1], sitk.sitkInt16), folder / "one.nii.gz", True)
    return lambda: volumes.read_volume(path)


@case("image_rgb", "volumes", "an RGB (3 x uint8 per voxel) MetaImage", error=InputError,
      match=r"rgb\.mha has 3 values per voxel.*one scalar volume per file")
def _(folder):
    path = write(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), folder / "rgb.mha")
    return lambda: volumes.read_volume(path)


@case("image_complex", "volumes", "a complex-valued NRRD (raw MR data)", error=InputError,
      match=r"complex\.nrrd holds complex values.*magnitude image")
def _(folder):
    path = write(sitk.Image([4, 4, 4], sitk.sitkComplexFloat32), folder / "complex.nrrd")
    return lambda: volumes.read_volume(path)


@case("text_named_nii_gz", "volumes", "a text file named scan.nii.gz", error=InputError,
      match=r"scan\.nii\.gz.*not a valid NIfTI file.*export it again")
def _(folder):
    (folder / "scan.nii.gz").write_text("Patient: anonymous\nScan: see PACS\n")
    return lambda: volumes.read_volume(folder / "scan.nii.gz")


@case("empty_file", "volumes", "an empty (0-byte) .nrrd", error=InputError,
      match=r"empty\.nrrd.*not a valid NRRD file.*export it again")
def _(folder):
    (folder / "empty.nrrd").write_bytes(b"")
    return lambda: volumes.read_volume(folder / "empty.nrrd")


@case("unsupported_suffix", "volumes", "a PNG screenshot", error=InputError,
      match=r"shot\.png is a \.png file.*use NIfTI")
def _(folder):
    (folder / "shot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return lambda: volumes.read_volume(folder / "shot.png")


@case("missing_file", "volumes", "a path that does not exist", error=InputError,
      match=r"nowhere\.nii\.gz does not exist; check the path")
def _(folder):
    return lambda: volumes.read_volume(folder / "nowhere.nii.gz")


@case("mgh_dims_lying", "volumes", "FreeSurfer .mgh of 120 voxels whose header claims 600^3 "
      "float32 (864 MB; nibabel allocated it all)", error=InputError,
      match=r"lie\.mgh declares 600 x 600 x 600 voxels.*truncated.*export it again", huge=True)
def _(folder):
    import nibabel

    nibabel.save(nibabel.MGHImage(np.zeros((4, 5, 6), np.float32), np.eye(4)),
                 str(folder / "valid.mgh"))
    header = bytearray((folder / "valid.mgh").read_bytes())
    struct.pack_into(">3i", header, 4, 600, 600, 600)  # big-endian width, height, depth
    (folder / "lie.mgh").write_bytes(bytes(header))
    return lambda: volumes.read_volume(folder / "lie.mgh")


def _mgh_with_matrix(folder, matrix):
    import nibabel

    affine = np.eye(4)
    affine[:3, :3] = matrix
    nibabel.save(nibabel.MGHImage(np.zeros((4, 5, 6), np.float32), affine),
                 str(folder / "flat.mgz"))
    return lambda: volumes.read_volume(folder / "flat.mgz")


for _name, _matrix, _what in (
        ("mgh_zero_matrix", np.zeros((3, 3)), "an all-zero voxel-to-world matrix"),
        ("mgh_singular_matrix", [[1, 0, 0], [1, 0, 0], [0, 0, 1]],
         "a singular voxel-to-world matrix (two axes the same)"),
        ("mgh_flat_axis", np.diag([1.0, 1.0, 0.0]), "a zero voxel size along one axis")):
    case(_name, "volumes", f"FreeSurfer .mgz with {_what} (a traceback from NaN sizes)",
         error=InputError, match=r"flat\.mgz has a voxel-to-world matrix that is singular or "
         r"zero.*valid orientation")(lambda folder, m=_matrix: _mgh_with_matrix(folder, m))


# -------------------------------------------------------------------- volumes: NRRD, MetaImage
@case("nrrd_truncated", "volumes", "raw NRRD 20 bytes short of its voxels", error=InputError,
      match=r"cut\.nrrd.*truncated.*export it again")
def _(folder):
    data = write(small_volume(), folder / "whole.nrrd").read_bytes()
    (folder / "cut.nrrd").write_bytes(data[:-20])
    return lambda: volumes.read_volume(folder / "cut.nrrd")


@case("nrrd_gzip_truncated", "volumes", "gzip NRRD whose stream stops 10 bytes early",
      error=InputError, match=r"cut\.nrrd.*truncated.*export it again")
def _(folder):
    data = write(small_volume(), folder / "whole.nrrd", compress=True).read_bytes()
    (folder / "cut.nrrd").write_bytes(data[:-10])
    return lambda: volumes.read_volume(folder / "cut.nrrd")


@case("nrrd_sizes_too_big", "volumes", "raw NRRD of 6 x 5 x 4 voxels whose `sizes:` says "
      "6 5 40", error=InputError,
      match=r"sizes\.nrrd declares 6 x 5 x 40 voxels.*truncated.*export")
def _(folder):
    write(small_volume(), folder / "whole.nrrd")
    patched(folder / "whole.nrrd", folder / "sizes.nrrd", b"sizes: 6 5 4", b"sizes: 6 5 40")
    return lambda: volumes.read_volume(folder / "sizes.nrrd")


@case("nrrd_sizes_count", "volumes", "NRRD with `dimension: 3` but two `sizes:`",
      error=InputError, match=r"count\.nrrd.*parsed 2 values, but dimension is 3.*export")
def _(folder):
    write(small_volume(), folder / "whole.nrrd")
    patched(folder / "whole.nrrd", folder / "count.nrrd", b"sizes: 6 5 4", b"sizes: 6 5")
    return lambda: volumes.read_volume(folder / "count.nrrd")


@case("nrrd_zero_axis", "volumes", "NRRD with an axis of size 0", error=InputError,
      match=r"zero\.nrrd.*size is zero.*export it again")
def _(folder):
    (folder / "zero.nrrd").write_bytes(nrrd_header("6 0 4"))
    return lambda: volumes.read_volume(folder / "zero.nrrd")


@case("nrrd_huge_dims", "volumes", "NRRD header declaring 100000^3 float voxels (4 PB)",
      error=InputError, match=r"huge\.nrrd declares 100000 x 100000 x 100000 voxels.*limit",
      huge=True)
def _(folder):
    (folder / "huge.nrrd").write_bytes(nrrd_header("100000 100000 100000") + b"\0" * 64)
    return lambda: volumes.read_volume(folder / "huge.nrrd")


@case("nrrd_dims_lying", "volumes", "64-byte NRRD declaring 1200^3 uint8 (1.7 GB, under the "
      "voxel limit)", error=InputError,
      match=r"lie\.nrrd declares 1200 x 1200 x 1200.*truncated.*export",
      huge=True)
def _(folder):
    (folder / "lie.nrrd").write_bytes(nrrd_header("1200 1200 1200", "uint8") + b"\0" * 64)
    return lambda: volumes.read_volume(folder / "lie.nrrd")


@case("nhdr_missing_data_file", "volumes", "detached NRRD header (.nhdr) whose data file is "
      "gone", error=InputError,
      match=r"scan\.nhdr keeps its voxels in .*scan\.raw, which does not exist; copy")
def _(folder):
    write(small_volume(), folder / "scan.nhdr")
    (folder / "scan.raw").unlink()
    return lambda: volumes.read_volume(folder / "scan.nhdr")


@case("nhdr_data_file_is_a_pipe", "volumes", "detached NRRD whose data file is a named pipe "
      "(reading it would wait forever)", error=InputError,
      match=r"scan\.nhdr keeps its voxels in .*scan\.raw, which is not a regular file")
def _(folder):
    write(small_volume(), folder / "scan.nhdr")
    (folder / "scan.raw").unlink()
    os.mkfifo(folder / "scan.raw")
    return lambda: volumes.read_volume(folder / "scan.nhdr")


@case("mhd_wrong_element_data_file", "volumes", "MetaImage header (.mhd) whose ElementDataFile "
      "names a file that is not there", error=InputError,
      match=r"scan\.mhd keeps its voxels in .*other\.raw, which does not exist; copy")
def _(folder):
    write(small_volume(), folder / "valid.mhd")
    (folder / "valid.raw").rename(folder / "scan.raw")
    patched(folder / "valid.mhd", folder / "scan.mhd", b"valid.raw", b"other.raw")
    return lambda: volumes.read_volume(folder / "scan.mhd")


@case("mha_short_element_data_file", "volumes", ".mha whose ElementDataFile is a 10-byte "
      "file", error=InputError,
      match=r"scan\.mha declares 6 x 5 x 4 voxels.*tiny\.raw holds 10.*export")
def _(folder):
    write(small_volume(), folder / "valid.mha")
    (folder / "tiny.raw").write_bytes(b"\0" * 10)
    patched(folder / "valid.mha", folder / "scan.mha", b"ElementDataFile = LOCAL",
            b"ElementDataFile = tiny.raw")
    return lambda: volumes.read_volume(folder / "scan.mha")


@case("mha_huge_dims", "volumes", "MetaImage declaring 100000^3 doubles", error=InputError,
      match=r"huge\.mha declares 100000 x 100000 x 100000 voxels.*limit", huge=True)
def _(folder):
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
              "ElementType = MET_DOUBLE\nElementDataFile = LOCAL\n")
    (folder / "huge.mha").write_bytes(header.encode() + b"\0" * 64)
    return lambda: volumes.read_volume(folder / "huge.mha")


# ------------------------------------------------------------------------------ volumes: DICOM
@case("dicom_missing_slice", "volumes", "DICOM series folder with slice 3 of 6 removed",
      error=InputError, match=r"series in .*gap.*missing slices.*export the complete series")
def _(folder):
    paths = dicom_series(folder / "gap")
    paths[3].unlink()
    return lambda: volumes.read_volume(folder / "gap")


@case("dicom_duplicate_slice", "volumes", "DICOM series folder with one slice copied",
      error=InputError, match=r"series in .*twice.*duplicate slices.*remove the duplicates")
def _(folder):
    paths = dicom_series(folder / "twice")
    shutil.copy(paths[2], folder / "twice" / "copy_of_slice002.dcm")
    return lambda: volumes.read_volume(folder / "twice")


@case("dicom_single_slice", "volumes", "DICOM folder with one slice", error=InputError,
      match=r"series in .*one.* has 1 slice; a 3D volume needs 2")
def _(folder):
    dicom_series(folder / "one", count=1)
    return lambda: volumes.read_volume(folder / "one")


@case("dicom_none", "volumes", "folder of text files (no DICOM)", error=InputError,
      match=r"notes holds no DICOM image series; give a folder of DICOM slices")
def _(folder):
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("the scans are on the PACS")
    return lambda: volumes.read_volume(folder / "notes")


def _series_volume(image: sitk.Image) -> None:
    assert image.GetSize() == (8, 8, 6), image.GetSize()
    assert abs(image.GetSpacing()[2] - 2.5) < 1e-6


@case("dicom_shuffled_names", "volumes", "DICOM series whose file names run backwards",
      recovery=_series_volume, outcome="slices ordered by position, not by file name")
def _(folder):
    paths = dicom_series(folder / "series")
    for index, path in enumerate(reversed(paths)):
        path.rename(path.with_name(f"z{index:03d}.tmp"))
    for path in (folder / "series").iterdir():
        path.rename(path.with_suffix(".dcm"))
    return lambda: volumes.read_volume(folder / "series")


# --------------------------------------------------------------------------- segmentations
def _seg_variant(folder: Path, name: str, old: bytes, new: bytes) -> Path:
    """A ``.seg.nrrd`` from the valid two-segment file with one header text replaced."""
    valid = segmentation_file(folder)
    path = patched(valid, folder / name, old, new)
    valid.unlink()
    return path


def _seg_header_case(name: str, input: str, match: str, file: str, old: bytes,
                     new: bytes) -> None:
    """Register a case: the valid ``.seg.nrrd`` with header text ``old`` replaced by ``new``,
    read; it must fail with an InputError matching ``match``."""
    @case(name, "segmentations", input, error=InputError, match=match)
    def _(folder):
        path = _seg_variant(folder, file, old, new)
        return lambda: segmentations.read_segmentation(path)


for _row in (
    ("seg_layer_missing", ".seg.nrrd whose segment lives in layer 3 of a one-layer file",
     r"layer\.seg\.nrrd: segment 'spleen' is in layer 3.*save it again from Slicer",
     "layer.seg.nrrd", b"Segment1_Layer:=0", b"Segment1_Layer:=3"),
    ("seg_unnamed_voxels", ".seg.nrrd whose spleen segment says value 7 while its voxels are 2",
     r"unnamed\.seg\.nrrd has voxels of value 2 in layer 0 that no segment names.*save",
     "unnamed.seg.nrrd", b"Segment1_LabelValue:=2", b"Segment1_LabelValue:=7"),
    ("seg_shared_value", ".seg.nrrd giving two segments label value 1 in one layer",
     r"shared\.seg\.nrrd: segments 'liver' and 'spleen' both have label value 1.*save",
     "shared.seg.nrrd", b"Segment1_LabelValue:=2", b"Segment1_LabelValue:=1"),
    ("seg_duplicate_name", ".seg.nrrd with two segments named liver",
     r"names\.seg\.nrrd has two segments named 'liver'; rename one",
     "names.seg.nrrd", b"Segment1_Name:=spleen", b"Segment1_Name:=liver"),
    ("seg_fractional_value", ".seg.nrrd with Segment1_LabelValue 1.5",
     r"value\.seg\.nrrd has a malformed Segment1_LabelValue.*whole.*save it",
     "value.seg.nrrd", b"Segment1_LabelValue:=2", b"Segment1_LabelValue:=1.5"),
    ("seg_nan_layer", ".seg.nrrd with Segment1_Layer nan",
     r"nan\.seg\.nrrd has a malformed Segment1_Layer \('nan'\).*save it",
     "nan.seg.nrrd", b"Segment1_Layer:=0", b"Segment1_Layer:=nan"),
):
    _seg_header_case(*_row)


@case("seg_segment_gap", "segmentations", ".seg.nrrd describing Segment0 and Segment7 but no "
      "Segment1 (inconsistent segment count)", error=InputError,
      match=r"gap\.seg\.nrrd describes segment 7 but not segment 1.*save it again")
def _(folder):
    path = _seg_variant(folder, "gap.seg.nrrd", b"Segment1_", b"Segment7_")
    path.write_bytes(path.read_bytes().replace(b"Segment1_", b"Segment7_"))
    return lambda: segmentations.read_segmentation(path)


def _empty_segment(segmentation) -> None:
    assert [s.name for s in segmentation.segments] == ["liver", "spleen", "kidney"]
    assert not segmentation.mask("kidney").any() and segmentation.mask("spleen").any()


@case("seg_empty_segment", "segmentations", ".seg.nrrd with a segment (kidney, value 7) that "
      "has no voxels", recovery=_empty_segment,
      outcome="read; the segment is kept, empty (as Slicer keeps it)")
def _(folder):
    segmentation = segmentations.Segmentation.from_label_map(small_label(),
                                                             {1: "liver", 2: "spleen"})
    segmentation.segments.append(segmentations.Segment("kidney", 7, (0.5, 0.2, 0.1)))
    path = segmentations.write_segmentation(segmentation, folder / "empty_kidney.seg.nrrd")
    return lambda: segmentations.read_segmentation(path)


@case("seg_overlap_as_label_map", "segmentations", "two-layer .seg.nrrd with overlapping "
      "segments, read as one label map", error=InputError,
      match=r"Segments 'liver' and 'tumour' overlap in \d+ voxels.*remove the overlap")
def _(folder):
    liver = small_label((0, 1, 1))
    tumour = small_label((0, 1, 0))
    segmentation = segmentations.Segmentation([liver, tumour], [
        segmentations.Segment("liver", 1, layer=0), segmentations.Segment("tumour", 1, layer=1)])
    path = segmentations.write_segmentation(segmentation, folder / "overlap.seg.nrrd")
    return lambda: volumes.read_label(path)


# ------------------------------------------------------------------------------- label maps
@case("label_negative", "label maps", "int16 label map holding -3", error=InputError,
      match=r"negative\.nii\.gz holds negative values \(-3\); labels must be 0")
def _(folder):
    path = write(small_label((0, 1, -3), dtype=np.int16), folder / "negative.nii.gz", True)
    return lambda: volumes.read_label(path)


@case("label_fractional", "label maps", "float label map holding 1.5 (an image or "
      "probability map given as labels)", error=InputError,
      match=r"probabilities\.nrrd holds non-integer values.*was an image given instead")
def _(folder):
    path = write(small_label((0, 1, 1.5), dtype=np.float32), folder / "probabilities.nrrd")
    return lambda: volumes.read_label(path)


@case("label_nan", "label maps", "float label map with a NaN voxel", error=InputError,
      match=r"nan_label\.nrrd has \d+ NaN or infinite voxels; replace them")
def _(folder):
    path = write(small_label((0, 1, np.nan), dtype=np.float32), folder / "nan_label.nrrd")
    return lambda: volumes.read_label(path)


def _whole_floats(label: sitk.Image) -> None:
    assert label.GetPixelID() == sitk.sitkUInt8
    assert volumes.label_values(label) == [1, 2]


@case("label_float_whole", "label maps", "float64 label map of whole values 0, 1, 2",
      recovery=_whole_floats, outcome="read as uint8 labels (whole-valued floats are labels)")
def _(folder):
    path = write(small_label((0, 1, 2), dtype=np.float64), folder / "float.nii.gz", True)
    return lambda: volumes.read_label(path)


@case("label_empty_training_case", "label maps", "all-background label map of a training "
      "case", error=InputError, match=r"empty_label\.nrrd is empty \(all background\); label "
      "the case, or drop it")
def _(folder):
    write(small_volume(), folder / "case.nrrd")
    write(small_label((0,)), folder / "empty_label.nrrd")
    case = datasets.Case("case", (folder / "case.nrrd",), folder / "empty_label.nrrd")
    return lambda: case.load()


def _all_foreground(scores) -> None:
    (score,) = scores
    assert score.value == 1 and score.present
    assert score.dice == 1.0 and score.hd95_mm == 0.0 and score.msd_mm == 0.0
    assert abs(score.volume_ref_ml - 4 * 5 * 6 * 0.8 * 0.9 * 2.5 / 1000) < 1e-9


@case("label_all_foreground", "label maps", "label map that is 1 everywhere, scored against "
      "itself", recovery=_all_foreground,
      outcome="read; Dice 1, HD95 0 (the image border counts as the surface)")
def _(folder):
    image = small_label((1, 1, 1))
    image = sitk.Add(sitk.Multiply(image, 0), 1)
    path = write(image, folder / "full.nrrd")

    def score():
        label = volumes.read_label(path)
        return metrics.evaluate(label, label)

    return score


# ---------------------------------------------------------------------------------- datasets
@case("csv_missing_file", "datasets", "case list (CSV) naming a label map that is not there",
      error=InputError, match=r"cases\.csv line 3: .*b_label\.nrrd does not exist; fix the path")
def _(folder):
    write(small_volume(), folder / "a.nrrd")
    write(small_label(), folder / "a_label.nrrd")
    write(small_volume(), folder / "b.nrrd")
    with open(folder / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["image", "label"], ["a.nrrd", "a_label.nrrd"],
                          ["b.nrrd", "b_label.nrrd"]])
    return lambda: datasets.discover(folder / "cases.csv")


@case("csv_header_only", "datasets", "case list (CSV) with a header and no rows",
      error=InputError, match=r"cases\.csv lists no cases; add one line per case")
def _(folder):
    (folder / "cases.csv").write_text("image,label\n")
    return lambda: datasets.discover(folder / "cases.csv")


@case("label_on_other_grid", "datasets", "image/label pair whose label map has another "
      "spacing", error=GeometryError,
      match=r"Label map .*liver_label\.nrrd .* not on the voxel grid of image .*liver\.nrrd.*"
            r"resample")
def _(folder):
    write(small_volume(), folder / "liver.nrrd")
    label = small_label()
    label.SetSpacing((1.0, 1.0, 1.0))
    write(label, folder / "liver_label.nrrd")
    return lambda: datasets.discover(folder).cases[0].load()


@case("labels_json_bad_json", "datasets", "labels.json that is not JSON", error=InputError,
      match=r"labels\.json.*fix the JSON")
def _(folder):
    write(small_volume(), folder / "liver.nrrd")
    write(small_label(), folder / "liver_label.nrrd")
    (folder / "labels.json").write_text("{1: liver, 2: spleen}")
    return lambda: datasets.discover(folder)


@case("labels_json_duplicate_names", "datasets", "labels.json naming two values liver",
      error=InputError,
      match=r"labels\.json: .*gives two values the same name.*Fix the label table")
def _(folder):
    write(small_volume(), folder / "liver.nrrd")
    write(small_label(), folder / "liver_label.nrrd")
    (folder / "labels.json").write_text(json.dumps({"1": "liver", "2": "liver"}))
    return lambda: datasets.discover(folder)


@case("labels_json_not_a_table", "datasets", "dataset.json whose labels are a list",
      error=InputError, match=r"dataset\.json: .*labels.*must map")
def _(folder):
    (folder / "imagesTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": ["background", "liver"],
        "file_ending": ".nrrd"}))
    return lambda: datasets.discover(folder)


@case("label_values_not_in_table", "datasets", "label map holding value 3 that labels.json "
      "does not name", error=InputError,
      match=r"liver_label\.nrrd holds values \[3\] that the label table.*add them")
def _(folder):
    write(small_volume(), folder / "liver.nrrd")
    write(small_label((0, 1, 3)), folder / "liver_label.nrrd")
    (folder / "labels.json").write_text(json.dumps({"1": "liver"}))

    def load():
        dataset = datasets.discover(folder)
        return dataset.cases[0].load(dataset.labels)

    return load


@case("no_labelled_case", "datasets", "folder of images with no label maps", error=InputError,
      match=r"Found no image/label pairs in .*name label maps like <case>_label")
def _(folder):
    write(small_volume(), folder / "a.nrrd")
    write(small_volume(), folder / "b.nrrd")
    return lambda: datasets.discover(folder)


# ------------------------------------------------------------------------------- model files
def _card_case(folder: Path, name: str, card_text: str) -> Call:
    path = model_file_with_card(folder / name, card_text)
    return lambda: checkpoint.load_model(path)


@case("card_wrong_type", "model files", "model card with in_channels \"1\" (text)",
      error=ModelFileError, match=r"model card of .*type\.safetensors, field 'in_channels' "
      "must be a positive whole number; re-export")
def _(folder):
    return _card_case(folder, "type.safetensors", json.dumps(tiny_card(in_channels="1")))


@case("card_unknown_field", "model files", "model card with an extra field 'colour'",
      error=ModelFileError, match=r"unknown\.safetensors, field 'colour' is unknown.*update")
def _(folder):
    return _card_case(folder, "unknown.safetensors", json.dumps(tiny_card(colour="red")))


@case("card_missing_field", "model files", "model card without 'labels'", error=ModelFileError,
      match=r"missing\.safetensors, required field 'labels' is missing; re-export")
def _(folder):
    card = tiny_card()
    del card["labels"], card["label_values"]
    return _card_case(folder, "missing.safetensors", json.dumps(card))


@case("card_not_an_object", "model files", "model card that is a JSON list",
      error=ModelFileError, match=r"list\.safetensors is not a JSON object; re-export")
def _(folder):
    return _card_case(folder, "list.safetensors", json.dumps([tiny_card()]))


@case("card_nan_spacing", "model files", "model card with spacing [NaN, 1, 1]",
      error=ModelFileError, match=r"nan\.safetensors, field 'spacing' must be a list of 3 "
      "positive numbers")
def _(folder):
    return _card_case(folder, "nan.safetensors",
                      json.dumps(tiny_card(spacing=[float("nan"), 1.0, 1.0])))


@case("card_huge_network", "model files", "tiny weights under a card asking for a UNet with "
      "32768 channels (a 116 GB network)", error=ModelFileError,
      match=r"weights in .*huge\.safetensors do not fit the unet its card describes", huge=True)
def _(folder):
    card = tiny_card()
    card["arguments"]["channels"] = [2**15, 2**15]
    return _card_case(folder, "huge.safetensors", json.dumps(card))


@case("weights_not_fitting_card", "model files", "weights of a 4-8 UNet under a card for a "
      "4-16 UNet", error=ModelFileError,
      match=r"weights in .*shapes\.safetensors do not fit the unet.*has shape")
def _(folder):
    card = tiny_card()
    card["arguments"]["channels"] = [4, 16]
    return _card_case(folder, "shapes.safetensors", json.dumps(card))


@case("safetensors_garbage_header", "model files", ".safetensors whose JSON header is noise",
      error=ModelFileError, match=r"garbage\.safetensors is not a complete TransferSeg model "
      "file \\(truncated or corrupt\\).*re-download")
def _(folder):
    noise = np.random.default_rng(0).bytes(200)
    (folder / "garbage.safetensors").write_bytes(struct.pack("<Q", 200) + noise)
    return lambda: checkpoint.load_model(folder / "garbage.safetensors")


@case("safetensors_huge_header", "model files", ".safetensors whose header length field says "
      "2^62 bytes", error=ModelFileError,
      match=r"length\.safetensors.*truncated or corrupt.*re-download",
      huge=True)
def _(folder):
    (folder / "length.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return lambda: checkpoint.load_model(folder / "length.safetensors")


@case("safetensors_huge_tensor", "model files", ".safetensors declaring one 100000^3 float "
      "tensor in a 16-byte body", error=ModelFileError,
      match=r"tensor\.safetensors.*truncated or corrupt.*re-download", huge=True)
def _(folder):
    header = json.dumps({"w": {"dtype": "F32", "shape": [100000] * 3,
                               "data_offsets": [0, 4 * 10**15]}}).encode()
    (folder / "tensor.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                                + b"\0" * 16)
    return lambda: checkpoint.load_model(folder / "tensor.safetensors")


@case("safetensors_is_a_zip", "model files", "torch.save() zip renamed to .safetensors",
      error=ModelFileError, match=r"zip\.safetensors is a PyTorch \(pickle\) file named "
      r"\.safetensors.*transferseg models import")
def _(folder):
    torch.save({"w": torch.zeros(2)}, folder / "zip.safetensors")
    return lambda: checkpoint.load_model(folder / "zip.safetensors")


@case("safetensors_is_a_pickle", "model files", "raw pickle that would run code, renamed to "
      ".safetensors", error=ModelFileError,
      match=r"pickle\.safetensors is a PyTorch \(pickle\) file.*import it")
def _(folder):
    return pickle_trap(folder / "pickle.safetensors", checkpoint.load_model)


@case("model_truncated", "model files", "model file cut in half", error=ModelFileError,
      match=r"half\.safetensors is not a complete TransferSeg model file.*re-download")
def _(folder):
    data = tiny_model_file(folder / "whole.safetensors").read_bytes()
    (folder / "half.safetensors").write_bytes(data[: len(data) // 2])
    return lambda: checkpoint.load_model(folder / "half.safetensors")


@case("model_without_card", "model files", "plain safetensors weights without a model card",
      error=ModelFileError, match=r"plain\.safetensors holds weights but no TransferSeg model "
      "card; import it as foreign weights")
def _(folder):
    save_file({"w": torch.zeros(2)}, str(folder / "plain.safetensors"))
    return lambda: checkpoint.read_card(folder / "plain.safetensors")


# -------------------------------------------------------------------------------- importers
@case("pth_needs_pickle", "importers", ".pth whose pickle calls Path.touch (code execution)",
      error=ModelFileError, match=r"evil\.pth needs arbitrary Python objects to load \(pickle\)"
      r", which TransferSeg never runs.*ask its publisher")
def _(folder):
    witness = folder / "code_ran"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Touch(witness)},
               folder / "evil.pth")
    return without_witness(lambda: weights.read_torch_weights(folder / "evil.pth"), witness)


@case("pth_raw_pickle_needs_code", "importers", "legacy (non-zip) pickle .pth calling "
      "Path.touch", error=ModelFileError,
      match=r"legacy\.pth needs arbitrary Python objects.*ask its publisher")
def _(folder):
    return pickle_trap(folder / "legacy.pth", weights.read_torch_weights)


@case("pth_not_weights", "importers", "a text file named weights.pth", error=ModelFileError,
      match=r"weights\.pth is not a readable PyTorch weights file.*right file")
def _(folder):
    (folder / "weights.pth").write_text("these are not the weights you are looking for")
    return lambda: weights.read_torch_weights(folder / "weights.pth")


@case("pth_zip_damaged", "importers", "torch.save() zip with its data record corrupted",
      error=ModelFileError,
      match=r"damaged\.pth is not a readable PyTorch weights file.*download it again")
def _(folder):
    torch.save({"w": torch.arange(64.0)}, folder / "whole.pth")
    with zipfile.ZipFile(folder / "whole.pth") as old, \
            zipfile.ZipFile(folder / "damaged.pth", "w") as new:
        for item in old.infolist():
            data = old.read(item)
            new.writestr(item, data[: len(data) // 3] if item.filename.endswith(".pkl")
                         else data)
    return lambda: weights.read_torch_weights(folder / "damaged.pth")


@case("plain_weights_without_architecture", "importers", "plain state_dict whose catalog "
      "entry names no architecture", error=InputError,
      match=r"weights\.safetensors is a plain state_dict: its catalog entry must name the "
      "architecture")
def _(folder):
    from TransferSegLib.importers import native

    save_file({"w": torch.zeros(2)}, str(folder / "weights.safetensors"))
    return lambda: native.load(folder / "weights.safetensors", {"labels": {"0": "background"}})


# ------------------------------------------------------------------------------ command line
@case("cli_segment_missing_model", "cli", "transferseg segment --model that does not exist",
      cli=True, match=r"Model file .*nowhere\.safetensors does not exist; check the path")
def _(folder):
    write(small_volume(), folder / "scan.nrrd")
    return cli("segment", "--model", folder / "nowhere.safetensors", "--image",
               folder / "scan.nrrd", "--output", folder / "seg.nii.gz", "--quiet")


@case("cli_segment_text_image", "cli", "transferseg segment --image scan.nii.gz that is a "
      "text file", cli=True, match=r"scan\.nii\.gz.*not a valid NIfTI file.*export it again")
def _(folder):
    tiny_model_file(folder / "model.safetensors")
    (folder / "scan.nii.gz").write_text("not an image")
    return cli("segment", "--model", folder / "model.safetensors", "--image",
               folder / "scan.nii.gz", "--output", folder / "seg.nii.gz", "--quiet")


@case("cli_segment_bad_output_suffix", "cli", "transferseg segment --output seg.png", cli=True,
      match=r"seg\.png is a \.png file.*use NIfTI")
def _(folder):
    return segment_cli(folder, "--output", folder / "seg.png", "--quiet")


@case("cli_evaluate_other_grids", "cli", "transferseg evaluate of label maps on different "
      "grids, without --resample", cli=True,
      match=r"pred\.nrrd and .*ref\.nrrd are not on the same voxel grid.*--resample")
def _(folder):
    write(small_label(), folder / "ref.nrrd")
    shifted = small_label()
    shifted.SetOrigin((0.0, 0.0, 0.0))
    write(shifted, folder / "pred.nrrd")
    return cli("evaluate", "--prediction", folder / "pred.nrrd", "--reference",
               folder / "ref.nrrd")


@case("cli_evaluate_4d_prediction", "cli", "transferseg evaluate of a 4D prediction", cli=True,
      match=r"pred\.nii\.gz has 4 dimensions.*split the time points")
def _(folder):
    write(small_label(), folder / "ref.nrrd")
    write(sitk.Image([6, 5, 4, 2], sitk.sitkUInt8), folder / "pred.nii.gz", True)
    return cli("evaluate", "--prediction", folder / "pred.nii.gz", "--reference",
               folder / "ref.nrrd")


@case("cli_evaluate_bad_label_table", "cli", "transferseg evaluate --labels with a broken "
      "JSON table", cli=True, match=r"Could not read label table .*table\.json: .*fix the JSON")
def _(folder):
    write(small_label(), folder / "ref.nrrd")
    (folder / "table.json").write_text('{"1": "liver",')
    return cli("evaluate", "--prediction", folder / "ref.nrrd", "--reference",
               folder / "ref.nrrd", "--labels", folder / "table.json")


@case("cli_finetune_no_labels", "cli", "transferseg finetune on a case list without label "
      "maps", cli=True, match=r"cases\.csv has no labelled case; training needs")
def _(folder):
    write(small_volume(), folder / "a.nrrd")
    (folder / "cases.csv").write_text("image\na.nrrd\n")
    return cli("finetune", "--strategy", "scratch", "--data", folder / "cases.csv", "--out",
               folder / "run", "--steps", "1", "--device", "cpu")


@case("cli_unknown_model_id", "cli", "transferseg models show of an unknown id", cli=True,
      match=r"No model with id 'no-such-model'; see `transferseg models list`")
def _(folder):
    return cli("models", "show", "no-such-model")


# ------------------------------------------------------- outputs that are inputs (never replaced)
@case("cli_evaluate_json_is_the_label_table", "cli", "transferseg evaluate --json naming the "
      "--labels table, with --overwrite", cli=True,
      match=r"Output .*table\.json is the input .*table\.json; writing it would destroy")
def _(folder):
    write(small_label(), folder / "ref.nrrd")
    (folder / "table.json").write_text('{"1": "liver", "2": "spleen"}')
    return cli("evaluate", "--prediction", folder / "ref.nrrd", "--reference",
               folder / "ref.nrrd", "--labels", folder / "table.json", "--json",
               folder / "table.json", "--overwrite")


@case("cli_segment_output_is_a_link_to_the_image", "cli", "transferseg segment --output a "
      "symbolic link to the scan, with --overwrite", cli=True,
      match=r"Output .*seg\.nrrd is the input .*scan\.nrrd")
def _(folder):
    (folder / "seg.nrrd").symlink_to(folder / "scan.nrrd")
    return segment_cli(folder, "--output", folder / "seg.nrrd", "--overwrite", "--quiet")


@case("cli_segment_hard_link_to_the_model", "cli", "transferseg segment --probabilities a "
      "hard link to the model file", cli=True,
      match=r"Output .*probs\.nrrd is the input .*model\.safetensors")
def _(folder):
    tiny_model_file(folder / "model.safetensors")
    os.link(folder / "model.safetensors", folder / "probs.nrrd")
    return segment_cli(folder, "--output", folder / "seg.nii.gz", "--probabilities",
                       folder / "probs.nrrd", "--overwrite", "--quiet")


@case("cli_segment_probabilities_are_the_output", "cli", "transferseg segment with "
      "--probabilities equal to --output", cli=True,
      match=r"Two outputs are the same file \(.*out\.nrrd and .*out\.nrrd\)")
def _(folder):
    return segment_cli(folder, "--output", folder / "out.nrrd", "--probabilities",
                       folder / "out.nrrd", "--overwrite", "--quiet")


@case("cli_finetune_out_holds_the_base", "cli", "transferseg finetune --out the folder that "
      "holds --base, with --overwrite", cli=True,
      match=r"Output folder .*run holds the input .*base\.safetensors")
def _(folder):
    (folder / "run").mkdir()
    tiny_model_file(folder / "run" / "base.safetensors")
    write(small_volume(), folder / "a.nrrd")
    write(small_label(), folder / "a_label.nrrd")
    return cli("finetune", "--base", folder / "run" / "base.safetensors", "--data", folder,
               "--out", folder / "run", "--steps", "1", "--device", "cpu", "--overwrite")


@case("cli_export_torchscript_over_the_model", "cli", "transferseg models export M "
      "--torchscript M --overwrite", cli=True,
      match=r"Output .*model\.safetensors is the input .*model\.safetensors")
def _(folder):
    tiny_model_file(folder / "model.safetensors")
    return cli("models", "export", folder / "model.safetensors", "--torchscript",
               folder / "model.safetensors", "--overwrite")


# ------------------------------------------------------------------ weights that give garbage
@case("model_nan_weights", "model files", "model file whose weights hold NaN",
      error=ModelFileError, match=r"nan\.safetensors hold NaN or infinite values \(first in "
      r".*\); the model is broken")
def _(folder):
    tiny_model_file(folder / "ok.safetensors")
    model, card = checkpoint.load_model(folder / "ok.safetensors")
    with torch.no_grad():
        next(iter(model.parameters()))[0] = float("nan")
    checkpoint.save_model(folder / "nan.safetensors", model, card)
    return lambda: checkpoint.load_model(folder / "nan.safetensors")


@case("model_int8_weights", "model files", "model file whose weights are int8",
      error=ModelFileError, match=r"int8\.safetensors hold .* as int8, not floating point")
def _(folder):
    reference = networks.build_network("unet", 1, 2, **TINY_UNET)
    tensors = {k: v.to(torch.int8).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in reference.state_dict().items()}
    return lambda: checkpoint.load_model(model_file_with_card(
        folder / "int8.safetensors", json.dumps(tiny_card()), tensors))


@case("model_card_label_value_past_16_bits", "model files", "card giving a label the voxel "
      "value 70000", error=ModelFileError,
      match=r"label_values' must map each label name to a voxel value 0\.\.65535")
def _(folder):
    card = tiny_card()
    card["label_values"] = {"background": 0, "liver": 70000}
    return lambda: checkpoint.load_model(model_file_with_card(folder / "big.safetensors",
                                                              json.dumps(card)))


@case("model_card_patch_of_a_billion_voxels", "model files", "card declaring a 1024^3 patch",
      error=ModelFileError, match=r"'patch_size' \[1024, 1024, 1024\] is more than", huge=True)
def _(folder):
    card = tiny_card()
    card["patch_size"] = [1024, 1024, 1024]
    return lambda: checkpoint.load_model(model_file_with_card(folder / "patch.safetensors",
                                                              json.dumps(card)))


# ------------------------------------------------------ numbers out of range on the command line
@case("cli_segment_overlap_one", "cli", "transferseg segment --overlap 1.0", cli=True,
      match=r"--overlap must be at least 0 and below 1 .*not 1\.0")
def _(folder):
    return segment_cli(folder, "--output", folder / "seg.nii.gz", "--overlap", "1.0")


@case("cli_segment_batch_size_zero", "cli", "transferseg segment --batch-size 0", cli=True,
      match=r"--batch-size must be a whole number of at least 1, not 0")
def _(folder):
    return segment_cli(folder, "--output", folder / "seg.nii.gz", "--batch-size", "0")


@case("cli_finetune_checkpoint_every_zero", "cli", "transferseg finetune --checkpoint-every 0",
      cli=True, match=r"--checkpoint-every must be a number of at least 1, not 0")
def _(folder):
    write(small_volume(), folder / "a.nrrd")
    write(small_label(), folder / "a_label.nrrd")
    return cli("finetune", "--strategy", "scratch", "--data", folder, "--out", folder / "run",
               "--steps", "1", "--device", "cpu", "--checkpoint-every", "0")


# ------------------------------------------------------ card values of the wrong type or range
@case("model_card_text_window", "model files", "card whose CT window is text",
      error=ModelFileError, match=r"'normalisation' must have 'window' as two increasing "
      r"numbers, not '-1000\.\.1000'")
def _(folder):
    card = tiny_card(normalisation={"kind": "ct", "window": "-1000..1000"})
    return lambda: checkpoint.load_model(model_file_with_card(folder / "w.safetensors",
                                                              json.dumps(card)))


@case("model_card_percentiles_past_100", "model files", "card whose MR percentiles are 5 and "
      "150", error=ModelFileError, match=r"'percentiles' as two increasing numbers within "
      r"0\.\.100, not \[5, 150\]")
def _(folder):
    card = tiny_card(normalisation={"kind": "mr", "percentiles": [5, 150]})
    return lambda: checkpoint.load_model(model_file_with_card(folder / "p.safetensors",
                                                              json.dumps(card)))


@case("model_card_text_std", "model files", "card whose CT std is text", error=ModelFileError,
      match=r"must have 'std' a positive number, not 'wide'")
def _(folder):
    card = tiny_card(normalisation={"kind": "ct", "window": [-100, 200], "mean": 0,
                                    "std": "wide"})
    return lambda: checkpoint.load_model(model_file_with_card(folder / "s.safetensors",
                                                              json.dumps(card)))


@case("model_card_unknown_recipe_field", "model files", "card whose z-score recipe has a "
      "misspelt field", error=ModelFileError,
      match=r"of kind 'zscore' has the unknown field 'non_zero'")
def _(folder):
    card = tiny_card(normalisation={"kind": "zscore", "non_zero": True})
    return lambda: checkpoint.load_model(model_file_with_card(folder / "z.safetensors",
                                                              json.dumps(card)))


# ----------------------------------------------------------- cards that declare huge networks
@case("model_card_huge_swinunetr", "model files", "card asking for a Swin UNETR of feature "
      "size 480 over a tiny weights file", error=ModelFileError,
      match=r"weights in .*swin\.safetensors do not fit the swinunetr its card describes",
      huge=True)
def _(folder):
    card = tiny_card(architecture="swinunetr",
                     arguments=networks.resolve_kwargs("swinunetr", feature_size=480))
    return lambda: checkpoint.load_model(model_file_with_card(folder / "swin.safetensors",
                                                              json.dumps(card)))


@case("model_card_huge_dynunet", "model files", "card asking for a DynUNet with 2**20 filters "
      "over a tiny weights file", error=ModelFileError,
      match=r"weights in .*dyn\.safetensors do not fit the dynunet", huge=True)
def _(folder):
    card = tiny_card(architecture="dynunet", arguments=networks.resolve_kwargs(
        "dynunet", levels=3, filters=[2**20, 2**20, 2**20]))
    return lambda: checkpoint.load_model(model_file_with_card(folder / "dyn.safetensors",
                                                              json.dumps(card)))


# ------------------------------------------------------------- special files (never hang)
@case("labels_json_named_pipe", "datasets", "labels.json beside the data that is a named "
      "pipe", error=InputError, match=r"Label table .*labels\.json is not a regular file "
      r"\(a pipe, device or socket\); give a file")
def _(folder):
    write(small_volume(), folder / "a.nrrd")
    write(small_label(), folder / "a_label.nrrd")
    os.mkfifo(folder / "labels.json")
    return lambda: datasets.discover(folder)


@case("case_list_named_pipe", "datasets", "case list CSV that is a named pipe",
      error=InputError, match=r"Case list .*cases\.csv is not a regular file")
def _(folder):
    os.mkfifo(folder / "cases.csv")
    return lambda: datasets.discover(folder / "cases.csv")


@case("mgz_named_pipe", "volumes", ".mgz image that is a named pipe", error=InputError,
      match=r"Image .*scan\.mgz is not a regular file")
def _(folder):
    os.mkfifo(folder / "scan.mgz")
    return lambda: volumes.read_volume(folder / "scan.mgz")


@case("cli_evaluate_labels_named_pipe", "cli", "transferseg evaluate --labels that is a named "
      "pipe", cli=True, match=r"Label table .*table\.json is not a regular file")
def _(folder):
    write(small_label(), folder / "ref.nrrd")
    os.mkfifo(folder / "table.json")
    return cli("evaluate", "--prediction", folder / "ref.nrrd", "--reference",
               folder / "ref.nrrd", "--labels", folder / "table.json")


@case("model_file_named_pipe", "model files", "model .safetensors that is a named pipe",
      error=ModelFileError, match=r"model\.safetensors is not a regular file")
def _(folder):
    os.mkfifo(folder / "model.safetensors")
    return lambda: checkpoint.load_model(folder / "model.safetensors")


# -------------------------------------------------------------- ordinary files, accepted
def _bom_case_list(dataset) -> None:
    assert [case.name for case in dataset.cases] == ["a"], dataset.cases


@case("case_list_with_byte_order_mark", "datasets", "case list saved by Excel as CSV UTF-8 "
      "(a byte-order mark before 'image')", recovery=_bom_case_list,
      outcome="read as the same list without the mark")
def _(folder):
    write(small_volume(), folder / "a.nrrd")
    write(small_label(), folder / "a_label.nrrd")
    (folder / "labels.json").write_text('{"1": "liver", "2": "spleen"}')
    (folder / "cases.csv").write_bytes(b"\xef\xbb\xbfimage,label,name\na.nrrd,a_label.nrrd,a\n")
    return lambda: datasets.discover(folder / "cases.csv")


@case("case_list_latin1", "datasets", "case list in Latin-1 (a name with an accent)",
      error=InputError, match=r"cases\.csv is not UTF-8 text .*save the case list as CSV UTF-8")
def _(folder):
    (folder / "cases.csv").write_bytes("image,label,name\na.nrrd,b.nrrd,Jos\xe9\n"
                                       .encode("latin-1"))
    return lambda: datasets.discover(folder / "cases.csv")


# ------------------------------------------------------ code execution through an export
def _hostile_model(folder: Path, **changes) -> Path:
    torch.manual_seed(0)
    card = checkpoint.ModelCard.from_json(json.dumps(tiny_card(**changes)))
    model = networks.build_network("unet", 1, 2, **card.arguments)
    return checkpoint.save_model(folder / "hostile.safetensors", model, card)


@case("export_label_name_expression", "export", "model whose label name is a MONAI "
      "expression ($__import__('os').system...), exported as a bundle", error=InputError,
      match=r"holds \"\$__import__.*which a MONAI bundle would run as code")
def _(folder):
    from TransferSegLib import export

    path = _hostile_model(folder, labels={"0": "background",
                                          "1": "$__import__('os').system('touch pwned')"},
                          label_values={})
    return lambda: export.export_bundle(path, folder / "bundle")


@case("export_title_reference", "export", "model whose title is a config reference "
      "(@network_def), exported as a bundle", error=InputError,
      match=r"holds '@network_def', which a MONAI bundle would run as code or a reference")
def _(folder):
    from TransferSegLib import export

    path = _hostile_model(folder, title="@network_def")
    return lambda: export.export_bundle(path, folder / "bundle")


@case("export_argument_target_key", "export", "model whose network arguments hold a "
      "'_target_' key", error=InputError,
      match=r"holds the key '_target_', which a MONAI bundle would use to build objects")
def _(folder):
    from TransferSegLib import export

    return lambda: export.inert({"norm": ["instance", {"_target_": "os.system"}]},
                                "the model card's 'arguments'")


@case("bundle_zip_config_bomb", "importers", "bundle zip whose inference.json inflates to "
      "100 MB", error=ModelFileError, match=r"bomb\.zip: .*inference\.json declares "
      r"104,857,602 bytes, more than the", huge=True)
def _(folder):
    from TransferSegLib.importers import monai_bundle

    with zipfile.ZipFile(folder / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("b/configs/inference.json", "{" + " " * (100 * 2**20) + "}")
        archive.writestr("b/models/model.pt", b"")
    return lambda: monai_bundle.load(folder / "bomb.zip", {})


def write_corpus(target: Path) -> list[Path]:
    """Write every case's input into ``target/<case name>``; returns the folders."""
    folders = []
    for bad in CASES:
        folder = target / bad.name
        folder.mkdir(parents=True, exist_ok=False)
        bad.make(folder)
        folders.append(folder)
    return folders


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python Testing/badinput.py EMPTY_FOLDER")
    print(f"{len(write_corpus(Path(sys.argv[1])))} cases written to {sys.argv[1]}")
