"""Training throughput: TransferSeg's trainer against a plain MONAI-tutorial loop.

Both paths train the same network (MONAI ``UNet``, channels 16-32-64-128) from scratch on the
same real scan, the fetched ``totalseg_ct`` sample (abdominal CT, 3 mm voxels) reduced to four
organs, with the same patch, batch size (2 patches per step), loss
(``TransferSegLib.losses.SegmentationLoss``: soft Dice + cross-entropy), optimiser (AdamW,
lr 1e-3, weight decay 1e-5), seed and number of optimiser steps:

- ``transferseg``: the product trainer, ``recipes.finetune(None, cases.csv, out, "scratch",
  TrainConfig(...), architecture="unet", arguments=...)``: model-space preprocessing, patch
  sampling (2/3 centred on an organ), MONAI augmentations, the loop, the final validation and
  the model files;
- ``monai``: what a MONAI tutorial would write: ``CacheDataset`` with LoadImaged,
  EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged (-1000..1000 HU -> 0..1),
  SpatialPadd, then RandCropByPosNegLabeld (pos 2, neg 1, 2 samples), RandFlipd on each axis,
  RandScaleIntensityd, RandShiftIntensityd; ``DataLoader(batch_size=1, num_workers=2,
  collate_fn=list_data_collate)``; forward, loss, backward, step.

Throughput is patches per second over the steps after the warm-up ones, measured from the
start of the first step after warm-up to the end of the last step. Each run is its own child
process (this file, with ``--worker``); the parent takes the child's peak RSS and CPU time from
``os.wait4``. Results go to ``bench/results/training.json`` and ``training.png``
(``--quick``: ``training-quick.*``). Usage::

    python bench/training.py                # 60 timed steps after 5 warm-up, 3 runs per path
    python bench/training.py --quick        # 10 timed steps after 2 warm-up, 1 run per path
    python bench/training.py --patch 96 96 96 --steps 100 --profile

Needs the sample (``transferseg samples fetch``). Unix only (``os.wait4``). The parent imports
only the standard library until every timed child has exited: a child started by fork/vfork +
exec inherits the parent's peak RSS as the floor of its own ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import measure  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("transferseg", "monai")

SAMPLE = "totalseg_ct"
# The organs kept, in output-channel order (channel 0 is background); every other label of the
# sample becomes background. Both paths read the same reduced label map.
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")
# MONAI UNet constructor arguments, spelled out in full so the baseline builds the same network
# that TransferSeg builds from ``ARGUMENTS`` (networks.resolve_kwargs fills in the rest).
ARGUMENTS = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1}
NETWORK = {**ARGUMENTS, "kernel_size": 3, "up_kernel_size": 3, "act": "prelu",
           "norm": "instance", "dropout": 0.0}
CARD_PATCH = [64, 64, 64]  # what finetune(..., "scratch") without a base model puts on the card
DEFAULT_STEPS, QUICK_STEPS = 60, 10  # timed optimiser steps
DEFAULT_WARMUP, QUICK_WARMUP = 5, 2  # steps before them, not timed
DEFAULT_REPEATS, QUICK_REPEATS = 3, 1
BATCH_SIZE = 2
LR, WEIGHT_DECAY = 1e-3, 1e-5
CT_WINDOW = (-1000.0, 1000.0)
MONAI_WORKERS = 2  # MONAI's tutorials use 4 to 8 loader workers; 2 suits a 2-core machine
SEED = 0


# --- the parent ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        default=list(CARD_PATCH), help="training patch in voxels (default 64^3)")
    parser.add_argument("--steps", type=int,
                        help=f"timed optimiser steps (default {DEFAULT_STEPS}; "
                             f"--quick {QUICK_STEPS})")
    parser.add_argument("--warmup", type=int,
                        help=f"untimed steps before them (default {DEFAULT_WARMUP}; "
                             f"--quick {QUICK_WARMUP})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_STEPS} timed steps, one run per path")
    parser.add_argument("--repeats", type=int,
                        help="runs per path, in alternating order; medians are reported "
                             f"(default {DEFAULT_REPEATS}; --quick {QUICK_REPEATS})")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    parser.add_argument("--monai-workers", type=int, default=MONAI_WORKERS,
                        help=f"DataLoader workers of the MONAI loop (default {MONAI_WORKERS})")
    parser.add_argument("--monai-amp", action="store_true",
                        help="on CUDA, run the MONAI loop under float16 autocast with a "
                             "GradScaler, as TransferSeg does (default: float32)")
    measure.add_common_arguments(parser, RESULTS, ("prepare", *PATHS),
                                 "profile-training[-quick]-<path>.txt",
                                 "the dataset and the outputs")
    parser.add_argument("--run-name", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be at least 1")
    if min(args.patch) < 8 or any(p % 8 for p in args.patch):
        parser.error("--patch sizes must be multiples of 8 (three stride-2 levels)")
    return args


def summarise(runs: list[dict]) -> dict:
    """Medians of throughput and times over one path's repeats that no other work disturbed
    (all of them if every one was), the largest memory peaks over all."""
    quiet = [run for run in runs if not run.get("disturbed")] or runs

    def median(key: str) -> float | None:
        values = [run[key] for run in quiet if run.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    def largest(key: str) -> float | None:
        values = [run[key] for run in runs if run.get(key) is not None]
        return round(max(values), 1) if values else None

    return {
        "patches_per_s": median("patches_per_s"),
        "patches_per_s_median_step": median("patches_per_s_median_step"),
        "step_s_median": median("step_s_median"),
        "data_s_median": median("data_s_median"),
        "timed_s": median("timed_s"),
        "time_s": median("process_wall_s"),
        "setup_s": median("setup_s"),
        "after_s": median("after_s"),
        "cpu_s": median("cpu_s"),
        "peak_rss_mib": largest("peak_rss_mib"),
        "tree_pss_peak_mib": largest("tree_pss_peak_mib"),
        "vm_hwm_mib": largest("vm_hwm_mib"),
        "gpu_peak_allocated_mib": largest("gpu_peak_allocated_mib"),
        "gpu_peak_reserved_mib": largest("gpu_peak_reserved_mib"),
        "quiet_runs": sum(not run.get("disturbed") for run in runs),
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()}
                 for run in runs],
    }


def print_table(result: dict) -> None:
    paths = result["paths"]
    gpu = paths["transferseg"]["gpu_peak_allocated_mib"] is not None
    header = (f"{'path':<12} {'patches/s':>10} {'step s':>7} {'data s':>7} {'wall s':>7} "
              f"{'setup s':>8} "
              f"{'CPU s':>7} {'peak RSS MiB':>13} {'tree PSS MiB':>13}")
    header += f" {'GPU peak MiB':>13}" if gpu else ""
    print(header)
    for name in PATHS:
        row = paths[name]
        line = (f"{name:<12} {row['patches_per_s']:>10.3f} {row['step_s_median']:>7.3f} "
                f"{row['data_s_median']:>7.3f} {row['time_s']:>7.1f} {row['setup_s']:>8.1f} "
                f"{row['cpu_s']:>7.1f} {row['peak_rss_mib']:>13.0f} "
                f"{row['tree_pss_peak_mib'] or float('nan'):>13.0f}")
        line += f" {row['gpu_peak_allocated_mib']:>13.0f}" if gpu else ""
        print(line)
    print("ratios (transferseg / monai): "
          + ", ".join(f"{k} {v}" for k, v in result["ratios"].items() if v is not None))
    disturbed = result["disturbed_runs"]
    if disturbed:
        print(f"warning: {len(disturbed)} run(s) shared the cores with other work "
              f"({', '.join(disturbed)}); run again on a quiet machine for numbers to quote")


def plot(result: dict, path: Path) -> None:
    """Bars of throughput, wall time and memory; then each run's step times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    paths = result["paths"]
    settings = result["settings"]
    panels = [("patches / s after warm-up", "patches_per_s"),
              ("process wall time (s)", "time_s"), ("peak RSS (MiB)", "peak_rss_mib")]
    if paths["transferseg"]["gpu_peak_allocated_mib"] is not None:
        panels.append(("peak GPU memory allocated (MiB)", "gpu_peak_allocated_mib"))
    colours = {"transferseg": "tab:blue", "monai": "tab:gray"}
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(3.4 * len(panels) + 5, 3.6),
                                gridspec_kw={"width_ratios": [1] * len(panels) + [1.6]})
    for axis, (title, key) in zip(axes, panels, strict=False):
        values = [paths[name][key] for name in PATHS]
        bars = axis.bar(PATHS, values, color=[colours[name] for name in PATHS])
        axis.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values])
        axis.set_title(title, fontsize=9)
        axis.margins(y=0.15)
    trace = axes[-1]
    for name in PATHS:
        for number, run in enumerate(paths[name]["runs"]):
            steps = range(1, len(run["step_s"]) + 1)
            trace.plot(steps, run["step_s"], color=colours[name], alpha=0.8, linewidth=1,
                       linestyle="--" if run.get("disturbed") else "-",
                       label=name if number == 0 else None)
    trace.axvspan(0.5, settings["warmup"] + 0.5, color="0.9", label="warm-up (not timed)")
    trace.set_yscale("log")  # a disturbed run's steps can be many times slower
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    trace.yaxis.set_major_formatter(plain)
    trace.yaxis.set_minor_formatter(plain)
    trace.set_xlabel("step")
    trace.set_ylabel("seconds")
    trace.set_title("time per optimiser step (dashed: disturbed run)", fontsize=9)
    trace.legend(fontsize=8)
    model = result["model"]
    measure.save_figure(
        figure, path,
        f"{result['data']['sample']} ({len(ORGANS)} organs, {model['spacing_mm'][0]:g} mm), UNet "
        f"{model['arguments']['channels']}, patch {' x '.join(map(str, model['patch_xyz']))}, "
        f"batch {settings['batch_size']}, {settings['steps']} timed steps, "
        f"{result['hardware']['device']}")


def augmentation_difference(config: dict) -> str:
    """How TransferSeg's augmentation (for ``config``, a TrainConfig as a dict) differs from
    the MONAI loop's: flips on each axis, intensity scale and shift (0.1, p 0.5 each)."""
    if not config.get("augment", True):
        return "augmentation: none in transferseg (augment off), the MONAI loop's in full"
    flips = ("flips the same (p 0.5 per axis)" if config.get("mirror", True)
             else "no flips in transferseg (its default: mirroring swaps left and right "
                  "organs), p 0.5 per axis in the MONAI loop")
    return ("augmentation: intensity scale and shift the same (0.1, p 0.5); transferseg adds "
            f"Gaussian noise (p 0.2); {flips}")


def precision(device: str, monai_amp: bool) -> str:
    if not device.startswith("cuda"):
        return "float32 in both; transferseg channels_last_3d, the MONAI loop the default layout"
    monai = "float16 autocast + GradScaler" if monai_amp else "float32"
    return f"transferseg: float16 autocast + GradScaler, channels_last_3d; monai: {monai}"


def benchmark(args: argparse.Namespace, workdir: Path, stem: str) -> dict:
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({
        "patch": args.patch, "steps": args.steps, "warmup": args.warmup, "device": args.device,
        "monai_workers": args.monai_workers, "monai_amp": args.monai_amp,
        "workdir": str(workdir), "profile_dir": str(args.results) if args.profile else None,
        "profile_stem": f"profile-{stem}",
    }))
    busy_at_start = measure.cores_busy(1.0)
    if busy_at_start is not None and busy_at_start > measure.DISTURBED_CORES:
        print(f"warning: other work keeps {busy_at_start:.1f} of {os.cpu_count()} cores busy; "
              "with torch's threads competing for cores, step times can grow many fold",
              flush=True)
    print(f"preparing the {SAMPLE} dataset in {workdir}", flush=True)
    prepared = measure.run_child(__file__, "prepare", spec)

    def describe(report: dict) -> str:
        other = report.get("other_cores")
        return (f"{report['patches_per_s']:.3f} patches/s, {report['process_wall_s']:.1f} s "
                f"wall, {report['cpu_s']:.1f} s CPU, peak RSS {report['peak_rss_mib']:.0f} MiB"
                + (f", other work {other:.2f} cores" if other is not None else "")
                + (" (DISTURBED)" if report.get("disturbed") else ""))

    runs, orchestrator_rss = measure.paired_runs(__file__, spec, PATHS, args.repeats, describe,
                                         profile=args.profile)

    config = [run.pop("config") for run in runs["transferseg"]][0]
    paths = {name: summarise(runs[name]) for name in PATHS}
    ts, mo = paths["transferseg"], paths["monai"]
    device = prepared["device"]
    return {
        **measure.header("training: TransferSeg trainer vs a plain MONAI-tutorial loop", prepared,
                 ("torch", "monai", "SimpleITK", "nibabel", "transferseg")),
        "data": {
            "sample": SAMPLE,
            "size_xyz": prepared["size"],
            "spacing_mm": prepared["spacing"],
            "organs": {name: {"channel": channel, "voxels": prepared["voxels"][name]}
                       for channel, name in enumerate(ORGANS, start=1)},
            "note": "one case: the product trainer validates on it too (fewer than 3 cases); "
                    "the MONAI loader draws it once per step (RandomSampler with replacement, "
                    "steps draws), as a tutorial epoch over many cases would run",
        },
        "model": {
            "architecture": "unet (monai.networks.nets.UNet)",
            "arguments": NETWORK,
            "parameters": prepared["parameters"],
            "out_channels": len(ORGANS) + 1,
            "patch_xyz": args.patch,
            "spacing_mm": prepared["spacing"],
            "normalisation": {"kind": "ct", "window": list(CT_WINDOW)},
        },
        "settings": {
            "batch_size": BATCH_SIZE, "steps": args.steps, "warmup": args.warmup,
            "loss": "TransferSegLib.losses.SegmentationLoss() (soft Dice + cross-entropy) in both",
            "optimizer": f"AdamW lr {LR}, weight decay {WEIGHT_DECAY}", "seed": SEED,
            "transferseg_call": prepared["transferseg_call"],
            "transferseg_config": config,
            "monai_loader": f"DataLoader(batch_size=1, num_workers={args.monai_workers}, "
                            "collate_fn=list_data_collate), 2 crops per case",
            "precision": precision(device, args.monai_amp),
            "differences": [
                "learning rate: transferseg decays it (poly 0.9), the MONAI loop keeps it",
                augmentation_difference(config),
                f"patch centres: transferseg centres {config['foreground_ratio']:.0%} of its "
                "patches near a voxel of an organ (organs drawn with equal chance), the rest "
                "anywhere; RandCropByPosNegLabeld (pos 2, neg 1) near any organ voxel or any "
                "voxel above -1000 HU",
                "padding: transferseg pads patches beyond the scan with an ignored target, "
                "the MONAI loop (SpatialPadd) with background",
                "after the last step transferseg validates (sliding window over the case) and "
                "writes its model files: in time_s, not in patches_per_s",
            ],
            "repeats": args.repeats,
            "time": "median over the repeats no other work disturbed (all if each one was)",
            "memory": "largest over repeats",
        },
        "paths": paths,
        "ratios": measure.ratios(ts, mo, {
            "throughput_ratio": "patches_per_s",
            "median_step_throughput_ratio": "patches_per_s_median_step",
            "time_ratio": "time_s",
            "cpu_time_ratio": "cpu_s",
            "peak_rss_ratio": "peak_rss_mib",
            "tree_pss_ratio": "tree_pss_peak_mib",
            "gpu_peak_ratio": "gpu_peak_allocated_mib",
        }),
        "orchestrator_peak_rss_mib": round(orchestrator_rss, 1),
        "other_cores_at_start": busy_at_start,
        "disturbed_runs": [run["run"] for name in PATHS for run in runs[name]
                           if run.get("disturbed")],
        "definitions": {
            "patches_per_s": "patches (steps x batch size) per second, from the start of the "
                             "first step after warm-up to the end of the last step (the higher "
                             "the better); throughput_ratio > 1: transferseg is faster",
            "patches_per_s_median_step": "batch size / median step time over the timed steps "
                                         "(less sensitive to other work on the machine)",
            "patches_per_s_events": "transferseg only: the same from its own step events "
                                    "(emitted every 10 steps), first one after warm-up to last",
            "data_s_median": "median time per timed step getting its patches: transferseg "
                             "sample_patch + augment; monai next(loader) (waiting for the "
                             "workers) + to(device)",
            "step_s": "each step's time: sampling, augmentation, forward, loss, backward, "
                      "optimiser step (and, every 10 steps, transferseg's progress event)",
            "timed_s": "wall time of the timed steps",
            "setup_s": "from the timed call to the start of the first step: reading, "
                       "preprocessing, caching, building the network",
            "after_s": "from the end of the last step to the end of the call (transferseg: "
                       "validation and model files)",
            "time_s": "wall time of the child process, start to exit",
            "cpu_s": "user + system CPU time of the child and its loader workers (os.wait4)",
            "load_before": "1-minute load average just before the child started (the "
                           "previous child's work counts in it)",
            "other_cores_at_start": "cores kept busy by other work in the second before the "
                                    "first child",
            "other_cores": "cores kept busy by other processes while the child ran, on "
                           "average (/proc/stat minus the child's CPU time)",
            "disturbed": f"other_cores > {measure.DISTURBED_CORES}: the timings of that run are "
                         "not to be quoted",
            "involuntary_switches": "times the child was preempted (os.wait4 ru_nivcsw): "
                                    "high when other work competed for the cores",
            "peak_rss_mib": "ru_maxrss of the child from os.wait4: the largest single process "
                            "(loader workers included), floor: orchestrator_peak_rss_mib",
            "tree_pss_peak_mib": "the child and its loader workers together: the largest sum of "
                                 "their proportional set sizes (a page they share counted "
                                 "once), sampled every 0.2 s",
            "vm_hwm_mib": "VmHWM of the child's own address space, read by the child at its end",
            "vm_hwm_steps_mib": "the same, read at the end of the last step (before "
                                "transferseg's validation and model files)",
            "gpu_peak_allocated_mib": "torch.cuda.max_memory_allocated() in the child",
            "loss_first, loss_last": "the loss at the first and the last step (a check that "
                                     "both paths learn the same task)",
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return measure.serve_worker(args, measured, prepare=prepare)
    stem = "training-quick" if args.quick else "training"
    with tempfile.TemporaryDirectory(prefix="transferseg-bench-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        result = benchmark(args, workdir.resolve(), stem)
    print_table(result)
    measure.write_results(result, args.results, stem, plot)
    return 0


# --- the children -------------------------------------------------------------------------------

def prepare(spec: dict, workdir: Path) -> dict:
    """Write the dataset both paths read: the sample's scan, its label map reduced to
    ``ORGANS`` (values = output channels), ``labels.json`` and ``cases.csv``; and, for a patch
    other than the card default, a base model file that only carries the patch (see
    :func:`transferseg_path`)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from TransferSegLib import networks
    from TransferSegLib.checkpoint import ModelCard, save_model
    from TransferSegLib.samples import require_sample

    sample = require_sample(SAMPLE)
    label = sitk.ReadImage(str(sample.label))
    values = sitk.GetArrayFromImage(label)
    value_of = {name: value for value, name in sample.labels.items()}
    lookup = np.zeros(int(values.max()) + 1, np.uint8)
    for channel, name in enumerate(ORGANS, start=1):
        lookup[value_of[name]] = channel
    reduced_values = lookup[values]
    reduced = sitk.GetImageFromArray(reduced_values)
    reduced.CopyInformation(label)
    sitk.WriteImage(reduced, str(workdir / "label.nii.gz"), useCompression=True)
    (workdir / "labels.json").write_text(json.dumps(
        {str(channel): name for channel, name in enumerate(ORGANS, start=1)}))
    (workdir / "cases.csv").write_text(f"image,label,name\n{sample.image},label.nii.gz,{SAMPLE}\n")
    spacing = [float(v) for v in label.GetSpacing()]

    if networks.resolve_kwargs("unet", **ARGUMENTS) != NETWORK:
        raise SystemExit("NETWORK no longer matches TransferSeg's UNet defaults: "
                         f"{networks.resolve_kwargs('unet', **ARGUMENTS)}")
    torch.manual_seed(SEED)
    model = networks.build_network("unet", 1, len(ORGANS) + 1, **ARGUMENTS)
    if list(spec["patch"]) == CARD_PATCH:
        call = ('finetune(None, cases.csv, out, "scratch", config, architecture="unet", '
                "arguments=ARGUMENTS)")
    else:
        # finetune(None, ..., "scratch") always puts 64^3 on the card; another patch comes from
        # a base card ("scratch" takes only its architecture and settings, not its weights).
        card = ModelCard(
            architecture="unet", in_channels=1, out_channels=len(ORGANS) + 1,
            labels={0: "background", **dict(enumerate(ORGANS, start=1))}, spacing=spacing,
            patch_size=list(spec["patch"]), normalisation={"kind": "ct", "window": list(CT_WINDOW)},
            arguments=networks.resolve_kwargs("unet", **ARGUMENTS), modality="CT",
            title="benchmark card (patch size only)",
        )
        save_model(workdir / "base.safetensors", model, card, overwrite=True)
        call = 'finetune(base.safetensors, cases.csv, out, "scratch", config)'
    device = measure.resolved_device(spec["device"])
    spec.update(device=device, spacing=spacing, image=str(sample.image))
    (workdir / "spec.json").write_text(json.dumps(spec))
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {
        "device": device, "gpu": gpu, "torch_threads": torch.get_num_threads(),
        "size": [int(v) for v in label.GetSize()], "spacing": spacing,
        "voxels": {name: int(np.count_nonzero(reduced_values == channel))
                   for channel, name in enumerate(ORGANS, start=1)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "transferseg_call": call,
    }


def measured(kind: str, spec: dict, workdir: Path, run_name: str,
             profile_to: Path | None) -> dict:
    """Run one path, optionally cProfiled (then the times include the profiler's overhead)."""
    run = transferseg_path if kind == "transferseg" else monai_path
    clock, start, end, fields = measure.timed_on_device(run, spec, workdir, workdir / run_name,
                                                profile_to, 40)
    return {"work_start": start, "work_s": end - start,
            **step_statistics(clock, spec, start, end), **fields}


def step_statistics(clock: dict, spec: dict, work_start: float, work_end: float) -> dict:
    """Throughput from ``clock``: ``starts`` (the start of every step), ``end`` (the end of the
    last one), ``data_s`` (each step's time getting its patches), ``loss_first``/``loss_last``
    and optional extra entries, passed on."""
    starts, end, warmup = clock.pop("starts"), clock.pop("end"), spec["warmup"]
    data_s = clock.pop("data_s")
    total = spec["warmup"] + spec["steps"]
    if len(starts) != total:
        raise SystemExit(f"expected {total} steps, saw {len(starts)}")
    step_s = [b - a for a, b in zip(starts, [*starts[1:], end], strict=True)]
    timed_s = end - starts[warmup]
    median_step = statistics.median(step_s[warmup:])
    return {
        "patches_per_s": spec["steps"] * BATCH_SIZE / timed_s,
        "patches_per_s_median_step": BATCH_SIZE / median_step,
        "step_s_median": median_step,
        "data_s_median": statistics.median(data_s[warmup:]),
        "timed_s": timed_s,
        "warmup_s": starts[warmup] - starts[0],
        "setup_s": starts[0] - work_start,
        "after_s": work_end - end,
        "step_s": [round(s, 4) for s in step_s],
        **clock,
    }


def transferseg_path(spec: dict, workdir: Path, output: Path) -> dict:
    """The product trainer, called as the CLI's ``transferseg finetune --strategy scratch``
    calls it. Validation and checkpoints are set beyond the last step (the trainer still
    validates once at the end).

    Step boundaries: the trainer emits a ``step`` event only every 10 steps, so the start of
    each step is taken from its first call of ``training.sample_patch`` (wrapped to record the
    time, nothing else); the last step ends at the last ``step`` event, which the trainer emits
    right after it (``loss.item()`` synchronises on CUDA)."""
    from dataclasses import asdict

    import torch

    from TransferSegLib import recipes, training

    starts: list[float] = []
    data_s: list[float] = []  # per step: time in sample_patch and augment
    calls = 0
    originals = {"sample_patch": training.sample_patch, "augment": training.augment}

    def timed_sample_patch(*args, **kwargs):
        nonlocal calls
        now = time.perf_counter()
        if calls % BATCH_SIZE == 0:
            starts.append(now)
            data_s.append(0.0)
        calls += 1
        result = originals["sample_patch"](*args, **kwargs)
        data_s[-1] += time.perf_counter() - now
        return result

    def timed_augment(*args, **kwargs):
        now = time.perf_counter()
        result = originals["augment"](*args, **kwargs)
        data_s[-1] += time.perf_counter() - now
        return result

    total = spec["warmup"] + spec["steps"]
    events: list[tuple[float, dict]] = []
    config = training.TrainConfig(
        steps=total, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY, optimizer="adamw",
        val_every=total + 1, checkpoint_every=total + 1, seed=SEED, device=spec["device"])
    hwm_at_end_of_steps = []

    def record(event: dict) -> None:
        events.append((time.perf_counter(), event))
        if event["event"] == "step" and event["step"] == total:
            hwm_at_end_of_steps.append(measure.vm_hwm_mib())

    base = workdir / "base.safetensors"
    training.sample_patch, training.augment = timed_sample_patch, timed_augment
    try:
        if base.exists():
            recipes.finetune(base, workdir / "cases.csv", output, "scratch", config,
                              events=record, overwrite=True)
        else:
            recipes.finetune(None, workdir / "cases.csv", output, "scratch", config,
                              architecture="unet", arguments=dict(ARGUMENTS), events=record,
                              overwrite=True)
    finally:
        training.sample_patch, training.augment = originals["sample_patch"], originals["augment"]
    steps = [(t, e) for t, e in events if e["event"] == "step"]
    if not steps or steps[-1][1]["step"] != total:
        raise SystemExit(f"the trainer stopped early: {[e for _, e in events][-3:]}")
    after = [(t, e) for t, e in steps if e["step"] > spec["warmup"]]
    by_events = None
    if len(after) > 1 and after[-1][1]["step"] > after[0][1]["step"]:
        by_events = ((after[-1][1]["step"] - after[0][1]["step"]) * BATCH_SIZE
                     / (after[-1][0] - after[0][0]))
    model = output / "last.safetensors"
    return {
        "starts": starts,
        "data_s": data_s,
        "end": steps[-1][0],
        "loss_first": steps[0][1]["loss"],
        "loss_last": steps[-1][1]["loss"],
        "patches_per_s_events": by_events,
        "trainer_patches_per_s": steps[-1][1]["patches_per_s"],
        "vm_hwm_steps_mib": hwm_at_end_of_steps[0],
        "threads": torch.get_num_threads(),
        "model_file_mib": model.stat().st_size / measure.MIB if model.exists() else None,
        "config": asdict(config),
    }


def monai_path(spec: dict, workdir: Path, output: Path) -> dict:
    """The loop a MONAI tutorial would write, with the same network, loss and optimiser."""
    import torch
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )
    from monai.utils import set_determinism
    from torch.utils.data import RandomSampler

    from TransferSegLib.losses import SegmentationLoss

    device = torch.device(spec["device"])
    total = spec["warmup"] + spec["steps"]
    patch = list(spec["patch"])  # MONAI's arrays are (C, X, Y, Z): x, y, z order as given
    set_determinism(seed=SEED)
    keys = ["image", "label"]
    transforms = Compose([
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=spec["spacing"], mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0,
                             b_max=1.0, clip=True),
        # The scan is 30 voxels deep: without padding the crop would be shallower than the
        # patch (and the network would do less work than in the other path).
        SpatialPadd(keys, spatial_size=patch),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=2, neg=1,
                               num_samples=BATCH_SIZE, image_key="image", image_threshold=0),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ])
    dataset = CacheDataset([{"image": spec["image"], "label": str(workdir / "label.nii.gz")}],
                           transforms, cache_rate=1.0, num_workers=0, progress=False)
    # One case drawn once per step: the loader's workers keep running (and prefetching) for the
    # whole run, as over a tutorial's epoch of many cases, instead of restarting every step.
    sampler = RandomSampler(dataset, replacement=True, num_samples=total)
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=spec["monai_workers"],
                        collate_fn=list_data_collate, pin_memory=device.type == "cuda")
    model = UNet(spatial_dims=3, in_channels=1, out_channels=len(ORGANS) + 1, **NETWORK)
    model = model.to(device)
    loss_function = SegmentationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    use_amp = spec["monai_amp"] and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    starts, data_s, losses = [], [], []
    model.train()
    batches = iter(loader)
    for _ in range(total):
        starts.append(time.perf_counter())
        batch = next(batches)
        inputs, labels = batch["image"].to(device), batch["label"].to(device)
        data_s.append(time.perf_counter() - starts[-1])
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            outputs = model(inputs)
        loss = loss_function(outputs, labels.long())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    end = time.perf_counter()
    hwm_at_end_of_steps = measure.vm_hwm_mib()
    del batches  # joins the loader's workers, so their usage reaches this process's rusage
    torch.save(model.state_dict(), output.with_suffix(".pt"))
    return {
        "starts": starts,
        "data_s": data_s,
        "end": end,
        "loss_first": round(losses[0], 5),
        "loss_last": round(losses[-1], 5),
        "vm_hwm_steps_mib": hwm_at_end_of_steps,
        "threads": torch.get_num_threads(),
        "patch_shape": list(inputs.shape[2:]),
    }


if __name__ == "__main__":
    sys.exit(main())
