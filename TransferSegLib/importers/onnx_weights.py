"""Reading the weights and the wiring of an ONNX file, without running it.

An ONNX file is a protobuf message: the ``onnx`` package parses it into plain data (no code
is executed). Exporters keep a module's parameter name for most tensors (``conv.weight``), but
tensors they rewrote get anonymous names (``onnx::Mul_517``: a GroupNorm's scale becomes the
second input of a ``Mul`` node). :class:`OnnxGraph` gives the nodes in graph order with the
names of their inputs and outputs, so an importer can find which layer such a tensor belongs to
from where it is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from TransferSegLib.errors import ModelFileError


@dataclass(frozen=True)
class OnnxNode:
    """One operation: its type (``Conv``, ``Mul``...), name, input and output value names."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class OnnxGraph:
    """The initialisers (name -> array, as stored), nodes in graph order, and the graph's
    inputs and outputs as {name: shape}; a dimension without a fixed size is its symbol (text)."""

    initialisers: dict[str, np.ndarray]
    nodes: list[OnnxNode]
    inputs: dict[str, list[int | str]] = field(default_factory=dict)
    outputs: dict[str, list[int | str]] = field(default_factory=dict)

    @cached_property
    def _readers(self) -> dict[str, list[OnnxNode]]:
        readers: dict[str, list[OnnxNode]] = {}
        for node in self.nodes:
            for name in dict.fromkeys(node.inputs):
                readers.setdefault(name, []).append(node)
        return readers

    @cached_property
    def _aliases(self) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for node in self.nodes:
            if node.op_type == "Identity" and len(node.inputs) == 1:
                aliases[node.outputs[0]] = node.inputs[0]
        return aliases

    def stored(self, value: str) -> str | None:
        """The initialiser that ``value`` is, following ``Identity`` nodes (exporters store
        equal tensors once and alias the others), or None when it is computed."""
        seen = set()
        while value not in self.initialisers and value in self._aliases and value not in seen:
            seen.add(value)
            value = self._aliases[value]
        return value if value in self.initialisers else None

    def consumers(self, value: str) -> list[OnnxNode]:
        """The nodes that read ``value``, in graph order."""
        return list(self._readers.get(value, []))

    def downstream(self, value: str) -> Iterator[OnnxNode]:
        """Every node reached from ``value`` by following outputs to their readers,
        breadth first (nearest first), each node once."""
        seen: set[int] = set()
        frontier = [value]
        while frontier:
            following = []
            for name in frontier:
                for node in self.consumers(name):
                    if id(node) not in seen:
                        seen.add(id(node))
                        following.extend(node.outputs)
                        yield node
            frontier = following


def _shape(value_info) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def read_onnx_graph(path: str | os.PathLike) -> OnnxGraph:
    """The initialisers, nodes, inputs and outputs of the ONNX file at ``path``.

    Raises :class:`ModelFileError` when the file is missing or not an ONNX model.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelFileError(
            "Reading ONNX weights needs the onnx package; install it with `pip install onnx`."
        ) from None
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ONNX file {path} does not exist; check the path.")
    try:
        # External data would make a stranger's file choose which other files are read.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's decode errors have several types
        raise ModelFileError(
            f"{path} is not a readable ONNX model ({type(error).__name__}); download it again."
        ) from None
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise ModelFileError(
            f"{path} keeps its weights in separate files (ONNX external data), which TransferSeg "
            "does not read; ask its publisher for a single-file ONNX model."
        )
    if not graph.node:
        raise ModelFileError(f"{path} holds no ONNX graph; is it the right file?")
    initialisers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = [OnnxNode(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in graph.node]
    stored = set(initialisers)
    inputs = {i.name: _shape(i) for i in graph.input if i.name not in stored}
    outputs = {o.name: _shape(o) for o in graph.output}
    return OnnxGraph(initialisers, nodes, inputs, outputs)


def read_onnx_initialisers(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The stored tensors (initialisers) of an ONNX file: {name: numpy array}, in file order."""
    return read_onnx_graph(path).initialisers
