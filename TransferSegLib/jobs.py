"""Jobs: a folder that holds a job's inputs and results (this module: writing and reading it,
standard library and SimpleITK only), run in a child process (:mod:`TransferSegLib.jobrunner`)
that reports its progress as JSON lines, started, polled and cancelled by :class:`JobProcess`.

A job folder, as :func:`write_job` makes it::

    job.json                what to do (below); written last, so its presence means the
                            inputs are complete
    inputs/<case>_image.nrrd, inputs/<case>_label.nrrd, inputs/<case>_prediction.nrrd
    output/                 results: model.safetensors (finetune), <case>.seg.nrrd (segment),
                            <case>_scores.json (evaluate)

``job.json``::

    {"format": "transferseg-job", "version": 1, "kind": "finetune",
     "created": "2025-05-04T10:00:00Z", "transferseg": "0.1.0",
     "cases": [{"name": "CT 1", "image": "inputs/CT_1_image.nrrd",
                "label": "inputs/CT_1_label.nrrd"},
               {"name": "CT 2", "image": "inputs/CT_2_image.nrrd",
                "label": "inputs/CT_2_label.nrrd", "validation": true}],
     "labels": {"1": "liver", "2": "spleen"},
     "validation": "held-out",
     "terminology": {"liver": "Segmentation category and type - 3D Slicer General ..."},
     "params": {"base": "/models/ct-base.safetensors", "strategy": "finetune", "steps": 200,
                "lr": 0.001, "device": "auto", "output": "output"}}

The cases travel once: ``cases`` and ``labels`` are what the trainer reads (as a dataset
made in memory by the job runner). ``terminology`` (finetune, optional) gives label names
their Slicer ``TerminologyEntry``; the new model's card keeps them, and its segmentations
carry them. A finetune case with ``"validation": true`` is not trained on: the trainer
validates on it (and keeps its best model by it). ``"validation"`` says which:
``"held-out"`` cases, or, when no case is marked, the ``"training"`` cases themselves.
Relative paths are relative to the job folder. ``python -m TransferSegLib run job.json`` runs
it (:func:`TransferSegLib.jobrunner.run_job`, the only part that needs torch) and prints one
JSON object per line: the trainer's events (``start``,
``step``, ``validation``, ``stage``, ``checkpoint``, ``done``, ``cancelled``, ``message``), per
case ``case``, ``segmented`` or ``scores``, a final ``done`` for segment and evaluate jobs, or
``error`` with a message. Exit status: 0 done, 2 a problem the user can fix, 3 cancelled,
1 a crash (its traceback on stderr).

:class:`JobProcess` starts that command in its own process group, reads its output on two
threads into a queue and hands events out through :meth:`JobProcess.poll`, so a GUI can poll
it from a timer without ever blocking; it imports no Qt. Cancelling writes the job folder's
``cancel`` file first (the job stops by itself and says so), then ends what is left of the
process tree (:mod:`TransferSegLib.process`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from TransferSegLib import __version__
from TransferSegLib.errors import InputError, OutputExistsError
from TransferSegLib.files import atomic_output
from TransferSegLib.names import unique_name
from TransferSegLib.process import ChildProcess, child_environment
from TransferSegLib.settings import json_types
from TransferSegLib.strategies import DEFAULT_STRATEGY

FORMAT = "transferseg-job"
VERSION = 1
KINDS = ("finetune", "segment", "evaluate")
JOB_FILE = "job.json"
INPUTS = "inputs"
CANCEL_FILE = "cancel"  # its appearance stops a job cleanly, as SIGTERM does
ROLES = ("image", "label", "prediction")  # the images a case may carry

EXIT_DONE, EXIT_CRASH, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 1, 2, 3

Emit = Callable[[dict], None]

# Options of each kind in params: name -> (accepted JSON types, default). An option whose
# default is UNSET is left out when not given (the trainer's own default applies).
UNSET = object()
_COMMON = {"output": ((str,), "output"), "overwrite": ((bool,), False)}
# training's TrainConfig fields and their JSON types, from the one definition (no torch).
TRAIN_SETTINGS = json_types()
PARAMS: dict[str, dict[str, tuple[tuple[type, ...], object]]] = {
    "finetune": {
        **_COMMON,
        "base": ((str, type(None)), None),
        "strategy": ((str,), DEFAULT_STRATEGY),
        "architecture": ((str, type(None)), None),
        "arguments": ((dict, type(None)), None),
        "resume": ((bool,), False),
        **{name: (types, UNSET) for name, types in TRAIN_SETTINGS.items()},
    },
    "segment": {
        **_COMMON,
        "model": ((str,), None),
        "device": ((str,), "auto"),
        "overlap": ((int, float), 0.25),
        "batch_size": ((int,), 2),
    },
    "evaluate": {**_COMMON, "lesion_wise": ((bool,), False)},
}
REQUIRED = {"finetune": ("image", "label"), "segment": ("image",),
            "evaluate": ("prediction", "label")}


# ------------------------------------------------------------------------------------ the folder
def _is_job_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / JOB_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise InputError(f"Job folder {folder} is a file; choose a folder.")
    if folder.is_dir() and any(folder.iterdir()):
        if not _is_job_folder(folder):
            raise InputError(
                f"Folder {folder} is not empty and holds no TransferSeg job; choose a new or "
                "empty folder for the job."
            )
        if not overwrite:
            raise OutputExistsError(
                f"Folder {folder} already holds a job; choose another folder or overwrite it."
            )
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _check_case(index: int, case: object, kind: str, names: set[str]) -> None:
    import SimpleITK as sitk

    where = f"Case {index + 1}"
    if not isinstance(case, Mapping) or not isinstance(case.get("name"), str) \
            or not case["name"].strip():
        raise InputError(f"{where} must be a dict with a non-empty 'name'.")
    if case["name"] in names:
        raise InputError(f"Two cases are called {case['name']!r}; give each case its own name.")
    names.add(case["name"])
    for role in REQUIRED[kind]:
        if case.get(role) is None:
            raise InputError(f"Case {case['name']!r} has no {role}; a {kind} job needs one.")
    for role in ROLES:
        value = case.get(role)
        if value is not None and not isinstance(value, sitk.Image):
            raise InputError(f"The {role} of case {case['name']!r} must be a SimpleITK image, "
                             f"not {type(value).__name__}.")
    held = case.get("validation", False)
    if not isinstance(held, bool) or (held and kind != "finetune"):
        raise InputError(f"Case {case['name']!r}: 'validation' must be true or false, and only "
                         "a finetune job has validation cases.")


def write_job(
    folder: str | os.PathLike,
    kind: str,
    *,
    cases: Sequence[Mapping] | None = None,
    labels: Mapping[int, str] | None = None,
    params: Mapping | None = None,
    overwrite: bool = False,
    terminology: Mapping[str, str] | None = None,
) -> Path:
    """Write a job folder (see the module docstring) and return the path of its ``job.json``.

    ``cases``: dicts with ``"name"`` and SimpleITK images under ``"image"``, ``"label"``
    and (evaluate) ``"prediction"``; written as NRRD. A finetune case with
    ``"validation": True`` is validated on, not trained on. ``labels``: {value: name} of the label
    maps. ``params``: the kind's options (JSON values), checked now as the job runner will.
    A non-empty folder is refused unless it holds a job and ``overwrite`` is given.
    """
    folder = Path(folder)
    if kind not in KINDS:
        raise InputError(f"Unknown job kind {kind!r}; use one of {', '.join(KINDS)}.")
    cases = list(cases or [])
    if not cases:
        raise InputError(f"A {kind} job needs at least one case.")
    names: set[str] = set()
    for index, case in enumerate(cases):
        _check_case(index, case, kind, names)
    if all(case.get("validation", False) for case in cases):
        raise InputError("Every case is marked for validation; a finetune job needs at least "
                         "one case to train on.")
    table = _check_labels({str(k): v for k, v in (labels or {}).items()}, "labels", kind)
    params = dict(params or {})
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InputError(f"Job options must be JSON values (text, numbers, lists): {error}.") \
            from None
    _check_params(params, kind, "the job options")
    terminology = _check_terminology(dict(terminology or {}), table, "terminology", kind)
    _prepare_folder(folder, overwrite)

    from TransferSegLib.volumes import write_image

    (folder / INPUTS).mkdir()
    entries, slugs = [], set()
    for case in cases:
        slug = unique_name(case["name"], slugs)
        entry = {"name": case["name"]}
        for role in ROLES:
            if case.get(role) is not None:
                relative = f"{INPUTS}/{slug}_{role}.nrrd"
                write_image(case[role], folder / relative)
                entry[role] = relative
        if case.get("validation"):
            entry["validation"] = True
        entries.append(entry)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    document = {"format": FORMAT, "version": VERSION, "kind": kind, "created": created,
                "transferseg": __version__, "cases": entries,
                "labels": {str(v): n for v, n in table.items()}, "params": params}
    if kind == "finetune":
        held_out = [e for e in entries if e.get("validation")]
        document["validation"] = "held-out" if held_out else "training"
        if terminology:
            document["terminology"] = terminology
    path = folder / JOB_FILE
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reading job.json
@dataclass
class JobCase:
    """One case of a job: its name and the files of its images (absent roles are None)."""

    name: str
    image: Path | None = None
    label: Path | None = None
    prediction: Path | None = None
    validation: bool = False  # a finetune case validated on, not trained on


@dataclass
class Job:
    """A job read from ``job.json``: kind, cases, label table, options and output folder."""

    path: Path
    kind: str
    cases: list[JobCase]
    labels: dict[int, str]
    params: dict = field(default_factory=dict)
    validation: str = "split"  # which cases it validates on: held-out, training, or split
    # (a job written before validation cases existed: the trainer splits the cases itself)
    terminology: dict[str, str] = field(default_factory=dict)  # label name -> entry

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def output(self) -> Path:
        return self.folder / self.params["output"]

    def path_of(self, name: str) -> Path | None:
        """The option ``name`` as a path (relative ones are relative to the job folder)."""
        value = self.params.get(name)
        return None if value is None else self.folder / value


def _check_labels(labels: object, where: str, kind: str) -> dict[int, str]:
    if not isinstance(labels, Mapping):
        raise InputError(f"{where} must be an object {{value: name}}.")
    table = {}
    for key, name in labels.items():
        if not str(key).isdigit() or not isinstance(name, str) or not name:
            raise InputError(f"{where} must map label values to names; {key!r}: {name!r} is not "
                             "a whole number and a name.")
        table[int(key)] = name
    table.pop(0, None)
    if kind == "finetune" and not table:
        raise InputError(f"{where} is empty; a finetune job needs the names of its labels.")
    if len(set(table.values())) != len(table):
        raise InputError(f"{where} gives two values the same name; names must differ.")
    return dict(sorted(table.items()))


def _check_terminology(terminology: object, table: Mapping[int, str], where: str,
                       kind: str) -> dict[str, str]:
    """Label name -> TerminologyEntry text, for names of the job's labels only."""
    if not terminology:
        return {}
    if kind != "finetune" or not isinstance(terminology, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) < 2000
            for k, v in terminology.items()):
        raise InputError(f"{where} must map label names to terminology entries (text), and "
                         "only a finetune job has it.")
    unknown = sorted(set(terminology) - set(table.values()))
    if unknown:
        raise InputError(f"{where} names {unknown[0]!r}, which is not one of the job's labels.")
    return dict(terminology)


def _check_params(params: object, kind: str, where: str) -> dict:
    """``params`` with defaults filled in; InputError naming the first bad option."""
    if not isinstance(params, Mapping):
        raise InputError(f"{where} must be an object of options.")
    options = PARAMS[kind]
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise InputError(f"{where}: option {unknown[0]!r} is unknown for a {kind} job; the "
                         f"options are {', '.join(sorted(options))}.")
    checked = {}
    for name, (types, default) in options.items():
        if name not in params and default is UNSET:
            continue
        value = params.get(name, default)
        wrong_bool = isinstance(value, bool) and bool not in types
        if not isinstance(value, types) or wrong_bool:
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise InputError(f"{where}: option {name!r} must be {expected}, not {value!r}.")
        checked[name] = value
    if kind == "segment" and not checked["model"]:
        raise InputError(f"{where}: option 'model' (the model file to segment with) is missing.")
    if kind == "finetune" and checked["base"] is None and not (
            checked["strategy"] == "scratch" and checked["architecture"]):
        raise InputError(f"{where}: option 'base' (the base model file) is missing; only the "
                         "scratch strategy with an 'architecture' needs none.")
    return checked


def read_job(path: str | os.PathLike) -> Job:
    """Read and check ``job.json``; InputError naming the file and the field at fault."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Job file {path} does not exist; write the job again.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"Job file {path} is not valid JSON ({error}); write the job again.") \
            from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InputError(f"{path} is not a TransferSeg job (field 'format' is not {FORMAT!r}).")
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{path}: field 'version' must be a whole number, not {version!r}.")
    if version > VERSION:
        raise InputError(f"{path} is a version {version} job, newer than this TransferSeg "
                         f"understands (version {VERSION}); update TransferSeg.")
    kind = document.get("kind")
    if kind not in KINDS:
        raise InputError(f"{path}: field 'kind' is {kind!r}; use one of {', '.join(KINDS)}.")
    where = f"{path}: field"
    table = _check_labels(document.get("labels", {}), f"{where} 'labels'", kind)
    params = _check_params(document.get("params", {}), kind, f"{where} 'params'")
    raw_cases = document.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise InputError(f"{where} 'cases' must be a non-empty list of cases.")
    cases = []
    for index, entry in enumerate(raw_cases):
        field_name = f"{where} 'cases[{index}]'"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(f"{field_name} must be an object with a 'name'.")
        files = {}
        for role in ROLES:
            value = entry.get(role)
            if value is None:
                if role in REQUIRED[kind]:
                    raise InputError(f"{field_name}.{role} is missing; a {kind} job needs it.")
                continue
            if not isinstance(value, str):
                raise InputError(f"{field_name}.{role} must be a file name, not {value!r}.")
            file = path.parent / value
            if not file.is_file():
                raise InputError(f"{field_name}.{role} names {file}, which does not exist; "
                                 "write the job again.")
            files[role] = file
        held = entry.get("validation", False)
        if not isinstance(held, bool) or (held and kind != "finetune"):
            raise InputError(f"{field_name}.validation must be true or false, and only a "
                             "finetune job has validation cases.")
        cases.append(JobCase(entry["name"], **files, validation=held))
    job = Job(path, kind, cases, table, params)
    if kind == "finetune":
        which = document.get("validation", "split")
        held = any(case.validation for case in cases)
        if which not in ("held-out", "training", "split") or (which == "held-out") != held:
            raise InputError(f"{where} 'validation' is {which!r} but {'some' if held else 'no'} "
                             "case is marked for validation; write the job again.")
        if all(case.validation for case in cases):
            raise InputError(f"{where} 'cases': every case is marked for validation; a "
                             "finetune job needs at least one case to train on.")
        job.validation = which
        job.terminology = _check_terminology(document.get("terminology") or {}, table,
                                             f"{where} 'terminology'", kind)
    for option in ("base", "model"):
        file = job.path_of(option)
        if file is not None and not file.is_file():
            raise InputError(f"{where} 'params.{option}' names {file}, which does not exist; "
                             "choose an existing model file.")
    return job


# ---------------------------------------------------------------------------- the child process
class JobProcess(ChildProcess):
    """A job running in a child process: start, poll events, cancel; no Qt, never blocks.

    The child is ``python -m TransferSegLib run JOB.json`` (see
    :class:`~TransferSegLib.process.ChildProcess` for how it is read and stopped). Cancel writes
    the job's cancel file first: a training job saves its model and reports ``cancelled``
    (within :data:`GRACE_S` seconds), a segmentation or evaluation job stops between two cases
    (within a few seconds, else it is ended; its outputs are written atomically).
    """

    def __init__(self, job_json: str | os.PathLike, python: str | os.PathLike = sys.executable,
                 env: Mapping[str, str] | None = None, grace_s: float | None = None):
        self.job_json = Path(job_json)
        self.python = str(python)
        if grace_s is None:
            grace_s = GRACE_S.get(_kind_of(self.job_json), min(GRACE_S.values()))
        super().__init__([self.python, "-m", "TransferSegLib", "run", str(self.job_json)], env,
                         cancel_file=self.job_json.parent / CANCEL_FILE, grace_s=grace_s,
                         cleanup=[self.job_json.parent])

    def _environment(self) -> dict[str, str]:
        return child_environment(self.env)


# Seconds a cancelled job may take to stop by itself: a training step plus saving the model;
# a segmentation stops between cases and its outputs are atomic, so it is ended sooner.
GRACE_S = {"finetune": 120.0, "segment": 5.0, "evaluate": 5.0}


def _kind_of(job_json: Path) -> str | None:
    try:
        return json.loads(job_json.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
