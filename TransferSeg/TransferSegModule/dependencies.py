"""What the TransferSeg module needs from the computer: the library, PyTorch and the packages of
``Resources/requirements.txt``, the GPU, and the Python its jobs run in.

No Qt. ``slicer`` (the application: ``slicer.util``, ``slicer.app``) and the PyTorch
extension are imported only when something is installed, so the rest works (and is tested)
without Slicer.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from TransferSegModule import state

MODULE_FOLDER = Path(__file__).resolve().parent.parent  # the folder of TransferSeg.py
REQUIREMENTS = MODULE_FOLDER / "Resources" / "requirements.txt"


def library_root() -> Path:
    """The folder holding TransferSegLib: the module's folder once installed (the extension
    puts the library beside the module), else the root of a source checkout."""
    candidates = (MODULE_FOLDER, MODULE_FOLDER.parent)
    return next((f for f in candidates if (f / "TransferSegLib").is_dir()), MODULE_FOLDER)


def make_library_importable() -> None:
    if importlib.util.find_spec("TransferSegLib") is None:
        sys.path.append(str(library_root()))


def requirements() -> list[str]:
    return state.read_requirements(REQUIREMENTS.read_text(encoding="utf-8"))


# Distributions whose import name is not their own name.
IMPORT_NAMES = {"pyyaml": "yaml"}


def missing() -> list[str]:
    """Distributions (torch first) that cannot be imported yet."""
    names = ["torch", *[state.requirement_name(line) for line in requirements()]]
    return [name for name in names if importlib.util.find_spec(
        IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))) is None]


def installed_core_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "SimpleITK", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def install() -> None:
    """torch through the PyTorch extension (it asks the user and picks the CUDA build), then
    the requirements with Slicer's installer; numpy, SimpleITK and torch stay as they are."""
    import slicer

    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("TransferSeg needs the PyTorch extension: install 'PyTorch' from "
                               "the Extensions Manager and restart Slicer.") from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
            raise RuntimeError("PyTorch was not installed, so TransferSeg cannot run yet.")
    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    if hasattr(packaging, "pip_ensure"):  # Slicer 5.12 and later
        packaging.pip_ensure(packaging.load_requirements(str(REQUIREMENTS)),
                             requester="TransferSeg")
        return
    pins = Path(slicer.app.temporaryPath) / "TransferSeg-constraints.txt"
    pins.write_text(state.constraints(installed_core_versions()), encoding="utf-8")
    slicer.util.pip_install(["-r", str(REQUIREMENTS), "-c", str(pins)])


def gpus() -> list[tuple[str, float]]:
    """``[(name, GiB)]`` from nvidia-smi; CUDA is not started in Slicer's own process."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        text = subprocess.run([tool, "--query-gpu=name,memory.total",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return state.parse_nvidia_smi(text)


def job_python() -> str:
    return state.job_python(sys.executable, shutil.which)


def job_environment() -> dict[str, str]:
    return state.job_environment(os.environ, str(library_root()))


def run_folder(kind: str) -> Path:
    """A new folder for one job under TransferSeg's cache (``zoo.home()``); fine-tuned models
    stay there (registered with their lineage), so it is not a temporary folder."""
    from TransferSegLib import zoo

    folder = zoo.home() / "slicer-runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"
    for number in range(2, 1000):
        if not folder.exists():
            break
        folder = folder.with_name(f"{folder.name.rsplit('~', 1)[0]}~{number}")
    folder.mkdir(parents=True)
    return folder
