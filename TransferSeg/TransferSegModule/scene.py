"""The TransferSeg module's work on the scene: training cases from nodes, new segmentation nodes,
scores, the tables and the training plot.

MRML only, no Qt and no application: every function takes the scene or the nodes it works on,
so the tests run them on a real scene with the ``slicer-core`` wheel. TransferSegLib and
SimpleITK are imported inside the functions, because the module must load before torch is
installed.
"""

from __future__ import annotations

import math

import slicer
import vtk

from TransferSegModule import annotation, matching

ROLE = "TransferSeg.role"  # attribute marking the module's own nodes (plots, tables)


def singleton(scene, class_name: str, role: str, name: str):
    """The module's node of ``class_name`` with ``role`` in ``scene``; made if missing."""
    nodes = scene.GetNodesByClass(class_name)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(ROLE) == role:
            return node
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAttribute(ROLE, role)
    return node


def write_table(node, header, rows, text_columns=()) -> None:
    """Replace the contents of table node ``node``: text in ``text_columns``, numbers elsewhere
    (None becomes NaN, shown empty)."""
    table = vtk.vtkTable()
    for column, name in enumerate(header):
        text = column in text_columns
        array = vtk.vtkStringArray() if text else vtk.vtkDoubleArray()
        array.SetName(name)
        for row in rows:
            value = row[column]
            array.InsertNextValue(str(value) if text else math.nan if value is None
                                  else float(value))
        table.AddColumn(array)
    node.SetAndObserveTable(table)


# --- the training plot: loss and validation Dice against the step --------------------------------

_SERIES = (("loss", (0.2, 0.4, 0.9), "MarkerStyleNone"),
           ("Dice", (0.1, 0.7, 0.2), "MarkerStyleCircle"))


def training_chart(scene):
    """The chart of the training loss and validation Dice (tables and series made once)."""
    chart = singleton(scene, "vtkMRMLPlotChartNode", "chart", "TransferSeg training")
    if chart.GetNumberOfPlotSeriesNodes():
        return chart
    kind = slicer.vtkMRMLPlotSeriesNode
    for role, colour, marker in _SERIES:
        table = singleton(scene, "vtkMRMLTableNode", role, f"TransferSeg {role}")
        write_table(table, ["step", role], [])
        series = singleton(scene, "vtkMRMLPlotSeriesNode", role, f"TransferSeg {role}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(role)
        series.SetPlotType(kind.PlotTypeScatter)
        series.SetMarkerStyle(getattr(kind, marker))
        series.SetColor(*colour)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle("Fine-tuning")
    chart.SetXAxisTitle("step")
    chart.SetYAxisTitle("training loss, validation Dice")
    return chart


def plot_view(scene):
    """A plot view showing the training chart, for the plot widget in the module panel."""
    view = singleton(scene, "vtkMRMLPlotViewNode", "view", "TransferSeg plot view")
    view.SetPlotChartNodeID(training_chart(scene).GetID())
    return view


def update_plot(scene, losses, dices) -> None:
    """Put ``[(step, loss)]`` and ``[(step, Dice)]`` into the chart's tables."""
    training_chart(scene)
    for role, points in (("loss", losses), ("Dice", dices)):
        table = singleton(scene, "vtkMRMLTableNode", role, f"TransferSeg {role}")
        write_table(table, ["step", role], [list(point) for point in points])


# --- nodes <-> the library -----------------------------------------------------------------------

def segment_names(segmentation_node) -> list:
    if segmentation_node is None:
        return []
    segments = segmentation_node.GetSegmentation()
    return [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]


def _relabelled(label, lookup, geometry=None):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(
        matching.relabel_array(sitk.GetArrayViewFromImage(label), lookup))
    image.CopyInformation(geometry or label)
    return image


def training_case(volume, segmentation, mapping, labels, taken: set) -> dict:
    """A job case from a (volume, segmentation) pair: the segments renamed by ``mapping`` and
    numbered as ``labels`` says, on the volume's grid; ``name`` unique among ``taken``."""
    from TransferSegLib import mrml

    label, values, _ = mrml.segmentation_to_labelmap(segmentation, volume, strict=False)
    return {"name": matching.unique_name(volume.GetName(), taken),
            "image": mrml.volume_to_image(volume),
            "label": _relabelled(label, matching.relabel(values, mapping, labels))}


def training_terminology(segmentations, mapping) -> dict:
    """Label name -> ``TerminologyEntry`` from the segments of ``segmentations`` (nodes),
    renamed by ``mapping`` (segment name -> label name; "" ignores the segment)."""
    from TransferSegLib import mrml

    found = {}
    for node in segmentations:
        for segment, entry in mrml.segment_terminology(node).items():
            if mapping.get(segment):
                found.setdefault(mapping[segment], entry)
    return found


def output_names(model_path) -> dict:
    """``{label-map value: name}`` a model writes (its card's labels and values)."""
    from TransferSegLib.checkpoint import read_card

    card = read_card(model_path)
    return {card.label_values.get(name, channel): name
            for channel, name in card.written_labels().items()}


def read_output(path, names) -> tuple:
    """A segmentation job's output: ``(label map, {value: name}, {value: rgb}, {name:
    TerminologyEntry})``; a plain label map (no names of its own) is named from ``names``."""
    from TransferSegLib import segmentations, volumes

    segmentation = segmentations.read_segmentation(path)
    label, table = segmentation.to_label_map()
    if volumes.image_format(path) != "Slicer segmentation":
        table = {value: names.get(value, name) for value, name in table.items()}
    return (label, {**names, **table}, {s.value: s.color for s in segmentation.segments},
            segmentation.terminology())


def new_segmentation(scene, label, table, colours, volume, name, terminology=None):
    """A NEW segmentation node (never one of the user's), shown in 2D and 3D."""
    from TransferSegLib import mrml

    node = mrml.labelmap_to_segmentation(label, table, scene, scene.GenerateUniqueName(name),
                                         colours=colours, reference_volume=volume,
                                         terminology=terminology)
    node.CreateDefaultDisplayNodes()
    node.CreateClosedSurfaceRepresentation()
    return node


def score(label, table, reference, volume) -> list:
    """``metrics.evaluate`` of label map ``label`` (named by ``table``) against segmentation
    node ``reference`` on ``volume``'s grid. Segments are matched by name, and only those
    both have are scored: a reference often holds more structures than a model makes."""
    from TransferSegLib import metrics, mrml

    truth, names, _ = mrml.segmentation_to_labelmap(reference, volume, strict=False)
    shared = matching.shared_labels(table, names)
    if not shared:
        raise ValueError(f"The prediction ({', '.join(table.values())}) and "
                         f"{reference.GetName()} ({', '.join(names.values())}) have no segment "
                         "name in common; rename segments so that they match.")
    prediction = _relabelled(label, matching.match_by_name(table, shared), truth)
    truth = _relabelled(truth, {value: value if value in shared else 0 for value in names})
    return metrics.evaluate(prediction, truth, shared, prediction_name="the prediction",
                            reference_name=reference.GetName())


def score_nodes(prediction, reference, volume) -> list:
    """Scores of segmentation node ``prediction`` against ``reference`` (matched by name)."""
    from TransferSegLib import mrml

    label, table, _ = mrml.segmentation_to_labelmap(prediction, volume, strict=False)
    return score(label, table, reference, volume)


def mean_dice(scores) -> float:
    from TransferSegLib import metrics

    return float(metrics.mean_scores(scores)["dice"])


def write_scores(node, scores) -> str:
    """The scores and their mean into table node ``node``; returns a one-line summary."""
    from dataclasses import asdict

    from TransferSegLib import metrics

    mean = metrics.mean_scores(scores)
    header, rows = annotation.score_rows([asdict(s) for s in scores], mean)
    write_table(node, header, rows, text_columns=(0,))
    return f"Mean Dice {mean['dice']:.3f} over the {mean['labels']} segment(s) both have."


def sphere_case(scene, seed: int, name: str, size: int = 48) -> tuple:
    """A synthetic CT-like case for tests and demonstrations: a bright sphere ("tumour") in
    noise, 2 mm voxels. Returns (volume node, segmentation node) added to ``scene``."""
    import numpy as np
    import SimpleITK as sitk

    from TransferSegLib import mrml

    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:size, :size, :size]
    centre, radius = rng.uniform(0.375 * size, 0.625 * size, 3), rng.uniform(6, 10)
    mask = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius ** 2
    image = sitk.GetImageFromArray(
        (rng.normal(0, 30, mask.shape) + np.where(mask, 250, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.CopyInformation(image)
    volume = mrml.image_to_volume(image, scene, name)
    return volume, mrml.labelmap_to_segmentation(label, {1: "tumour"}, scene,
                                                 f"{name} reference", reference_volume=volume)
