"""Measuring helpers shared by the benchmarks: the machine, package versions, memory peaks,
ratios and atomic result files. Standard library only at import time, so a parent process
that measures children keeps its own memory peak small."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

MIB = 2**20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def own_peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MIB if sys.platform == "darwin" else 1024)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def add_common_arguments(parser, results: Path, kinds: tuple[str, ...], profile_file: str,
                         workdir_holds: str) -> None:
    """The options every paired benchmark has: --profile, --results, --workdir, and the
    hidden --worker (one of ``kinds``) and --spec by which the parent starts its children."""
    parser.add_argument("--profile", action="store_true",
                        help="then cProfile each path once more (untimed); writes "
                             f"<results>/{profile_file}")
    parser.add_argument("--results", type=Path, default=results, help="folder for the results")
    parser.add_argument("--workdir", type=Path,
                        help=f"folder for {workdir_holds} (default: a temporary one)")
    parser.add_argument("--worker", choices=kinds, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)


def ratios(ours: dict, theirs: dict, fields: dict[str, str]) -> dict[str, float | None]:
    """``{name: ratio(ours[field], theirs[field])}`` for each ``name: field`` of ``fields``."""
    return {name: ratio(ours[field], theirs[field]) for name, field in fields.items()}


def call_profiled(function, *args, profile_to: Path | None = None, tottime_rows: int = 30):
    """``function(*args)``; with ``profile_to``, run under cProfile and write its report there
    (the 60 costliest calls by cumulative time, then ``tottime_rows`` by own time)."""
    if profile_to is None:
        return function(*args)
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(function, *args)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(tottime_rows)
    profile_to.parent.mkdir(parents=True, exist_ok=True)
    profile_to.write_text(text.getvalue(), encoding="utf-8")
    return result


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then move the file into place in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # *.tmp: git-ignored
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def resolved_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --- the parent's side: one fresh child process per measured run --------------------------------

RESULT_PREFIX = "BENCH-RESULT "  # the line on which a child prints its report
# A run during which other processes kept more than this many cores busy on average is marked
# disturbed: torch's threads then wait for each other and step times grow many fold.
DISTURBED_CORES = 0.25


def busy_cpu_s() -> float | None:
    """CPU seconds spent by all processes since boot (Linux ``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text(encoding="utf-8").split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cores_busy(seconds: float) -> float | None:
    """How many cores all processes kept busy, on average, over the next ``seconds``."""
    before = busy_cpu_s()
    time.sleep(seconds)
    after = busy_cpu_s()
    return None if before is None or after is None else round((after - before) / seconds, 2)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc/<pid>/task/*/children``)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(v) for v in task.read_text(encoding="utf-8").split()]
            except (OSError, ValueError):
                pass
    return found


def tree_pss_mib(pid: int) -> float | None:
    """The proportional set size of ``pid`` and its descendants together: each page they
    share (a DataLoader worker's inherited pages) counted once, not once per process; None
    where ``/proc/<pid>/smaps_rollup`` cannot be read."""
    total, seen = 0, False
    for process in _descendants(pid):
        try:
            text = Path(f"/proc/{process}/smaps_rollup").read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total, seen = total + int(line.split()[1]), True
                break
    return total / 1024 if seen else None


class TreeMemory:
    """Samples :func:`tree_pss_mib` of a process tree every ``interval`` s in a thread; the
    largest sample is ``peak`` (None if none could be read). A sample, not a high-water mark:
    a peak shorter than the interval can be missed."""

    def __init__(self, pid: int, interval: float = 0.2):
        import threading

        self.peak: float | None = None
        self._pid, self._interval, self._stop = pid, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            value = tree_pss_mib(self._pid)
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_child(script: str | Path, kind: str, spec: Path, run_name: str = "") -> dict:
    """Run ``script`` as ``--worker kind`` in a fresh interpreter; its report, wall time, CPU
    time, peak RSS and how busy the other cores were. The child is reaped with ``os.wait4``
    so its resource usage can be read (that of its own children, e.g. DataLoader workers,
    included: they are joined before it exits; ``ru_maxrss`` is then the largest single
    process, not their sum). ``tree_pss_peak_mib`` is their sum, sampled
    (:class:`TreeMemory`)."""
    command = [sys.executable, str(Path(script).resolve()), "--worker", kind, "--spec",
               str(spec), "--run-name", run_name]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy_before = busy_cpu_s()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    tree = TreeMemory(child.pid)
    output = child.stdout.read()
    child.stdout.close()
    tree_peak = tree.stop()  # the child has closed its output: its work is done
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    busy_after = busy_cpu_s()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode != 0 or not lines:
        sys.stdout.write(output)
        raise SystemExit(f"worker {kind} failed with exit status {child.returncode}")
    report = json.loads(lines[-1][len(RESULT_PREFIX):])
    report["run"] = run_name
    report["process_wall_s"] = wall
    report["cpu_s"] = usage.ru_utime + usage.ru_stime
    report["load_before"] = load
    report["involuntary_switches"] = usage.ru_nivcsw  # preempted: other work wanted the cores
    if busy_before is not None and busy_after is not None:
        # Cores kept busy by everything but the child while it ran (its own CPU time taken off).
        other = max(0.0, busy_after - busy_before - report["cpu_s"])
        report["other_cores"] = other / wall
        report["disturbed"] = report["other_cores"] > DISTURBED_CORES
    # Linux reports KiB, macOS bytes.
    report["peak_rss_mib"] = usage.ru_maxrss / (MIB if sys.platform == "darwin" else 1024)
    report["tree_pss_peak_mib"] = tree_peak
    return report


def paired_runs(script: str | Path, spec: Path, paths: tuple[str, ...], repeats: int,
                describe, profile: bool = False) -> tuple[dict[str, list[dict]], float]:
    """``repeats`` runs of each of ``paths`` (a child each, :func:`run_child`), the order
    reversed every other round so that neither path always runs second; ``describe(report)``
    is printed after each run. With ``profile``, one more run each under the profiler, apart
    from the timed ones. Returns the reports per path and this process's own peak RSS."""
    orchestrator_rss = own_peak_rss_mib()
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for repeat in range(repeats):
        for name in paths if repeat % 2 == 0 else paths[::-1]:
            report = run_child(script, name, spec, run_name=f"{name}-{repeat}")
            runs[name].append(report)
            print(f"{name:<12} run {repeat + 1}: {describe(report)}", flush=True)
    orchestrator_rss = max(orchestrator_rss, own_peak_rss_mib())
    if profile:  # separate runs: the profiler's overhead must not reach the timings
        for name in paths:
            run_child(script, name, spec, run_name=f"{name}-profile")
            print(f"{name:<12} profiled", flush=True)
    return runs, orchestrator_rss


def header(benchmark: str, prepared: dict, packages: tuple[str, ...]) -> dict:
    """What every result file starts with: the benchmark's title, when and how it ran, the
    machine (``prepared``: the device, GPU and torch threads a child reported) and the
    versions of the software (python, the platform, and ``packages``)."""
    return {
        "benchmark": benchmark,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
                     **{key: prepared[key] for key in ("device", "gpu", "torch_threads")}},
        "software": {"python": platform.python_version(),
                     **{p: version("TransferSegLib" if p == "transferseg" else p)
                        for p in packages},
                     # a dev-only dependency that `import monai` loads where it is installed
                     # (53 MiB more in every process of both paths): None in a user's install
                     "pytorch-ignite": version("pytorch-ignite"),
                     "platform": platform.platform()},
    }


def save_figure(figure, path: Path, title: str) -> None:
    """Title ``figure``, lay it out, write it to ``path`` as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


def write_results(result: dict, results: Path, stem: str, plot) -> None:
    """``results/<stem>.json`` (atomically) and ``plot(result, results/<stem>.png)``."""
    json_path, png_path = results / f"{stem}.json", results / f"{stem}.png"
    write_atomically(json_path, lambda t: t.write_text(json.dumps(result, indent=2) + "\n"))
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")


# --- the child's side ----------------------------------------------------------------------------

def serve_worker(args, measured_run, **other_kinds) -> int:
    """The child's main: ``--worker`` names either one of ``other_kinds`` (``kind(spec,
    workdir) -> report``, e.g. preparing the inputs) or a measured path, run by
    ``measured_run(kind, spec, workdir, run_name, profile_to)``; the report is printed on the
    :data:`RESULT_PREFIX` line. A run named ``*-profile`` is cProfiled into the spec's
    ``profile_dir`` as ``<profile_stem>-<kind>.txt``."""
    start = time.perf_counter()
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    workdir = Path(spec["workdir"])
    if args.worker in other_kinds:
        report = other_kinds[args.worker](spec, workdir)
    else:
        profile_to = None
        if args.run_name.endswith("-profile"):
            profile_to = Path(spec["profile_dir"]) / f"{spec['profile_stem']}-{args.worker}.txt"
        report = measured_run(args.worker, spec, workdir, args.run_name, profile_to)
        report["imports_s"] = report.pop("work_start") - start  # the script's own set-up
    print(RESULT_PREFIX + json.dumps(report), flush=True)
    return 0


def timed_on_device(run, spec: dict, workdir: Path, output: Path, profile_to: Path | None,
                    tottime_rows: int) -> tuple:
    """``run(spec, workdir, output)``, optionally cProfiled, with CUDA's peak statistics reset
    before and read after: (its value, start, end, report fields: VmHWM and GPU peaks)."""
    import torch

    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(spec["device"]))
    start = time.perf_counter()
    value = call_profiled(run, spec, workdir, output, profile_to=profile_to,
                          tottime_rows=tottime_rows)
    if cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    fields = {"vm_hwm_mib": vm_hwm_mib()}
    if cuda:
        device = torch.device(spec["device"])
        fields["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        fields["gpu_peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MIB
    return value, start, end, fields
