"""Jobs: the folder and job.json, running each kind, the child process, cancel and crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_image

from TransferSegLib import (
    checkpoint,
    cli,
    inference,
    jobrunner,
    jobs,
    networks,
    process,
    segmentations,
    volumes,
)
from TransferSegLib.errors import InputError, OutputExistsError

LABELS = {1: "ball", 2: "box"}
TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
POSIX = pytest.mark.skipif(os.name == "nt", reason="process groups and shell scripts: POSIX")
QUIET_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def synthetic_case(seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """A 24^3 CT-like image (2 mm voxels, off-origin) with a bright ball and a dark box."""
    z, y, x = np.mgrid[0:24, 0:24, 0:24]
    label = np.zeros((24, 24, 24), np.uint8)
    label[(z - 12) ** 2 + (y - 10) ** 2 + (x - 12) ** 2 < 36] = 1
    label[4:9, 14:20, 4:10] = 2
    noise = np.random.default_rng(seed).normal(0, 20, label.shape)
    image = (np.choose(label, [0, 200, -200]) + noise).astype(np.int16)
    geometry = {"spacing": (2.0, 2.0, 2.0), "origin": (10.0, -20.0, 5.0)}
    return make_image(image, **geometry), make_image(label, **geometry)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """An untrained tiny CT UNet with the labels ball and box, 2 mm voxels, 16^3 patches."""
    torch.manual_seed(0)
    arguments = networks.resolve_kwargs("unet", **TINY)
    labels = {0: "background", **LABELS}
    model = networks.build_network("unet", 1, len(labels), **arguments)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=len(labels), arguments=arguments,
        labels=labels, spacing=[2.0, 2.0, 2.0], patch_size=[16, 16, 16],
        normalisation={"kind": "ct", "window": [-300.0, 300.0]}, modality="CT")
    return checkpoint.save_model(tmp_path_factory.mktemp("base") / "base.safetensors", model,
                                 card)


def finetune_params(base: Path, **overrides) -> dict:
    params = {"base": str(base), "strategy": "vanilla", "steps": 6, "val_every": 3,
              "checkpoint_every": 3, "batch_size": 1, "device": "cpu", "seed": 1}
    params.update(overrides)
    return params


def finetune_job(folder: Path, base: Path, **overrides) -> Path:
    image, label = synthetic_case()
    return jobs.write_job(folder, "finetune", cases=[{"name": "case 1", "image": image,
                                                      "label": label}],
                          labels=LABELS, params=finetune_params(base, **overrides))


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc: trust kill()
    return state not in ("Z", "X")


def fake_python(tmp_path: Path, body: str) -> Path:
    """A shell script that stands in for the Python program (it ignores its arguments)."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


# -------------------------------------------------------------------------------- the job folder
def test_write_job_writes_exact_nrrd_inputs_and_a_versioned_job_json(tmp_path, base_model):
    image, label = synthetic_case()
    path = jobs.write_job(tmp_path / "job", "finetune", labels=LABELS,
                          cases=[{"name": "a/b", "image": image, "label": label},
                                 {"name": "a b", "image": image, "label": label}],
                          params=finetune_params(base_model))
    document = json.loads(path.read_text(encoding="utf-8"))
    assert path == tmp_path / "job" / "job.json"
    assert document["format"] == "transferseg-job" and document["version"] == jobs.VERSION
    assert document["kind"] == "finetune" and document["labels"] == {"1": "ball", "2": "box"}
    assert [c["name"] for c in document["cases"]] == ["a/b", "a b"]
    assert document["cases"][1]["image"] == "inputs/a_b-2_image.nrrd"  # names made distinct
    back = volumes.read_volume(path.parent / document["cases"][0]["image"])
    assert back.GetPixelID() == image.GetPixelID()
    assert volumes.Geometry.of(back) == volumes.Geometry.of(image)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    job = jobs.read_job(path)
    assert job.labels == LABELS and job.params["strategy"] == "vanilla"
    assert job.output == tmp_path / "job" / "output"
    # The trainer reads the very cases of job.json (they travel once: no second case list).
    dataset, validation = jobrunner.job_datasets(job)
    assert [c.name for c in dataset.cases] == ["a/b", "a b"]
    assert [c.label for c in dataset.cases] == [j.label for j in job.cases]
    assert dataset.labels.foreground == LABELS
    assert sorted(p.name for p in (path.parent / "inputs").iterdir()) == sorted(
        f"{slug}_{role}.nrrd" for slug in ("a_b", "a_b-2") for role in ("image", "label"))
    # No case is marked for validation: the trainer validates on the training cases.
    assert job.validation == "training" and document["validation"] == "training"
    assert [c.name for c in validation.cases] == ["a/b", "a b"]


def test_validation_cases_are_the_trainers_validation_set_and_not_trained_on(tmp_path,
                                                                            base_model):
    image, label = synthetic_case()
    path = jobs.write_job(tmp_path / "job", "finetune", labels=LABELS,
                          cases=[{"name": "train", "image": image, "label": label},
                                 {"name": "held", "image": image, "label": label,
                                  "validation": True}],
                          params=finetune_params(base_model))
    job = jobs.read_job(path)
    assert job.validation == "held-out"
    training, validation = jobrunner.job_datasets(job)
    assert [c.name for c in training.cases] == ["train"]
    assert [c.name for c in validation.cases] == ["held"]
    events = []
    assert jobrunner.run_job(path, events.append) == jobs.EXIT_DONE
    validations = [e for e in events if e["event"] == "validation"]
    assert validations and not any("training cases" in e.get("message", "") for e in events)
    # A job written before validation sets were passed: the trainer splits its cases itself.
    document = json.loads(path.read_text(encoding="utf-8"))
    del document["validation"], document["cases"][1]
    path.write_text(json.dumps(document), encoding="utf-8")
    old = jobs.read_job(path)
    assert old.validation == "split" and jobrunner.job_datasets(old)[1] is None

    folder = tmp_path / "bad"
    with pytest.raises(InputError, match="at least one case to train on"):
        jobs.write_job(folder, "finetune", labels=LABELS, params=finetune_params(base_model),
                       cases=[{"name": "held", "image": image, "label": label,
                               "validation": True}])
    with pytest.raises(InputError, match="'validation' must be true or false"):
        jobs.write_job(folder, "finetune", labels=LABELS, params=finetune_params(base_model),
                       cases=[{"name": "x", "image": image, "label": label,
                               "validation": "yes"}])
    with pytest.raises(InputError, match="only a finetune job has validation cases"):
        jobs.write_job(folder, "segment", params={"model": str(base_model)},
                       cases=[{"name": "x", "image": image, "validation": True}])
    assert not folder.exists()


def test_write_job_refuses_a_foreign_folder_and_an_existing_job(tmp_path, base_model):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no TransferSeg job"):
        finetune_job(foreign, base_model)
    assert (foreign / "thesis.docx").read_text(encoding="utf-8") == "keep me"

    path = finetune_job(tmp_path / "job", base_model)
    with pytest.raises(OutputExistsError, match="already holds a job"):
        finetune_job(tmp_path / "job", base_model)
    (path.parent / "output").mkdir()
    image, _ = synthetic_case()
    again = jobs.write_job(path.parent, "segment", cases=[{"name": "x", "image": image}],
                           params={"model": str(base_model)}, overwrite=True)
    assert json.loads(again.read_text(encoding="utf-8"))["kind"] == "segment"
    assert sorted(p.name for p in path.parent.iterdir()) == ["inputs", "job.json"]


def test_write_job_checks_cases_and_options_before_writing(tmp_path, base_model):
    image, label = synthetic_case()
    folder = tmp_path / "job"
    with pytest.raises(InputError, match="no label"):
        jobs.write_job(folder, "finetune", cases=[{"name": "x", "image": image}],
                       labels=LABELS, params=finetune_params(base_model))
    with pytest.raises(InputError, match="'stepz' is unknown"):
        jobs.write_job(folder, "finetune", cases=[{"name": "x", "image": image, "label": label}],
                       labels=LABELS, params=finetune_params(base_model, stepz=3))
    with pytest.raises(InputError, match="must be a SimpleITK image"):
        jobs.write_job(folder, "segment", cases=[{"name": "x", "image": "ct.nii.gz"}],
                       params={"model": "m.safetensors"})
    with pytest.raises(InputError, match="Unknown job kind"):
        jobs.write_job(folder, "train", cases=[{"name": "x", "image": image}])
    assert not folder.exists()


def test_training_settings_come_from_one_definition():
    """TrainConfig's fields (settings.py) are the job's options and the command line's flags,
    with the field's default and help text."""
    from dataclasses import fields

    from TransferSegLib.settings import TrainConfig

    assert set(jobs.TRAIN_SETTINGS) == {f.name for f in fields(TrainConfig)}
    for item in fields(TrainConfig):
        if item.default is not None:
            assert isinstance(item.default, jobs.TRAIN_SETTINGS[item.name]), item.name
    finetune = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items()
                    if a[0] == "finetune")[1]
    flags = {o: a for a in finetune._actions for o in a.option_strings}
    assert flags["--batch-size"].help == TrainConfig.__dataclass_fields__["batch_size"].metadata[
        "help"] and flags["--batch-size"].default == 2
    assert "--no-augment" in flags and "--mirror" in flags and "--freeze-depth" in flags
    assert "--cache-gb" not in flags  # a job and library option only
    args = cli.build_parser().parse_args(["finetune", "--data", "d", "--out", "o", "--steps",
                                          "7", "--no-augment", "--mirror"])
    config = cli._train_config(args)
    assert (config.steps, config.augment, config.mirror) == (7, False, True)
    pretrain = cli.build_parser().parse_args(["pretrain", "--data", "d", "--out", "o"])
    assert not hasattr(pretrain, "freeze_depth")  # no flag that pretraining would ignore


def test_exit_codes_agree_with_the_command_line():
    assert jobs.EXIT_USER_ERROR == cli.EXIT_USER_ERROR
    assert jobs.EXIT_CANCELLED == cli.EXIT_CANCELLED


BAD_JOBS = [
    (lambda d: d.update(version=2), "newer than this TransferSeg"),
    (lambda d: d.update(version="1"), "field 'version'"),
    (lambda d: d.update(kind="train"), "field 'kind'"),
    (lambda d: d.pop("format"), "not a TransferSeg job"),
    (lambda d: d["params"].update(stepz=3), "'stepz' is unknown"),
    (lambda d: d["params"].update(steps="ten"), "'steps' must be int"),
    (lambda d: d["params"].update(augment=1), "'augment' must be bool"),
    (lambda d: d["params"].update(base="gone.safetensors"), "gone.safetensors, which does not"),
    (lambda d: d["cases"][0].update(image="inputs/missing.nrrd"), "cases[0]'.image names"),
    (lambda d: d["cases"][0].pop("label"), "cases[0]'.label is missing"),
    (lambda d: d.update(labels={"one": "ball"}), "field 'labels'"),
    (lambda d: d.update(cases=[]), "field 'cases'"),
    (lambda d: d["cases"][0].update(validation=True), "is marked for validation"),
    (lambda d: d.update(validation="some"), "field 'validation' is 'some'"),
]


@pytest.mark.parametrize(("change", "words"), BAD_JOBS)
def test_bad_job_files_are_one_error_naming_the_file_and_field(tmp_path, base_model, change,
                                                               words):
    path = finetune_job(tmp_path / "job", base_model)
    document = json.loads(path.read_text(encoding="utf-8"))
    change(document)
    path.write_text(json.dumps(document))
    events = []
    assert jobrunner.run_job(path, events.append) == jobs.EXIT_USER_ERROR
    assert [e["event"] for e in events] == ["error"]
    assert str(path) in events[0]["message"] and words in events[0]["message"]


def test_missing_and_broken_job_files(tmp_path):
    events = []
    assert jobrunner.run_job(tmp_path / "none.json", events.append) == jobs.EXIT_USER_ERROR
    assert "does not exist" in events[-1]["message"]
    broken = tmp_path / "job.json"
    broken.write_text('{"format": "transferseg-job",')
    assert jobrunner.run_job(broken, events.append) == jobs.EXIT_USER_ERROR
    assert "is not valid JSON" in events[-1]["message"]


# ---------------------------------------------------------------------------- running each kind
def test_segment_and_evaluate_jobs_write_their_outputs(tmp_path, base_model):
    image, label = synthetic_case()
    path = jobs.write_job(tmp_path / "seg", "segment", cases=[{"name": "scan", "image": image}],
                          params={"model": str(base_model), "device": "cpu"})
    events = []
    assert jobrunner.run_job(path, events.append) == jobs.EXIT_DONE
    assert [e["event"] for e in events] == ["case", "segmented", "done"]
    output = Path(events[-1]["outputs"][0])
    assert output == tmp_path / "seg" / "output" / "scan.seg.nrrd"
    segmentation = segmentations.read_segmentation(output)
    assert {s.name for s in segmentation.segments} <= set(LABELS.values())
    assert volumes.Geometry.of(segmentation.layers[0]) == volumes.Geometry.of(image)
    assert events[1]["labels"] == {"1": "ball", "2": "box"}
    written, table = segmentation.to_label_map()
    counts = np.bincount(sitk.GetArrayFromImage(written).ravel(), minlength=3)
    voxel_ml = np.prod(written.GetSpacing()) / 1000
    found = {name: counts[value] * voxel_ml for value, name in table.items() if value}
    assert events[1]["volumes_ml"] == pytest.approx({"ball": found.get("ball", 0.0),
                                                      "box": found.get("box", 0.0)})
    assert events[1]["summary"] == inference.describe_volumes(events[1]["volumes_ml"])

    # Scoring the reference against itself: Dice 1 for both labels.
    path = jobs.write_job(tmp_path / "eval", "evaluate", labels=LABELS,
                          cases=[{"name": "scan", "label": label, "prediction": label}])
    events = []
    assert jobrunner.run_job(path, events.append) == jobs.EXIT_DONE
    scores = next(e for e in events if e["event"] == "scores")
    assert [(s["name"], s["dice"]) for s in scores["labels"]] == [("ball", 1.0), ("box", 1.0)]
    written = json.loads(Path(scores["path"]).read_text(encoding="utf-8"))
    assert written["mean"]["dice"] == 1.0


def test_cli_run_prints_json_lines_with_the_exit_codes(tmp_path, base_model, capsys):
    _, label = synthetic_case()
    wrong = sitk.GetArrayFromImage(label)
    wrong[wrong == 2] = 0
    path = jobs.write_job(tmp_path / "eval", "evaluate", labels=LABELS,
                          cases=[{"name": "scan", "label": label,
                                  "prediction": make_image(wrong, spacing=(2, 2, 2),
                                                           origin=(10, -20, 5))}])
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    events = [json.loads(line) for line in out.splitlines()]  # every line is one event
    assert [e["event"] for e in events] == ["case", "scores", "done"]
    box = events[1]["labels"][1]
    assert box["name"] == "box" and box["dice"] == 0.0 and box["hd95_mm"] is None  # inf

    path.write_text("{}")
    assert cli.main(["run", str(path)]) == cli.EXIT_USER_ERROR
    assert json.loads(capsys.readouterr().out)["event"] == "error"

    # A training job cancelled through its cancel file saves and exits with status 3.
    path = finetune_job(tmp_path / "train", base_model)
    (path.parent / jobs.CANCEL_FILE).touch()
    assert cli.main(["run", str(path)]) == cli.EXIT_CANCELLED
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "cancelled"
    assert Path(events[-1]["model"]).is_file()


@pytest.mark.parametrize("what", ["edited", "deleted"])
def test_a_job_whose_files_change_while_it_runs_stops_with_a_clear_error(tmp_path, base_model,
                                                                         what):
    path = finetune_job(tmp_path / "job", base_model)
    events = []

    def meddle(event):
        events.append(event)
        if event["event"] == "step" and len(events) < 50:
            if what == "edited":
                text = path.read_text(encoding="utf-8")
                path.write_text(text.replace('"steps": 6', '"steps": 600'))
            else:
                shutil.rmtree(path.parent)

    assert jobrunner.run_job(path, meddle) == jobs.EXIT_USER_ERROR
    last = events[-1]
    assert last["event"] == "error" and "while the job ran" in last["message"]
    assert ("was changed" if what == "edited" else "job folder") in last["message"]
    assert sum(e["event"] == "step" for e in events) == 1


def test_a_crash_is_an_error_event_with_the_traceback_on_stderr(tmp_path, monkeypatch, capsys):
    _, label = synthetic_case()
    path = jobs.write_job(tmp_path / "eval", "evaluate",
                          cases=[{"name": "scan", "label": label, "prediction": label}])

    def broken(job, emit):
        return 1 / 0

    monkeypatch.setattr(jobrunner, "_run_evaluate", broken)
    events = []
    assert jobrunner.run_job(path, events.append) == jobs.EXIT_CRASH
    assert events[-1]["event"] == "error" and events[-1]["crash"]
    assert "ZeroDivisionError" in events[-1]["message"]
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the child process
def test_a_finetune_child_reports_events_while_it_runs_and_cancels_cleanly(tmp_path,
                                                                          base_model):
    path = finetune_job(tmp_path / "job", base_model, steps=5000, val_every=5000,
                        checkpoint_every=5000)
    process = jobs.JobProcess(path, env=QUIET_ENV).start()
    events, deadline = [], time.monotonic() + 180
    while sum(e["event"] == "step" for e in events) < 2:  # steps 1 and 11, while it trains
        events += process.poll()
        assert process.running, process.log_tail()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    step = next(e for e in events if e["event"] == "step")
    assert {"loss", "lr", "eta_s", "step", "steps"} <= set(step)

    start = time.monotonic()
    process.cancel()
    elapsed = time.monotonic() - start
    assert elapsed < 0.5, elapsed  # cancel never blocks (the GUI calls it)
    assert process.wait(timeout=60) == jobs.EXIT_CANCELLED
    events += process.poll()
    # The trainer saw the cancel file: it saved, said so and exited with the cancelled status.
    assert process.error is None
    kinds = [e["event"] for e in events if e["event"] not in ("log", "message")]
    assert kinds[0] == "start" and kinds[-1] == "cancelled" and kinds.count("cancelled") == 1
    assert events[-1]["step"] < 5000
    assert Path(events[-1]["model"]) == path.parent / "output" / "model.safetensors"
    assert checkpoint.read_card(events[-1]["model"]).labels == {0: "background", **LABELS}


@POSIX
@pytest.mark.parametrize("stubborn", [False, True], ids=["obeys-sigterm", "ignores-sigterm"])
def test_cancel_ends_the_child_and_its_children_within_two_seconds(tmp_path, stubborn):
    script = fake_python(tmp_path, ("trap '' TERM\n" if stubborn else "") + (
        'sleep 60 &\n'
        'echo "{\\"event\\": \\"spawned\\", \\"pid\\": $!}"\n'
        'echo "working" >&2\n'
        'while :; do sleep 0.2; done\n'))
    process = jobs.JobProcess(tmp_path / "job.json", python=script).start()
    spawned = None
    deadline = time.monotonic() + 10
    while spawned is None:
        spawned = next((e for e in process.poll() if e["event"] == "spawned"), None)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child, grandchild = process.pid, spawned["pid"]
    assert alive(child) and alive(grandchild)

    start = time.monotonic()
    process.cancel(timeout=0.3)  # it ignores the cancel file: signals follow
    assert time.monotonic() - start < 0.5
    while (alive(child) or alive(grandchild)) and time.monotonic() - start < 5:
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    assert not alive(child) and not alive(grandchild)
    assert elapsed < 2.0, elapsed
    assert process.wait(timeout=5) is not None and not process.running
    assert process.returncode == (-signal.SIGKILL if stubborn else -signal.SIGTERM)
    assert process.cancelled and process.error is None
    assert [e["event"] for e in process.poll() if e["event"] != "log"] == ["cancelled"]


def launcher(tmp_path: Path, real: str | Path = sys.executable) -> Path:
    """A stand-in for PythonSlicer (CTKAppLauncher): it runs the real interpreter (``real``)
    as its child, forwards no signal, dies of SIGTERM at once, exits with its child's status."""
    script = tmp_path / "PythonSlicer"
    script.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        f"child = subprocess.Popen([{str(real)!r}, *sys.argv[1:]])\n"
        "sys.exit(child.wait())\n")
    script.chmod(0o755)
    return script


def wait_for_steps(job: jobs.JobProcess, count: int, timeout: float = 180) -> list[dict]:
    events, deadline = [], time.monotonic() + timeout
    while sum(e["event"] == "step" for e in events) < count:
        events += job.poll()
        assert job.running, job.log_tail()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return events


@POSIX
def test_cancel_under_a_launcher_saves_the_model_so_far_then_ends_the_tree(tmp_path,
                                                                          base_model):
    path = finetune_job(tmp_path / "job", base_model, steps=5000, val_every=5000,
                        checkpoint_every=5000)
    job = jobs.JobProcess(path, python=launcher(tmp_path), env=QUIET_ENV).start()
    events = wait_for_steps(job, 2)
    tree = process.descendants(job.pid)
    assert tree, "the launcher runs the interpreter as its child"
    start = time.monotonic()
    job.cancel()
    assert time.monotonic() - start < 0.5  # never blocks the GUI
    assert (path.parent / jobs.CANCEL_FILE).exists()
    assert job.wait(timeout=90) == jobs.EXIT_CANCELLED, job.log_tail()
    events += job.poll()
    cancelled = [e for e in events if e["event"] == "cancelled"]
    assert len(cancelled) == 1 and 0 < cancelled[0]["step"] < 5000
    model = Path(cancelled[0]["model"])
    assert model == path.parent / "output" / "model.safetensors"
    assert checkpoint.read_card(model).labels == {0: "background", **LABELS}
    checkpoint.load_model(model)  # the model so far is usable
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in [job.pid, *tree]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in [job.pid, *tree])
    assert job.error is None and job.cancelled


@POSIX
def test_a_cancelled_child_that_does_not_stop_is_ended_with_all_it_started(tmp_path):
    """Under a launcher that dies of SIGTERM, a grandchild that ignores the cancel file."""
    script = fake_python(tmp_path, (
        "trap '' TERM\n"
        "sleep 60 &\n"
        'echo "{\\"event\\": \\"spawned\\", \\"pid\\": $!}"\n'
        "while :; do sleep 0.2; done\n"))
    job = process.ChildProcess([launcher(tmp_path, script)], cancel_file=tmp_path / "cancel",
                               grace_s=0.3).start()
    deadline, spawned = time.monotonic() + 10, None
    while spawned is None:
        spawned = next((e for e in job.poll() if e["event"] == "spawned"), None)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pids = [job.pid, *process.descendants(job.pid)]
    assert spawned["pid"] in pids and len(pids) >= 3  # launcher, shell, sleep
    job.cancel()
    assert job.wait(timeout=10) is not None
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(alive(pid) for pid in pids)
    assert [e["event"] for e in job.poll() if e["event"] != "log"] == ["cancelled"]


def test_a_cancelled_segmentation_stops_between_cases_and_leaves_no_partial_file(
        tmp_path, base_model):
    image, _ = synthetic_case()
    cases = [{"name": f"scan {n}", "image": image} for n in range(40)]
    path = jobs.write_job(tmp_path / "job", "segment", cases=cases,
                          params={"model": str(base_model), "device": "cpu"})
    job = jobs.JobProcess(path, env=QUIET_ENV).start()
    events, deadline = [], time.monotonic() + 120
    while not any(e["event"] == "segmented" for e in events):
        events += job.poll()
        assert job.running, job.log_tail()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.cancel()
    assert job.wait(timeout=30) == jobs.EXIT_CANCELLED
    events += job.poll()
    assert events[-1]["event"] == "cancelled"
    written = sorted((path.parent / "output").iterdir())
    segmented = [e for e in events if e["event"] == "segmented"]
    assert 1 <= len(written) == len(segmented) < 40
    assert all(not p.name.startswith(".") for p in written)  # no partial file
    assert all(volumes.read_label(p).GetSize() == image.GetSize() for p in written)


def test_the_default_grace_follows_the_job_kind(tmp_path, base_model):
    image, _ = synthetic_case()
    segment = jobs.write_job(tmp_path / "s", "segment", cases=[{"name": "a", "image": image}],
                             params={"model": str(base_model)})
    train = finetune_job(tmp_path / "f", base_model)
    assert jobs.JobProcess(segment).grace_s == jobs.GRACE_S["segment"] < 10
    assert jobs.JobProcess(train).grace_s == jobs.GRACE_S["finetune"] >= 60
    assert jobs.JobProcess(train, grace_s=1).grace_s == 1
    assert jobs.JobProcess(train).cancel_file == train.parent / jobs.CANCEL_FILE


def test_a_job_naming_a_missing_model_reports_its_error(tmp_path):
    image, _ = synthetic_case()
    missing = tmp_path / "gone.safetensors"
    path = jobs.write_job(tmp_path / "job", "segment", cases=[{"name": "scan", "image": image}],
                          params={"model": str(missing)})
    process = jobs.JobProcess(path, env=QUIET_ENV).start()
    assert process.wait(timeout=60) == jobs.EXIT_USER_ERROR
    errors = [e for e in process.poll() if e["event"] == "error"]
    assert len(errors) == 1 and str(missing) in errors[0]["message"]
    assert process.error == errors[0]["message"] and "does not exist" in process.error


@POSIX
def test_a_child_killed_with_sigkill_reports_out_of_memory_and_its_log(tmp_path):
    script = fake_python(tmp_path, (
        'echo "reading 12 cases"\n'
        'echo \'{"event": "step", "step": 1, "steps": 100}\'\n'
        'echo "allocating 80 GB" >&2\n'
        'kill -9 $$\n'))
    process = jobs.JobProcess(tmp_path / "job.json", python=script).start()
    assert process.wait(timeout=10) == -signal.SIGKILL
    events = process.poll()
    assert [e["event"] for e in events if e["event"] != "log"] == ["step", "error"]
    assert {"event": "log", "text": "reading 12 cases", "stream": "stdout"} in events
    assert "out of memory" in process.error
    assert "reading 12 cases" in process.error and "allocating 80 GB" in process.error
    assert events[-1]["message"] == process.error and events[-1]["returncode"] == -9
    # stdout and stderr are read by two threads: their relative order is not kept.
    assert set(process.log_tail(2).splitlines()) == {"reading 12 cases", "allocating 80 GB"}


@POSIX
def test_the_log_tail_is_a_capped_ring_buffer(tmp_path):
    count = process.LOG_LINES + 500
    script = fake_python(tmp_path, f"seq 1 {count}\nexit 4\n")
    job = jobs.JobProcess(tmp_path / "job.json", python=script).start()
    assert job.wait(timeout=20) == 4
    assert job.log_tail(3) == "\n".join(str(n) for n in range(count - 2, count + 1))
    assert len(job.log_tail(10**6).splitlines()) == process.LOG_LINES
    assert "exit code 4" in job.error and str(count) in job.error


@POSIX
def test_a_child_that_finishes_reports_no_error(tmp_path):
    script = fake_python(tmp_path, 'echo \'{"event": "done", "status": "done"}\'\n')
    process = jobs.JobProcess(tmp_path / "job.json", python=script).start()
    assert process.wait(timeout=10) == 0
    assert process.poll() == [{"event": "done", "status": "done"}]
    assert not process.running and process.error is None and not process.cancelled


def test_a_program_that_cannot_start_is_an_input_error(tmp_path):
    process = jobs.JobProcess(tmp_path / "job.json", python=tmp_path / "no-python")
    with pytest.raises(InputError, match="Could not start the job"):
        process.start()
    assert not process.running


def test_the_job_command_runs_this_library():
    process = jobs.JobProcess("/data/job 1/job.json", python=sys.executable)
    assert process.command() == [sys.executable, "-m", "TransferSegLib", "run",
                                 str(Path("/data/job 1/job.json"))]


# --- what a run costs ------------------------------------------------------------------------

def test_the_gpu_need_a_card_records_scales_with_batch_and_patch_and_warns(monkeypatch):
    from TransferSegLib import resources

    metrics = {"train_gpu_peak_gb": 4.0, "train_batch_size": 2, "train_patch_size": [64] * 3}
    assert resources.training_need_gb({}, [64] * 3, 2) is None  # nothing measured: no guess
    assert resources.training_need_gb(metrics, [64] * 3, 2) == pytest.approx(
        4.0 * resources.MARGIN)
    assert resources.training_need_gb(metrics, [128, 64, 64], 4) == pytest.approx(
        16.0 * resources.MARGIN)
    assert resources.memory_warning(metrics, [64] * 3, 2, "cpu") is None  # no GPU, no warning
    monkeypatch.setattr(resources, "free_gpu_gb", lambda device: 3.0)
    warning = resources.memory_warning(metrics, [64] * 3, 2, "cuda")
    assert "3.0 GB free" in warning and "4.6 GB" in warning and "batch size" in warning
    monkeypatch.setattr(resources, "free_gpu_gb", lambda device: 40.0)
    assert resources.memory_warning(metrics, [64] * 3, 2, "cuda") is None
    used = resources.peak("cpu")
    assert "gpu_peak_gb" not in used and used.get("cpu_peak_rss_gb", 1) > 0


def test_jobs_report_what_they_cost_and_a_short_gpu_is_warned_before_training(
        tmp_path, base_model, monkeypatch):
    from TransferSegLib import resources

    model, card = checkpoint.load_model(base_model)
    recorded_metrics = {"train_gpu_peak_gb": 9.0, "train_batch_size": 1,
                        "train_patch_size": [16, 16, 16]}
    recorded = checkpoint.save_model(tmp_path / "measured.safetensors", model, dataclasses_replace(
        card, metrics=recorded_metrics))
    monkeypatch.setattr(resources, "free_gpu_gb", lambda device: 2.0)  # a GPU short of memory
    events = []
    path = finetune_job(tmp_path / "job", recorded, steps=2)
    assert jobrunner.run_job(path, events.append) == jobs.EXIT_DONE
    messages = [e["message"] for e in events if e["event"] == "message"]
    done = next(e for e in events if e["event"] == "done")
    assert done["cpu_peak_rss_gb"] > 0 and "gpu_peak_gb" not in done  # trained on the CPU
    # The need is scaled from the base's measured patch to the patch this run trains on.
    _, trained = checkpoint.load_model(Path(done["model"]))
    need = resources.training_need_gb(recorded_metrics, trained.patch_size, 1)
    assert need > 2.0
    assert any("2.0 GB free" in m and f"{need:.1f} GB" in m for m in messages)
    # The new model keeps the base's measured need (nothing was measured on a GPU here).
    assert trained.metrics["train_gpu_peak_gb"] == 9.0

    image, _ = synthetic_case()
    segment = jobs.write_job(tmp_path / "seg", "segment", cases=[{"name": "a", "image": image}],
                             params={"model": str(base_model), "device": "cpu"})
    events = []
    assert jobrunner.run_job(segment, events.append) == jobs.EXIT_DONE
    segmented = next(e for e in events if e["event"] == "segmented")
    assert segmented["seconds"] >= 0 and segmented["cpu_peak_rss_gb"] > 0


def test_events_round_trip_as_json_lines_and_other_output_is_not_an_event():
    from TransferSegLib import events

    step = events.step(10, 100, 0.5, lr=1e-3, eta_s=float("inf"))
    line = events.to_line(step)
    assert line.endswith("\n") and "Infinity" not in line  # strict JSON for every reader
    assert events.from_line(line) == {**step, "eta_s": None}
    assert events.from_line("not json") is None and events.from_line('{"no": "kind"}') is None
    assert events.from_line("[1, 2]") is None
    assert events.done(model="m")["status"] == "done"
    assert events.done(status="stopped early")["status"] == "stopped early"
    assert set(events.TERMINAL) == {"done", "cancelled", "error"}
