"""Swin UNETR's self-supervised encoder, MONAI bundles and plain state_dicts in; MONAI bundles and
TorchScript out."""

from __future__ import annotations

import json
import re
import shutil
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_image
from monai.networks.nets import SegResNet, SwinUNETR

from TransferSegLib import export, inference, networks
from TransferSegLib.checkpoint import ModelCard, load_model, save_model
from TransferSegLib.errors import InputError, ModelFileError
from TransferSegLib.importers import monai_bundle, native, swinunetr_ssl


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every float weight and statistic set to distinct random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            elif value.is_floating_point() and not key.endswith("relative_position_bias_table"):
                value.copy_(torch.randn(value.shape, generator=generator) * 0.05)
    return model.eval()


# --- Swin UNETR self-supervised encoder ------------------------------------------------------

@pytest.fixture(scope="module")
def swin_encoder() -> dict[str, torch.Tensor]:
    """The Swin ViT of a Swin UNETR of the published size (feature size 48), random weights,
    under MONAI's current names without the ``swinViT.`` prefix."""
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=48)
    return {k: v.clone() for k, v in randomised(model.swinViT).state_dict().items()}


def test_published_ssl_file_lands_in_the_encoder(tmp_path, swin_encoder):
    # The published layout (what MONAI's SwinUNETR.load_from reads): a DataParallel state_dict
    # of the Swin ViT alone, with fc1/fc2 naming each block's MLP layers.
    published = {"module." + re.sub(r"\.mlp\.linear([12])\.", r".mlp.fc\1.", k): v
                 for k, v in swin_encoder.items()}
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in published
    assert published["module.patch_embed.proj.weight"].shape == (48, 1, 2, 2, 2)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": published}, path)

    model, card, report = swinunetr_ssl.load(path, {})

    assert report.ok and len(report.loaded) == len(swin_encoder)
    state = model.state_dict()
    for key, value in swin_encoder.items():
        assert torch.equal(state["swinViT." + key], value), key
    assert all(not k.startswith("swinViT.") for k in report.expected_missing)
    assert "out.conv.conv.weight" in report.expected_missing
    assert card.architecture == "swinunetr"
    assert card.arguments["feature_size"] == 48 and card.arguments["window_size"] == 7
    assert card.arguments["depths"] == [2, 2, 2, 2]
    assert card.arguments["num_heads"] == [3, 6, 12, 24]
    assert (card.orientation, card.spacing) == ("SAR", [2.0, 1.5, 1.5])
    assert card.normalisation == {"kind": "ct", "window": [-1000.0, 1000.0]}
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 64)).shape == (1, 2, 32, 32, 64)


def test_pretraining_checkpoint_drops_the_self_supervision_heads(tmp_path, swin_encoder):
    tensors = {f"module.swin_vit.{k}": v for k, v in swin_encoder.items()}
    heads = {"module.rotation_head.weight": torch.randn(4, 768),
             "module.contrastive_head.weight": torch.randn(512, 768),
             "module.conv.0.weight": torch.randn(384, 768, 3, 3, 3)}
    path = tmp_path / "ssl_checkpoint.pt"
    torch.save({"epoch": 10, "state_dict": {**tensors, **heads}}, path)
    model, _, report = swinunetr_ssl.load(path, {"labels": {"0": "background", "1": "organ"}})
    assert sorted(report.dropped) == ["contrastive_head.weight", "conv.0.weight",
                                      "rotation_head.weight"]
    assert torch.equal(model.swinViT.layers4[0].blocks[1].mlp.linear2.weight,
                       swin_encoder["layers4.0.blocks.1.mlp.linear2.weight"])


def test_ssl_file_and_entry_of_different_sizes_are_refused(tmp_path, swin_encoder):
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in swin_encoder.items()}}, path)
    with pytest.raises(ModelFileError, match="feature_size 24"):
        swinunetr_ssl.load(path, {"arguments": {"feature_size": 24}})


# --- MONAI bundles in --------------------------------------------------------------------------

SEGRESNET_CONFIG = {
    "imports": ["$import glob"],
    "num_classes": 3,
    "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1,
                    "out_channels": "@num_classes", "init_filters": 8,
                    "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
         "b_min": 0, "b_max": 1, "clip": True},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 64],
                "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]},
}
METADATA = {"name": "Toy abdomen", "network_data_format": {
    "inputs": {"image": {"modality": "CT", "num_channels": 1}},
    "outputs": {"pred": {"channel_def": {"0": "background", "1": "liver", "2": "spleen"}}}}}


@pytest.fixture(scope="module")
def monai_segresnet() -> torch.nn.Module:
    # Built by MONAI itself: no norm given, so MONAI's default (group norm, 8 groups) applies.
    torch.manual_seed(0)
    model = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8,
                      blocks_down=[1, 1, 1], blocks_up=[1, 1])
    return randomised(model)


def write_bundle(folder, config, model_state, metadata=METADATA, yaml=False):
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    if yaml:
        import yaml as pyyaml

        (folder / "configs" / "inference.yaml").write_text(pyyaml.safe_dump(config))
    else:
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.save(model_state, folder / "models" / "model.pt")
    return folder


def test_bundle_folder_gives_the_same_network_and_a_card(tmp_path, monai_segresnet):
    bundle = write_bundle(tmp_path / "toy_bundle", SEGRESNET_CONFIG, monai_segresnet.state_dict())
    model, card, report = monai_bundle.load(bundle, {})
    assert report.ok and len(report.loaded) == len(monai_segresnet.state_dict())
    for key, value in monai_segresnet.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert card.architecture == "segresnet"
    assert card.arguments["norm"] == ["GROUP", {"num_groups": 8}]  # MONAI's default, not ours
    assert card.labels == {0: "background", 1: "liver", 2: "spleen"}
    # MONAI's (x, y, z) arrays of RAS data are TransferSeg's (z, y, x) arrays of "SAR" data.
    assert card.orientation == "SAR"
    assert card.spacing == [2.0, 1.5, 1.5]
    assert card.patch_size == [64, 96, 96]
    assert card.normalisation == {"kind": "ct", "window": [-57.0, 164.0]}
    assert card.modality == "CT" and card.title == "Toy abdomen"
    assert any("CropForegroundd" in note for note in report.notes)
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        assert torch.equal(model(x), monai_segresnet(x))


@pytest.mark.parametrize("definition", [
    # The spleen bundle's UNet (batch norm; MONAI's defaults for everything else).
    {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
     "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 2, "norm": "batch"},
    # No num_res_units: MONAI's default is 0, TransferSeg's 2.
    {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1,
     "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]},
    {"_target_": "DynUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
     "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2]},
])
def test_monai_defaults_are_kept_for_arguments_a_bundle_leaves_out(tmp_path, definition):
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    reference = randomised(ConfigParser({"net": definition}).get_parsed_content("net"))
    config = {**SEGRESNET_CONFIG, "network_def": definition}
    metadata = {"network_data_format": {"outputs": {"pred": {
        "channel_def": {"0": "background", "1": "spleen"}}}}}
    bundle = write_bundle(tmp_path / "b", config, reference.state_dict(), metadata=metadata)
    model, _, report = monai_bundle.load(bundle, {})
    assert report.ok
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_bundle_zip_with_yaml_config_imports_alike(tmp_path, monai_segresnet):
    folder = write_bundle(tmp_path / "toy_bundle", SEGRESNET_CONFIG,
                          monai_segresnet.state_dict(), yaml=True)
    archive = tmp_path / "toy_bundle_v0.1.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in folder.rglob("*"):
            zipped.write(file, file.relative_to(tmp_path).as_posix())
    shutil.rmtree(folder)
    model, card, report = monai_bundle.load(archive, {})
    assert report.ok and card.spacing == [2.0, 1.5, 1.5]
    assert torch.equal(model.conv_final[2].conv.weight, monai_segresnet.conv_final[2].conv.weight)


def test_bundle_without_plain_settings_notes_its_assumptions(tmp_path, monai_segresnet):
    config = {k: v for k, v in SEGRESNET_CONFIG.items() if k not in ("preprocessing", "inferer")}
    bundle = write_bundle(tmp_path / "bare", config, monai_segresnet.state_dict(), metadata={})
    _, card, report = monai_bundle.load(bundle, {"spacing": [0.8, 0.8, 3.0]})
    text = report.text()
    assert card.spacing == [0.8, 0.8, 3.0] and "spacing from the catalog entry" in text
    assert card.orientation == "SAR" and "orientation ASSUMED" in text
    assert card.labels == {0: "background", 1: "label_1", 2: "label_2"}
    assert "channel 0 assumed background" in text


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"network_def": {"_target_": "BasicUNet", "spatial_dims": 3, "in_channels": 1,
                      "out_channels": 3}}, InputError, "can import"),
    ({"num_classes": "$len(['a', 'b', 'c'])"}, ModelFileError, "without running"),
    ({"postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]}},
     InputError, "one label"),
])
def test_bundles_that_cannot_be_imported_say_why(tmp_path, monai_segresnet, change, error,
                                                 message):
    bundle = write_bundle(tmp_path / "b", {**SEGRESNET_CONFIG, **change},
                          monai_segresnet.state_dict())
    with pytest.raises(error, match=message):
        monai_bundle.load(bundle, {})


def test_bundle_weights_needing_pickle_are_refused(tmp_path, monai_segresnet):
    bundle = write_bundle(tmp_path / "b", SEGRESNET_CONFIG, monai_segresnet)  # the module itself
    with pytest.raises(ModelFileError, match="pickle"):
        monai_bundle.load(bundle, {})


# --- plain state_dicts and TransferSeg files ---------------------------------------------------

def tiny_card(architecture="unet", arguments=None, **fields) -> ModelCard:
    arguments = networks.resolve_kwargs(architecture, **(arguments or {}))
    values = {"architecture": architecture, "in_channels": 1, "out_channels": 3,
              "labels": {0: "background", 1: "liver", 2: "spleen"}, "spacing": [1.5, 1.5, 2.0],
              "patch_size": [32, 32, 16], "normalisation": {"kind": "ct", "window": [-200, 300]},
              "arguments": arguments, "modality": "CT", **fields}
    return ModelCard(**values)


TINY_UNET = {"channels": [4, 8, 16], "num_res_units": 1}


def test_plain_state_dict_with_a_card(tmp_path):
    card = tiny_card(arguments=TINY_UNET)
    source = randomised(networks.build_network("unet", 1, 3, **TINY_UNET))
    path = tmp_path / "weights.pth"
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model, _, report = native.import_state_dict(path, card)
    assert report.ok and len(report.loaded) == len(source.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    wrong = tiny_card(arguments={"channels": [4, 8, 32], "num_res_units": 1})
    with pytest.raises(ModelFileError, match="SHAPE MISMATCH"):
        native.import_state_dict(path, wrong)


def test_native_importer_takes_model_files_as_they_are_and_state_dicts_by_entry(tmp_path):
    card = tiny_card(arguments=TINY_UNET, title="tiny")
    source = randomised(networks.build_network("unet", 1, 3, **TINY_UNET))
    save_model(tmp_path / "tiny.safetensors", source, card)
    model, loaded_card, report = native.load(tmp_path / "tiny.safetensors", {})
    assert loaded_card.title == "tiny" and report.ok
    assert torch.equal(model.state_dict()["model.0.conv.unit0.conv.weight"],
                       source.state_dict()["model.0.conv.unit0.conv.weight"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "plain.safetensors"))
    entry = {"architecture": "unet", "arguments": TINY_UNET,
             "labels": {"0": "background", "1": "liver", "2": "spleen"}}
    model, card, report = native.load(tmp_path / "plain.safetensors", entry)
    assert report.ok and card.out_channels == 3
    assert torch.equal(model.state_dict()["model.0.conv.unit0.conv.weight"],
                       source.state_dict()["model.0.conv.unit0.conv.weight"])
    with pytest.raises(InputError, match="architecture"):
        native.load(tmp_path / "plain.safetensors", {"labels": entry["labels"]})


# --- MONAI bundles and TorchScript out --------------------------------------------------------

@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A small CT-like volume on the models' grid (1.5 x 1.5 x 2 mm, axes LPS), as NIfTI."""
    rng = np.random.default_rng(0)
    array = rng.normal(0, 60, (20, 40, 36)).astype(np.float32)
    array[5:15, 10:30, 8:20] += 250
    image = make_image(array, spacing=(1.5, 1.5, 2.0), origin=(10.0, -5.0, 3.0))
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


EXPORTED = {
    "unet": ("unet", TINY_UNET, "LPS", [1.5, 1.5, 2.0]),
    # TransferSeg's own network (MONAI instantiates TransferSegLib's class), another axis
    # order, and label values other than the channel numbers.
    "medicalnet": ("medicalnet", {"depth": 10}, "SAR", [2.0, 1.5, 1.5]),
}


@pytest.fixture(scope="module", params=sorted(EXPORTED))
def model_file(request, tmp_path_factory):
    architecture, arguments, orientation, spacing = EXPORTED[request.param]
    torch.manual_seed(0)
    # The architecture's own initialisation, with batch-norm statistics that differ from the
    # defaults (so the bundle must carry them) and a head strong enough that all labels occur.
    model = networks.build_network(architecture, 1, 3, **arguments).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
        networks.head(architecture, model).weight.normal_(0.0, 1.0)
    card = tiny_card(architecture, arguments, orientation=orientation, spacing=spacing,
                     label_values={"background": 0, "liver": 6, "spleen": 1})
    path = tmp_path_factory.mktemp("model") / f"{architecture}.safetensors"
    return save_model(path, model, card)


@pytest.mark.parametrize("recipe", [
    {"kind": "ct", "window": [-200, 300]},
    {"kind": "ct", "window": [-1000, 1000], "scale": False},
    {"kind": "mr", "percentiles": [1.0, 99.0]},
    {"kind": "mr", "percentiles": [0.5, 99.5], "output_mean": 0.449, "output_std": 0.226},
    {"kind": "zscore"},
    {"kind": "zscore", "nonzero": True},
    {"kind": "none"},
])
def test_exported_intensity_transforms_compute_the_card_recipe(recipe):
    from monai.bundle import ConfigParser

    from TransferSegLib.preprocess import normalise

    rng = np.random.default_rng(1)
    array = rng.gamma(2.0, 150.0, (12, 14, 16)).astype(np.float32) - 300
    array[:3] = 0  # a zero background, for the nonzero z-score
    transforms = export.intensity_transforms(recipe)
    compose = ConfigParser({"t": {"_target_": "Compose", "transforms": transforms}})
    got = compose.get_parsed_content("t")({"image": torch.from_numpy(array[None].copy())})
    expected = normalise(array, recipe)
    scale = max(1.0, float(np.abs(expected).max()))  # float32 statistics and HU values
    np.testing.assert_allclose(np.asarray(got["image"])[0], expected, rtol=0, atol=1e-5 * scale)


def test_exported_bundle_runs_in_monai_and_segments_as_transferseg(tmp_path, model_file, scan):
    from monai.bundle import run

    bundle = export.export_bundle(model_file, tmp_path / "bundle")
    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "liver", "2": "spleen"}
    target = config["network_def"]["_target_"]
    assert target in ("monai.networks.nets.UNet", "TransferSegLib.nets.medicalnet.MedicalNet")

    with pytest.warns(UserWarning):  # MONAI's own notice that configs run code
        run("run", config_file=str(bundle / "configs" / "inference.json"),
            meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
            bundle_root=str(bundle), datalist=[str(scan)], output_dir=str(tmp_path / "out"))
    theirs = sitk.ReadImage(str(tmp_path / "out" / "scan_seg.nii.gz"))

    model, card = load_model(model_file)
    ours = inference.segment(model, card, sitk.ReadImage(str(scan)), device="cpu").label
    theirs_array, ours_array = sitk.GetArrayFromImage(theirs), sitk.GetArrayFromImage(ours)
    assert set(np.unique(ours_array)) == {0, 1, 6}  # every label present: a real comparison
    np.testing.assert_array_equal(theirs_array, ours_array)
    assert np.allclose(theirs.GetOrigin(), ours.GetOrigin())
    assert np.allclose(theirs.GetSpacing(), ours.GetSpacing())


def test_exported_bundle_imports_back_to_the_same_model(tmp_path, model_file):
    bundle = export.export_bundle(model_file, tmp_path / "bundle")
    with pytest.raises(Exception, match="exists"):
        export.export_bundle(model_file, tmp_path / "bundle")
    model, card, report = monai_bundle.load(bundle, {})
    original, original_card = load_model(model_file)
    assert report.ok
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.state_dict().items())
    for field in ("architecture", "arguments", "labels", "label_values", "spacing",
                  "orientation", "patch_size", "normalisation", "modality"):
        assert getattr(card, field) == getattr(original_card, field), field


def test_torchscript_export_matches_the_network(tmp_path, model_file):
    how = export.export_torchscript(model_file, tmp_path / "model.ts")
    assert how == "script"
    extra = {export.CARD_FILE: ""}
    compiled = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    model, card = load_model(model_file)
    assert ModelCard.from_json(extra[export.CARD_FILE]).labels == card.labels
    x = torch.randn(2, 1, *reversed(card.patch_size))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_networks_that_cannot_be_compiled_are_traced_at_the_patch_size(tmp_path):
    arguments = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    card = tiny_card("swinunetr", arguments, patch_size=[64, 32, 32])
    torch.manual_seed(0)
    model = networks.build_network("swinunetr", 1, 3, **arguments).eval()
    path = save_model(tmp_path / "swin.safetensors", model, card)
    assert export.export_torchscript(path, tmp_path / "swin.ts") == "trace"
    compiled = torch.jit.load(str(tmp_path / "swin.ts"))
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
