"""The computer the module runs on: supported Slicer, the GPU line, the Python and
environment of the jobs, the requirements and their constraints, the download child. No Qt,
no Slicer; the installing itself is in :mod:`dependencies`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

DEVICES = ("auto", "cuda", "cpu")


# Packages Slicer or the PyTorch extension own: the module never installs or upgrades them.
CORE_PACKAGES = ("torch", "simpleitk", "numpy")


# The Slicer releases the module supports: the library needs Python 3.10 (Slicer 5.8 has 3.9).
SUPPORTED_SLICER = "Slicer 5.10 or newer"


PYTHON_MINIMUM = (3, 10)


def parse_nvidia_smi(text: str) -> list[tuple[str, float]]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``.

    Returns ``[(name, memory in GiB)]``; lines that do not parse are skipped.
    """
    gpus = []
    for line in text.splitlines():
        name, _, memory = line.rpartition(",")
        try:
            gpus.append((name.strip(), float(memory) / 1024.0))
        except ValueError:
            continue
    return [(n, m) for n, m in gpus if n]


def gpu_description(gpus: Sequence[tuple[str, float]]) -> str:
    """The line beside the device choice: which GPU training would use, or that there is none."""
    if not gpus:
        return "No NVIDIA GPU found: training and segmentation run on the CPU (slower)."
    name, memory = gpus[0]
    more = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
    return f"GPU: {name}, {memory:.1f} GiB{more}"


def job_python(executable: str, which: Callable[[str], str | None],
               exists: Callable[[str], bool] = os.path.exists) -> str:
    """The Python a job runs in: Slicer's ``PythonSlicer`` where there is one.

    Inside Slicer ``sys.executable`` may be the application itself; its Python interpreter
    ``PythonSlicer`` lies beside it (or is on the PATH the launcher sets).
    """
    base = Path(executable)
    if base.name.lower().startswith("pythonslicer"):
        return str(base)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = base.with_name(name)
        if exists(str(candidate)):
            return str(candidate)
    return which("PythonSlicer") or executable




def requirement_name(line: str) -> str:
    """The normalised distribution name a requirement line asks for ("" for none)."""
    line = line.split("#", 1)[0].strip()
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def read_requirements(text: str) -> list[str]:
    """The requirement lines of a requirements.txt, without comments and blank lines."""
    return [line.split("#", 1)[0].strip() for line in text.splitlines()
            if line.split("#", 1)[0].strip()]


# Packages an importer needs only for some weight files, installed (after asking) when such a
# model is fetched or imported: the ranges of pyproject.toml's "import" extra.
IMPORT_PACKAGES = {".onnx": "onnx>=1.14,<2", ".h5": "h5py>=3.8,<4"}


def import_requirements(file_names: Iterable[str]) -> list[str]:
    """The requirement lines the weight files ``file_names`` need to be imported."""
    needed = [IMPORT_PACKAGES.get(Path(str(name)).suffix.lower()) for name in file_names]
    return list(dict.fromkeys(line for line in needed if line))


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.5.1+cu121"`` -> ``(2, 5, 1)``: the release numbers of a version string."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


# What each MONAI release asks of torch (their published Requires-Dist): 1.3.x and 1.4.0
# torch>=1.9 (1.4.0 also numpy<2), 1.5.0 torch>=2.4.1,<2.7, 1.5.1 and 1.5.2 torch>=2.4.1,
# 1.6.0 torch>=2.8.0. A MONAI whose floor is above the installed torch would make pip replace
# the torch the PyTorch extension chose (a CUDA build by a CPU one from PyPI on Windows).
TORCH_MINIMUM = (2, 1)


def monai_requirement(torch_version: str) -> str:
    """The MONAI releases TransferSeg may install next to this torch."""
    version = version_tuple(torch_version)
    if version < TORCH_MINIMUM:
        raise ValueError(
            f"TransferSeg needs PyTorch {'.'.join(map(str, TORCH_MINIMUM))} or newer, and "
            f"PyTorch {torch_version} is installed: update it in the PyTorch Utils module "
            "(PyTorch extension), then restart Slicer.")
    if version >= (2, 8):
        return "monai>=1.5.1,<1.7"
    if version >= (2, 4, 1):
        return "monai>=1.5.1,<1.6"
    return "monai>=1.3,<1.5"


def install_requirements(lines: Sequence[str], installed: Mapping[str, str]) -> list[str]:
    """The module's requirement lines with MONAI narrowed to what the installed torch supports."""
    torch = next((v for name, v in installed.items() if requirement_name(name) == "torch"), None)
    if torch is None:
        raise ValueError("PyTorch is not installed yet: install it with the PyTorch extension "
                         "first.")
    return [monai_requirement(torch) if requirement_name(line) == "monai" else line
            for line in lines]


def constraints(installed: Mapping[str, str]) -> str:
    """A pip constraints file holding the core packages at their installed versions, so that
    installing the module's requirements can never replace Slicer's numpy or SimpleITK or the
    PyTorch extension's torch."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items())
                   if requirement_name(name) in CORE_PACKAGES and version)


# The child that downloads a catalog model: zoo.fetch with its progress as JSON lines.
_FETCH = """\
import json, os, sys
from TransferSegLib import zoo

class Cancelled(Exception):
    pass

def progress(*args, **kwargs):
    if sys.argv[3:] and os.path.exists(sys.argv[3]):
        raise Cancelled()  # the partial download is kept and resumed next time
    done, total = (list(args) + [0, None])[:2]
    print(json.dumps({"event": "progress", "done": done, "total": total}), flush=True)

try:
    progress(0, None)  # a cancel that came while this program started
    path = zoo.fetch(sys.argv[1], accept_unverified=sys.argv[2] == "accept", progress=progress)
except Cancelled:
    print(json.dumps({"event": "cancelled", "status": "cancelled"}), flush=True)
    sys.exit(3)
except Exception as error:
    print(json.dumps({"event": "error", "message": str(error)}), flush=True)
    sys.exit(2)
print(json.dumps({"event": "done", "model": str(path)}), flush=True)
"""


def fetch_command(python: str, model_id: str, accept_unverified: bool = False,
                  cancel_file: str | os.PathLike | None = None) -> list[str]:
    """The command that downloads catalog model ``model_id`` in a child process (JSON lines:
    ``progress`` with bytes ``done`` of ``total``, then ``done`` with ``model`` or ``error``;
    ``cancelled`` when ``cancel_file`` appears)."""
    return [python, "-c", _FETCH, model_id, "accept" if accept_unverified else "verified",
            *([str(cancel_file)] if cancel_file is not None else [])]

