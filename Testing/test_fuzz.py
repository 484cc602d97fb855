"""Property-based tests (hypothesis): geometry round trips, metric properties, and a bounded fuzz
of the image and model-file readers, which may accept a mutated file or refuse it with a
:class:`~TransferSegLib.errors.TransferSegError`, but never raise anything else."""

from __future__ import annotations

import contextlib
import json
import math
import resource
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from TransferSegLib import checkpoint, metrics, preprocess, segmentations, volumes
from TransferSegLib.errors import TransferSegError

FAST = settings(max_examples=40, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ = settings(max_examples=150, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# ------------------------------------------------------------------------------ strategies
def rotation(angles: tuple[float, float, float], flip: bool) -> tuple[float, ...]:
    """A direction matrix (row-major): rotations about z, y, x, optionally mirrored."""
    a, b, c = angles
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    matrix = rz @ ry @ rx @ np.diag([1.0, 1.0, -1.0 if flip else 1.0])
    return tuple(matrix.flatten())


# Milliradian steps: subnormal direction cosines (an angle of 1e-308) make ITK's inverse of
# the direction matrix fail, which no scanner or file format produces.
angle = st.integers(-3141, 3141).map(lambda milliradians: milliradians / 1000)
geometries = st.fixed_dictionaries({
    "size": st.tuples(*[st.integers(1, 6)] * 3),
    "spacing": st.tuples(*[st.floats(0.05, 8.0)] * 3),
    "origin": st.tuples(*[st.floats(-800.0, 800.0)] * 3),
    "direction": st.builds(rotation, st.tuples(angle, angle, angle), st.booleans()),
})


def on_geometry(array: np.ndarray, geometry: dict) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def label_arrays(size, top: int = 3):
    return arrays(np.uint8, tuple(size[::-1]), elements=st.integers(0, top))


masks = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)).flatmap(
    lambda shape: st.tuples(arrays(np.bool_, shape), arrays(np.bool_, shape)))
mask_spacings = st.tuples(*[st.floats(0.25, 4.0)] * 3)


# ----------------------------------------------------------------------- geometry round trips
# NRRD and MetaImage print doubles with 15+ significant digits; NIfTI stores float32 and the
# direction as a quaternion, so only ~1e-6 relative survives there.
FORMAT_TOLERANCE = {".nrrd": 1e-9, ".mha": 1e-9, ".nii.gz": 2e-5}


@pytest.mark.parametrize("suffix", sorted(FORMAT_TOLERANCE))
@FAST
@given(data=st.data())
def test_geometry_survives_a_write_and_read(tmp_path, suffix, data):
    geometry = data.draw(geometries)
    array = data.draw(arrays(np.int16, tuple(geometry["size"][::-1])))
    image = on_geometry(array, geometry)
    path = tmp_path / f"image{suffix}"
    volumes.write_image(image, path, overwrite=True)
    again = volumes.read_volume(path)
    tolerance = FORMAT_TOLERANCE[suffix]
    assert again.GetSize() == image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(again), array)
    np.testing.assert_allclose(again.GetSpacing(), image.GetSpacing(), rtol=tolerance)
    extent = max(np.abs(image.GetOrigin())) + 1.0
    np.testing.assert_allclose(again.GetOrigin(), image.GetOrigin(), rtol=0,
                               atol=tolerance * extent)
    np.testing.assert_allclose(again.GetDirection(), image.GetDirection(), rtol=0,
                               atol=10 * tolerance)
    assert volumes.Geometry.of(again).matches(volumes.Geometry.of(image), tolerance=1e-3)


@FAST
@given(data=st.data())
def test_a_label_map_goes_to_model_space_and_back_exactly(data):
    """At the scan's own spacing, any orientation is a permutation or flip of the voxel grid,
    so nearest-neighbour resampling there and back must give every voxel back."""
    geometry = data.draw(geometries)
    orientation = data.draw(st.sampled_from(["LPS", "RAS", "RAI", "PIL", "SAR"]))
    label = on_geometry(data.draw(label_arrays(geometry["size"])), geometry)
    oriented = sitk.DICOMOrient(label, orientation)
    grid = preprocess.model_grid(label, oriented.GetSpacing(), orientation)
    assert grid.size == oriented.GetSize()
    model_space = preprocess.label_to_model_space(label, grid)
    back = preprocess.label_to_input(model_space, grid, label)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back),
                                  sitk.GetArrayViewFromImage(label))
    assert volumes.Geometry.of(back) == volumes.Geometry.of(label)


# ------------------------------------------------------------------------------ metrics
def brute_force_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Directed distances (mm) from every surface voxel of ``a`` to the nearest of ``b``,
    by scipy erosion (face neighbours, border outside) and all pairwise distances."""
    def surface(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0))

    from_a, to_b = surface(a) * spacing, surface(b) * spacing
    pairwise = np.linalg.norm(from_a[:, None, :] - to_b[None, :, :], axis=-1)
    return pairwise.min(axis=1)


@FAST
@given(pair=masks, spacing=mask_spacings)
def test_dice_iou_and_distances_obey_their_definitions(pair, spacing):
    a, b = pair
    dice, iou = metrics.dice(a, b), metrics.iou(a, b)
    assert dice == metrics.dice(b, a) and 0.0 <= dice <= 1.0
    total = int(a.sum()) + int(b.sum())
    expected = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    assert dice == pytest.approx(expected, abs=1e-12)
    assert dice == pytest.approx(2 * iou / (1 + iou), abs=1e-12)
    if a.any():
        assert metrics.dice(a, a) == 1.0
        assert metrics.hd95(a, a, spacing) == 0.0
        assert metrics.mean_surface_distance(a, a, spacing) == 0.0
    hd = metrics.hausdorff_distance(a, b, spacing)
    assert hd == metrics.hausdorff_distance(b, a, spacing)
    if a.any() and b.any():
        step = np.asarray(spacing)
        ab, ba = brute_force_distances(a, b, step), brute_force_distances(b, a, step)
        assert hd == pytest.approx(max(ab.max(), ba.max()), rel=1e-5, abs=1e-5)
        hd95 = max(np.percentile(ab, 95), np.percentile(ba, 95))
        assert metrics.hd95(a, b, spacing) == pytest.approx(hd95, rel=1e-5, abs=1e-5)
        assert 0.0 <= metrics.hd95(a, b, spacing) <= hd + 1e-9
    elif a.any() or b.any():
        assert math.isinf(hd) and dice == 0.0
    else:
        assert hd == 0.0 and dice == 1.0


@FAST
@given(data=st.data())
def test_evaluate_scores_any_small_label_maps(data):
    size = data.draw(st.tuples(*[st.integers(1, 6)] * 3))
    spacing = data.draw(mask_spacings)
    pred_array = data.draw(label_arrays(size))
    ref_array = data.draw(label_arrays(size))
    pred, ref = sitk.GetImageFromArray(pred_array), sitk.GetImageFromArray(ref_array)
    for image in (pred, ref):
        image.SetSpacing(spacing)
    table = {1: "a", 2: "b", 3: "c", 4: "never drawn"}
    scores = metrics.evaluate(pred, ref, table)
    assert [s.value for s in scores] == [1, 2, 3, 4]
    for score in scores:
        p, r = pred_array == score.value, ref_array == score.value
        assert score.present == bool(r.any())
        assert score.dice == pytest.approx(metrics.dice(p, r), abs=1e-12)
        assert 0.0 <= score.dice <= 1.0 and 0.0 <= score.iou <= 1.0
        assert score.hd95_mm >= 0.0 and score.msd_mm >= 0.0
        assert score.volume_ref_ml == pytest.approx(r.sum() * np.prod(spacing) / 1000)
    assert scores[-1].dice == 1.0 and scores[-1].hd95_mm == 0.0  # in neither map
    same = metrics.evaluate(ref, ref, table)
    assert all(s.dice == 1.0 and s.hd95_mm == 0.0 for s in same)
    metrics.scores_table(scores)  # formats inf and nan without failing
    summary = metrics.mean_scores(scores)
    assert summary["labels"] == sum(s.present for s in scores)


# ------------------------------------------------------------------------- reader fuzzing
@contextlib.contextmanager
def memory_cap(extra_mb: int = 3072):
    """Lower this process's address-space limit while a mutated file is read, so that a header
    that slipped past the size checks fails to allocate instead of exhausting the machine."""
    if not Path("/proc/self/status").exists():  # not Linux: no cap
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    cap = size + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                            else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def mutated(data: bytes, edits: list[tuple[int, int]], digits: list[tuple[int, int]],
            cut: int | None) -> bytes:
    """``data`` with bytes overwritten, digits in the text changed, and maybe cut short."""
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    places = [i for i, byte in enumerate(buffer[:2048]) if 48 <= byte <= 57]
    for index, digit in digits:
        if places:
            buffer[places[index % len(places)]] = 48 + digit
    return bytes(buffer[:cut] if cut is not None else buffer)


mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
    st.lists(st.tuples(st.integers(0, 2**10), st.integers(0, 9)), max_size=4),
    st.one_of(st.none(), st.integers(0, 4096)),
)


class ValidFiles(dict):
    """File name -> bytes; printed short in hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"ValidFiles({', '.join(self)})"


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> ValidFiles:
    """Small valid files of each kind the readers take, as bytes."""
    from badinput import segmentation_file, small_volume, tiny_model_file

    folder = tmp_path_factory.mktemp("valid")
    image = small_volume((3, 4, 5))
    files = {
        "image.nii": volumes.write_image(image, folder / "image.nii"),
        "image.nii.gz": volumes.write_image(image, folder / "image.nii.gz"),
        "image.nrrd": volumes.write_image(image, folder / "image.nrrd", compress=False),
        "labels.seg.nrrd": segmentation_file(folder, "labels.seg.nrrd"),
        "model.safetensors": tiny_model_file(folder / "model.safetensors"),
    }
    return ValidFiles({name: path.read_bytes() for name, path in files.items()})


def read_as_its_kind(path: Path) -> object:
    if path.name.endswith(".seg.nrrd"):
        return segmentations.read_segmentation(path)
    if path.suffix == ".safetensors":
        return checkpoint.load_model(path)
    return volumes.read_volume(path)


@pytest.mark.parametrize("name", ["image.nii", "image.nii.gz", "image.nrrd", "labels.seg.nrrd",
                                  "model.safetensors"])
@FUZZ
@given(mutation=mutations)
def test_mutated_files_are_read_or_refused_clearly(tmp_path, valid_files, name, mutation):
    data = mutated(valid_files[name], *mutation)
    assume(data != valid_files[name])
    path = tmp_path / name
    path.write_bytes(data)
    with memory_cap():
        try:
            read_as_its_kind(path)
        except TransferSegError as error:
            assert str(error), "an error needs a message"


card_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


@FUZZ
@given(field=st.sampled_from(sorted(checkpoint._CHECKS) + ["unknown"]), value=card_values)
def test_a_card_with_any_field_value_is_read_or_refused_clearly(field, value):
    from badinput import tiny_card

    card = tiny_card()
    card[field] = value
    try:
        with memory_cap():  # out_channels 2**40 once built a list of 2**40 channel numbers
            parsed = checkpoint.ModelCard.from_json(json.dumps(card))
    except TransferSegError as error:
        assert "the model card" in str(error) or "model card" in str(error).lower()
        return
    again = checkpoint.ModelCard.from_json(parsed.to_json())
    assert again == parsed


# ------------------------------------------------------------- every command, fuzzed arguments
@pytest.fixture(scope="module")
def cli_material(tmp_path_factory) -> dict[str, Path]:
    """Small real inputs the fuzzed command lines name: a model, a scan and its label map, a
    case list, a label table, a text file posing as an image, an nnU-Net result folder."""
    import shutil

    from badinput import small_label, small_volume, tiny_model_file

    folder = tmp_path_factory.mktemp("cli")
    (folder / "out").mkdir()
    volumes.write_image(small_volume((8, 8, 8)), folder / "scan.nrrd")
    volumes.write_image(small_label(shape=(8, 8, 8)), folder / "scan_label.nrrd")
    (folder / "labels.json").write_text('{"1": "liver", "2": "spleen"}')
    (folder / "cases.csv").write_text("image,label\nscan.nrrd,scan_label.nrrd\n")
    (folder / "text.nii.gz").write_text("not an image")
    shutil.copytree(Path(__file__).parent / "fixtures" / "nnunet" / "plain", folder / "nnunet",
                    ignore=shutil.ignore_patterns("predictions.npz", "*numpy1*"))
    return {"model": tiny_model_file(folder / "model.safetensors"),
            "scan": folder / "scan.nrrd", "label": folder / "scan_label.nrrd",
            "table": folder / "labels.json", "cases": folder / "cases.csv",
            "text": folder / "text.nii.gz", "nnunet": folder / "nnunet",
            "missing": folder / "missing.nii.gz", "folder": folder}


PATH_KINDS = ("model", "scan", "label", "table", "cases", "text", "nnunet", "missing")
# command -> its flags: "path" (an input: any kind), "out" (an output name), "number", "switch"
COMMANDS = {
    "segment": {"--model": "path", "--image": "path", "--output": "out",
                "--probabilities": "out", "--overlap": "number", "--batch-size": "number",
                "--device": "device", "--overwrite": "switch", "--no-mirror": "switch",
                "--body-crop": "switch", "--no-body-crop": "switch"},
    "evaluate": {"--prediction": "path", "--reference": "path", "--labels": "path",
                 "--csv": "out", "--json": "out", "--resample": "switch",
                 "--ignore-unknown": "switch", "--overwrite": "switch"},
    "finetune": {"--base": "path", "--data": "path", "--out": "out", "--steps": "number",
                 "--batch-size": "number", "--val-every": "number", "--lr": "number",
                 "--checkpoint-every": "number", "--patch": "patch", "--labels": "text",
                 "--strategy": "strategy", "--device": "device", "--threads": "number",
                 "--freeze-depth": "number", "--overwrite": "switch"},
    "models export": {"model": "path", "--bundle": "out", "--torchscript": "out",
                      "--nnunet": "out", "--overwrite": "switch"},
    "models import": {"--nnunet": "path", "--fold": "number", "--file": "path"},
    "models show": {"id": "text"},
    "models register": {"--file": "path", "--overwrite": "switch"},
    "models list": {"--json": "switch"},
    "samples list": {"--json": "switch"},
    "pretrain": {"--data": "path", "--out": "out", "--steps": "number", "--patch": "patch",
                 "--spacing": "patch", "--heads": "heads", "--batch-size": "number",
                 "--modality": "text", "--overwrite": "switch"},
    "study": {"--pool": "path", "--test": "path", "--base": "path", "--out": "out",
              "--strategies": "strategies", "--sizes": "text", "--seeds": "text",
              "--steps": "number", "--patch": "patch", "--overwrite": "switch"},
}


# Flags each command needs, always given (with drawn values) so the runs get past the parser.
REQUIRED = {"segment": ["--model", "--image", "--output"],
            "evaluate": ["--prediction", "--reference"], "finetune": ["--data", "--out"],
            "models export": ["model", "--nnunet"], "models import": ["--nnunet"],
            "models show": ["id"], "models register": ["--file"], "models list": [],
            "samples list": [], "pretrain": ["--data", "--out"],
            "study": ["--pool", "--test", "--out"]}
# The right kind of input for a flag, drawn half of the time.
FITTING = {"--model": "model", "--image": "scan", "--prediction": "label",
           "--reference": "label", "--labels": "table", "--data": "cases", "--base": "model",
           "model": "model", "--nnunet": "nnunet", "--file": "model", "--pool": "cases",
           "--test": "cases"}


def _value(draw, kind: str, flag: str, material: dict) -> str:
    """A drawn value of ``kind`` for ``flag``."""
    if kind == "path":
        fitting = flag in FITTING and draw(st.booleans())
        return str(material[FITTING[flag] if fitting else draw(st.sampled_from(PATH_KINDS))])
    if kind == "out":
        folder = material["folder"]
        return str(draw(st.sampled_from([
            folder / "out" / "o.nii.gz", folder / "o.seg.nrrd", folder / "run",
            material["scan"], material["model"], material["table"], folder / "o.json",
            folder])))
    choices = {
        "number": ["0", "1", "-1", "2", "0.5", "1.0", "1e9", "nan", "inf", "abc", ""],
        "device": ["cpu", "auto", "cuda:7", "nope"],
        "patch": ["8 8 8", "1 1 1", "0 8 8", "-8 8 8"],
        "strategy": ["scratch", "finetune", "vanilla"],
        "text": ["liver", "", "no-such", "$x", "liver,spleen", "1", "0,1", "CT"],
        "heads": ["shared", "per-dataset", "many"],
        "strategies": ["scratch", "scratch,finetune", "finetune", "scratch,nope", ""],
    }[kind]
    return draw(st.sampled_from(choices))


@st.composite
def command_lines(draw, material: dict) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    flags = COMMANDS[command]
    argv = command.split()
    optional = [f for f in sorted(flags) if f not in REQUIRED[command]]
    chosen = REQUIRED[command] + (draw(st.lists(st.sampled_from(optional), unique=True,
                                                max_size=5)) if optional else [])
    for flag in chosen:
        kind = flags[flag]
        if kind == "switch":
            argv.append(flag)
            continue
        value = _value(draw, kind, flag, material)
        if not flag.startswith("--"):  # a positional argument
            argv.append(value)
        elif kind == "patch":
            argv += [flag, *value.split()]
        else:
            argv += [flag, value]
    if command in ("finetune", "pretrain", "study") and "--steps" not in argv:
        argv += ["--steps", "1"]  # every run stays short
    if command == "finetune":
        argv += ["--val-every", "1"] if "--val-every" not in argv else []
    return argv


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CLI_FUZZ = settings(max_examples=100, deadline=60_000, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@CLI_FUZZ
@given(data=st.data())
def test_every_command_with_fuzzed_arguments_ends_in_a_result_or_one_sentence(
        cli_material, data, monkeypatch, tmp_path_factory):
    """Any traceback (an exception that is not a TransferSeg error) is a bug; so is a run past
    the deadline (a hang) or memory growth past a bound. argparse's own usage errors (exit 2)
    count as clear."""
    import io

    from TransferSegLib.cli import main

    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path_factory.mktemp("home")))
    argv = data.draw(command_lines(cli_material))
    if argv[0] in ("finetune", "pretrain", "study"):
        steps = argv[argv.index("--steps") + 1]
        assume(steps in ("0", "1", "2", "-1", "abc", "", "nan", "inf", "0.5", "1.0"))
    before = _rss_mb()
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), \
            memory_cap(4096):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage and one error line
            code = exit_.code
    assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
    if code == 2:
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")
                 or ": error: " in line]
        assert lines and "Traceback" not in err.getvalue(), (argv, err.getvalue()[-2000:])
    assert _rss_mb() - before < 1500, (argv, "memory grew by", _rss_mb() - before, "MB")
