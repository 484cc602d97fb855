"""The TransferSeg CT base model: how it is made from the pinned sample CTs, as one recipe.

Made the way the sparse-annotation study made its base (Humpire-Mamani et al., arXiv
2311.05032): the union of every labelled CT the pinned packages carry, each case annotating
only its own structures, trained with the partial-label loss so that a structure one case does
not draw is never taught as background there.

Cases (``SOURCES``):

- ``totalseg_ct_full``: abdominal CT, 112 slices of 3 mm, ~61 structures (labels are
  TotalSegmentator's fast-model output shipped as its test reference);
- ``totalseg_thorax``: a thoracic CT of another patient (1.5 mm crop around the aorta): heart,
  aorta, pulmonary artery, aortic branches, a vertebra;
- ``slicerio_chest``: a chest CT of a third patient (3 x 3 x 10 mm): lungs, ribs and the
  cervical, thoracic and lumbar spine ("tissue", the body outline, is left out).

``HIDDEN`` structures (liver, spleen, stomach) are not taught at all: their voxels carry the
dataset's ``ignore`` label (no loss), and they are not among the base's labels. They are the
demo's new target, learnt by fine-tuning from one annotated scan. Scans kept out of the base
entirely, for testing: the DICOM CT (``totalseg_dicom``) and the pyradiomics lung CTs.

``python -m TransferSegLib.ctbase --out FOLDER`` (``make base``) trains it; the finished model
is written only when the run completed every step (a cancelled or failed run never becomes a
base). ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from TransferSegLib import samples, volumes
from TransferSegLib.datasets import IGNORE_NAME

VERSION = "v1"
MODEL_ID = f"transferseg-ct-base-{VERSION}"
HIDDEN = ("liver", "spleen", "stomach")
# sample -> labels dropped (their voxels become background: they are not any drawn structure)
SOURCES = {
    "totalseg_ct_full": (),
    "totalseg_thorax": (),
    "slicerio_chest": ("tissue",),
}
HELD_OUT = ("totalseg_dicom", "pyradiomics_lung1", "pyradiomics_lung2")
ARCHITECTURE = "dynunet"
ARGUMENTS = {"levels": 5, "filters": [8, 16, 32, 64, 128]}
SPACING = [4.0, 4.0, 4.0]
PATCH = [48, 48, 48]
STEPS = 2500
LR = 3e-3


def case_dataset(name: str, folder: Path, keep: Sequence[str] | None = None,
                 drop: Sequence[str] = (), hide: Sequence[str] = ()) -> Path:
    """A one-case CSV dataset from sample ``name`` in ``folder``; returns the CSV path.

    ``keep`` (None: all) are the labels to learn; ``drop`` labels become background;
    ``hide`` labels become the ``ignore`` label: their voxels are left out of the loss, and
    the case's ``annotated`` column names only what is learnt. The sample is never modified.
    """
    case = samples.require_sample(name)
    folder.mkdir(parents=True, exist_ok=True)
    label = volumes.read_label(case.label)
    array = sitk.GetArrayFromImage(label).astype(np.int32)
    learnt = {v: n for v, n in case.labels.items()
              if (keep is None or n in keep) and n not in drop and n not in hide}
    hidden = [v for v, n in case.labels.items() if n in hide]
    ignore_value = max(case.labels, default=0) + 1
    out = np.zeros(array.shape, np.uint16)
    for value in learnt:
        out[array == value] = value
    if hidden:
        out[np.isin(array, hidden)] = ignore_value
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(label)
    volumes.write_image(image, folder / "label.nii.gz", overwrite=True)
    table = {str(v): n for v, n in learnt.items()}
    if hidden:
        table[str(ignore_value)] = IGNORE_NAME
    (folder / "labels.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    annotated = ";".join(learnt.values())
    (folder / "cases.csv").write_text(
        "image,label,name,annotated,modality\n"
        f"{case.image},label.nii.gz,{name},{annotated},{case.modality}\n", encoding="utf-8")
    return folder / "cases.csv"


def datasets(folder: Path) -> list[Path]:
    """The base's training datasets (one CSV per case, each with its own label table)."""
    return [case_dataset(name, folder / name, drop=drop, hide=HIDDEN)
            for name, drop in SOURCES.items()]


def description(steps: int = STEPS) -> str:
    """The model card's description: data, licences, what was hidden, the recipe."""
    licences = sorted({samples.PACKAGES[samples.SPEC_BY_NAME[n].package].licence
                       for n in SOURCES})
    return (
        "CT base model made by TransferSeg from the labelled CTs of pinned registry packages, "
        f"trained with partial labels: {', '.join(SOURCES)} (3 patients; each case annotates "
        f"only its own structures). Not taught, so that they can be learnt by fine-tuning: "
        f"{', '.join(HIDDEN)} (ignored voxels). Never seen: {', '.join(HELD_OUT)}. Data "
        f"licences: {'; '.join(licences)}. Recipe: {ARCHITECTURE} {json.dumps(ARGUMENTS)}, "
        f"{SPACING[0]:g} mm isotropic, {PATCH[0]}^3 patches, batch 2, AdamW lr {LR:g} with "
        f"polynomial decay, {steps} steps, Dice + cross-entropy (partial labels excluded), CT "
        "window -1000..1000 HU. Reproduce with "
        + ("`make base`." if steps == STEPS else
           f"`python -m TransferSegLib.ctbase --out DIR --steps {steps}`.")
    )


def train_base(out: Path, steps: int = STEPS, resume: bool = False,
               log: Callable[[str], None] = print, events=None,
               cancel_file: Path | None = None, threads: int | None = None) -> Path:
    """Train the base into ``out`` and return ``out/<MODEL_ID>.safetensors``.

    The model file appears only when the run completed all ``steps``; otherwise a
    :class:`~TransferSegLib.errors.TransferSegError` says how to continue.
    """
    from TransferSegLib import recipes, training
    from TransferSegLib.checkpoint import load_model, save_model
    from TransferSegLib.errors import TransferSegError

    out = Path(out)
    data = datasets(out / "data")
    config = training.TrainConfig(steps=steps, batch_size=2, lr=LR, val_every=max(steps // 10, 1),
                                  checkpoint_every=max(steps // 20, 1), threads=threads)
    result = recipes.pretrain(
        data, out / "run", config, architecture=ARCHITECTURE, arguments=ARGUMENTS,
        spacing=SPACING, patch_size=PATCH, modality="CT", hold_out=False,
        title=f"TransferSeg CT base {VERSION}", description=description(steps),
        resume=resume, overwrite=not resume, events=events or (lambda event: None),
        cancel_file=cancel_file,
    )
    final = out / f"{MODEL_ID}.safetensors"
    if not completed(result, steps):
        raise TransferSegError(
            f"The base-model training stopped at step {result.steps} of {steps} "
            f"({result.status}); nothing was written as a base. Continue it with --resume.")
    model, card = load_model(out / "run" / "last.safetensors")
    save_model(final, model, card, overwrite=True)
    log(f"base model: {final}")
    return final


def completed(result, steps: int) -> bool:
    """Whether a training result is a finished run of ``steps`` steps (not cancelled, killed
    or stopped early): the only kind that may become a base model."""
    return result.status == "done" and result.steps == steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work folder")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the cores other programs leave idle)")
    args = parser.parse_args(argv)
    from TransferSegLib.demo import ProgressBar

    def events(event: dict) -> None:
        if event["event"] == "validation":
            print(f"step {event['step']}: validation Dice {event['dice']:.4f}", flush=True)
        elif event["event"] == "step" and event["step"] % 100 == 1:
            print(f"step {event['step']}: loss {event['loss']:.4f}", flush=True)
        progress(event)

    progress = ProgressBar()
    train_base(Path(args.out), args.steps, args.resume, events=events, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
