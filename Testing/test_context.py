"""The base's own labels kept beside the new ones (``--base-labels context|keep``): the base
labels the training scans' background, the new model learns them without a Dice term,
validation and segmentations show the user's labels only (context) or all (keep)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from conftest import real_sample

from TransferSegLib import checkpoint, ctbase, datasets, inference, networks, sampling, training
from TransferSegLib.context import BaseContext, extra_labels, unusable
from TransferSegLib.losses import IGNORE, SegmentationLoss
from TransferSegLib.recipes import finetune


def _card(labels: dict[int, str], **changes) -> checkpoint.ModelCard:
    fields = dict(architecture="dynunet", in_channels=1, out_channels=len(labels), labels=labels,
                  arguments=ctbase.ARGUMENTS, spacing=[6.0, 6.0, 6.0], patch_size=[48, 48, 48],
                  normalisation={"kind": "ct", "window": [-1000.0, 1000.0]}, modality="CT")
    return checkpoint.ModelCard(**{**fields, **changes})


def _base_that_says(tmp_path: Path, labels: dict[int, str], channel: int) -> Path:
    """A base model file whose every voxel is ``channel``: its head's weights are zero and
    that channel's bias the largest."""
    card = _card(labels)
    model = networks.build_network(card.architecture, 1, len(labels), **card.arguments)
    head = networks.head(card.architecture, model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[channel] = 5.0
    path = tmp_path / "base.safetensors"
    checkpoint.save_model(path, model, card)
    return path


def _scan_dataset(folder: Path, modality: str = "CT") -> Path:
    """One CT of 100 x 80 x 20 voxels of 3 mm with a liver."""
    folder.mkdir(parents=True)
    array = np.full((20, 80, 100), -1000, np.int16)
    label = np.zeros((20, 80, 100), np.uint8)
    label[2:-2, 5:-5, 5:-5] = 1
    array[label == 1] = 40
    for name, values in (("image.nii.gz", array), ("label.nii.gz", label)):
        image = sitk.GetImageFromArray(values)
        image.SetSpacing((3.0, 3.0, 3.0))
        sitk.WriteImage(image, str(folder / name))
    (folder / "labels.json").write_text(json.dumps({"1": "liver"}))
    (folder / "cases.csv").write_text(f"image,label,modality\nimage.nii.gz,label.nii.gz,"
                                      f"{modality}\n")
    return folder / "cases.csv"


BASE_LABELS = {0: "background", 1: "spleen", 2: "kidney_left", 3: "Liver"}


def test_the_base_labels_only_annotated_background():
    """Voxels drawn as a new label and ignored voxels keep their targets; background voxels
    take the base's label; validation scores the user's labels only."""
    base = _card(BASE_LABELS)
    model = networks.build_network(base.architecture, 1, 4, **base.arguments)
    head = networks.head(base.architecture, model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # kidney_left everywhere
    assert extra_labels(base, ["liver"]) == ["spleen", "kidney_left"]  # Liver is the user's
    target = np.zeros((16, 32, 32), np.int16)
    target[4:8] = 1  # liver
    target[:, :2] = IGNORE
    annotated = np.array([True, True, False, False])
    case = sampling.PreparedCase("c", np.zeros((1, 16, 32, 32), np.float32), target, annotated,
                                 {1: np.flatnonzero(target == 1)})
    context = BaseContext(model, base, {1: 2, 2: 3}, "cpu")  # new: liver 1, spleen 2, kidney 3
    labelled = context(case)
    assert np.all(labelled.target[target == 1] == 1)
    assert np.all(labelled.target[target == IGNORE] == IGNORE)
    assert np.all(labelled.target[target == 0] == 3)
    assert context.labelled == {"c": int((target == 0).sum())}
    assert labelled.annotated.tolist() == [True, True, True, True]
    assert labelled.foreground.keys() == {1}  # patches still centre on the user's label
    assert context.scored(labelled).annotated.tolist() == [True, True, False, False]


def test_the_shipped_base_labels_its_own_training_ct_as_drawn():
    """On a CT it was trained on, the shipped base's labels of the background match the CT's
    own drawing of those structures: what the new model is taught is anatomy, not noise."""
    from TransferSegLib import zoo

    base_path = zoo.fetch(ctbase.MODEL_ID)
    model, base = checkpoint.load_model(base_path)
    sample = real_sample("totalseg_ct")
    table = datasets.LabelTable(sample.labels)
    case = datasets.Case("ct", (sample.image,), sample.label)
    names = ["liver", "spleen", "stomach"]
    extra = extra_labels(base, names)
    card = _card({0: "background", **dict(enumerate([*names, *extra], start=1))},
                 spacing=base.spacing, patch_size=base.patch_size,
                 normalisation=base.normalisation, orientation=base.orientation,
                 inference=base.inference, arguments=base.arguments)
    assert unusable(base, card) == ""
    # what a user drew: the three organs; the rest of the scan is background to them
    drawn = {value: name if name in names else f"structure {value}"
             for value, name in sample.labels.items()}
    prepared = sampling.prepare_case(case, datasets.LabelTable(drawn), card,
                                     others_background=True)
    channel_of = {name: c for c, name in card.labels.items()}
    context = BaseContext(model, base, {c: channel_of[n] for c, n in base.labels.items()
                                        if n in extra}, "cpu")
    labelled = context(prepared)
    truth = sampling.prepare_case(case, table, _card(
        {0: "background", **dict(enumerate(sample.labels.values(), start=1))},
        spacing=base.spacing, normalisation=base.normalisation, orientation=base.orientation))
    true_of = {name: c for c, name in enumerate(sample.labels.values(), start=1)}
    scores = {}
    for name in ("kidney_left", "kidney_right", "aorta"):  # measured 0.80, 0.85, 0.86
        mine, drawn = labelled.target == channel_of[name], truth.target == true_of[name]
        scores[name] = 2 * (mine & drawn).sum() / (mine.sum() + drawn.sum())
    assert min(scores.values()) > 0.7, scores
    # the user's organs stay theirs
    drawn_organs = prepared.target > 0
    assert np.array_equal(labelled.target[drawn_organs], prepared.target[drawn_organs])


def test_fine_tuning_keeps_the_base_labels_as_context(tmp_path):
    """--base-labels context: the new model has the base's other labels as channels, learnt
    (not scored in validation) and written as background; keep writes them too."""
    data = _scan_dataset(tmp_path / "data")
    base = _base_that_says(tmp_path, BASE_LABELS, 2)
    config = training.TrainConfig(steps=2, batch_size=1, val_every=1, checkpoint_every=2,
                                  base_labels="context")
    messages = []
    finetune(base, data, tmp_path / "run", "discriminative", config,
             events=lambda e: messages.append(e.get("message", "")))
    _, card = checkpoint.load_model(tmp_path / "run" / "model.safetensors")
    assert list(card.labels.values()) == ["background", "liver", "spleen", "kidney_left"]
    assert card.label_values["spleen"] == card.label_values["kidney_left"] == 0
    assert card.written_labels() == {1: "liver"}
    assert card.lineage[-1]["base_labels"] == "context"
    assert any("2 other labels are kept" in m for m in messages)
    assert all(entry["labels"].keys() == {"liver"} for entry in card.metrics["history"])
    image = sitk.ReadImage(str(tmp_path / "data" / "image.nii.gz"))
    model, card = checkpoint.load_model(tmp_path / "run" / "model.safetensors")
    result = inference.segment(model, card, image, device="cpu")
    assert set(result.labels.values()) <= {"liver"}
    assert set(np.unique(sitk.GetArrayFromImage(result.label))) <= {0, 1}

    finetune(base, data, tmp_path / "keep", "discriminative",
             training.TrainConfig(steps=1, batch_size=1, checkpoint_every=1, base_labels="keep"))
    _, card = checkpoint.load_model(tmp_path / "keep" / "model.safetensors")
    assert card.written_labels() == {1: "liver", 2: "spleen", 3: "kidney_left"}
    assert len(set(card.label_values.values())) == 4


def test_a_base_that_reads_other_scans_cannot_label_them(tmp_path):
    """Cross-modality (an MR dataset from a CT base): the base's labels are dropped, said so."""
    data = _scan_dataset(tmp_path / "data", modality="MR")
    base = _base_that_says(tmp_path, BASE_LABELS, 2)
    messages = []
    finetune(base, data, tmp_path / "run", "discriminative",
             training.TrainConfig(steps=1, batch_size=1, checkpoint_every=1,
                                  base_labels="context"),
             events=lambda e: messages.append(e.get("message", "")))
    _, card = checkpoint.load_model(tmp_path / "run" / "model.safetensors")
    assert list(card.labels.values()) == ["background", "liver"]
    assert any("labels are dropped" in m and "MR" in m for m in messages)


def test_labels_kept_as_context_take_no_dice_term():
    """An excluded channel predicted everywhere and drawn nowhere costs Dice nothing; without
    the exclusion it costs about 1 of the mean."""
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    logits = torch.full((1, 3, 4, 4, 4), -10.0)
    logits[0, 1][target[0] == 1] = 10.0
    logits[0, 2][target[0] == 0] = 10.0  # channel 2 claims the background voxels
    plain = SegmentationLoss(ce_weight=0)(logits, target)
    excluded = SegmentationLoss(ce_weight=0, dice_exclude=[2])(logits, target)
    assert excluded.item() < 1e-3
    assert 0.45 < plain.item() < 0.55  # (0 for channel 1 + 1 for channel 2) / 2
    assert SegmentationLoss(ce_weight=0, dice_exclude=[7])(logits, target) == plain
