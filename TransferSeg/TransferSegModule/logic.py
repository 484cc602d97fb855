"""The TransferSeg module's logic: scene nodes <-> TransferSegLib jobs, without Qt or the app.

:class:`Logic` takes what it needs as arguments (SlicerNNUnet's pattern): the MRML scene, a
function returning the parameter node, one making a training pair, and the factories of the
child processes (a job, a model download). Inside Slicer, ``TransferSegLogic`` passes the real
ones; the tests pass a real ``slicer-core`` scene and an in-process stand-in process.

One job runs at a time (``busy``); :meth:`Logic.poll` feeds its events to ``monitor`` and,
when the job has ended, completes it (a new segmentation node, a registered model, scores) and
returns what the panel shows. Nothing here raises from :meth:`Logic.poll`: an error while
completing a job becomes a message and leaves the logic idle and consistent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from TransferSegModule import annotation, dependencies, environment, jobstate, matching, scene

LOG_LINES = 2000
# A download stops at its next chunk (its partial file is kept to resume); the grace covers
# the child's start-up on a busy computer and a slow chunk.
FETCH_GRACE_S = 30.0


# --- what each kind of job needs when it ends ----------------------------------------------------

@dataclass
class FetchJob:
    model: str


@dataclass
class TrainJob:
    base_id: str
    strategy: str
    training_cases: list
    validation_cases: list


@dataclass
class SegmentJob:
    """A segmentation: of the input volume (``segment``), the next volume of the annotate loop
    (``loop``), or the validation pairs after a round (``rescore``)."""

    purpose: str
    model: str
    model_id: str
    volumes: list
    names: list
    pairs: list = field(default_factory=list)
    round: int = 0


@dataclass
class PollResult:
    """What one poll produced: log lines, the message of a job that ended, an error to show."""

    lines: list
    finished: str | None = None
    error: str | None = None


def job_process(job_json: Path):
    """The child process of a job written to ``job_json`` (PythonSlicer inside Slicer)."""
    from TransferSegLib import jobs

    return jobs.JobProcess(job_json, python=dependencies.job_python())


def fetch_process(command, folder: Path):
    """The child process of a model download (``environment.fetch_command``) in ``folder``."""
    from TransferSegLib.process import ChildProcess, child_environment

    return ChildProcess(command, env=child_environment(),
                        cancel_file=folder / "cancel", grace_s=FETCH_GRACE_S)


class Logic:
    """Scene nodes <-> TransferSegLib jobs. No Qt: usable from the Python console and tests."""

    def __init__(self, mrml_scene, parameters: Callable, make_pair: Callable,
                 make_job_process: Callable = job_process,
                 make_fetch_process: Callable = fetch_process,
                 run_folder: Callable = dependencies.run_folder):
        self.scene, self.parameters, self.make_pair = mrml_scene, parameters, make_pair
        self.make_job_process, self.make_fetch_process = make_job_process, make_fetch_process
        self.run_folder = run_folder
        self.monitor, self.rounds = jobstate.JobMonitor(), annotation.RoundHistory()
        self.job, self.context, self.lastVolume = None, None, None
        self.loopPredictions = {}  # loop segmentation ID -> (label map, names, round)
        self.validationNote = ""  # what the validation Dice of the last fine-tune measures
        self.diceLabel = "validation Dice"  # its short name, for the Dice bar
        self._ready = False

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def jobKind(self) -> str:
        """fetch, finetune, segment, loop or rescore ("" when idle)."""
        return self.jobKind_of(self.context) if self.context is not None else ""

    # --- dependencies ----------------------------------------------------------------------------
    def missingDependencies(self) -> list:
        """What must be installed before the library can run (cached once all is there)."""
        missing = [] if self._ready else dependencies.missing()
        self._ready = not missing
        return missing

    def installDependencies(self):
        dependencies.install()
        self._ready = False

    # --- models ----------------------------------------------------------------------------------
    def models(self) -> list:
        from TransferSegLib import zoo

        return zoo.list_models()

    def modelEntry(self, model_id):
        return next((m for m in self.models() if m["id"] == model_id), None)

    def modelFile(self, model_id) -> Path:
        """The model file of a catalog or registry id, or of a path to one."""
        from TransferSegLib import zoo

        if str(model_id).endswith(".safetensors"):
            return Path(model_id)
        entry = self.modelEntry(model_id)
        if entry is None:
            raise ValueError("Choose a base model in the Base model section first.")
        if not entry["cached"]:
            raise ValueError(f"{entry['title']} is not on this computer yet: click Fetch, or "
                             "Import file if you downloaded its weights yourself.")
        return zoo.model_path(model_id)

    def modelLabels(self, model_id) -> dict:
        """``{channel: name}`` of a model: from its file when it is here, else the catalog's."""
        entry = self.modelEntry(model_id)
        if entry is None:
            return {}
        if entry["cached"]:
            from TransferSegLib.checkpoint import read_card

            return dict(read_card(self.modelFile(model_id)).labels)
        return matching.catalog_labels(entry.get("labels"))

    def importRequirements(self, model_id, path=None) -> list:
        """Packages (onnx, h5py) that importing ``model_id`` from its catalog files, or from
        the file ``path`` the user downloaded, needs and that are not installed."""
        from TransferSegLib import zoo

        names = [path] if path else [f["name"] for f in zoo.entry(model_id).get("files", [])]
        return dependencies.missing_for_import(names)

    def startFetch(self, model_id, accept_unverified=False):
        folder = self.run_folder("fetch")
        command = environment.fetch_command(dependencies.job_python(), model_id, accept_unverified,
                                      cancel_file=folder / "cancel")
        self._begin(self.make_fetch_process(command, folder), FetchJob(model_id), 0)

    def importModel(self, model_id, path, accept_unverified=False) -> Path:
        from TransferSegLib import zoo

        return zoo.import_file(model_id, path, accept_unverified=accept_unverified, log=print)

    def addModelFile(self, path) -> str:
        """Add a TransferSeg model file, or import an nnU-Net v2 model (its result folder's
        plans.json, the folder's zip, or a checkpoint .pth); returns the model's id."""
        from TransferSegLib import zoo
        from TransferSegLib.importers import nnunet

        taken = [m["id"] for m in self.models()]
        path = Path(path)
        if path.name == "plans.json":  # chosen inside an nnU-Net result folder
            path = path.parent
        if nnunet.is_nnunet(path):  # a result folder, its zip or a checkpoint: imported once
            return zoo.import_nnunet(path, log=print).parent.name
        return zoo.register(path, matching.unique_name(path.stem, set(taken)))["id"]

    # --- training data ---------------------------------------------------------------------------
    def addPair(self, p, volume, segmentation, validation=False):
        if any(pair.segmentation and pair.segmentation.GetID() == segmentation.GetID()
               for pair in p.pairs):
            raise ValueError(f"{segmentation.GetName()} is in the training set already.")
        p.pairs = [*p.pairs, self.make_pair(volume, segmentation, validation)]

    def removePair(self, p, row):
        p.pairs = [pair for index, pair in enumerate(p.pairs) if index != row]

    def setValidation(self, p, row, validation):
        pairs = list(p.pairs)
        pairs[row] = self.make_pair(pairs[row].volume, pairs[row].segmentation, validation)
        p.pairs = pairs

    def mapping(self, p) -> dict:
        """Segment name -> label for every segment of the pairs; the user's choices win."""
        names = dict.fromkeys(n for pair in p.pairs for n in scene.segment_names(pair.segmentation))
        matched = matching.match_segments(names, self.modelLabels(p.model))
        return {name: p.labelMapping.get(name, matched[name]) for name in names}

    def setMapping(self, p, segment, label):
        p.labelMapping = {**p.labelMapping, segment: label}

    # --- jobs ------------------------------------------------------------------------------------
    def _begin(self, process, context, steps):
        monitor = jobstate.JobMonitor(self.jobKind_of(context), LOG_LINES)
        monitor.start(steps)
        process.start()  # raises before anything changes when the program cannot start
        self.job, self.context, self.monitor = process, context, monitor

    @staticmethod
    def jobKind_of(context) -> str:
        return {FetchJob: "fetch", TrainJob: "finetune"}.get(type(context)) or context.purpose

    def _startJob(self, kind, purpose, cases, labels, params, context, steps=0, terminology=None):
        from TransferSegLib import jobs

        folder = self.run_folder(purpose)
        job_json = jobs.write_job(folder, kind, cases=cases, labels=labels, params=params,
                                  terminology=terminology)
        self._begin(self.make_job_process(job_json), context, steps)

    def startFineTune(self, p):
        pairs = [(pair.volume, pair.segmentation, pair.validation) for pair in p.pairs]
        self.startTraining(self.modelFile(p.model) if p.model else None, pairs, self.mapping(p),
                           p.strategy, p.steps, p.learningRate, p.device, base_id=p.model)

    def startTraining(self, base, pairs, mapping, strategy, steps, lr, device, base_id=""):
        """Fine-tune model file ``base`` (None: scratch) on ``pairs`` of (volume, segmentation,
        validation); segment names map to label names by ``mapping``. Pairs marked for
        validation are not trained on: the trainer validates on them (and chooses its best
        model by them), and they are re-scored with each new model. Without any, the trainer
        validates on the training pairs, and ``validationNote`` says so."""
        if base is None and strategy != "scratch":
            raise ValueError("Choose a base model (only the scratch strategy needs none).")
        training = [(volume, segmentation) for volume, segmentation, held in pairs if not held]
        held_out = [(volume, segmentation) for volume, segmentation, held in pairs if held]
        if not training:
            raise ValueError("Add a training pair: every pair is marked for validation.")
        labels = matching.training_labels(mapping, self.modelLabels(base_id) if base_id else {})
        if len(labels) < 2:
            raise ValueError("No segment is mapped to a label: choose labels under Training data.")
        taken = set()
        cases = [scene.training_case(v, s, mapping, labels, taken) for v, s in training]
        validation = [{**scene.training_case(v, s, mapping, labels, taken), "validation": True}
                      for v, s in held_out]
        params = {"base": str(base) if base else None, "strategy": strategy, "steps": int(steps),
                  "device": device}
        if lr and float(lr) > 0:  # else the strategy's own default rate
            params["lr"] = float(lr)
        if base is None:
            params["architecture"] = "unet"
        context = TrainJob(base_id, strategy, [c["name"] for c in cases],
                           [c["name"] for c in validation])
        terminology = scene.training_terminology([s for _, s, _ in pairs], mapping)
        self._startJob("finetune", "finetune", cases + validation, labels, params, context, steps,
                       terminology={n: t for n, t in terminology.items() if n in labels.values()})
        self.validationNote = (
            f"validation Dice on {len(validation)} held-out pair(s)" if validation else
            "validation Dice on the training pairs (mark a pair for validation to measure on "
            "a scan the model does not train on)")
        self.diceLabel = "held-out Dice" if validation else "Dice on the training pairs"

    def startSegment(self, volume, model, device="auto", purpose="segment", pairs=()):
        """Segment ``volume`` (or the volumes of ``pairs``) with ``model`` (an id or a model
        file) in a child process; results become NEW segmentation nodes, never the user's."""
        from TransferSegLib import mrml

        path, taken = self.modelFile(model), set()
        volumes = [volume] if volume is not None else [pair.volume for pair in pairs]
        cases = [{"name": matching.unique_name(v.GetName(), taken),
                  "image": mrml.volume_to_image(v), "label": None} for v in volumes]
        context = SegmentJob(purpose, str(path), str(model), [v.GetID() for v in volumes],
                             [c["name"] for c in cases], list(pairs))
        self._startJob("segment", purpose, cases, None, {"model": str(path), "device": device},
                       context)

    def poll(self) -> PollResult:
        """The job's new events as log lines; once it has ended, it is completed here. Never
        raises: a failure to complete becomes ``error``, and the logic is idle again."""
        if self.job is None:
            return PollResult([])
        lines = self.monitor.update(self.job.poll())
        if self.monitor.active and self.job.running:
            return PollResult(lines)
        if self.monitor.active:  # it ended without a final event (a crash), or was cancelled
            lines += self.monitor.update(self.job.poll())
            lines += self.monitor.finish(self.job.returncode, self.job.log_tail(5) or "")
        try:
            return PollResult(lines, finished=self.completeJob())
        except Exception as error:  # shown by the panel; the logic stays usable
            self.job, self.context = None, None
            return PollResult(lines, finished=f"failed: {error}", error=str(error))

    def wait(self, timeout_s=3600.0, idle=lambda: None) -> str:
        """Poll until the job ends, then complete it (for scripts and the self-test)."""
        deadline = time.monotonic() + timeout_s
        cancelled = False
        while self.busy:
            result = self.poll()
            if result.finished is not None:
                if result.error:
                    raise RuntimeError(result.error)
                if not self.busy:
                    return result.finished
            if not cancelled and time.monotonic() > deadline:
                self.cancel()
                cancelled = True
            idle()
            time.sleep(0.2)
        return ""

    def cancel(self):
        """Ask the running job to stop; returns at once (the job saves what it has first)."""
        if self.job is not None:
            self.monitor.request_cancel()
            self.job.cancel()

    def completeJob(self) -> str:
        """Act on the job that ended; returns a message. May start the next job of a chain."""
        context, monitor = self.context, self.monitor
        self.job, self.context, self.lastVolume = None, None, None
        if isinstance(context, TrainJob):
            saved = monitor.model and Path(monitor.model).exists()
            if monitor.state == jobstate.CANCELLED and saved:
                return self._newRound(context, monitor, cancelled_at=monitor.step)
            if monitor.state == jobstate.DONE:
                return self._newRound(context, monitor)
        if monitor.state != jobstate.DONE:
            return f"{self.jobKind_of(context) if context else 'job'}: {monitor.status}"
        if isinstance(context, FetchJob):
            return f"{context.model} is ready."
        outputs = jobstate.job_outputs(monitor, context.names)
        names = scene.output_names(context.model)
        if context.purpose == "rescore":
            for output, pair in zip(outputs, context.pairs, strict=True):
                label, table, _, _ = scene.read_output(output, names)
                self.rounds.record(context.round, pair.volume.GetName(), scene.mean_dice(
                    scene.score(label, table, pair.segmentation, pair.volume)))
            self._writeRounds()
            worse = self.rounds.forgetting()
            return ("Validation cases re-scored; none got worse." if not worse else "Forgetting: "
                    + ", ".join(f"{c} {a:.3f} -> {b:.3f}" for c, (a, b) in worse.items()))
        volume = self.scene.GetNodeByID(context.volumes[0])
        if volume is None:
            raise ValueError("The volume that was segmented is no longer in the scene; the "
                             f"result is kept in {outputs[0]}.")
        label, table, colours, terminology = scene.read_output(outputs[0], names)
        title = f"{volume.GetName()} TransferSeg"
        if context.purpose == "loop":
            number = self.rounds.current or self.rounds.begin(context.model_id, [])
            title += f" round {number}"
        node = scene.new_segmentation(self.scene, label, table, colours, volume, title,
                                      terminology)
        p, self.lastVolume = self.parameters(), volume
        if context.purpose == "loop":
            self.loopPredictions[node.GetID()] = (label, table, self.rounds.current)
            p.loopSegmentation = node
        else:
            p.prediction = node
        return f"Segmented into the new segmentation '{node.GetName()}'."

    def _newRound(self, context: TrainJob, monitor, cancelled_at: int | None = None) -> str:
        """Register the fine-tuned model (also the model so far of a cancelled run), make it
        the one in use, and re-score the validation pairs with it (a chained segmentation)."""
        from TransferSegLib import zoo

        taken = [m["id"] for m in self.models()]
        model_id = matching.fine_tuned_id(context.base_id, context.strategy, taken)
        title = f"{model_id} (cancelled at step {cancelled_at})" if cancelled_at is not None \
            else None
        zoo.register(monitor.model, model_id, title=title)
        p = self.parameters()
        p.model = model_id
        number = self.rounds.begin(model_id, context.training_cases)
        best = f"{monitor.best_dice:.3f}" if monitor.best_dice is not None else "not measured"
        message = (f"Round {number}: model {model_id}"
                   + (f", cancelled at step {cancelled_at}" if cancelled_at is not None else "")
                   + f", best {self.validationNote or 'validation Dice'} {best}.")
        held = [pair for pair in p.pairs if pair.validation]
        if held:
            self.startSegment(None, model_id, p.device, "rescore", pairs=held)
            self.context.round = number
            message += f" Re-scoring {len(held)} validation case(s)..."
        return message

    def addLoopCase(self, p) -> str:
        """Add the corrected loop segmentation to the training set. The model's prediction is
        scored against the correction first: a Dice on a case the model had not seen."""
        segmentation, volume, message = p.loopSegmentation, p.nextVolume, ""
        if segmentation.GetID() in self.loopPredictions:
            label, table, number = self.loopPredictions.pop(segmentation.GetID())
            dice = scene.mean_dice(scene.score(label, table, segmentation, volume))
            self.rounds.record(number, volume.GetName(), dice)
            self._writeRounds()
            message = f"Before your corrections the round {number} model scored Dice {dice:.3f}. "
        self.addPair(p, volume, segmentation)
        p.nextVolume, p.loopSegmentation = None, None
        return message + f"Added: the training set has {len(p.pairs)} pair(s)."

    # --- scores and rounds in the scene ----------------------------------------------------------
    def evaluate(self, p) -> str:
        """Dice, HD95 and volumes of ``p.prediction`` against ``p.reference`` (segments matched
        by name, on ``p.inputVolume``'s grid) into the table ``p.scores``; returns the mean."""
        scores = scene.score_nodes(p.prediction, p.reference, p.inputVolume)
        if not p.scores:
            p.scores = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "TransferSeg scores")
        return scene.write_scores(p.scores, scores)

    def roundsTable(self):
        return scene.singleton(self.scene, "vtkMRMLTableNode", "rounds", "TransferSeg rounds")

    def _writeRounds(self):
        header, rows = self.rounds.table()
        scene.write_table(self.roundsTable(), header, rows, text_columns=(0,))

    def roundText(self) -> str:
        if not self.rounds.current:
            return "No round yet: segment the next volume or fine-tune to start."
        last = self.rounds.rounds[-1]
        return (f"Round {self.rounds.current}: {last['model']}, trained on "
                f"{len(last['training_cases'])} case(s).")
