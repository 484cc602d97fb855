"""The papers' experiment as one command: strategies x training-set sizes x seeds.

For each size N and seed, N labelled cases are drawn from a training pool; each strategy trains
on exactly those cases with the same step budget; every run is then scored on a separate test
set with its final model (no model selection on the test set). Validation Dice on the test set
is recorded during training only to draw learning curves and to count, for each strategy, the
steps it needs to reach the Dice the scratch run ends with (the steps-to-Dice ratio, Med3D's
convergence claim: scratch's steps divided by the strategy's).

Outputs in the study folder: ``results.csv`` and ``results.json`` (one row per run),
``summary.md`` (means over seeds, gain over scratch, steps-to-Dice), ``dice_vs_n.png`` and
``learning_curves.png``, and each run's own training folder under ``runs/``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from TransferSegLib import datasets
from TransferSegLib.errors import InputError, OutputExistsError, TransferSegError
from TransferSegLib.files import atomic_output
from TransferSegLib.recipes import finetune
from TransferSegLib.training import TrainConfig


def _cases_csv(cases: Sequence[datasets.Case], table: datasets.LabelTable, folder: Path) -> Path:
    """A CSV dataset (with labels.json) listing ``cases``; used to train on a subset."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(table.to_json(), indent=1), encoding="utf-8")
    with open(folder / "cases.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "name", "annotated"])
        for case in cases:
            annotated = ";".join(sorted(case.annotated)) if case.annotated else ""
            writer.writerow([os.path.abspath(case.image), os.path.abspath(case.label),
                             case.name, annotated])
    return folder / "cases.csv"


def test_dice(model_path: Path, cases: Sequence[datasets.Case], table: datasets.LabelTable,
              names: Sequence[str], device: str) -> dict[str, float]:
    """Mean Dice per label name of a model file over test cases, on their own grids."""
    import SimpleITK as sitk

    from TransferSegLib import inference, metrics, volumes
    from TransferSegLib.checkpoint import load_model

    model, card = load_model(model_path)
    scores: dict[str, list[float]] = {name: [] for name in names}
    for case in cases:
        image = [volumes.read_volume(p) for p in case.images]
        truth = sitk.GetArrayFromImage(volumes.read_label(case.label))
        label = sitk.GetArrayFromImage(
            inference.segment(model, card, image, device=device).label)
        for name in names:
            value_ref, value_out = table.value(name), card.label_values[name]
            ref, out = truth == value_ref, label == value_out
            if ref.any():
                scores[name].append(metrics.dice(out, ref))
    return {name: float(np.mean(v)) for name, v in scores.items() if v}


def steps_to_dice(history: list[dict], target: float) -> int | None:
    """The first validation step whose Dice reaches ``target`` (None if never)."""
    for entry in history:
        if entry["dice"] >= target - 1e-9:
            return int(entry["step"])
    return None


def run_study(
    pool: Path,
    test: Path,
    out_dir: Path,
    base: Path | None,
    strategies: Sequence[str] = ("scratch", "finetune", "vanilla"),
    sizes: Sequence[int] = (1, 2),
    seeds: Sequence[int] = (0,),
    config: TrainConfig | None = None,
    *,
    labels: Sequence[str] | None = None,
    architecture: str = "unet",
    patch_size: Sequence[int] | None = None,
    learning_rates: Mapping[str, float] | None = None,
    log: Callable[[str], None] = print,
    events: Callable[[dict], None] = lambda event: None,
    overwrite: bool = True,
    cancel_file: Path | None = None,
) -> list[dict]:
    """Train every (strategy, size, seed) and score it on ``test``; write the study folder.

    ``patch_size`` (voxels, x y z) replaces the base model's patch for every run. A folder that
    already holds a study is replaced, or refused when ``overwrite`` is false (the command
    line's default, without ``--overwrite``).

    ``events`` receives every run's training events (for a progress bar). A run that is
    cancelled (a stop signal, or ``cancel_file`` appearing) ends the whole study with a
    :class:`TransferSegError`; the runs finished before it stay in ``out_dir/runs``.
    ``learning_rates`` (strategy -> rate) overrides ``config.lr`` for those strategies; a
    strategy with neither trains at its own default (:func:`TransferSegLib.transfer.defaults`).
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    if not overwrite and any((out_dir / name).exists() for name in ("results.json", "runs")):
        raise OutputExistsError(f"{out_dir} already holds a study; choose another --out folder "
                                "or pass --overwrite to replace it.")
    pool_set, test_set = datasets.discover(pool), datasets.discover(test)
    candidates = pool_set.labelled()
    if not test_set.labelled():
        raise InputError(f"Test dataset {test} has no labelled case to score against.")
    too_big = [n for n in sizes if n > len(candidates) or n < 1]
    if too_big:
        raise InputError(f"Training-set sizes {too_big} do not fit the pool {pool}, which has "
                         f"{len(candidates)} labelled case(s).")
    if "scratch" not in strategies:
        raise InputError("A study needs the scratch strategy as its control.")
    names = list(labels) if labels else [n for n in pool_set.labels.foreground.values()
                                         if n in test_set.labels.names.values()]
    if not names:
        raise InputError(f"The pool {pool} and the test set {test} share no label.")
    test_csv = _cases_csv(test_set.labelled(), test_set.labels, out_dir / "data" / "test")
    rows: list[dict] = []
    for size in sizes:
        for seed in seeds:
            chosen = [candidates[i] for i in
                      sorted(np.random.default_rng(seed).permutation(len(candidates))[:size])]
            train_csv = _cases_csv(chosen, pool_set.labels, out_dir / "data" / f"n{size}_s{seed}")
            for strategy in strategies:
                run_dir = out_dir / "runs" / f"{strategy}_n{size}_s{seed}"
                log(f"training {strategy}, N={size}, seed {seed} ...")
                result = finetune(
                    base if strategy != "scratch" or base else None, train_csv, run_dir,
                    strategy, replace(config, seed=seed, patience=0,
                                      lr=(learning_rates or {}).get(strategy, config.lr)),
                    val_data=test_csv,
                    labels=names, architecture=architecture, patch_size=patch_size,
                    overwrite=True, events=events, cancel_file=cancel_file,
                )
                if result.status == "cancelled":
                    raise TransferSegError(
                        f"The study was cancelled during {strategy}, N={size}, seed {seed}; the "
                        f"runs finished before it are in {out_dir / 'runs'}. Run the study "
                        "again to complete it.")
                last = run_dir / "last.safetensors"
                scores = test_dice(last, test_set.labelled(), test_set.labels, names,
                                   config.device)
                rows.append({
                    "strategy": strategy, "n": size, "seed": seed,
                    "test_dice": float(np.mean(list(scores.values()))) if scores else 0.0,
                    "labels": scores, "steps": result.steps,
                    "seconds": round(result.seconds, 1), "history": result.history,
                    "cases": [c.name for c in chosen],
                })
                log(f"  test Dice {rows[-1]['test_dice']:.4f}")
    _add_steps_to_dice(rows)
    write_outputs(rows, out_dir, strategies, sizes)
    return rows


def _add_steps_to_dice(rows: list[dict]) -> None:
    """Each run's steps to reach its scratch twin's final validation Dice, and the ratio."""
    for row in rows:
        scratch = next(r for r in rows if r["strategy"] == "scratch" and r["n"] == row["n"]
                       and r["seed"] == row["seed"])
        if not scratch["history"]:
            row["steps_to_scratch_dice"] = row["steps_ratio"] = None
            continue
        target = scratch["history"][-1]["dice"]
        reference = steps_to_dice(scratch["history"], target)
        steps = steps_to_dice(row["history"], target)
        row["steps_to_scratch_dice"] = steps
        row["steps_ratio"] = round(reference / steps, 3) if steps and reference else None


def write_outputs(rows: list[dict], out_dir: Path, strategies: Sequence[str],
                  sizes: Sequence[int]) -> None:
    """results.csv/json, summary.md and the two plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "results.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    with atomic_output(out_dir / "results.csv", overwrite=True) as tmp, open(
            tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", "n", "seed", "test_dice", "steps", "seconds",
                         "steps_to_scratch_dice", "steps_ratio", "cases"])
        for r in rows:
            writer.writerow([r["strategy"], r["n"], r["seed"], f"{r['test_dice']:.5f}",
                             r["steps"], r["seconds"], r["steps_to_scratch_dice"],
                             r["steps_ratio"], ";".join(r["cases"])])
    lines = ["# Study summary", "",
             "Test Dice: mean over labels, then over seeds (final model of each run).", "",
             "| strategy | N | test Dice | gain over scratch | steps-to-scratch-Dice ratio |",
             "|---|---|---|---|---|"]
    for size in sizes:
        scratch = np.mean([r["test_dice"] for r in rows
                           if r["strategy"] == "scratch" and r["n"] == size])
        for strategy in strategies:
            runs = [r for r in rows if r["strategy"] == strategy and r["n"] == size]
            dice = np.mean([r["test_dice"] for r in runs])
            ratios = [r["steps_ratio"] for r in runs if r["steps_ratio"]]
            ratio = f"{np.mean(ratios):.2f}" if ratios else "not reached"
            lines.append(f"| {strategy} | {size} | {dice:.4f} ± "
                         f"{np.std([r['test_dice'] for r in runs]):.4f} | "
                         f"{dice - scratch:+.4f} | {ratio} |")
    with atomic_output(out_dir / "summary.md", overwrite=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plots(rows, out_dir, strategies, sizes)


def _plots(rows, out_dir, strategies, sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    for strategy in strategies:
        means = [np.mean([r["test_dice"] for r in rows
                          if r["strategy"] == strategy and r["n"] == n]) for n in sizes]
        axis.plot(sizes, means, marker="o", label=strategy)
    axis.set(xlabel="training volumes (N)", ylabel="test Dice", title="Dice vs training-set size")
    axis.set_xticks(list(sizes))
    axis.legend()
    figure.tight_layout()
    with atomic_output(out_dir / "dice_vs_n.png", overwrite=True) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for axis, size in zip(axes[0], sizes, strict=True):
        for strategy in strategies:
            for r in rows:
                if r["strategy"] == strategy and r["n"] == size and r["history"]:
                    axis.plot([h["step"] for h in r["history"]], [h["dice"] for h in r["history"]],
                              label=f"{strategy} (seed {r['seed']})")
        axis.set(xlabel="step", ylabel="validation Dice", title=f"N = {size}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_output(out_dir / "learning_curves.png", overwrite=True) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
