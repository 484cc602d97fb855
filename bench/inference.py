"""Whole-volume segmentation: ``transferseg segment`` against a plain MONAI script.

The same network with the same weights segments the same CT-sized volume two ways:

- ``transferseg``: the product path, ``TransferSegLib.cli.main(["segment", ...])``, reading a
  TransferSeg model file and a NIfTI scan and writing a label map (reading, model-space
  preprocessing, sliding window, mapping back to the input grid, writing);
- ``monai``: what a MONAI tutorial would write: SimpleITK read, CT window scaling, a tensor,
  ``sliding_window_inference(..., overlap=0.25, mode="gaussian")``, argmax, NIfTI write.

The model card's spacing is the scan's spacing (as stored in the NIfTI header), so both paths
run the network on the same voxels. Each run is its own child process (this file, with
``--worker``); the parent stays small and takes the child's peak RSS from ``os.wait4``, its
wall time from start to exit, and on CUDA the peak GPU memory the child reports on stdout.
Results go to ``bench/results/inference.json`` and ``inference.png`` (``--quick``:
``inference-quick.*``). Usage::

    python bench/inference.py                  # 512 x 512 x 200 voxels, 0.8 x 0.8 x 2 mm
    python bench/inference.py --quick          # 160 x 160 x 64 smoke run
    python bench/inference.py --size 256 256 100 --repeats 3 --profile

Unix only (``os.wait4``). The parent imports only the standard library until every timed
child has exited: a child started by fork/vfork + exec inherits the parent's peak RSS as the
floor of its own ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import measure  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("transferseg", "monai")

DEFAULT_SIZE = (512, 512, 200)  # voxels (x, y, z)
QUICK_SIZE = (160, 160, 64)
SPACING = (0.8, 0.8, 2.0)  # mm (x, y, z)
# MONAI UNet constructor arguments: what differs from MONAI's defaults. TransferSeg's UNet
# defaults are MONAI's for the rest (kernel sizes 3, PReLU, instance norm, no dropout), so both
# paths build the same network; the results record the arguments in full.
NETWORK = {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}
PATCH = (96, 96, 96)  # voxels (x, y, z)
LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
CT_WINDOW = (-1000.0, 1000.0)  # HU clipped and mapped to [0, 1], as the model card says
SEED = 0


# --- the parent ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help=f"volume size in voxels (default {' '.join(map(str, DEFAULT_SIZE))})")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        default=list(SPACING), help="voxel spacing in mm (default 0.8 0.8 2)")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        default=list(PATCH), help="sliding-window patch in voxels (default 96^3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run on {' x '.join(map(str, QUICK_SIZE))} voxels")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per path, in alternating order; the median time is reported")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per forward pass")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")
    measure.add_common_arguments(parser, RESULTS, ("prepare", "compare", *PATHS),
                                 "profile-<path>.txt", "the volume, model and outputs")
    parser.add_argument("--run-name", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = list(QUICK_SIZE if args.quick else DEFAULT_SIZE)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def summarise(runs: list[dict]) -> dict:
    """Median times and the largest peaks over the repeats of one path."""
    def median(key: str) -> float:
        return round(statistics.median(run[key] for run in runs), 3)

    summary = {
        "time_s": median("process_wall_s"),
        "work_s": median("work_s"),
        "cpu_s": median("cpu_s"),
        "peak_rss_mib": round(max(run["peak_rss_mib"] for run in runs), 1),
        "vm_hwm_mib": round(max(run["vm_hwm_mib"] for run in runs), 1)
        if all(run.get("vm_hwm_mib") is not None for run in runs) else None,
        "gpu_peak_allocated_mib": None,
        "gpu_peak_reserved_mib": None,
        "runs": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items()}
                 for run in runs],
    }
    if runs[0].get("gpu_peak_allocated_mib") is not None:
        summary["gpu_peak_allocated_mib"] = round(
            max(run["gpu_peak_allocated_mib"] for run in runs), 1)
        summary["gpu_peak_reserved_mib"] = round(
            max(run["gpu_peak_reserved_mib"] for run in runs), 1)
    stages = [run["stages_s"] for run in runs if run.get("stages_s")]
    if stages:
        summary["stages_s"] = {k: round(statistics.median(s[k] for s in stages), 3)
                               for k in stages[0]}
    return summary


def print_table(result: dict) -> None:
    paths = result["paths"]
    gpu = paths["transferseg"]["gpu_peak_allocated_mib"] is not None
    header = f"{'path':<12} {'wall s':>8} {'work s':>8} {'CPU s':>8} {'peak RSS MiB':>13}"
    header += f" {'GPU peak MiB':>13}" if gpu else ""
    print(header)
    for name in PATHS:
        row = paths[name]
        line = (f"{name:<12} {row['time_s']:>8.1f} {row['work_s']:>8.1f} {row['cpu_s']:>8.1f} "
                f"{row['peak_rss_mib']:>13.0f}")
        line += f" {row['gpu_peak_allocated_mib']:>13.0f}" if gpu else ""
        print(line)
    stages = paths["monai"].get("stages_s", {})
    if stages:
        print("monai stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    print("ratios (transferseg / monai): "
          + ", ".join(f"{k} {v}" for k, v in result["ratios"].items() if v is not None))
    if result.get("agreement") is not None:
        print(f"label maps agree on {100 * result['agreement']:.4f} % of voxels")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = result["paths"]
    repeats = result["settings"]["repeats"]
    panels = [(f"wall time (s), median of {repeats}" if repeats > 1 else "wall time (s)",
               "time_s"), ("peak RSS (MiB)", "peak_rss_mib")]
    if paths["transferseg"]["gpu_peak_allocated_mib"] is not None:
        panels.append(("peak GPU memory allocated (MiB)", "gpu_peak_allocated_mib"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for axis, (title, key) in zip(axes, panels, strict=True):
        values = [paths[name][key] for name in PATHS]
        bars = axis.bar(PATHS, values, color=["tab:blue", "tab:gray"])
        axis.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values])
        axis.set_title(title)
        axis.margins(y=0.15)
    volume, model = result["volume"], result["model"]
    measure.save_figure(
        figure, path,
        f"{' x '.join(map(str, volume['size_xyz']))} voxels, UNet "
        f"{model['arguments']['channels']}, patch {' x '.join(map(str, model['patch_xyz']))}, "
        f"{result['hardware']['device']}")


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({
        "size": args.size, "spacing": args.spacing, "patch": args.patch, "device": args.device,
        "batch_size": args.batch_size, "overlap": args.overlap, "workdir": str(workdir),
        "profile_dir": str(args.results) if args.profile else None, "profile_stem": "profile",
    }))
    print(f"preparing a {' x '.join(map(str, args.size))} volume and a model in {workdir}",
          flush=True)
    prepared = measure.run_child(__file__, "prepare", spec)
    runs, orchestrator_rss = measure.paired_runs(
        __file__, spec, PATHS, args.repeats, profile=args.profile,
        describe=lambda report: f"{report['process_wall_s']:.1f} s wall, "
        f"{report['cpu_s']:.1f} s CPU, peak RSS {report['peak_rss_mib']:.0f} MiB")
    agreement = measure.run_child(__file__, "compare", spec)["agreement"]

    paths = {name: summarise(runs[name]) for name in PATHS}
    ts, mo = paths["transferseg"], paths["monai"]
    return {
        **measure.header("inference: transferseg segment vs plain MONAI sliding window", prepared,
                 ("torch", "monai", "SimpleITK", "transferseg")),
        "volume": {
            "size_xyz": args.size,
            "spacing_mm": prepared["spacing"],
            "voxels": prepared["voxels"],
            "pixel_type": "int16 (HU)",
            "file_mib": prepared["file_mib"],
        },
        "model": {
            "architecture": "unet (monai.networks.nets.UNet)",
            "arguments": prepared["arguments"],
            "parameters": prepared["parameters"],
            "out_channels": len(LABELS),
            "patch_xyz": args.patch,
            "spacing_mm": prepared["spacing"],
            "normalisation": {"kind": "ct", "window": list(CT_WINDOW)},
            "note": "model spacing = the scan's spacing as read back from its NIfTI header, "
                    "so both paths run the network on the same voxels",
        },
        "settings": {
            "overlap": args.overlap, "mode": "gaussian", "batch_size": args.batch_size,
            "repeats": args.repeats, "time": "median over repeats",
            "memory": "largest over repeats",
        },
        "paths": paths,
        "ratios": measure.ratios(ts, mo, {
            "time_ratio": "time_s",
            "work_time_ratio": "work_s",
            "cpu_time_ratio": "cpu_s",
            "peak_rss_ratio": "peak_rss_mib",
            "gpu_peak_ratio": "gpu_peak_allocated_mib",
        }),
        "agreement": agreement,
        "orchestrator_peak_rss_mib": round(orchestrator_rss, 1),
        "definitions": {
            "time_s": "wall time of the child process, start to exit (interpreter, imports, "
                      "reading, inference, writing)",
            "work_s": "the same from the start of the timed call (imports made inside it "
                      "count; the interpreter start and this file's own set-up do not)",
            "cpu_s": "user + system CPU time of the child (os.wait4); steadier than wall time "
                     "on a machine shared with other work",
            "load_before": "1-minute load average just before the child started",
            "peak_rss_mib": "ru_maxrss of the child from os.wait4 (floor: the parent's peak, "
                            "orchestrator_peak_rss_mib)",
            "vm_hwm_mib": "VmHWM of the child's own address space, read by the child at its end",
            "gpu_peak_allocated_mib": "torch.cuda.max_memory_allocated() in the child",
            "agreement": "fraction of voxels with the same label in both outputs",
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return measure.serve_worker(args, measured, prepare=prepare,
                            compare=lambda spec, workdir: compare(workdir))
    stem = "inference-quick" if args.quick else "inference"
    with tempfile.TemporaryDirectory(prefix="transferseg-bench-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        result = benchmark(args, workdir.resolve())
    print_table(result)
    measure.write_results(result, args.results, stem, plot)
    return 0


# --- the children -------------------------------------------------------------------------------

def prepare(spec: dict, workdir: Path) -> dict:
    """Write the synthetic scan and a fixed-seed random UNet as a TransferSeg model file."""
    import SimpleITK as sitk
    import torch

    from TransferSegLib import networks
    from TransferSegLib.checkpoint import ModelCard, save_model

    volume = workdir / "ct.nii.gz"
    write_synthetic_ct(volume, spec["size"], spec["spacing"])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(volume))
    reader.ReadImageInformation()
    # NIfTI stores spacing as float32: 0.8 comes back as 0.800000011920929. The card takes the
    # spacing as stored, so model space is the scan's own grid and neither path resamples.
    spacing = [float(v) for v in reader.GetSpacing()]

    torch.manual_seed(SEED)
    model = networks.build_network("unet", 1, len(LABELS), **NETWORK)
    card = ModelCard(
        architecture="unet", in_channels=1, out_channels=len(LABELS), labels=dict(LABELS),
        spacing=spacing, patch_size=list(spec["patch"]),
        normalisation={"kind": "ct", "window": list(CT_WINDOW)},
        arguments=networks.resolve_kwargs("unet", **NETWORK), modality="CT",
        title="benchmark UNet (random weights)",
    )
    save_model(workdir / "model.safetensors", model, card, overwrite=True)
    device = measure.resolved_device(spec["device"])
    spec["device"] = device
    (workdir / "spec.json").write_text(json.dumps(spec))
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {
        "device": device, "gpu": gpu, "torch_threads": torch.get_num_threads(),
        "spacing": spacing, "voxels": math.prod(spec["size"]),
        "file_mib": round(volume.stat().st_size / measure.MIB, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "arguments": card.arguments,
    }


def write_synthetic_ct(path: Path, size: list[int], spacing: list[float]) -> None:
    """A CT-like int16 volume in HU: air, a body of fat and muscle, lungs, liver, spleen,
    kidneys, aorta and spine, with noise. Organs scale with the field of view."""
    import numpy as np
    import SimpleITK as sitk

    nx, ny, nz = size
    fov = np.array(size) * np.array(spacing)  # mm
    x = (np.arange(nx) - nx / 2) * spacing[0] / fov[0]  # fractions of the field of view
    y = (np.arange(ny) - ny / 2) * spacing[1] / fov[1]
    xx, yy = np.meshgrid(x, y)  # (y, x)
    # (HU, centre (x, y, z), semi-axes (x, y, z)) as fractions of the field of view; x grows
    # toward the patient's left and y toward the back (LPS), z toward the head.
    organs = [
        (-90, (0, 0, 0), (0.45, 0.33, 2.0)),  # subcutaneous fat
        (45, (0, 0, 0), (0.42, 0.30, 2.0)),  # muscle and soft tissue
        (-850, (-0.17, 0.0, 0.32), (0.14, 0.18, 0.22)),  # right lung
        (-850, (0.17, 0.0, 0.32), (0.13, 0.18, 0.22)),  # left lung
        (60, (-0.15, -0.02, 0.02), (0.17, 0.15, 0.14)),  # liver
        (50, (0.2, 0.08, 0.05), (0.06, 0.08, 0.08)),  # spleen
        (30, (-0.11, 0.14, -0.12), (0.04, 0.05, 0.08)),  # right kidney
        (30, (0.11, 0.14, -0.1), (0.04, 0.05, 0.08)),  # left kidney
        (200, (0.03, 0.1, 0), (0.02, 0.02, 2.0)),  # aorta, contrast enhanced
        (700, (0, 0.2, 0), (0.04, 0.04, 2.0)),  # spine
    ]
    rng = np.random.default_rng(SEED)
    volume = np.empty((nz, ny, nx), np.int16)
    for k in range(nz):
        z = (k - nz / 2) * spacing[2] / fov[2]
        hu = np.full((ny, nx), -1000.0, np.float32)
        for value, (cx, cy, cz), (ax, ay, az) in organs:
            inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1
            hu[inside] = value
        hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
        volume[k] = np.clip(hu, -1024, 3071)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(-fov[0] / 2), float(-fov[1] / 2), float(-fov[2])])
    sitk.WriteImage(image, str(path), useCompression=True)


def measured(kind: str, spec: dict, workdir: Path, run_name: str,
             profile_to: Path | None) -> dict:
    """Run one path, optionally cProfiled (then the time includes profiler overhead)."""
    run = transferseg_path if kind == "transferseg" else monai_path
    output = workdir / f"{run_name.rsplit('-', 1)[0]}.nii.gz"
    stages, start, end, fields = measure.timed_on_device(run, spec, workdir, output, profile_to, 30)
    return {"work_start": start, "work_s": end - start, "stages_s": stages, **fields}


def transferseg_path(spec: dict, workdir: Path, output: Path) -> dict:
    """The product path: exactly what a user runs on the command line."""
    from TransferSegLib import cli

    status = cli.main([
        "segment", "--model", str(workdir / "model.safetensors"),
        "--image", str(workdir / "ct.nii.gz"), "--output", str(output),
        "--device", spec["device"], "--batch-size", str(spec["batch_size"]),
        "--overlap", str(spec["overlap"]), "--overwrite", "--quiet",
    ])
    if status != 0:
        raise SystemExit(f"transferseg segment failed with exit status {status}")
    return {}


def monai_path(spec: dict, workdir: Path, output: Path) -> dict:
    """The baseline a MONAI tutorial would write, timed stage by stage."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet
    from safetensors.torch import load_file

    device = torch.device(spec["device"])
    stages = {}

    def lap(name: str, since: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        stages[name] = now - since
        return now

    now = time.perf_counter()
    image = sitk.ReadImage(str(workdir / "ct.nii.gz"))
    now = lap("read", now)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=len(LABELS), **NETWORK)
    model.load_state_dict(load_file(str(workdir / "model.safetensors")))
    model = model.to(device).eval()
    now = lap("model", now)
    lo, hi = CT_WINDOW
    volume = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))
    inputs = ((volume.clamp(lo, hi) - lo) / (hi - lo))[None, None].to(device)  # (1, 1, Z, Y, X)
    del volume
    now = lap("preprocess", now)
    roi = tuple(reversed(spec["patch"]))  # (x, y, z) -> (z, y, x)
    with torch.inference_mode():
        logits = sliding_window_inference(inputs, roi_size=roi, sw_batch_size=spec["batch_size"],
                                          predictor=model, overlap=spec["overlap"],
                                          mode="gaussian")
        now = lap("sliding_window", now)
        label = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
    del logits
    now = lap("argmax", now)
    segmentation = sitk.GetImageFromArray(label)
    segmentation.CopyInformation(image)
    sitk.WriteImage(segmentation, str(output), useCompression=True)
    lap("write", now)
    return stages


def compare(workdir: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(workdir / f"{name}.nii.gz")))
            for name in PATHS)
    if a.shape != b.shape:
        return {"agreement": 0.0}
    return {"agreement": float(np.count_nonzero(a == b) / a.size)}


if __name__ == "__main__":
    sys.exit(main())
