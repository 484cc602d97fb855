"""nnU-Net v2 models in and out, tested on real result folders that nnU-Net itself trained.

``Testing/fixtures/nnunet/{plain,resenc}`` were made by ``make_fixture.py`` there with
nnunetv2 2.8.1 in a separate environment: a PlainConvUNet and a ResidualEncoderUNet (a few
features per stage) trained on the 3 mm sample CT, with nnU-Net's own predictor's output for
two sample scans in ``predictions.npz``. ``plain/fold_0/checkpoint_numpy1.pth`` is the same
checkpoint saved again under numpy 1 (``make_numpy1_copy.py``), so it names numpy's modules
as numpy 1 did.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import real_sample

from TransferSegLib import cli, export, inference, nnunet_tiling, surgery, zoo
from TransferSegLib.checkpoint import load_model
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import nnunet, nnunet_plans

FIXTURES = Path(__file__).parent / "fixtures" / "nnunet"
LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_right"}


def _copy(kind: str, into: Path) -> Path:
    target = into / f"Dataset999_Tiny_{kind}"
    shutil.copytree(FIXTURES / kind, target, ignore=shutil.ignore_patterns("predictions.npz",
                                                                          "*numpy1*"))
    return target


def _agreement(result: inference.SegmentationResult, reference: np.ndarray) -> float:
    return float(np.mean(sitk.GetArrayFromImage(result.label) == reference))


# --- import ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, architecture", [("plain", "nnunet-plain"),
                                                ("resenc", "nnunet-resenc")])
def test_a_result_folder_imports_strictly_with_a_report(kind, architecture):
    model, card, report = nnunet.load_folder(FIXTURES / kind)
    assert report.ok and not report.missing and not report.unexpected
    assert card.architecture == architecture and card.labels == LABELS
    # Deep supervision: one output per lower decoder stage, left out and said so.
    assert sorted(report.dropped) == [f"decoder.seg_layers.{s}.{p}" for s in range(3)
                                      for p in ("bias", "weight")]
    assert "deep-supervision" in report.text() and "postprocessing" in report.text()
    plans = json.loads((FIXTURES / kind / "plans.json").read_text())
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    assert card.normalisation == {"kind": "ct", "window": [stats["percentile_00_5"],
                                                           stats["percentile_99_5"]],
                                  "mean": stats["mean"], "std": stats["std"]}
    config = plans["configurations"]["3d_fullres"]
    assert card.spacing == config["spacing"][::-1] and card.patch_size == config["patch_size"][::-1]
    assert card.orientation == "" and card.inference["tiling"] == "nnunet"
    assert card.inference["crop_nonzero"] is True and card.inference["mirror_axes"] == [0, 1, 2]
    # Every tensor of the checkpoint is in the network, the head is the last seg_layers entry.
    weights = nnunet.read_checkpoint(FIXTURES / kind / "fold_0" / "checkpoint_final.pth")
    head = weights["network_weights"]["decoder.seg_layers.3.weight"]
    assert torch.equal(model.head.weight, head)


def test_a_numpy_1_pickle_of_the_checkpoint_imports_to_the_same_weights(tmp_path):
    old = FIXTURES / "plain" / "fold_0" / "checkpoint_numpy1.pth"
    assert b"numpy.core.multiarray" in zipfile.ZipFile(old).read(
        next(n for n in zipfile.ZipFile(old).namelist() if n.endswith("data.pkl")))
    model, _, _ = nnunet.load_folder(FIXTURES / "plain")
    again, card, report = nnunet.load_folder(old)  # a lone checkpoint: plans from init_args
    assert report.ok and card.labels == LABELS
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                strict=True):
        assert torch.equal(a, b), key


def test_the_zip_of_a_result_folder_imports_like_the_folder(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for file in (FIXTURES / "plain").rglob("*"):
            if file.is_file() and file.name != "predictions.npz" and "numpy1" not in file.name:
                out.write(file, f"Dataset999_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres/"
                                f"{file.relative_to(FIXTURES / 'plain').as_posix()}")
    assert nnunet.is_nnunet(archive)
    model, card, report = nnunet.load_folder(archive)
    reference, _, _ = nnunet.load_folder(FIXTURES / "plain")
    assert report.ok and card.lineage[0]["fold"] == "0"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))


def test_old_plans_format_builds_the_same_network(tmp_path):
    folder = _copy("plain", tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    arch = config.pop("architecture")["arch_kwargs"]
    config.update({
        "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4,
        "unet_max_num_features": 16, "n_conv_per_stage_encoder": arch["n_conv_per_stage"],
        "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"],
        "pool_op_kernel_sizes": arch["strides"], "conv_kernel_sizes": arch["kernel_sizes"],
        "num_pool_per_axis": [4, 4, 4]})
    (folder / "plans.json").write_text(json.dumps(plans))
    _, new_card, _ = nnunet.load_folder(FIXTURES / "plain")
    _, old_card, report = nnunet.load_folder(folder)
    assert report.ok and old_card.arguments == new_card.arguments


def test_inherits_from_is_resolved_as_nnunet_does():
    plans = {"configurations": {"a": {"x": 1, "y": 2}, "b": {"inherits_from": "a", "y": 3},
                                "c": {"inherits_from": "b", "z": 4}}}
    assert nnunet_plans.configuration(plans, "c", "p") == {"x": 1, "y": 3, "z": 4}
    plans["configurations"]["a"]["inherits_from"] = "c"
    with pytest.raises(ModelFileError, match="circle"):
        nnunet_plans.configuration(plans, "c", "p")


# --- segmentation as nnU-Net's predictor -------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "resenc"])
def test_segmentation_matches_nnunet_predictor(kind):
    model, card, _ = nnunet.load_folder(FIXTURES / kind)
    expected = np.load(FIXTURES / kind / "predictions.npz")
    ct = sitk.ReadImage(str(real_sample("totalseg_ct").image))
    plain = inference.segment(model, card, ct, device="cpu", mirror=False,
                              keep_probabilities=kind == "plain")
    reference = expected["ct_plain_seg"]
    assert len(np.unique(reference)) == 4  # the fixture segments every label
    assert _agreement(plain, reference) >= 0.999
    if kind == "plain":  # stored as float16: 1e-3 apart at most, plus its rounding
        probabilities = expected["ct_plain_probabilities"].astype(np.float32)
        assert np.abs(plain.probabilities - probabilities).max() < 2e-3
    mirrored = inference.segment(model, card, ct, device="cpu")  # the card's mirroring
    assert _agreement(mirrored, expected["ct_mirror_seg"]) >= 0.999
    assert _agreement(mirrored, reference) < 1.0  # mirroring really happened


def test_a_resampled_scan_agrees_with_nnunet_predictor():
    """1.5 mm thorax CT at the model's 3 mm: normalised on its own grid, cubic B-spline to
    nnU-Net's grid (edge-aligned, overshoot clipped), logits back linearly in float16."""
    model, card, _ = nnunet.load_folder(FIXTURES / "plain")
    expected = np.load(FIXTURES / "plain" / "predictions.npz")["thorax_plain_seg"]
    thorax = sitk.ReadImage(str(real_sample("totalseg_thorax").image))
    result = inference.segment(model, card, thorax, device="cpu", mirror=False)
    assert len(np.unique(expected)) == 4
    assert _agreement(result, expected) >= 0.999


def test_float32_sums_are_more_precise_and_differ_from_nnunet_only_near_ties():
    from dataclasses import replace

    model, card, _ = nnunet.load_folder(FIXTURES / "plain")
    expected = np.load(FIXTURES / "plain" / "predictions.npz")["ct_plain_seg"]
    ct = sitk.ReadImage(str(real_sample("totalseg_ct").image))
    precise = replace(card, inference={**card.inference, "accumulate": "float32"})
    agreement = _agreement(inference.segment(model, precise, ct, device="cpu", mirror=False),
                           expected)
    assert 0.99 <= agreement < 1.0


def test_tile_starts_and_gaussian_follow_nnunet():
    from scipy.ndimage import gaussian_filter

    assert nnunet_tiling.tile_starts(110, 64) == [0, 23, 46]  # nnU-Net's own example
    assert nnunet_tiling.tile_starts(64, 64) == [0]
    assert nnunet_tiling.tile_starts(128, 64) == [0, 32, 64]
    patch = (20, 33, 16)
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    theirs = gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    theirs /= theirs.max() / 10
    theirs[theirs == 0] = theirs[theirs > 0].min()
    np.testing.assert_allclose(nnunet_tiling.gaussian_weights(patch).numpy(), theirs,
                               rtol=1e-5)


def test_only_the_nonzero_region_is_segmented_and_the_rest_is_background():
    model, card, _ = nnunet.load_folder(FIXTURES / "plain")
    ct = sitk.ReadImage(str(real_sample("totalseg_ct").image))
    array = sitk.GetArrayFromImage(ct)
    array[:, :, :20] = 0  # a zero border, as a cropped or padded scan has
    padded = sitk.GetImageFromArray(array)
    padded.CopyInformation(ct)
    box = inference.nonzero_box([padded])
    assert box is not None and box[0] == slice(20, 122)
    result = inference.segment(model, card, padded, device="cpu", mirror=False,
                               keep_probabilities=True)
    labels = sitk.GetArrayFromImage(result.label)
    assert labels.shape == array.shape and not labels[:, :, :20].any()
    assert np.all(result.probabilities[0, :, :, :20] == 1)


# --- fine-tuning and head surgery --------------------------------------------------------------

def test_head_surgery_on_an_imported_model_keeps_matched_labels_bit_exact():
    model, card, _ = nnunet.load_folder(FIXTURES / "resenc")
    target = {0: "background", 1: "liver", 2: "pancreas"}
    new, report = surgery.head_surgery(card.architecture, model, card.labels, target,
                                       arguments=card.arguments, keep_background=True)
    assert report.kept == [("background", 0, 0), ("liver", 1, 1)] and report.new == ["pancreas"]
    for channel in (0, 1):
        assert torch.equal(new.head.weight[channel], model.head.weight[channel])
        assert torch.equal(new.head.bias[channel], model.head.bias[channel])
    assert torch.equal(new.encoder[0][0].conv1.conv.weight, model.encoder[0][0].conv1.conv.weight)


@pytest.mark.slow
def test_finetune_from_an_nnunet_folder_through_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path / "home"))
    sample = real_sample("totalseg_ct")
    data = tmp_path / "data.csv"
    (tmp_path / "labels.json").write_text(json.dumps({str(k): v for k, v in
                                                      sample.labels.items()}))
    data.write_text(f"image,label\n{sample.image},{sample.label}\n")
    folder = _copy("plain", tmp_path)
    out = tmp_path / "tuned"
    code = cli.main(["finetune", "--base", str(folder), "--data", str(data), "--out", str(out),
                     "--labels", "liver,spleen", "--steps", "2", "--val-every", "2",
                     "--device", "cpu", "--patch", "64", "64", "48"])
    assert code == 0, capsys.readouterr()
    tuned, card = load_model(out / "model.safetensors")
    assert card.architecture == "nnunet-plain" and card.labels == {0: "background",
                                                                   1: "liver", 2: "spleen"}
    assert card.lineage[0]["framework"] == "nnU-Net v2"
    assert card.inference["tiling"] == "nnunet"
    # The import is cached and registered: the same folder again reuses it.
    first = zoo.require_model(str(folder))
    assert zoo.require_model(str(folder)) == first and zoo.entry(first.parent.name)


# --- export ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "resenc"])
def test_export_then_import_is_bit_identical_and_has_nnunets_tensor_names(kind, tmp_path):
    model, card, _ = nnunet.load_folder(FIXTURES / kind)
    from TransferSegLib.checkpoint import save_model

    source = save_model(tmp_path / "model.safetensors", model, card)
    folder = export.export_nnunet(source, tmp_path / "exported")
    again, again_card, report = nnunet.load_folder(folder)
    assert report.ok
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                strict=True):
        assert torch.equal(a, b), key
    assert json.loads(again_card.to_json()) == json.loads(card.to_json())
    # nnU-Net loads strictly: the exported state dict has exactly the original's names/shapes.
    original = nnunet.read_checkpoint(FIXTURES / kind / "fold_0" / "checkpoint_final.pth")
    written = nnunet.read_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    shapes = {k: tuple(v.shape) for k, v in original["network_weights"].items()}
    assert {k: tuple(v.shape) for k, v in written["network_weights"].items()} == shapes
    plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    theirs = json.loads((FIXTURES / kind / "plans.json").read_text())["configurations"][
        "3d_fullres"]
    assert plans["architecture"]["arch_kwargs"]["features_per_stage"] == \
        theirs["architecture"]["arch_kwargs"]["features_per_stage"]
    assert plans["patch_size"] == theirs["patch_size"] and plans["spacing"] == theirs["spacing"]
    assert written["inference_allowed_mirroring_axes"] == (0, 1, 2)


def test_export_refuses_a_network_nnunet_cannot_run(tmp_path):
    from TransferSegLib import networks
    from TransferSegLib.checkpoint import ModelCard, save_model

    card = ModelCard("unet", 1, 2, {0: "background", 1: "liver"}, [1.0] * 3, [32] * 3,
                     {"kind": "ct", "window": [-100, 200]},
                     arguments=networks.resolve_kwargs("unet", channels=[4, 8], strides=[2]))
    path = save_model(tmp_path / "m.safetensors", networks.build_network(
        "unet", 1, 2, **card.arguments), card)
    with pytest.raises(InputError, match="cannot be written as an nnU-Net folder"):
        export.export_nnunet(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_imports_and_exports_an_nnunet_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path / "home"))
    folder = _copy("plain", tmp_path)
    assert cli.main(["models", "import", "tiny-liver", "--nnunet", str(folder)]) == 0
    assert "tiny-liver" in capsys.readouterr().out
    model = zoo.require_model("tiny-liver")
    assert cli.main(["models", "export", str(model), "--nnunet", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "fold_0" / "checkpoint_final.pth").is_file()
    assert cli.main(["models", "import", "--nnunet", str(folder), "--fold", "3"]) == 2
    assert "has no fold 3" in capsys.readouterr().err


# --- bad input: one sentence each, naming the file ---------------------------------------------

def test_a_folder_without_plans_is_refused(tmp_path):
    folder = _copy("plain", tmp_path)
    (folder / "plans.json").unlink()
    with pytest.raises(InputError, match=r"has no plans\.json, so it is not an nnU-Net"):
        nnunet.load_folder(folder)


def test_plans_that_do_not_fit_the_checkpoint_are_refused_naming_it(tmp_path):
    folder = _copy("plain", tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][
        "features_per_stage"][0] = 8
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelFileError, match=rf"checkpoint_final.pth of {folder.name} \(fold 0\)"
                                             r" does not fit .*encoder.0.0.conv.weight is \[4, 1,"
                                             r" 3, 3, 3\] in the checkpoint") as caught:
        nnunet.load_folder(folder)
    assert "\n" not in str(caught.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo hacked",))


def test_a_checkpoint_that_needs_code_execution_is_refused_and_nothing_runs(tmp_path):
    folder = _copy("plain", tmp_path)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    data = nnunet.read_checkpoint(checkpoint)
    data["logging"] = _Payload()
    torch.save(data, checkpoint)
    with pytest.raises(ModelFileError, match=r"checkpoint_final\.pth asks to run code "
                                             r"\((posix|nt)\.system\)"):
        nnunet.load_folder(folder)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"network_weights": _Payload()}))
    with pytest.raises(ModelFileError, match="plain.pth"):
        nnunet.read_checkpoint(plain)


@pytest.mark.parametrize("edit, message", [
    (lambda p, d: p["configurations"]["3d_fullres"]["architecture"].update(
        network_class_name="dynamic_network_architectures.architectures.primus.PrimusM"),
     "uses the network PrimusM, which TransferSeg cannot build"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(patch_size=[64, 64]),
     "imports 3D configurations only"),
    (lambda p, d: d.update(labels={"background": 0, "organ": [1, 2]}),
     "region-based model"),
    (lambda p, d: d.update(channel_names={"CT": "CT"}),
     "'channel_names' keys must be 0, 1"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(
        normalization_schemes=["MyNormalization"]),
     "normalisation MyNormalization is not supported"),
])
def test_unsupported_models_are_refused_in_one_sentence(tmp_path, edit, message):
    folder = _copy("plain", tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    edit(plans, dataset)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises((InputError, ModelFileError), match=message) as caught:
        nnunet.load_folder(folder)
    assert folder.name in str(caught.value) and "\n" not in str(caught.value)


def test_an_ignore_label_is_not_an_output_channel(tmp_path):
    folder = _copy("plain", tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["ignore"] = 4
    (folder / "dataset.json").write_text(json.dumps(dataset))
    _, card, report = nnunet.load_folder(folder)
    assert card.labels == LABELS and "'ignore' label (4) is not an output" in report.text()


def test_a_zip_member_that_inflates_past_its_declared_size_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(nnunet, "MAX_JSON_BYTES", 1000)
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("m/plans.json", "{" + " " * 5000 + "}")
        out.writestr("m/dataset.json", "{}")
        out.write(FIXTURES / "plain" / "fold_0" / "checkpoint_final.pth",
                  "m/fold_0/checkpoint_final.pth")
    with pytest.raises(ModelFileError, match="more than the 1,000 allowed"):
        nnunet.load_folder(archive)


def test_a_catalog_nnunet_zip_in_totalsegmentators_layout_imports(tmp_path, monkeypatch):
    """TotalSegmentator ships each task as a zip of its result folder; the catalog entry's
    importer reads it in place. (The fixture's network stands in for the published one.)"""
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path / "home"))
    entry = zoo.entry("totalsegmentator-ct-organs")
    name = entry["files"][0]["name"]
    archive = tmp_path / name
    root = f"{name.removesuffix('.zip')}/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for part in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
            out.write(FIXTURES / "plain" / part, f"{root}/{part}")
    path = zoo.import_file(entry["id"], archive, accept_unverified=True, log=lambda _: None)
    model, card = load_model(path)
    assert card.orientation == "RAS" and card.architecture == "nnunet-plain"
    assert card.lineage[0]["published"] == entry["id"] and card.labels == LABELS
    assert card.terminology["liver"]  # Slicer's anatomy codes for the names it knows
    assert archive.is_file()  # the user's download is left as it was


def test_folds_are_averaged_as_nnunets_predictor_ensembles_them(tmp_path):
    folder = _copy("plain", tmp_path)
    checkpoint = nnunet.read_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    weights = checkpoint["network_weights"]
    for key in weights:
        if key.endswith("seg_layers.3.bias"):
            weights[key] = weights[key] + torch.tensor([1.0, 0.0, 0.0, 0.0])
    (folder / "fold_1").mkdir()
    torch.save(checkpoint, folder / "fold_1" / "checkpoint_final.pth")
    assert nnunet.available_folds(folder) == ["0", "1"]
    ensemble, card, report = nnunet.load_folder(folder, fold="average")
    assert card.architecture == "nnunet-plain-ensemble" and card.arguments["folds"] == 2
    assert card.lineage[0]["fold"] == "0,1" and "2 folds averaged" in report.text()
    one, _, _ = nnunet.load_folder(folder, fold="0")
    x = torch.randn(1, 1, 48, 64, 64)
    with torch.no_grad():
        expected = one(x) + torch.tensor([0.5, 0, 0, 0]).view(1, 4, 1, 1, 1)
        torch.testing.assert_close(ensemble(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="cannot be fine-tuned; import one fold"):
        surgery.head_surgery(card.architecture, ensemble, card.labels, {0: "background"},
                             arguments=card.arguments)


def test_a_file_that_is_no_nnunet_model_is_refused_naming_it(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"\x1f\x8b not really")
    with pytest.raises(InputError, match=r"scan\.nii\.gz is neither an nnU-Net result folder"):
        nnunet.load_folder(scan)
    fake = tmp_path / "fake.pth"
    fake.write_bytes(b"\x1f\x8b not a pickle")
    with pytest.raises(ModelFileError, match=r"fake\.pth (is not a PyTorch checkpoint|cannot "
                                             r"be read as an nnU-Net checkpoint)"):
        nnunet.load_folder(fake)
