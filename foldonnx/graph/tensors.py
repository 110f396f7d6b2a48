"""Constant tensors of an ONNX model, read and written as numpy arrays, copy-on-write.

:class:`ModelTensors` indexes a model's constant tensors (initializers and ``Constant`` nodes)
and their users, reads them as numpy arrays and writes them back (same dtype). Before an edit
touches a tensor that some node outside the edit also reads, the tensor is copied and only the
edited nodes are re-pointed at the copy (copy-on-write: exporters share identical tensors
between layers, e.g. every all-zero bias of a random-init model). Renames are remembered per
(node, original name) so that later edits find the tensor their node now reads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from foldonnx.errors import PassError

__all__ = ["ModelTensors", "iter_nodes", "dealias_identities", "clear_value_info"]

logger = logging.getLogger(__name__)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


class ModelTensors:
    """Constant tensors of a model (initializers and Constant outputs) with their users."""

    def __init__(self, model: onnx.ModelProto, *, dealias: bool = False) -> None:
        self.model = model
        self.graph = model.graph
        if dealias:
            dealias_identities(self.graph)
        self.renames: dict[tuple[str, str], str] = {}
        self._counter = 0
        self.reindex()

    def reindex(self) -> None:
        """Rebuild the indexes after nodes were replaced (renames are kept)."""
        self._init: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self._const: dict[str, onnx.NodeProto] = {}
        self._users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self._by_name: dict[str, onnx.NodeProto] = {}
        for node in iter_nodes(self.graph):
            if node.name:
                self._by_name.setdefault(node.name, node)
            if (
                node.op_type == "Constant"
                and len(node.output) == 1
                and any(a.name == "value" for a in node.attribute)
            ):
                self._const[node.output[0]] = node
            for name in node.input:
                if name:
                    self._users[name].append(node)

    # -- lookup -------------------------------------------------------------------------
    def node(self, name: str) -> onnx.NodeProto | None:
        return self._by_name.get(name)

    def has(self, name: str) -> bool:
        return name in self._init or name in self._const

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self._users.get(name, [])

    def current(self, tensor: str, node: str = "") -> str:
        """The name that *node* reads for the originally named *tensor* (after renames)."""
        return self.renames.get((node, tensor), tensor) if node else tensor

    def _proto(self, name: str) -> onnx.TensorProto:
        if name in self._init:
            return self._init[name]
        if name in self._const:
            for a in self._const[name].attribute:
                if a.name == "value":
                    return a.t
        raise PassError(f"tensor {name!r} is not an initializer or Constant output")

    def get(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self._proto(name))

    def set(self, name: str, array: np.ndarray) -> None:
        """Replace the value of *name* (dtype of the original tensor kept)."""
        old = self._proto(name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        new = numpy_helper.from_array(np.asarray(array).astype(dtype, copy=False), name)
        old.CopyFrom(new)

    def numel(self, name: str) -> int:
        return int(np.prod(self._proto(name).dims, dtype=np.int64))

    # -- copy-on-write ------------------------------------------------------------------
    def own(self, tensor: str, nodes: set[str], tag: str) -> str:
        """Make sure only *nodes* read *tensor*; returns the name they read afterwards.

        Empty *nodes* means "the caller owns every use" (no copy). Otherwise, when another
        node reads the tensor too, a copy named ``<tensor>__<tag>`` is made and *nodes* are
        re-pointed at it.
        """
        if not nodes or "" in nodes:
            return tensor
        users = self.users(tensor)
        outside = [u for u in users if u.name not in nodes]
        is_output = any(o.name == tensor for o in self.graph.output)
        if not outside and not is_output:
            return tensor
        self._counter += 1
        new_name = f"{tensor}__{tag}"
        while self.has(new_name) or new_name in self._users:
            new_name = f"{tensor}__{tag}_{self._counter}"
            self._counter += 1
        copy = onnx.TensorProto()
        copy.CopyFrom(self._proto(tensor))
        copy.name = new_name
        self.graph.initializer.append(copy)
        self._init[new_name] = self.graph.initializer[-1]
        moved = []
        for u in users:
            if u.name in nodes:
                for i, name in enumerate(u.input):
                    if name == tensor:
                        u.input[i] = new_name
                moved.append(u)
                orig = next((k[1] for k, v in self.renames.items() if v == tensor and k[0] == u.name), tensor)
                self.renames[(u.name, orig)] = new_name
        self._users[tensor] = [u for u in users if u not in moved]
        self._users[new_name] = moved
        logger.debug("copy-on-write: %s -> %s for %d node(s)", tensor, new_name, len(moved))
        return new_name


def dealias_identities(graph: onnx.GraphProto) -> int:
    """Make nodes read constants directly instead of through ``Identity`` copies (the
    TorchScript exporter shares weights that way); unused Identity nodes are removed, so
    copy-on-write sees the real users of every constant. Returns the number removed."""
    consts = {t.name for t in graph.initializer}
    consts |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in (consts | set(alias)):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    if not alias:
        return 0
    outputs = {o.name for o in graph.output}
    for node in iter_nodes(graph):
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    keep = [
        n
        for n in graph.node
        if not (n.op_type == "Identity" and n.output[0] in alias and n.output[0] not in outputs)
    ]
    removed = len(graph.node) - len(keep)
    if removed:
        del graph.node[:]
        graph.node.extend(keep)
    return removed


def clear_value_info(model: onnx.ModelProto) -> None:
    """Drop intermediate shape annotations (stale after widths change; ORT would refuse them)."""
    del model.graph.value_info[:]
