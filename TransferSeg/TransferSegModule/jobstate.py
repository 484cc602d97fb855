"""A job's events -> what the panel shows: state, progress, loss and Dice curves, log lines,
memory peaks, what the job's button says, and the Dice bar's colour. No Qt, no Slicer."""

from __future__ import annotations

import colorsys
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence


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
            line = f"segmented {event['case']}" + (f" ({', '.join(cost)})" if cost else "")
            return line + (f": {event['summary']}" if event.get("summary") else "")
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

