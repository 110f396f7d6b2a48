"""Applying a merge to a ``ModelProto``: member slices, DimRefs, op handlers.

The numbers are computed elsewhere (:mod:`foldonnx.numerics.merge`); tensors are read and
written copy-on-write through :class:`foldonnx.graph.tensors.ModelTensors`; this module only
knows where the merged values go:

* :func:`write_group` writes merged member slices back (shrinking the channel axis of every
  member tensor, keeping the scalars of a tensor that are not the group's — e.g. the k and v
  parts of a fused qkv weight when another member is q) and rewrites DimRefs.
* Op handlers (:data:`NODE_HANDLERS`) fix node attributes that encode a width (Conv ``group``).

Several groups can share one axis of one tensor at different offsets: the input channels of a
conv reading a ``Concat`` of four 24-channel branches (PP-OCR's detection neck) are four groups
at offsets 0, 24, 48 and 72. A group's member offsets are positions in the *original* tensor;
once an earlier group has shrunk that axis, the later segments have moved. :func:`write_group`
therefore records, per written (tensor, axis), where every original position now lies (an
axis layout), and :func:`member_indices` maps a member's original indices through it.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from foldonnx.analysis.channel_groups import ChannelGroup, Member, Role
from foldonnx.errors import PassError
from foldonnx.graph.tensors import ModelTensors
from foldonnx.numerics import merge as nx

__all__ = [
    "write_group",
    "axis_edits",
    "add_to_tensor",
    "weight_norms",
    "member_key",
    "member_indices",
    "NODE_HANDLERS",
]

logger = logging.getLogger(__name__)


def member_key(m: Member) -> tuple[str, int, int, int | None, str]:
    """Members that denote the same scalars (a tensor shared by several nodes of one group)."""
    return (m.tensor, m.axis, m.offset, m.unit_stride, m.role.value)


# per ModelTensors: (current tensor name, axis) -> current position of every position of the
# original tensor along that axis (-1: removed by a fold); absent = not shrunk yet
_LAYOUTS: weakref.WeakKeyDictionary[ModelTensors, dict[tuple[str, int], np.ndarray]] = (
    weakref.WeakKeyDictionary()
)


def _layouts(tensors: ModelTensors) -> dict[tuple[str, int], np.ndarray]:
    return _LAYOUTS.setdefault(tensors, {})


def member_indices(tensors: ModelTensors, m: Member, channels: int, unit: int) -> np.ndarray:
    """Indices ``[channels, unit]`` of member *m*'s scalars along its axis in the tensor its node
    reads now: :meth:`Member.indices` mapped through the axis layout left by groups written
    before (identity while the axis is untouched). Raises :class:`PassError` when an earlier
    group removed some of these scalars (the two groups overlap: the analysis should not
    produce that)."""
    idx = m.indices(channels, unit)
    layout = _layouts(tensors).get((tensors.current(m.tensor, m.node), m.axis))
    if layout is None:
        return idx
    if idx.size and int(idx.max()) >= layout.size:
        raise PassError(f"member {m.tensor!r} axis {m.axis}: index {int(idx.max())} beyond the original axis")
    out = layout[idx]
    if (out < 0).any():
        raise PassError(f"member {m.tensor!r} axis {m.axis}: channels already removed by another group")
    return out


def _record_layout(tensors: ModelTensors, name: str, axis: int, length: int, keep: np.ndarray) -> None:
    """Compose the layout of (name, axis) with one shrink that kept the positions ``keep``."""
    layouts = _layouts(tensors)
    step = np.where(keep, np.cumsum(keep) - 1, -1)
    old = layouts.get((name, axis), np.arange(length))
    layouts[(name, axis)] = np.where(old >= 0, step[np.maximum(old, 0)], -1)


def _carry_layouts(tensors: ModelTensors, src: str, dst: str) -> None:
    """A copy-on-write copy *dst* of *src* has *src*'s layouts."""
    if src == dst:
        return
    layouts = _layouts(tensors)
    for (name, axis), layout in list(layouts.items()):
        if name == src:
            layouts[(dst, axis)] = layout.copy()


def _conv_group_handler(node: onnx.NodeProto, old_width: int, new_width: int) -> None:
    """Conv/ConvTranspose: a depthwise ``group`` equal to the channel count follows it."""
    for a in node.attribute:
        if a.name == "group" and a.i == old_width and a.i > 1:
            a.i = new_width


NODE_HANDLERS: dict[str, Callable[[onnx.NodeProto, int, int], None]] = {
    "Conv": _conv_group_handler,
    "ConvTranspose": _conv_group_handler,
}


def axis_edits(pairs: Iterable[tuple[str, Member]]) -> dict[tuple[str, int], list[Member]]:
    """Members grouped by (tensor name, axis), in the order their edits must be applied.

    A tensor with members on several axes of one group is merged one axis at a time: axes
    holding a producer / param member first (their values may carry a folded BN scaling),
    consumer axes after, each computed on the tensor as the earlier axes left it."""
    by: dict[tuple[str, int], list[Member]] = defaultdict(list)
    for name, m in pairs:
        by[(name, m.axis)].append(m)
    first = {name: i for i, (name, _) in reversed(list(enumerate(pairs)))}

    def rank(item: tuple[tuple[str, int], list[Member]]) -> tuple[int, int]:
        (name, _axis), members = item
        return first[name], 0 if any(m.role != Role.CONSUMER for m in members) else 1

    return dict(sorted(by.items(), key=rank))


def write_group(
    tensors: ModelTensors,
    group: ChannelGroup,
    merged: dict[tuple, np.ndarray],
    k: int,
) -> list[str]:
    """Write the merged slices of *group* (``member_key -> [k, unit, rest]``) into the model.

    Every member tensor listed in *merged* loses the scalars of units ``k..n-1`` along its
    axis and gets the merged values at units ``0..k-1``; other scalars of the tensor are kept
    in order. DimRefs are rewritten to ``multiple·k`` / ``multiple·k·unit``. Returns the tensor
    names written.
    """
    n, unit = group.channels, group.unit
    tag = f"g{group.id}"
    # which nodes of this group read each tensor (copy-on-write decides on these)
    nodes_of: dict[str, set[str]] = defaultdict(set)
    for m in group.members:
        nodes_of[m.tensor].add(m.node)
    for d in group.dims:
        nodes_of[d.tensor].add(d.node)
    # resolve current names and take ownership once per original tensor
    resolved: dict[str, str] = {}
    for orig, nodes in nodes_of.items():
        cur = {tensors.current(orig, nd) for nd in nodes} if nodes != {""} else {orig}
        if len(cur) != 1:
            raise PassError(f"group {group.id}: nodes reading {orig!r} read different copies {sorted(cur)}")
        name = cur.pop()
        if not tensors.has(name):
            raise PassError(f"group {group.id}: member tensor {name!r} is not a constant")
        resolved[orig] = tensors.own(name, nodes, tag)
        _carry_layouts(tensors, name, resolved[orig])

    # group members by (tensor, axis) and apply all their edits at once
    pairs: list[tuple[str, Member]] = []
    seen: set[tuple] = set()
    for m in group.members:
        key = member_key(m)
        if key in seen or key not in merged:
            continue
        seen.add(key)
        pairs.append((resolved[m.tensor], m))
    by_tensor = axis_edits(pairs)
    # a tensor with members on several axes (a square conv inside a residual-coupled group is
    # both producer and consumer) is edited one axis at a time, in order of first appearance:
    # plan_group computed the later axes' values on the tensor already merged along the
    # earlier ones
    written = []
    indices = {member_key(m): member_indices(tensors, m, n, unit) for _, m in pairs}
    for (name, axis), members in by_tensor.items():
        arr = tensors.get(name)
        edits = [(indices[member_key(m)], merged[member_key(m)]) for m in members]
        try:
            out = nx.replace_channels(arr, axis, edits, k)
        except ValueError as exc:
            raise PassError(f"group {group.id}: member {name!r}: {exc}") from None
        keep = np.ones(arr.shape[axis], dtype=bool)
        for idx, _ in edits:
            keep[idx[k:].reshape(-1)] = False
        tensors.set(name, out)
        _record_layout(tensors, name, axis, arr.shape[axis], keep)
        written.append(name)

    # dims: Reshape targets, num_heads, split sizes, ...
    done: set[tuple[str, int]] = set()
    for d in group.dims:
        name = resolved[d.tensor]
        if (name, d.index) in done:
            continue
        done.add((name, d.index))
        arr = tensors.get(name).copy()
        flat = arr.reshape(-1)
        base_old = n if d.what == "channels" else n * unit
        base_new = k if d.what == "channels" else k * unit
        old, new = d.multiple * base_old, d.multiple * base_new
        if int(flat[d.index]) != old:
            raise PassError(
                f"group {group.id}: dim {name}[{d.index}] is {int(flat[d.index])}, expected {old}"
            )
        flat[d.index] = new
        tensors.set(name, flat.reshape(arr.shape))
        written.append(name)

    # node attributes that encode the width (depthwise Conv group)
    for m in group.members:
        node = tensors.node(m.node) if m.node else None
        if node is not None and node.op_type in NODE_HANDLERS:
            NODE_HANDLERS[node.op_type](node, n * unit, k * unit)
    return written


def add_to_tensor(tensors: ModelTensors, node: str, tensor: str, delta: np.ndarray, tag: str) -> str:
    """``tensor += delta`` for *node* only (copy-on-write when others read it too)."""
    cur = tensors.current(tensor, node)
    name = tensors.own(cur, {node}, tag)
    _carry_layouts(tensors, cur, name)
    arr = tensors.get(name)
    tensors.set(name, arr.astype(np.float64) + np.asarray(delta).reshape(arr.shape))
    return name


def weight_norms(tensors: ModelTensors, group: ChannelGroup, sizes: np.ndarray) -> list[str]:
    """Make every LayerNorm over the folded stream weight merged channel ``c`` by ``n_c / n``.

    A merged channel stands for ``n_c`` originals, so the mean and variance the LayerNorm
    computes over the ``k`` merged channels must be ``Σ_c (n_c/n)·x_c`` and
    ``Σ_c (n_c/n)·(x_c − μ)²`` — exact when the members were identical. Both ``ReduceMean``s of
    a decomposed LayerNorm become ``MatMul(·, w)`` with ``w = n_c/n`` (shape ``[k, 1]``); a
    fused ``LayerNormalization`` is decomposed the same way. Norms over another axis than the
    last, or whose optional outputs are used, are left alone (returned as notes).
    """
    notes: list[str] = []
    w = (np.asarray(sizes, dtype=np.float64) / float(np.sum(sizes))).reshape(-1, 1)
    k = w.shape[0]
    graph = tensors.graph
    wname = f"fold_g{group.id}_norm_weights"
    made = False

    def weights_for(dtype: int) -> str:
        nonlocal made
        if not made:
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
            graph.initializer.append(numpy_helper.from_array(w.astype(np_dtype), wname))
            tensors._init[wname] = graph.initializer[-1]
            made = True
        return wname

    for ref in group.norms:
        if ref.kind == "layernorm_decomposed":
            for name in ref.nodes:
                node = tensors.node(name)
                if node is None or node.op_type != "ReduceMean":
                    continue
                axes = [a.ints for a in node.attribute if a.name == "axes"]
                if axes and list(axes[0]) not in ([-1],):
                    notes.append(f"{name}: reduces over {list(axes[0])}, not the last axis")
                    continue
                axes_in = node.input[1] if len(node.input) > 1 else ""
                if axes_in and tensors.has(axes_in) and tensors.get(axes_in).reshape(-1).tolist() != [-1]:
                    notes.append(f"{name}: not a last-axis mean")
                    continue
                dtype = tensors._proto(ref.scale).data_type if ref.scale else onnx.TensorProto.FLOAT
                x = node.input[0]
                del node.input[:]
                node.input.extend([x, weights_for(dtype)])
                del node.attribute[:]
                node.op_type = "MatMul"
                node.domain = ""
        elif ref.kind == "layernorm" and len(ref.nodes) == 1:
            node = tensors.node(ref.nodes[0])
            if node is None or node.op_type != "LayerNormalization":
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            if axis != -1 or any(o for o in node.output[1:]):
                notes.append(f"{node.name}: axis {axis} or extra outputs; not weighted")
                continue
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            scale = node.input[1]
            dtype = tensors._proto(scale).data_type if tensors.has(scale) else onnx.TensorProto.FLOAT
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
            p = f"{node.name or 'ln'}/fold"
            eps_name = f"{p}_eps"
            graph.initializer.append(numpy_helper.from_array(np.asarray(eps, dtype=np_dtype), eps_name))
            wn = weights_for(dtype)
            x, y = node.input[0], node.output[0]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            h = onnx.helper
            new = [
                h.make_node("MatMul", [x, wn], [f"{p}_mean"], name=f"{p}_mean"),
                h.make_node("Sub", [x, f"{p}_mean"], [f"{p}_d"], name=f"{p}_sub"),
                h.make_node("Mul", [f"{p}_d", f"{p}_d"], [f"{p}_d2"], name=f"{p}_sq"),
                h.make_node("MatMul", [f"{p}_d2", wn], [f"{p}_var"], name=f"{p}_var"),
                h.make_node("Add", [f"{p}_var", eps_name], [f"{p}_ve"], name=f"{p}_eps_add"),
                h.make_node("Sqrt", [f"{p}_ve"], [f"{p}_sd"], name=f"{p}_sqrt"),
                h.make_node("Div", [f"{p}_d", f"{p}_sd"], [f"{p}_n"], name=f"{p}_div"),
                h.make_node("Mul", [f"{p}_n", scale], [f"{p}_s" if bias else y], name=f"{p}_scale"),
            ]
            if bias:
                new.append(h.make_node("Add", [f"{p}_s", bias], [y], name=f"{p}_bias"))
            nodes = list(graph.node)
            idx = next(i for i, n in enumerate(nodes) if n.name == node.name and list(n.output) == [y])
            nodes[idx : idx + 1] = new
            del graph.node[:]
            graph.node.extend(nodes)
            tensors.reindex()
        else:
            notes.append(f"norm {ref.kind} {ref.nodes[:1]}: weighting not supported")
    del k
    tensors.reindex()
    return notes
