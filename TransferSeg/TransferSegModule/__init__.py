"""The TransferSeg module's parts that need no Qt, kept out of the module file.

- :mod:`state`: the job state machine, label matching, colours, rounds (no Slicer either);
- :mod:`scene`: training cases from nodes, new segmentation nodes, scores, tables and the
  training plot (MRML only);
- :mod:`dependencies`: installing PyTorch and the requirements, the GPU, the jobs' Python.

A package rather than files beside ``TransferSeg.py``: Slicer treats every top-level ``.py``
file of a scripted-module folder as a module of its own.
"""
