"""The child side of a job: ``python -m TransferSegLib run job.json`` runs the job a folder
holds (:mod:`TransferSegLib.jobs` describes the folder) and reports its progress as events
(:mod:`TransferSegLib.events`), one JSON line each on stdout. The only part of the job
machinery that needs torch.

Exit status: 0 done, 2 a problem the user can fix, 3 cancelled, 1 a crash (its traceback on
stderr). A job stops cleanly when its folder's ``cancel`` file appears (between training
steps, between segmented cases) or on SIGTERM/SIGINT/SIGBREAK.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from TransferSegLib import events as ev
from TransferSegLib.errors import InputError, TransferSegError
from TransferSegLib.events import to_line
from TransferSegLib.jobs import (
    CANCEL_FILE,
    EXIT_CANCELLED,
    EXIT_CRASH,
    EXIT_DONE,
    EXIT_USER_ERROR,
    TRAIN_SETTINGS,
    Emit,
    Job,
    read_job,
)
from TransferSegLib.names import unique_name
from TransferSegLib.process import STOP_SIGNALS


class _JobWatch:
    """Notices when the job file or folder is deleted or edited while the job runs."""

    def __init__(self, path: Path):
        self.path = path
        self.stamp = self._stamp()

    def _stamp(self) -> tuple | None:
        try:
            info = self.path.stat()
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns, digest

    def problem(self) -> str | None:
        """A sentence saying what happened to the job, or None if it is untouched."""
        if self.stamp is None:  # there was no job file to watch: reading it said so
            return None
        try:
            info = self.path.stat()
        except OSError:
            place = "job folder" if not self.path.parent.exists() else "job file"
            where = self.path.parent if place == "job folder" else self.path
            return (f"The {place} {where} was deleted while the job ran; the job stopped. "
                    "Start it again.")
        if (info.st_ino, info.st_size, info.st_mtime_ns) != self.stamp[:3] \
                and self._stamp() != self.stamp:
            return (f"Job file {self.path} was changed while the job ran; the job stopped. "
                    "Start it again so that it runs what the file now says.")
        return None


class Cancelled(Exception):
    """Raised inside a job when it is asked to stop (SIGTERM, SIGINT)."""


@contextlib.contextmanager
def _cancel_on_signals():
    """SIGTERM/SIGINT (and SIGBREAK, Windows' CTRL_BREAK) raise :class:`Cancelled`, so a job
    stops between two Python steps."""
    def stop(*_: object) -> None:
        raise Cancelled()

    previous = {}
    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_job(job_json: str | os.PathLike, emit: Emit) -> int:
    """Run the job described by ``job_json``, handing each event (a dict) to ``emit``.

    Returns the exit status: 0 done, 2 a problem the user can fix (an ``error`` event says
    which), 3 cancelled, 1 a crash (``error`` event; traceback printed on stderr). Every
    exception ends as an ``error`` event, including the job folder or file being deleted or
    edited while the job runs.
    """
    path = Path(job_json)
    watch: _JobWatch | None = None
    stops_on_file = False  # the trainer watches the cancel file itself

    def checked_emit(event: dict) -> None:
        problem = watch.problem() if watch else None
        if problem:
            raise InputError(problem)
        if stops_on_file and event.get("event") == "case" \
                and (path.parent / CANCEL_FILE).exists():
            raise Cancelled()  # a segmentation or evaluation stops before its next case
        emit(event)

    def report(message: str, **extra) -> None:
        with contextlib.suppress(Exception):  # the reader may be gone: nothing left to tell
            emit(ev.error(message, **extra))

    try:
        watch = _JobWatch(path)  # before reading: an edit right after the read is noticed
        job = read_job(path)
        stops_on_file = job.kind != "finetune"
        runner = {"finetune": _run_finetune, "segment": _run_segment,
                  "evaluate": _run_evaluate}[job.kind]
        return runner(job, checked_emit)
    except Cancelled:
        with contextlib.suppress(Exception):
            emit(ev.cancelled())
        return EXIT_CANCELLED
    except TransferSegError as error:
        problem = watch.problem() if watch else None
        report(problem or str(error))
        return EXIT_USER_ERROR
    except Exception as error:  # a bug, unless the job's files vanished under it
        problem = watch.problem() if watch else None
        if problem:
            report(problem)
            return EXIT_USER_ERROR
        traceback.print_exc(file=sys.stderr)
        report(f"TransferSeg crashed: {type(error).__name__}: {error}", crash=True)
        return EXIT_CRASH


def job_datasets(job: Job):
    """The training and validation datasets of a finetune job, made from its cases (None for
    validation: the trainer splits the training cases itself, as jobs written before
    validation cases existed ask)."""
    from TransferSegLib.datasets import Case, Dataset, LabelTable

    def dataset(cases) -> Dataset:
        return Dataset([Case(c.name, (c.image,), c.label) for c in cases],
                       LabelTable(job.labels), kind="job", source=job.path)

    training = [c for c in job.cases if not c.validation]
    held_out = [c for c in job.cases if c.validation]
    if job.validation == "split":
        return dataset(training), None
    return dataset(training), dataset(held_out or training)


def _run_finetune(job: Job, emit: Emit) -> int:
    from TransferSegLib import recipes, training

    params = job.params
    config = training.TrainConfig(**{k: params[k] for k in TRAIN_SETTINGS if k in params})
    job.output.mkdir(parents=True, exist_ok=True)
    if job.validation == "training":
        emit(ev.message("no case is marked for validation: validation uses the training "
                        "cases, so its Dice says how well they are fitted"))
    data, validation = job_datasets(job)
    # While it trains, the trainer's own handler turns SIGTERM into a clean stop with a saved
    # model; before and after, _cancel_on_signals stops the job.
    with _cancel_on_signals():
        result = recipes.finetune(
            job.path_of("base"), data, job.output, params["strategy"], config,
            val_data=validation, architecture=params["architecture"],
            arguments=params["arguments"], events=emit, terminology=job.terminology,
            resume=params["resume"], overwrite=params["overwrite"],
            cancel_file=job.folder / CANCEL_FILE,
        )
    return EXIT_CANCELLED if result.status == "cancelled" else EXIT_DONE


def _case_files(job: Job, suffix: str) -> dict[str, Path]:
    """Output file per case name, in the job's output folder, with distinct names."""
    taken: set[str] = set()
    outputs = {}
    for case in job.cases:
        outputs[case.name] = job.output / f"{unique_name(case.name, taken)}{suffix}"
    return outputs


def _run_segment(job: Job, emit: Emit) -> int:
    from TransferSegLib import resources
    from TransferSegLib.inference import describe_volumes, segment_file, select_device

    params, start = job.params, time.perf_counter()
    job.output.mkdir(parents=True, exist_ok=True)
    outputs = _case_files(job, ".seg.nrrd")
    device = select_device(params["device"])
    with _cancel_on_signals():
        for index, case in enumerate(job.cases):
            emit(ev.case(case.name, index, len(job.cases), f"segmenting {case.name}"))
            resources.reset(device)
            case_start = time.perf_counter()
            result = segment_file(
                job.path_of("model"), case.image, outputs[case.name],
                overwrite=params["overwrite"], device=params["device"],
                overlap=float(params["overlap"]), batch_size=params["batch_size"],
            )
            found = result.volumes_ml()
            emit(ev.segmented(case.name, str(outputs[case.name]),
                              {str(v): n for v, n in result.labels.items()},
                              volumes_ml=found, summary=describe_volumes(found),
                              seconds=round(time.perf_counter() - case_start, 2),
                              **resources.peak(device)))
    emit(ev.done(outputs=[str(p) for p in outputs.values()],
                 seconds=round(time.perf_counter() - start, 1)))
    return EXIT_DONE


def _run_evaluate(job: Job, emit: Emit) -> int:
    from TransferSegLib import metrics
    from TransferSegLib.volumes import read_label

    params, start = job.params, time.perf_counter()
    job.output.mkdir(parents=True, exist_ok=True)
    outputs = _case_files(job, "_scores.json")
    with _cancel_on_signals():
        for index, case in enumerate(job.cases):
            emit(ev.case(case.name, index, len(job.cases), f"scoring {case.name}"))
            scores = metrics.evaluate(
                read_label(case.prediction), read_label(case.label), job.labels or None,
                prediction_name=f"the prediction of case {case.name!r}",
                reference_name=f"the reference of case {case.name!r}",
                lesion_wise=params["lesion_wise"],
            )
            metrics.write_scores(scores, outputs[case.name], overwrite=params["overwrite"])
            emit(ev.scores(case.name, str(outputs[case.name]),
                           labels=[dataclasses.asdict(score) for score in scores],
                           mean=metrics.mean_scores(scores)))
    emit(ev.done(outputs=[str(p) for p in outputs.values()],
                 seconds=round(time.perf_counter() - start, 1)))
    return EXIT_DONE


def run_job_printing(job_json: str | os.PathLike) -> int:
    """:func:`run_job` with each event printed as one JSON line on stdout (flushed).

    Anything else the job prints goes to stderr, so stdout carries events only.
    """
    stream = sys.stdout

    def emit(event: dict) -> None:
        stream.write(to_line(event))
        stream.flush()

    with contextlib.redirect_stdout(sys.stderr):
        code = run_job(job_json, emit)
    if _started_as_job_process():
        # The job is over and its files are written. Tearing down an interpreter that has
        # loaded torch and MONAI takes seconds, which would delay every finish and cancel.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _started_as_job_process() -> bool:
    """True in a process started as ``python -m TransferSegLib ...`` (as JobProcess does)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "TransferSegLib.__main__"


