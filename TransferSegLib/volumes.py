"""Reading and writing 3D images, label maps and Slicer segmentations, with exact geometry.

Everything is a ``SimpleITK.Image`` in ITK's physical space (LPS, millimetres). Sizes, spacings
and origins are given in ITK order (x, y, z); numpy views of an image are (z, y, x).

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), Slicer segmentations
(``.seg.nrrd``: read as a label map here; segment names, colours, layers and tags in
:mod:`TransferSegLib.segmentations`), MetaImage (``.mha``, ``.mhd``), FreeSurfer (``.mgz``,
``.mgh``, through nibabel) and DICOM series (a folder; read only).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TransferSegLib.errors import GeometryError, InputError
from TransferSegLib.files import (
    atomic_output,
    full_suffix,
    library_messages_held,
    require_regular,
)
from TransferSegLib.isolation import sitk  # imported on first use

FORMATS = {
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".seg.nrrd": "Slicer segmentation",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".mgz": "FreeSurfer MGH",
    ".mgh": "FreeSurfer MGH",
}
SUPPORTED_TEXT = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), Slicer segmentations (.seg.nrrd), "
    "MetaImage (.mha, .mhd), FreeSurfer (.mgz, .mgh) and DICOM series folders"
)
# Declared sizes are checked before any voxel is read, so a corrupt or hostile header cannot
# make us allocate terabytes. 2**31 voxels is a 2 GB uint8 volume; override for bigger scans.
DEFAULT_MAX_VOXELS = 2**31
# Relative to the voxel size for origins and spacings; absolute for direction cosines.
GEOMETRY_TOLERANCE = 1e-4
# Deflate (gzip, zlib) expands data at most 1032-fold, so a compressed file much smaller than
# the voxels its header declares cannot hold them (bzip2 can expand more: not bounded here).
DEFLATE_MAX_RATIO = 1032


def max_voxels() -> int:
    """The largest volume (voxels x components) a reader accepts; ``TRANSFERSEG_MAX_VOXELS``."""
    value = os.environ.get("TRANSFERSEG_MAX_VOXELS")
    return int(value) if value else DEFAULT_MAX_VOXELS


# --------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """A voxel grid in physical space: size (voxels), spacing (mm), origin (mm, LPS), direction.

    ``direction`` is the 3x3 matrix of axis cosines, row-major, as ITK stores it.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            tuple(int(v) for v in image.GetSize()),
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    def matches(self, other: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
        """True if both grids have the same size and agree within ``tolerance`` of a voxel:
        the library's one rule for "the same voxel grid"."""
        return not self.differences(other, tolerance)

    def differences(self, other: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> list[str]:
        """What differs between the two grids, as "spacing (1, 1, 1) vs (1, 1, 2)" phrases."""
        def text(values) -> str:
            return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

        if self.size != other.size:
            return [f"size {'x'.join(map(str, self.size))} vs {'x'.join(map(str, other.size))}"]
        voxel = min(self.spacing)
        checks = (("spacing", self.spacing, other.spacing, tolerance, 0.0),  # relative
                  ("origin", self.origin, other.origin, 0.0, tolerance * voxel),
                  ("direction", self.direction, other.direction, 0.0, tolerance))
        return [f"{name} {text(a)} vs {text(b)}" for name, a, b, rtol, atol in checks
                if not np.allclose(a, b, rtol=rtol, atol=atol)]

    def describe(self) -> str:
        spacing = " x ".join(f"{v:.4g}" for v in self.spacing)
        origin = ", ".join(f"{v:.2f}" for v in self.origin)
        size = " x ".join(str(v) for v in self.size)
        return f"size {size}, spacing {spacing} mm, origin ({origin}) mm"

    def blank(self, pixel_type: int | None = None) -> sitk.Image:
        """An image of zeros on this grid (a reference for resampling; 8-bit unless
        ``pixel_type``, a SimpleITK pixel ID)."""
        image = sitk.Image(list(self.size), sitk.sitkUInt8 if pixel_type is None else pixel_type)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def check_same_grid(
    image: sitk.Image,
    label: sitk.Image,
    image_name: str = "the image",
    label_name: str = "the label map",
    tolerance: float = GEOMETRY_TOLERANCE,
) -> None:
    """Raise :class:`GeometryError` unless ``label`` lies on the voxel grid of ``image``."""
    a, b = Geometry.of(image), Geometry.of(label)
    if not a.matches(b, tolerance):
        raise GeometryError(
            f"Label map {label_name} ({b.describe()}) is not on the voxel grid of image "
            f"{image_name} ({a.describe()}); export the label map on the image's geometry, or "
            "resample it with nearest-neighbour interpolation (volumes.resample_label_to)."
        )


def resample_label_to(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``label`` resampled onto the grid of ``reference`` by nearest neighbour (values kept)."""
    return sitk.Resample(
        label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID()
    )


# --------------------------------------------------------------------------------------- reading
def image_format(path: str | os.PathLike) -> str:
    """The format name of ``path`` (``"DICOM"`` for a folder); InputError if unsupported."""
    path = Path(path)
    if path.is_dir():
        return "DICOM"
    suffix = full_suffix(path).lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    kind = f"a {suffix} file" if suffix else "a file without an extension"
    raise InputError(f"{path} is {kind}, which TransferSeg cannot read; use {SUPPORTED_TEXT}.")


def require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"Image file {path} does not exist; check the path and the spelling.")
    require_regular(path, "Image", folder_ok=True)  # a folder is a DICOM series


def _check_declared_size(path: Path, size: tuple[int, ...], components: int) -> None:
    voxels = int(np.prod([int(s) for s in size], dtype=np.float64)) * max(int(components), 1)
    if voxels > max_voxels():
        raise InputError(
            f"{path} declares {' x '.join(map(str, size))} voxels ({voxels:.3g} values), more than "
            f"the limit of {max_voxels():.3g}; if the file is genuine, raise "
            "TRANSFERSEG_MAX_VOXELS, otherwise the header is corrupt."
        )
    if any(int(s) <= 0 for s in size):
        raise InputError(
            f"{path} declares an empty image ({size}); the file is corrupt, export it again."
        )


def _header_fields(path: Path, kind: str) -> dict[str, str]:
    """The ``key: value`` (NRRD) or ``Key = Value`` (MetaImage) fields of a text header,
    lower-case keys; reads at most 64 KiB."""
    separator = " = " if kind == "MetaImage" else ": "
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).decode("latin-1")
    fields = {}
    for line in head.split("\n")[1:]:
        if not line.strip() and kind != "MetaImage":
            break  # the blank line that ends a NRRD header
        if ":=" in line or separator not in line:
            continue
        key, value = line.split(separator, 1)
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break  # the last MetaImage field; binary data may follow
    return fields


def _voxel_source(path: Path) -> tuple[Path, str] | None:
    """The file holding the voxels of ``path`` and its encoding (raw, deflate, hex, text);
    None where no size bound is known (bzip2, lists of files, other formats)."""
    kind = image_format(path)
    if kind in ("NIfTI", "FreeSurfer MGH"):
        compressed = path.name.lower().endswith((".gz", ".mgz"))
        return path, "deflate" if compressed else "raw"
    if kind == "MetaImage":
        fields = _header_fields(path, kind)
        name = fields.get("elementdatafile", "LOCAL")
        encoding = "deflate" if fields.get("compresseddata", "").lower() == "true" else "raw"
    elif kind in ("NRRD", "Slicer segmentation"):
        fields = _header_fields(path, kind)
        name = fields.get("data file", fields.get("datafile", "LOCAL"))
        encoding = {"raw": "raw", "gzip": "deflate", "gz": "deflate", "hex": "hex",
                    "ascii": "text", "text": "text", "txt": "text"}.get(fields.get("encoding", ""))
    else:
        return None
    if encoding is None or not name or len(name.split()) > 1 or "%" in name or name == "LIST":
        return None
    return (path if name == "LOCAL" else path.parent / name), encoding


def _check_data_file(path: Path) -> tuple[Path, str] | None:
    """Refuse a header whose separate data file is missing; return :func:`_voxel_source`."""
    source = _voxel_source(path)
    if source is not None and not source[0].is_file():  # a pipe or device could block forever
        problem = "is not a regular file" if source[0].exists() else "does not exist"
        raise InputError(
            f"{path} keeps its voxels in {source[0]}, which {problem}; copy the data file "
            "next to the header, or export the image as a single file."
        )
    return source


def _check_data_fits(path: Path, size: tuple[int, ...], components: int, item: int,
                     source: tuple[Path, str] | None) -> None:
    """Refuse a header that declares more voxels (``size`` x ``components`` values of ``item``
    bytes) than its data file can hold, before they are allocated (a 500-byte file must not
    cost gigabytes)."""
    if source is None:
        return
    data, encoding = source
    values = float(np.prod([int(s) for s in size], dtype=np.float64)) * components
    needed = values * {"raw": item, "hex": 2 * item, "text": 1,
                       "deflate": item / DEFLATE_MAX_RATIO}[encoding]
    available = data.stat().st_size if data.is_file() else 0
    if needed > available:
        raise InputError(
            f"{path} declares {' x '.join(map(str, size))} voxels, which need {needed:.3g} "
            f"bytes, but {data.name} holds {available}: the file is truncated or its header is "
            "wrong; export it again."
        )


def _pixel_bytes(reader: sitk.ImageFileReader) -> tuple[int, int]:
    """(values per voxel, bytes per value) of the image ``reader`` has read the header of."""
    pixel = reader.GetPixelID()
    scalar = reader.GetNumberOfComponents() == 1 or pixel in (
        sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
    probe = sitk.Image([1, 1], pixel, 1 if scalar else reader.GetNumberOfComponents())
    return probe.GetNumberOfComponentsPerPixel(), probe.GetSizeOfPixelComponent()


def _itk_message(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK's last line is the most specific ("[nrrd] ...: fread got only ..."), but a final
    # "Reason:" line is often a stale errno ("No such file or directory" for a truncated file).
    useful = [line for line in lines if "Description:" in line] or [
        line for line in lines if not line.startswith("Reason:")][-1:] or ["unknown"]
    text = useful[0].replace("Description:", "").split("ERROR:")[-1].strip()
    return re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", text)  # "NrrdImageIO(0x55..): "


def read_itk(path: Path) -> sitk.Image:
    source = _check_data_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(
            f"Could not read {path}: it is damaged or not a valid {image_format(path)} file "
            f"({_itk_message(error)}); export it again."
        ) from None
    _check_declared_size(path, reader.GetSize(), reader.GetNumberOfComponents())
    _check_data_fits(path, reader.GetSize(), *_pixel_bytes(reader), source)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"Could not read {path}: the file is truncated or damaged ({_itk_message(error)}); "
            "export it again."
        ) from None
    if image_format(path) == "NIfTI":
        _check_nifti_data(path, image)
    return image


def _check_nifti_data(path: Path, image: sitk.Image) -> None:
    """ITK's NIfTI reader pads a truncated file with zeros and reads NaN as 0; nibabel does not.

    So the voxels are read a second time with nibabel to find both problems.
    """
    import nibabel

    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except (OSError, ValueError, EOFError, OverflowError, nibabel.filebasedimages.ImageFileError,
            nibabel.spatialimages.HeaderDataError) as error:
        reason = " ".join(str(error).split())  # one line, for the command line
        raise InputError(
            f"Could not read {path}: the file is truncated or damaged ({reason}); export it again."
        ) from None
    if 0 in data.shape:  # ITK reads a zero-length axis as length 1
        raise InputError(
            f"{path} declares an empty image ({data.shape}); the file is corrupt, export it again."
        )
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            image.SetMetaData("transferseg_nonfinite", str(bad))


def _read_mgh(path: Path) -> sitk.Image:
    import nibabel

    try:
        mgh = nibabel.load(str(path))
        components = int(np.prod(mgh.shape[3:] or (1,)))
        _check_declared_size(path, tuple(mgh.shape[:3]), components)
        _check_data_fits(path, tuple(mgh.shape[:3]), components,
                         mgh.header.get_data_dtype().itemsize, _voxel_source(path))
        data = np.asanyarray(mgh.dataobj)
    except (OSError, ValueError, EOFError) as error:
        reason = " ".join(str(error).split())  # one line, for the command line
        raise InputError(
            f"Could not read {path}: it is damaged or not a valid MGH file ({reason}); export it "
            "again."
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    data = data.astype(data.dtype.newbyteorder("="), copy=False)  # MGH is big-endian
    if data.ndim != 3:
        raise InputError(f"{path} has {data.ndim} dimensions; TransferSeg needs a 3D volume.")
    # nibabel: voxel (i, j, k) -> RAS through the affine; ITK: LPS, array order (k, j, i).
    affine = np.asarray(mgh.affine, dtype=np.float64)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    axes = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if not (np.all(np.isfinite(axes)) and np.all(spacing > 0)
            and abs(np.linalg.det(axes / spacing)) > 1e-3):
        raise InputError(
            f"{path} has a voxel-to-world matrix that is singular or zero ({axes.tolist()}), so "
            "its voxels have no position; export it again with a valid orientation."
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((axes / spacing).flatten().tolist())
    image.SetOrigin((ras_to_lps @ affine[:3, 3]).tolist())
    return image


def _dicom_series_files(folder: Path, series_uid: str | None) -> list[str]:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    if not series:
        raise InputError(
            f"Folder {folder} holds no DICOM image series; give a folder of DICOM slices or an "
            f"image file ({SUPPORTED_TEXT})."
        )
    if series_uid is None:
        if len(series) > 1:
            raise InputError(
                f"Folder {folder} holds {len(series)} DICOM series ({', '.join(series)}); move "
                "the one to use into its own folder or name its series UID."
            )
        series_uid = series[0]
    elif series_uid not in series:
        raise InputError(f"Folder {folder} has no DICOM series {series_uid}; it has {series}.")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def _check_slice_positions(folder: Path, files: list[str]) -> None:
    """Refuse series with missing or duplicate slices, which ITK would stack silently."""
    if len(files) < 2:
        raise InputError(f"DICOM series in {folder} has {len(files)} slice; a 3D volume needs 2+.")
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        position = reader.GetMetaData("0020|0032") if reader.HasMetaDataKey("0020|0032") else ""
        orient = reader.GetMetaData("0020|0037") if reader.HasMetaDataKey("0020|0037") else ""
        try:
            position = np.array([float(v) for v in position.split("\\")])
            if normal is None:
                cosines = np.array([float(v) for v in orient.split("\\")])
                normal = np.cross(cosines[:3], cosines[3:])
        except ValueError:
            return  # no usable position tags: ITK falls back to instance order, as it must
        positions.append(float(position @ normal))
    steps = np.diff(np.sort(positions))
    if np.any(steps < 1e-3):
        raise InputError(
            f"DICOM series in {folder} has duplicate slices (two files at the same position); "
            "remove the duplicates or export the series again."
        )
    typical = float(np.median(steps))
    if np.any(steps > 1.5 * typical):
        gap = float(steps.max())
        raise InputError(
            f"DICOM series in {folder} has missing slices (a gap of {gap:.2f} mm where slices are "
            f"{typical:.2f} mm apart); export the complete series."
        )


def _read_dicom(folder: Path, series_uid: str | None = None) -> sitk.Image:
    files = _dicom_series_files(folder, series_uid)
    _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    _check_declared_size(folder, (*first.GetSize()[:2], len(files)), first.GetNumberOfComponents())
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"Could not read the DICOM series in {folder}: {_itk_message(error)}."
        ) from None


def as_volume(image: sitk.Image, path: Path) -> sitk.Image:
    """Reject 2D images and true 4D series; drop a trailing 4th axis of length one."""
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension == 2:
        raise InputError(
            f"{path} is a 2D image; TransferSeg segments 3D volumes, so give the whole series."
        )
    if dimension != 3:
        raise InputError(
            f"{path} has {dimension} dimensions ({image.GetSize()}); TransferSeg needs one 3D "
            "volume: split the time points or channels into separate files."
        )
    return image


def read_volume(
    path: str | os.PathLike, *, allow_nonfinite: bool = False, series_uid: str | None = None
) -> sitk.Image:
    """Read a 3D scalar image (a scan): any supported format, original pixel type kept.

    Raises :class:`InputError` for missing or unsupported files, 2D/4D or multi-component
    images, volumes over the size limit and (unless ``allow_nonfinite``) NaN/Inf voxels.
    """
    path = Path(path)
    require_exists(path)
    kind = image_format(path)
    if kind == "DICOM":
        image = _read_dicom(path, series_uid)
    elif kind == "FreeSurfer MGH":
        image = _read_mgh(path)
    else:
        image = read_itk(path)
    image = as_volume(image, path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} values per voxel (colour or "
            "multi-channel); give one scalar volume per file."
        )
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(
            f"{path} holds complex values (raw MR data?); give a magnitude image."
        )
    if not allow_nonfinite and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
        if image.HasMetaDataKey("transferseg_nonfinite"):
            bad = max(bad, int(image.GetMetaData("transferseg_nonfinite")))
        if bad:
            raise InputError(
                f"{path} has {bad} NaN or infinite voxels; replace them (for example with the "
                "minimum intensity) before using the image."
            )
    return image


def as_label_pixels(image: sitk.Image, path: Path) -> sitk.Image:
    """Integer label values >= 0 in the smallest unsigned type that holds them."""
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(
                f"Label map {path} holds non-integer values; a label map must hold whole label "
                "numbers (0 = background); was an image given instead of its labels?"
            )
    elif array.dtype.kind not in "iub":
        raise InputError(f"Label map {path} has pixel type {array.dtype}; it must be integer.")
    if array.size and array.min() < 0:
        raise InputError(
            f"Label map {path} holds negative values ({int(array.min())}); labels must be 0 "
            "(background) or positive."
        )
    top = int(array.max()) if array.size else 0
    pixel = sitk.sitkUInt8 if top < 256 else sitk.sitkUInt16 if top < 65536 else sitk.sitkUInt32
    return image if image.GetPixelID() == pixel else sitk.Cast(image, pixel)


def read_label(path: str | os.PathLike) -> sitk.Image:
    """Read a label map (0 = background); a ``.seg.nrrd`` is flattened (overlaps refused)."""
    path = Path(path)
    require_exists(path)
    if image_format(path) == "Slicer segmentation":
        from TransferSegLib.segmentations import read_segmentation

        return read_segmentation(path).to_label_map()[0]
    image = read_volume(path)
    return as_label_pixels(image, path)


def label_values(label: sitk.Image) -> list[int]:
    """The non-zero values present in a label map, sorted."""
    values = np.unique(sitk.GetArrayViewFromImage(label))
    return [int(v) for v in values if v != 0]


# --------------------------------------------------------------------------------------- writing
def write_image(
    image: sitk.Image, path: str | os.PathLike, overwrite: bool = False, compress: bool = True
) -> Path:
    """Write ``image`` atomically to ``path`` (format from the suffix); returns the path.

    An existing file is refused unless ``overwrite``; a failed write leaves no partial file.
    """
    path = Path(path)
    kind = image_format(path) if not path.is_dir() else "DICOM"
    if kind == "DICOM":
        raise InputError(
            f"Cannot write {path}: writing DICOM series is not supported; use .nii.gz or .nrrd."
        )
    if kind == "Slicer segmentation":
        from TransferSegLib.segmentations import Segmentation, write_segmentation

        return write_segmentation(Segmentation.from_label_map(image), path, overwrite)
    with atomic_output(path, overwrite) as tmp:
        if kind == "FreeSurfer MGH":
            _write_mgh(image, tmp)
        else:
            with library_messages_held():  # ITK's own lines on failure; ours says it once
                sitk.WriteImage(image, str(tmp), useCompression=compress)
                if kind == "NIfTI":
                    _check_nifti_written(tmp)
    return path


def _check_nifti_written(path: Path) -> None:
    """ITK's NIfTI writer reports a failed write (a full disk) on stderr only and returns:
    raise OSError if ``path`` holds fewer voxel bytes than its header declares."""
    import gzip
    import zlib

    import nibabel

    try:
        header = nibabel.load(str(path)).header
        need = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * int(
            header.get_data_dtype().itemsize)
        if path.name.lower().endswith(".gz"):
            have = 0
            with gzip.open(path, "rb") as stream:  # checks the CRC at the end, too
                while block := stream.read(1 << 22):
                    have += len(block)
        else:
            have = path.stat().st_size
    except (OSError, EOFError, ValueError, zlib.error,
            nibabel.filebasedimages.ImageFileError) as error:
        raise OSError(f"the image writer left a damaged file ({error})") from None
    if have < need:
        raise OSError(f"the image writer wrote only {have} of {need} bytes")


def _write_mgh(image: sitk.Image, path: Path) -> None:
    import nibabel

    ras_from_lps = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = ras_from_lps @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = ras_from_lps @ np.array(image.GetOrigin())
    data = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    if data.dtype not in (np.uint8, np.int16, np.int32, np.float32):
        data = data.astype(np.float32 if data.dtype.kind == "f" else np.int32)
    nibabel.save(nibabel.MGHImage(data, affine), str(path))
