"""A read-only view of an ONNX graph for the channel-group analysis.

Collects what every handler needs: static shapes (ONNX shape inference run on a weight-free copy,
so a multi-GB model infers in milliseconds), constant values (initializers, ``Constant`` nodes and
``Identity`` aliases of them, as the TorchScript exporter emits to share tensors), producers and
consumers of every value, and readable module paths of nodes.
"""

from __future__ import annotations

import ast
import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["GraphView", "SPATIAL_SIZE"]

logger = logging.getLogger(__name__)

# initializers smaller than this keep their values in the shape-inference copy (shape constants)
_SMALL_CONST = 64

# a free spatial size of an image input, as pooled() probes it (224 = 7 x 32 keeps the shapes of
# stride-32 FPN necks consistent)
SPATIAL_SIZE = 224


class GraphView:
    """Shapes, constants and use lists of one ``onnx.GraphProto``; never mutates the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.node_names: list[str] = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(self.nodes)]
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.graph_inputs: list[str] = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.graph_outputs: list[str] = [o.name for o in self.graph.output]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for idx, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = idx
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(idx)
        # constant tensors: name -> (source initializer / Constant output name, TensorProto or None)
        self._const_proto: dict[str, onnx.TensorProto] = dict(self.initializers)
        self.alias: dict[str, str] = {}  # Identity-of-constant output -> the constant it copies
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                proto = _constant_node_tensor(node)
                if proto is not None:
                    self._const_proto[node.output[0]] = proto
        for node in self.nodes:  # Identity chains of constants (in topological order)
            if node.op_type == "Identity" and node.input and self.is_const(node.input[0]):
                self.alias[node.output[0]] = self.const_source(node.input[0])
        self._values: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._probe: dict[str, tuple[int, ...]] | None = None  # shapes at SPATIAL_SIZE, see pooled()
        # small integer tensors computed from constants (shape arithmetic): values, not editable
        self.folded: dict[str, np.ndarray] = {}
        self._fold_int_constants()
        self._infer_shapes()
        for _ in range(4):  # Shape of now-known shapes may fold more, and so on
            if not self._fold_int_constants():
                break
            self._infer_shapes()

    # ------------------------------------------------------------------ constants
    def is_const(self, name: str) -> bool:
        return name in self._const_proto or name in self.alias

    def const_source(self, name: str) -> str:
        """The initializer / Constant output that holds the data of constant *name*."""
        return self.alias.get(name, name)

    def const_proto(self, name: str) -> onnx.TensorProto | None:
        return self._const_proto.get(self.const_source(name))

    def const_value(self, name: str, max_size: int = 4096) -> np.ndarray | None:
        """Value of a (small) constant; None for non-constants or large tensors."""
        src = self.const_source(name)
        if src in self._values:
            return self._values[src]
        proto = self._const_proto.get(src)
        if proto is None:
            return None
        size = int(np.prod(proto.dims)) if proto.dims else 1
        if size > max_size:
            return None
        try:
            value = numpy_helper.to_array(proto)
        except Exception:  # noqa: BLE001 - external data not loaded etc.
            return None
        self._values[src] = value
        return value

    def const_ints(self, name: str) -> list[int] | None:
        value = self.const_value(name)
        if value is None or value.dtype.kind not in "iu":
            return None
        return [int(v) for v in value.reshape(-1)]

    def numel(self, name: str) -> int:
        proto = self.const_proto(name)
        if proto is None:
            return 0
        return int(np.prod(proto.dims)) if proto.dims else 1

    # ------------------------------------------------------------------ shapes
    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)

    def small_value(self, name: str) -> np.ndarray | None:
        """Value of a small tensor (<= 64 elements): a constant or folded shape arithmetic."""
        if name in self.folded:
            return self.folded[name]
        return self.const_value(name, max_size=_SMALL_CONST)

    def int_value(self, name: str) -> np.ndarray | None:
        """Value of a small integer/bool tensor: a constant or folded shape arithmetic."""
        if name in self.folded:
            return self.folded[name]
        value = self.const_value(name, max_size=_SMALL_CONST)
        if value is None or value.dtype.kind not in "iub":
            return None
        return value

    def _fold_int_constants(self) -> bool:
        """Evaluate integer shape arithmetic whose inputs are all known (TorchScript's Expand shapes)."""
        new = False
        for _idx, node in enumerate(self.nodes):
            if node.op_type not in _FOLDABLE or not node.output or node.output[0] in self.folded:
                continue
            if self.is_const(node.output[0]):
                continue
            if node.op_type == "Shape":
                shape = self.shapes.get(node.input[0])
                if shape is None:
                    continue
                start = _attr_i(node, "start", 0)
                end = _attr_i(node, "end", len(shape))
                self.folded[node.output[0]] = np.array(shape[slice(start, end)], dtype=np.int64)
                new = True
                continue
            inputs = [self.small_value(i) if i else None for i in node.input]
            if any(v is None for i, v in zip(node.input, inputs, strict=True) if i):
                continue
            try:
                value = _evaluate(node, inputs)
            except Exception:  # noqa: BLE001 - anything odd just stays unfolded
                value = None
            # integers of shape arithmetic (and float scalars on the way, e.g. sqrt(num_patches))
            small = value is not None and value.size <= _SMALL_CONST
            if small and (value.dtype.kind in "iub" or (value.dtype.kind == "f" and value.size == 1)):
                self.folded[node.output[0]] = value
                new = True
        return new

    def _infer_shapes(self) -> None:
        for name, proto in self._const_proto.items():
            self.shapes[name] = tuple(int(d) for d in proto.dims)
        for name, src in self.alias.items():
            self.shapes[name] = self.shapes[src]
        for name, value in self.folded.items():
            self.shapes[name] = tuple(value.shape)
        for name, dims in self._inferred(self._light_model(self.folded, spatial=1)).items():
            self.shapes.setdefault(name, dims)

    def _light_model(self, folded: dict[str, np.ndarray], spatial: int) -> onnx.ModelProto:
        """A weight-free copy for shape inference: large initializers become inputs, *folded*
        values initializers, symbolic / ``-1`` input dims concrete (free spatial dims of 4-D
        inputs at *spatial*, the others at 1)."""
        light = onnx.ModelProto()
        light.ir_version = self.model.ir_version
        light.opset_import.extend(self.model.opset_import)
        light.graph.name = self.graph.name or "g"
        # small aliases of constants become initializers themselves: data propagation does not
        # pass through Identity at old opsets (a Paddle opset-7 Reshape target read via Identity)
        aliases: dict[str, onnx.TensorProto] = {}
        for name, src in self.alias.items():
            proto = self._const_proto.get(src)
            if name in folded or proto is None or proto.data_location == onnx.TensorProto.EXTERNAL:
                continue
            if (int(np.prod(proto.dims)) if proto.dims else 1) <= _SMALL_CONST:
                aliases[name] = onnx.TensorProto()
                aliases[name].CopyFrom(proto)
                aliases[name].name = name
        light.graph.node.extend(
            n for n in self.nodes if not (n.output and (n.output[0] in folded or n.output[0] in aliases))
        )
        for name, value in folded.items():
            light.graph.initializer.append(numpy_helper.from_array(value, name))
        light.graph.initializer.extend(aliases.values())
        for vo in self.graph.output:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(vo)
            for dim in copy.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.Clear()  # a Paddle export's -1: unknown, not a size
            light.graph.output.append(copy)
        for vi in self.graph.input:
            if vi.name in self.initializers:
                continue
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(vi)
            dims = copy.type.tensor_type.shape.dim
            for ax, dim in enumerate(dims):
                if not dim.HasField("dim_value") or dim.dim_value <= 0:  # symbolic, or -1 (Paddle)
                    dim.Clear()
                    dim.dim_value = spatial if len(dims) == 4 and ax >= 2 else 1
            light.graph.input.append(copy)
        for name, proto in self.initializers.items():
            size = int(np.prod(proto.dims)) if proto.dims else 1
            if size <= _SMALL_CONST and proto.data_location != onnx.TensorProto.EXTERNAL:
                light.graph.initializer.append(proto)
            else:
                light.graph.input.append(
                    onnx.helper.make_tensor_value_info(name, proto.data_type, list(proto.dims))
                )
        return light

    @staticmethod
    def _inferred(light: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
        """Static shapes ONNX shape inference finds in *light* (values with an unknown dim left out)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - inference errors must not crash the analysis
            logger.warning("shape inference failed (%s); groups touching unknown shapes are blocked", exc)
            inferred = light
        g = inferred.graph
        shapes: dict[str, tuple[int, ...]] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if vi.name in shapes or not tt.HasField("shape"):
                continue
            dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if all(d >= 0 for d in dims):
                shapes[vi.name] = tuple(dims)
        return shapes

    def _has_free_spatial_dims(self) -> bool:
        for vi in self.graph.input:
            dims = vi.type.tensor_type.shape.dim
            free = any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[2:])
            if vi.name not in self.initializers and len(dims) == 4 and free:
                return True
        return False

    def pooled(self, name: str) -> bool:
        """True when every spatial axis (2, 3, ...) of *name* has size 1 — pooled features, as
        a squeeze-excitation branch reads them — and stays 1 when the image input's free spatial
        size is :data:`SPATIAL_SIZE` instead of 1 (a [N,3,H,W] input is analysed at H = W = 1,
        where every feature map is 1x1)."""
        shape = self.shapes.get(name)
        if shape is None or len(shape) < 3 or any(s != 1 for s in shape[2:]):
            return False
        if self._probe is None:
            self._probe = (
                self._inferred(self._light_model({}, spatial=SPATIAL_SIZE))
                if self._has_free_spatial_dims()
                else {}
            )
        probe = self._probe.get(name)
        return probe is None or len(probe) != len(shape) or all(s == 1 for s in probe[2:])

    # ------------------------------------------------------------------ names
    def module_path(self, node_idx: int, tensor: str = "") -> str:
        """Best readable module path for a node (and the weight it uses), e.g. ``blocks.3.mlp.fc1``."""
        src = self.const_source(tensor) if tensor else ""
        for suffix in (".weight", ".bias", ".running_mean", ".running_var", ".gamma", ".beta"):
            if src.endswith(suffix) and "::" not in src:
                return src[: -len(suffix)]
        node = self.nodes[node_idx]
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    scopes = []
                scopes = [s for s in scopes[:-1] if s]
                if scopes:
                    return scopes[-1]
        name = node.name
        if name.startswith("/"):
            parts = [p for p in name.split("/") if p]
            path = ""
            for part in parts[:-1] if len(parts) > 1 else parts:
                # TorchScript scopes repeat the parent: /blocks/blocks.0/attn -> blocks.0.attn
                path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
            return path
        return name or self.node_names[node_idx]


_FOLDABLE = {
    "Identity",
    "Cast",
    "ConstantOfShape",
    "Mul",
    "Add",
    "Sub",
    "Div",
    "Equal",
    "Where",
    "Concat",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Shape",
    "Range",
    "Reshape",
    "Not",
    "Less",
    "Greater",
    "Max",
    "Min",
    "Pow",
    "Sqrt",
    "Floor",
    "Ceil",
}


def _attr_i(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _evaluate(node: onnx.NodeProto, x: list[np.ndarray | None]) -> np.ndarray | None:
    """numpy semantics of the few integer ops that shape arithmetic uses."""
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Identity":
        return x[0]
    if op == "Cast":
        return x[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "ConstantOfShape":
        fill = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        return np.full([int(v) for v in x[0]], fill.reshape(-1)[0], dtype=fill.dtype)
    binary = {
        "Mul": np.multiply,
        "Add": np.add,
        "Sub": np.subtract,
        "Equal": np.equal,
        "Less": np.less,
        "Greater": np.greater,
        "Max": np.maximum,
        "Min": np.minimum,
    }
    if op in binary:
        return binary[op](x[0], x[1])
    if op == "Div":
        return x[0] // x[1] if x[0].dtype.kind in "iu" else x[0] / x[1]
    if op == "Pow":
        return np.power(x[0], x[1])
    if op in ("Sqrt", "Floor", "Ceil"):
        return {"Sqrt": np.sqrt, "Floor": np.floor, "Ceil": np.ceil}[op](x[0])
    if op == "Not":
        return np.logical_not(x[0])
    if op == "Where":
        return np.where(x[0], x[1], x[2])
    if op == "Concat":
        return np.concatenate([v for v in x if v is not None], axis=attrs.get("axis", 0))
    if op == "Gather":
        return np.take(x[0], x[1], axis=attrs.get("axis", 0))
    if op == "Unsqueeze":
        axes = attrs.get("axes") if "axes" in attrs else [int(v) for v in x[1]]
        out = x[0]
        for a in sorted(a + out.ndim + 1 if a < 0 else a for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Squeeze":
        axes = (
            attrs.get("axes")
            if "axes" in attrs
            else ([int(v) for v in x[1]] if len(x) > 1 and x[1] is not None else None)
        )
        return np.squeeze(x[0], axis=tuple(axes) if axes is not None else None)
    if op == "Slice":
        if len(x) == 1:  # opset < 10: bounds are attributes
            starts, ends = attrs["starts"], attrs["ends"]
            axes = attrs.get("axes", range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts, ends = x[1], x[2]
            axes = x[3] if len(x) > 3 and x[3] is not None else range(len(starts))
            steps = x[4] if len(x) > 4 and x[4] is not None else [1] * len(starts)
        sl = [slice(None)] * x[0].ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            sl[int(a)] = slice(int(s), int(e), int(st))
        return x[0][tuple(sl)]
    if op == "Range":
        return np.arange(x[0], x[1], x[2])
    if op == "Reshape":
        return x[0].reshape([int(v) for v in x[1]])
    return None


def _constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
    return None
