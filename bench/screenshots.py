"""The extension's screenshots (``Resources/Screenshots``), rendered offscreen with VTK.

1. A segmentation TransferSeg made, as coloured surfaces over an axial slice of its CT.
2. The learning curves of a controlled run (``transferseg study`` results): held-out Dice
   against the step for each strategy.

    .venv/bin/python bench/screenshots.py --image CT.nii.gz --segmentation seg.seg.nrrd \\
        --study bench/results/transfer-base-strength.json --out Resources/Screenshots
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TransferSegLib import segmentations, volumes  # noqa: E402

SIZE = (1200, 800)


def to_vtk(image: sitk.Image):
    """A vtkImageData with the voxels, spacing and origin of ``image`` (axis-aligned view)."""
    import vtk
    from vtk.util import numpy_support

    array = sitk.GetArrayFromImage(image)
    data = vtk.vtkImageData()
    data.SetDimensions(*reversed(array.shape))
    data.SetSpacing(*image.GetSpacing())
    data.SetOrigin(*image.GetOrigin())
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    return data


def render_segmentation(image_path: Path, segmentation_path: Path, out: Path,
                        title: str = "TransferSeg", window=(-160.0, 240.0)) -> Path:
    """Surfaces of every segment over the axial slice through their centre."""
    import vtk

    image = volumes.read_volume(image_path)
    segmentation = segmentations.read_segmentation(segmentation_path)
    label, table = segmentation.to_label_map()
    label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    colours = {s.value: s.color for s in segmentation.segments}
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.08, 0.09, 0.12)
    ct = to_vtk(sitk.Cast(image, sitk.sitkFloat32))
    mask = sitk.GetArrayViewFromImage(label)
    z = int(np.median(np.nonzero(mask)[0])) if mask.any() else mask.shape[0] // 2
    colour = vtk.vtkImageMapToWindowLevelColors()
    colour.SetInputData(ct)
    colour.SetWindow(window[1] - window[0])
    colour.SetLevel((window[1] + window[0]) / 2)
    colour.SetOutputFormatToLuminance()
    slice_actor = vtk.vtkImageActor()
    slice_actor.GetMapper().SetInputConnection(colour.GetOutputPort())
    slice_actor.SetDisplayExtent(0, mask.shape[2] - 1, 0, mask.shape[1] - 1, z, z)
    renderer.AddActor(slice_actor)
    labels = to_vtk(label)
    for value, name in table.items():
        if not (mask == value).any():
            continue
        surface = vtk.vtkDiscreteFlyingEdges3D()
        surface.SetInputData(labels)
        surface.SetValue(0, value)
        smooth = vtk.vtkWindowedSincPolyDataFilter()
        smooth.SetInputConnection(surface.GetOutputPort())
        smooth.SetNumberOfIterations(20)
        smooth.SetPassBand(0.05)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(smooth.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*colours.get(value, segmentations.default_color(value)))
        actor.GetProperty().SetOpacity(0.85)
        renderer.AddActor(actor)
        text = vtk.vtkTextActor()
        text.SetInput(name)
        text.GetTextProperty().SetColor(*colours.get(value, segmentations.default_color(value)))
        text.GetTextProperty().SetFontSize(26)
        text.SetDisplayPosition(20, SIZE[1] - 84 - 34 * renderer.GetActors2D().GetNumberOfItems())
        renderer.AddActor2D(text)
    title_actor = vtk.vtkTextActor()
    title_actor.SetInput(title)
    title_actor.GetTextProperty().SetFontSize(30)
    title_actor.SetDisplayPosition(20, SIZE[1] - 44)
    renderer.AddActor2D(title_actor)
    # Seen from the patient's feet and front (LPS world: y points to the back, z to the head),
    # as a radiologist reads an axial slice: anterior at the top, the patient's right on the
    # left, tilted to show the organs' depth.
    bounds = ct.GetBounds()
    centre = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1] + 300.0, centre[2] - 520.0)
    camera.SetViewUp(0.0, -0.87, -0.5)
    renderer.ResetCamera()
    camera.Zoom(1.35)
    return _write(renderer, out)


def _write(renderer, out: Path) -> Path:
    import vtk

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*SIZE)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(out))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return out


def plot_curves(study: Path, out: Path) -> Path:
    """Held-out Dice against the step for each strategy of the last run set of a controlled
    study (``bench/results/transfer-*.json``), seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(study.read_text(encoding="utf-8"))
    name, runs = list(results["runs"].items())[-1]
    figure, axis = plt.subplots(figsize=(SIZE[0] / 100, SIZE[1] / 100), dpi=100)
    for run in runs:
        if run.get("seed", 0) != 0 or not run.get("curve"):
            continue
        steps, dice = zip(*run["curve"], strict=True)
        label = f"{run['strategy']} (final model {run['test_dice']:.3f})"
        axis.plot(steps, dice, marker="o", label=label)
    axis.set_xlabel("training step")
    axis.set_ylabel("Dice on a CT no model has seen")
    axis.set_title("One annotated CT: fine-tuning a base vs training from scratch "
                   f"({name.replace('_', ' ')})")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--segmentation", type=Path, required=True)
    parser.add_argument("--study", type=Path)
    parser.add_argument("--title", default="TransferSeg")
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots")
    args = parser.parse_args(argv)
    print(render_segmentation(args.image, args.segmentation, args.out / "TransferSeg-1.png",
                              args.title))
    if args.study:
        print(plot_curves(args.study, args.out / "TransferSeg-2.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
