"""Symbolic values of the small integer tensors that graphs compute shapes with.

``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains (as the TorchScript exporter and
DINOv2-style exports emit) are evaluated entry by entry: each entry is a literal integer stored in
a constant (so a fold pass can rewrite it: a :class:`~foldonnx.analysis.channel_groups.DimRef`),
the run-time size of some tensor axis (which follows a fold by itself), or something computed
that the analysis cannot follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from foldonnx.analysis.graph_view import GraphView

__all__ = ["Entry", "ShapeValues"]

_MAX_LEN = 16


@dataclass(frozen=True)
class Entry:
    """One integer of a shape vector."""

    kind: str  # "const" | "dim" | "other"
    value: int | None = None  # the integer when known
    tensor: str = ""  # const: the constant holding it; dim: the tensor whose axis it measures
    index: int = 0  # const: flat index in ``tensor``; dim: the axis
    node: str = ""  # the node that consumes the constant


class ShapeValues:
    """Memoised symbolic evaluation of 0-D / 1-D integer tensors."""

    def __init__(self, view: GraphView) -> None:
        self.view = view
        self._memo: dict[str, list[Entry] | None] = {}

    def entries(self, name: str, consumer: str = "") -> list[Entry] | None:
        """Entries of integer tensor *name* as read by node *consumer* (a constant's DimRef node)."""
        if self.view.is_const(name):
            return self._const(name, consumer)
        if name in self._memo:
            return self._memo[name]
        self._memo[name] = None  # cycle guard
        result = self._eval(name)
        if result is None and name in self.view.folded:
            # computed from constants by ops we do not follow symbolically: known, not editable
            result = [Entry("other", int(x)) for x in self.view.folded[name].reshape(-1)]
        if result is not None and len(result) > _MAX_LEN:
            result = None
        self._memo[name] = result
        return result

    def _const(self, name: str, consumer: str) -> list[Entry] | None:
        ints = self.view.const_ints(name)
        if ints is None or len(ints) > _MAX_LEN:
            return None
        src = self.view.const_source(name)
        return [Entry("const", x, src, i, consumer) for i, x in enumerate(ints)]

    def _eval(self, name: str) -> list[Entry] | None:
        v = self.view
        idx = v.producer.get(name)
        if idx is None:
            return None
        node = v.nodes[idx]
        me = v.node_names[idx]
        op = node.op_type
        attrs = {a.name: a for a in node.attribute}
        if op == "Shape":
            shape = v.shape(node.input[0])
            if shape is None:
                return None
            start = attrs["start"].i if "start" in attrs else 0
            end = attrs["end"].i if "end" in attrs else len(shape)
            axes = range(len(shape))[slice(start, end)]
            return [Entry("dim", shape[a], node.input[0], a) for a in axes]
        if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            return self.entries(node.input[0], me)
        if op == "Concat":
            out: list[Entry] = []
            for inp in node.input:
                part = self.entries(inp, me)
                if part is None:
                    return None
                out += part
            return out
        if op == "Gather":
            data = self.entries(node.input[0], me)
            idxs = v.const_ints(node.input[1]) if len(node.input) > 1 else None
            if data is None or idxs is None:
                return None
            try:
                return [data[i] for i in idxs]
            except IndexError:
                return None
        if op == "Slice":
            data = self.entries(node.input[0], me)
            starts = v.const_ints(node.input[1]) if len(node.input) > 1 else None
            ends = v.const_ints(node.input[2]) if len(node.input) > 2 else None
            steps = v.const_ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
            if data is None or starts is None or ends is None or len(starts) != 1:
                return None
            return data[slice(starts[0], ends[0], steps[0])]
        if op in ("Mul", "Div", "Add", "Sub") and len(node.input) == 2:
            a, b = self.entries(node.input[0], me), self.entries(node.input[1], me)
            if a is None or b is None:
                return None
            n = max(len(a), len(b))
            if len(a) not in (1, n) or len(b) not in (1, n):
                return None
            out = []
            for i in range(n):
                x, y = a[i if len(a) > 1 else 0], b[i if len(b) > 1 else 0]
                value = _arith(op, x.value, y.value)
                out.append(Entry("other", value))
            return out
        return None


def _arith(op: str, x: int | None, y: int | None) -> int | None:
    if x is None or y is None:
        return None
    if op == "Mul":
        return x * y
    if op == "Add":
        return x + y
    if op == "Sub":
        return x - y
    return x // y if y else None
