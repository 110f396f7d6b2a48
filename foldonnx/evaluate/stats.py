"""Size statistics of a model: parameter count and multiply-accumulates (MACs), from shapes.

Pure functions of a ``ModelProto``. MACs count the heavy ops only -- MatMul, Gemm, Conv, ConvTranspose and
their quantized forms (MatMulInteger, QLinearMatMul, ConvInteger, QLinearConv) -- for batch 1 (every
symbolic dimension is taken as 1), with shapes from ONNX shape inference with data propagation
(which resolves the Shape/Gather/Concat reshapes exporters emit) and, for the tensors it leaves
unknown, one ONNX Runtime run on zeros. Nodes whose shapes stay unknown are counted in
``unknown_nodes`` rather than guessed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import onnx

__all__ = ["ModelStats", "count_params", "count_macs", "model_stats"]

logger = logging.getLogger(__name__)

# op type -> (index of the activation input, index of the weight input)
_MATMUL_LIKE = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "FusedMatMul": (0, 1)}
_CONV_LIKE = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_QUANT_PARAM_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclass
class ModelStats:
    """Parameters, MACs (batch 1) and nodes whose MACs could not be counted."""

    params: int
    macs: int
    unknown_nodes: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all initializers (and Constant-node tensors) with at least 2 elements: weights
    and biases count, scalars (quantization scales/zero points, reshape constants) barely do;
    integer shape tensors (int64) are excluded."""
    total = 0
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [
                a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR
            ]
    for t in tensors:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL):
            continue
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if n >= 2:
            total += n
    return total


def _concrete(vi: onnx.ValueInfoProto) -> list[int] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    return None if any(d is None for d in dims) else dims  # type: ignore[return-value]


def _batch1_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose symbolic input dimensions are fixed to 1 and whose stale value_info is gone."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for inp in m.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    return m


def _ort_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Shapes of *names* from one ONNX Runtime run on zeros (when shape inference cannot tell)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.add().name = n
    init_names = {i.name for i in m.graph.initializer}
    feeds = {}
    for inp in m.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        feeds[inp.name] = np.zeros(
            [d.dim_value or 1 for d in tt.shape.dim], onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        )
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
        logger.warning("shape probe in ONNX Runtime failed (%s): MACs will be partial", exc)
        return {}
    return {n: list(o.shape) for n, o in zip(names, outs, strict=True)}


def _shapes(model: onnx.ModelProto, needed: list[str]) -> dict[str, list[int]]:
    """Concrete shapes at batch 1: shape inference with data propagation, then one ONNX Runtime
    run for the *needed* tensors it could not resolve."""
    m = _batch1_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - fall back to what the file declares
        logger.debug("shape inference failed: %s", exc)
        inferred = m
    shapes: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        dims = _concrete(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    missing = [n for n in dict.fromkeys(needed) if n and n not in shapes]
    if missing:
        shapes.update(_ort_shapes(m, missing))
    return shapes


def count_macs(model: onnx.ModelProto) -> tuple[int, int]:
    """``(macs, unknown_nodes)`` of the MatMul/Gemm/Conv family at batch 1."""
    ops = set(_MATMUL_LIKE) | set(_CONV_LIKE) | {"Gemm", "ConvTranspose"}
    needed = [t for n in model.graph.node if n.op_type in ops for t in (*n.input, n.output[0])]
    shapes = _shapes(model, needed)
    macs = 0
    unknown = 0
    for node in model.graph.node:
        op = node.op_type
        if op not in ops:
            continue
        out = shapes.get(node.output[0])
        if out is None:
            unknown += 1
            continue
        out_elems = int(np.prod(out)) if out else 1
        if op == "ConvTranspose":  # every input element meets Cout/group × kernel weights
            x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not x or not w or len(w) < 3:
                unknown += 1
                continue
            macs += int(np.prod(x)) * int(np.prod(w[1:]))
        elif op == "Gemm":
            a = shapes.get(node.input[0])
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            if a is None or len(a) != 2:
                unknown += 1
                continue
            macs += out_elems * (a[0] if trans_a else a[1])
        elif op in _MATMUL_LIKE:
            ai, _ = _MATMUL_LIKE[op]
            a = shapes.get(node.input[ai])
            if not a:
                unknown += 1
                continue
            macs += out_elems * a[-1]
        else:
            _, wi = _CONV_LIKE[op]
            w = shapes.get(node.input[wi]) if len(node.input) > wi else None
            if not w or len(w) < 3:
                unknown += 1
                continue
            macs += out_elems * int(np.prod(w[1:]))
    return macs, unknown


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Parameters and MACs of *model* (see module docstring)."""
    macs, unknown = count_macs(model)
    return ModelStats(params=count_params(model), macs=macs, unknown_nodes=unknown)
