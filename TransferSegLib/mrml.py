"""The bridge between Slicer's scene (MRML nodes) and the library's SimpleITK images.

The only module of TransferSegLib that imports ``slicer`` and ``vtk``. It works inside the
Slicer application and with the ``slicer-core`` wheel (MRML without Qt), so it uses the scene,
the nodes and the static methods of ``vtkSlicerSegmentationsModuleLogic``, never
``slicer.util`` helpers that need the application.

Geometry: MRML places voxels in RAS (x grows to the patient's right, y to the front), ITK in
LPS (x to the left, y to the back); both use millimetres and the same voxel order (i fastest),
so a conversion negates the first two rows of the origin and of the direction matrix and keeps
everything else. Oblique directions are kept exactly.

Nodes under a transform are refused (with the fix: harden the transform): the network sees
voxels on a grid, and a grid that only exists after a transform would come back displaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from TransferSegLib.errors import InputError
from TransferSegLib.segmentations import default_color

# RAS <-> LPS: negate x and y (its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0])
BINARY_LABELMAP = "Binary labelmap"
Colour = tuple[float, float, float]

_segmentation_logic = slicer.vtkSlicerSegmentationsModuleLogic


def _name(node) -> str:
    return node.GetName() or node.GetID() or node.GetClassName()


def _refuse_transformed(node, what: str) -> None:
    transform = node.GetParentTransformNode()
    if transform is not None:
        raise InputError(
            f"{what} '{_name(node)}' is under transform '{_name(transform)}'; harden the "
            "transform (Data module: right-click the node, Harden transform) or remove it first."
        )


# ----------------------------------------------------------------------------- geometry helpers
def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _lps_geometry(ijk_to_ras: np.ndarray, spacing: Sequence[float], start: Sequence[int]):
    """ITK origin and direction (LPS) of a grid whose voxel ``start`` is its first voxel."""
    origin_ras = ijk_to_ras @ np.array([*start, 1.0])
    directions_ras = ijk_to_ras[:3, :3] / np.asarray(spacing, dtype=float)
    origin = FLIP @ origin_ras[:3]
    direction = FLIP @ directions_ras
    return [float(v) for v in origin], [float(v) for v in direction.flatten()]


def _ras_geometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Origin (3,) and axis directions (3x3, columns) of ``image`` in RAS."""
    origin = FLIP @ np.array(image.GetOrigin())
    directions = FLIP @ np.array(image.GetDirection()).reshape(3, 3)
    return origin, directions


def _check_image_data(image_data, what: str):
    """The scalars of a vtkImageData; InputError if there are none or they are not scalar."""
    scalars = image_data.GetPointData().GetScalars() if image_data is not None else None
    dims = image_data.GetDimensions() if image_data is not None else (0, 0, 0)
    if scalars is None or min(dims) < 1 or scalars.GetNumberOfTuples() == 0:
        raise InputError(f"{what} has no image data; load or create the volume first.")
    components = scalars.GetNumberOfComponents()
    if components != 1:
        raise InputError(
            f"{what} has {components} values per voxel (colour or vector); TransferSeg needs a "
            "scalar volume: convert it (Vector to Scalar Volume module) first."
        )
    return scalars


def _voxel_view(image_data, what: str) -> np.ndarray:
    """The scalars of a vtkImageData as a (z, y, x) array sharing its memory (copy it before
    the image data goes away; SimpleITK.GetImageFromArray does)."""
    scalars = _check_image_data(image_data, what)
    dims = image_data.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0])


def _image_data(array: np.ndarray) -> vtk.vtkImageData:
    """A vtkImageData (extent from 0, unit spacing, origin 0) holding a copy of (z, y, x)."""
    array = np.ascontiguousarray(array)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(array.dtype))
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def _require_3d_scalar(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}D; only 3D volumes can become nodes.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has several values per voxel; give a scalar volume.")


# -------------------------------------------------------------------------------------- volumes
def volume_to_image(volume_node) -> sitk.Image:
    """The voxels of a volume node as a SimpleITK image: values, scalar type and geometry exact.

    Origin and direction are converted from RAS to LPS; spacing is kept (mm).
    """
    if volume_node is None:
        raise InputError("No volume was given; select a volume.")
    what = f"Volume '{_name(volume_node)}'"
    _refuse_transformed(volume_node, "Volume")
    image_data = volume_node.GetImageData()
    array = _voxel_view(image_data, what)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    extent = image_data.GetExtent()
    spacing = [float(v) for v in volume_node.GetSpacing()]
    origin, direction = _lps_geometry(_matrix_to_numpy(ijk_to_ras), spacing, extent[::2])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def image_to_volume(image: sitk.Image, scene, name: str, node=None):
    """A scalar volume node holding ``image`` (voxels, scalar type and geometry exact).

    Without ``node`` a new ``vtkMRMLScalarVolumeNode`` called ``name`` is added to ``scene``;
    with one (a scalar or label map volume node), its voxels and geometry are replaced and its
    name is kept.
    """
    _require_3d_scalar(image, f"Image for volume '{name}'")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    _refuse_transformed(node, "Volume")
    origin, directions = _ras_geometry(image)
    matrix = np.eye(4)
    matrix[:3, :3] = directions
    node.SetIJKToRASDirectionMatrix(_numpy_to_matrix(matrix))
    node.SetSpacing(*[float(v) for v in image.GetSpacing()])
    node.SetOrigin(*[float(v) for v in origin])
    node.SetAndObserveImageData(_image_data(sitk.GetArrayViewFromImage(image)))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# -------------------------------------------------------------------------------- segmentations
def _oriented_image(label: sitk.Image) -> slicer.vtkOrientedImageData:
    """A vtkOrientedImageData with the voxels and geometry of ``label``."""
    origin, directions = _ras_geometry(label)
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(_image_data(sitk.GetArrayViewFromImage(label)))
    oriented.SetSpacing(*[float(v) for v in label.GetSpacing()])
    oriented.SetOrigin(*[float(v) for v in origin])
    matrix = np.eye(4)
    matrix[:3, :3] = directions
    oriented.SetDirectionMatrix(_numpy_to_matrix(matrix))
    return oriented


def _oriented_to_image(oriented, what: str) -> sitk.Image:
    """The voxels and geometry of a vtkOrientedImageData as a SimpleITK image (LPS)."""
    array = _voxel_view(oriented, what)
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    spacing = [float(v) for v in oriented.GetSpacing()]
    origin, direction = _lps_geometry(_matrix_to_numpy(matrix), spacing,
                                      oriented.GetExtent()[::2])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _label_values(label_image: sitk.Image, what: str) -> list[int]:
    array = sitk.GetArrayViewFromImage(label_image)
    if array.dtype.kind not in "iu":
        raise InputError(f"{what} has pixel type {array.dtype}; a label map must be integer.")
    values = [int(v) for v in np.unique(array)]
    if values and values[0] < 0:
        raise InputError(f"{what} holds negative values; labels are 0 (background) or more.")
    return [v for v in values if v != 0]


def labelmap_to_segmentation(
    label_image: sitk.Image,
    labels: Mapping[int, str],
    scene,
    name: str,
    colours: Mapping[int, Colour] | None = None,
    reference_volume=None,
    terminology: Mapping[str, str] | None = None,
):
    """A new segmentation node in ``scene``: one segment per value of ``labels`` (0 skipped).

    ``terminology`` (label name -> Slicer ``TerminologyEntry``) tags the segments with their
    coded concept, as Segment Editor does.

    Segments come in increasing label value, named from ``labels``, coloured from ``colours``
    or the library's default palette (:func:`TransferSegLib.segmentations.default_color`). A label
    without voxels still gets its (empty) segment, so the node always lists every label. The
    reference geometry (for Segment Editor) is ``reference_volume``'s, else the label map's.
    Never modifies an existing node. InputError if the label map holds values ``labels`` lacks.
    """
    what = f"Label map for segmentation '{name}'"
    _require_3d_scalar(label_image, what)
    table = {int(v): str(n) for v, n in sorted(labels.items()) if int(v) != 0}
    if not table:
        raise InputError(f"No label names were given for segmentation '{name}'; give at least "
                         "one {value: name}.")
    present = _label_values(label_image, what)
    unnamed = [v for v in present if v not in table]
    if unnamed:
        raise InputError(
            f"{what} holds values {unnamed} that have no name in the label table "
            f"({', '.join(f'{v}={n}' for v, n in table.items())}); add names for them."
        )
    colours = {int(v): tuple(float(c) for c in rgb) for v, rgb in (colours or {}).items()}
    if reference_volume is not None:
        _refuse_transformed(reference_volume, "Reference volume")
        _check_image_data(reference_volume.GetImageData(),
                          f"Volume '{_name(reference_volume)}'")

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    oriented = _oriented_image(label_image)
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    else:
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(oriented))
    if present:
        ok = _segmentation_logic.ImportLabelmapToSegmentationNode(oriented, node, "", "")
        if not ok:
            scene.RemoveNode(node)
            raise InputError(f"Slicer could not import the label map into segmentation "
                             f"'{name}'; check the label map's geometry.")
    by_value = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        by_value[segmentation.GetSegment(segment_id).GetLabelValue()] = segment_id
    for index, (value, label_name) in enumerate(table.items()):
        colour = colours.get(value, default_color(value))
        segment_id = by_value.get(value)
        if segment_id is None:
            segment_id = segmentation.AddEmptySegment("", label_name, list(colour))
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(label_name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*colour)
        segment.SetColorAutoGenerated(False)
        if (terminology or {}).get(label_name):
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminology[label_name])
        segmentation.SetSegmentIndex(segment_id, index)
    return node


def _terminology_of(segment) -> str:
    entry = vtk.reference("")
    return str(entry) if segment.GetTag(segment.GetTerminologyEntryTagName(), entry) else ""


def segment_terminology(segmentation_node) -> dict[str, str]:
    """Segment name -> ``TerminologyEntry`` of the segments of a node that were given one.

    Slicer tags every new segment with a default entry ("Tissue"); a segment still holding
    exactly that default counts as not coded.
    """
    default = _terminology_of(slicer.vtkSegment())
    found = {}
    segmentation = segmentation_node.GetSegmentation() if segmentation_node else None
    for index in range(segmentation.GetNumberOfSegments() if segmentation else 0):
        segment = segmentation.GetNthSegment(index)
        entry = _terminology_of(segment)
        if entry and entry != default:
            found[segment.GetName()] = entry
    return found


def _segment_ids(segmentation_node, segment_ids: Sequence[str] | None) -> list[str]:
    segmentation = segmentation_node.GetSegmentation() if segmentation_node else None
    if segmentation is None:
        raise InputError("No segmentation was given; select a segmentation.")
    what = f"Segmentation '{_name(segmentation_node)}'"
    every = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not every:
        raise InputError(f"{what} has no segments; add segments in Segment Editor first.")
    if segment_ids is None:
        return every
    chosen = list(segment_ids)
    if not chosen:
        raise InputError(f"No segments of segmentation '{_name(segmentation_node)}' were "
                         "chosen; choose at least one.")
    unknown = [s for s in chosen if s not in every]
    if unknown:
        raise InputError(f"{what} has no segment with ID {unknown}; its segments are {every}.")
    return chosen


def _merged(segmentation_node, reference_volume, ids: Sequence[str], values: Sequence[int],
            mode: int) -> sitk.Image:
    """Segments ``ids`` as one label map (``values[i]`` for ``ids[i]``; later ones win)."""
    id_array = vtk.vtkStringArray()
    for segment_id in ids:
        id_array.InsertNextValue(segment_id)
    value_array = vtk.vtkIntArray()
    for value in values:
        value_array.InsertNextValue(int(value))
    merged = slicer.vtkOrientedImageData()
    _segmentation_logic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, reference_volume, id_array, mode, merged, value_array)
    return _oriented_to_image(merged, f"Segmentation '{_name(segmentation_node)}'")


def _check_overlap(segmentation_node, reference_volume, ids: list[str], mode: int) -> None:
    """InputError naming two segments that share voxels (only segments in different layers
    can: a layer holds one value per voxel)."""
    segmentation = segmentation_node.GetSegmentation()
    layers: dict[int, list[str]] = {}
    for segment_id in ids:
        layers.setdefault(segmentation.GetLayerIndex(segment_id), []).append(segment_id)
    if len(layers) < 2:
        return
    owner = None  # per voxel: index (into ids) + 1 of a segment already seen there
    for layer_ids in layers.values():
        values = [ids.index(s) + 1 for s in layer_ids]
        array = sitk.GetArrayFromImage(_merged(segmentation_node, reference_volume, layer_ids,
                                               values, mode)).astype(np.int64)
        if owner is None:
            owner = array
            continue
        clash = (owner != 0) & (array != 0)
        if np.any(clash):
            first = int(np.argmax(clash))
            a, b = int(owner.flat[first]), int(array.flat[first])
            pair = int(np.count_nonzero(clash & (owner == a) & (array == b)))
            total = int(np.count_nonzero(clash))
            more = f" ({total} voxels in all belong to two segments)" if total > pair else ""
            raise InputError(
                f"Segments '{segmentation.GetSegment(ids[a - 1]).GetName()}' and "
                f"'{segmentation.GetSegment(ids[b - 1]).GetName()}' of segmentation "
                f"'{_name(segmentation_node)}' overlap in {pair} voxels{more}, so they cannot "
                "share one label map; remove the overlap in Segment Editor (Logical operators) "
                "or choose other segments."
            )
        owner = np.where(array != 0, array, owner)


def segmentation_to_labelmap(
    segmentation_node,
    reference_volume=None,
    segment_ids: Sequence[str] | None = None,
    *,
    strict: bool = True,
) -> tuple[sitk.Image, dict[int, str], dict[int, Colour]]:
    """The segments as one label map, their names and colours: ``(label, {v: name}, {v: rgb})``.

    The label map lies on ``reference_volume``'s voxel grid (else on the segmentation's
    reference geometry) and holds 1..n for the chosen segments (all by default) in their
    order. Overlapping segments: with ``strict`` (the default) an InputError names two of
    them; otherwise each voxel takes the value of the last segment (in the given order) that
    covers it. The user's node is read, never changed.
    """
    ids = _segment_ids(segmentation_node, segment_ids)
    _refuse_transformed(segmentation_node, "Segmentation")
    if reference_volume is not None:
        _refuse_transformed(reference_volume, "Reference volume")
        _check_image_data(reference_volume.GetImageData(),
                          f"Volume '{_name(reference_volume)}'")
    segmentation = segmentation_node.GetSegmentation()
    what = f"Segmentation '{_name(segmentation_node)}'"
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        raise InputError(
            f"{what} has no binary labelmap representation; create it (Segmentations module: "
            "Representations, Binary labelmap, Create) first."
        )
    geometry_key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    has_geometry = bool(segmentation.GetConversionParameter(geometry_key))
    mode = (slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY if reference_volume or has_geometry
            else slicer.vtkSegmentation.EXTENT_UNION_OF_SEGMENTS)
    if strict:
        _check_overlap(segmentation_node, reference_volume, ids, mode)
    values = list(range(1, len(ids) + 1))
    label = _merged(segmentation_node, reference_volume, ids, values, mode)
    pixel = sitk.sitkUInt8 if len(ids) < 256 else sitk.sitkUInt16
    label = sitk.Cast(label, pixel)
    names, colours = {}, {}
    for value, segment_id in zip(values, ids, strict=True):
        segment = segmentation.GetSegment(segment_id)
        names[value] = segment.GetName()
        colours[value] = tuple(float(c) for c in segment.GetColor())
    return label, names, colours
