"""The Slicer module's logic (``TransferSegModule.logic.Logic``) on a real MRML scene.

The scene is ``slicer-core``'s: real volume, segmentation and table nodes. Jobs run through
the logic's injected process factory: an in-process stand-in that runs the same
``jobrunner.run_job`` a child would run, on a thread, and that cancels the way ``JobProcess`` does
(the job folder's cancel file). Model downloads run in a real child process. What stays
outside (Qt, the widget, PythonSlicer) is listed in the README's Slicer section.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "TransferSeg"))

from conftest import catalog_entry, write_catalog  # noqa: E402
from TransferSegModule import jobstate, scene  # noqa: E402
from TransferSegModule import logic as module_logic  # noqa: E402

from TransferSegLib import jobrunner, jobs  # noqa: E402


class InProcessJob:
    """Runs a job folder's ``job.json`` with ``jobrunner.run_job`` on a thread: the events, exit
    status and cancel file of a ``JobProcess`` child, without a child."""

    def __init__(self, job_json: Path):
        self.job_json, self.events, self.returncode = Path(job_json), queue.Queue(), None
        self._thread: threading.Thread | None = None

    def start(self) -> InProcessJob:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        self.returncode = jobrunner.run_job(self.job_json, self.events.put)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> list[dict]:
        events = []
        while not self.events.empty():
            events.append(self.events.get())
        return events

    def log_tail(self, lines: int = 20) -> str:
        return ""

    def cancel(self, timeout: float | None = None) -> None:
        (self.job_json.parent / jobs.CANCEL_FILE).write_text("", encoding="utf-8")


@dataclass
class Pair:
    volume: object
    segmentation: object
    validation: bool = False


@dataclass
class Parameters:
    """The parameter node's fields the logic reads and writes."""

    model: str = ""
    pairs: list = None
    labelMapping: dict = None
    strategy: str = "vanilla"
    steps: int = 4
    learningRate: float = 0.0
    device: str = "cpu"
    prediction: object = None
    loopSegmentation: object = None

    def __post_init__(self):
        self.pairs, self.labelMapping = self.pairs or [], self.labelMapping or {}


@pytest.fixture()
def mrml_scene():
    slicer = pytest.importorskip("slicer")
    return slicer.vtkMRMLScene()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_logic(mrml_scene, parameters, folders, **factories):
    def run_folder(kind):
        folder = folders / f"{len(list(folders.glob('*'))) + 1}-{kind}"
        folder.mkdir(parents=True)
        return folder

    return module_logic.Logic(mrml_scene, lambda: parameters, Pair,
                              make_job_process=factories.get("job", InProcessJob),
                              make_fetch_process=factories.get(
                                  "fetch", module_logic.fetch_process),
                              run_folder=factories.get("run_folder", run_folder))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A small untrained UNet for one label, on the 2 mm grid of ``scene.sphere_case``."""
    import torch

    from TransferSegLib import checkpoint, networks

    torch.manual_seed(0)
    arguments = networks.resolve_kwargs("unet", channels=[8, 16, 32], strides=[2, 2],
                                        num_res_units=1)
    return checkpoint.save_model(
        tmp_path_factory.mktemp("base") / "base.safetensors",
        networks.build_network("unet", 1, 2, **arguments),
        checkpoint.ModelCard(
            architecture="unet", in_channels=1, out_channels=2, arguments=arguments,
            labels={0: "background", 1: "tumour"}, spacing=[2.0] * 3, patch_size=[32] * 3,
            normalisation={"kind": "ct", "window": [-100.0, 400.0]}, modality="CT"))


def run_until_idle(logic, timeout_s=300.0) -> list:
    results, deadline = [], time.monotonic() + timeout_s
    while logic.busy and time.monotonic() < deadline:
        result = logic.poll()
        if result.finished is not None:
            results.append(result)
        time.sleep(0.05)
    assert not logic.busy, "the job did not end"
    return results


def test_validation_pairs_are_the_trainers_validation_set_and_are_rescored(
        mrml_scene, home, tmp_path, tiny_base):
    train = scene.sphere_case(mrml_scene, 0, "train", size=32)
    held = scene.sphere_case(mrml_scene, 1, "held", size=32)
    p = Parameters(pairs=[Pair(*train), Pair(*held, validation=True)])
    logic = make_logic(mrml_scene, p, tmp_path / "runs")
    logic.startTraining(tiny_base, [(*train, False), (*held, True)], {"tumour": "tumour"},
                        "vanilla", 4, 0.01, "cpu", base_id="")
    assert logic.diceLabel == "held-out Dice" and "1 held-out pair" in logic.validationNote
    job_json = next((tmp_path / "runs").glob("*-finetune/job.json"))
    document = json.loads(job_json.read_text(encoding="utf-8"))
    assert document["validation"] == "held-out"
    training, validation = jobrunner.job_datasets(jobs.read_job(job_json))
    assert [c.name for c in training.cases] == ["train"]
    assert [c.name for c in validation.cases] == ["held"]

    finished = run_until_idle(logic)
    assert [r.error for r in finished] == [None, None]
    assert finished[0].finished.startswith("Round 1: model new-vanilla-1")
    assert "held-out pair" in finished[0].finished and "Re-scoring 1" in finished[0].finished
    assert "none got worse" in finished[1].finished
    assert p.model == "new-vanilla-1"
    # The re-scored held-out case is in the rounds table; the training case is not.
    table = logic.roundsTable().GetTable()
    assert table.GetNumberOfRows() == 1
    assert table.GetValueByName(0, "case").ToString() == "held"


def test_without_validation_pairs_the_training_pairs_are_validated_and_the_panel_says_so(
        mrml_scene, home, tmp_path, tiny_base):
    train = scene.sphere_case(mrml_scene, 0, "train", size=32)
    p = Parameters(pairs=[Pair(*train)])
    logic = make_logic(mrml_scene, p, tmp_path / "runs")
    logic.startTraining(tiny_base, [(*train, False)], {"tumour": "tumour"}, "vanilla", 2, 0.01,
                        "cpu")
    assert logic.diceLabel == "Dice on the training pairs"
    assert "mark a pair for validation" in logic.validationNote
    job = jobs.read_job(next((tmp_path / "runs").glob("*-finetune/job.json")))
    assert job.validation == "training"
    training, validation = jobrunner.job_datasets(job)
    assert [c.name for c in validation.cases] == [c.name for c in training.cases] == ["train"]
    lines = []
    while logic.busy:
        lines += logic.poll().lines
        time.sleep(0.05)
    assert any("validation uses the training cases" in line for line in lines)
    with pytest.raises(ValueError, match="every pair is marked for validation"):
        logic.startTraining(tiny_base, [(*train, True)], {"tumour": "tumour"}, "vanilla", 2,
                            0.01, "cpu")


def test_an_error_while_completing_a_job_is_returned_and_leaves_the_logic_idle(
        mrml_scene, home, tmp_path, tiny_base):
    volume, _ = scene.sphere_case(mrml_scene, 2, "to segment", size=32)
    p = Parameters()
    logic = make_logic(mrml_scene, p, tmp_path / "runs")
    logic.startSegment(volume, str(tiny_base), "cpu")
    mrml_scene.RemoveNode(volume)  # while the job runs
    (result,) = run_until_idle(logic)
    assert "no longer in the scene" in result.error and result.finished.startswith("failed")
    assert not logic.busy and logic.jobKind == "" and p.prediction is None
    # The logic is usable again: the next job starts and completes.
    other, _ = scene.sphere_case(mrml_scene, 3, "next", size=32)
    logic.startSegment(other, str(tiny_base), "cpu")
    (result,) = run_until_idle(logic)
    assert result.error is None and p.prediction is not None
    assert p.prediction.GetName() == "next TransferSeg"


def test_a_cancelled_fine_tune_is_registered_as_cancelled_at_its_step(
        mrml_scene, home, tmp_path, tiny_base):
    from TransferSegLib import checkpoint, zoo

    train = scene.sphere_case(mrml_scene, 0, "train", size=32)
    p = Parameters(pairs=[Pair(*train)])
    logic = make_logic(mrml_scene, p, tmp_path / "runs")
    logic.startTraining(tiny_base, [(*train, False)], {"tumour": "tumour"}, "vanilla", 100000,
                        0.01, "cpu")
    deadline = time.monotonic() + 300
    while logic.monitor.step < 2 and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.05)
    logic.cancel()
    assert logic.monitor.state == jobstate.CANCELLING and logic.busy
    (result,) = run_until_idle(logic)
    assert result.error is None and "cancelled at step" in result.finished
    step = logic.rounds.rounds[-1]
    entry = zoo.entry(p.model)
    assert entry["title"].startswith(f"{p.model} (cancelled at step ")
    assert step["model"] == p.model
    model, card = checkpoint.load_model(Path(entry["path"]))  # the model so far is usable
    assert card.labels == {0: "background", 1: "tumour"}


def test_a_model_download_can_be_cancelled_and_then_completes(
        mrml_scene, home, tmp_path, tiny_base, monkeypatch):
    """The download child stops by itself once the cancel file is there (at its start or its
    next chunk; zoo keeps a partial file to resume); a cancel file left from an earlier run
    does not stop the next one."""
    published = tmp_path / "published"
    published.mkdir()
    weights = published / "model.safetensors"
    weights.write_bytes(tiny_base.read_bytes())
    write_catalog(tmp_path / "resources", catalog_entry(
        "tiny-sphere", weights, "model.safetensors", "tumour", urls=[weights.as_uri()]))
    monkeypatch.setenv("TRANSFERSEG_RESOURCES", str(tmp_path / "resources"))
    made = []

    def fetch(command, folder):
        made.append(module_logic.fetch_process(command, folder))
        return made[-1]

    folder = tmp_path / "fetch"  # both downloads in one folder: the first leaves its cancel file
    folder.mkdir()
    logic = make_logic(mrml_scene, Parameters(), tmp_path / "runs", fetch=fetch,
                       run_folder=lambda kind: folder)
    logic.startFetch("tiny-sphere")
    logic.cancel()  # before the child has read its first chunk (it is still importing)
    assert logic.monitor.state == jobstate.CANCELLING
    (result,) = run_until_idle(logic, 120)
    assert result.error is None and logic.monitor.state == jobstate.CANCELLED, logic.monitor.log
    assert result.finished.startswith("fetch: cancelled")
    assert made[0].wait(60) == 3, made[0].log_tail()  # it stopped by itself
    assert not list((home / "models").glob("tiny-sphere/*.safetensors"))

    # Not cancelled, the same download completes.
    logic.startFetch("tiny-sphere")
    (result,) = run_until_idle(logic, 120)
    assert result.finished == "tiny-sphere is ready.", logic.monitor.log
    assert not list((home / "downloads").glob("tiny-sphere-*.part"))


def test_a_fetch_of_an_unknown_model_fails_with_its_name(mrml_scene, home, tmp_path):
    logic = make_logic(mrml_scene, Parameters(), tmp_path / "runs")
    logic.startFetch("no-such-model")
    (result,) = run_until_idle(logic, 120)
    assert logic.monitor.state == jobstate.FAILED and "no-such-model" in logic.monitor.error
    assert result.finished.startswith("fetch: ") and not logic.busy


class SampleDataLogicStandIn:
    """Slicer's ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` as its source
    has it: the keyword arguments, and ``SampleDataSource``'s rule that uris, fileNames and
    nodeNames are lists of one length; the widget's button calls
    ``source.customDownloader(source)``."""

    sources: dict = {}

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None,
                                       fileNames=None, nodeNames=None, customDownloader=None,
                                       thumbnailFileName=None, loadFileTypes=None,
                                       loadFiles=None, loadFileProperties=None, checksums=None,
                                       loadFileType=None):
        assert isinstance(uris, (list, tuple)) and len(uris) == len(fileNames) == len(nodeNames)
        source = {"name": sampleName, "downloader": customDownloader,
                  "thumbnail": thumbnailFileName}
        SampleDataLogicStandIn.sources.setdefault(category, []).append(source)


def test_the_samples_are_in_the_sample_data_module_and_load_as_volume_and_segmentation(
        mrml_scene):
    from conftest import real_sample
    from TransferSegModule import sampledata

    from TransferSegLib import samples

    icon = ROOT / "TransferSeg" / "Resources" / "Icons" / "TransferSeg.png"
    names = sampledata.register(SampleDataLogicStandIn, lambda: mrml_scene, icon)
    registered = SampleDataLogicStandIn.sources[sampledata.CATEGORY]
    assert [s["name"] for s in registered] == names and len(names) == len(sampledata.SAMPLES)
    assert set(sampledata.SAMPLES) <= set(samples.SPEC_BY_NAME)
    assert all(Path(s["thumbnail"]).is_file() for s in registered)
    chest = real_sample("slicerio_chest")
    source = registered[list(sampledata.SAMPLES).index("slicerio_chest")]
    volume, segmentation = source["downloader"](source)  # the button's call
    assert volume.GetScene() is mrml_scene and segmentation.GetScene() is mrml_scene
    assert sorted(scene.segment_names(segmentation)) == sorted(chest.labels.values())
    assert volume.GetImageData().GetDimensions() == tuple(chest.size)


TUMOUR_CODE = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^"
               "Morphologically Altered Structure~SCT^108369006^Neoplasm~^^~Anatomic codes - "
               "DICOM master list~^^~^^")


def test_terminology_of_the_training_segments_reaches_the_model_and_its_segmentations(
        mrml_scene, home, tmp_path, tiny_base):
    from TransferSegLib import checkpoint, mrml

    train = scene.sphere_case(mrml_scene, 0, "train", size=32)
    segment = train[1].GetSegmentation().GetNthSegment(0)
    segment.SetTag(segment.GetTerminologyEntryTagName(), TUMOUR_CODE)
    p = Parameters(pairs=[Pair(*train)])
    logic = make_logic(mrml_scene, p, tmp_path / "runs")
    logic.startTraining(tiny_base, [(*train, False)], {"tumour": "tumour"}, "vanilla", 2, 0.01,
                        "cpu")
    run_until_idle(logic)
    _, card = checkpoint.load_model(Path(logic.monitor.model))
    assert card.terminology == {"tumour": TUMOUR_CODE}
    other, _ = scene.sphere_case(mrml_scene, 5, "new scan", size=32)
    logic.startSegment(other, logic.monitor.model, "cpu")
    run_until_idle(logic)
    assert mrml.segment_terminology(p.prediction) == {"tumour": TUMOUR_CODE}


def test_an_nnunet_result_folder_is_added_as_a_base_model(mrml_scene, home, tmp_path):
    import shutil

    folder = tmp_path / "Dataset999_Tiny"
    shutil.copytree(ROOT / "Testing" / "fixtures" / "nnunet" / "plain", folder,
                    ignore=shutil.ignore_patterns("predictions.npz", "*numpy1*"))
    logic = make_logic(mrml_scene, Parameters(), tmp_path / "runs")
    model_id = logic.addModelFile(folder / "plans.json")  # as chosen in the file dialog
    entry = logic.modelEntry(model_id)
    assert entry is not None and entry["kind"] == "fine-tuned"
    assert logic.modelLabels(model_id) == {0: "background", 1: "liver", 2: "spleen",
                                           3: "kidney_right"}
    assert logic.modelFile(model_id).is_file()
    assert logic.addModelFile(folder) == model_id  # the same model again: no second copy
