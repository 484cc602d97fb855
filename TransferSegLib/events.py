"""Progress events: dicts with an ``"event"`` kind, sent as one JSON object per line.

The trainer, the jobs and the download child send them; the command line prints them
(``--events jsonl``) or draws a bar; :class:`TransferSegLib.process.ChildProcess` and the
Slicer panel read them back. Kinds: ``start``, ``step``, ``validation``, ``stage``,
``checkpoint``, ``message``, ``case``, ``segmented``, ``scores``, ``progress``, and one final
``done``, ``cancelled`` or ``error``. Standard library only.
"""

from __future__ import annotations

import json
import math
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
