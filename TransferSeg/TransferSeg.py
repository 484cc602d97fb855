"""TransferSeg: adapt a published segmentation model to your own scans, inside 3D Slicer.

Pick a base model, add a few (volume, segmentation) pairs from the scene, fine-tune, segment new
volumes and score them, then loop: segment the next volume, correct it in Segment Editor, add
it, fine-tune again. The module is a thin shell over TransferSegLib: the widget reads the
parameter node and calls the logic; the logic turns nodes into jobs that run in a child Python
(PythonSlicer) and report JSON events, which the widget's timer polls. The parts without Qt
live in the TransferSegModule package: state (no Slicer either), scene (MRML only) and
dependencies.
"""

import os
import shutil
import time
from pathlib import Path
from typing import Annotated
from unittest import mock

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import (
    Choice,
    Default,
    WithinRange,
    parameterNodeWrapper,
    parameterPack,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from TransferSegModule import dependencies, scene, state

dependencies.make_library_importable()
POLL_MS, LOG_LINES = 500, 2000


class TransferSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "TransferSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["TransferSeg developers"]
        self.parent.helpText = (
            "Fine-tune a published 3D segmentation model on a few of your own annotated scans, "
            "segment new volumes with it and measure Dice against a reference. Training runs in "
            "a separate process on the GPU or the CPU: Slicer stays responsive and Cancel always "
            "works. See <a href='https://github.com/transferseg/SlicerTransferSeg'>the "
            "documentation</a>.")
        self.parent.acknowledgementText = (
            "TransferSeg builds on PyTorch, MONAI and SimpleITK, and on the published models "
            "of its catalog; each keeps its own licence, shown beside the model.")


@parameterPack
class TrainingPair:
    volume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    validation: bool = False  # held out of training, re-scored after every round


@parameterNodeWrapper
class TransferSegParameterNode:
    """What the panel shows; saved with the scene."""

    modelSearch: str
    model: str  # catalog or registry id of the model in use
    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    pairs: list[TrainingPair]
    labelMapping: dict[str, str]  # segment name -> training label name ("" = ignore)
    strategy: Annotated[str, Choice(list(state.STRATEGIES)), Default("finetune")]
    steps: Annotated[int, WithinRange(1, 100000), Default(300)]
    # 0: each strategy's own learning rate (TransferSegLib.strategies.DEFAULTS)
    learningRate: Annotated[float, WithinRange(0.0, 1.0), Default(0.0)]
    device: Annotated[str, Choice(list(state.DEVICES)), Default("auto")]
    inputVolume: vtkMRMLScalarVolumeNode
    prediction: vtkMRMLSegmentationNode
    reference: vtkMRMLSegmentationNode
    scores: vtkMRMLTableNode
    nextVolume: vtkMRMLScalarVolumeNode
    loopSegmentation: vtkMRMLSegmentationNode


class TransferSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: reads the parameter node, calls the logic, shows what the logic reports."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic, self._parameterNode, self._guiTag, self._models = None, None, None, []
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TransferSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TransferSegLogic()
        self.ui.logText.setMaximumBlockCount(LOG_LINES)
        self.ui.gpuLabel.text = state.gpu_description(dependencies.gpus())
        self.plotWidget = None
        if hasattr(slicer, "qMRMLPlotWidget"):
            self.plotWidget = slicer.qMRMLPlotWidget()
            self.plotWidget.setMRMLScene(slicer.mrmlScene)
            self.plotWidget.minimumHeight = 200
            self.ui.plotFrame.layout().addWidget(self.plotWidget)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        ui = self.ui
        for button, action in {
            ui.installButton: lambda: None, ui.refreshModelsButton: self.showModels,
            ui.fetchModelButton: self.onFetch, ui.importModelButton: self.onImport,
            ui.addModelFileButton: self.onAddModelFile, ui.addPairButton: self.onAddPair,
            ui.removePairButton: self.onRemovePair, ui.matchLabelsButton: self.onMatchLabels,
            ui.startButton: self.onStartOrCancel, ui.fineTuneAgainButton: self.onStartOrCancel,
            ui.showPlotButton: self.onShowPlot, ui.evaluateButton: self.onEvaluate,
            ui.segmentButton: lambda: self.onSegment("inputVolume", "segment"),
            ui.segmentNextButton: lambda: self.onSegment("nextVolume", "loop"),
            ui.editButton: self.onEdit, ui.addToTrainingButton: self.onAddToTraining,
        }.items():
            button.connect("clicked(bool)", lambda _checked, action=action: self._do(action))
        ui.modelSearchEdit.connect("textChanged(QString)", lambda _text: self.listModels())
        ui.modelList.connect("currentRowChanged(int)", self.onModelSelected)
        ui.trainingPairsTable.connect("cellChanged(int,int)", self.onPairEdited)
        self.initializeParameterNode()

    # --- parameter node --------------------------------------------------------------------------
    def cleanup(self):
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass(
                "vtkMRMLScalarVolumeNode")
        if self.plotWidget is not None:
            self.plotWidget.setMRMLPlotViewNode(scene.plot_view(slicer.mrmlScene))
        self.ui.roundsTableView.setMRMLTableNode(self.logic.roundsTable())
        with slicer.util.tryWithErrorDisplay("TransferSeg could not read its models."):
            if not self.logic.missingDependencies():
                self.showModels()
            self.showPairs()

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None and self._guiTag is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self._guiTag = None
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._guiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self.updateGui()

    def updateGui(self, caller=None, event=None):
        p, busy, missing = self._parameterNode, self.logic.busy, self.logic.missingDependencies()
        self.ui.installButton.visible = bool(missing)
        self.ui.dependenciesLabel.text = f"Needs {', '.join(missing)}." if missing else ""
        if p is None:
            return
        training = busy and self.logic.jobKind == "finetune"
        self.ui.startButton.text = self.logic.monitor.button_text if training else "Start"
        self.ui.startButton.enabled = training or (not busy and bool(p.pairs))
        for button, ready in {
            self.ui.fineTuneAgainButton: p.pairs, self.ui.fetchModelButton: p.model,
            self.ui.importModelButton: p.model,
            self.ui.addPairButton: p.trainingVolume and p.trainingSegmentation,
            self.ui.segmentButton: p.inputVolume and p.model,
            self.ui.evaluateButton: p.prediction and p.reference and p.inputVolume,
            self.ui.segmentNextButton: p.nextVolume and p.model,
            self.ui.editButton: p.loopSegmentation and p.nextVolume,
            self.ui.addToTrainingButton: p.loopSegmentation and p.nextVolume,
        }.items():
            button.enabled = not busy and bool(ready)
        self.ui.roundLabel.text = self.logic.roundText()
        self.ui.modelInUseLabel.text = p.model or "(choose one under Base model)"
        self.ui.scoresTableView.setMRMLTableNode(p.scores)

    def _do(self, action):
        with slicer.util.tryWithErrorDisplay("TransferSeg could not finish this.", waitCursor=True):
            self.requireDependencies()  # every action needs the library, so install on first use
            action()
        self.updateGui()

    def requireDependencies(self):
        """Install what is missing, after the user agrees; raises if they do not."""
        missing = self.logic.missingDependencies()
        if not missing:
            return
        if not slicer.util.confirmOkCancelDisplay(
                f"TransferSeg needs {', '.join(missing)}. PyTorch comes from the PyTorch "
                "extension (a download of up to a few GB), the others from the Python package "
                "index; Slicer's own numpy and SimpleITK are not changed. Install now?",
                windowTitle="TransferSeg set-up"):
            raise RuntimeError("TransferSeg cannot work without " + ", ".join(missing) + ".")
        self.logic.installDependencies()
        self.showModels()

    # --- base model ------------------------------------------------------------------------------
    def showModels(self):
        self._models = self.logic.models()
        self.listModels()

    def listModels(self):
        current = self._parameterNode.model if self._parameterNode is not None else ""
        shown = state.filter_models(self._models, self.ui.modelSearchEdit.text)
        self.ui.modelList.blockSignals(True)
        self.ui.modelList.clear()
        for row, model in enumerate(shown):
            item = qt.QListWidgetItem(state.model_line(model))
            item.setData(qt.Qt.UserRole, model["id"])
            self.ui.modelList.addItem(item)
            if model["id"] == current:
                self.ui.modelList.setCurrentRow(row)
        self.ui.modelList.blockSignals(False)
        entry = next((m for m in self._models if m["id"] == current), None)
        self.ui.modelDetails.setHtml(state.model_details(entry) if entry else
                                     "Choose a base model from the list.")

    def onModelSelected(self, row):
        item = self.ui.modelList.item(row)
        if item is not None and self._parameterNode is not None:
            self._parameterNode.model = item.data(qt.Qt.UserRole)
            self.listModels()
            self.showMapping()

    def _trusted(self, entry) -> bool:
        return entry["verified"] or slicer.util.confirmYesNoDisplay(
            f"The weights of {entry['title']} cannot be verified (the catalog does not know "
            "their checksum). Use them anyway?")

    def onFetch(self):
        entry = self.logic.modelEntry(self._parameterNode.model)
        if self._trusted(entry):
            self._begin(lambda: self.logic.startFetch(entry["id"], not entry["verified"]))

    def onImport(self):
        entry = self.logic.modelEntry(self._parameterNode.model)
        path = qt.QFileDialog.getOpenFileName(self.parent, "Weights file you downloaded")
        if path and self._trusted(entry):
            self.logic.importModel(entry["id"], path, not entry["verified"])
            self.showModels()

    def onAddModelFile(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "TransferSeg model file", "",
                                              "TransferSeg models (*.safetensors)")
        if path:
            self._parameterNode.model = self.logic.addModelFile(path)
            self.showModels()

    # --- training data ---------------------------------------------------------------------------
    def onAddPair(self):
        p = self._parameterNode
        self.logic.addPair(p, p.trainingVolume, p.trainingSegmentation)
        self.showPairs()

    def onRemovePair(self):
        self.logic.removePair(self._parameterNode, self.ui.trainingPairsTable.currentRow())
        self.showPairs()

    def onPairEdited(self, row, column):
        if column == 3:
            checked = self.ui.trainingPairsTable.item(row, column).checkState() == qt.Qt.Checked
            self.logic.setValidation(self._parameterNode, row, checked)

    def showPairs(self):
        table, pairs = self.ui.trainingPairsTable, self._parameterNode.pairs
        table.blockSignals(True)
        table.setRowCount(len(pairs))
        for row, pair in enumerate(pairs):
            for column, text in enumerate([
                    pair.volume.GetName() if pair.volume else "(deleted)",
                    pair.segmentation.GetName() if pair.segmentation else "(deleted)",
                    ", ".join(scene.segment_names(pair.segmentation))]):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, column, item)
            check = qt.QTableWidgetItem("validation")
            check.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            check.setCheckState(qt.Qt.Checked if pair.validation else qt.Qt.Unchecked)
            table.setItem(row, 3, check)
        table.blockSignals(False)
        self.showMapping()

    def onMatchLabels(self):
        self._parameterNode.labelMapping = {}
        self.showMapping()

    def showMapping(self):
        p, table = self._parameterNode, self.ui.labelMappingTable
        if p is None or self.logic.missingDependencies():
            return
        model_labels = self.logic.modelLabels(p.model)
        labels = [name for value, name in sorted(model_labels.items()) if int(value)]
        mapping = self.logic.mapping(p)
        table.setRowCount(len(mapping))
        for row, (segment, label) in enumerate(mapping.items()):
            table.setItem(row, 0, qt.QTableWidgetItem(segment))
            combo = qt.QComboBox()
            combo.editable = True  # a new label may take any name
            combo.addItems(["(ignore)", *labels, *([segment] if segment not in labels else [])])
            combo.setCurrentText(label or "(ignore)")
            combo.connect("currentTextChanged(QString)", lambda text, segment=segment: (
                self.logic.setMapping(p, segment, "" if text == "(ignore)" else text)))
            table.setCellWidget(row, 1, combo)
        new = state.unmatched(mapping, model_labels)
        self.ui.mappingNoteLabel.text = (f"New labels (new output channels): {', '.join(new)}"
                                         if new else "Every label matches one of the model's.")

    # --- jobs: fine-tune, segment, the timer -----------------------------------------------------
    def _begin(self, start):
        start()
        self.ui.logText.clear()
        self.ui.diceProgressBar.value, self.ui.diceProgressBar.format = 0, "validation Dice"
        self.timer.start()

    def onStartOrCancel(self):
        if self.logic.busy:
            self.logic.cancel()
            return
        self._begin(lambda: self.logic.startFineTune(self._parameterNode))

    def onPoll(self):
        for line in self.logic.poll():
            self.ui.logText.appendPlainText(line)
        monitor = self.logic.monitor
        self.ui.trainingProgressBar.value = monitor.percent
        self.ui.statusLabel.text = monitor.status
        if monitor.dice is not None:
            self.ui.diceProgressBar.value = round(100 * monitor.dice)
            self.ui.diceProgressBar.format = f"validation Dice {monitor.dice:.3f}"
            self.ui.diceProgressBar.setStyleSheet(
                state.progress_bar_style(state.dice_colour(monitor.dice)))
        scene.update_plot(slicer.mrmlScene, monitor.losses, monitor.dices)
        if not monitor.active:
            self.timer.stop()
            self.ui.logText.appendPlainText(self.logic.completeJob())
            if self.logic.busy:  # the next job of a chain (re-scoring after a round)
                self.timer.start()
            self.showModels()
            if self.logic.lastVolume is not None:  # show the new segmentation on its volume
                slicer.util.setSliceViewerLayers(background=self.logic.lastVolume, fit=True)
        self.updateGui()

    def onShowPlot(self):
        slicer.modules.plots.logic().ShowChartInLayout(scene.training_chart(slicer.mrmlScene))

    def onSegment(self, volume, purpose):
        p = self._parameterNode
        self._begin(lambda: self.logic.startSegment(getattr(p, volume), p.model, p.device, purpose))

    def onEvaluate(self):
        self.ui.meanDiceLabel.text = self.logic.evaluate(self._parameterNode)

    # --- annotate loop ---------------------------------------------------------------------------
    def onEdit(self):
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.loopSegmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(p.nextVolume)
        else:  # Slicer before 5.2
            editor.setMasterVolumeNode(p.nextVolume)

    def onAddToTraining(self):
        self.ui.logText.appendPlainText(self.logic.addLoopCase(self._parameterNode))
        self.showPairs()


class TransferSegLogic(ScriptedLoadableModuleLogic):
    """Scene nodes <-> TransferSegLib jobs. No Qt: usable from the Python console and tests.

    One job runs at a time (``busy``); :meth:`poll` feeds its events to ``monitor``, and
    :meth:`completeJob` acts on its result: a new segmentation node, a registered model, scores.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.monitor, self.rounds = state.JobMonitor(), state.RoundHistory()
        self.job, self.pending, self.lastVolume = None, {}, None
        self.loopPredictions = {}  # loop segmentation ID -> (label map, names, round)
        self._ready = False

    def getParameterNode(self):
        return TransferSegParameterNode(super().getParameterNode())

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def jobKind(self) -> str:
        return self.pending.get("kind", "")

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
        return state.catalog_labels(entry.get("labels"))

    def startFetch(self, model_id, accept_unverified=False):
        folder = dependencies.run_folder("fetch")
        command = state.fetch_command(dependencies.job_python(), model_id, accept_unverified)
        self.job = state.LineProcess(command, folder / "output.jsonl",
                                     env=dependencies.job_environment())
        self._begin("fetch", 0, model=model_id)

    def importModel(self, model_id, path, accept_unverified=False) -> Path:
        from TransferSegLib import zoo

        return zoo.import_file(model_id, path, accept_unverified=accept_unverified, log=print)

    def addModelFile(self, path) -> str:
        from TransferSegLib import zoo

        taken = [m["id"] for m in self.models()]
        return zoo.register(path, state.unique_name(Path(path).stem, set(taken)))["id"]

    # --- training data ---------------------------------------------------------------------------
    def addPair(self, p, volume, segmentation, validation=False):
        if any(pair.segmentation and pair.segmentation.GetID() == segmentation.GetID()
               for pair in p.pairs):
            raise ValueError(f"{segmentation.GetName()} is in the training set already.")
        p.pairs = [*p.pairs, TrainingPair(volume, segmentation, validation)]

    def removePair(self, p, row):
        p.pairs = [pair for index, pair in enumerate(p.pairs) if index != row]

    def setValidation(self, p, row, validation):
        pairs = list(p.pairs)
        pairs[row] = TrainingPair(pairs[row].volume, pairs[row].segmentation, validation)
        p.pairs = pairs

    def mapping(self, p) -> dict:
        """Segment name -> label for every segment of the pairs; the user's choices win."""
        names = dict.fromkeys(n for pair in p.pairs for n in scene.segment_names(pair.segmentation))
        matched = state.match_segments(names, self.modelLabels(p.model))
        return {name: p.labelMapping.get(name, matched[name]) for name in names}

    def setMapping(self, p, segment, label):
        p.labelMapping = {**p.labelMapping, segment: label}

    # --- jobs ------------------------------------------------------------------------------------
    def _begin(self, kind, steps, **context):
        self.pending = {"kind": kind, **context}
        self.monitor = state.JobMonitor(kind, LOG_LINES)
        self.monitor.start(steps)
        self.job.start()

    def _startJob(self, kind, purpose, cases, labels, params, steps=0, **context):
        from TransferSegLib import jobs

        folder = dependencies.run_folder(purpose)
        job_json = jobs.write_job(folder, kind, cases=cases, labels=labels, params=params)
        self.job = jobs.JobProcess(job_json, python=dependencies.job_python(),
                                   env=dependencies.job_environment())
        self._begin(purpose, steps, **context)

    def startFineTune(self, p):
        pairs = [(pair.volume, pair.segmentation, pair.validation) for pair in p.pairs]
        self.startTraining(self.modelFile(p.model) if p.model else None, pairs, self.mapping(p),
                           p.strategy, p.steps, p.learningRate, p.device, base_id=p.model)

    def startTraining(self, base, pairs, mapping, strategy, steps, lr, device, base_id=""):
        """Fine-tune model file ``base`` (None: scratch) on ``pairs`` of (volume, segmentation,
        validation); segment names map to label names by ``mapping``. Validation pairs are
        not trained on; they are re-scored with each new model."""
        if base is None and strategy != "scratch":
            raise ValueError("Choose a base model (only the scratch strategy needs none).")
        training = [(volume, segmentation) for volume, segmentation, held in pairs if not held]
        if not training:
            raise ValueError("Add a training pair: every pair is marked for validation.")
        labels = state.training_labels(mapping, self.modelLabels(base_id) if base_id else {})
        if len(labels) < 2:
            raise ValueError("No segment is mapped to a label: choose labels under Training data.")
        taken = set()  # validation pairs stay out: they are scored after each round
        cases = [scene.training_case(v, s, mapping, labels, taken) for v, s in training]
        params = {"base": str(base) if base else None, "strategy": strategy, "steps": int(steps),
                  "device": device}
        if lr and float(lr) > 0:  # else the strategy's own default rate
            params["lr"] = float(lr)
        if base is None:
            params["architecture"] = "unet"
        self._startJob("finetune", "finetune", cases, labels, params, steps, base_id=base_id,
                       strategy=strategy, training_cases=[c["name"] for c in cases])

    def startSegment(self, volume, model, device="auto", purpose="segment", pairs=()):
        """Segment ``volume`` (or the volumes of ``pairs``) with ``model`` (an id or a model
        file) in a child process; results become NEW segmentation nodes, never the user's."""
        from TransferSegLib import mrml

        path, taken = self.modelFile(model), set()
        volumes = [volume] if volume is not None else [pair.volume for pair in pairs]
        cases = [{"name": state.unique_name(v.GetName(), taken),
                  "image": mrml.volume_to_image(v), "label": None} for v in volumes]
        self._startJob("segment", purpose, cases, None, {"model": str(path), "device": device},
                       model=str(path), model_id=str(model), volumes=[v.GetID() for v in volumes],
                       names=[c["name"] for c in cases], pairs=list(pairs))

    def poll(self) -> list:
        if self.job is None:
            return []
        lines = self.monitor.update(self.job.poll())
        if not self.job.running and self.monitor.active:
            lines += self.monitor.update(self.job.poll())
            lines += self.monitor.finish(self.job.returncode, self.job.log_tail(5) or "")
        return lines

    def wait(self, timeout_s=3600.0) -> str:
        """Poll until the job ends, then complete it (for scripts and the self-test)."""
        deadline = time.monotonic() + timeout_s
        while self.monitor.active and time.monotonic() < deadline:
            self.poll()
            slicer.app.processEvents()
            time.sleep(0.2)
        if self.monitor.active:
            self.cancel()
            self.poll()
        return self.completeJob()

    def cancel(self):
        if self.job is not None:
            self.monitor.request_cancel()
            self.job.cancel()

    def completeJob(self) -> str:
        """Act on the finished job; returns a message. May start the next job of a chain."""
        pending, monitor = self.pending, self.monitor
        self.job, self.pending, self.lastVolume = None, {}, None
        kind = pending.get("kind")
        if monitor.state != state.DONE:
            return f"{kind}: {monitor.status}"
        if kind == "fetch":
            return f"{pending['model']} is ready."
        if kind == "finetune":
            return self._newRound(pending, monitor)
        outputs = state.job_outputs(monitor, pending["names"])
        names = scene.output_names(pending["model"])
        if kind == "rescore":
            for output, pair in zip(outputs, pending["pairs"], strict=True):
                label, table, _ = scene.read_output(output, names)
                self.rounds.record(pending["round"], pair.volume.GetName(), scene.mean_dice(
                    scene.score(label, table, pair.segmentation, pair.volume)))
            self._writeRounds()
            worse = self.rounds.forgetting()
            return ("Validation cases re-scored; none got worse." if not worse else "Forgetting: "
                    + ", ".join(f"{c} {a:.3f} -> {b:.3f}" for c, (a, b) in worse.items()))
        volume = slicer.mrmlScene.GetNodeByID(pending["volumes"][0])
        label, table, colours = scene.read_output(outputs[0], names)
        title = f"{volume.GetName()} TransferSeg"
        if kind == "loop":
            number = self.rounds.current or self.rounds.begin(pending["model_id"], [])
            title += f" round {number}"
        node = scene.new_segmentation(slicer.mrmlScene, label, table, colours, volume, title)
        p, self.lastVolume = self.getParameterNode(), volume
        if kind == "loop":
            self.loopPredictions[node.GetID()] = (label, table, self.rounds.current)
            p.loopSegmentation = node
        else:
            p.prediction = node
        return f"Segmented into the new segmentation '{node.GetName()}'."

    def _newRound(self, pending, monitor) -> str:
        """Register the fine-tuned model, make it the one in use, and re-score the validation
        pairs with it (a chained segmentation job)."""
        from TransferSegLib import zoo

        taken = [m["id"] for m in self.models()]
        model_id = state.fine_tuned_id(pending["base_id"], pending["strategy"], taken)
        zoo.register(monitor.model, model_id)
        p = self.getParameterNode()
        p.model = model_id
        number = self.rounds.begin(model_id, pending["training_cases"])
        best = f"{monitor.best_dice:.3f}" if monitor.best_dice is not None else "not measured"
        message = f"Round {number}: model {model_id}, best validation Dice {best}."
        held = [pair for pair in p.pairs if pair.validation]
        if held:
            self.startSegment(None, model_id, p.device, "rescore", pairs=held)
            self.pending["round"] = number
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
            p.scores = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "TransferSeg scores")
        return scene.write_scores(p.scores, scores)

    def roundsTable(self):
        return scene.singleton(slicer.mrmlScene, "vtkMRMLTableNode", "rounds", "TransferSeg rounds")

    def _writeRounds(self):
        header, rows = self.rounds.table()
        scene.write_table(self.roundsTable(), header, rows, text_columns=(0,))

    def roundText(self) -> str:
        if not self.rounds.current:
            return "No round yet: segment the next volume or fine-tune to start."
        last = self.rounds.rounds[-1]
        return (f"Round {self.rounds.current}: {last['model']}, trained on "
                f"{len(last['training_cases'])} case(s).")


class TransferSegTest(ScriptedLoadableModuleTest):
    """Fine-tune a small model on the CPU, segment, check the new node's names and its Dice."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_synthetic()
        self.setUp()
        self.test_real_sample()

    def test_synthetic(self):
        """A bright sphere in noise: trained on one volume, scored on another."""
        train = scene.sphere_case(slicer.mrmlScene, 0, "train")
        held_out = scene.sphere_case(slicer.mrmlScene, 1, "held out")
        self.assertGreater(self._fineTuneAndScore("tumour", 2.0, train, held_out, 60), 0.5)

    def test_real_sample(self):
        """The liver of a real abdominal CT (TransferSeg's sample data, when fetched)."""
        from TransferSegLib import mrml, samples, volumes
        from TransferSegLib.errors import MissingSampleError

        try:
            sample = samples.require_sample("totalseg_ct")
        except MissingSampleError:
            self.skipTest("fetch the samples (transferseg samples fetch) for the real-data test")
        ct = mrml.image_to_volume(volumes.read_volume(sample.image), slicer.mrmlScene, "CT")
        organs = mrml.labelmap_to_segmentation(volumes.read_label(sample.label), sample.labels,
                                               slicer.mrmlScene, "CT organs", reference_volume=ct)
        self.assertGreater(self._fineTuneAndScore("liver", 3.0, (ct, organs), (ct, organs), 80),
                           0.3)

    def _fineTuneAndScore(self, label, spacing, train, test, steps) -> float:
        """Fine-tune a small untrained UNet on ``train`` (volume, segmentation) for ``label``,
        segment ``test``'s volume, return the Dice of ``label`` against ``test``'s segments."""
        import torch

        from TransferSegLib import checkpoint, networks

        logic = TransferSegLogic()
        if logic.missingDependencies():
            self.skipTest("needs " + ", ".join(logic.missingDependencies()))
        home = Path(slicer.app.temporaryPath) / "TransferSegTest"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        torch.manual_seed(0)
        arguments = networks.resolve_kwargs("unet", channels=[8, 16, 32], strides=[2, 2],
                                            num_res_units=1)
        base = checkpoint.save_model(home / "base.safetensors", networks.build_network(
            "unet", 1, 2, **arguments), checkpoint.ModelCard(
            architecture="unet", in_channels=1, out_channels=2, arguments=arguments,
            labels={0: "background", 1: label}, spacing=[spacing] * 3, patch_size=[32] * 3,
            normalisation={"kind": "ct", "window": [-100.0, 400.0]}, modality="CT"))
        # The fine-tuned model's registry entry and the job folders go to a scratch folder.
        with mock.patch.dict(os.environ, {"TRANSFERSEG_HOME": str(home)}):
            self.delayDisplay(f"Fine-tuning for {label} on the CPU, {steps} steps")
            logic.startTraining(base, [(*train, False)], {label: label}, "vanilla", steps, 0.01,
                                "cpu")
            message = logic.wait(900)
            self.assertEqual(logic.monitor.state, state.DONE, message)
            self.delayDisplay("Segmenting")
            logic.startSegment(test[0], logic.monitor.model, "cpu")
            message = logic.wait(600)
        p = logic.getParameterNode()
        self.assertIsNotNone(p.prediction, message)
        self.assertNotEqual(p.prediction.GetID(), test[1].GetID())  # a new node, not the user's
        self.assertEqual(scene.segment_names(p.prediction), [label])
        p.reference, p.inputVolume = test[1], test[0]
        self.delayDisplay(logic.evaluate(p))
        return p.scores.GetTable().GetValueByName(0, "Dice").ToDouble()
