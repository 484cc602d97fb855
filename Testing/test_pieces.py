"""Labels that are one piece in every training scan keep only their largest piece when a
fine-tuned model segments: decided from the training label maps, written in the model card,
applied by segment (and validation), and turned off with --all-pieces."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from TransferSegLib import checkpoint, ctbase, datasets, inference, networks, sampling, training
from TransferSegLib.cli import build_parser
from TransferSegLib.recipes import finetune, one_piece_labels


def test_only_the_largest_piece_of_the_chosen_labels_is_kept():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0:4, 0:4, 0:4] = 1  # 64 voxels
    labels[7:9, 7:9, 7:9] = 1  # 8 voxels, apart
    labels[4, 4, 4] = 1  # touches the first piece at a corner only: the same piece
    labels[0:2, 8:10, 0:2] = 2  # another label, two pieces, not chosen
    labels[8:10, 0:2, 8:10] = 2
    kept = inference.keep_largest(labels.copy(), [1])
    assert (kept == 1).sum() == 65 and not kept[7:9, 7:9, 7:9].any()
    assert (kept == 2).sum() == (labels == 2).sum()
    assert np.array_equal(inference.keep_largest(labels.copy(), []), labels)


def _dataset(folder: Path, pieces: dict[str, int], modality: str = "CT") -> Path:
    """A one-case dataset whose labels have the given number of separate pieces."""
    folder.mkdir(parents=True)
    label = np.zeros((20, 80, 100), np.uint8)
    for value, count in enumerate(pieces.values(), start=1):
        for piece in range(count):
            label[2 + 5 * piece:5 + 5 * piece, 10 * value:10 * value + 5, 5:20] = value
    image = np.where(label > 0, 40, -1000).astype(np.int16)
    for name, values in (("image.nii.gz", image), ("label.nii.gz", label)):
        written = sitk.GetImageFromArray(values)
        written.SetSpacing((3.0, 3.0, 3.0))
        sitk.WriteImage(written, str(folder / name))
    names = {str(v): n for v, n in enumerate(pieces, start=1)}
    (folder / "labels.json").write_text(json.dumps(names))
    (folder / "cases.csv").write_text("image,label\nimage.nii.gz,label.nii.gz\n")
    return folder / "cases.csv"


def test_labels_drawn_in_one_piece_everywhere_are_chosen(tmp_path):
    one = _dataset(tmp_path / "a", {"liver": 1, "lesion": 2, "kidney": 1})
    two = _dataset(tmp_path / "b", {"liver": 1, "lesion": 1, "kidney": 2})
    cases = [*sampling.labelled_cases(datasets.discover(one), "a"),
             *sampling.labelled_cases(datasets.discover(two), "b")]
    assert one_piece_labels(cases, ["liver", "lesion", "kidney"]) == ["liver"]
    assert one_piece_labels(cases[1:], ["liver", "lesion", "kidney"]) == ["liver", "lesion"]


class _Bright(torch.nn.Module):
    """Channel 1 where the normalised input is bright, background elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 20 * x], dim=1)


def test_fine_tuning_records_the_one_piece_labels_and_segment_keeps_their_largest(tmp_path):
    data = _dataset(tmp_path / "data", {"liver": 1, "lesion": 2})
    base_card = checkpoint.ModelCard(
        architecture="dynunet", in_channels=1, out_channels=2,
        labels={0: "background", 1: "spleen"}, arguments=ctbase.ARGUMENTS,
        spacing=[6.0, 6.0, 6.0], patch_size=[48, 48, 48],
        normalisation={"kind": "ct", "window": [-1000.0, 1000.0]}, modality="CT")
    base = tmp_path / "base.safetensors"
    checkpoint.save_model(base, networks.build_network("dynunet", 1, 2, **ctbase.ARGUMENTS),
                          base_card)
    messages = []
    config = training.TrainConfig(steps=1, batch_size=1, checkpoint_every=1)
    finetune(base, data, tmp_path / "run", "discriminative", config,
             events=lambda e: messages.append(e.get("message", "")))
    _, card = checkpoint.load_model(tmp_path / "run" / "model.safetensors")
    assert card.inference["largest_component"] == ["liver"]
    assert any(m.startswith("liver: one piece in every training scan") for m in messages)
    finetune(base, data, tmp_path / "off", "discriminative",
             training.TrainConfig(steps=1, batch_size=1, checkpoint_every=1,
                                  largest_component=False))
    assert "largest_component" not in checkpoint.read_card(tmp_path / "off" /
                                                           "model.safetensors").inference

    # two bright blocks of different sizes, segmented by a model that calls bright "liver"
    array = np.full((24, 48, 48), -1000, np.int16)
    array[2:10, 4:20, 4:20] = 500
    array[14:18, 30:40, 30:40] = 500
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((6.0, 6.0, 6.0))
    bright_card = replace(card, out_channels=2, labels={0: "background", 1: "liver"},
                          label_values={"background": 0, "liver": 1}, terminology={},
                          inference={"padding": "edge", "largest_component": ["liver"]})
    kept = sitk.GetArrayFromImage(inference.segment(_Bright(), bright_card, image,
                                                    device="cpu").label)
    assert kept[2:10, 4:20, 4:20].all() and not kept[14:18, 30:40, 30:40].any()
    every = sitk.GetArrayFromImage(inference.segment(_Bright(), bright_card, image, device="cpu",
                                                     largest_component=False).label)
    assert every[14:18, 30:40, 30:40].all()
    args = build_parser().parse_args(["segment", "--model", "m", "--image", "i", "--output", "o",
                                      "--all-pieces"])
    assert args.all_pieces is True
