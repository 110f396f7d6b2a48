"""``--repair data``: REPAIR-style statistics matching (and a least-squares consumer refit)
on calibration images, through ONNX Runtime.

1. Statistics matching (REPAIR, Jordan et al. 2022, adapted to merged channels) — applied to
   conv/BN groups; for MLP groups only with ``match_mlp_stats=True`` (on DINOv2-S it wrecked
   the CLS token: its hidden units carry "massive activations" on a few tokens, and matching
   the std over all tokens inflates the merged units everywhere else). For every
   folded group whose producer output can be tapped (MLP: the fc1 bias ``Add``; conv: the
   BN output, or the conv output when it has a bias) we measure, on the calibration set, the
   per-channel mean/std of the original model's channels and of the folded model's merged
   channels. Merged channel ``c`` should look like its members: target ``μ*_c = mean μᵢ``,
   ``σ*_c = mean σᵢ`` over ``i ∈ c``. The producer is rescaled ``y ← a·y + t`` with
   ``a = σ*/σ'``, ``t = μ* − a·μ'`` (weights and bias, or BN γ/β).
2. Consumer refit (``refit="ridge"``, the default of ``repair="data"``; CLI ``--refit``) of
   the MatMul reading each folded MLP / heads group (fc2, attention out-proj), *sequentially*
   in graph order on the folded model's own activations (:func:`refit_consumers`): for each
   consumer, ``H'`` is the folded model's hidden input (after the refits before it) and the
   target is what makes the block's residual output equal the original's,
   ``Y + (skip − skip')/s`` (``Y`` the original consumer output, ``skip`` the residual input,
   ``s`` the layer scale) — so the error accumulated so far is corrected too. The fit is
   ridge-regularised toward the merged weights, with an intercept absorbed by the bias:
   ``W = argmin ‖H'_c·W − T_c‖² + λ‖W − W_merged‖²`` on centred rows; λ (and "no change",
   and the bias-only correction ``δ = mean T − mean H'·W_merged``) is chosen per consumer on a
   held-out quarter of the calibration images, then refit on all of them. Rows are token 0
   (the CLS token; weighted as much as the other tokens together) and 64 random tokens per
   image. Between consumers only the next block is run (the residual stream is cached), so
   the whole refit costs about one forward pass of each model over the calibration set.
   On DINOv2-S (20 % params removed, ``mlp,heads``, 64 augmented calibration images,
   ``calibration.py``) the CLS cosine on imagenet20 went 0.70 → 0.83; ``benchmarks/fidelity.md``
   has the table. ``refit="bias"`` alone hurt the CLS token (0.70 → 0.63); the earlier
   whole-model refit on 20 photos with the original model's inputs hurt as well.

Groups that cannot be tapped (heads, residual, producers at an offset in a fused tensor) get
no statistics matching; a note says so except for heads, whose repair is the consumer refit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from foldonnx.analysis.channel_groups import GroupKind, Role
from foldonnx.errors import DataError, PassError
from foldonnx.graph.tensors import ModelTensors
from foldonnx.passes.fold.plan import GroupPlan

__all__ = [
    "repair_with_data",
    "calibration_inputs",
    "Tap",
    "Consumer",
    "LsqStats",
    "find_consumer",
    "refit_consumers",
    "choose_refit",
    "ridge_refit",
    "bias_correction",
    "lsq_error",
    "REFIT_MODES",
]

logger = logging.getLogger(__name__)


@dataclass
class Tap:
    """Where a group's producer output is measured and how to rescale it."""

    gid: int
    value: str  # tensor name of the producer output (same in original and folded model)
    axis: int  # channel axis of that tensor (-1 for MatMul outputs, 1 for NCHW)
    scale: list[tuple[str, int]]  # (tensor in folded model, axis) multiplied by a
    shift: tuple[str, int] | None  # (bias tensor, axis) that takes a·b + t
    consumer: tuple[str, str, str] | None = None  # (fc2 weight, its node input value, node output)


def calibration_inputs(
    model: onnx.ModelProto, calib: Any, limit: int, preprocess: Callable | None = None
) -> dict[str, np.ndarray]:
    """Calibration data as model feeds: a SOURCE string, ImageSet, TensorSet or array."""
    from foldonnx.data.sources import ImageSet, Preprocess, TensorSet, load_source

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise DataError(f"data repair needs a model with one image input, this one has {len(inputs)}")
    inp = inputs[0]
    if isinstance(calib, str):
        from foldonnx.data.calibration import (
            augmented_images,
            parse_augmented,
            parse_synthetic,
            synthetic_images,
        )

        dims = inp.type.tensor_type.shape.dim
        size = dims[-1].dim_value if len(dims) == 4 and dims[-1].dim_value else 224
        if (count := parse_augmented(calib)) is not None:
            calib = augmented_images(count, size=size)
        elif (count := parse_synthetic(calib)) is not None:
            calib = synthetic_images(count, size=size)
        else:
            calib = load_source(calib, limit=limit)
    if isinstance(calib, ImageSet):
        dims = inp.type.tensor_type.shape.dim
        size = dims[-1].dim_value if len(dims) == 4 and dims[-1].dim_value else 224
        x = (preprocess or Preprocess(size=size))(calib.subset(slice(0, limit)))
    elif isinstance(calib, TensorSet):
        arr = calib.arrays.get(inp.name, calib.arrays.get("", next(iter(calib.arrays.values()))))
        x = arr[:limit]
    else:
        x = np.asarray(calib)[:limit]
    if len(x) == 0:
        raise DataError("calibration data is empty")
    return {inp.name: np.ascontiguousarray(x, dtype=np.float32)}


def _find_taps(tensors: ModelTensors, plan: GroupPlan) -> Tap | str:
    """The tap of a group, or the reason there is none."""
    g = plan.group
    if g.kind not in (GroupKind.MLP, GroupKind.CONV, GroupKind.DEPTHWISE, GroupKind.SE):
        return f"{g.kind.value} groups: consumer refit only"
    prods = [m for m in g.members if m.role == Role.PRODUCER and m.offset == 0 and m.unit_stride is None]
    if not prods:
        return "needs a producer at offset 0"
    # several producers in a chain (expand conv -> depthwise conv): the last one in graph order
    # writes what the consumer reads
    order = {n.name: i for i, n in enumerate(tensors.graph.node)}
    p = max(prods, key=lambda m: order.get(m.node, -1))
    pnode = tensors.node(p.node)
    if pnode is None:
        return "producer node not found"
    w = tensors.current(p.tensor, p.node)
    members_by_tensor = {tensors.current(m.tensor, m.node): m for m in g.members}
    consumer = None
    cons = [m for m in g.members if m.role == Role.CONSUMER]
    if g.kind == GroupKind.MLP and len(cons) == 1 and cons[0].axis == 0:
        cnode = tensors.node(cons[0].node)
        if cnode is not None and cnode.op_type == "MatMul":
            consumer = (tensors.current(cons[0].tensor, cons[0].node), cnode.input[0], cnode.output[0])
    out = pnode.output[0]
    users = tensors.users(out)
    if pnode.op_type == "MatMul":
        if len(users) == 1 and users[0].op_type == "Add":
            other = [x for x in users[0].input if x != out]
            if other and other[0] in members_by_tensor:
                return Tap(g.id, users[0].output[0], -1, [(w, 1)], (other[0], 0), consumer)
        return "fc1 output has no bias Add in the group"
    if pnode.op_type == "Conv":
        if len(users) == 1 and users[0].op_type == "BatchNormalization":
            bn = users[0]
            return Tap(g.id, bn.output[0], 1, [(bn.input[1], 0)], (bn.input[2], 0))
        if len(pnode.input) > 2 and pnode.input[2]:
            return Tap(g.id, out, 1, [(w, 0)], (pnode.input[2], 0))
        return "conv has neither BN nor bias to adjust"
    return f"producer op {pnode.op_type} not handled"


class _Stats:
    """Running per-channel mean / variance over all non-channel axes."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def add(self, x: np.ndarray, axis: int) -> None:
        x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
        if self.s1 is None:
            self.s1, self.s2 = x.sum(0), (x * x).sum(0)
        else:
            self.s1 += x.sum(0)
            self.s2 += (x * x).sum(0)
        self.n += x.shape[0]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.s1 / self.n
        return mu, np.sqrt(np.maximum(self.s2 / self.n - mu * mu, 1e-12))


def _session(model: onnx.ModelProto, extra: list[str]):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in extra:
        if name not in have:
            m.graph.output.add().name = name
            have.add(name)
    del m.graph.value_info[:]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise PassError(
            f"data repair: ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}"
        ) from None


def _static_batch(model: onnx.ModelProto) -> int | None:
    """The input's batch size when the graph fixes it (exported with batch 1, say)."""
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
            return None
    return None


def _batches(feeds: dict[str, np.ndarray], size: int):
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        yield {k: v[i : i + size] for k, v in feeds.items()}


def repair_with_data(
    original: onnx.ModelProto,
    tensors: ModelTensors,
    plans: list[GroupPlan],
    calib: Any,
    *,
    limit: int = 64,
    preprocess: Callable | None = None,
    batch: int = 8,
    refit: bool | str = False,
    match_mlp_stats: bool = False,
    notes: list[str] | None = None,
) -> dict[int, np.ndarray]:
    """Repair the folded model held by *tensors* in place; returns the scale factors per group."""
    feeds = calibration_inputs(original, calib, limit, preprocess)
    batch = _static_batch(original) or batch
    taps: list[tuple[Tap, GroupPlan]] = []
    for plan in plans:
        t = _find_taps(tensors, plan)
        if isinstance(t, str):
            if notes is not None and plan.group.kind != GroupKind.HEADS:  # heads: refit only, by design
                notes.append(f"group {plan.group.id}: no statistics matching ({t})")
            continue
        taps.append((t, plan))
    names = sorted({t.value for t, plan in taps if plan.group.kind != GroupKind.MLP or match_mlp_stats})
    orig_stats = {n: _Stats() for n in names}
    fold_stats = {n: _Stats() for n in names}
    axis_of = {t.value: t.axis for t, _ in taps}
    if names:
        s_orig = _session(original, names)
        s_fold = _session(tensors.model, names)
        for b in _batches(feeds, batch):
            for sess, stats in ((s_orig, orig_stats), (s_fold, fold_stats)):
                for name, val in zip(names, sess.run(names, b), strict=False):
                    stats[name].add(val, axis_of[name])
        del s_orig, s_fold
    factors: dict[int, np.ndarray] = {}
    for tap, plan in taps:
        if plan.group.kind == GroupKind.MLP and not match_mlp_stats:
            continue
        mu_o, sd_o = orig_stats[tap.value].mean_std()
        mu_f, sd_f = fold_stats[tap.value].mean_std()
        mu_t = plan.merge.mean(mu_o[:, None])[:, 0]  # cluster means over members
        sd_t = plan.merge.mean(sd_o[:, None])[:, 0]
        a = sd_t / np.maximum(sd_f, 1e-8)
        t = mu_t - a * mu_f
        for name, axis in tap.scale:
            arr = tensors.get(name)
            shape = [1] * arr.ndim
            shape[axis] = -1
            tensors.set(name, arr * a.reshape(shape).astype(arr.dtype))
        if tap.shift is not None:
            bname, _ = tap.shift
            b = tensors.get(bname).astype(np.float64)
            tensors.set(bname, a * b + t)
        factors[tap.gid] = a
    mode = {True: "ridge", False: "none"}.get(refit, refit) if isinstance(refit, bool) else refit
    if mode != "none":
        consumers = []
        for plan in plans:
            c = find_consumer(tensors, plan)
            if isinstance(c, str):
                if notes is not None and plan.group.kind in (GroupKind.MLP, GroupKind.HEADS):
                    notes.append(f"group {plan.group.id}: no consumer refit ({c})")
                continue
            consumers.append(c)
        refit_consumers(original, tensors, consumers, feeds, mode=mode, batch=batch, notes=notes)
    return factors


# ----------------------------------------------------------------------------------------
# Consumer refit: numerics (pure numpy)


class LsqStats:
    """Sufficient statistics of ``Y ≈ H·W + δ``: ``[H 1]ᵀ[H 1]``, ``[H 1]ᵀY``, ``ΣY²``."""

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.yy = 0.0

    def add(self, h: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add rows (optionally weighted: a weight counts as that many copies of the row)."""
        h = np.asarray(h, np.float64).reshape(-1, np.shape(h)[-1])
        y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
        ha = np.concatenate([h, np.ones((len(h), 1))], axis=1)
        if weights is not None:
            wt = np.asarray(weights, np.float64).reshape(-1, 1)
            g, c = (ha * wt).T @ ha, (ha * wt).T @ y
            self.yy += float((wt * y * y).sum())
        else:
            g, c = ha.T @ ha, ha.T @ y
            self.yy += float((y * y).sum())
        if self.gram is None:
            self.gram, self.cross = g, c
        else:
            self.gram += g
            self.cross += c

    def __iadd__(self, other: LsqStats) -> LsqStats:
        if other.gram is not None:
            if self.gram is None:
                self.gram, self.cross = other.gram.copy(), other.cross.copy()
            else:
                self.gram += other.gram
                self.cross += other.cross
        self.yy += other.yy
        return self

    @property
    def rows(self) -> float:
        """Number of rows (sum of weights)."""
        return 0.0 if self.gram is None else float(self.gram[-1, -1])


def lsq_error(stats: LsqStats, w: np.ndarray, delta: np.ndarray) -> float:
    """Mean squared error per row of ``H·W + δ`` against ``Y`` (from the statistics alone)."""
    wa = np.vstack([w, delta[None, :]]).astype(np.float64)
    sse = float(np.sum(wa * (stats.gram @ wa))) - 2.0 * float(np.sum(wa * stats.cross)) + stats.yy
    return max(sse, 0.0) / max(stats.rows, 1e-12)


def bias_correction(stats: LsqStats, w: np.ndarray) -> np.ndarray:
    """``δ = mean(Y) − mean(H)·W``: the output mean matched per channel, weights unchanged."""
    n = max(stats.gram[-1, -1], 1e-12)
    mu_h, mu_y = stats.gram[-1, :-1] / n, stats.cross[-1] / n
    return mu_y - mu_h @ np.asarray(w, np.float64)


def ridge_refit(stats: LsqStats, w0: np.ndarray, alphas: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per α: ``W = argmin ‖H_c·W − Y_c‖² + λ‖W − W₀‖²`` on centred rows, ``δ`` the intercept.

    ``λ = α · mean diag(H_cᵀH_c)`` (scale-free α). With λ > 0 the training error is never
    above the one of ``(W₀, bias_correction)``; α → ∞ gives exactly that.
    """
    n = max(stats.gram[-1, -1], 1e-12)
    mu_h, mu_y = stats.gram[-1, :-1] / n, stats.cross[-1] / n
    gc = stats.gram[:-1, :-1] - n * np.outer(mu_h, mu_h)
    cc = stats.cross[:-1] - n * np.outer(mu_h, mu_y)
    evals, evecs = np.linalg.eigh((gc + gc.T) / 2)
    evals = np.maximum(evals, 0.0)
    scale = float(np.mean(np.diag(gc))) + 1e-12
    w0 = np.asarray(w0, np.float64)
    out = []
    for a in alphas:
        lam = a * scale
        rhs = evecs.T @ (cc + lam * w0)
        w = evecs @ (rhs / (evals + lam)[:, None])
        out.append((w, mu_y - mu_h @ w))
    return out


#: ridge strengths tried (relative to the mean diagonal of the centred H'ᵀH'), chosen per
#: consumer on the held-out part of the calibration set
ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
REFIT_MODES = ("none", "bias", "ridge")


def choose_refit(
    train: LsqStats, val: LsqStats | None, w0: np.ndarray, mode: str, alphas: tuple[float, ...] = ALPHAS
) -> tuple[np.ndarray, np.ndarray, str, dict[str, float]]:
    """Pick the variant with the lowest held-out error (the merged weights are a candidate),
    then refit it on train+val. Returns ``(W, δ, label, held-out errors)``."""
    w0 = np.asarray(w0, np.float64)
    zero = np.zeros(w0.shape[1])
    full = LsqStats()
    full += train
    if val is not None:
        full += val
    judge = val if val is not None and val.rows else train
    cands: dict[str, tuple[np.ndarray, np.ndarray]] = {"none": (w0, zero)}
    if mode in ("bias", "ridge"):
        cands["bias"] = (w0, bias_correction(train, w0))
    if mode == "ridge":
        for a, (w, d) in zip(alphas, ridge_refit(train, w0, list(alphas)), strict=True):
            cands[f"ridge{a:g}"] = (w, d)
    errs = {k: lsq_error(judge, w, d) for k, (w, d) in cands.items()}
    best = min(errs, key=errs.__getitem__)
    if best == "none":
        return w0, zero, best, errs
    if best == "bias":
        return w0, bias_correction(full, w0), best, errs
    a = float(best[len("ridge") :])
    w, d = _ridge_solve(full, w0, a)
    return w, d, best, errs


def _ridge_solve(stats: LsqStats, w0: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One α of :func:`ridge_refit`, by a linear solve (no eigendecomposition)."""
    n = max(stats.gram[-1, -1], 1e-12)
    mu_h, mu_y = stats.gram[-1, :-1] / n, stats.cross[-1] / n
    gc = stats.gram[:-1, :-1] - n * np.outer(mu_h, mu_h)
    cc = stats.cross[:-1] - n * np.outer(mu_h, mu_y)
    lam = alpha * (float(np.mean(np.diag(gc))) + 1e-12)
    w = np.linalg.solve(gc + lam * np.eye(len(gc)), cc + lam * np.asarray(w0, np.float64))
    return w, mu_y - mu_h @ w


# ----------------------------------------------------------------------------------------
# Consumer refit: graph side


@dataclass
class Consumer:
    """The MatMul reading a folded group (fc2, attention out-proj) and what follows it."""

    gid: int
    weight: str  # MatMul weight in the folded model
    hidden: str  # its input value (H')
    output: str  # its output value (Y)
    bias: str | None  # initializer of the bias Add after it
    bias_node: str | None
    residual: str | None  # the residual Add that closes the block (a cut point), if found
    skip: str | None = None  # the other input of that residual Add
    scales: tuple[tuple[str, str], ...] = ()  # (op, constant) between the bias and the residual


def find_consumer(tensors: ModelTensors, plan: GroupPlan) -> Consumer | str:
    """The single MatMul consumer of an MLP / heads group, or why there is none."""
    g = plan.group
    if g.kind not in (GroupKind.MLP, GroupKind.HEADS):
        return f"{g.kind.value} groups have no refittable consumer"
    cons = [m for m in g.members if m.role == Role.CONSUMER]
    if len(cons) != 1 or cons[0].axis != 0:
        return "needs exactly one consumer on its input axis"
    cnode = tensors.node(cons[0].node)
    if cnode is None or cnode.op_type != "MatMul":
        return "consumer is not a MatMul"
    weight = cnode.input[1]
    if not tensors.has(weight):
        return "consumer weight is not a constant"
    out = cnode.output[0]
    bias = bias_node = residual = skip = None
    scales: list[tuple[str, str]] = []
    value = out
    for _ in range(4):  # MatMul -> Add(bias) -> [Mul(layer scale)] -> Add(residual)
        users = tensors.users(value)
        if len(users) != 1:
            break
        u = users[0]
        others = [x for x in u.input if x != value]
        if u.op_type == "Add" and len(others) == 1:
            if tensors.has(others[0]):
                if bias is None and value == out:
                    bias, bias_node = others[0], u.name
            else:
                residual, skip = u.output[0], others[0]
                break
        elif u.op_type in ("Mul", "Div") and len(others) == 1 and tensors.has(others[0]):
            if u.op_type == "Div" and u.input[1] != others[0]:
                break
            scales.append((u.op_type, others[0]))
        else:
            break
        value = u.output[0]
    return Consumer(g.id, weight, cnode.input[0], out, bias, bias_node, residual, skip, tuple(scales))


def _branch_scale(tensors: ModelTensors, c: Consumer) -> np.ndarray | float:
    """The constant factor between the consumer's bias Add and its residual Add."""
    f: np.ndarray | float = 1.0
    for op, name in c.scales:
        v = tensors.get(name).astype(np.float64)
        f = f * v if op == "Mul" else f / v
    return f


def _subgraph(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The nodes computing *outputs* from *inputs* (and graph inputs / constants)."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    inits = {t.name for t in g.initializer}
    stop = set(inputs)
    keep: set[int] = set()
    need_graph_inputs: list[str] = []
    todo = list(outputs)
    seen: set[str] = set()
    while todo:
        v = todo.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in stop or v in inits:
            continue
        if v not in producer:
            need_graph_inputs.append(v)
            continue
        i = producer[v]
        if i not in keep:
            keep.add(i)
            todo.extend(g.node[i].input)
            for a in g.node[i].attribute:  # outer-scope names used by subgraphs
                if a.type == onnx.AttributeProto.GRAPH:
                    todo.extend(x for n in a.g.node for x in n.input)
    used = {x for i in keep for x in g.node[i].input}
    graph = onnx.GraphProto()
    graph.name = "sub"
    graph.node.extend(g.node[i] for i in sorted(keep))
    graph.initializer.extend(t for t in g.initializer if t.name in used)
    graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
    f32 = onnx.TensorProto.FLOAT
    by_name = {i.name: i for i in g.input}
    for name in dict.fromkeys([*inputs, *need_graph_inputs]):
        if name in by_name:
            graph.input.append(by_name[name])
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(name, f32, None))
    for name in outputs:
        graph.output.append(onnx.helper.make_tensor_value_info(name, f32, None))
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return sub


def _run_sub(
    model: onnx.ModelProto, have: dict[str, np.ndarray], outputs: list[str], batch: int
) -> list[np.ndarray]:
    sub = _subgraph(model, [k for k in have if k], outputs)
    names = [i.name for i in sub.graph.input]
    missing = [n for n in names if n not in have]
    if missing:
        raise PassError(f"consumer refit: subgraph needs {missing[0]!r}")
    sess = _session(sub, [])
    n = len(next(iter(have.values())))
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for i in range(0, n, batch):
        res = sess.run(outputs, {k: have[k][i : i + batch] for k in names})
        for p, r in zip(parts, res, strict=True):
            p.append(r)
    return [np.concatenate(p) for p in parts]


def _rows(a: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
    """[B, T, C] → rows of the picked token positions; [B, C] → rows."""
    if a.ndim == 3 and pick is not None:
        a = np.take_along_axis(a, pick[:, :, None], axis=1)
    return a.reshape(-1, a.shape[-1])


def refit_consumers(
    original: onnx.ModelProto,
    tensors: ModelTensors,
    consumers: list[Consumer],
    feeds: dict[str, np.ndarray],
    *,
    mode: str = "ridge",
    batch: int = 8,
    val_fraction: float = 0.25,
    tokens: int = 64,
    first_token_weight: float | None = None,
    target: str = "residual",
    seed: int = 0,
    notes: list[str] | None = None,
) -> dict[int, dict[str, Any]]:
    """Sequential refit: consumer by consumer in graph order, on the *folded* model's own
    hidden activations (so each fit also absorbs the error of the blocks before it), to
    reproduce the original model's consumer output. Between consumers, the residual stream
    is cached and only the next block is run (one forward of each model in all).

    ``mode``: ``bias`` (match the output mean per channel) or ``ridge`` (least squares,
    ridge toward the merged weights; α and "no change" chosen on a held-out split).
    ``target``: ``local`` fits the original consumer output; ``residual`` fits what makes the
    block's residual output equal the original's, ``Y + (skip − skip')/s`` (``s`` the layer
    scale), so the error accumulated in the residual stream so far is corrected too.
    Token rows: token 0 and ``tokens`` random others per image; token 0 (a ViT's CLS) weighs
    ``first_token_weight`` rows (default: as much as all the other picked tokens together).
    """
    if mode not in REFIT_MODES:
        raise PassError(f"unknown refit mode {mode!r} (choose from {', '.join(REFIT_MODES)})")
    if mode == "none" or not consumers:
        return {}
    order = {n.name: i for i, n in enumerate(tensors.graph.node)}
    producer = {o: n.name for n in tensors.graph.node for o in n.output}
    consumers = sorted(consumers, key=lambda c: order.get(producer.get(c.output, ""), 0))
    inp = next(iter(feeds))
    n_img = len(feeds[inp])
    val = np.zeros(n_img, bool)
    if n_img >= 4 and val_fraction > 0:
        val[np.arange(n_img) % int(round(1 / val_fraction)) == 0] = True
    rng = np.random.default_rng(seed)
    have_o: dict[str, np.ndarray] = dict(feeds)
    have_f: dict[str, np.ndarray] = dict(feeds)
    results: dict[int, dict[str, Any]] = {}
    for c in consumers:
        extra = [c.residual] if c.residual else []
        y, *r_o = _run_sub(original, have_o, [c.output, *extra], batch)
        (h,) = _run_sub(tensors.model, have_f, [c.hidden], batch)
        pick = None
        if h.ndim == 3 and tokens and h.shape[1] > tokens + 1:
            rest = np.argsort(rng.random((h.shape[0], h.shape[1] - 1)), axis=1)[:, :tokens] + 1
            pick = np.concatenate([np.zeros((h.shape[0], 1), np.int64), rest], axis=1)
        if target == "residual" and c.skip and c.skip in have_o and c.skip in have_f:
            scale = np.broadcast_to(_branch_scale(tensors, c), (y.shape[-1],))
            safe = np.where(np.abs(scale) > 1e-12, scale, np.inf)
            y = y + ((have_o[c.skip] - have_f[c.skip]) / safe).astype(y.dtype)
        wts = None
        if h.ndim == 3:
            n_tok = h.shape[1] if pick is None else pick.shape[1]
            wts = np.ones(n_tok)
            wts[0] = (n_tok - 1) if first_token_weight is None else first_token_weight
        tr, va = LsqStats(), LsqStats()
        for chunk in range(0, n_img, batch):
            sl = slice(chunk, chunk + batch)
            for stats, mask in ((tr, ~val[sl]), (va, val[sl])):
                if mask.any():
                    sel = None if pick is None else pick[sl][mask]
                    rw = None if wts is None else np.tile(wts, int(mask.sum()))
                    stats.add(_rows(h[sl][mask], sel), _rows(y[sl][mask], sel), rw)
        w0 = tensors.get(c.weight)
        w, delta, label, errs = choose_refit(tr, va if va.rows else None, w0, mode)
        if label != "none":
            if c.bias is None and np.abs(delta).max() > 0:
                label = "none"  # no bias Add to take the intercept: keep the merged weights
            if label != "none":
                tensors.set(c.weight, w.astype(w0.dtype))
                if c.bias is not None:
                    bname = tensors.own(c.bias, {c.bias_node}, "refit")
                    tensors.set(bname, tensors.get(bname).astype(np.float64) + delta)
        results[c.gid] = {"variant": label, "errors": errs}
        logger.info(
            "refit group %d (%s): %s, held-out MSE %.4g -> %.4g",
            c.gid, c.weight, label, errs["none"], errs[label],
        )  # fmt: skip
        if c.residual:
            have_o = {inp: feeds[inp], c.residual: r_o[0]}
            (r_f,) = _run_sub(tensors.model, have_f, [c.residual], batch)
            have_f = {inp: feeds[inp], c.residual: r_f}
        del h, y
    if notes is not None:
        counts: dict[str, int] = {}
        for r in results.values():
            counts[r["variant"]] = counts.get(r["variant"], 0) + 1
        notes.append(
            "consumer refit (" + mode + "): " + ", ".join(f"{v} ×{k}" for k, v in sorted(counts.items()))
        )
    return results
