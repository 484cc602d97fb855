"""Reading scans without loading SimpleITK into a long-lived process.

Importing SimpleITK costs a process about 93 MiB of resident memory for good (31 MiB of its
own heap, 61 MiB of its library's pages), a fifth of what the steps of a small network's
training add on a CPU (``bench/training.py``). A training process reads its scans at the start
(and later only when they overflow its case cache), so on Linux it reads them in a short-lived
child (``fork``: nothing to re-import, the arguments need no pickling) that writes its arrays
to a temporary ``.npz`` file and exits; the trainer loads the arrays with
``allow_pickle=False`` and never imports SimpleITK (``bench/README.md``, "Training").

Elsewhere (macOS and Windows, where a forked child of a threaded process is unsafe or
impossible), in a process that has SimpleITK loaded already (nothing to save), in a daemonic
worker process (which may not start children), or with ``TRANSFERSEG_READ_IN_PROCESS=1``, the
work runs in this process: the same result either way.

:data:`sitk` is SimpleITK, imported on first use, for the modules whose functions need it but
which a training process imports.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from TransferSegLib import errors

IN_PROCESS_VARIABLE = "TRANSFERSEG_READ_IN_PROCESS"


class LazyModule:
    """A module imported on the first attribute read (then looked up in ``sys.modules``)."""

    def __init__(self, name: str):
        self.__name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self.__name), attribute)

    def __repr__(self) -> str:
        return f"<module {self.__name!r}, imported on first use>"


sitk = LazyModule("SimpleITK")


def loaded() -> bool:
    """Whether SimpleITK is loaded in this process."""
    return "SimpleITK" in sys.modules


def separate() -> bool:
    """Whether :func:`call` runs its work in a child process (see the module's docstring)."""
    return (sys.platform.startswith("linux") and not loaded()
            and not multiprocessing.current_process().daemon  # may not have children
            and os.environ.get(IN_PROCESS_VARIABLE, "") in ("", "0"))


def call(function: Callable[..., dict[str, np.ndarray]], *args, what: str = "the scans"
         ) -> dict[str, np.ndarray]:
    """``function(*args)``, which returns named numeric arrays, in a child process where
    :func:`separate`, else here. ``what`` names the work in errors.

    A :class:`~TransferSegLib.errors.TransferSegError` in the child is raised here with its
    class and message; any other exception as a ``RuntimeError`` carrying its traceback; a
    child that dies (killed for memory, say) as a ``TransferSegError`` that says so.
    """
    if not separate():
        return function(*args)
    with tempfile.TemporaryDirectory(prefix="transferseg-read-") as folder:
        result, failure = Path(folder) / "result.npz", Path(folder) / "error.json"
        child = multiprocessing.get_context("fork").Process(
            target=_child, args=(function, args, result, failure), daemon=True)
        child.start()
        child.join()
        if failure.exists():
            _raise(json.loads(failure.read_text(encoding="utf-8")), what)
        if child.exitcode != 0 or not result.exists():
            cause = (f"was killed by signal {-child.exitcode}" if child.exitcode < 0
                     else f"exited with status {child.exitcode}")
            raise errors.TransferSegError(
                f"The process reading {what} {cause} (out of memory?); close other programs, "
                f"or set {IN_PROCESS_VARIABLE}=1 to read in the training process.")
        with np.load(result, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}


def _child(function, args, result: Path, failure: Path) -> None:
    try:
        arrays = function(*args)
        partial = result.with_name("partial.npz")
        np.savez(partial, **arrays)
        os.replace(partial, result)
    except BaseException as error:  # noqa: BLE001 (everything goes back to the parent)
        failure.write_text(json.dumps({
            "type": type(error).__name__, "module": type(error).__module__,
            "message": str(error), "traceback": traceback.format_exc()}), encoding="utf-8")


def _raise(failure: dict, what: str) -> None:
    kind = getattr(errors, failure["type"], None)
    if failure["module"] == errors.__name__ and isinstance(kind, type) and \
            issubclass(kind, errors.TransferSegError):
        raise kind(failure["message"])
    if failure["type"] == "MemoryError":
        raise MemoryError(f"Reading {what}: {failure['message']}")
    raise RuntimeError(f"Reading {what} failed in its child process:\n{failure['traceback']}")
