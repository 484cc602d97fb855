"""TransferSeg: adapt a published segmentation model to your own scans, inside 3D Slicer.

Pick a base model, add a few (volume, segmentation) pairs from the scene, fine-tune, segment new
volumes and score them, then loop: segment the next volume, correct it in Segment Editor, add
it, fine-tune again. The module is a thin shell over TransferSegLib: the widget reads the
parameter node and calls the logic; the logic turns nodes into jobs that run in a child Python
(PythonSlicer) and report JSON events, which the widget's timer polls. The parts without Qt
live in the TransferSegModule package (logic, jobstate, matching, annotation, catalog,
environment, scene, dependencies, sampledata).
"""

import logging
import os
import shutil
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
from TransferSegModule import catalog, dependencies, environment, jobstate, matching, scene
from TransferSegModule.logic import LOG_LINES, Logic

dependencies.make_library_importable()
from TransferSegLib.strategies import (  # noqa: E402 (the library, found above)
    DEFAULT_BASE,
    DEFAULT_STRATEGY,
    STRATEGIES,
)

POLL_MS = 500
# The button that starts each kind of job; it turns into that job's Cancel while it runs.
JOB_BUTTONS = {"fetch": "fetchModelButton", "finetune": "startButton", "rescore": "startButton",
               "segment": "segmentButton", "loop": "segmentNextButton"}


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
        if not dependencies.unsupported():
            slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """TransferSeg's samples in the Sample Data module (fetched on first click)."""
    import SampleData
    from TransferSegModule import sampledata

    icon = Path(__file__).resolve().parent / "Resources" / "Icons" / "TransferSeg.png"
    sampledata.register(SampleData.SampleDataLogic, lambda: slicer.mrmlScene, icon)


@parameterPack
class TrainingPair:
    volume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    validation: bool = False  # held out of training, re-scored after every round


@parameterNodeWrapper
class TransferSegParameterNode:
    """What the panel shows; saved with the scene."""

    modelSearch: str
    model: Annotated[str, Default(DEFAULT_BASE)]  # catalog or registry id of the model in use
    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    pairs: list[TrainingPair]
    labelMapping: dict[str, str]  # segment name -> training label name ("" = ignore)
    strategy: Annotated[str, Choice(list(STRATEGIES)), Default(DEFAULT_STRATEGY)]
    steps: Annotated[int, WithinRange(1, 100000), Default(300)]
    # 0: each strategy's own learning rate (TransferSegLib.strategies.DEFAULTS)
    learningRate: Annotated[float, WithinRange(0.0, 1.0), Default(0.0)]
    device: Annotated[str, Choice(list(environment.DEVICES)), Default("auto")]
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
        problem = dependencies.unsupported()
        if problem:  # one clear message instead of a traceback for every click
            self.layout.insertWidget(0, qt.QLabel(problem))
            uiWidget.enabled = False
            return
        self.logic = TransferSegLogic()
        self._buttonTexts = {name: getattr(self.ui, name).text
                             for name in set(JOB_BUTTONS.values())}
        self.ui.logText.setMaximumBlockCount(LOG_LINES)
        self.ui.gpuLabel.text = environment.gpu_description(dependencies.gpus())
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
            ui.fetchModelButton: lambda: self.startOrCancel(self.onFetch),
            ui.importModelButton: self.onImport,
            ui.addModelFileButton: self.onAddModelFile, ui.addPairButton: self.onAddPair,
            ui.removePairButton: self.onRemovePair, ui.matchLabelsButton: self.onMatchLabels,
            ui.startButton: lambda: self.startOrCancel(self.onStart),
            ui.fineTuneAgainButton: self.onStart,
            ui.showPlotButton: self.onShowPlot, ui.evaluateButton: self.onEvaluate,
            ui.segmentButton: lambda: self.startOrCancel(
                lambda: self.onSegment("inputVolume", "segment")),
            ui.segmentNextButton: lambda: self.startOrCancel(
                lambda: self.onSegment("nextVolume", "loop")),
            ui.editButton: self.onEdit, ui.addToTrainingButton: self.onAddToTraining,
        }.items():
            button.connect("clicked(bool)", lambda _checked, action=action: self._do(action))
        # Every slot goes through _do or _safely: an error is shown, never lost in the event loop.
        ui.modelSearchEdit.connect("textChanged(QString)",
                                   lambda _text: self._safely(self.listModels))
        ui.modelList.connect("currentRowChanged(int)",
                             lambda row: self._safely(lambda: self.onModelSelected(row)))
        ui.trainingPairsTable.connect("cellChanged(int,int)", lambda row, column: self._safely(
            lambda: self.onPairEdited(row, column)))
        self.initializeParameterNode()

    # --- parameter node --------------------------------------------------------------------------
    def cleanup(self):
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self):
        if self.logic is not None:
            self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        # A running job goes on: its inputs were exported, a fine-tuned model is registered
        # whatever the scene holds, and a segmentation whose volume is gone says where its
        # result was kept.
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
        for button, ready in {
            self.ui.startButton: p.pairs,
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
        for name, text in self._buttonTexts.items():
            getattr(self.ui, name).text = text
        if busy:  # the running job's own button cancels it
            button = getattr(self.ui, JOB_BUTTONS.get(self.logic.jobKind, "startButton"))
            button.text = self.logic.monitor.button_text
            button.enabled = self.logic.monitor.state == jobstate.RUNNING
        self.ui.roundLabel.text = self.logic.roundText()
        self.ui.modelInUseLabel.text = p.model or "(choose one under Base model)"
        self.ui.scoresTableView.setMRMLTableNode(p.scores)

    def _do(self, action):
        with slicer.util.tryWithErrorDisplay("TransferSeg could not finish this.", waitCursor=True):
            self.requireDependencies()  # every action needs the library, so install on first use
            action()
        self.updateGui()

    def _safely(self, action):
        with slicer.util.tryWithErrorDisplay("TransferSeg could not finish this."):
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
        shown = catalog.filter_models(self._models, self.ui.modelSearchEdit.text)
        self.ui.modelList.blockSignals(True)
        self.ui.modelList.clear()
        for row, model in enumerate(shown):
            item = qt.QListWidgetItem(catalog.model_line(model))
            item.setData(qt.Qt.UserRole, model["id"])
            self.ui.modelList.addItem(item)
            if model["id"] == current:
                self.ui.modelList.setCurrentRow(row)
        self.ui.modelList.blockSignals(False)
        entry = next((m for m in self._models if m["id"] == current), None)
        self.ui.modelDetails.setHtml(catalog.model_details(entry) if entry else
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

    def requireImportPackages(self, entry, path=None):
        """Install (after asking) what importing this model's weights needs, e.g. onnx."""
        missing = self.logic.importRequirements(entry["id"], path)
        if not missing:
            return
        names = ", ".join(environment.requirement_name(line) for line in missing)
        if not slicer.util.confirmOkCancelDisplay(
                f"Importing {entry['title']} needs {names} (from the Python package index; "
                "Slicer's numpy and SimpleITK and your PyTorch are not changed). Install now?",
                windowTitle="TransferSeg set-up"):
            raise RuntimeError(f"{entry['title']} cannot be imported without {names}.")
        dependencies.install_packages(missing)

    def onFetch(self):
        entry = self.logic.modelEntry(self._parameterNode.model)
        if self._trusted(entry):
            self.requireImportPackages(entry)
            self._begin(lambda: self.logic.startFetch(entry["id"], not entry["verified"]))

    def onImport(self):
        entry = self.logic.modelEntry(self._parameterNode.model)
        path = qt.QFileDialog.getOpenFileName(self.parent, "Weights file you downloaded")
        if path and self._trusted(entry):
            self.requireImportPackages(entry, path)
            self.logic.importModel(entry["id"], path, not entry["verified"])
            self.showModels()

    def onAddModelFile(self):
        path = qt.QFileDialog.getOpenFileName(
            self.parent, "TransferSeg model file, or an nnU-Net model", "",
            "TransferSeg models (*.safetensors);;nnU-Net result folder (plans.json);;"
            "nnU-Net checkpoint (*.pth);;nnU-Net model zip (*.zip)")
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
                self._safely(lambda: self.logic.setMapping(
                    p, segment, "" if text == "(ignore)" else text))))
            table.setCellWidget(row, 1, combo)
        new = matching.unmatched(mapping, model_labels)
        self.ui.mappingNoteLabel.text = (f"New labels (new output channels): {', '.join(new)}"
                                         if new else "Every label matches one of the model's.")

    # --- jobs: fine-tune, segment, the timer -----------------------------------------------------
    def _begin(self, start):
        start()
        self.ui.logText.clear()
        self.ui.diceProgressBar.value, self.ui.diceProgressBar.format = 0, self.logic.diceLabel
        self.ui.diceProgressBar.toolTip = self.logic.validationNote or "Last validation Dice."
        self.timer.start()

    def startOrCancel(self, start):
        """The job buttons: start their job, or cancel the running one (returns at once; a
        fine-tune saves the model so far)."""
        if self.logic.busy:
            self.logic.cancel()
        else:
            start()

    def onStart(self):
        self._begin(lambda: self.logic.startFineTune(self._parameterNode))

    def onPoll(self):
        """The timer's slot. It never raises: whatever goes wrong is shown, and the timer runs
        exactly while the logic has a job."""
        try:
            result = self.logic.poll()  # completes a job that ended; never raises
            for line in result.lines:
                self.ui.logText.appendPlainText(line)
            self.showProgress(self.logic.monitor)
            if result.finished is not None:
                self.ui.logText.appendPlainText(result.finished)
                self.showModels()
                if self.logic.lastVolume is not None:  # show the new segmentation on its volume
                    slicer.util.setSliceViewerLayers(background=self.logic.lastVolume, fit=True)
            if result.error:
                slicer.util.errorDisplay(f"TransferSeg could not finish the job: {result.error}")
        except Exception as error:
            logging.exception("TransferSeg: showing the job's progress failed")
            slicer.util.errorDisplay(f"TransferSeg could not show the job's progress: {error}")
        finally:
            if not self.logic.busy:
                self.timer.stop()
            self.updateGui()

    def showProgress(self, monitor):
        self.ui.trainingProgressBar.value = monitor.percent
        self.ui.statusLabel.text = monitor.status
        if monitor.dice is not None:
            self.ui.diceProgressBar.value = round(100 * monitor.dice)
            self.ui.diceProgressBar.format = f"{self.logic.diceLabel} {monitor.dice:.3f}"
            self.ui.diceProgressBar.setStyleSheet(
                jobstate.progress_bar_style(jobstate.dice_colour(monitor.dice)))
        if monitor.kind == "finetune":
            scene.update_plot(slicer.mrmlScene, monitor.losses, monitor.dices)

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
        editor.setSourceVolumeNode(p.nextVolume)

    def onAddToTraining(self):
        self.ui.logText.appendPlainText(self.logic.addLoopCase(self._parameterNode))
        self.showPairs()


class TransferSegLogic(ScriptedLoadableModuleLogic, Logic):
    """The module's logic (``TransferSegModule.logic.Logic``) on Slicer's scene and parameter
    node; jobs run in PythonSlicer. No Qt: usable from the Python console."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        Logic.__init__(self, slicer.mrmlScene, self.getParameterNode, TrainingPair)

    def getParameterNode(self):
        return TransferSegParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))


class TransferSegTest(ScriptedLoadableModuleTest):
    """Fine-tune a small model on the CPU, segment, check the new node's names and its Dice."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # Slicer calls runTest() itself, outside unittest: a skip is reported, not raised.
        problem = dependencies.unsupported()
        missing = [] if problem else TransferSegLogic().missingDependencies()
        if problem or missing:
            self.delayDisplay("TransferSeg self-test skipped: " + (problem or (
                f"install {', '.join(missing)} first (any TransferSeg button offers to)")))
            return
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
            self.delayDisplay("Real-data test skipped: fetch the samples first "
                              "(transferseg samples fetch)")
            return
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
            message = logic.wait(900, idle=slicer.app.processEvents)
            self.assertEqual(logic.monitor.state, jobstate.DONE, message)
            self.delayDisplay("Segmenting")
            logic.startSegment(test[0], logic.monitor.model, "cpu")
            message = logic.wait(600, idle=slicer.app.processEvents)
        p = logic.getParameterNode()
        self.assertIsNotNone(p.prediction, message)
        self.assertNotEqual(p.prediction.GetID(), test[1].GetID())  # a new node, not the user's
        self.assertEqual(scene.segment_names(p.prediction), [label])
        p.reference, p.inputVolume = test[1], test[0]
        self.delayDisplay(logic.evaluate(p))
        return p.scores.GetTable().GetValueByName(0, "Dice").ToDouble()
