"""Channel-group analysis: find every coupled channel group in an ONNX graph.

:func:`find_channel_groups` is a pure analysis (it never mutates the model). It propagates channel
axes through the graph with one handler per op type (:mod:`.handlers`), ties them in a union-find
over tensor axes with explicit split / merge relations (:mod:`.dims`), and turns each class of axes
that carries weights into a :class:`~foldonnx.analysis.channel_groups.ChannelGroup` with every
member slice, size constant and normalisation involved — or the reason it cannot be folded.
"""

from __future__ import annotations

import logging
import math
import time

import onnx

from foldonnx.analysis.build import build_groups
from foldonnx.analysis.channel_groups import ChannelGroup, GroupKind
from foldonnx.analysis.graph_view import GraphView
from foldonnx.analysis.handlers import HANDLERS, AnalysisState, register_handler, run_handler
from foldonnx.errors import AnalysisError
from foldonnx.graph.stats import count_params

__all__ = [
    "find_channel_groups",
    "register_handler",
    "HANDLERS",
    "summarize_groups",
]

logger = logging.getLogger(__name__)


def find_channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """All channel groups of ``model`` (foldable or blocked with a reason), in graph order."""
    if not isinstance(model, onnx.ModelProto):
        raise AnalysisError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    t0 = time.perf_counter()
    view = GraphView(model)
    state = AnalysisState(view)
    t1 = time.perf_counter()
    for idx in range(len(view.nodes)):
        run_handler(state, idx)
    state.solver.solve()
    groups = build_groups(state)
    logger.info(
        "found %d channel groups (%d foldable) in %d nodes: shapes %.2fs, analysis %.2fs",
        len(groups),
        sum(g.foldable for g in groups),
        len(view.nodes),
        t1 - t0,
        time.perf_counter() - t1,
    )
    return groups


def summarize_groups(groups: list[ChannelGroup], model: onnx.ModelProto) -> dict[str, object]:
    """Totals for reports.

    Groups overlap (a fc1 weight is a producer of its MLP group and a consumer of the residual
    stream), so per-kind ``params`` add up to more than the model; ``foldable_share`` counts every
    parameter once: the scalars of all tensors touched by at least one foldable group.
    """
    sizes: dict[str, int] = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:  # weights stored as Constant nodes (Paddle exports)
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    sizes[node.output[0]] = math.prod(a.t.dims)
    total = count_params(model)
    by_kind: dict[str, dict[str, int]] = {}
    touched: set[str] = set()
    touched_nores: set[str] = set()
    for g in groups:
        row = by_kind.setdefault(
            g.kind.value, dict.fromkeys(("groups", "foldable", "params", "foldable_params"), 0)
        )
        row["groups"] += 1
        row["params"] += g.params
        if g.foldable:
            row["foldable"] += 1
            row["foldable_params"] += g.params
            touched.update(m.tensor for m in g.members)
            if g.kind != GroupKind.RESIDUAL:
                touched_nores.update(m.tensor for m in g.members)
    foldable = sum(sizes.get(t, 0) for t in touched)
    return {
        "groups": len(groups),
        "foldable_groups": sum(g.foldable for g in groups),
        "total_params": total,
        "params_in_foldable_groups": foldable,
        "foldable_share": foldable / total if total else 0.0,
        # the same without the residual stream (which touches nearly every weight of a ViT)
        "foldable_share_without_residual": (
            sum(sizes.get(t, 0) for t in touched_nores) / total if total else 0.0
        ),
        "by_kind": {k: by_kind[k] for k in [k.value for k in GroupKind] if k in by_kind},
    }
