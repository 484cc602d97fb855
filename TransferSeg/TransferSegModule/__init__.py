"""The TransferSeg module's parts that need no Qt, kept out of the module file.

- :mod:`logic`: the module's logic (scene nodes <-> jobs), its processes injected;
- :mod:`jobstate`: a job's events -> what the panel shows (no Slicer either);
- :mod:`matching`: segment names -> training labels, new model ids;
- :mod:`annotation`: the annotate loop's rounds and the scores table;
- :mod:`catalog`: the model list and details in the panel;
- :mod:`environment`: supported Slicer, the GPU line, the jobs' Python, requirements;
- :mod:`scene`: training cases from nodes, new segmentation nodes, scores, tables and the
  training plot (MRML only);
- :mod:`dependencies`: installing PyTorch and the requirements, the GPU, the jobs' Python;
- :mod:`sampledata`: the samples in Slicer's Sample Data module.

A package rather than files beside ``TransferSeg.py``: Slicer treats every top-level ``.py``
file of a scripted-module folder as a module of its own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_FOLDER = Path(__file__).resolve().parent.parent  # the folder of TransferSeg.py


def library_root() -> Path:
    """The folder holding TransferSegLib: the module's folder once installed (the extension
    puts the library beside the module), else the root of a source checkout."""
    candidates = (MODULE_FOLDER, MODULE_FOLDER.parent)
    return next((f for f in candidates if (f / "TransferSegLib").is_dir()), MODULE_FOLDER)


def make_library_importable() -> None:
    if importlib.util.find_spec("TransferSegLib") is None:
        sys.path.append(str(library_root()))


make_library_importable()  # the package's modules use TransferSegLib's torch-free parts
