"""Progress events: dicts with an ``"event"`` kind, sent as one JSON object per line.

The trainer, the jobs and the download child send them; the command line prints them
(``--events jsonl``) or draws a bar; :class:`TransferSegLib.process.ChildProcess` and the
Slicer panel read them back. Kinds: ``start``, ``step``, ``validation``, ``stage``,
``checkpoint``, ``message``, ``case``, ``segmented``, ``scores``, ``progress``, and one final
``done``, ``cancelled`` or ``error``. Standard library only (the command line's progress bar,
:class:`EventPrinter`, imports tqdm when it first draws).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping

TERMINAL = ("done", "cancelled", "error")  # the last event of a job


def json_safe(value: object) -> object:
    """``value`` with non-finite floats as None and paths as text, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def to_line(event: Mapping) -> str:
    """One event as its JSON line (with the newline)."""
    return json.dumps(json_safe(event), allow_nan=False) + "\n"


def from_line(line: str) -> dict | None:
    """The event a line holds, or None for any other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


# --- the command line's printer of them ----------------------------------------------------------

class EventPrinter:
    """Training events as JSON lines (``--events jsonl``) or a progress bar with messages."""

    def __init__(self, mode: str):
        self.mode, self.bar = mode, None

    def __call__(self, event: dict) -> None:
        if self.mode == "jsonl":
            print(to_line(event), end="", flush=True)
            return
        kind = event["event"]
        if kind == "step":
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=event["steps"], unit="step", dynamic_ncols=True,
                                disable=not sys.stderr.isatty())
            self.bar.n = event["step"]
            self.bar.set_postfix(loss=f"{event['loss']:.4f}")
            self.bar.refresh()
        elif kind == "start":
            print(event["report"])
            print(f"training on {event['device']} ({event['world']} process(es)), "
                  f"{event['cases']} case(s), {event['validation_cases']} for validation")
        elif kind == "validation":
            self._write(f"step {event['step']}: validation Dice {event['dice']:.4f}"
                        + (" (best)" if event["improved"] else ""))
        elif kind in ("message", "stage"):
            self._write(event["message"])
        elif kind in ("done", "cancelled"):
            if self.bar is not None:
                self.bar.close()
            print(f"{event['status']} after {event['step']} steps in {event['seconds']} s; "
                  f"model: {event['model']}")

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)


# --- one constructor per kind: the fields each kind carries -------------------------------------

def start(**fields) -> dict:
    """A training run begins: strategy, device, world, threads, lr, steps, from_step, cases,
    validation_cases, report."""
    return {"event": "start", **fields}


def step(step: int, steps: int, loss: float, **fields) -> dict:
    """Training progress (every 10th step): lr, patches_per_s, eta_s, memory peaks."""
    return {"event": "step", "step": step, "steps": steps, "loss": loss, **fields}


def validation(step: int, dice: float, labels: Mapping[str, float], best: float | None,
               improved: bool) -> dict:
    """A validation round: mean Dice, Dice per label, the best so far."""
    return {"event": "validation", "step": step, "dice": dice, "labels": dict(labels),
            "best": best, "improved": improved}


def stage(step: int, number: int, text: str) -> dict:
    return {"event": "stage", "step": step, "stage": number, "message": text}


def checkpoint(step: int, path: str) -> dict:
    return {"event": "checkpoint", "step": step, "path": path}


def message(text: str) -> dict:
    """Something the user should read (a warning, a choice made for them)."""
    return {"event": "message", "message": text}


def log(text: str, **fields) -> dict:
    """A line a child printed that was not an event."""
    return {"event": "log", "text": text, **fields}


def case(name: str, index: int, count: int, text: str) -> dict:
    """A segment or evaluate job starts on one of its cases."""
    return {"event": "case", "case": name, "index": index, "count": count, "message": text}


def segmented(name: str, path: str, labels: Mapping, **fields) -> dict:
    """One case of a segment job is written: its file, labels, each label's volume in mL
    (``volumes_ml``), what was found and what not (``summary``), seconds and memory peaks."""
    return {"event": "segmented", "case": name, "path": path, "labels": dict(labels), **fields}


def scores(name: str, path: str, **fields) -> dict:
    """One case of an evaluate job is scored."""
    return {"event": "scores", "case": name, "path": path, **fields}


def done(**fields) -> dict:
    """The job finished: model, last, step, best_dice (training) or outputs; seconds."""
    return {"event": "done", "status": fields.pop("status", "done"), **fields}


def cancelled(**fields) -> dict:
    """The job stopped when asked; a training job names the model so far."""
    return {"event": "cancelled", "status": "cancelled", **fields}


def error(text: str, **fields) -> dict:
    return {"event": "error", "message": text, **fields}
