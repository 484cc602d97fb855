"""The user's data is never changed: every command of ``transferseg`` is run on real inputs, and
every input file (scans, a DICOM export, label maps, model files, dataset CSVs, job folders) must
have the same bytes and modification time afterwards. Outputs that exist are replaced only with
``--overwrite``; without it the command stops with status 2 and leaves them byte for byte.

Not walked: ``demo`` (it pretrains a base model for minutes; it reads only the sample cache,
whose files are checked here) and ``samples fetch`` (it downloads; it writes only into the sample
cache). The Slicer side, where the user's own volume and segmentation nodes are never modified:
``test_mrml.py`` (``test_the_users_nodes_are_never_modified``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from conftest import catalog_entry, real_sample, reduced_label, write_catalog

from TransferSegLib import checkpoint, jobs, networks, volumes
from TransferSegLib.cli import EXIT_USER_ERROR, build_parser, main

ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
TINY = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
TRAIN = ["--steps", "2", "--val-every", "2", "--batch-size", "1", "--device", "cpu",
         "--events", "jsonl"]
NOT_WALKED = {"demo", "samples fetch"}


def fingerprint(paths) -> dict[str, tuple[str, int]]:
    """sha256 and modification time (ns) of every file at or under ``paths``."""
    files = []
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in files}


def tiny_model_file(path: Path) -> Path:
    torch.manual_seed(0)
    arguments = networks.resolve_kwargs("unet", **TINY)
    labels = {0: "background", **{i + 1: n for i, n in enumerate(ORGANS.values())}}
    card = checkpoint.ModelCard(
        architecture="unet", in_channels=1, out_channels=len(labels), arguments=arguments,
        labels=labels, spacing=[6.0, 6.0, 6.0], patch_size=[32, 32, 32],
        normalisation={"kind": "ct", "window": [-500.0, 400.0]}, modality="CT")
    model = networks.build_network("unet", 1, len(labels), **arguments)
    return checkpoint.save_model(path, model, card)


def user_files(folder: Path) -> dict[str, Path]:
    """What a user brings: a CT and its labels, a DICOM export, a dataset, a model, weights."""
    ct, dicom = real_sample("totalseg_ct"), real_sample("totalseg_dicom")
    folder.mkdir()
    shutil.copy(ct.image, folder / "ct.nii.gz")
    shutil.copytree(dicom.extras["dicom"], folder / "dicom")
    reduced_label("totalseg_ct", ORGANS, folder / "label.nii.gz")
    (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in ORGANS.items()}))
    (folder / "cases.csv").write_text("image,label,name\nct.nii.gz,label.nii.gz,ct\n")
    model = tiny_model_file(folder / "mine.safetensors")
    published = shutil.copy(model, folder / "published.safetensors")
    return {"ct": folder / "ct.nii.gz", "dicom": folder / "dicom", "label": folder / "label.nii.gz",
            "labels": folder / "labels.json", "cases": folder / "cases.csv", "model": model,
            "published": Path(published), "samples": [ct.image, ct.label, dicom.image,
                                                        dicom.extras["dicom"]]}


def catalog_with(folder: Path, weights: Path, monkeypatch) -> None:
    """A catalog of one model whose weights come from ``weights`` (a file:// URL: no network)
    and a fresh model cache."""
    write_catalog(folder, catalog_entry("tiny-ct", weights, "weights.safetensors", "organs",
                                        urls=[weights.resolve().as_uri()]))
    monkeypatch.setenv("TRANSFERSEG_RESOURCES", str(folder))
    monkeypatch.setenv("TRANSFERSEG_HOME", str(folder / "home"))


def job_folders(folder: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Job folders as the Slicer module writes them: a segment, an evaluate, a finetune job."""
    image = volumes.read_volume(files["ct"])
    label = volumes.read_label(files["label"])
    return {
        "segment": jobs.write_job(folder / "segment", "segment", cases=[
            {"name": "CT 1", "image": image}], params={"model": str(files["model"]),
                                                        "device": "cpu"}),
        "evaluate": jobs.write_job(folder / "evaluate", "evaluate", labels=ORGANS, cases=[
            {"name": "CT 1", "label": label, "prediction": label}]),
        "finetune": jobs.write_job(folder / "finetune", "finetune", labels=ORGANS, cases=[
            {"name": "CT 1", "image": image, "label": label}], params={
                "base": str(files["model"]), "strategy": "vanilla", "steps": 2,
                "val_every": 2, "batch_size": 1, "device": "cpu"}),
    }


def test_no_command_changes_its_inputs_or_replaces_an_output_unasked(tmp_path, monkeypatch,
                                                                       capsys):
    files = user_files(tmp_path / "in")
    catalog_with(tmp_path / "catalog", files["published"], monkeypatch)
    job = job_folders(tmp_path / "jobs", files)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(files["cases"].parent)  # relative paths, as a user types them
    inputs = [tmp_path / "in", *files["samples"]]
    inputs += [p for path in job.values() for p in (path, path.parent / jobs.INPUTS)]
    before = fingerprint(inputs)
    assert len(before) > 30  # the DICOM series is 20 files
    walked: set[str] = set()

    def run(*argv: str, code: int = 0) -> str:
        status = main(list(argv))
        captured = capsys.readouterr()
        assert status == code, (argv, captured.err[-3000:])
        changed = [p for p, v in fingerprint(inputs).items() if before.get(p) != v]
        assert not changed, (argv, changed)
        assert set(fingerprint(inputs)) == set(before), argv  # nothing added among the inputs
        walked.add(" ".join(argv[:2]) if argv[0] in ("samples", "models") else argv[0])
        return captured.out + captured.err

    def refused(outputs: list[Path], *argv: str) -> None:
        """Run again without --overwrite: status 2, the outputs as they were."""
        kept = fingerprint(outputs)
        text = run(*argv, code=EXIT_USER_ERROR)
        assert "--overwrite" in text or "--resume" in text, text
        assert fingerprint(outputs) == kept, argv

    run("samples", "list")
    run("samples", "list", "--json")

    run("models", "list")
    run("models", "show", "tiny-ct")
    run("models", "fetch", "tiny-ct")
    run("models", "import", "tiny-ct", "--file", "published.safetensors")
    run("models", "register", "mine", "--file", "mine.safetensors")
    export = ["models", "export", "mine", "--torchscript", str(out / "mine.ts"),
              "--bundle", str(out / "bundle")]
    run(*export)
    refused([out / "mine.ts", out / "bundle"], *export)
    run(*export, "--overwrite")
    run("models", "remove", "mine")  # unregistered; the model file is the user's: kept
    run("models", "remove", "tiny-ct")

    segment = ["segment", "--model", "mine.safetensors", "--image", "ct.nii.gz", "--output",
               str(out / "ct.seg.nrrd"), "--probabilities", str(out / "ct_p.nii.gz"),
               "--device", "cpu", "--quiet"]
    run(*segment)
    refused([out / "ct.seg.nrrd", out / "ct_p.nii.gz"], *segment)
    run(*segment, "--overwrite")
    run("segment", "--model", "mine.safetensors", "--image", "dicom", "--output",
        str(out / "dicom.nii.gz"), "--device", "cpu", "--quiet")
    text = run("segment", "--model", "mine.safetensors", "--image", "ct.nii.gz", "--output",
               "ct.nii.gz", "--overwrite", "--device", "cpu", code=EXIT_USER_ERROR)
    assert "is the input" in text  # not even with --overwrite

    evaluate = ["evaluate", "--prediction", "label.nii.gz", "--reference", "label.nii.gz",
                "--labels", "labels.json", "--csv", str(out / "s.csv"), "--json",
                str(out / "s.json")]
    run(*evaluate)
    refused([out / "s.csv", out / "s.json"], *evaluate)

    finetune = ["finetune", "--base", "mine.safetensors", "--data", "cases.csv", "--out",
                str(out / "finetuned"), *TRAIN]
    run(*finetune)
    refused([out / "finetuned"], *finetune)
    pretrain = ["pretrain", "--data", "cases.csv", "--out", str(out / "base"), "--spacing", "6",
                "6", "6", "--patch", "32", "32", "32", *TRAIN]
    run(*pretrain)
    refused([out / "base"], *pretrain)
    study = ["study", "--pool", "cases.csv", "--test", "cases.csv", "--base",
             "mine.safetensors", "--strategies", "scratch", "--sizes", "1", "--out",
             str(out / "study"), *TRAIN]
    run(*study)
    refused([out / "study"], *study)

    for kind, path in job.items():
        run("run", str(path))
        if kind != "finetune":  # a finished finetune job's folder holds its model: refused too
            refused([path.parent / "output"], "run", str(path))

    parser_commands = next(a for a in build_parser()._actions
                           if isinstance(a, argparse._SubParsersAction)).choices
    everything = {name for name in parser_commands if name not in ("samples", "models")}
    for name in ("samples", "models"):
        action = next(a for a in parser_commands[name]._actions if a.dest == "action")
        everything |= {f"{name} {choice}" for choice in action.choices}
    assert walked == everything - NOT_WALKED, everything - NOT_WALKED - walked
