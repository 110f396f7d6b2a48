"""Checks every rewrite must pass: onnx.checker, same I/O names, ONNX Runtime runs it, same
output shapes as the model it was made from.

The checks never serialize the whole model at once nor copy its weights into ONNX Runtime:
shapes never depend on the *values* of float weights, so every large float initializer is fed
as a zero-filled graph input (untouched zero pages cost no memory), and onnx.checker runs on
the weightless skeleton plus each replaced weight on its own. This keeps verifying a 2.5 GB
SAM ViT-H encoder within the fold's memory budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from foldonnx.errors import PassError

__all__ = [
    "VerifyReference",
    "verify_reference",
    "verify_model",
    "zero_feeds",
    "output_shapes",
    "shape_model",
]

logger = logging.getLogger(__name__)


def zero_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        feeds[inp.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


# Float initializers with at least this many scalars are fed as zero-filled inputs to the ORT
# shape checks instead of being copied into ORT (see shape_model).
_ZERO_WEIGHT_MIN = 1024
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def shape_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model for the ORT shape checks, without a copy of its weights.

    Output shapes never depend on the *values* of float weights, so every large float
    initializer becomes a graph input fed with ``np.zeros`` (untouched zero pages: no memory
    until written, and ORT only reads them). Integer constants (Reshape targets, split sizes,
    indices) and small float constants stay initializers. The model itself is not touched;
    the skeleton copies the nodes and the small initializers only. Returns (skeleton, weight
    feeds)."""
    g = model.graph
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    sg = skel.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.sparse_initializer.extend(g.sparse_initializer)
    declared = {i.name for i in g.input}
    weights: dict[str, np.ndarray] = {}
    for t in g.initializer:
        dims = [int(d) for d in t.dims]
        if t.data_type in _FLOAT_TYPES and int(np.prod(dims, dtype=np.int64)) >= _ZERO_WEIGHT_MIN:
            weights[t.name] = np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            if t.name not in declared:
                sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, dims))
        else:
            sg.initializer.append(t)
    return skel, weights


@dataclass
class VerifyReference:
    """What a rewritten model must keep: IO names, and the output shapes ORT gives on zeros."""

    inputs: list[str]
    outputs: list[str]
    feeds: dict[str, np.ndarray]
    shapes: list[tuple[int, ...]] | None


def output_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """Output shapes ORT gives on *feeds* (the weights fed as zeros, see :func:`shape_model`)."""
    import onnxruntime as ort

    skel, weights = shape_model(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(skel.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [tuple(o.shape) for o in sess.run(None, {**feeds, **weights})]


def verify_reference(model: onnx.ModelProto) -> VerifyReference:
    """Record the IO names and ORT output shapes of *model* (before folding it)."""
    feeds = zero_feeds(model)
    shapes = None
    try:
        shapes = output_shapes(model, feeds)
    except Exception as exc:  # noqa: BLE001
        logger.warning("the input model does not run in ONNX Runtime (%s); shapes not checked", exc)
    return VerifyReference(
        inputs=[i.name for i in model.graph.input],
        outputs=[o.name for o in model.graph.output],
        feeds=feeds,
        shapes=shapes,
    )


def _check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on the weightless skeleton (nodes, types, opsets) plus every replaced
    weight's data size checked on its own: never the whole model serialized at once."""
    skel, weights = shape_model(model)
    onnx.checker.check_model(skel)
    by_name = {t.name: t for t in model.graph.initializer if t.name in weights}
    for name in weights:
        onnx.checker.check_tensor(by_name[name])


def verify_model(reference: onnx.ModelProto | VerifyReference, candidate: onnx.ModelProto) -> None:
    """onnx.checker, same IO names, ORT loads and runs, same output shapes as the original."""
    if isinstance(reference, onnx.ModelProto):
        reference = verify_reference(reference)
    try:
        _check_model(candidate)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise PassError(f"rewritten model fails onnx.checker: {first}") from None
    if reference.inputs != [i.name for i in candidate.graph.input] or reference.outputs != [
        o.name for o in candidate.graph.output
    ]:
        raise PassError("rewritten model changed input/output names")
    if reference.shapes is None:
        logger.info("skipping the ORT check (the input model did not run)")
        return
    try:
        shapes = output_shapes(candidate, reference.feeds)
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"rewritten model does not run in ONNX Runtime: {str(exc).splitlines()[0]}") from None
    if shapes != reference.shapes:
        raise PassError(f"output shapes changed: {reference.shapes} -> {shapes}")
