"""The ``transferseg`` command line: each command on real data, and bad input as one sentence."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import real_sample
from safetensors.torch import save_file

from TransferSegLib import checkpoint, networks, segmentations, volumes
from TransferSegLib.cli import EXIT_USER_ERROR, main


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small random-weight UNet model file for CT with two organ labels."""
    torch.manual_seed(0)
    arguments = networks.resolve_kwargs("unet", channels=[4, 8, 16], strides=[2, 2],
                                        num_res_units=1)
    model = networks.build_network("unet", 1, 3, **arguments)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=3, arguments=arguments,
        labels={0: "background", 1: "liver", 2: "spleen"}, label_values={
            "background": 0, "liver": 5, "spleen": 1},
        spacing=[4.0, 4.0, 4.0], patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-500.0, 400.0]}, modality="CT",
    )
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return checkpoint.save_model(path, model, card)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_sentence(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_evaluate_real_segmentations_to_table_csv_and_json(tmp_path, capsys):
    case = real_sample("totalseg_ct")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(k): v for k, v in case.labels.items()}))
    code, out, _ = run(capsys, "evaluate", "--prediction", str(case.extras["prediction_fast"]),
                       "--reference", str(case.label), "--labels", str(labels),
                       "--csv", str(tmp_path / "s.csv"), "--json", str(tmp_path / "s.json"))
    assert code == 0
    assert "liver" in out and "mean" in out.lower()
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    liver = next(r for r in rows if r["name"] == "liver")
    assert float(liver["dice"]) > 0.9  # the fast model finds the liver well
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))


def test_evaluate_matches_seg_nrrd_segments_by_name(tmp_path, capsys):
    case = real_sample("slicerio_chest")
    seg = segmentations.read_segmentation(case.extras["seg_nrrd"])
    # The same segments with other values, in another order: scores must still be perfect.
    label, table = seg.to_label_map()
    array = sitk.GetArrayFromImage(label)
    renumbered = np.zeros_like(array)
    for value in table:
        renumbered[array == value] = 10 + (8 - value)
    image = sitk.GetImageFromArray(renumbered)
    image.CopyInformation(label)
    # ... and spelt otherwise ("right lung" -> "Right_Lung"): names match as they do in head
    # surgery and the Slicer module (TransferSegLib.names.normalised).
    shuffled = segmentations.Segmentation.from_label_map(
        image, {10 + (8 - v): n.title().replace(" ", "_") for v, n in table.items()})
    segmentations.write_segmentation(shuffled, tmp_path / "shuffled.seg.nrrd")
    code, out, _ = run(capsys, "evaluate", "--prediction", str(tmp_path / "shuffled.seg.nrrd"),
                       "--reference", str(case.extras["seg_nrrd"]),
                       "--json", str(tmp_path / "s.json"))
    assert code == 0
    scores = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    rows = scores["labels"] if isinstance(scores, dict) else scores
    assert {r["name"] for r in rows} == set(table.values())
    assert all(r["dice"] == 1.0 for r in rows)


def test_segment_writes_a_named_segmentation_on_the_input_grid(tmp_path, capsys, model_file):
    case = real_sample("totalseg_ct")
    output = tmp_path / "seg.seg.nrrd"
    code, out, err = run(capsys, "segment", "--model", str(model_file), "--image",
                         str(case.image), "--output", str(output), "--quiet")
    assert code == 0, err
    assert "wrote" in out and " mL" in out  # what it found, structure by structure
    written = segmentations.read_segmentation(output)
    image = volumes.read_volume(case.image)
    volumes.check_same_grid(image, written.layers[0])
    assert {(s.name, s.value) for s in written.segments} <= {("liver", 5), ("spleen", 1)}


def test_segment_a_dicom_folder(tmp_path, capsys, model_file):
    case = real_sample("totalseg_dicom")
    code, _, err = run(capsys, "segment", "--model", str(model_file), "--image",
                       str(case.extras["dicom"]), "--output", str(tmp_path / "s.nii.gz"),
                       "--quiet")
    assert code == 0, err
    assert volumes.read_label(tmp_path / "s.nii.gz").GetSize() == (512, 512, 20)


@pytest.mark.parametrize("problem", ["missing", "unsupported", "exists", "corrupt_model",
                                     "unknown_architecture", "geometry", "label_table",
                                     "nan", "two_d", "empty_reference"])
def test_bad_input_gives_one_clear_sentence(tmp_path, capsys, model_file, problem):
    case = real_sample("pyradiomics_breast1")
    image, label = str(case.image), str(case.label)
    out = str(tmp_path / "out.nii.gz")
    if problem == "missing":
        argv, words = ["evaluate", "--prediction", str(tmp_path / "nope.nii.gz"),
                       "--reference", label], ["nope.nii.gz", "does not exist"]
    elif problem == "unsupported":
        (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8")
        argv, words = ["segment", "--model", str(model_file), "--image",
                       str(tmp_path / "scan.jpg"), "--output", out], ["scan.jpg", "NIfTI"]
    elif problem == "exists":
        (tmp_path / "out.nii.gz").write_bytes(b"old")
        argv, words = ["segment", "--model", str(model_file), "--image", image,
                       "--output", out], ["out.nii.gz", "--overwrite"]
    elif problem == "corrupt_model":
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(model_file.read_bytes()[:1000])
        argv, words = ["segment", "--model", str(broken), "--image", image, "--output", out], \
            ["broken.safetensors", "truncated or corrupt"]
    elif problem == "unknown_architecture":
        card = json.loads(checkpoint.read_card(model_file).to_json())
        card["architecture"] = "alexnet3d"
        odd = tmp_path / "odd.safetensors"
        save_file({"w": torch.zeros(1)}, str(odd), metadata={
            "format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION,
            checkpoint.CARD_KEY: json.dumps(card)})
        argv, words = ["segment", "--model", str(odd), "--image", image, "--output", out], \
            ["odd.safetensors", "alexnet3d"]
    elif problem == "geometry":
        other = str(real_sample("pyradiomics_brain1").label)
        argv, words = ["evaluate", "--prediction", other, "--reference", label], ["resample"]
    elif problem == "label_table":
        table = tmp_path / "t.json"
        table.write_text(json.dumps({"2": "cyst"}))
        argv, words = ["evaluate", "--prediction", label, "--reference", label, "--labels",
                       str(table)], ["values 1", "label table"]
    elif problem == "nan":
        array = np.zeros((4, 5, 6), np.float32)
        array[0, 0, 0] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nrrd"))
        argv, words = ["segment", "--model", str(model_file), "--image",
                       str(tmp_path / "nan.nrrd"), "--output", out], ["nan.nrrd", "NaN"]
    elif problem == "two_d":
        sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
        argv, words = ["segment", "--model", str(model_file), "--image",
                       str(tmp_path / "flat.nrrd"), "--output", out], ["flat.nrrd", "2D"]
    else:
        empty = sitk.Image(volumes.read_label(label))
        empty = sitk.Multiply(empty, 0)
        volumes.write_image(empty, tmp_path / "empty.nii.gz")
        argv, words = ["evaluate", "--prediction", label, "--reference",
                       str(tmp_path / "empty.nii.gz")], ["empty.nii.gz", "empty"]
    before = (tmp_path / "out.nii.gz").read_bytes() if problem == "exists" else None
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USER_ERROR
    assert_one_sentence(err, *words)
    if before is not None:
        assert (tmp_path / "out.nii.gz").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_evaluate_resamples_only_when_asked(tmp_path, capsys):
    case = real_sample("totalseg_dicom")  # the label map on the DICOM grid
    label = volumes.read_label(case.label)
    flipped = sitk.Flip(label, [False, True, False], flipAboutOrigin=False)
    flipped.SetDirection(np.array(label.GetDirection()) * [1, -1, 1, 1, -1, 1, 1, -1, 1])
    flipped.SetOrigin(label.TransformIndexToPhysicalPoint([0, label.GetSize()[1] - 1, 0]))
    volumes.write_image(flipped, tmp_path / "flipped.nrrd")
    argv = ["evaluate", "--prediction", str(tmp_path / "flipped.nrrd"), "--reference",
            str(case.label), "--json", str(tmp_path / "s.json")]
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USER_ERROR and "--resample" in err
    code, _, err = run(capsys, *argv, "--resample")
    assert code == 0, err
    rows = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    rows = rows["labels"] if isinstance(rows, dict) else rows
    assert rows and all(r["dice"] == 1.0 for r in rows)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "evaluate", "--prediction", str(tmp_path / "a.nii.gz"),
              "--reference", str(tmp_path / "b.nii.gz")])


def test_samples_list_and_demo(tmp_path, capsys):
    code, out, _ = run(capsys, "samples", "list")
    assert code == 0 and "totalseg_ct" in out and "slicerio==1.4.0" in out
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"), "--steps", "2")
    assert code == 0
    assert "liver" in out and str(tmp_path / "demo") in out
    assert out.count("scratch on the held-out CT") == 3  # a verdict per transfer strategy
    for name in ("dice_totalseg_fast.csv", "study/summary.md", "study/dice_vs_n.png",
                 "held_out_discriminative.seg.nrrd"):
        assert (tmp_path / "demo" / name).exists(), name
    rows = list(csv.DictReader(open(tmp_path / "demo" / "study" / "results.csv")))
    assert [r["strategy"] for r in rows] == ["scratch", "discriminative", "finetune", "vanilla"]


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "TransferSegLib", "--version"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("transferseg ")


def test_study_numbers_and_pretraining_patches_are_checked_in_one_sentence(tmp_path, capsys):
    sample = real_sample("totalseg_ct")
    for flag in ("--sizes", "--seeds"):
        with pytest.raises(SystemExit) as exit_:  # argparse's usage line and one error
            main(["study", "--pool", str(sample.image.parent), "--test",
                  str(sample.image.parent), "--out", str(tmp_path / "s"), flag, "liver"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "whole numbers separated by commas" in err and "Traceback" not in err
    from TransferSegLib.demo import sample_dataset

    data = sample_dataset("totalseg_ct", tmp_path / "data", keep=("liver",))
    for patch in (["16", "16", "16"], ["8", "8", "8"]):  # unet: divisor 16, and below it
        code, _, err = run(capsys, "pretrain", "--data", str(data), "--out",
                           str(tmp_path / f"base{patch[0]}"), "--patch", *patch, "--steps", "1")
        assert code == 2
        assert_one_sentence(err, "patch")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # refused before any writing
