"""What a scan costs: time and peak memory of ``transferseg segment`` against volume size, and
of a training step against patch size, so that a user can read off their own scan's cost.

- segment: the network, model file and synthetic CT of ``bench/inference.py`` (MONAI UNet
  16-256, 96^3 patches, 0.8 x 0.8 x 2 mm, 4 labels), at each ``--sizes`` volume, each run a
  fresh ``transferseg segment`` process (its wall time and peak RSS, from ``os.wait4``);
- training step: the trainer's step (sampling excluded: a fixed batch) on the CT base's
  network (the shipped ``transferseg-ct-base-v2``, DynUNet, 8-128 filters, 67 labels), batch
  2, at each ``--patches`` size: the median of ``--steps`` steps after two warm-up steps, and
  the child's peak RSS.

Results: ``bench/results/scaling.json`` and ``scaling.png``. Usage::

    python bench/scaling.py                      # 128^3 ... 512 x 512 x 400; patches 32 ... 128
    python bench/scaling.py --sizes 128 128 128 256 256 256 --patches 32 48
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from measure import cpu_model, memory_gib, version, write_atomically  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MIB = 2**20
SIZES = [(128, 128, 128), (256, 256, 128), (256, 256, 256), (512, 512, 200), (512, 512, 400)]
PATCHES = [32, 48, 64, 96, 128]
PREFIX = "SCALING-RESULT "


def child(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``; (wall s, peak RSS MiB, stdout). Reaped with os.wait4 for its rusage."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    process.stdout.close()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stdout.write(output)
        raise SystemExit(f"{command[1:3]} failed")
    peak = usage.ru_maxrss / (MIB if sys.platform == "darwin" else 1024)
    return time.perf_counter() - start, peak, output


def segment_costs(sizes, workdir: Path) -> list[dict]:
    rows = []
    for size in sizes:
        folder = workdir / "x".join(map(str, size))
        folder.mkdir(parents=True, exist_ok=True)
        spec = folder / "spec.json"
        spec.write_text(json.dumps({
            "size": list(size), "spacing": [0.8, 0.8, 2.0], "patch": [96, 96, 96],
            "device": "cpu", "batch_size": 2, "overlap": 0.25, "workdir": str(folder),
            "profile_dir": None}))
        child([sys.executable, str(HERE / "inference.py"), "--worker", "prepare", "--spec",
               str(spec)])
        command = [sys.executable, "-m", "TransferSegLib", "segment", "--model",
                   str(folder / "model.safetensors"), "--image", str(folder / "ct.nii.gz"),
                   "--output", str(folder / "label.nii.gz"), "--device", "cpu",
                   "--overwrite", "--quiet"]
        load = os.getloadavg()[0]
        wall, peak, _ = child(command)
        voxels = size[0] * size[1] * size[2]
        rows.append({"size_xyz": list(size), "voxels": voxels, "time_s": round(wall, 2),
                     "peak_rss_mib": round(peak, 1), "load_before": round(load, 2),
                     "input_mib_int16": round(voxels * 2 / MIB, 1)})
        print(f"segment {' x '.join(map(str, size)):>15}: {wall:6.1f} s, peak {peak:6.0f} MiB",
              flush=True)
    return rows


def step_worker(patch: int, steps: int) -> dict:
    """In the child: median time of the trainer's step on the CT base's network."""
    import statistics

    import torch

    from TransferSegLib import networks
    from TransferSegLib.checkpoint import read_card
    from TransferSegLib.losses import SegmentationLoss
    from TransferSegLib.zoo import resources_dir

    card = read_card(resources_dir() / "Models" / "transferseg-ct-base-v2.safetensors")
    torch.manual_seed(0)
    model = networks.build_network(card.architecture, card.in_channels, card.out_channels,
                                   **card.arguments).train()
    model = model.to(memory_format=torch.channels_last_3d)  # as the trainer
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SegmentationLoss()
    shape = (2, 1, patch, patch, patch)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    y = torch.randint(0, card.out_channels, (2, 1, patch, patch, patch))
    annotated = torch.ones(2, card.out_channels, dtype=torch.bool)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss = loss_fn(model(x), y, annotated)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return {"step_s": round(statistics.median(times), 3), "threads": torch.get_num_threads(),
            "out_channels": card.out_channels, "architecture": card.architecture,
            "arguments": card.arguments}


def step_costs(patches, steps: int) -> list[dict]:
    rows = []
    for patch in patches:
        load = os.getloadavg()[0]
        _, peak, output = child([sys.executable, str(Path(__file__).resolve()), "--worker-step",
                                 str(patch), "--steps", str(steps)])
        report = json.loads(next(line for line in output.splitlines()
                                 if line.startswith(PREFIX))[len(PREFIX):])
        rows.append({"patch": patch, "batch_size": 2, **report,
                     "patches_per_s": round(2 / report["step_s"], 2),
                     "peak_rss_mib": round(peak, 1), "load_before": round(load, 2)})
        print(f"training step, patch {patch:>3}^3: {report['step_s']:6.2f} s, "
              f"peak {peak:6.0f} MiB", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    seg = result["segment"]
    megavoxels = [r["voxels"] / 1e6 for r in seg]
    left.plot(megavoxels, [r["time_s"] for r in seg], "o-", color="tab:blue")
    left.set(xlabel="scan size (million voxels)", ylabel="wall time (s)",
             title="transferseg segment (UNet 16-256, 96^3 patches)")
    twin = left.twinx()
    twin.plot(megavoxels, [r["peak_rss_mib"] / 1024 for r in seg], "s--", color="tab:red")
    twin.set_ylabel("peak memory (GiB)", color="tab:red")
    for row, x in zip(seg, megavoxels, strict=True):
        left.annotate("x".join(map(str, row["size_xyz"])), (x, row["time_s"]), fontsize=7,
                      textcoords="offset points", xytext=(3, -10))
    steps = result["training_step"]
    patches = [r["patch"] for r in steps]
    right.plot(patches, [r["step_s"] for r in steps], "o-", color="tab:blue")
    right.set(xlabel="patch side (voxels, cubic)", ylabel="step time (s), batch 2",
              title="training step (CT base network)", xticks=patches)
    twin = right.twinx()
    twin.plot(patches, [r["peak_rss_mib"] / 1024 for r in steps], "s--", color="tab:red")
    twin.set_ylabel("peak memory (GiB)", color="tab:red")
    figure.suptitle(f"{result['hardware']['cpu']}, {result['hardware']['cores']} cores, CPU",
                    fontsize=9)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="volume sizes, three numbers (x y z) each (default "
                             + ", ".join("x".join(map(str, s)) for s in SIZES) + ")")
    parser.add_argument("--patches", type=int, nargs="+", default=PATCHES,
                        help="cubic patch sides for the training step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per patch size")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker-step", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_step:
        print(PREFIX + json.dumps(step_worker(args.worker_step, args.steps)), flush=True)
        return 0
    if args.sizes and len(args.sizes) % 3:
        parser.error("--sizes takes three numbers per volume")
    sizes = ([tuple(args.sizes[i:i + 3]) for i in range(0, len(args.sizes), 3)]
             if args.sizes else SIZES)
    with tempfile.TemporaryDirectory(prefix="transferseg-scaling-") as temporary:
        segment = segment_costs(sizes, Path(temporary))
    result = {
        "benchmark": "scaling: segment time and memory against scan size, training step "
                     "against patch size",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
                     "device": "cpu"},
        "software": {"python": platform.python_version(), "torch": version("torch"),
                     "monai": version("monai"), "transferseg": version("TransferSegLib"),
                     "pytorch-ignite": version("pytorch-ignite")},  # see measure.header
        "segment": segment,
        "training_step": step_costs(args.patches, args.steps),
        "definitions": {
            "time_s": "wall time of a fresh `transferseg segment` process (start to exit)",
            "peak_rss_mib": "ru_maxrss of the child process (os.wait4)",
            "step_s": "median time of one training step (forward, loss, backward, AdamW) on a "
                      "fixed batch of 2, after 2 warm-up steps",
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.results / "scaling.json", args.results / "scaling.png"
    write_atomically(json_path, lambda t: t.write_text(json.dumps(result, indent=2) + "\n"))
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
