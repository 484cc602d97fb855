"""Data efficiency: does a base model help when there is one annotated volume?

For each target, ``transferseg study`` trains ``scratch``, ``finetune`` and ``vanilla`` from
the same CT base model (the demo's: pretrained on the 3 mm sample CT with liver, spleen and
stomach unannotated) at the same step budget on N = 1 training volume, and scores each final
model on a held-out volume. Targets, all from the pinned samples:

- ``ct_organs``: liver, spleen, stomach; train on the CT the base saw (now with these labels),
  test on the DICOM CT of another patient;
- ``lung_tumour``: CT -> lung tumour, two folds (train lung1 test lung2, and the reverse);
- ``brain_tumour``: CT -> MR brain tumour (cross-modality), two folds;
- ``brain_tumour_hdbet``: the same two folds from a *published* brain-MRI base, HD-BET v1
  (brain extraction), fine-tuned at 48^3 patches; scratch is the same 16 M-parameter network
  from random weights. On a CPU its steps are ~10x the CT base's, hence ``--published-steps``.

N = 2 needs three volumes of one target and the samples hold at most two, so N = 1 only.
Writes ``bench/results/transfer.json`` and ``bench/results/transfer.png``.

    python bench/transfer.py [--steps 400] [--base-steps 500] [--published-steps 80]
                             [--only TARGET ...] [--quick]

``--only`` runs some targets and merges them into the existing results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from TransferSegLib import __version__, demo, study, zoo  # noqa: E402
from TransferSegLib.training import TrainConfig  # noqa: E402

STRATEGIES = ("scratch", "finetune", "vanilla")


def targets(work: Path) -> dict[str, list[tuple[Path, Path]]]:
    """Target name -> folds of (training dataset, held-out dataset)."""
    organs = demo.TARGET
    folds = {
        "ct_organs": [(demo.sample_dataset("totalseg_ct", work / "organs_train", keep=organs),
                       demo.sample_dataset("totalseg_dicom", work / "organs_test", keep=organs))],
        "lung_tumour": [], "brain_tumour": [],
    }
    # (base model, patch) per target where it is not the demo's CT base
    folds["brain_tumour_hdbet"] = []
    for target, cases in (("lung_tumour", ("pyradiomics_lung1", "pyradiomics_lung2")),
                          ("brain_tumour", ("pyradiomics_brain1", "pyradiomics_brain2"))):
        for train, test in (cases, cases[::-1]):
            folds[target].append((demo.sample_dataset(train, work / f"{train}_only"),
                                  demo.sample_dataset(test, work / f"{test}_only")))
    folds["brain_tumour_hdbet"] = folds["brain_tumour"]
    return folds


PUBLISHED = {"brain_tumour_hdbet": ("hd-bet-v1-fold0", [48, 48, 48])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--base-steps", type=int, default=500)
    parser.add_argument("--published-steps", type=int, default=80,
                        help="steps of the runs from a published base (slower networks)")
    parser.add_argument("--only", nargs="*", help="run these targets only, merge the results")
    parser.add_argument("--quick", action="store_true", help="20 steps: a smoke run")
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.base_steps, args.published_steps = 20, 20, 10
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="transferseg-bench-"))
    base = demo.base_model(args.base_steps)
    config = TrainConfig(steps=args.steps, batch_size=2, val_every=max(args.steps // 8, 1),
                         checkpoint_every=args.steps, lr=3e-3)
    out = HERE / "results" / ("transfer-quick.json" if args.quick else "transfer.json")
    previous = json.loads(out.read_text(encoding="utf-8")) if args.only and out.exists() else {}
    results, started = dict(previous.get("targets", {})), time.time()
    settings = dict(previous.get("settings", {}))
    for name, folds in targets(work / "data").items():
        if args.only and name not in args.only:
            continue
        target_base, patch, target_config = base, None, config
        if name in PUBLISHED:
            target_base, patch = zoo.fetch(PUBLISHED[name][0]), PUBLISHED[name][1]
            target_config = TrainConfig(
                steps=args.published_steps, batch_size=2, lr=1e-3, checkpoint_every=10**6,
                val_every=max(args.published_steps // 5, 1))
        rows = []
        for index, (train, test) in enumerate(folds):
            print(f"== {name}, fold {index}", flush=True)
            rows += study.run_study(train, test, work / name / f"fold{index}", target_base,
                                    STRATEGIES, (1,), (0,), target_config, patch_size=patch)
        results[name] = summarise(rows)
        settings[name] = {"base": PUBLISHED[name][0] if name in PUBLISHED else
                          f"demo CT base ({args.base_steps} steps)",
                          "steps": target_config.steps, "lr": target_config.lr,
                          "patch": patch or "the base's"}
    report = {
        "benchmark": "data efficiency: scratch vs finetune vs vanilla from one CT base model",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": {"cpu_cores": os.cpu_count(), "device": "cuda" if _cuda() else "cpu",
                     "platform": platform.platform()},
        "transferseg": __version__, "steps": args.steps, "base_steps": args.base_steps,
        "n_train": 1, "settings": settings, "targets": results,
        "seconds": round(time.time() - started, 1) + previous.get("seconds", 0),
    }
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    plot(results, out.with_suffix(".png"))
    print(json.dumps({k: v["mean"] for k, v in results.items()}, indent=1))
    print(f"wrote {out}")
    return 0


def summarise(rows: list[dict]) -> dict:
    """Per strategy: mean test Dice, gain over scratch, steps-to-Dice ratio; and per case."""
    mean = {}
    for strategy in STRATEGIES:
        runs = [r for r in rows if r["strategy"] == strategy]
        ratios = [r["steps_ratio"] for r in runs if r["steps_ratio"]]
        mean[strategy] = {
            "test_dice": round(float(np.mean([r["test_dice"] for r in runs])), 4),
            "steps_ratio": round(float(np.mean(ratios)), 3) if ratios else None,
            "reached": f"{len(ratios)}/{len(runs)}",
        }
    for strategy in STRATEGIES:
        mean[strategy]["gain_over_scratch"] = round(
            mean[strategy]["test_dice"] - mean["scratch"]["test_dice"], 4)
    cases = [{k: r[k] for k in ("strategy", "cases", "test_dice", "labels", "steps_ratio")}
             for r in rows]
    return {"mean": mean, "runs": cases}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    width = 0.25
    figure, axis = plt.subplots(figsize=(7, 4))
    for i, strategy in enumerate(STRATEGIES):
        values = [results[n]["mean"][strategy]["test_dice"] for n in names]
        bars = axis.bar(np.arange(len(names)) + (i - 1) * width, values, width, label=strategy)
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    axis.set_xticks(np.arange(len(names)), names)
    axis.set(ylabel="held-out Dice (N = 1)", title="One training volume: transfer vs scratch")
    axis.legend()
    figure.tight_layout()
    tmp = path.with_suffix(".partial.png")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
