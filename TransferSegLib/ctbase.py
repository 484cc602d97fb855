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

``HIDDEN`` structures (liver, spleen, stomach; the left and right autochthon, the deep back
muscles) are not taught at all: their voxels carry the dataset's ``ignore`` label (no loss),
and they are not among the base's labels. They are the new targets of the demo and of
``bench/transfer.py``, learnt by fine-tuning from one annotated scan (recipe v6, measured and
not shipped, hides only the autochthon: ``Recipe.hidden``). Scans kept out of the base
entirely, for testing: the DICOM CT (``totalseg_dicom``) and the pyradiomics lung CTs.

``python -m TransferSegLib.ctbase --out FOLDER`` (``make base``) trains it; the finished model
is written only when the run completed every step (a cancelled or failed run never becomes a
base). ``--resume`` continues an interrupted run; ``--version`` picks another recipe version
(``VARIANTS``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from TransferSegLib import samples, volumes
from TransferSegLib.datasets import IGNORE_NAME
from TransferSegLib.files import atomic_output

VERSION = "v5"  # the shipped recipe (make base); VARIANTS holds the others
HIDDEN = ("liver", "spleen", "stomach", "autochthon_left", "autochthon_right")
# sample -> labels dropped (their voxels become background: they are not any drawn structure)
SOURCES = {
    "totalseg_ct_full": (),
    "totalseg_thorax": (),
    "slicerio_chest": ("tissue",),
}


@dataclass(frozen=True)
class Recipe:
    """What a recipe version changes: ``partial``, per sample, the labels that draw only a part
    of their group where more of it is in view (ignored there: no loss, and the group counts as
    not drawn in that case); ``steps``; ``threads``, the CPU threads of the run that made the
    shipped file (the order a convolution sums in depends on them, so another count gives
    other weights; None: the cores other programs leave idle); ``hidden``, the structures
    it is never taught (new targets for fine-tuning); ``intensity_field``, whether its
    augmentation includes the smooth intensity field, and ``prior_bias``, whether its label
    channels start at their share of the training voxels (both off in the recipes trained
    before the trainer had them, so they make again the files they made)."""

    partial: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    steps: int = 3000
    threads: int | None = None
    hidden: tuple[str, ...] = HIDDEN
    intensity_field: bool = False
    prior_bias: bool = False


# Merged instead of ignored (v3), the rest of a group in view is taught as background: the
# thoracic crop draws T12 alone, with 20 cm of unlabelled thoracic spine above it. v4 ignores
# it; measured, its base transferred worse than v3's (bench/README.md, "The T12 fix"). v5 is v3
# trained twice as long: at 3,000 steps the bases were still learning (Dice 0.14-0.18 on their
# own scans) and their transfer hung on the seed; at 6,000 (0.42-0.50) it beat scratch from two
# seeds (bench/README.md, "Longer base training"), so v5 is shipped.
VARIANTS = {
    "v3": Recipe(),
    "v4": Recipe(partial={"totalseg_thorax": ("vertebrae_T12",)}),
    "v5": Recipe(steps=6000, threads=1),
    # v6 is v5 also teaching liver, spleen and stomach, hiding only the back muscles: tuned from
    # v5, muscle models were called in the held-out CT's liver and spleen, which v5 never
    # learnt. Measured, v6 came out a weaker base (Dice 0.26 on its own scans, v5 0.50) and the
    # default fine-tuned from it lost to scratch on the muscles (bench/README.md, "A base that
    # knows the organs"); not shipped.
    "v6": Recipe(steps=6000, threads=1, hidden=("autochthon_left", "autochthon_right")),
}


def model_id(version: str = VERSION) -> str:
    return f"transferseg-ct-base-{version}"


MODEL_ID = model_id()
# One name for what the cases draw in parts or under another name (a vertebra each, or the
# spine in three sections; a rib each, or all ribs; a lobe each, or the whole lung): one
# channel learns from every case that draws any part of it, and a new patient's anatomy is
# scored whatever its parts are called.
GROUPS = {
    "vertebrae": ("vertebrae_*", "sacrum", "* vertebral column"),
    "ribs": ("rib_*", "ribs"),
    "lung_left": ("lung_*_left", "left lung"),
    "lung_right": ("lung_*_right", "right lung"),
}
HELD_OUT = ("totalseg_dicom", "pyradiomics_lung1", "pyradiomics_lung2")
ARCHITECTURE = "dynunet"
ARGUMENTS = {"levels": 5, "filters": [8, 16, 32, 64, 128]}
SPACING = [4.0, 4.0, 4.0]
PATCH = [48, 48, 48]
STEPS = VARIANTS[VERSION].steps
LR = 3e-3


def grouped(name: str, groups: Mapping[str, Sequence[str]]) -> str:
    """The name ``name`` is learnt under: the first group with a pattern it matches, else its
    own (patterns as :func:`fnmatch.fnmatchcase`)."""
    return next((group for group, patterns in groups.items()
                 if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)), name)


def case_dataset(name: str, folder: Path, keep: Sequence[str] | None = None,
                 drop: Sequence[str] = (), hide: Sequence[str] = (),
                 groups: Mapping[str, Sequence[str]] | None = None) -> Path:
    """A one-case CSV dataset from sample ``name`` in ``folder``; returns the CSV path.

    ``keep`` (None: all) are the labels to learn; ``drop`` labels become background;
    ``hide`` labels become the ``ignore`` label: their voxels are left out of the loss, and
    the case's ``annotated`` column names only what is learnt. ``groups`` (see
    :func:`grouped`) merges labels into one under the group's name. The sample is never
    modified.
    """
    case = samples.require_sample(name)
    folder.mkdir(parents=True, exist_ok=True)
    label = volumes.read_label(case.label)
    array = sitk.GetArrayFromImage(label).astype(np.int32)
    learnt = {v: n for v, n in case.labels.items()
              if (keep is None or n in keep) and n not in drop and n not in hide}
    hidden = [v for v, n in case.labels.items() if n in hide]
    ignore_value = max(case.labels, default=0) + 1
    value_of: dict[str, int] = {}  # a group takes the value of its first member
    for value, structure in list(learnt.items()):
        learnt[value] = grouped(structure, groups or {})
        value_of.setdefault(learnt[value], value)
    out = np.zeros(array.shape, np.uint16)
    for value, structure in learnt.items():
        out[array == value] = value_of[structure]
    if hidden:
        out[np.isin(array, hidden)] = ignore_value
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(label)
    volumes.write_image(image, folder / "label.nii.gz", overwrite=True)
    table = {str(v): n for n, v in value_of.items()}
    if hidden:
        table[str(ignore_value)] = IGNORE_NAME
    (folder / "labels.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    annotated = ";".join(value_of)
    (folder / "cases.csv").write_text(
        "image,label,name,annotated,modality\n"
        f"{case.image},label.nii.gz,{name},{annotated},{case.modality}\n", encoding="utf-8")
    return folder / "cases.csv"


def datasets(folder: Path, version: str = VERSION) -> list[Path]:
    """The base's training datasets (one CSV per case, each with its own label table)."""
    recipe = VARIANTS[version]
    return [case_dataset(name, folder / name, drop=drop,
                         hide=(*recipe.hidden, *recipe.partial.get(name, ())),
                         groups=GROUPS)
            for name, drop in SOURCES.items()]


def data_licences() -> list[str]:
    """The licences of the base's training data (its sample packages)."""
    return sorted({samples.PACKAGES[samples.SPEC_BY_NAME[n].package].licence for n in SOURCES})


def description(steps: int | None = None, version: str = VERSION, seed: int = 0,
                threads: int | None = None) -> str:
    """The model card's description: data, licences, what was hidden, the recipe (``steps``
    and ``threads`` default to the version's)."""
    licences = data_licences()
    recipe = VARIANTS[version]
    steps = recipe.steps if steps is None else steps
    threads = recipe.threads if threads is None else threads
    return (
        "CT base model made by TransferSeg from the labelled CTs of pinned registry packages, "
        f"trained with partial labels: {', '.join(SOURCES)} (3 patients; each case annotates "
        f"only its own structures). Not taught, so that they can be learnt by fine-tuning: "
        f"{', '.join(recipe.hidden)} (ignored voxels). Never seen: {', '.join(HELD_OUT)}. "
        + "".join(f"Ignored in {name}, which draws only part of its group: {', '.join(labels)}. "
                  for name, labels in recipe.partial.items())
        + "Merged "
        f"into one label each: {', '.join(GROUPS)}. Data "
        f"licences: {'; '.join(licences)}. Recipe: {ARCHITECTURE} {json.dumps(ARGUMENTS)}, "
        f"{SPACING[0]:g} mm isotropic, {PATCH[0]}^3 patches, batch 2, AdamW lr {LR:g} with "
        f"polynomial decay, {steps} steps, Dice + cross-entropy (partial labels excluded), CT "
        "window -1000..1000 HU, random rotation (15 degrees) and scaling (15%)"
        + (f", {threads} CPU thread{'s' if threads > 1 else ''}" if threads else "")
        + f". Reproduce with {command(steps, version, seed, threads)}."
    )


def command(steps: int | None = None, version: str = VERSION, seed: int = 0,
            threads: int | None = None) -> str:
    """The command that makes this base again (in backquotes): ``make base`` for the shipped
    recipe, else the module's command line with what differs from the version's own."""
    recipe = VARIANTS[version]
    steps = recipe.steps if steps is None else steps
    threads = recipe.threads if threads is None else threads
    if (steps, version, seed, threads) == (STEPS, VERSION, 0, VARIANTS[VERSION].threads):
        return "`make base`"
    return ("`python -m TransferSegLib.ctbase --out DIR"
            + ("" if steps == recipe.steps else f" --steps {steps}")
            + ("" if version == VERSION else f" --version {version}")
            + ("" if seed == 0 else f" --seed {seed}")
            + ("" if threads == recipe.threads else f" --threads {threads}") + "`")


def train_base(out: Path, steps: int | None = None, resume: bool = False,
               log: Callable[[str], None] = print, events=None,
               cancel_file: Path | None = None, threads: int | None = None,
               version: str = VERSION, seed: int = 0) -> Path:
    """Train the base (recipe ``version``; ``seed`` of the network's start and the patches;
    ``steps`` and ``threads`` default to the recipe's) into ``out`` and return
    ``out/<model_id(version)>.safetensors``.

    The model file appears only when the run completed all ``steps``; otherwise a
    :class:`~TransferSegLib.errors.TransferSegError` says how to continue.
    """
    from TransferSegLib import recipes, training
    from TransferSegLib.checkpoint import load_model, save_model
    from TransferSegLib.errors import TransferSegError

    out = Path(out)
    steps = VARIANTS[version].steps if steps is None else steps
    threads = VARIANTS[version].threads if threads is None else threads
    data = datasets(out / "data", version)
    config = training.TrainConfig(steps=steps, batch_size=2, lr=LR, val_every=max(steps // 10, 1),
                                  checkpoint_every=max(steps // 20, 1), threads=threads,
                                  spatial=True, seed=seed,
                                  intensity_field=VARIANTS[version].intensity_field,
                                  prior_bias=VARIANTS[version].prior_bias)
    result = recipes.pretrain(
        data, out / "run", config, architecture=ARCHITECTURE, arguments=ARGUMENTS,
        spacing=SPACING, patch_size=PATCH, modality="CT", hold_out=False,
        title=f"TransferSeg CT base {version}",
        description=description(steps, version, seed, threads),
        resume=resume, overwrite=not resume, events=events or (lambda event: None),
        cancel_file=cancel_file,
    )
    final = out / f"{model_id(version)}.safetensors"
    if not completed(result, steps):
        raise TransferSegError(
            f"The base-model training stopped at step {result.steps} of {steps} "
            f"({result.status}); nothing was written as a base. Continue it with --resume.")
    model, card = load_model(out / "run" / "last.safetensors")
    save_model(final, model, portable(card, out), overwrite=True)
    log(f"base model: {final}")
    return final


def portable(card, out: Path):
    """``card`` with the data paths of its pretraining made relative to the work folder
    ``out`` (a shipped file names no folder of the machine that made it)."""
    def relative(path: str) -> str:
        try:
            return Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
        except ValueError:
            return Path(path).name
    card.lineage = [dict(item, data=[relative(p) for p in item["data"]]) if "data" in item
                    else item for item in card.lineage]
    return card


def completed(result, steps: int) -> bool:
    """Whether a training result is a finished run of ``steps`` steps (not cancelled, killed
    or stopped early): the only kind that may become a base model."""
    return result.status == "done" and result.steps == steps


def held_out_dice(model: Path, sample: str = "totalseg_dicom") -> dict[str, float]:
    """Dice per structure of the base on a CT it never saw (``HELD_OUT``), for every structure
    that CT draws and the base learnt (its labels merged by ``GROUPS`` as the base's were)."""
    from TransferSegLib import datasets as datasets_module
    from TransferSegLib import study
    from TransferSegLib.checkpoint import read_card

    image = Path(samples.require_sample(sample).image)
    known = set(read_card(model).labels.values())
    with tempfile.TemporaryDirectory() as tmp:
        case_dataset(sample, Path(tmp), groups=GROUPS)
        labels = json.loads((Path(tmp) / "labels.json").read_text(encoding="utf-8"))
        table = datasets_module.LabelTable(
            {0: "background", **{int(v): n for v, n in labels.items()}})
        names = [n for n in labels.values() if n in known]
        cases = [datasets_module.Case(name=sample, images=(image,),
                                      label=Path(tmp) / "label.nii.gz")]
        return study.test_dice(model, cases, table, names, "cpu")


def report(out: Path, results: Path, plot: Path | None = None,
           version: str = VERSION, seed: int = 0) -> dict:
    """The training curve and per-label validation Dice of the run in ``out`` (its
    ``progress.jsonl``), and the finished base's Dice on the held-out CT, as JSON (and a plot)."""
    events = [json.loads(line) for line in
              (Path(out) / "run" / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    validations = [e for e in events if e["event"] == "validation"]
    done = next(e for e in reversed(events) if e["event"] == "done")
    final = Path(out) / f"{model_id(version)}.safetensors"
    held_out = held_out_dice(final)
    data = {
        "benchmark": f"CT base {version} (TransferSegLib/ctbase.py): training curve, per-label "
                     "Dice on its training scans, and Dice on a CT it never saw",
        "recipe": {"version": version, "seed": seed, "architecture": ARCHITECTURE,
                   "arguments": ARGUMENTS, "spacing": SPACING,
                   "patch": PATCH, "steps": done["step"], "lr": LR, "sources": list(SOURCES),
                   "hidden": list(VARIANTS[version].hidden), "held_out": list(HELD_OUT),
                   "partial": {name: list(labels)
                               for name, labels in VARIANTS[version].partial.items()},
                   "groups": {group: list(patterns) for group, patterns in GROUPS.items()},
                   "augmentation": "intensity; " + ("smooth random intensity fields; " if
                                                     VARIANTS[version].intensity_field else "")
                   + "rotation up to 15 degrees, scaling 0.85-1.15",
                   **({"prior_bias": True} if VARIANTS[version].prior_bias else {})},
        # a resumed run logs one end event per part: its time is their sum
        "minutes": round(sum(e.get("seconds", 0) for e in events
                             if e["event"] in ("done", "cancelled")) / 60, 1),
        "hardware": {"cpu_cores": os.cpu_count(), "threads": next(
            (e.get("threads") for e in events if e["event"] == "start"), None)},
        "loss": [[e["step"], round(e["loss"], 4)] for e in steps],
        "validation": [[e["step"], round(e["dice"], 4)] for e in validations],
        "final_labels": validations[-1]["labels"] if validations else {},
        "held_out": {"scan": HELD_OUT[0], "labels": {k: round(v, 4) for k, v in
                                                     held_out.items()},
                     "mean": round(float(np.mean(list(held_out.values()))), 4)
                     if held_out else None},
        "note": "validation is on the training scans (each of the 3 cases is the only one of its "
                "kind); ignored voxels (the hidden structures) are not scored. held_out: the "
                f"finished base on {HELD_OUT[0]}, a patient no part of it saw.",
    }
    with atomic_output(results, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(*zip(*data["loss"], strict=True), lw=0.8)
        left.set(xlabel="step", ylabel="training loss", title=f"{model_id(version)}: loss")
        if data["validation"]:
            right.plot(*zip(*data["validation"], strict=True), marker="o")
        right.set(xlabel="step", ylabel="mean validation Dice",
                  title="Dice over its labels (training scans)")
        figure.tight_layout()
        with atomic_output(plot, overwrite=True) as tmp:
            figure.savefig(tmp, dpi=110, format="png")
        plt.close(figure)
    return data


def catalog_entry(model: Path, path_in_resources: str, version: str = VERSION) -> dict:
    """The catalog entry (``Resources/models.json``) of the finished base at ``model``."""
    from TransferSegLib import networks
    from TransferSegLib.checkpoint import read_card

    card = read_card(model)
    licences = data_licences()
    return {
        "id": model_id(version),
        "title": f"TransferSeg CT base {version} (partial labels, {len(card.labels) - 1} "
                 "structures)",
        "modality": "CT",
        "anatomy": "abdomen, pelvis, thorax, spine (organs, vessels, bones, muscles)",
        "task": "base model for fine-tuning to new CT structures",
        "source_task": f"{len(card.labels) - 1}-structure CT segmentation trained with partial "
                       "labels on three patients' CTs",
        "labels": {str(k): v for k, v in sorted(card.labels.items())},
        "background_index": 0,
        "architecture": card.architecture,
        "arguments": card.arguments,
        "in_channels": card.in_channels,
        "spacing": card.spacing,
        "orientation": card.orientation,
        "normalisation": card.normalisation,
        "patch_size": card.patch_size,
        "divisor": networks.patch_divisor(card.architecture, card.arguments),
        "importer": "transferseg",
        "files": [{"name": Path(path_in_resources).name, "sha256": samples.sha256_of(model),
                   "size": model.stat().st_size, "bundled": path_in_resources}],
        "homepage": "https://github.com/transferseg/SlicerTransferSeg",
        "licence": f"Apache-2.0 (weights); training data: {'; '.join(licences)}",
        "citation": "Made by TransferSeg (TransferSegLib/ctbase.py) after the recipe of "
                    "Humpire-Mamani et al., Transfer learning from a sparsely annotated dataset "
                    "of 3D medical images, arXiv:2311.05032, 2023.",
        "notes": card.description + f" Model card: Resources/Models/{model_id(version)}.md.",
        "unverified": [],
    }


def card_markdown(data: dict, entry: dict) -> str:
    """The human-readable model card of the shipped base, from :func:`report`'s ``data`` and
    its catalog ``entry``."""
    recipe, file = data["recipe"], entry["files"][0]
    version = recipe.get("version", VERSION)
    # what the run's report recorded, not what the recipe says today
    field = (", smooth random intensity fields"
             if "intensity fields" in recipe.get("augmentation", "") else "")
    threads = data["hardware"].get("threads")
    trained = data["final_labels"]
    learnt = sorted(((v, k) for k, v in trained.items() if v >= 0.5), reverse=True)
    held = data["held_out"]["labels"]
    lines = [
        f"# {entry['title']}", "",
        f"`{model_id(version)}`: a CT segmentation network made by TransferSeg to be fine-tuned "
        "to new structures from a few annotated scans. It ships with TransferSeg "
        f"(`Resources/{file['bundled']}`, {file['size']:,} bytes, sha256 `{file['sha256']}`).",
        "", "## Training data", "",
        "Every labelled CT of the pinned sample packages except those kept for testing; each "
        "case annotates only its own structures (partial labels: a structure a case does not "
        "draw is left out of that case's loss, never taught as background).", "",
    ]
    for name in SOURCES:
        spec = samples.SPEC_BY_NAME[name]
        package = samples.PACKAGES[spec.package]
        lines.append(f"- `{name}`: from `{package.requirement}`, licence {package.licence}.")
    lines += [
        "", f"Never taught (ignored voxels, not among its labels; new targets for fine-tuning): "
        f"{', '.join(recipe['hidden'])}.", f"Never seen (held out for testing): "
        f"{', '.join(recipe['held_out'])}.", *(
            f"Ignored in `{name}`, which draws only part of its group (the rest of the group in "
            f"view is then not taught as background): {', '.join(labels)}."
            for name, labels in recipe.get("partial", {}).items()),
        "Merged into one label each (a structure drawn in "
        "parts, or under another name, by another case): "
        + "; ".join(f"{group} ({', '.join(patterns)})" for group, patterns in GROUPS.items())
        + ".", "", "## Recipe", "",
        f"- network: {recipe['architecture']} {json.dumps(recipe['arguments'])}, "
        f"{entry['in_channels']} input channel, {len(entry['labels'])} outputs "
        "(background and its structures)",
        f"- spacing {' x '.join(f'{v:g}' for v in recipe['spacing'])} mm, orientation "
        f"{entry['orientation']}, patch {' x '.join(str(v) for v in recipe['patch'])} voxels",
        f"- intensities: CT window {entry['normalisation'].get('window')} HU mapped to [0, 1]",
        f"- {recipe['steps']} steps of batch 2, AdamW lr {recipe['lr']:g} with polynomial decay, "
        "Dice + cross-entropy over the annotated structures of each case, intensity "
        f"augmentation{field}, random rotation (up to 15 degrees) and scaling (0.85-1.15); "
        f"{data['minutes']} minutes on {data['hardware']['cpu_cores']} CPU cores"
        + (f" with {threads} torch thread{'s' if threads > 1 else ''}" if threads else ""),
        f"- reproduce: {command(recipe['steps'], version, recipe.get('seed', 0), threads)} "
        "(`--ship` then puts the result here)", "",
        "## How good it is", "",
        f"Mean validation Dice over its labels on its own training scans: "
        f"{data['validation'][-1][1] if data['validation'] else 'n/a'} "
        f"(curve: `bench/results/ctbase-{version}.json`, `ctbase-{version}.png`). "
        f"Structures at 0.5 or more: {len(learnt)} of {len(trained)}"
        + "".join(f"{', ' if i else ': '}{k} {v:.2f}" for i, (v, k) in enumerate(learnt))
        + ".", "",
        f"On `{data['held_out']['scan']}`, a patient it never saw (structures that scan draws "
        f"and the base knows): mean {data['held_out']['mean']}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(held.items(), key=lambda kv: -kv[1]))
        + ".", "",
        "## Limits", "",
        "Three patients: it knows the large structures of those patients and little else; on "
        f"the held-out CT (another patient, contrast-enhanced, a 4 cm slab) its mean Dice is "
        f"{data['held_out']['mean']}. It is a starting point for fine-tuning, not a "
        "segmentation model to use as it is, and whether fine-tuning from it beats training "
        "from scratch is measured, target by target, in `bench/README.md` and "
        "`bench/results/transfer.json`. Intended for research; not a medical device.", "",
    ]
    return "\n".join(lines)


def ship(model: Path, resources: Path, data: dict) -> dict:
    """Put the finished base into ``resources``: ``Models/<id>.safetensors``, its markdown card
    (from :func:`report`'s ``data``) and its catalog entry (replacing one of the same id);
    returns the entry."""
    folder = Path(resources) / "Models"
    folder.mkdir(parents=True, exist_ok=True)
    version = data["recipe"].get("version", VERSION)
    target = folder / f"{model_id(version)}.safetensors"
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(Path(model).read_bytes())
    entry = catalog_entry(target, f"Models/{target.name}", version)
    with atomic_output(folder / f"{model_id(version)}.md", overwrite=True) as tmp:
        tmp.write_text(card_markdown(data, entry), encoding="utf-8")
    catalog_path = Path(resources) / "models.json"
    catalog = json.loads(catalog_path.read_text(encoding="utf-8"))
    catalog["models"] = [m for m in catalog["models"] if m["id"] != entry["id"]] + [entry]
    with atomic_output(catalog_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(catalog, indent=2, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work folder")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the version's; v5 6000)")
    parser.add_argument("--version", choices=sorted(VARIANTS), default=VERSION,
                        help=f"recipe version (default {VERSION}, the shipped one)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the network's start and of the patches (default 0, the "
                             "shipped base's)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the version's, v5 1, which reproduces "
                             "the shipped file; else the cores other programs leave idle)")
    parser.add_argument("--report", action="store_true",
                        help="then write its report (--results); a finished run is not retrained")
    parser.add_argument("--ship", action="store_true",
                        help="--report, and put the base into the catalog (Resources/Models/, "
                             "models.json)")
    parser.add_argument("--results", default="bench/results",
                        help="folder of the report (ctbase-<version>[-<steps>steps]"
                             "[-seed<seed>].json, .png)")
    args = parser.parse_args(argv)
    from TransferSegLib.demo import ProgressBar

    def events(event: dict) -> None:
        if event["event"] == "validation":
            print(f"step {event['step']}: validation Dice {event['dice']:.4f}", flush=True)
        elif event["event"] == "step" and event["step"] % 100 == 1:
            print(f"step {event['step']}: loss {event['loss']:.4f}", flush=True)
        progress(event)

    progress = ProgressBar()
    final = Path(args.out) / f"{model_id(args.version)}.safetensors"
    if not ((args.report or args.ship) and final.is_file()):
        train_base(Path(args.out), args.steps, args.resume, events=events, threads=args.threads,
                   version=args.version, seed=args.seed)
    if args.report or args.ship:
        results = Path(args.results)
        longer = args.steps not in (None, VARIANTS[args.version].steps)
        stem = (f"ctbase-{args.version}" + (f"-{args.steps}steps" if longer else "")
                + (f"-seed{args.seed}" if args.seed else ""))
        data = report(Path(args.out), results / f"{stem}.json", results / f"{stem}.png",
                      version=args.version, seed=args.seed)
        print(f"held-out Dice {data['held_out']}")
    if args.ship:
        from TransferSegLib import zoo

        entry = ship(final, zoo.resources_dir(), data)
        print(f"shipped Resources/{entry['files'][0]['bundled']} (sha256 "
              f"{entry['files'][0]['sha256']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
