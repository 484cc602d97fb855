"""The base-model recipe and the training settings behind it: ignored voxels, strategy
defaults, warm-up, threads, and a base that is only ever written when its run completed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import real_sample

from TransferSegLib import (
    checkpoint,
    ctbase,
    datasets,
    networks,
    sampling,
    training,
    volumes,
    zoo,
)
from TransferSegLib.cli import build_parser
from TransferSegLib.errors import InputError, TransferSegError
from TransferSegLib.losses import SegmentationLoss
from TransferSegLib.strategies import defaults

ROOT = Path(__file__).resolve().parent.parent


def _card(labels: dict[int, str]) -> checkpoint.ModelCard:
    return checkpoint.ModelCard(
        architecture="dynunet", in_channels=1, out_channels=len(labels), labels=labels,
        arguments=ctbase.ARGUMENTS, spacing=[6.0, 6.0, 6.0], patch_size=[48, 48, 48],
        normalisation={"kind": "ct", "window": [-1000.0, 1000.0]}, modality="CT")


def test_hidden_organs_are_ignored_voxels_not_background(tmp_path):
    """A hidden organ's voxels get no loss and no score: not taught as background."""
    csv = ctbase.case_dataset("totalseg_ct", tmp_path / "d", hide=ctbase.HIDDEN)
    dataset = datasets.discover(csv)
    assert dataset.labels.ignore_value is not None
    assert not set(ctbase.HIDDEN) & set(dataset.labels.foreground.values())
    case = dataset.labelled()[0]
    assert not set(ctbase.HIDDEN) & case.annotated
    names = list(dataset.labels.foreground.values())
    card = _card({0: "background", **{i + 1: n for i, n in enumerate(names)}})
    prepared = sampling.prepare_case(case, dataset.labels, card)
    original = sitk.GetArrayFromImage(volumes.read_label(real_sample("totalseg_ct").label))
    liver = real_sample("totalseg_ct").labels
    liver_value = next(v for v, n in liver.items() if n == "liver")
    # In model space (6 mm) the ignored voxels are about the hidden organs' volume.
    hidden_ml = np.isin(original, [v for v, n in liver.items() if n in ctbase.HIDDEN]).sum() * 27
    ignored_ml = (prepared.target == training.IGNORE).sum() * 216
    assert 0.7 < ignored_ml / hidden_ml < 1.3
    assert (original == liver_value).any()
    # The loss gives exactly zero gradient on ignored voxels, whatever the prediction there.
    loss = SegmentationLoss()
    target = torch.from_numpy(prepared.target[None, :8, :8, :8].astype(np.int64))
    target[0, :4] = training.IGNORE
    logits = torch.randn(1, card.out_channels, 8, 8, 8, requires_grad=True)
    loss(logits, target, torch.from_numpy(prepared.annotated)[None]).backward()
    assert torch.all(logits.grad[0, :, :4] == 0)
    assert torch.any(logits.grad[0, :, 4:] != 0)


def test_base_groups_merge_parts_into_one_label_and_keep_hidden_ignored(tmp_path):
    """Each vertebra, rib and lobe becomes its group's one label, on every voxel it had; the
    hidden organs stay ignored and the other structures keep their own names."""
    assert ctbase.grouped("vertebrae_T12", ctbase.GROUPS) == "vertebrae"
    assert ctbase.grouped("thoracic vertebral column", ctbase.GROUPS) == "vertebrae"
    assert ctbase.grouped("left lung", ctbase.GROUPS) == "lung_left"
    assert ctbase.grouped("lung_middle_lobe_right", ctbase.GROUPS) == "lung_right"
    assert ctbase.grouped("spinal_cord", ctbase.GROUPS) == "spinal_cord"
    csv = ctbase.case_dataset("totalseg_ct", tmp_path / "d", hide=ctbase.HIDDEN,
                              groups=ctbase.GROUPS)
    dataset = datasets.discover(csv)
    names = set(dataset.labels.foreground.values())
    assert {"vertebrae", "ribs", "lung_left", "lung_right", "spinal_cord"} <= names
    assert not any(n.startswith(("vertebrae_", "rib_", "lung_upper", "lung_lower")) for n in names)
    assert not set(ctbase.HIDDEN) & names
    assert dataset.labelled()[0].annotated == names
    sample = real_sample("totalseg_ct")
    original = sitk.GetArrayFromImage(volumes.read_label(sample.label))
    merged = sitk.GetArrayFromImage(volumes.read_label(tmp_path / "d" / "label.nii.gz"))
    for group in ("vertebrae", "ribs", "lung_right"):
        members = [v for v, n in sample.labels.items() if ctbase.grouped(n, ctbase.GROUPS) == group]
        assert len(members) > 1
        np.testing.assert_array_equal(merged == dataset.labels.value(group),
                                      np.isin(original, members))
    hidden = [v for v, n in sample.labels.items() if n in ctbase.HIDDEN]
    np.testing.assert_array_equal(merged == dataset.labels.ignore_value, np.isin(original, hidden))


def test_base_v6_teaches_the_organs_and_hides_only_the_back_muscles(tmp_path):
    """Recipe v6 (measured, not shipped) learns liver, spleen and stomach where a case draws
    them, and still never sees the autochthon: its voxels are ignored, not background. The
    card names what it hides."""
    assert ctbase.VARIANTS["v6"].hidden == ("autochthon_left", "autochthon_right")
    assert ctbase.VARIANTS[ctbase.VERSION].hidden == ctbase.HIDDEN
    by_name = {csv.parent.name: datasets.discover(csv)
               for csv in ctbase.datasets(tmp_path, "v6")}
    abdomen = by_name["totalseg_ct_full"]
    names = set(abdomen.labels.foreground.values())
    assert {"liver", "spleen", "stomach"} <= names
    assert not {"autochthon_left", "autochthon_right"} & names
    assert {"liver", "spleen", "stomach"} <= abdomen.labelled()[0].annotated
    sample = real_sample("totalseg_ct_full")
    original = sitk.GetArrayFromImage(volumes.read_label(sample.label))
    written = sitk.GetArrayFromImage(
        volumes.read_label(tmp_path / "totalseg_ct_full" / "label.nii.gz"))
    muscles = [v for v, n in sample.labels.items() if n.startswith("autochthon_")]
    liver = next(v for v, n in sample.labels.items() if n == "liver")
    np.testing.assert_array_equal(written == abdomen.labels.ignore_value,
                                  np.isin(original, muscles))
    np.testing.assert_array_equal(written == abdomen.labels.value("liver"), original == liver)
    text = ctbase.description(version="v6")
    assert "Not taught, so that they can be learnt by fine-tuning: autochthon_left, " \
           "autochthon_right (ignored" in text and "--version v6" in text


def test_base_v4_ignores_a_group_that_a_case_draws_only_in_part(tmp_path):
    """The thoracic crop draws T12 alone with more of the spine in view: in recipe v4 T12 is
    ignored there and "vertebrae" is not among the case's drawn structures, so no vertebra in
    view is taught as background; the cases that draw the whole spine still teach it. The
    shipped recipe (v5, v3's data) merges it."""
    assert ctbase.VARIANTS["v4"].partial == {"totalseg_thorax": ("vertebrae_T12",)}
    assert not ctbase.VARIANTS[ctbase.VERSION].partial
    by_name = {csv.parent.name: datasets.discover(csv)
               for csv in ctbase.datasets(tmp_path, "v4")}
    thorax = by_name["totalseg_thorax"]
    assert "vertebrae" not in thorax.labelled()[0].annotated
    assert "vertebrae" not in thorax.labels.foreground.values()
    sample = real_sample("totalseg_thorax")
    original = sitk.GetArrayFromImage(volumes.read_label(sample.label))
    written = tmp_path / "totalseg_thorax" / "label.nii.gz"
    label = sitk.GetArrayFromImage(volumes.read_label(written))
    t12 = [v for v, n in sample.labels.items() if n == "vertebrae_T12"]
    np.testing.assert_array_equal(label == thorax.labels.ignore_value,
                                  np.isin(original, t12))
    for name in ("totalseg_ct_full", "slicerio_chest"):
        assert "vertebrae" in by_name[name].labelled()[0].annotated
    shipped = datasets.discover(ctbase.datasets(tmp_path / "shipped")[1])
    assert "vertebrae" in shipped.labelled()[0].annotated


def test_spatial_augmentation_moves_image_and_labels_together():
    """Rotation and scaling keep the target's values (nearest), move it with the image, and
    are off unless asked for."""
    grid = np.indices((32, 32, 32)).astype(np.float32)
    target = np.zeros((32, 32, 32), np.int16)
    target[8:24, 8:24, 8:24] = 3
    # channel 1 draws the cube too: after the move it must still lie on the moved labels
    image = np.stack([grid[0] / 31, (target == 3).astype(np.float32)])
    target[:, :, :2] = training.IGNORE
    moved = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        plain_image, plain = sampling.augment(image, target, np.random.default_rng(seed))
        np.testing.assert_array_equal(plain, target)  # intensity only by default
        out_image, out = sampling.augment(image, target, rng, spatial=True)
        assert set(np.unique(out)) <= {training.IGNORE, 0, 3}
        if not np.array_equal(out, target):
            moved += 1
            # the cube moved with the image: the image's cube (bilinear, then intensity noise)
            # covers the labels' cube (nearest) but for its rim; moved by another draw of the
            # transform, the overlap measured 0.62-0.77, moved together 0.95-0.98
            drawn, labelled = out_image[1] > 0.45, out == 3
            assert (drawn & labelled).sum() / (drawn | labelled).sum() > 0.9
    assert 0 < moved < 20  # applied to some patches (probability 0.3), not all


def test_intensity_field_varies_smoothly_over_the_patch_and_leaves_the_labels():
    """The intensity field brightens one part of a uniform patch more than another (as
    contrast does an organ), within bounds, the same for the same seed, never moving the
    labels; without it, a uniform patch stays uniform but for the noise."""
    image = np.full((1, 32, 32, 32), 0.5, np.float32)
    target = np.zeros((32, 32, 32), np.int16)
    target[8:24, 8:24, 8:24] = 2

    def corners(out):  # means over two opposite 8^3 corners: the noise averages out
        return out[0, :8, :8, :8].mean(), out[0, -8:, -8:, -8:].mean()

    varied = 0
    for seed in range(20):
        plain, plain_target = sampling.augment(image, target, np.random.default_rng(seed))
        assert abs(np.subtract(*corners(plain))) < 0.005
        out, out_target = sampling.augment(image, target, np.random.default_rng(seed),
                                           field=True)
        again, _ = sampling.augment(image, target, np.random.default_rng(seed), field=True)
        np.testing.assert_array_equal(out, again)
        np.testing.assert_array_equal(out_target, target)
        np.testing.assert_array_equal(plain_target, target)
        first, last = corners(out)
        assert 0.5 < first / last < 2  # a field of degree 3, coefficients up to 0.05
        if abs(first - last) > 0.01:
            varied += 1
    assert 0 < varied < 20  # on some patches (probability 0.5), not all
    # on by default for fine-tuning; the shipped base's recipe was trained without it
    assert training.TrainConfig().intensity_field
    assert not ctbase.VARIANTS[ctbase.VERSION].intensity_field
    assert training.TrainConfig().prior_bias and not ctbase.VARIANTS[ctbase.VERSION].prior_bias


def test_a_cancelled_or_unfinished_base_training_never_becomes_a_base(tmp_path, monkeypatch):
    out = tmp_path / "base"
    cancel = tmp_path / "stop"
    cancel.write_text("")
    final = out / f"{ctbase.MODEL_ID}.safetensors"
    with pytest.raises(TransferSegError, match="stopped at step 1 of 2"):
        ctbase.train_base(out, steps=2, cancel_file=cancel, log=lambda text: None)
    assert not final.exists()
    assert (out / "run" / "model.safetensors").exists()  # the run itself kept its model
    # A killed run leaves only its state: resuming completes it, and only then is it a base.
    cancel.unlink()
    path = ctbase.train_base(out, steps=2, resume=True, log=lambda text: None)
    assert path == final and final.exists()
    _, card = checkpoint.load_model(final)
    assert card.metrics["steps"] == 2
    assert "liver" not in card.labels.values() and "ignore" not in card.labels.values()
    assert "Recipe" in card.description and "2 steps" in card.description
    assert "--steps 2`" in card.description  # how to make this very base again
    # the file names no folder of the machine that made it
    assert card.lineage[0]["data"] == [f"data/{name}/cases.csv" for name in ctbase.SOURCES]
    assert str(tmp_path) not in card.to_json()
    assert not ctbase.completed(training.TrainResult(final, "stopped early", 2, None), 2)
    assert not ctbase.completed(training.TrainResult(final, "done", 1, None), 2)
    # Shipping the finished base: file, card and a catalog entry that the schema accepts and
    # whose sha256 is the file's; a fetch from that catalog is the same network.
    resources = tmp_path / "Resources"
    resources.mkdir()
    for name in ("models.json", "models.schema.json"):
        (resources / name).write_bytes((ROOT / "Resources" / name).read_bytes())
    data = ctbase.report(out, tmp_path / "ctbase.json", tmp_path / "ctbase.png")
    assert [row[0] for row in data["loss"]] == [1, 2] and data["recipe"]["steps"] == 2
    assert set(data["held_out"]["labels"]) and "liver" not in data["held_out"]["labels"]
    entry = ctbase.ship(final, resources, data)
    catalog = json.loads((resources / "models.json").read_text(encoding="utf-8"))
    jsonschema.validate(catalog, json.loads((resources / "models.schema.json").read_text()))
    assert [m["id"] for m in catalog["models"]].count(ctbase.MODEL_ID) == 1
    shipped = resources / entry["files"][0]["bundled"]
    assert entry["files"][0]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    card_text = (resources / "Models" / f"{ctbase.MODEL_ID}.md").read_text(encoding="utf-8")
    for fact in (*ctbase.SOURCES, "Apache-2.0", "MIT", "4 x 4 x 4 mm", "48 x 48 x 48",
                 entry["files"][0]["sha256"]):
        assert fact in card_text, fact
    monkeypatch.setenv("TRANSFERSEG_RESOURCES", str(resources))
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path / "home"))
    fetched = zoo.fetch(ctbase.MODEL_ID, log=lambda text: None)
    ours, theirs = checkpoint.load_model(fetched)[0], checkpoint.load_model(final)[0]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 theirs.state_dict().values(), strict=True))
    # An upgrade that ships another file under the same id replaces the cached import.
    other = ctbase.ship(out / "run" / "model.safetensors", resources, data)
    assert other["files"][0]["sha256"] != entry["files"][0]["sha256"]
    before = (tmp_path / "home" / "models" / ctbase.MODEL_ID / "model.safetensors").stat()
    zoo.fetch(ctbase.MODEL_ID, log=lambda text: None)
    cached = tmp_path / "home" / "models" / ctbase.MODEL_ID / shipped.name
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == other["files"][0]["sha256"]
    after = (tmp_path / "home" / "models" / ctbase.MODEL_ID / "model.safetensors").stat()
    assert after.st_ino != before.st_ino  # imported again, not the stale import
    shipped.write_bytes(shipped.read_bytes()[:-1] + b"x")  # a damaged installation is refused
    shutil.rmtree(tmp_path / "home" / "models" / ctbase.MODEL_ID)  # not yet in the cache
    with pytest.raises(TransferSegError, match="sha256"):
        zoo.fetch(ctbase.MODEL_ID, log=lambda text: None)


def test_warm_up_ramps_the_rate_then_decays():
    rates = [training.poly_lr(1.0, step, 100, warmup=4) for step in range(100)]
    assert rates[0] == pytest.approx(0.25)
    assert rates[0] < rates[1] < rates[2] < rates[3]
    assert rates[3] == pytest.approx((1 - 3 / 100) ** 0.9)
    assert rates[50] == pytest.approx(0.5**0.9)
    assert training.poly_lr(1.0, 0, 100) == 1.0


def test_strategy_defaults_fill_only_what_is_unset():
    config = training.TrainConfig(steps=10).for_strategy("vanilla")
    assert config.lr == defaults("vanilla")["lr"] and config.warmup is not None
    config = training.TrainConfig(steps=10, lr=0.5).for_strategy("scratch")
    assert config.lr == 0.5
    with pytest.raises(InputError, match="positive"):
        training.TrainConfig(lr=-1.0)


def test_threads_follow_the_request_and_leave_busy_cores(monkeypatch):
    assert training.choose_threads(3) == 3
    monkeypatch.setattr(training, "busy_cores", lambda: 64.0)
    assert training.choose_threads() == 1
    monkeypatch.setattr(training, "busy_cores", lambda: 0.0)
    assert training.choose_threads() == min(len(os.sched_getaffinity(0)),
                                            torch.get_num_threads())
    # where /proc/stat cannot be read, the load average counts
    monkeypatch.setattr(training, "busy_cores", lambda: None)
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 0, 0))
    assert training.choose_threads() == 1


def test_busy_cores_counts_other_work_now():
    """A program spinning on one core counts as about one busy core while it runs."""
    import subprocess
    import sys

    quiet = training.busy_cores(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = training.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert quiet is not None and busy is not None
    assert busy - quiet > 0.5


def test_study_takes_one_rate_or_one_per_strategy_and_the_transfer_settings():
    parser = build_parser()
    args = parser.parse_args(["study", "--pool", "p", "--test", "t", "--out", "o",
                              "--lr", "scratch=3e-3,finetune=1e-3", "--patch", "48", "48", "48",
                              "--freeze-depth", "2", "--head-lr-factor", "4", "--threads", "1"])
    assert args.lr == {"scratch": 3e-3, "finetune": 1e-3}
    assert args.patch == [48, 48, 48] and args.freeze_depth == 2 and args.head_lr_factor == 4
    args = parser.parse_args(["study", "--pool", "p", "--test", "t", "--out", "o", "--lr", "0.01"])
    assert args.lr == 0.01
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "--pool", "p", "--test", "t", "--out", "o",
                           "--lr", "magic=1"])


def test_the_base_recipe_names_its_data_and_licences():
    text = ctbase.description()
    for name in (*ctbase.SOURCES, *ctbase.HIDDEN, *ctbase.HELD_OUT):
        assert name in text
    assert "Apache-2.0" in text and "MIT" in text
    assert json.dumps(ctbase.ARGUMENTS) in text
    assert f"{ctbase.STEPS} steps" in text and "`make base`" in text
    recipe = ctbase.VARIANTS[ctbase.VERSION]
    assert f"{recipe.threads} CPU thread" in text  # the count the shipped weights depend on
    longer = ctbase.description(2 * ctbase.STEPS)  # the card says how it was really made
    assert f"{2 * ctbase.STEPS} steps" in longer and f"--steps {2 * ctbase.STEPS}" in longer
    assert "make base" not in longer
    other = ctbase.description(version="v3", seed=1, threads=2)
    assert "3000 steps" in other and "--steps" not in other  # v3's own step count
    assert "--version v3 --seed 1 --threads 2`" in other and "2 CPU threads" in other
    assert "--threads" not in ctbase.description(version="v3", seed=1)


def _scan_dataset(folder: Path, size: tuple[int, int, int], spacing: tuple[float, ...]) -> Path:
    """A one-case dataset: a CT of ``size`` voxels (x y z) of ``spacing`` mm with one organ."""
    folder.mkdir(parents=True)
    array = np.full(size[::-1], -1000, np.int16)
    label = np.zeros(size[::-1], np.uint8)
    label[2:-2, 5:-5, 5:-5] = 1
    array[label == 1] = 40
    for name, values in (("image.nii.gz", array), ("label.nii.gz", label)):
        image = sitk.GetImageFromArray(values)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(folder / name))
    (folder / "labels.json").write_text(json.dumps({"1": "liver"}))
    (folder / "cases.csv").write_text("image,label\nimage.nii.gz,label.nii.gz\n")
    return folder / "cases.csv"


def test_fine_tuning_patches_cover_the_training_scan_within_a_budget(tmp_path):
    from TransferSegLib.recipes import CONTEXT_VOXELS, context_patch

    card = _card({0: "background", 1: "liver"})  # DynUNet, divisor 16, 48^3 at 6 mm
    small = _scan_dataset(tmp_path / "small", (100, 80, 20), (3.0, 3.0, 3.0))
    cases = sampling.labelled_cases(datasets.discover(small), "small")
    # 50 x 40 x 10 voxels at 6 mm: the whole scan in-plane, and twice the divisor in z
    assert context_patch(card, cases) == [64, 48, 32]
    large = _scan_dataset(tmp_path / "large", (200, 200, 60), (3.0, 3.0, 5.0))
    cases = sampling.labelled_cases(datasets.discover(large), "large")
    patch = context_patch(card, cases)  # 100 x 100 x 50 voxels: over the budget
    assert patch[0] * patch[1] * patch[2] <= CONTEXT_VOXELS
    assert all(v % 16 == 0 and v >= 32 for v in patch) and patch[0] == patch[1] >= patch[2]
    # a network of valid convolutions keeps its base's patch
    valid = checkpoint.ModelCard(
        architecture="diag_unet", in_channels=1, out_channels=2,
        labels={0: "background", 1: "liver"}, spacing=[6.0, 6.0, 6.0],
        patch_size=[132, 132, 116], modality="CT",
        normalisation={"kind": "ct", "window": [-1000.0, 1000.0]})
    assert context_patch(valid, cases) is None


def test_fine_tuning_from_a_base_trains_and_segments_with_the_context_patch(tmp_path):
    from TransferSegLib.recipes import finetune

    data = _scan_dataset(tmp_path / "data", (100, 80, 20), (3.0, 3.0, 3.0))
    base_card = _card({0: "background", 1: "spleen"})
    base = tmp_path / "base.safetensors"
    model = networks.build_network(base_card.architecture, 1, 2, **base_card.arguments)
    checkpoint.save_model(base, model, base_card)
    config = training.TrainConfig(steps=2, batch_size=1, val_every=2, checkpoint_every=2)
    messages = []
    finetune(base, data, tmp_path / "run", "finetune", config,
             events=lambda e: messages.append(e.get("message", "")))
    _, card = checkpoint.load_model(tmp_path / "run" / "model.safetensors")
    assert card.patch_size == [64, 48, 32]
    assert any("patch 64 x 48 x 32 voxels" in m for m in messages)
    assert card.inference["crop_body"] is True  # it learnt the scan's framing
    finetune(base, data, tmp_path / "chosen", "finetune", config, patch_size=[48, 48, 48])
    _, card = checkpoint.load_model(tmp_path / "chosen" / "model.safetensors")
    assert card.patch_size == [48, 48, 48]  # --patch wins
    assert "crop_body" not in card.inference  # patches of it, not the whole scan


def test_a_held_out_scan_validates_a_body_cropping_model_on_the_body(tmp_path, monkeypatch):
    """run_training prepares the held-out validation scan of a card that crops to the body
    cut to the body, as segment will read it; the training scans stay whole."""
    from TransferSegLib.recipes import finetune

    data = _scan_dataset(tmp_path / "data", (100, 80, 20), (3.0, 3.0, 3.0))
    held = _scan_dataset(tmp_path / "held", (100, 80, 20), (3.0, 3.0, 3.0))
    base_card = _card({0: "background", 1: "spleen"})
    base = tmp_path / "base.safetensors"
    checkpoint.save_model(base, networks.build_network(base_card.architecture, 1, 2,
                                                       **base_card.arguments), base_card)
    crops, prepare = [], training.prepare_case
    monkeypatch.setattr(training, "prepare_case", lambda case, table, card, others=False,
                        body_crop=False: (crops.append((case.image.parent, body_crop)),
                                          prepare(case, table, card, others, body_crop))[1])
    config = training.TrainConfig(steps=1, batch_size=1, val_every=1, checkpoint_every=1)
    finetune(base, data, tmp_path / "run", "finetune", config, val_data=held)
    assert {folder.name for folder, _ in crops} == {"data", "held"}
    assert all(crop == (folder.name == "held") for folder, crop in crops)


def test_one_default_strategy_for_the_command_line_and_the_jobs():
    from TransferSegLib import jobs
    from TransferSegLib.strategies import DEFAULT_STRATEGY, STRATEGIES

    args = build_parser().parse_args(["finetune", "--data", "d.csv", "--out", "run"])
    assert args.strategy == DEFAULT_STRATEGY == jobs.PARAMS["finetune"]["strategy"][1]
    assert DEFAULT_STRATEGY in STRATEGIES and DEFAULT_STRATEGY != "scratch"
