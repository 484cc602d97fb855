"""The TransferSeg model file: exact round trips, clear errors for every kind of bad file."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import TransferSegLib
from TransferSegLib import checkpoint, networks
from TransferSegLib.checkpoint import ModelCard, load_model, read_card, save_model
from TransferSegLib.errors import ModelFileError, OutputExistsError

TINY = {
    "unet": {"channels": [4, 8, 16], "num_res_units": 1},
    "dynunet": {"levels": 3, "filters": [4, 8, 16]},
    "segresnet": {"init_filters": 4, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
}


def make_card(architecture: str = "unet", **changes) -> ModelCard:
    fields = {
        "architecture": architecture,
        "in_channels": 1,
        "out_channels": 3,
        "labels": {0: "background", 1: "liver", 2: "liver tumour"},
        "spacing": [0.8, 0.8, 2.5],
        "patch_size": [32, 32, 32],
        "normalisation": {"kind": "ct", "window": [-100, 250]},
        "arguments": networks.resolve_kwargs(architecture, **TINY[architecture]),
        "modality": "CT",
        "lineage": [{"base": "scratch", "strategy": "scratch", "sha256": "0" * 64}],
        "training_cases": ["liver_001", "liver_002"],
        "metrics": {"dice": {"liver": 0.93}},
        "title": "Liver (tiny test model)",
    }
    fields.update(changes)
    return ModelCard(**fields)


def make_model(card: ModelCard, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = networks.build_network(
        card.architecture, card.in_channels, card.out_channels, **card.arguments
    )
    # Non-trivial norm statistics and parameters, so a load that kept initial values would show.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return model.eval()


def write_raw(path: Path, card_json: str | None, tensors=None, **metadata) -> Path:
    """A safetensors file made without TransferSeg, to craft bad model files."""
    header = {"format": "transferseg-model", "format_version": "1", **metadata}
    if card_json is not None:
        header["transferseg.card"] = card_json
    save_file(tensors or {"weight": torch.zeros(2)}, str(path), metadata=header)
    return path


def card_dict(**changes) -> dict:
    data = json.loads(make_card().to_json())
    data.update(changes)
    return data


@pytest.mark.parametrize("architecture", ["unet", "dynunet", "segresnet"])
def test_round_trip_gives_bit_identical_outputs(tmp_path, architecture):
    card = make_card(architecture)
    model = make_model(card)
    torch.manual_seed(1)
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = model(image)
    path = save_model(tmp_path / "model.safetensors", model, card)
    loaded, loaded_card = load_model(path)
    assert not loaded.training
    assert loaded_card == card
    with torch.no_grad():
        assert torch.equal(loaded(image), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_card_round_trips_through_json_and_header(tmp_path):
    card = make_card()
    assert ModelCard.from_json(card.to_json()) == card
    path = save_model(tmp_path / "model.safetensors", make_model(card), card)
    assert read_card(path) == card
    assert card.label_values == {"background": 0, "liver": 1, "liver tumour": 2}
    assert card.orientation == "LPS" and card.transferseg_version == TransferSegLib.__version__


def test_custom_label_values_survive(tmp_path):
    card = make_card(label_values={"background": 0, "liver": 6, "liver tumour": 7})
    path = save_model(tmp_path / "model.safetensors", make_model(card), card)
    assert read_card(path).label_values["liver"] == 6


def test_noncontiguous_parameter_saves(tmp_path):
    card = make_card()
    model = make_model(card)
    head = networks.head("unet", model)
    strided = head.weight.detach().transpose(0, 1).contiguous().transpose(0, 1)
    head.weight = torch.nn.Parameter(strided)
    assert not head.weight.is_contiguous()
    path = save_model(tmp_path / "model.safetensors", model, card)
    loaded, _ = load_model(path)
    assert torch.equal(networks.head("unet", loaded).weight, head.weight)


def test_shared_tensors_save_and_load(tmp_path):
    # MONAI's DynUNet lists its blocks twice (skip_layers), so its state dict shares storage,
    # which safetensors refuses unless each tensor is copied.
    card = make_card("dynunet")
    model = make_model(card)
    state = model.state_dict()
    assert len({v.data_ptr() for v in state.values()}) < len(state)
    loaded, _ = load_model(save_model(tmp_path / "model.safetensors", model, card))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_card_not_matching_the_model_is_refused_before_writing(tmp_path):
    card = make_card()
    wrong = make_card(out_channels=2, labels={0: "background", 1: "liver"})
    with pytest.raises(ModelFileError, match="out_channels|shape"):
        save_model(tmp_path / "model.safetensors", make_model(card), wrong)
    assert list(tmp_path.iterdir()) == []


def test_weights_not_fitting_the_card_are_a_model_file_error(tmp_path):
    card = make_card()
    tensors = {k: v.contiguous() for k, v in make_model(card).state_dict().items()}
    key = next(iter(tensors))
    tensors[key] = torch.zeros(1)
    path = write_raw(tmp_path / "model.safetensors", card.to_json(), tensors)
    with pytest.raises(ModelFileError, match=re.escape(str(path))) as caught:
        load_model(path)
    assert key in str(caught.value)


def test_truncated_file_is_reported_as_such(tmp_path):
    card = make_card()
    path = save_model(tmp_path / "model.safetensors", make_model(card), card)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for reader in (load_model, read_card):
        with pytest.raises(ModelFileError, match="truncated or corrupt") as caught:
            reader(path)
        assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 40, b"\x08" + b"\0" * 7 + b"{}"])
def test_random_empty_or_broken_file_is_a_model_file_error(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="truncated or corrupt") as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(ModelFileError, match=re.escape(str(path))):
        load_model(path)


def test_weights_without_card_are_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="no TransferSeg model card"):
        read_card(path)


def test_newer_format_version_asks_for_an_update(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", make_card().to_json(), format_version="2")
    with pytest.raises(ModelFileError, match="update TransferSeg"):
        read_card(path)


def test_unknown_architecture_names_file_and_known_ones(tmp_path):
    path = write_raw(
        tmp_path / "m.safetensors", json.dumps(card_dict(architecture="resnet-9000"))
    )
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message and "resnet-9000" in message and "unknown architecture" in message
    assert all(name in message for name in networks.architectures())


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"spacing": "0.8 mm"}, "spacing"),
        ({"spacing": [0.8, 0.8]}, "spacing"),
        ({"in_channels": "1"}, "in_channels"),
        ({"out_channels": True}, "out_channels"),
        ({"patch_size": [32, 32, 32.5]}, "patch_size"),
        ({"labels": {"0": "background", "x": "liver"}}, "labels"),
        ({"labels": {"0": "background", "1": "liver"}}, "labels"),  # out_channels is 3
        ({"label_values": {"background": 0, "liver": 1}}, "label_values"),
        ({"orientation": "LPP"}, "orientation"),
        ({"normalisation": {"window": [0, 1]}}, "normalisation"),
        ({"training_cases": ["a", 2]}, "training_cases"),
        ({"arguments": {"channels": [4, 8, 16], "bogus": 1}}, "bogus"),
        ({"colour": "red"}, "colour"),  # unknown field
    ],
)
def test_bad_card_field_is_named_with_the_file(tmp_path, changes, field):
    path = write_raw(tmp_path / "m.safetensors", json.dumps(card_dict(**changes)))
    with pytest.raises(ModelFileError) as caught:
        read_card(path)
    assert field in str(caught.value) and str(path) in str(caught.value)


def test_missing_required_field_and_bad_json_are_named(tmp_path):
    data = card_dict()
    del data["spacing"]
    path = write_raw(tmp_path / "m.safetensors", json.dumps(data))
    with pytest.raises(ModelFileError, match="'spacing' is missing"):
        read_card(path)
    path = write_raw(tmp_path / "n.safetensors", "{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        read_card(path)


def test_invalid_card_is_not_saved(tmp_path):
    card = make_card(spacing=[0.8, -1.0, 2.5])
    with pytest.raises(ModelFileError, match="spacing"):
        save_model(tmp_path / "model.safetensors", make_model(make_card()), card)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    card = make_card()
    path = save_model(tmp_path / "model.safetensors", make_model(card, seed=0), card)
    before = path.read_bytes()
    newer = make_card(title="second version")
    with pytest.raises(OutputExistsError):
        save_model(path, make_model(newer, seed=1), newer)
    assert path.read_bytes() == before
    save_model(path, make_model(newer, seed=1), newer, overwrite=True)
    assert path.read_bytes() != before
    assert read_card(path).title == "second version"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", half_write)
    card = make_card()
    with pytest.raises(Exception, match="No space left"):
        save_model(tmp_path / "model.safetensors", make_model(card), card)
    assert list(tmp_path.iterdir()) == []


def test_successful_save_leaves_only_the_model_file(tmp_path):
    card = make_card()
    save_model(tmp_path / "model.safetensors", make_model(card), card)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_library_never_unpickles():
    """No pickle import, and every ``torch.load(`` call says ``weights_only=True``."""
    package = Path(TransferSegLib.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert any(p.name == "checkpoint.py" for p in sources)
    pickle_import = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", re.MULTILINE)
    for source in sources:
        text = source.read_text(encoding="utf-8")
        assert not pickle_import.search(text), f"{source.name} imports a pickle module"
        for match in re.finditer(r"torch\.load\(", text):
            call = _call_text(text, match.end())
            assert re.search(r"weights_only\s*=\s*True", call), (
                f"{source.name}: torch.load without weights_only=True: {call[:80]}"
            )


def _call_text(text: str, start: int) -> str:
    """The argument text of a call whose opening parenthesis ends at ``start``."""
    depth = 1
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return text[start:]


def test_call_scanner_finds_unsafe_loads():
    # The check above must be able to fail.
    unsafe = _call_text("torch.load(f, map_location=g(x)) + weights_only=True", 11)
    assert not re.search(r"weights_only\s*=\s*True", unsafe)
    assert "weights_only=True" in _call_text("torch.load(f, weights_only=True)", 11)


def test_a_card_keeps_terminology_for_its_own_labels_only(tmp_path):
    from TransferSegLib.errors import ModelFileError

    arguments = networks.resolve_kwargs("unet", channels=[4, 8], strides=[2], num_res_units=0)
    model = networks.build_network("unet", 1, 2, **arguments)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=2, arguments=arguments,
        labels={0: "background", 1: "liver"}, spacing=[2.0] * 3, patch_size=[16] * 3,
        normalisation={"kind": "none"}, terminology={"liver": "SCT^10200004^Liver"})
    path = checkpoint.save_model(tmp_path / "m.safetensors", model, card)
    assert checkpoint.read_card(path).terminology == {"liver": "SCT^10200004^Liver"}
    bad = dataclasses.replace(card, terminology={"spleen": "SCT^78961009^Spleen"})
    with pytest.raises(ModelFileError, match="'terminology' names 'spleen'"):
        checkpoint.save_model(tmp_path / "bad.safetensors", model, bad)
    with pytest.raises(ModelFileError, match="terminology entries"):
        checkpoint.save_model(tmp_path / "bad2.safetensors", model,
                              dataclasses.replace(card, terminology={"liver": 3}))
