"""The TransferSeg module's state that needs neither Qt nor a running Slicer.

The widget shows these values and the logic feeds them; keeping them here lets pytest check
them without Slicer:

- :class:`JobMonitor`: a job's JSON events -> state, progress, loss and Dice curves, log lines,
  and what the Start/Cancel button says;
- :func:`match_segments`, :func:`training_labels`, :func:`relabel`: the user's segment names ->
  the labels a model is trained on (matched by name as head surgery does);
- :func:`dice_colour`: a Dice value -> a colour from red (0) over amber to green (1);
- :class:`RoundHistory`: the annotate loop's rounds and every case's Dice per round, so a case
  that gets worse after a later round (forgetting) shows;
- small helpers for the catalog list, the GPU line, requirements and the child's Python.

Only the standard library, numpy and TransferSegLib's torch-free ``strategies`` are imported
here.
"""

from __future__ import annotations

import colorsys
import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from TransferSegLib.names import normalised, unique_name  # noqa: F401 (the library's rules)
from TransferSegLib.strategies import STRATEGIES  # the library's one tuple (torch-free)

DEVICES = ("auto", "cuda", "cpu")
IGNORE = ""  # a segment mapped to this label is left out of training
BACKGROUND = "background"
# Packages Slicer or the PyTorch extension own: the module never installs or upgrades them.
CORE_PACKAGES = ("torch", "simpleitk", "numpy")
# The Slicer releases the module supports: the library needs Python 3.10 (Slicer 5.8 has 3.9).
SUPPORTED_SLICER = "Slicer 5.10 or newer"
PYTHON_MINIMUM = (3, 10)


# --- segment names -> model labels ---------------------------------------------------------------

def match_segments(segment_names: Iterable[str], model_labels: Mapping[int, str]) -> dict:
    """Each segment name -> the model label of the same name, or the segment's own name.

    A segment whose name matches no model label becomes a new label of that name (head
    surgery gives it a new output channel). A segment named like the background is ignored.
    """
    by_name = {normalised(name): name for value, name in model_labels.items() if int(value)}
    mapping = {}
    for segment in segment_names:
        key = normalised(segment)
        mapping[segment] = IGNORE if key == BACKGROUND else by_name.get(key, segment.strip())
    return mapping


def training_labels(mapping: Mapping[str, str], model_labels: Mapping[int, str]) -> dict:
    """The label table ``{value: name}`` a training job gets for ``mapping``.

    Background is 0; labels the model already has come first in the model's channel order
    (so the matched channels keep their place), then the new ones in the order met.
    """
    wanted = [name for name in mapping.values() if name != IGNORE]
    folded = {normalised(name) for name in wanted}
    names = [name for value, name in sorted(model_labels.items())
             if int(value) and normalised(name) in folded]
    for name in wanted:
        if normalised(name) not in {normalised(n) for n in names}:
            names.append(name)
    return {0: BACKGROUND, **{value: name for value, name in enumerate(names, start=1)}}


def relabel(segment_values: Mapping[int, str], mapping: Mapping[str, str],
            labels: Mapping[int, str]) -> dict[int, int]:
    """Old label-map value -> new value, for one case exported as ``{value: segment name}``.

    Segments mapped to :data:`IGNORE` (or not in ``mapping``) become background (0).
    """
    value_of = {normalised(name): value for value, name in labels.items()}
    lookup = {}
    for value, segment in segment_values.items():
        target = mapping.get(segment, IGNORE)
        lookup[int(value)] = value_of.get(normalised(target), 0) if target != IGNORE else 0
    return lookup


def relabel_array(array, lookup: Mapping[int, int]):
    """``array`` (integer label map) with every value replaced as ``lookup`` says; others 0."""
    import numpy as np

    top = max([int(array.max(initial=0)), *lookup.keys()]) if array.size else 0
    table = np.zeros(top + 1, dtype=np.uint16)
    for old, new in lookup.items():
        table[int(old)] = new
    return table[array]


def unmatched(mapping: Mapping[str, str], model_labels: Mapping[int, str]) -> list[str]:
    """Training label names the model does not have yet (they get new output channels)."""
    known = {normalised(name) for name in model_labels.values()}
    return sorted({name for name in mapping.values()
                   if name != IGNORE and normalised(name) not in known})


def match_by_name(names: Mapping[int, str], reference: Mapping[int, str]) -> dict[int, int]:
    """Value in one label map -> value of the same-named label in another (0 where none)."""
    value_of = {normalised(name): value for value, name in reference.items()}
    return {int(value): int(value_of.get(normalised(name), 0)) for value, name in names.items()}


def fine_tuned_id(base: str, strategy: str, taken: Iterable[str]) -> str:
    """A registry id for a newly fine-tuned model: ``<base>-<strategy>-<n>``, n = 1, 2, ...

    A base that is itself such a model gives its own base's name, so that rounds of the
    annotate loop count up (``liver-finetune-2``) instead of growing the id."""
    base = re.sub(rf"-({'|'.join(STRATEGIES)})-\d+$", "", base or "new")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{strategy}").strip("-")
    taken = set(taken)
    number = 1
    while f"{stem}-{number}" in taken:
        number += 1
    return f"{stem}-{number}"


# --- colours -------------------------------------------------------------------------------------

def dice_colour(dice: float | None) -> tuple[int, int, int]:
    """A Dice value in [0, 1] -> RGB (0..255): red at 0, amber at 0.5, green at 1; grey if None."""
    if dice is None or not math.isfinite(dice):
        return (160, 160, 160)
    value = min(max(float(dice), 0.0), 1.0)
    red, green, blue = colorsys.hsv_to_rgb(value / 3.0, 0.8, 0.85)  # hue 0 deg -> 120 deg
    return (round(red * 255), round(green * 255), round(blue * 255))


def progress_bar_style(rgb: Sequence[int]) -> str:
    """A Qt style sheet that paints a progress bar's filled part in ``rgb``."""
    colour = "".join(f"{int(c):02x}" for c in rgb)
    return f"QProgressBar::chunk {{ background-color: #{colour}; }}"


# --- job events -> what the panel shows ----------------------------------------------------------

IDLE, RUNNING, CANCELLING, DONE, CANCELLED, FAILED = (
    "idle", "running", "cancelling", "done", "cancelled", "failed")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class JobMonitor:
    """Follows one job through its events (see ``TransferSegLib.jobs``).

    ``update(events)`` returns the log lines the events produce; the attributes say what to
    show: ``state`` (idle, running, cancelling, done, cancelled, failed), ``percent``,
    ``losses`` and ``dices`` as ``[(step, value)]``, the last validation's ``dice`` and
    ``per_label`` Dice, ``model`` (the file a training job wrote), ``outputs`` (case name ->
    file a segmentation job wrote), ``gpu_peak_gb`` (the job's GPU memory peak so far, None
    off the GPU), ``error``.
    ``log`` keeps the last ``log_limit`` lines.
    """

    def __init__(self, kind: str = "finetune", log_limit: int = 2000):
        self.kind = kind
        self.log: deque[str] = deque(maxlen=log_limit)
        self.reset()

    def reset(self, steps: int = 0) -> None:
        self.state = IDLE
        self.step, self.steps, self.stage = 0, steps, 1
        self.losses: list[tuple[int, float]] = []
        self.dices: list[tuple[int, float]] = []
        self.dice: float | None = None
        self.best_dice: float | None = None
        self.per_label: dict[str, float] = {}
        self.eta_s: float | None = None
        self.model: str | None = None
        self.outputs: dict = {}
        self.error: str | None = None
        self.done_event: dict = {}
        self.gpu_peak_gb: float | None = None

    def start(self, steps: int = 0) -> None:
        self.reset(steps)
        self.state = RUNNING
        self.log.clear()

    @property
    def active(self) -> bool:
        return self.state in (RUNNING, CANCELLING)

    @property
    def percent(self) -> int:
        if self.state == DONE:
            return 100
        return int(100 * self.step / self.steps) if self.steps else 0

    @property
    def button_text(self) -> str:
        return {RUNNING: "Cancel", CANCELLING: "Cancelling..."}.get(self.state, "Start")

    @property
    def status(self) -> str:
        """One line for the panel: where the job is and how long it still needs."""
        gpu = f", GPU peak {self.gpu_peak_gb:.1f} GB" if self.gpu_peak_gb is not None else ""
        if self.state == RUNNING and self.steps:
            line = f"step {self.step} / {self.steps}"
            if self.eta_s is not None:
                line += f", about {_duration(self.eta_s)} left"
            return line + gpu
        if self.state == DONE and self.best_dice is not None:
            return f"done; best validation Dice {self.best_dice:.3f}{gpu}"
        if self.state == DONE and gpu:
            return f"done{gpu}"
        if self.state == FAILED:
            return f"failed: {self.error}"
        return self.state

    def request_cancel(self) -> None:
        if self.state == RUNNING:
            self.state = CANCELLING

    def update(self, events: Iterable[Mapping]) -> list[str]:
        lines = []
        for event in events:
            line = self._apply(event)
            if line:
                lines.append(line)
                self.log.append(line)
        return lines

    def finish(self, returncode: int | None, tail: str = "") -> list[str]:
        """The process ended: a job that sent no final event failed (crash, out of memory)."""
        if not self.active:
            return []
        if self.state == CANCELLING:
            return self.update([{"event": "cancelled"}])
        message = f"the job stopped unexpectedly (exit status {returncode})"
        if tail.strip():
            message += ": " + tail.strip().splitlines()[-1]
        return self.update([{"event": "error", "message": message}])

    def _apply(self, event: Mapping) -> str | None:
        kind = event.get("event")
        if event.get("gpu_peak_gb") is not None:
            self.gpu_peak_gb = max(float(event["gpu_peak_gb"]), self.gpu_peak_gb or 0.0)
        if kind == "start":
            self.steps = int(event.get("steps") or self.steps)
            self.step = int(event.get("from_step") or 0)
            where = event.get("device", "?")
            report = event.get("report")
            return f"started on {where}" + (f"\n{report}" if report else "")
        if kind == "step":
            self.step, self.steps = int(event["step"]), int(event.get("steps") or self.steps)
            self.eta_s = event.get("eta_s")
            if event.get("loss") is not None:
                self.losses.append((self.step, float(event["loss"])))
            return None  # too many for the log; the curve shows them
        if kind == "validation":
            self.dice = float(event["dice"])
            self.dices.append((int(event.get("step", self.step)), self.dice))
            if self.best_dice is None or self.dice > self.best_dice:
                self.best_dice = self.dice
            self.per_label = dict(event.get("labels") or {})
            labels = ", ".join(f"{name} {value:.3f}" for name, value in self.per_label.items())
            return (f"step {event.get('step', self.step)}: validation Dice {self.dice:.3f}"
                    + (f" ({labels})" if labels else ""))
        if kind == "stage":
            self.stage = int(event.get("stage", self.stage + 1))
            return event.get("message") or f"stage {self.stage}"
        if kind in ("log", "message", "case"):
            return str(event.get("message") or event.get("text") or "")
        if kind == "segmented":  # one case of a segmentation job is written
            self.outputs[str(event["case"])] = str(event["path"])
            cost = [f"{event['seconds']:.1f} s"] if event.get("seconds") is not None else []
            if event.get("gpu_peak_gb") is not None:
                cost.append(f"GPU peak {event['gpu_peak_gb']:.1f} GB")
            return f"segmented {event['case']}" + (f" ({', '.join(cost)})" if cost else "")
        if kind == "progress":  # a download: bytes so far of a total (None: unknown)
            self.step, self.steps = int(event.get("done") or 0), int(event.get("total") or 0)
            return None
        if kind == "checkpoint":
            return None
        if kind == "done":
            self.state, self.done_event = DONE, dict(event)
            self.model = event.get("model", self.model)
            if event.get("best_dice") is not None:
                self.best_dice = float(event["best_dice"])
            seconds = event.get("seconds")
            return "done" + (f" in {_duration(seconds)}" if seconds is not None else "")
        if kind == "cancelled":
            self.state, self.done_event = CANCELLED, dict(event)
            self.model = event.get("model", self.model)
            return "cancelled" + (f"; model so far: {self.model}" if self.model else "")
        if kind == "error":
            self.state, self.error = FAILED, str(event.get("message", "unknown error"))
            return f"error: {self.error}"
        return None


def job_outputs(monitor: JobMonitor, names: Sequence[str]) -> list[str]:
    """The file a finished segmentation job wrote for each case in ``names``, in that order:
    from its ``segmented`` events, else from the ``outputs`` list (case order) of ``done``."""
    listed = monitor.done_event.get("outputs")
    if all(name in monitor.outputs for name in names):
        return [monitor.outputs[name] for name in names]
    if isinstance(listed, list) and len(listed) == len(names):
        return [str(path) for path in listed]
    raise ValueError("The segmentation job finished without naming its output files; see "
                     "the log above.")


# --- the annotate loop ---------------------------------------------------------------------------

class RoundHistory:
    """Rounds of segment -> correct -> add -> fine-tune, and each case's Dice per round.

    Round ``n`` is the model after the ``n``-th fine-tuning. A case's row shows its Dice under
    every round's model, so a validation case whose Dice falls after a later round (the model
    forgetting it) stands out.
    """

    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.scores: dict[str, dict[int, float]] = {}

    @property
    def current(self) -> int:
        return len(self.rounds)

    def begin(self, model: str, training_cases: Sequence[str]) -> int:
        self.rounds.append({"model": model, "training_cases": list(training_cases)})
        return self.current

    def record(self, round_number: int, case: str, dice: float) -> None:
        if not 1 <= round_number <= self.current:
            raise ValueError(f"There is no round {round_number}; rounds run 1..{self.current}.")
        self.scores.setdefault(case, {})[round_number] = float(dice)

    def forgetting(self, tolerance: float = 0.02) -> dict[str, tuple[float, float]]:
        """Cases whose latest Dice is more than ``tolerance`` below their best earlier one."""
        found = {}
        for case, by_round in self.scores.items():
            ordered = [by_round[r] for r in sorted(by_round)]
            if len(ordered) > 1 and max(ordered[:-1]) - ordered[-1] > tolerance:
                found[case] = (max(ordered[:-1]), ordered[-1])
        return found

    def table(self) -> tuple[list[str], list[list]]:
        """Header and rows: case, Dice per round (None where not scored), change from best."""
        header = ["case", *[f"round {n}" for n in range(1, self.current + 1)], "change"]
        rows = []
        for case, by_round in self.scores.items():
            values = [by_round.get(n) for n in range(1, self.current + 1)]
            scored = [by_round[r] for r in sorted(by_round)]
            change = scored[-1] - max(scored[:-1]) if len(scored) > 1 else None
            rows.append([case, *values, change])
        return header, rows


SCORE_HEADER = ["segment", "Dice", "HD95 (mm)", "volume (mL)", "reference volume (mL)"]


def score_rows(scores: Sequence[Mapping], mean: Mapping) -> tuple[list[str], list[list]]:
    """The Evaluate table: one row per label (``metrics.LabelScore`` as dicts), then the mean.

    A label the reference does not contain is marked and left out of the mean (as
    ``metrics.mean_scores`` does).
    """
    rows = [[s["name"] + ("" if s.get("present", True) else " (not in reference)"),
             s["dice"], s["hd95_mm"], s["volume_pred_ml"], s["volume_ref_ml"]] for s in scores]
    rows.append([f"mean of {mean.get('labels', len(scores))}", mean.get("dice"),
                 mean.get("hd95_mm"), None, None])
    return list(SCORE_HEADER), rows


# --- the model catalog ---------------------------------------------------------------------------

def _words(model: Mapping) -> str:
    labels = model.get("labels") or {}
    names = labels.values() if isinstance(labels, Mapping) else labels
    fields = [model.get(key, "") for key in ("id", "title", "modality", "anatomy", "task",
                                             "kind", "licence")]
    return " ".join(str(f) for f in [*fields, *names]).casefold()


def catalog_labels(labels) -> dict[int, str]:
    """A catalog entry's labels as ``{channel: name}`` with the background at 0: from
    ``{"1": "liver", ...}`` or a list of foreground names."""
    if isinstance(labels, Mapping):
        table = {int(value): str(name) for value, name in labels.items()}
    else:
        table = dict(enumerate(labels or [], start=1))
    return {0: table.pop(0, BACKGROUND), **dict(sorted(table.items()))}


def shared_labels(names: Mapping[int, str], reference: Mapping[int, str]) -> dict[int, str]:
    """The labels of ``reference`` (``{value: name}``) that ``names`` also has, by name."""
    wanted = {normalised(name) for name in names.values()}
    return {value: name for value, name in reference.items()
            if int(value) and normalised(name) in wanted}


def filter_models(models: Iterable[Mapping], text: str) -> list[Mapping]:
    """The models whose id, title, modality, anatomy, task or labels contain every word."""
    words = text.casefold().split()
    return [m for m in models if all(w in _words(m) for w in words)]


def model_line(model: Mapping) -> str:
    """One line for the catalog list: title, modality, and whether it is here already."""
    title = model.get("title") or model.get("id", "?")
    tags = [model.get("modality") or "", "fine-tuned" if model.get("kind") == "fine-tuned"
            else "", "" if model.get("cached") else "not downloaded"]
    tags = [t for t in tags if t]
    return f"{title}  [{', '.join(tags)}]" if tags else title


def model_details(model: Mapping) -> str:
    """HTML for the details pane of one catalog entry."""
    from html import escape

    labels = model.get("labels") or {}
    names = [n for v, n in sorted(labels.items(), key=lambda i: int(i[0])) if int(v)] \
        if isinstance(labels, Mapping) else list(labels)
    rows = [
        ("Modality", model.get("modality", "")),
        ("Anatomy", model.get("anatomy", "")),
        ("Task", model.get("task", "")),
        ("Labels", f"{len(names)}: " + ", ".join(names) if names else "-"),
        ("Licence", model.get("licence", "")),
        ("Kind", model.get("kind", "")),
        ("On this computer", "yes" if model.get("cached") else "no (fetch it first)"),
        ("Checksum verified", "yes" if model.get("verified") else "no"),
    ]
    title = escape(str(model.get("title") or model.get("id", "")))
    body = "".join(f"<tr><td><b>{escape(k)}</b></td><td>{escape(str(v))}</td></tr>"
                   for k, v in rows if v != "")
    return f"<h3>{title}</h3><table>{body}</table>"


# --- the computer --------------------------------------------------------------------------------

def parse_nvidia_smi(text: str) -> list[tuple[str, float]]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``.

    Returns ``[(name, memory in GiB)]``; lines that do not parse are skipped.
    """
    gpus = []
    for line in text.splitlines():
        name, _, memory = line.rpartition(",")
        try:
            gpus.append((name.strip(), float(memory) / 1024.0))
        except ValueError:
            continue
    return [(n, m) for n, m in gpus if n]


def gpu_description(gpus: Sequence[tuple[str, float]]) -> str:
    """The line beside the device choice: which GPU training would use, or that there is none."""
    if not gpus:
        return "No NVIDIA GPU found: training and segmentation run on the CPU (slower)."
    name, memory = gpus[0]
    more = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
    return f"GPU: {name}, {memory:.1f} GiB{more}"


def job_python(executable: str, which: Callable[[str], str | None],
               exists: Callable[[str], bool] = os.path.exists) -> str:
    """The Python a job runs in: Slicer's ``PythonSlicer`` where there is one.

    Inside Slicer ``sys.executable`` may be the application itself; its Python interpreter
    ``PythonSlicer`` lies beside it (or is on the PATH the launcher sets).
    """
    base = Path(executable)
    if base.name.lower().startswith("pythonslicer"):
        return str(base)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = base.with_name(name)
        if exists(str(candidate)):
            return str(candidate)
    return which("PythonSlicer") or executable


def job_environment(base: Mapping[str, str], library_root: str) -> dict[str, str]:
    """``base`` with ``library_root`` (the folder holding ``TransferSegLib``) first on
    PYTHONPATH, so the child imports the same library as the module."""
    env = dict(base)
    paths = [library_root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- requirements --------------------------------------------------------------------------------

def requirement_name(line: str) -> str:
    """The normalised distribution name a requirement line asks for ("" for none)."""
    line = line.split("#", 1)[0].strip()
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def read_requirements(text: str) -> list[str]:
    """The requirement lines of a requirements.txt, without comments and blank lines."""
    return [line.split("#", 1)[0].strip() for line in text.splitlines()
            if line.split("#", 1)[0].strip()]


# Packages an importer needs only for some weight files, installed (after asking) when such a
# model is fetched or imported: the ranges of pyproject.toml's "import" extra.
IMPORT_PACKAGES = {".onnx": "onnx>=1.14,<2", ".h5": "h5py>=3.8,<4"}


def import_requirements(file_names: Iterable[str]) -> list[str]:
    """The requirement lines the weight files ``file_names`` need to be imported."""
    needed = [IMPORT_PACKAGES.get(Path(str(name)).suffix.lower()) for name in file_names]
    return list(dict.fromkeys(line for line in needed if line))


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.5.1+cu121"`` -> ``(2, 5, 1)``: the release numbers of a version string."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


# What each MONAI release asks of torch (their published Requires-Dist): 1.3.x and 1.4.0
# torch>=1.9 (1.4.0 also numpy<2), 1.5.0 torch>=2.4.1,<2.7, 1.5.1 and 1.5.2 torch>=2.4.1,
# 1.6.0 torch>=2.8.0. A MONAI whose floor is above the installed torch would make pip replace
# the torch the PyTorch extension chose (a CUDA build by a CPU one from PyPI on Windows).
TORCH_MINIMUM = (2, 1)


def monai_requirement(torch_version: str) -> str:
    """The MONAI releases TransferSeg may install next to this torch."""
    version = version_tuple(torch_version)
    if version < TORCH_MINIMUM:
        raise ValueError(
            f"TransferSeg needs PyTorch {'.'.join(map(str, TORCH_MINIMUM))} or newer, and "
            f"PyTorch {torch_version} is installed: update it in the PyTorch Utils module "
            "(PyTorch extension), then restart Slicer.")
    if version >= (2, 8):
        return "monai>=1.5.1,<1.7"
    if version >= (2, 4, 1):
        return "monai>=1.5.1,<1.6"
    return "monai>=1.3,<1.5"


def install_requirements(lines: Sequence[str], installed: Mapping[str, str]) -> list[str]:
    """The module's requirement lines with MONAI narrowed to what the installed torch supports."""
    torch = next((v for name, v in installed.items() if requirement_name(name) == "torch"), None)
    if torch is None:
        raise ValueError("PyTorch is not installed yet: install it with the PyTorch extension "
                         "first.")
    return [monai_requirement(torch) if requirement_name(line) == "monai" else line
            for line in lines]


def constraints(installed: Mapping[str, str]) -> str:
    """A pip constraints file holding the core packages at their installed versions, so that
    installing the module's requirements can never replace Slicer's numpy or SimpleITK or the
    PyTorch extension's torch."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items())
                   if requirement_name(name) in CORE_PACKAGES and version)


# The child that downloads a catalog model: zoo.fetch with its progress as JSON lines.
_FETCH = """\
import json, os, sys
from TransferSegLib import zoo

class Cancelled(Exception):
    pass

def progress(*args, **kwargs):
    if sys.argv[3:] and os.path.exists(sys.argv[3]):
        raise Cancelled()  # the partial download is kept and resumed next time
    done, total = (list(args) + [0, None])[:2]
    print(json.dumps({"event": "progress", "done": done, "total": total}), flush=True)

try:
    progress(0, None)  # a cancel that came while this program started
    path = zoo.fetch(sys.argv[1], accept_unverified=sys.argv[2] == "accept", progress=progress)
except Cancelled:
    print(json.dumps({"event": "cancelled", "status": "cancelled"}), flush=True)
    sys.exit(3)
except Exception as error:
    print(json.dumps({"event": "error", "message": str(error)}), flush=True)
    sys.exit(2)
print(json.dumps({"event": "done", "model": str(path)}), flush=True)
"""


def fetch_command(python: str, model_id: str, accept_unverified: bool = False,
                  cancel_file: str | os.PathLike | None = None) -> list[str]:
    """The command that downloads catalog model ``model_id`` in a child process (JSON lines:
    ``progress`` with bytes ``done`` of ``total``, then ``done`` with ``model`` or ``error``;
    ``cancelled`` when ``cancel_file`` appears)."""
    return [python, "-c", _FETCH, model_id, "accept" if accept_unverified else "verified",
            *([str(cancel_file)] if cancel_file is not None else [])]
