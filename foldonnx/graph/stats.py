"""The one place where a model's size is counted: parameters, MACs and bytes.

Every command and pass reports these three numbers through :func:`model_stats`, so ``inspect``,
``fold``, ``compress``, ``sweep`` and ``eval`` agree on the same file.

* **parameters** — the numbers a model stores: every scalar of every constant tensor
  (initializers, sparse initializers and ``Constant`` nodes, in the main graph and in
  subgraphs), each tensor counted once however many nodes read it. Nothing is left out by
  type, so anyone can recount it from the file: the few integer shape constants of a graph
  count, as do the scales a quantizer adds (int8 weights count as the parameters they are).
  Only string tensors are not numbers.
* **MACs** — multiply-accumulates of ``MatMul``, ``Gemm``, ``Conv``, ``ConvTranspose`` and
  their quantized forms for one sample. Shapes come from ONNX shape inference with data
  propagation; a symbolic input dimension is taken as 1 and listed in ``ModelStats.assumed``
  (``{"pixel_values:0 (batch)": 1}``); shapes that stay unknown are read from one ONNX Runtime
  run on zeros, or given by ``reference`` (the model a rewrite started from). Nodes whose shapes
  stay unknown are counted in ``unknown_mac_nodes``, never guessed.
* **bytes** — the file's size on disk (``.onnx`` plus external data) when known, else the size
  of the weights as they would be serialized plus a small allowance per node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from foldonnx.onnx_file import model_byte_size

__all__ = ["ModelStats", "model_stats", "count_params", "count_macs", "mac_shapes", "MAC_OPS"]

logger = logging.getLogger(__name__)

_INDEX_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}
# op type -> (index of the activation input, index of the weight input)
_MATMUL_LIKE = {
    "MatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
    "FusedMatMul": (0, 1),
    "DynamicQuantizeMatMul": (0, 1),
    "MatMulIntegerToFloat": (0, 1),
}
_CONV_LIKE = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
MAC_OPS = frozenset({*_MATMUL_LIKE, *_CONV_LIKE, "Gemm", "ConvTranspose"})


@dataclass
class ModelStats:
    """Size of a model: parameters, MACs for one sample, bytes."""

    params: int
    macs: int
    bytes: int
    unknown_mac_nodes: int = 0
    #: symbolic input dims and the size the MAC count took for them
    assumed: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelStats:
        d = dict(d)
        d.setdefault("assumed", {})
        return cls(**{k: d[k] for k in ("params", "macs", "bytes", "unknown_mac_nodes", "assumed") if k in d})


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def _numel(dims: Any) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64)) if len(dims) else 1


def count_params(model: onnx.ModelProto) -> int:
    """Parameters of *model*: scalars of its constant tensors, each once (see module docstring)."""
    seen: set[str] = set()
    total = 0

    def add(name: str, data_type: int, n: int) -> None:
        nonlocal total
        if name not in seen and data_type != onnx.TensorProto.STRING:
            seen.add(name)
            total += n

    for g in _graphs(model.graph):
        for t in g.initializer:
            add(t.name, t.data_type, _numel(t.dims))
        for st in g.sparse_initializer:
            add(st.values.name, st.values.data_type, _numel(st.values.dims))
        for node in g.node:
            if node.op_type != "Constant" or not node.output:
                continue
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    add(node.output[0], a.t.data_type, _numel(a.t.dims))
                elif a.name in ("value_float", "value_int"):
                    add(node.output[0], onnx.TensorProto.FLOAT, 1)
                elif a.name in ("value_floats", "value_ints"):
                    add(node.output[0], onnx.TensorProto.FLOAT, len(a.floats) or len(a.ints))
    return total


def _partial_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Dims with None for symbolic ones, or None when the shape is unknown."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def assumed_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Symbolic (or unknown) input dims, each taken as 1 by the MAC count."""
    out: dict[str, int] = {}
    for inp in _graph_inputs(model):
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                sym = d.dim_param or "?"
                out[f"{inp.name}:{axis} ({sym})"] = 1
    return out


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without floating-point weight data (integer constants kept for data_prop);
    symbolic input dims set to 1."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = m.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.data_type in _INDEX_TYPES:
            g.initializer.append(t)
        else:
            g.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
    for inp in g.input:
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                d.Clear()
                d.dim_value = 1
    return m


def _shape_table(
    model: onnx.ModelProto, reference: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """Concrete shapes of every value shape inference resolves on a weight-free copy (cheap for
    big models). Symbolic dims are filled from *reference* (shapes of the same values in a model
    that differs only in widths, e.g. the model before a rewrite) when its rank matches."""
    skeleton = _skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference raises assorted types
        logger.debug("shape inference failed (%s); MACs from ONNX Runtime shapes", exc)
        inferred = skeleton
    table: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _partial_dims(vi)
        if dims is None:
            continue
        if None in dims and reference is not None and len(reference.get(vi.name, ())) == len(dims):
            dims = [r if d is None else d for d, r in zip(dims, reference[vi.name], strict=False)]
        if None not in dims:
            table[vi.name] = dims  # type: ignore[assignment]
    for t in model.graph.initializer:
        table[t.name] = [int(d) for d in t.dims]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    table[node.output[0]] = [int(d) for d in a.t.dims]
    return table


def _probe_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Shapes of *names* from one ONNX Runtime run on zeros (symbolic input dims = 1); the float
    weights are fed as zero inputs, not copied (see :mod:`foldonnx.graph.verify`)."""
    from foldonnx.graph.verify import shape_model, zero_feeds

    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    skel, weights = shape_model(model)
    known = {o.name for o in skel.graph.output}
    for name in names:
        if name not in known:
            skel.graph.output.add().name = name
    del skel.graph.value_info[:]
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(skel.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(names, {**zero_feeds(model), **weights})
    except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("shape probe in ONNX Runtime failed (%s): MACs may be partial", first)
        return {}
    return {n: [int(d) for d in o.shape] for n, o in zip(names, outs, strict=True)}


def _mac_tensors(model: onnx.ModelProto) -> list[str]:
    return [
        name
        for node in model.graph.node
        if node.op_type in MAC_OPS
        for name in (node.output[0], *node.input)
        if name
    ]


def mac_shapes(model: onnx.ModelProto, probe: bool = True) -> dict[str, list[int]]:
    """Concrete shapes of the inputs/outputs of MAC nodes (pass them as ``reference`` when
    counting a rewrite of this model, so its symbolic dims need no ONNX Runtime run)."""
    shapes = _shape_table(model)
    missing = sorted({n for n in _mac_tensors(model) if n not in shapes})
    if probe and missing:
        shapes.update(_probe_shapes(model, missing))
    return shapes


def count_macs(
    model: onnx.ModelProto, *, probe: bool = True, reference: dict[str, list[int]] | None = None
) -> tuple[int, int]:
    """``(MACs for one sample, MAC nodes whose shapes stayed unknown)``."""
    shapes = _shape_table(model, reference)
    if probe:
        missing = sorted({n for n in _mac_tensors(model) if n not in shapes})
        if missing:
            shapes.update(_probe_shapes(model, missing))
    total, unknown = 0, 0
    for node in model.graph.node:
        op = node.op_type
        if op not in MAC_OPS:
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            unknown += 1
        else:
            total += macs
    return total, unknown


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    op = node.op_type
    out = shapes.get(node.output[0])
    if out is None:
        return None
    out_n = _numel(out)
    if op == "ConvTranspose":  # every input element meets Cout/group x kernel weights
        x = shapes.get(node.input[0])
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if not x or not w or len(w) < 3:
            return None
        return _numel(x) * _numel(w[1:])
    if op == "Gemm":
        a = shapes.get(node.input[0])
        if a is None or len(a) != 2:
            return None
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        return out_n * (a[0] if trans_a else a[1])
    if op in _MATMUL_LIKE:
        ai, _ = _MATMUL_LIKE[op]
        a = shapes.get(node.input[ai])
        if not a:
            return None
        return out_n * a[-1]
    _, wi = _CONV_LIKE[op]
    w = shapes.get(node.input[wi]) if len(node.input) > wi else None
    if not w or len(w) < 3:
        return None
    return out_n * _numel(w[1:])


def model_stats(
    model: onnx.ModelProto,
    file_size: int | None = None,
    *,
    reference: dict[str, list[int]] | None = None,
    probe: bool = True,
) -> ModelStats:
    """Parameters, MACs and bytes of *model* (``file_size``: its size on disk, when known)."""
    macs, unknown = count_macs(model, reference=reference, probe=probe)
    return ModelStats(
        params=count_params(model),
        macs=macs,
        bytes=int(file_size) if file_size is not None else model_byte_size(model),
        unknown_mac_nodes=unknown,
        assumed=assumed_dims(model),
    )
