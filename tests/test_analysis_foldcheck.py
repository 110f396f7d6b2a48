"""The strongest completeness check for channel groups: delete one channel, run the graph.

For a foldable group, :func:`delete_channel` removes channel ``c`` from every member slice and
rewrites every DimRef; the model must stay checker-valid, load in ONNX Runtime and keep its output
shapes. For groups without a normalisation over the channel axis, deleting a channel must give the
same outputs as zeroing it in every member (:func:`zero_channel`): a member the analysis forgot
would make the two differ (or break the graph).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from foldonnx.analysis import find_channel_groups
from foldonnx.analysis.channel_groups import ChannelGroup, Role
from foldonnx.analysis.graph_view import GraphView

__all__ = [
    "build",
    "delete_channel",
    "zero_channel",
    "make_inputs",
    "run_model",
    "check_group",
    "check_all_groups",
]


def _private_tensor(
    model: onnx.ModelProto, view: GraphView, tensor: str, node_name: str, cache: dict[tuple[str, str], str]
) -> str:
    """A copy of *tensor* used only by *node_name* (copy-on-write); returns its initializer name."""
    key = (tensor, node_name)
    if key in cache:
        return cache[key]
    node = next(n for i, n in enumerate(model.graph.node) if view.node_names[i] == node_name)
    proto = view.const_proto(tensor)
    assert proto is not None, f"member tensor {tensor} is not a constant"
    new = f"{tensor}__chk{len(cache)}"
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(proto).copy(), new))
    hit = False
    for i, name in enumerate(node.input):
        if name and view.is_const(name) and view.const_source(name) == tensor:
            node.input[i] = new
            hit = True
    assert hit, f"node {node_name} does not read {tensor}"
    cache[key] = new
    return new


def _set_array(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(numpy_helper.from_array(array, name))
                    return
    raise AssertionError(f"tensor {name} not found")


def _get_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise AssertionError(f"tensor {name} not found")


def _edit(model: onnx.ModelProto, group: ChannelGroup, channel: int, delete: bool) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    view = GraphView(m)
    cache: dict[tuple[str, str], str] = {}
    by_tensor: dict[str, dict[int, set[int]]] = {}
    for mem in group.members:
        if not delete and mem.role == Role.STAT:
            continue
        name = _private_tensor(m, view, mem.tensor, mem.node, cache)
        idx = mem.indices(group.channels, group.unit)[channel]
        by_tensor.setdefault(name, {}).setdefault(mem.axis, set()).update(int(i) for i in idx)
    for name, axes in by_tensor.items():
        arr = _get_array(m, name)
        for axis, idx in axes.items():
            if delete:
                arr = np.delete(arr, sorted(idx), axis=axis)
            else:
                sl = [slice(None)] * arr.ndim
                sl[axis] = sorted(idx)
                arr = arr.copy()
                arr[tuple(sl)] = 0
        _set_array(m, name, arr)
    if delete:
        for d in group.dims:
            new_value = group.channels - 1 if d.what == "channels" else (group.channels - 1) * group.unit
            new_value *= d.multiple
            node_idx = view.node_names.index(d.node) if d.node in view.node_names else -1
            direct = (d.tensor, d.node) in cache or node_idx >= 0 and any(
                view.is_const(i) and view.const_source(i) == d.tensor for i in m.graph.node[node_idx].input
            )
            name = _private_tensor(m, view, d.tensor, d.node, cache) if direct else d.tensor
            arr = _get_array(m, name).copy()
            flat = arr.reshape(-1)
            flat[d.index] = new_value
            _set_array(m, name, flat.reshape(arr.shape))
        # a depthwise Conv's group attribute equals the width (the fold pass fixes it the same way)
        width = group.channels * group.unit
        member_nodes = {mem.node for mem in group.members}
        for i, node in enumerate(m.graph.node):
            if view.node_names[i] in member_nodes and node.op_type in ("Conv", "ConvTranspose"):
                for attr in node.attribute:
                    if attr.name == "group" and attr.i == width > 1:
                        attr.i = width - group.unit
    m.graph.ClearField("value_info")
    return m


def delete_channel(model: onnx.ModelProto, group: ChannelGroup, channel: int = 0) -> onnx.ModelProto:
    """A copy of *model* with channel *channel* of *group* removed from every member and DimRef."""
    return _edit(model, group, channel, delete=True)


def zero_channel(model: onnx.ModelProto, group: ChannelGroup, channel: int = 0) -> onnx.ModelProto:
    """A copy of *model* with channel *channel* of *group* set to zero in every non-STAT member."""
    return _edit(model, group, channel, delete=False)


def make_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check_group(
    model: onnx.ModelProto,
    group: ChannelGroup,
    feeds: dict[str, np.ndarray],
    reference: list[np.ndarray],
    numeric: bool | None = None,
) -> float:
    """Delete channel 0 of *group*; assert valid graph + unchanged output shapes; return the max
    difference between the deleted and the zeroed model (asserted small when *numeric*)."""
    folded = delete_channel(model, group)
    onnx.checker.check_model(folded)
    outs = run_model(folded, feeds)
    assert [o.shape for o in outs] == [r.shape for r in reference], f"output shapes changed by {group}"
    if numeric is None:
        numeric = not group.norms
    zeroed = run_model(zero_channel(model, group), feeds)
    diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(outs, zeroed, strict=True))
    if numeric:
        scale = max(float(np.max(np.abs(z))) for z in zeroed) or 1.0
        assert diff <= 1e-4 * scale, f"deleting channel 0 of {group} differs from zeroing it by {diff}"
    return diff


def check_all_groups(
    model: onnx.ModelProto, groups: list[ChannelGroup] | None = None, limit: int | None = None
) -> int:
    """Run :func:`check_group` on every foldable group (or the first *limit*); returns how many."""
    groups = find_channel_groups(model) if groups is None else groups
    feeds = make_inputs(model)
    reference = run_model(model, feeds)
    done = 0
    for g in groups:
        if g.foldable and g.channels > 1:
            check_group(model, g, feeds, reference)
            done += 1
            if limit is not None and done >= limit:
                break
    return done


# ---------------------------------------------------------------------------- tiny-graph builder
def build(text: str, seed: int = 0, **values: np.ndarray) -> onnx.ModelProto:
    """Parse an ONNX text model; graph inputs named in ``<...>`` become random initializers.

    Inputs whose name starts with ``w``, ``b``, ``g`` (weights, biases, gains), ``p`` (params)
    or ``s`` (stats) become float initializers; ``values`` overrides any of them.
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    keep, inits = [], []
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if vi.name in values:
            inits.append(numpy_helper.from_array(np.asarray(values[vi.name]), vi.name))
        elif vi.name[0] in "wbgps" and vi.name != "x":
            arr = rng.standard_normal(shape).astype(np.float32)
            if vi.name.startswith("s"):  # BN statistics: keep the variance positive
                arr = np.abs(arr) + 0.5
            inits.append(numpy_helper.from_array(arr, vi.name))
        else:
            keep.append(vi)
    graph = helper.make_graph(list(model.graph.node), model.graph.name, keep, list(model.graph.output), inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = 8
    onnx.checker.check_model(out)
    return out


# ---------------------------------------------------------------------------- the helper can fail
MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[1, 4, 8] x, float[8, 16] w1, float[16] b1, float[16, 8] w2) => (float[1, 4, 8] y) {
    h = MatMul(x, w1)
    hb = Add(h, b1)
    a = Relu(hb)
    z = MatMul(a, w2)
    y = Add(z, x)
}
"""


def test_helper_detects_a_missing_member() -> None:
    model = build(MLP)
    groups = find_channel_groups(model)
    hidden = next(g for g in groups if g.channels == 16)
    assert hidden.foldable
    assert check_all_groups(model, [hidden]) == 1
    feeds = make_inputs(model)
    reference = run_model(model, feeds)
    for missing in ("b1", "w2"):  # without the bias or the consumer the edited graph is broken
        members = tuple(m for m in hidden.members if m.tensor != missing)
        broken = ChannelGroup(**{**hidden.__dict__, "members": members})
        with pytest.raises(Exception):  # noqa: B017 - ORT raises its own exception types
            check_group(model, broken, feeds, reference)


def test_helper_detects_a_wrong_offset() -> None:
    model = build(MLP)
    hidden = next(g for g in find_channel_groups(model) if g.channels == 16)
    feeds = make_inputs(model)
    reference = run_model(model, feeds)
    shifted = tuple(dataclasses.replace(m, offset=1) if m.tensor == "b1" else m for m in hidden.members)
    broken = ChannelGroup(**{**hidden.__dict__, "members": shifted})
    with pytest.raises(AssertionError, match="differs from zeroing"):
        check_group(model, broken, feeds, reference)
