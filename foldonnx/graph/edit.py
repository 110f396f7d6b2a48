"""Graph surgery on a maintained IR (``onnx_ir``, the ONNX project's in-memory IR), so node
edits read like the picture: values have producers and consumers, a node's inputs can be
re-pointed, and unused nodes are swept away.

The passes that change the graph's structure use it — the block approximation (remove the span
of nodes between two tensors, insert ``MatMul`` + ``Add`` between them) and low rank (replace
``X·W`` by ``(X·A)·B``) — while fold, which only rewrites tensor values, stays on the protobuf
(:class:`~foldonnx.graph.tensors.ModelTensors`). onnx_ir keeps everything a round trip must keep
(node names, metadata_props, doc strings, opset imports, functions); onnx-graphsurgeon drops
node metadata, which is why it is not used.

Typical use::

    ed = GraphEditor(model)
    y = ed.matmul("x", weights, name="tba/map")        # a new MatMul reading tensor "x"
    y = ed.add(y, bias, name="tba/bias")
    ed.replace_uses("blocks.11.out", y)                # consumers of the old tensor read y
    ed.cleanup()                                       # nodes no output depends on are gone
    new_model = ed.to_proto()

Names of new nodes, values and initializers are fresh (never clash with the model's).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from foldonnx.errors import PassError

__all__ = ["GraphEditor"]

logger = logging.getLogger(__name__)

ValueLike = str | ir.Value


class GraphEditor:
    """A model opened for structural edits (see module docstring). The ModelProto given is not
    modified; :meth:`to_proto` returns the edited copy."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = ir.serde.deserialize_model(model)
        self.graph = self.model.graph
        self._taken: set[str] = set()
        self._values: dict[str, ir.Value] = {}
        self.reindex()

    # -- lookup ---------------------------------------------------------------------------
    def reindex(self) -> None:
        """Rebuild the name index (after edits made through onnx_ir directly)."""
        self._values = {}
        for v in self.graph.inputs:
            self._values[v.name] = v
        for name, v in self.graph.initializers.items():
            self._values[name] = v
        for node in self.graph.all_nodes():
            for v in node.outputs:
                if v.name:
                    self._values[v.name] = v
        self._taken |= set(self._values)
        self._taken |= {n.name for n in self.graph.all_nodes() if n.name}

    def value(self, ref: ValueLike) -> ir.Value:
        if isinstance(ref, ir.Value):
            return ref
        try:
            return self._values[ref]
        except KeyError:
            raise PassError(f"no tensor named {ref!r} in the model") from None

    def has(self, name: str) -> bool:
        return name in self._values

    def producer(self, ref: ValueLike) -> ir.Node | None:
        return self.value(ref).producer()

    def consumers(self, ref: ValueLike) -> list[ir.Node]:
        return list(self.value(ref).consumers())

    def constant_array(self, ref: ValueLike) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant output), else None."""
        v = self.value(ref)
        if v.const_value is not None:
            return v.const_value.numpy()
        node = v.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            return node.attributes["value"].as_tensor().numpy()
        return None

    def fresh(self, base: str) -> str:
        """A name not used by any value, node or initializer yet."""
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name

    # -- building ---------------------------------------------------------------------------
    def initializer(self, array: np.ndarray, name: str) -> ir.Value:
        """A new initializer holding *array* (a fresh name based on *name*)."""
        fresh = self.fresh(name)
        v = ir.Value(name=fresh, const_value=ir.tensor(np.ascontiguousarray(array), name=fresh))
        v.shape = ir.Shape(array.shape)
        v.dtype = ir.DataType.from_numpy(np.asarray(array).dtype)
        self.graph.register_initializer(v)
        self._values[fresh] = v
        return v

    def node(
        self,
        op_type: str,
        inputs: Sequence[ValueLike | None],
        *,
        name: str,
        attributes: dict[str, Any] | None = None,
        num_outputs: int = 1,
        domain: str = "",
    ) -> list[ir.Value]:
        """Append a new node (fresh node and output names based on *name*); returns its outputs.
        The graph is re-sorted by :meth:`toposort` / :meth:`to_proto`."""
        ins = [None if i is None else self.value(i) for i in inputs]
        node_name = self.fresh(name)
        attrs = [ir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items()]
        outs = [
            ir.Value(name=self.fresh(f"{name}_out" if num_outputs == 1 else f"{name}_out{i}"))
            for i in range(num_outputs)
        ]
        node = ir.Node(domain, op_type, ins, attrs, outputs=outs, name=node_name)
        self.graph.append(node)
        for o in outs:
            self._values[o.name] = o
        return outs

    def matmul(self, x: ValueLike, weight: np.ndarray | ValueLike, *, name: str) -> ir.Value:
        """``x · weight`` (a new initializer when *weight* is an array)."""
        w = (
            self.initializer(weight, f"{name}_weight")
            if isinstance(weight, np.ndarray)
            else self.value(weight)
        )
        return self.node("MatMul", [x, w], name=name)[0]

    def add(self, x: ValueLike, other: np.ndarray | ValueLike, *, name: str) -> ir.Value:
        """``x + other`` (a new initializer when *other* is an array)."""
        b = self.initializer(other, f"{name}_bias") if isinstance(other, np.ndarray) else self.value(other)
        return self.node("Add", [x, b], name=name)[0]

    def gemm(
        self,
        x: ValueLike,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        name: str,
        trans_b: bool = True,
    ) -> ir.Value:
        """``Gemm(x, weight, bias)`` for 2-D *x* (``weight`` as ``[out, in]`` with ``trans_b``)."""
        w = self.initializer(weight, f"{name}_weight")
        ins: list[ValueLike | None] = [x, w]
        if bias is not None:
            ins.append(self.initializer(bias, f"{name}_bias"))
        return self.node("Gemm", ins, name=name, attributes={"transB": int(trans_b)})[0]

    def reshape(self, x: ValueLike, shape: Sequence[int], *, name: str) -> ir.Value:
        s = self.initializer(np.asarray(list(shape), np.int64), f"{name}_shape")
        return self.node("Reshape", [x, s], name=name)[0]

    # -- rewiring ---------------------------------------------------------------------------
    def replace_uses(self, old: ValueLike, new: ValueLike) -> None:
        """Every consumer of *old* reads *new* instead; when *old* is a graph output, *new*
        takes its place and its name (the model's output names never change)."""
        o, n = self.value(old), self.value(new)
        outputs = self.graph.outputs
        was_output = [i for i, v in enumerate(outputs) if v is o]
        for i in was_output:  # the graph output first, then every consumer
            outputs[i] = n
        if was_output:  # the output keeps its declared type and shape
            n.type = n.type or o.type
            n.shape = o.shape if n.shape is None else n.shape
        ir.convenience.replace_all_uses_with(o, n)
        if was_output:
            keep = o.name
            o.name = self.fresh(f"{keep}_replaced")
            self._values[o.name] = o
            n.name = keep
            self._values[keep] = n

    def span(self, start: ValueLike, end: ValueLike) -> list[ir.Node]:
        """The nodes between two tensors: those that *end* depends on and that depend on
        *start* (in graph order). Nodes computing only from constants or other inputs (shape
        arithmetic) are not in the span."""
        s, e = self.value(start), self.value(end)
        downstream: set[int] = set()
        todo = [s]
        seen_v: set[int] = set()
        while todo:
            v = todo.pop()
            if id(v) in seen_v:
                continue
            seen_v.add(id(v))
            for c in v.consumers():
                if id(c) not in downstream:
                    downstream.add(id(c))
                    todo.extend(c.outputs)
        upstream: set[int] = set()
        todo_n = [e.producer()] if e.producer() is not None else []
        while todo_n:
            n = todo_n.pop()
            if n is None or id(n) in upstream:
                continue
            upstream.add(id(n))
            for i in n.inputs:
                if i is not None and i is not s and i.producer() is not None:
                    todo_n.append(i.producer())
        return [n for n in self.graph if id(n) in downstream and id(n) in upstream]

    def remove_span(self, start: ValueLike, end: ValueLike, replacement: ValueLike) -> list[ir.Node]:
        """Make *replacement* stand for *end* (see :meth:`replace_uses`), then drop the nodes of
        the span that nothing reads any more. Returns the nodes removed."""
        nodes = self.span(start, end)
        self.replace_uses(end, replacement)
        return self.cleanup(candidates=nodes)

    def cleanup(self, candidates: Iterable[ir.Node] | None = None) -> list[ir.Node]:
        """Remove nodes whose outputs nobody reads (repeatedly), and initializers no node reads.
        Returns the nodes removed."""
        removed: list[ir.Node] = []
        graph_outputs = {id(v) for v in self.graph.outputs}
        changed = True
        pool = list(candidates) if candidates is not None else None
        while changed:
            changed = False
            for node in list(reversed(list(self.graph))):
                if pool is not None and node not in pool and not _all_unused(node, graph_outputs):
                    continue
                if _all_unused(node, graph_outputs):
                    self.graph.remove(node, safe=True)
                    removed.append(node)
                    changed = True
        for name, v in list(self.graph.initializers.items()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                del self.graph.initializers[name]
        self.reindex()
        return removed

    def toposort(self) -> None:
        self.graph.sort()

    def to_proto(self) -> onnx.ModelProto:
        """The edited model (sorted; intermediate shape annotations dropped where stale)."""
        self.toposort()
        proto = ir.serde.serialize_model(self.model)
        del proto.graph.value_info[:]
        return proto


def _all_unused(node: ir.Node, graph_outputs: set[int]) -> bool:
    return all(not o.uses() and id(o) not in graph_outputs for o in node.outputs)
