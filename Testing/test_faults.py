"""Faults: training killed at random, a full disk, too little memory, two jobs in one folder.

Every fault must leave either the previous complete output or the new complete one, never a
half-written file that could be taken for an output, and end with a message that says what to
change. Faults are real where a test can make them cheaply: SIGKILL, a file-size limit
(``RLIMIT_FSIZE``: each write past it fails with EFBIG, as on a full disk), an address-space
limit (``RLIMIT_AS``: allocations past it fail, as when memory runs out). Where a fault needs
hardware the test machine lacks (a GPU out of memory), the library's reaction is checked by
raising the exception the hardware would raise.

A job folder edited or deleted while its job runs: ``test_jobs.py``
(``test_a_job_whose_files_change_while_it_runs_stops_with_a_clear_error``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import catalog_entry, real_sample, reduced_label, write_catalog

from TransferSegLib import (
    checkpoint,
    files,
    inference,
    networks,
    preprocess,
    recipes,
    training,
    volumes,
)
from TransferSegLib.errors import InputError, TransferSegError

POSIX = pytest.mark.skipif(os.name == "nt", reason="SIGKILL, SIGSTOP and rlimits are POSIX")
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
TINY = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
TESTING = Path(__file__).resolve().parent
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    p for p in (str(TESTING), os.environ.get("PYTHONPATH")) if p))
STEPS = 40  # of the killed training run: a few seconds on a CPU
MODEL_FILES = ("model.safetensors", "last.safetensors")
LOCK = ".transferseg.lock"


# ---------------------------------------------------------------------------- shared material
def organ_dataset(folder: Path) -> Path:
    """A one-case CSV dataset: the real TotalSegmentator CT with four of its organs."""
    case = real_sample("totalseg_ct")
    folder.mkdir(parents=True, exist_ok=True)
    reduced_label("totalseg_ct", ORGANS, folder / "label.nii.gz")
    (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in ORGANS.items()}))
    (folder / "cases.csv").write_text(f"image,label,name\n{case.image},label.nii.gz,ct\n")
    return folder / "cases.csv"


def tiny_model(seed: int = 1, spacing: float = 6.0):
    """An untrained tiny CT UNet for the four organs, and its card (32^3 patches)."""
    torch.manual_seed(seed)
    arguments = networks.resolve_kwargs("unet", **TINY)
    labels = {0: "background", **{i + 1: n for i, n in enumerate(ORGANS.values())}}
    model = networks.build_network("unet", 1, len(labels), **arguments)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=len(labels), arguments=arguments,
        labels=labels, spacing=[spacing] * 3, patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-500.0, 400.0]}, modality="CT")
    return model, card


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faults")
    model, card = tiny_model()
    return {"base": checkpoint.save_model(folder / "base.safetensors", model, card),
            "data": organ_dataset(folder / "data")}


def finetune_arguments(material: dict, out: Path, *extra: str) -> list[str]:
    """``transferseg finetune`` of the tiny base on the real CT, checkpointing every step."""
    return ["finetune", "--base", str(material["base"]), "--data", str(material["data"]),
            "--out", str(out), "--strategy", "vanilla", "--steps", str(STEPS), "--val-every",
            "10", "--checkpoint-every", "1", "--batch-size", "1", "--device", "cpu",
            "--seed", "3", "--events", "jsonl", *extra]


# Starting Python and importing torch and MONAI takes seconds, most of such a short run. A
# launcher process imports them once and forks one child per run; each child runs the command
# line's ``main`` exactly as ``python -m TransferSegLib`` would, in a process of its own that a
# test can kill. One thread per process and OMP_NUM_THREADS=1 keep the fork safe.
def launcher() -> None:
    """The launcher's loop: read a JSON request per line on stdin, fork a child for it, and
    report ``{"started": pid}`` and, when it ends, ``{"ended": pid, "status": code}``."""
    import select

    import monai.inferers  # noqa: F401 - imported here so that the children need not
    import monai.transforms  # noqa: F401

    from TransferSegLib import cli, losses, tiling, transfer  # noqa: F401

    children, pending = set(), b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.02)
        if ready:
            data = os.read(0, 65536)
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _launched(json.loads(line))
                children.add(pid)
                print(json.dumps({"started": pid}), flush=True)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                print(json.dumps({"ended": pid, "status": os.waitstatus_to_exitcode(status)}),
                      flush=True)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _launched(request: dict) -> None:
    """A forked child: stdout and stderr to the request's files, run, exit; never returns."""
    import traceback

    from TransferSegLib import cli

    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[name], os.O_WRONLY | os.O_APPEND), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - new, unlocked
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    code = 1
    try:
        if "argv" in request:
            code = cli.main(request["argv"])
        else:
            fault_child(*request["call"])
            code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else 2
    except BaseException:  # noqa: BLE001 - reported on stderr, status 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Run:
    """A child of the launcher: its pid, events as they are written, its exit status."""

    def __init__(self, launcher: Launcher, pid: int, folder: Path):
        self.launcher, self.pid = launcher, pid
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        self._stream = None

    @property
    def status(self) -> int | None:
        return self.launcher.ended.get(self.pid)

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            assert time.monotonic() < deadline, f"run {self.pid} did not end"
            time.sleep(0.01)
        return self.status

    def next_event(self, kind: str, timeout: float = 300) -> dict:
        """Read the run's JSON lines until an event of ``kind``; fail if it ends first."""
        if self._stream is None:
            self._stream = open(self.stdout)  # noqa: SIM115 - read while it grows
        deadline, partial = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            ended = self.status is not None
            partial += self._stream.readline()
            if partial.endswith("\n"):
                line, partial = partial, ""
                if line.startswith("{") and json.loads(line)["event"] == kind:
                    return json.loads(line)
            elif ended:
                pytest.fail(f"the run ended (status {self.status}) before a {kind} event: "
                            f"{self.stderr.read_text(encoding='utf-8')[-2000:]}")
            else:
                time.sleep(0.005)
        pytest.fail(f"no {kind} event in {timeout} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


class Launcher:
    """The test side of :func:`launcher`."""

    def __init__(self, folder: Path):
        self.folder, self.ended, self.started = folder, {}, queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import test_faults; test_faults.launcher()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            if "started" in message:
                self.started.put(message["started"])
            else:
                self.ended[message["ended"]] = message["status"]

    def run(self, argv: list[str] | None = None, call: list[str] | None = None) -> Run:
        """Start ``transferseg ARGV`` (or ``fault_child(*call)``) in a new child."""
        folder = Path(tempfile.mkdtemp(dir=self.folder))
        for name in ("stdout", "stderr"):
            (folder / name).touch()
        request = {"stdout": str(folder / "stdout"), "stderr": str(folder / "stderr"),
                   **({"argv": argv} if argv is not None else {"call": call})}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return Run(self, self.started.get(timeout=120), folder)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    if os.name == "nt":
        pytest.skip("fork is POSIX")
    runner = Launcher(tmp_path_factory.mktemp("launcher"))
    yield runner
    runner.close()


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def check_after_kill(out: Path, pid: int) -> int:
    """What a SIGKILL may leave: complete files, hidden temporaries, the lock; returns the step
    of the training state."""
    for name in MODEL_FILES:
        if (out / name).exists():
            checkpoint.load_model(out / name)  # complete: its card and every tensor read back
    step = training.read_state_meta(out / "state.safetensors")["step"]
    from safetensors.torch import load_file

    assert any(k.startswith("optim.") for k in load_file(str(out / "state.safetensors")))
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible <= {*MODEL_FILES, "state.safetensors", "progress.jsonl"}, visible
    for name in partials(out):  # hidden, named after the dead writer: never read as output
        assert name.startswith(".") and f".partial-{pid}-" in name, name
    for line in (out / "progress.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line)
    # the stale lock the next run meets
    assert (out / LOCK).read_text(encoding="utf-8").split()[0] == str(pid)
    return step


# ------------------------------------------------------------------------------------- SIGKILL
@POSIX
def test_training_killed_at_random_resumes_to_a_complete_model(tmp_path, material, launch):
    """Three SIGKILLs, each followed by ``--resume``: two at seeded random moments (after a
    random number of steps, at a random time within a step), one while a checkpoint is being
    written. The last run finishes."""
    rng = random.Random(20240611)
    out = tmp_path / "run"
    steps, caught_in_write = [], False
    for round_ in range(3):
        run = launch.run(finetune_arguments(material, out, *(["--resume"] if round_ else [])))
        run.next_event("checkpoint")  # it holds the folder and has written a state file
        if round_ < 2:
            for _ in range(rng.randint(0, 7)):
                run.next_event("checkpoint")
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # kill the moment a temporary file appears: inside a checkpoint write
            while run.status is None and not caught_in_write:
                caught_in_write = any(".partial-" in name for name in os.listdir(out))
        run.kill()
        assert run.wait() == -signal.SIGKILL
        steps.append(check_after_kill(out, run.pid))
    assert caught_in_write, "the run ended before a checkpoint write could be caught"
    assert steps == sorted(steps) and steps[-1] < STEPS, steps
    dead = run.pid
    # Leftovers a kill may leave: a dead writer's temporary is removed, a live one's kept.
    (out / f".model.partial-{dead}-0badcafe.safetensors").write_bytes(b"half")
    live = out / f".last.partial-{os.getpid()}-0badcafe.safetensors"
    live.write_bytes(b"being written")

    final = launch.run(finetune_arguments(material, out, "--resume"))
    assert final.wait() == 0, final.stderr.read_text(encoding="utf-8")[-2000:]
    events = [json.loads(line) for line in final.stdout.read_text(encoding="utf-8").splitlines()
              if line.startswith("{")]
    messages = " ".join(e.get("message", "") for e in events)
    assert f"locked by process {dead}, which no longer runs" in messages
    assert f"removed .model.partial-{dead}-0badcafe.safetensors" in messages
    assert next(e for e in events if e["event"] == "start")["from_step"] == steps[-1]
    assert events[-1]["event"] == "done" and events[-1]["step"] == STEPS
    for name in MODEL_FILES:
        _, card = checkpoint.load_model(out / name)
        assert card.metrics["steps"] == STEPS and card.labels[4] == "liver"
    assert training.read_state_meta(out / "state.safetensors")["step"] == STEPS
    assert partials(out) == [live.name] and not (out / LOCK).exists()


def test_a_stale_lock_is_taken_over_only_when_its_process_is_gone(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = int(finished.stdout)
    host = socket.gethostname()
    lock = folder / LOCK
    for text in (f"{dead}\n{host}\n", f"{dead}"):  # this format, and the older PID alone
        lock.write_text(text)
        with files.OutputLock(folder) as taken:
            assert taken.stale_pid == dead
            assert lock.read_text(encoding="utf-8").split() == [str(os.getpid()), host]
        assert not lock.exists()
    for owner in (f"{os.getpid()}\n{host}\n", f"{dead}\nanother-computer\n", "garbage"):
        lock.write_text(owner)
        with pytest.raises(TransferSegError, match="Another TransferSeg job is writing"):
            files.OutputLock(folder).__enter__()
        # a live (or unknowable) owner keeps its lock
        assert lock.read_text(encoding="utf-8") == owner


# ------------------------------------------------------------------------ two jobs, one folder
@POSIX
def test_two_jobs_writing_the_same_model_folder_one_wins_cleanly(tmp_path, material, launch):
    """Two identical fine-tuning runs started together into one folder. The first to take the
    folder is paused (SIGSTOP) while the other tries, so the outcome does not depend on which
    one is faster; then it goes on and finishes."""
    out = tmp_path / "shared"
    runs = [launch.run(finetune_arguments(material, out)) for _ in range(2)]
    winner = loser = None
    deadline = time.monotonic() + 300
    while winner is None and loser is None:
        assert time.monotonic() < deadline, "neither job started"
        for run in runs:
            if run.status is not None:  # ended first: it lost the folder
                loser = run
                break
            text = run.stdout.read_text(encoding="utf-8")
            if '"event": "start"' in text:
                run.kill(signal.SIGSTOP)  # hold it mid-run while the other tries
                winner = run
                break
        time.sleep(0.002)
    winner = winner or next(run for run in runs if run is not loser)
    loser = loser or next(run for run in runs if run is not winner)
    try:
        status = loser.wait(timeout=120)
    finally:
        winner.kill(signal.SIGCONT)
    err = loser.stderr.read_text(encoding="utf-8")
    assert status == 2, err[-2000:]
    assert "Another TransferSeg job is writing to" in err and "Traceback" not in err
    assert winner.wait() == 0, winner.stderr.read_text(encoding="utf-8")[-2000:]
    _, card = checkpoint.load_model(out / "model.safetensors")
    assert card.metrics["steps"] == STEPS
    assert not (out / LOCK).exists() and not partials(out)


# ------------------------------------------------------------------ a full disk, a memory limit
FILE_LIMIT = 512  # bytes: every output below is larger
# The bundle's text files fit in this; its weights file does not.
FILE_LIMIT_PER_CASE = {"MONAI bundle export": 20_000}


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, hidden ones included, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fault_cases(root: Path, base: Path, data: Path) -> dict:
    """Each case: (folder, write the output again); the first output is written here."""
    from TransferSegLib import export, metrics, zoo
    from TransferSegLib.inference import segment_file

    image = real_sample("totalseg_ct").image
    other, card = tiny_model(seed=2)
    cases = {}

    def folder(name: str) -> Path:
        path = root / name
        path.mkdir()
        return path

    f = folder("model")
    checkpoint.save_model(f / "model.safetensors", *tiny_model())
    cases["model file"] = (f, lambda f=f: checkpoint.save_model(
        f / "model.safetensors", other, card, overwrite=True))

    f = folder("state")
    optimiser = torch.optim.AdamW(other.parameters())
    training.save_state(f / "state.safetensors", other, optimiser, {"step": 1})
    cases["training state"] = (f, lambda f=f: training.save_state(
        f / "state.safetensors", other, optimiser, {"step": 2}))

    f = folder("training")
    config = training.TrainConfig(steps=2, batch_size=1, val_every=2, checkpoint_every=1,
                                  device="cpu")
    recipes.finetune(base, data, f, "vanilla", config)
    cases["training run"] = (f, lambda f=f: recipes.finetune(
        base, data, f, "vanilla", dataclasses.replace(config, steps=4), resume=True))

    other_file = checkpoint.save_model(root / "other.safetensors", other, card)
    for suffix in (".nii.gz", ".seg.nrrd"):
        f = folder(f"segment{suffix}")
        segment_file(base, image, f / f"out{suffix}")
        cases[f"segmentation {suffix}"] = (f, lambda f=f, s=suffix: segment_file(
            other_file, image, f / f"out{s}", overwrite=True))

    f = folder("scores")
    reference = real_sample("totalseg_ct").label
    scores = metrics.evaluate(volumes.read_label(reference), volumes.read_label(reference))
    metrics.write_scores(scores, f / "scores.csv")
    cases["scores .csv"] = (f, lambda f=f: metrics.write_scores(scores, f / "scores.csv",
                                                                overwrite=True))

    f = folder("torchscript")
    export.export_torchscript(base, f / "model.ts")
    cases["TorchScript export"] = (f, lambda f=f: export.export_torchscript(
        other_file, f / "model.ts", overwrite=True))

    f = folder("bundle")
    export.export_bundle(base, f / "bundle")
    cases["MONAI bundle export"] = (f, lambda f=f: export.export_bundle(
        other_file, f / "bundle", overwrite=True))

    f = folder("zoo")
    write_catalog(f, catalog_entry("tiny-ct", base, "published.safetensors", "organs"))
    os.environ.update(TRANSFERSEG_RESOURCES=str(f), TRANSFERSEG_HOME=str(f / "home"))
    zoo.import_file("tiny-ct", base, log=lambda text: None)
    cases["model import (zoo)"] = (f, lambda: zoo.import_file("tiny-ct", base,
                                                              log=lambda text: None))
    return cases


def fault_child(root: str, base: str, data: str) -> None:
    """Run in a child process: write each output once, then again under a file-size limit;
    then segment under a memory limit. Prints one JSON object of outcomes."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    outcomes = {}
    for name, (folder, write) in _fault_cases(Path(root), Path(base), Path(data)).items():
        before = _tree(folder)
        limit = FILE_LIMIT_PER_CASE.get(name, FILE_LIMIT)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            write()
            error = None
        except Exception as caught:  # noqa: BLE001 - the test reports what escaped
            error = caught
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
        outcomes[name] = {"error": type(error).__name__, "message": str(error),
                          "clear": isinstance(error, TransferSegError),
                          "unchanged": _tree(folder) == before,
                          "new_files": sorted(set(_tree(folder)) - set(before))}

    # A model at 0.75 mm makes the 3 mm CT 64 times larger: 0.6 GiB of scores, past the limit.
    model, card = tiny_model(spacing=0.75)
    image = volumes.read_volume(real_sample("totalseg_ct").image)
    with open("/proc/self/status") as status:
        in_use = next(int(line.split()[1]) * 1024 for line in status
                      if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (300 << 20), resource.RLIM_INFINITY))
    try:
        inference.segment(model, card, image, device="cpu")
        error = None
    except Exception as caught:  # noqa: BLE001
        error = caught
    finally:
        resource.setrlimit(resource.RLIMIT_AS, unlimited)
    outcomes["memory"] = {"error": type(error).__name__, "message": str(error),
                          "clear": isinstance(error, TransferSegError)}
    print(json.dumps(outcomes))


@pytest.fixture(scope="module")
def fault_outcomes(tmp_path_factory, material, launch) -> dict:
    root = tmp_path_factory.mktemp("full")
    run = launch.run(call=[str(root), str(material["base"]), str(material["data"])])
    assert run.wait() == 0, run.stderr.read_text(encoding="utf-8")[-3000:]
    return json.loads(run.stdout.read_text(encoding="utf-8").strip().splitlines()[-1])


DISK_FULL = ["model file", "training state", "training run", "segmentation .nii.gz",
             "segmentation .seg.nrrd", "scores .csv", "TorchScript export",
             "MONAI bundle export", "model import (zoo)"]


@POSIX
@pytest.mark.parametrize("case", DISK_FULL)
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_output(fault_outcomes, case):
    outcome = fault_outcomes[case]
    assert outcome["clear"], outcome  # a TransferSegError: one sentence, no traceback
    assert "free space" in outcome["message"] and "Traceback" not in outcome["message"]
    assert outcome["new_files"] == []  # no temporary or partial file left behind
    assert outcome["unchanged"], outcome  # the previous output, byte for byte


@POSIX
def test_the_full_disk_message_names_the_cause_when_the_writer_reports_it(fault_outcomes):
    for case in ("model file", "training state", "model import (zoo)", "scores .csv"):
        assert "the disk is full or the file is too large" in fault_outcomes[case]["message"]


_WRITE_PAST_LIMIT = """
import resource, signal, numpy as np, SimpleITK as sitk
from TransferSegLib import volumes
from TransferSegLib.errors import TransferSegError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
image = sitk.GetImageFromArray(np.random.rand(40, 40, 40).astype(np.float32))
for name in ("seg.nii", "seg.nii.gz"):
    try:
        volumes.write_image(image, name, overwrite=True)
    except TransferSegError as error:
        print("refused:", error)
"""


@POSIX
def test_a_full_disk_prints_no_image_library_lines_besides_ours(tmp_path):
    # ITK's NIfTI writer prints "** ERROR: NWAD: wrote only ..." itself on a failed write; the
    # user gets TransferSeg's sentence only.
    done = subprocess.run([sys.executable, "-c", _WRITE_PAST_LIMIT], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.count("refused: Could not write seg.nii") == 2, done.stdout + done.stderr
    assert "** ERROR" not in done.stderr and done.stderr == "", done.stderr


@POSIX
def test_running_out_of_memory_while_segmenting_names_what_to_change(fault_outcomes):
    outcome = fault_outcomes["memory"]
    assert outcome["clear"], outcome
    assert "ran out of memory" in outcome["message"]
    assert "488 x 404 x 120" in outcome["message"] and "--batch-size 1" in outcome["message"]


def test_a_volume_over_the_voxel_budget_is_refused_before_it_is_allocated(monkeypatch):
    case = real_sample("totalseg_ct")
    voxels = int(np.prod(case.size))
    monkeypatch.setenv("TRANSFERSEG_MAX_VOXELS", str(voxels - 1))
    with pytest.raises(InputError, match="TRANSFERSEG_MAX_VOXELS"):
        volumes.read_volume(case.image)
    monkeypatch.setenv("TRANSFERSEG_MAX_VOXELS", str(voxels * 4))
    image = volumes.read_volume(case.image)
    model, card = tiny_model(spacing=1.5)  # 3 mm -> 1.5 mm: 8 times the voxels
    with pytest.raises(InputError, match="TRANSFERSEG_MAX_VOXELS") as error:
        inference.segment(model, card, image, device="cpu")
    assert "244 x 202 x 60" in str(error.value)
    monkeypatch.setenv("TRANSFERSEG_MAX_VOXELS", str(voxels * 8))  # exactly the model grid
    array, _ = preprocess.to_model_space(image, card.spacing, card.normalisation)
    assert array.shape == (60, 202, 244)


def _gpu_short_of_memory(monkeypatch, largest_batch_that_fits: int) -> list[int]:
    """Make the sliding window raise CUDA's out-of-memory error above a batch size."""
    batches, predict = [], inference.predict_logits

    def predict_logits(model, array, windows, **kwargs):
        batches.append(windows.batch_size)
        if windows.batch_size > largest_batch_that_fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(model, array, windows, **kwargs)

    monkeypatch.setattr(inference, "predict_logits", predict_logits)
    return batches


def test_gpu_out_of_memory_falls_back_to_one_patch_at_a_time(monkeypatch):
    image = volumes.read_volume(real_sample("totalseg_ct").image)[:64, :64, :]  # a corner
    model, card = tiny_model()
    expected = inference.segment(model, card, image, device="cpu", batch_size=1)
    batches = _gpu_short_of_memory(monkeypatch, largest_batch_that_fits=1)
    with pytest.warns(RuntimeWarning, match="one patch at a time"):
        result = inference.segment(model, card, image, device="cpu", batch_size=4)
    assert batches == [4, 1]
    assert np.array_equal(sitk.GetArrayViewFromImage(result.label),
                          sitk.GetArrayViewFromImage(expected.label))
    batches = _gpu_short_of_memory(monkeypatch, largest_batch_that_fits=0)
    with pytest.warns(RuntimeWarning), pytest.raises(TransferSegError, match="--device cpu"):
        inference.segment(model, card, image, device="cpu", batch_size=4)
    assert batches == [4, 1]


def test_training_out_of_memory_names_the_batch_size(tmp_path, material, monkeypatch):
    from TransferSegLib import losses

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 8589934592 bytes.")

    monkeypatch.setattr(losses.SegmentationLoss, "forward", no_memory)
    config = training.TrainConfig(steps=2, batch_size=4, device="cpu")
    with pytest.raises(TransferSegError, match="--batch-size 2") as error:
        recipes.finetune(material["base"], material["data"], tmp_path / "run", "vanilla",
                          config)
    assert str(error.value).startswith("The computer ran out of memory")
    assert not (tmp_path / "run" / LOCK).exists()


def _unwritable_folder() -> Path | None:
    """A folder that refuses new files even to root (sysfs), or None where there is none."""
    for candidate in (Path("/sys"), Path("/proc/self")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    return None


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    from TransferSegLib.cli import main

    sample = real_sample("totalseg_ct")
    model = tmp_path / "model.safetensors"
    net = networks.build_network("unet", 1, 5, **TINY)
    checkpoint.save_model(model, net, checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=5, arguments=TINY,
        labels={0: "background", **dict(enumerate(ORGANS.values(), 1))},
        spacing=[6.0, 6.0, 6.0], patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-1000.0, 1000.0]}, modality="CT"))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    commands = [
        # a folder below a file: it can never be made
        ["segment", "--model", str(model), "--image", str(sample.image),
         "--output", str(a_file / "seg.nii.gz")],
        ["evaluate", "--prediction", str(sample.label), "--reference", str(sample.label),
         "--json", str(a_file / "scores.json")],
        ["finetune", "--base", str(model), "--data", str(sample.image.parent),
         "--out", str(a_file / "run")],
        ["models", "export", str(model), "--bundle", str(a_file / "bundle")],
    ]
    blocked = _unwritable_folder()
    if blocked is not None:  # a real folder that refuses writes, even to root
        commands += [
            ["segment", "--model", str(model), "--image", str(sample.image),
             "--output", str(blocked / "seg.nii.gz")],
            ["finetune", "--base", str(model), "--data", str(sample.image.parent),
             "--out", str(blocked / "run"), "--steps", "1"],
            ["models", "export", str(model), "--bundle", str(blocked / "bundle")],
            ["demo", "--out", str(blocked / "demo")],
        ]
    for argv in commands:
        started = time.perf_counter()
        assert main(argv) == 2, argv
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: Cannot write into "), (argv, err)
        assert "Traceback" not in err
        assert time.perf_counter() - started < 20  # refused before the work, not after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "model.safetensors"]
