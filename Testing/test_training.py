"""The trainer: resume equals uninterrupted, cancel leaves a model, real Dice gains, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import real_sample, reduced_label
from safetensors.torch import load_file

from TransferSegLib import (
    checkpoint,
    datasets,
    isolation,
    networks,
    recipes,
    sampling,
    training,
    volumes,
)
from TransferSegLib.cli import main
from TransferSegLib.errors import InputError, TransferSegError

ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
TINY = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def organ_dataset(folder: Path, sample: str = "totalseg_ct", keep=ORGANS) -> Path:
    """A one-case CSV dataset from a real TotalSegmentator sample, reduced to a few organs."""
    case = real_sample(sample)
    folder.mkdir(parents=True, exist_ok=True)
    reduced_label(sample, keep, folder / "label.nii.gz")
    (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in keep.items()}))
    (folder / "cases.csv").write_text(f"image,label,name\n{case.image},label.nii.gz,{sample}\n")
    return folder / "cases.csv"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """An untrained tiny CT UNet model file with the organ labels, 6 mm voxels, 32^3 patches."""
    torch.manual_seed(1)
    arguments = networks.resolve_kwargs("unet", **TINY)
    labels = {0: "background", **{i + 1: n for i, n in enumerate(ORGANS.values())}}
    model = networks.build_network("unet", 1, len(labels), **arguments)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=len(labels), arguments=arguments,
        labels=labels, spacing=[6.0, 6.0, 6.0], patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-500.0, 400.0]}, modality="CT")
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return checkpoint.save_model(path, model, card)


def quick(**overrides) -> training.TrainConfig:
    settings = dict(steps=6, batch_size=1, val_every=3, checkpoint_every=3, lr=3e-3, seed=7,
                    device="cpu")
    settings.update(overrides)
    return training.TrainConfig(**settings)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_resumed_training_equals_uninterrupted(tmp_path, base_model):
    data = organ_dataset(tmp_path / "data")
    whole = recipes.finetune(base_model, data, tmp_path / "whole", "vanilla", quick())
    assert whole.status == "done" and whole.steps == 6

    cancel = tmp_path / "cancel"

    def stop_after_first_checkpoint(event):
        if event["event"] == "checkpoint" and event["step"] == 3:
            cancel.touch()

    cut = recipes.finetune(base_model, data, tmp_path / "cut", "vanilla", quick(),
                            events=stop_after_first_checkpoint, cancel_file=cancel)
    assert cut.status == "cancelled" and cut.steps == 4
    cancel.unlink()
    resumed = recipes.finetune(base_model, data, tmp_path / "cut", "vanilla", quick(),
                                resume=True)
    assert resumed.status == "done" and resumed.steps == 6
    a, b = weights(tmp_path / "whole" / "last.safetensors"), weights(
        tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cancel_leaves_a_loadable_model_and_progress_log(tmp_path, base_model):
    data = organ_dataset(tmp_path / "data")
    cancel = tmp_path / "cancel"
    cancel.touch()
    result = recipes.finetune(base_model, data, tmp_path / "run", "finetune", quick(),
                               cancel_file=cancel)
    assert result.status == "cancelled" and result.steps == 1
    model, card = checkpoint.load_model(result.model)
    assert card.labels[4] == "liver" and card.lineage[-1]["strategy"] == "finetune"
    events = [json.loads(line) for line in open(tmp_path / "run" / "progress.jsonl")]
    assert events[0]["event"] == "start" and events[-1]["event"] == "cancelled"


def test_the_trainer_augments_as_its_settings_say(tmp_path, base_model, monkeypatch):
    """Every training patch goes through the augmentation the config names (the intensity
    field, rotation and scaling, mirroring), and none when augmentation is off."""
    data = organ_dataset(tmp_path / "data")
    calls = []

    def recording(image, target, rng, mirror=False, spatial=False, field=False):
        calls.append((mirror, spatial, field))
        return sampling.augment(image, target, rng, mirror, spatial, field)

    monkeypatch.setattr(training, "augment", recording)
    for name, overrides, expected in (
        ("default", {}, (False, True, True)),
        ("flat", {"intensity_field": False, "mirror": True}, (True, True, False)),
        ("rigid", {"spatial": False}, (False, False, True)),
    ):
        calls.clear()
        result = recipes.finetune(base_model, data, tmp_path / name, "vanilla",
                                  quick(steps=2, val_every=2, **overrides))
        assert result.status == "done"
        assert calls == [expected] * 2, name
    calls.clear()
    recipes.finetune(base_model, data, tmp_path / "none", "vanilla",
                     quick(steps=2, val_every=2, augment=False))
    assert calls == []


def test_the_trainer_starts_new_channels_at_their_share_unless_told_not_to(tmp_path,
                                                                            base_model):
    data = organ_dataset(tmp_path / "data")
    messages = {}
    for name, prior in (("prior", True), ("plain", False)):
        recipes.finetune(base_model, data, tmp_path / name, "scratch",
                         quick(steps=1, val_every=1, prior_bias=prior))
        events = [json.loads(line) for line in open(tmp_path / name / "progress.jsonl")]
        messages[name] = [e["message"] for e in events if e["event"] == "message"]
    started = [m for m in messages["prior"] if "share of the training voxels" in m]
    assert len(started) == 1 and "liver" in started[0] and "background" in started[0]
    assert not any("share of the training voxels" in m for m in messages["plain"])


def test_short_training_beats_the_untrained_model_on_a_held_out_volume(tmp_path, base_model):
    """Liver and spleen learnt on one real CT, scored on another real CT (the DICOM case)."""
    from TransferSegLib import inference, metrics

    data = organ_dataset(tmp_path / "data", keep={1: "spleen", 5: "liver"})
    config = quick(steps=80, batch_size=2, val_every=80, checkpoint_every=80, lr=3e-3,
                   foreground_ratio=0.8)
    result = recipes.finetune(base_model, data, tmp_path / "run", "vanilla", config)
    held_out = real_sample("totalseg_dicom")
    image, truth = volumes.read_volume(held_out.image), volumes.read_label(held_out.label)

    def liver_dice(path):
        model, card = checkpoint.load_model(path)
        label = inference.segment(model, card, image, device="cpu").label
        return metrics.dice(sitk.GetArrayViewFromImage(label) == 5,
                            sitk.GetArrayViewFromImage(truth) == 5)

    untrained, trained = liver_dice(base_model), liver_dice(result.model)
    assert trained > untrained + 0.3, (untrained, trained)


def test_pretrain_with_partial_labels_marks_unannotated_classes(tmp_path):
    spleen = organ_dataset(tmp_path / "a", keep={1: "spleen"})
    liver = organ_dataset(tmp_path / "b", "totalseg_mr", keep={5: "liver"})
    result = recipes.pretrain([spleen, liver], tmp_path / "base", quick(steps=2),
                               architecture="unet", arguments=TINY, spacing=[6, 6, 6],
                               patch_size=[32, 32, 32], modality="CT")
    model, card = checkpoint.load_model(result.model)
    assert card.labels == {0: "background", 1: "spleen", 2: "liver"}
    a = datasets.discover(spleen)
    prepared = sampling.prepare_case(a.cases[0], a.labels, card)
    assert prepared.annotated.tolist() == [True, True, False]
    assert set(np.unique(prepared.target)) <= {0, 1}


def test_volume_smaller_than_the_patch_is_padded(tmp_path):
    case = real_sample("pyradiomics_breast1")  # 45 x 120 x 21 voxels
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps({"1": "lesion"}))
    (folder / "cases.csv").write_text(f"image,label\n{case.image},{case.label}\n")
    result = recipes.finetune(None, folder / "cases.csv", tmp_path / "run", "scratch",
                               quick(steps=2), architecture="unet")
    model, card = checkpoint.load_model(result.model)
    assert card.patch_size == [64, 64, 64] and card.labels[1] == "lesion"


def test_bad_input_is_refused_clearly(tmp_path, base_model):
    case = real_sample("pyradiomics_brain1")
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(f"image\n{case.image}\n")
    with pytest.raises(InputError, match="no labelled case"):
        recipes.finetune(base_model, unlabelled, tmp_path / "run", "finetune", quick())
    data = organ_dataset(tmp_path / "data")
    with pytest.raises(InputError, match="needs a base model"):
        recipes.finetune(None, data, tmp_path / "run", "finetune", quick())
    with pytest.raises(InputError, match="not in dataset"):
        recipes.finetune(base_model, data, tmp_path / "run", "finetune", quick(),
                          labels=["pancreas"])
    recipes.finetune(base_model, data, tmp_path / "done", "finetune", quick(steps=1))
    with pytest.raises(TransferSegError, match="--resume"):
        recipes.finetune(base_model, data, tmp_path / "done", "finetune", quick(steps=1))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".transferseg.lock").write_text("1")
    with pytest.raises(TransferSegError, match="Another TransferSeg job"):
        recipes.finetune(base_model, data, tmp_path / "busy", "finetune", quick(steps=1))


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, base_model, monkeypatch):
    data = organ_dataset(tmp_path / "data")
    recipes.finetune(base_model, data, tmp_path / "run", "vanilla", quick(steps=3))
    state = tmp_path / "run" / "state.safetensors"
    before = state.read_bytes()

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "save_file", disk_full)
    with pytest.raises(TransferSegError, match="No space left"):
        recipes.finetune(base_model, data, tmp_path / "run", "vanilla", quick(steps=6),
                          resume=True)
    assert state.read_bytes() == before
    assert not [p for p in (tmp_path / "run").iterdir() if ".partial-" in p.name]


def test_cli_events_are_json_lines(tmp_path, base_model, capsys):
    data = organ_dataset(tmp_path / "data")
    code = main(["finetune", "--base", str(base_model), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--steps", "3", "--val-every", "3", "--batch-size", "1",
                 "--events", "jsonl", "--device", "cpu"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events if e["event"] != "message"]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert any("validation uses the training cases" in e.get("message", "") for e in events)
    assert "validation" in kinds and "step" in kinds
    step = next(e for e in events if e["event"] == "step")
    assert {"loss", "lr", "eta_s", "step", "steps"} <= set(step)


def test_torchrun_with_two_gloo_processes_writes_one_model(tmp_path, base_model):
    data = organ_dataset(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29533", "-m", "TransferSegLib", "finetune", "--base",
               str(base_model), "--data", str(data), "--out", str(tmp_path / "ddp"),
               "--steps", "4", "--val-every", "2", "--batch-size", "1", "--events", "jsonl",
               "--device", "cpu", "--strategy", "vanilla"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events].count("start") == 1  # rank 0 only
    assert next(e for e in events if e["event"] == "start")["world"] == 2
    model, card = checkpoint.load_model(tmp_path / "ddp" / "model.safetensors")
    assert card.labels[4] == "liver"


def test_gpu_out_of_memory_advice_names_the_setting_to_change(base_model):
    card = checkpoint.read_card(base_model)
    text = training._out_of_memory(torch.device("cuda", 0), quick(batch_size=4), card)
    assert "--batch-size 2" in text and "32 x 32 x 32" in text
    text = training._out_of_memory(torch.device("cuda", 0), quick(batch_size=1), card)
    assert "--patch 16 16 16" in text and "--device cpu" in text


def test_base_with_one_input_channel_is_adapted_to_two(tmp_path, base_model):
    case = real_sample("totalseg_ct")
    folder = tmp_path / "Dataset001"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    label = volumes.read_label(case.label)
    array = sitk.GetArrayFromImage(label)
    array[array != 5] = 0
    kept = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    kept.CopyInformation(label)
    volumes.write_image(kept, folder / "labelsTr" / "ct.nii.gz")
    for channel in (0, 1):
        (folder / "imagesTr" / f"ct_{channel:04d}.nii.gz").symlink_to(case.image)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "CT"}, "labels": {"background": 0, "liver": 1},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    reports = []
    result = recipes.finetune(base_model, folder, tmp_path / "run", "vanilla", quick(steps=2),
                               events=lambda e: reports.append(e.get("report", "")))
    model, card = checkpoint.load_model(result.model)
    assert card.in_channels == 2 and card.labels == {0: "background", 1: "liver"}
    assert any("input channels" in text for text in reports), reports


def test_cross_modality_transfer_takes_the_data_normalisation(tmp_path, base_model):
    case = real_sample("pyradiomics_brain1")
    (tmp_path / "labels.json").write_text(json.dumps({"1": "tumour"}))
    (tmp_path / "cases.csv").write_text(
        f"image,label,modality\n{case.image},{case.label},MR\n")
    messages = []
    result = recipes.finetune(base_model, tmp_path / "cases.csv", tmp_path / "run", "vanilla",
                               quick(steps=2), events=lambda e: messages.append(
                                   e.get("message", "")))
    card = checkpoint.read_card(result.model)
    assert card.modality == "MR" and card.normalisation["kind"] == "mr"
    assert any("cross-modality" in m for m in messages)
    assert card.labels == {0: "background", 1: "tumour"}


def test_two_stage_unfreezes_everything_on_a_plateau(tmp_path, base_model):
    data = organ_dataset(tmp_path / "data")
    events = []
    # lr 1e-12: validation Dice cannot improve, so the second stage starts after one round.
    result = recipes.finetune(base_model, data, tmp_path / "run", "two-stage",
                               quick(steps=4, val_every=1, patience=1, lr=1e-12),
                               events=events.append)
    stages = [e for e in events if e["event"] == "stage"]
    assert len(stages) == 1 and stages[0]["step"] == 2 and stages[0]["stage"] == 2
    assert result.status == "stopped early" and result.steps == 3


def test_multi_head_network_shares_all_but_the_label_tied_tensors():
    from TransferSegLib.multihead import MultiHeadNetwork

    torch.manual_seed(0)
    net = MultiHeadNetwork("unet", networks.resolve_kwargs("unet", **TINY), 1,
                           [{0: "background", 1: "spleen"},
                            {0: "background", 1: "liver", 2: "kidney"}], seed=3)
    x = torch.randn(1, 1, 16, 16, 16)
    assert net.select(0)(x).shape[1] == 2 and net.select(1)(x).shape[1] == 3
    head0 = {k: v.clone() for k, v in net.heads[0].state_dict().items()}
    shared = {k: v.clone() for k, v in net.body.state_dict().items()
              if k not in net.tied_keys}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.select(1)
    optimizer.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    optimizer.step()
    # Head 0 was not used: untouched; the shared weights moved; head 1 moved.
    for key, value in net.heads[0].state_dict().items():
        assert torch.equal(value, head0[key]), key
    body = net.body.state_dict()
    assert any(not torch.equal(body[k], shared[k]) for k in shared)
    # Selecting a head swaps parameter objects: the shared ones are single objects.
    ids = {id(p) for p in net.parameters()}
    assert len(ids) == len(list(net.parameters()))
    assert net.network(0)(x).shape[1] == 2


def test_pretrain_with_a_head_per_dataset_writes_one_base_per_head(tmp_path):
    spleen = organ_dataset(tmp_path / "a", keep={1: "spleen"})
    organs = organ_dataset(tmp_path / "b", "totalseg_mr", keep={5: "liver", 2: "kidney_right"})
    events = []
    result = recipes.pretrain([spleen, organs], tmp_path / "base", quick(steps=4, val_every=2),
                               architecture="unet", arguments=TINY, spacing=[6, 6, 6],
                               patch_size=[32, 32, 32], modality="CT", heads="per-dataset",
                               events=events.append)
    assert result.status == "done"
    files = sorted(p.name for p in (tmp_path / "base").glob("model-*.safetensors"))
    assert files == ["model-0-a.safetensors", "model-1-b.safetensors"]
    a_net, a_card = checkpoint.load_model(tmp_path / "base" / files[0])
    b_net, b_card = checkpoint.load_model(tmp_path / "base" / files[1])
    assert a_card.labels == {0: "background", 1: "spleen"}
    assert b_card.labels == {0: "background", 1: "kidney_right", 2: "liver"}
    assert a_card.lineage[-1]["heads"] == ["a", "b"] and b_card.lineage[-1]["head"] == "b"
    # Every tensor but the label-tied ones is shared, so equal in both files.
    a_state, b_state = a_net.state_dict(), b_net.state_dict()
    differing = [k for k in a_state if a_state[k].shape != b_state[k].shape]
    assert differing and all(torch.equal(a_state[k], b_state[k])
                             for k in a_state if k not in differing)
    validation = [e for e in events if e["event"] == "validation"]
    assert validation and any(k.startswith("b: ") for k in validation[-1]["labels"])
    # The default model file is head 0's; fine-tuning from a head works like any base.
    assert checkpoint.read_card(result.model).labels == a_card.labels
    tuned = recipes.finetune(tmp_path / "base" / files[1], spleen, tmp_path / "tuned",
                              "finetune", quick(steps=1))
    assert checkpoint.read_card(tuned.model).labels == {0: "background", 1: "spleen"}
    with pytest.raises(InputError, match="per-dataset"):
        recipes.pretrain([spleen], tmp_path / "x", quick(), heads="several")


def test_finetune_can_replace_the_base_models_patch(tmp_path, base_model):
    data = organ_dataset(tmp_path / "data", keep={5: "liver"})
    result = recipes.finetune(base_model, data, tmp_path / "run", "finetune", quick(steps=1),
                               patch_size=[48, 40, 24])
    assert checkpoint.read_card(result.model).patch_size == [48, 40, 24]
    with pytest.raises(InputError, match="multiple of 4"):
        recipes.finetune(base_model, data, tmp_path / "bad", "finetune", quick(steps=1),
                          patch_size=[30, 32, 32])


# A fresh interpreter (SimpleITK not loaded: the case of a training process) trains, prepares
# one case apart, and reads a broken scan apart; a fork of the test process, whose ITK thread
# pools a fork would leave behind, never reads a scan.
APART = """
import json, sys
import numpy as np
from TransferSegLib import checkpoint, datasets, errors, recipes, sampling, training
base, data, out, broken = sys.argv[1:]
config = training.TrainConfig(steps=2, batch_size=1, val_every=2, device="cpu")
result = recipes.finetune(base, data, out, "vanilla", config)
dataset = datasets.discover(data)
case = sampling.prepare_case(dataset.labelled()[0], dataset.labels, checkpoint.read_card(base))
np.savez(out + "/case.npz", image=case.image, target=case.target, annotated=case.annotated,
         **{f"foreground_{k}": v for k, v in case.foreground.items()})
try:
    sampling.median_spacing([sampling.LabelledCase(datasets.Case("broken", (broken,)), None)])
    error = None
except errors.InputError as caught:
    error = str(caught)
print(json.dumps({"status": result.status, "error": error,
                  "simpleitk": "SimpleITK" in sys.modules}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads in process elsewhere")
def test_training_process_never_loads_simpleitk_and_reads_the_same_arrays(tmp_path, base_model):
    """The scans are read in a short-lived child: the trainer never imports SimpleITK, gets
    the arrays it would have read itself, and the user's error about a scan as itself."""
    data, out, broken = organ_dataset(tmp_path / "data"), tmp_path / "run", tmp_path / "x.nii.gz"
    broken.write_bytes(b"not an image")
    env = {k: v for k, v in os.environ.items() if k != isolation.IN_PROCESS_VARIABLE}
    run = subprocess.run([sys.executable, "-c", APART, str(base_model), str(data), str(out),
                          str(broken)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["status"] == "done" and report["simpleitk"] is False
    assert "x.nii.gz" in report["error"]  # an InputError naming the file, raised apart
    assert checkpoint.read_card(out / "model.safetensors").patch_size != [32, 32, 32]

    dataset = datasets.discover(data)
    here = sampling.prepare_case(dataset.labelled()[0], dataset.labels,
                                 checkpoint.read_card(base_model))  # SimpleITK loaded here
    with np.load(out / "case.npz", allow_pickle=False) as apart:
        assert here.image.dtype == apart["image"].dtype
        assert np.array_equal(here.image, apart["image"])
        assert np.array_equal(here.target, apart["target"])
        assert np.array_equal(here.annotated, apart["annotated"])
        assert sorted(here.foreground) == sorted(
            int(k.removeprefix("foreground_")) for k in apart.files if k.startswith("foreground_"))
        assert all(np.array_equal(v, apart[f"foreground_{k}"]) for k, v in here.foreground.items())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads in process elsewhere")
def test_a_reader_that_dies_or_fails_apart_says_what_happened(monkeypatch):
    monkeypatch.setattr(isolation, "separate", lambda: True)
    with pytest.raises(TransferSegError, match="killed by signal 9"):
        isolation.call(lambda: os.kill(os.getpid(), 9), what="a case")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        isolation.call(lambda: {"x": np.array(1 / 0)})
    with pytest.raises(InputError, match="the reason"):
        isolation.call(lambda: (_ for _ in ()).throw(InputError("the reason")))
    assert isolation.call(lambda: {"x": np.arange(3)})["x"].tolist() == [0, 1, 2]
