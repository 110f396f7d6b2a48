"""Report types shared by passes: model size statistics (parameters, MACs, bytes).

:func:`model_stats` counts

* parameters: scalars of floating-point initializers and floating-point ``Constant`` tensors
  (integer shape constants are not parameters);
* MACs of ``MatMul``, ``Gemm``, ``Conv`` and ``ConvTranspose`` for one sample, from shapes
  given by ONNX shape inference with data propagation (symbolic dims count as 1; nodes whose
  shapes stay unknown are counted in ``unknown_mac_nodes``, not guessed);
* bytes: the serialized size of the weights plus a small per-node allowance.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from foldonnx.onnx_file import model_byte_size

__all__ = ["ModelStats", "model_stats", "count_params", "count_macs", "mac_shapes"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass
class ModelStats:
    """Size of a model."""

    params: int
    macs: int
    bytes: int
    unknown_mac_nodes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelStats:
        return cls(**d)


def count_params(model: onnx.ModelProto) -> int:
    """Scalars in floating-point initializers and Constant tensors of the main graph."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in _FLOAT_TYPES:
            total += int(np.prod(t.dims, dtype=np.int64))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT_TYPES:
                    total += int(np.prod(a.t.dims, dtype=np.int64))
    return total


def _partial_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Dims with None for symbolic ones, or None when the shape is unknown."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _probe_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Run ONNX Runtime once on zeros (symbolic input dims = 1) and read the shapes of *names*."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for name in names:
        if name not in known:
            m.graph.output.add().name = name
    del m.graph.value_info[:]
    feeds = {}
    for inp in m.graph.input:
        if any(t.name == inp.name for t in m.graph.initializer):
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        feeds[inp.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
        logger.warning("shape probe with ONNX Runtime failed: %s", exc)
        return {}
    return {n: list(o.shape) for n, o in zip(names, outs, strict=False)}


def _shape_table(
    model: onnx.ModelProto, reference: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """Shapes of every value, inferred on a weight-free copy (cheap for big models). Symbolic
    dims are filled from *reference* (shapes of the same values in a model that differs only in
    channel widths, e.g. the model before folding) when its rank matches."""
    skeleton = _skeleton(model)
    for inp in skeleton.graph.input:  # symbolic input dims (batch) count as 1
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference raises assorted types
        logger.warning("shape inference failed (%s); MACs will be partial", exc)
        inferred = skeleton
    table: dict[str, list[int]] = {}
    g = inferred.graph
    for inp in g.input:  # symbolic input dims (batch) count as 1
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _partial_dims(vi)
        if dims is None:
            continue
        if None in dims and reference is not None and len(reference.get(vi.name, ())) == len(dims):
            dims = [r if d is None else d for d, r in zip(dims, reference[vi.name], strict=False)]
        if None not in dims:
            table[vi.name] = dims
    for t in model.graph.initializer:
        table[t.name] = list(t.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    table[node.output[0]] = list(a.t.dims)
    return table


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without floating-point weight data (integer constants kept for data_prop)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = m.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.data_type in _FLOAT_TYPES:
            g.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
        else:
            g.initializer.append(t)
    return m


_MAC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def count_macs(
    model: onnx.ModelProto, *, probe: bool = True, reference: dict[str, list[int]] | None = None
) -> tuple[int, int]:
    """(MACs for one sample, number of MatMul/Gemm/Conv nodes whose shapes stayed unknown).

    Shapes come from ONNX shape inference; where it leaves a dim symbolic (run-time computed
    token counts), ``probe=True`` runs ONNX Runtime once on zeros to read the real shapes;
    ``reference`` (see :func:`mac_shapes`) fills symbolic dims without running anything.
    """
    shapes = _shape_table(model, reference)
    if probe and model.ByteSize() < 2**31 - 2**26:
        missing = sorted(
            {
                name
                for node in model.graph.node
                if node.op_type in _MAC_OPS
                for name in (node.output[0], node.input[0])
                if name not in shapes
            }
        )
        if missing:
            shapes.update(_probe_shapes(model, missing))
    total, unknown = 0, 0
    for node in model.graph.node:
        op = node.op_type
        if op not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            continue
        out = shapes.get(node.output[0])
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or (op != "MatMul" and b is None) or (op != "Conv" and a is None):
            unknown += 1
            continue
        out_n = int(np.prod(out, dtype=np.int64))
        if op == "MatMul":
            k = a[-1] if a else 1
            total += out_n * k
        elif op == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            total += out_n * k
        elif op == "Conv":
            # weight [Cout, Cin/group, k...]: every output scalar costs Cin/group·prod(k)
            total += out_n * int(np.prod(b[1:], dtype=np.int64))
        else:  # ConvTranspose weight [Cin, Cout/group, k...]
            inp = a or []
            in_n = int(np.prod(inp, dtype=np.int64)) if inp else 0
            total += in_n * int(np.prod(b[1:], dtype=np.int64))
    return total, unknown


def mac_shapes(model: onnx.ModelProto, probe: bool = True) -> dict[str, list[int]]:
    """Concrete shapes of the inputs/outputs of MAC nodes (to pass as ``reference``)."""
    shapes = _shape_table(model)
    missing = sorted(
        {
            name
            for node in model.graph.node
            if node.op_type in _MAC_OPS
            for name in (node.output[0], node.input[0])
            if name not in shapes
        }
    )
    if probe and missing and model.ByteSize() < 2**31 - 2**26:
        shapes.update(_probe_shapes(model, missing))
    return shapes


def model_stats(
    model: onnx.ModelProto,
    file_size: int | None = None,
    *,
    reference: dict[str, list[int]] | None = None,
    probe: bool = True,
) -> ModelStats:
    macs, unknown = count_macs(model, reference=reference, probe=probe)
    return ModelStats(
        params=count_params(model),
        macs=macs,
        bytes=int(file_size) if file_size is not None else model_byte_size(model),
        unknown_mac_nodes=unknown,
    )
