"""The model catalog and cache: schema, search, fetch with hash check and resume, offline import,
registered fine-tuned models. Downloads come from a local HTTP server made in the test."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import catalog_entry, write_catalog

from TransferSegLib import checkpoint, importers, networks, zoo
from TransferSegLib.cli import main
from TransferSegLib.errors import InputError, MissingSampleError, TransferSegError

ROOT = Path(__file__).resolve().parent.parent
TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 0}


def test_the_catalog_validates_against_its_schema():
    schema = json.loads((ROOT / "Resources" / "models.schema.json").read_text(encoding="utf-8"))
    data = json.loads((ROOT / "Resources" / "models.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(data, schema)
    entries = zoo.catalog()
    ids = {e["id"] for e in entries}
    required = {"medicalnet-resnet10-23datasets", "medicalnet-resnet18-23datasets",
                "medicalnet-resnet34-23datasets", "medicalnet-resnet50-23datasets",
                "diag-unet-sparse-ct", "swinunetr-ssl-ct", "monai-wholebody-ct-lowres",
                "monai-wholebody-ct-highres", "monai-spleen-ct", "monai-swinunetr-btcv",
                "models-genesis-chest-ct", "suprem-unet", "suprem-swinunetr",
                "hd-bet-v1-fold0", "deepbet-1.0.2", "taps-prostate-t2w-v1",
                "astra-merlin-ct-encoder"}
    assert required <= ids, required - ids
    for item in entries:
        labels = {int(k): v for k, v in item["labels"].items()}
        assert sorted(labels) == list(range(len(labels))), item["id"]
        if item["importer"] is not None:
            assert item["architecture"] in networks.architectures(), item["id"]
            assert item["importer"] in importers.FAMILIES
        unknown_hash = any(f["sha256"] is None for f in item["files"])
        assert not unknown_hash or "sha256" in item["unverified"], item["id"]
    # The weights in registry packages or shipped with TransferSeg are the ones the set-up
    # step fetches; all verified.
    shipped = zoo.registry_models()
    assert set(shipped) == {"hd-bet-v1-fold0", "deepbet-1.0.2", "taps-prostate-t2w-v1",
                            "astra-merlin-ct-encoder", "transferseg-ct-base-v2",
                            "transferseg-ct-base-v3", "transferseg-ct-base-v5"}
    assert all(zoo.is_verified(zoo.entry(i)) for i in shipped)
    assert not zoo.is_verified(zoo.entry("diag-unet-sparse-ct"))


def test_the_schema_refuses_unsafe_or_incomplete_entries():
    schema = json.loads((ROOT / "Resources" / "models.schema.json").read_text(encoding="utf-8"))
    data = json.loads((ROOT / "Resources" / "models.json").read_text(encoding="utf-8"))
    good = data["models"][0]
    bad_member = json.loads(json.dumps(good))
    bad_member["files"] = [{"name": "w.pt", "sha256": "0" * 64, "size": 1, "registry": {
        "requirement": "x==1", "filename": "x-1.whl", "sha256": "0" * 64, "member": "../x"}}]
    bad_name = dict(good, files=[{"name": "../w.pt", "sha256": None, "size": None}])
    missing = {k: v for k, v in good.items() if k != "licence"}
    for entry in (bad_member, bad_name, missing):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(dict(data, models=[entry]), schema)


# --- a catalog and a server made in the test ---------------------------------------------------

def _model_file(folder: Path) -> Path:
    torch.manual_seed(0)
    arguments = networks.resolve_kwargs("unet", **TINY)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=2, arguments=arguments,
        labels={0: "background", 1: "liver"}, spacing=[2.0, 2.0, 2.0], patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-100.0, 200.0]}, modality="CT")
    model = networks.build_network("unet", 1, 2, **arguments)
    return checkpoint.save_model(folder / "published.safetensors", model, card)


class _Server(http.server.ThreadingHTTPServer):
    payload = b""
    cut_after: int | None = None  # close the connection after this many bytes, once
    ranges: list[str] = []


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        server: _Server = self.server  # type: ignore[assignment]
        data, start = server.payload, 0
        if self.headers.get("Range"):
            server.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            self.wfile.write(body[:server.cut_after])
            server.cut_after = None
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A catalog with one model served over local HTTP, and a fresh cache."""
    source = _model_file(tmp_path)
    payload = source.read_bytes()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.payload, server.cut_after, server.ranges = payload, None, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/published.safetensors"
    entry = catalog_entry("tiny-liver-ct", source, "published.safetensors",
                          "liver segmentation", urls=[url])
    unverified = dict(entry, id="tiny-unverified", unverified=["sha256"],
                      files=[dict(entry["files"][0], sha256=None)])
    resources = tmp_path / "resources"
    write_catalog(resources, entry, unverified)
    monkeypatch.setenv("TRANSFERSEG_RESOURCES", str(resources))
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path / "home"))
    yield {"server": server, "source": source, "entry": entry, "payload": payload}
    server.shutdown()
    server.server_close()


def test_fetch_downloads_checks_and_imports(setup):
    seen = []
    path = zoo.fetch("tiny-liver-ct", progress=lambda done, total: seen.append((done, total)),
                     log=lambda text: None)
    assert path == zoo.models_dir() / "tiny-liver-ct" / "model.safetensors"
    model, card = checkpoint.load_model(path)
    reference, _ = checkpoint.load_model(setup["source"])
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert card.labels == {0: "background", 1: "liver"}
    assert seen[-1] == (len(setup["payload"]), len(setup["payload"]))
    assert zoo.is_cached("tiny-liver-ct")
    assert zoo.fetch("tiny-liver-ct", log=lambda text: None) == path  # cached: no download


def test_a_wrong_hash_removes_the_file_and_names_both_hashes(setup, tmp_path):
    expected = setup["entry"]["files"][0]["sha256"]
    setup["server"].payload = setup["payload"][:-1] + b"\0"
    with pytest.raises(TransferSegError, match=expected) as error:
        zoo.fetch("tiny-liver-ct", log=lambda text: None)
    actual = hashlib.sha256(setup["server"].payload).hexdigest()
    assert actual in str(error.value) and "removed" in str(error.value)
    assert list((zoo.models_dir() / "tiny-liver-ct").iterdir()) == []


def test_an_interrupted_download_leaves_nothing_in_the_cache_and_resumes(setup):
    setup["server"].cut_after = 1000
    with pytest.raises(TransferSegError, match="resumed next time"):
        zoo.fetch("tiny-liver-ct", log=lambda text: None)
    folder = zoo.models_dir() / "tiny-liver-ct"
    assert not any(folder.iterdir())  # no partial file among the models
    partial = list((zoo.home() / "downloads").glob("*.part"))
    assert len(partial) == 1 and partial[0].stat().st_size == 1000
    path = zoo.fetch("tiny-liver-ct", log=lambda text: None)
    assert setup["server"].ranges == ["bytes=1000-"]
    assert checkpoint.read_card(path).labels[1] == "liver"


def test_unverified_entries_need_explicit_acceptance(setup):
    with pytest.raises(TransferSegError, match="--accept-unverified"):
        zoo.fetch("tiny-unverified", log=lambda text: None)
    logged = []
    path = zoo.fetch("tiny-unverified", accept_unverified=True, log=logged.append)
    assert path.is_file() and any("unverified" in line for line in logged)
    assert not [m for m in zoo.list_models() if m["id"] == "tiny-unverified"][0]["verified"]


def test_unknown_ids_list_close_matches(setup):
    with pytest.raises(InputError, match="did you mean tiny-liver-ct"):
        zoo.entry("tiny-livr-ct")
    with pytest.raises(MissingSampleError, match="models fetch"):
        zoo.published_file("tiny-liver-ct")


def test_offline_import_checks_the_hash_and_leaves_the_users_file(setup, tmp_path):
    before = setup["source"].read_bytes()
    path = zoo.import_file("tiny-liver-ct", setup["source"], log=lambda text: None)
    assert checkpoint.read_card(path).labels[1] == "liver"
    # The publisher's "liver" is coded as Slicer's anatomy list codes it (SNOMED CT 10200004).
    assert "SCT^10200004^Liver" in checkpoint.read_card(path).terminology["liver"]
    assert setup["source"].read_bytes() == before
    assert zoo.published_file("tiny-liver-ct").read_bytes() == before
    other = tmp_path / "other.safetensors"
    other.write_bytes(before + b"x")
    zoo.remove("tiny-liver-ct")
    with pytest.raises(TransferSegError, match="sha256"):
        zoo.import_file("tiny-liver-ct", other, log=lambda text: None)
    assert not (zoo.models_dir() / "tiny-liver-ct" / "model.safetensors").exists()


def test_fine_tuned_models_are_listed_beside_the_published_ones(setup, tmp_path):
    _, card = checkpoint.load_model(setup["source"])
    model, _ = checkpoint.load_model(setup["source"])
    card.lineage = [{"strategy": "finetune", "base": "tiny-liver-ct"}]
    card.training_cases = ["case1", "case2"]
    card.metrics = {"validation_dice": 0.81}
    mine = checkpoint.save_model(tmp_path / "my-liver.safetensors", model, card)
    record = zoo.register(mine)
    assert record["base"] == "tiny-liver-ct" and record["dice"] == 0.81
    listed = {m["id"]: m for m in zoo.list_models()}
    assert listed["my-liver"]["kind"] == "fine-tuned" and listed["my-liver"]["cached"]
    assert listed["tiny-liver-ct"]["kind"] == "published"
    assert [m["id"] for m in zoo.list_models("liver fine")] == []  # words must all match
    assert zoo.require_model("my-liver") == mine.resolve()
    with pytest.raises(InputError, match="published model"):
        zoo.register(mine, "tiny-liver-ct")
    zoo.remove("my-liver")
    assert mine.is_file() and "my-liver" not in {m["id"] for m in zoo.list_models()}


def test_models_command_lists_shows_and_fetches(setup, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-liver-ct" in out and "liver segmentation" in out and "CT" in out
    assert main(["models", "fetch", "tiny-liver-ct"]) == 0
    assert "tensors loaded" in capsys.readouterr().out  # the import report is shown
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["id"]: r["cached"] for r in rows} == {"tiny-liver-ct": True,
                                                    "tiny-unverified": False}
    assert main(["models", "show", "tiny-unverified"]) == 0
    assert "UNVERIFIED" in capsys.readouterr().out
    assert main(["models", "show", "nonexistent"]) == 2
    assert "No model with id" in capsys.readouterr().err


def test_the_real_catalog_lists_every_entry_with_its_cache_state(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for item in zoo.catalog():
        line = next(row for row in out.splitlines() if row.startswith(item["id"] + " "))
        assert item["modality"] in line and " no " in line


def test_models_export_writes_a_bundle_and_torchscript(setup, tmp_path, capsys):
    assert main(["models", "export", str(setup["source"]), "--bundle", str(tmp_path / "b"),
                 "--torchscript", str(tmp_path / "net.ts")]) == 0
    assert (tmp_path / "b" / "configs" / "metadata.json").is_file()
    assert (tmp_path / "b" / "models" / "model.pt").is_file()
    scripted = torch.jit.load(str(tmp_path / "net.ts"))  # our own file, written just now
    model, _ = checkpoint.load_model(setup["source"])
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.allclose(scripted(x), model(x), atol=1e-5)
    assert main(["models", "export", str(setup["source"]), "--torchscript",
                 str(tmp_path / "net.ts")]) == 2  # exists: not overwritten
    assert main(["models", "export", str(setup["source"])]) == 2



def test_published_label_names_get_the_codes_of_slicers_anatomy_list():
    """The entries are exactly what Slicer writes: the slicerio sample's lungs, coded in Slicer,
    carry the same strings; a structure the list lacks, or a side it has no modifier for, gets
    none."""
    from conftest import real_sample

    from TransferSegLib import anatomy, segmentations

    coded = segmentations.read_segmentation(real_sample("slicerio_chest").extras["seg_nrrd"])
    for name in ("right lung", "left lung"):
        assert anatomy.entry(name) == coded.terminology()[name]
    assert anatomy.entry("lung_left") == anatomy.entry("Left Lung") == coded.terminology()[
        "left lung"]
    assert anatomy.entry("kidney_right").endswith("SCT^64033007^Kidney~SCT^24028007^Right~"
                                                  "Anatomic codes - DICOM master list~^^~^^")
    assert "SCT^89837001^Bladder" in anatomy.entry("urinary_bladder")
    for uncoded in ("psoas_major_left", "tumour", "heart_left", "left right lung", "foreground"):
        assert anatomy.entry(uncoded) is None, uncoded
    assert anatomy.terminology({0: "background", 1: "liver", 2: "tumour"}) == {
        "liver": anatomy.entry("liver")}
