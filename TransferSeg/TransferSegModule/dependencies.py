"""What the TransferSeg module needs from the computer: the library, PyTorch and the packages of
``Resources/requirements.txt``, the GPU, and the Python its jobs run in.

No Qt. ``slicer`` (the application: ``slicer.util``, ``slicer.app``) and the PyTorch
extension are imported only when something is installed, so the rest works (and is tested)
without Slicer.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

from TransferSegModule import MODULE_FOLDER, environment, library_root, make_library_importable

__all__ = ["library_root", "make_library_importable"]  # used by the module file and the jobs

REQUIREMENTS = MODULE_FOLDER / "Resources" / "requirements.txt"


def requirements() -> list[str]:
    return environment.read_requirements(REQUIREMENTS.read_text(encoding="utf-8"))


# Distributions whose import name is not their own name.
IMPORT_NAMES = {"pyyaml": "yaml"}


def missing() -> list[str]:
    """Distributions (torch first) that cannot be imported yet."""
    names = ["torch", *[environment.requirement_name(line) for line in requirements()]]
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


def unsupported() -> str | None:
    """Why this Slicer cannot run TransferSeg (None when it can)."""
    if sys.version_info < environment.PYTHON_MINIMUM:
        minimum = ".".join(map(str, environment.PYTHON_MINIMUM))
        return (f"TransferSeg needs {environment.SUPPORTED_SLICER} (Python {minimum} or "
                "newer); this Slicer runs Python "
                f"{sys.version_info[0]}.{sys.version_info[1]}. Install a newer Slicer "
                "from download.slicer.org.")
    return None


def install() -> None:
    """Install what is missing, after the user agreed once (the caller asks): torch through
    the PyTorch extension (it picks the build that fits the GPU), then the requirements with
    Slicer's installer, constrained so that numpy, SimpleITK and torch stay as they are and
    MONAI is a release that supports the installed torch."""
    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("TransferSeg needs the PyTorch extension: install 'PyTorch' from "
                               "the Extensions Manager and restart Slicer.") from None
        torch_floor = ">=" + ".".join(map(str, environment.TORCH_MINIMUM))
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=torch_floor) is None:
            raise RuntimeError("PyTorch was not installed, so TransferSeg cannot run yet.")
        importlib.invalidate_caches()
    _pip_ensure(environment.install_requirements(requirements(), installed_core_versions()))


def missing_for_import(file_names) -> list[str]:
    """Requirement lines (onnx, h5py) that importing the weight files ``file_names`` needs
    and that are not installed."""
    return [line for line in environment.import_requirements(file_names)
            if importlib.util.find_spec(environment.requirement_name(line)) is None]


def install_packages(lines) -> None:
    """Install requirement ``lines`` the way :func:`install` does (the caller has asked)."""
    _pip_ensure(list(lines))


def _pip_ensure(lines: list[str]) -> None:
    """pip-install ``lines`` with Slicer's installer, never changing numpy, SimpleITK or torch
    (a constraints file holds them at their installed versions)."""
    import slicer

    folder = Path(slicer.app.temporaryPath)
    wanted, pins = folder / "TransferSeg-requirements.txt", folder / "TransferSeg-constraints.txt"
    wanted.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pins.write_text(environment.constraints(installed_core_versions()), encoding="utf-8")
    try:
        pydeps = importlib.import_module("slicer.pydeps")  # Slicer 5.11 and later
    except ImportError:
        pydeps = None
    if hasattr(pydeps, "pip_ensure"):
        pydeps.pip_ensure(pydeps.load_requirements(str(wanted)), constraints=str(pins),
                          prompt_install=False, requester="TransferSeg")
    else:
        slicer.util.pip_install(["-r", str(wanted), "-c", str(pins)])
    importlib.invalidate_caches()


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
    return environment.parse_nvidia_smi(text)


def job_python() -> str:
    return environment.job_python(sys.executable, shutil.which)


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
