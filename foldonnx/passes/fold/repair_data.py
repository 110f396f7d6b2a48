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
from foldonnx.data.activations import Moments, reduce_activations, run_subgraph, static_batch
from foldonnx.data.calibration import calibration_feeds
from foldonnx.errors import PassError
from foldonnx.graph.tensors import ModelTensors
from foldonnx.numerics.lsq import ALPHAS, REFIT_MODES, LsqStats, bias_correction, ridge_solve
from foldonnx.passes.fold.plan import GroupPlan

__all__ = [
    "repair_with_data",
    "Tap",
    "Consumer",
    "find_consumer",
    "refit_consumers",
    "RefitRows",
    "refit_stats",
    "choose_refit_rows",
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
    progress: bool = False,
) -> dict[int, np.ndarray]:
    """Repair the folded model held by *tensors* in place; returns the scale factors per group."""
    feeds = calibration_feeds(original, calib, limit=limit, preprocess=preprocess)
    batch = static_batch(original) or batch
    taps: list[tuple[Tap, GroupPlan]] = []
    for plan in plans:
        t = _find_taps(tensors, plan)
        if isinstance(t, str):
            if notes is not None and plan.group.kind != GroupKind.HEADS:  # heads: refit only, by design
                notes.append(f"group {plan.group.id}: no statistics matching ({t})")
            continue
        taps.append((t, plan))
    names = sorted({t.value for t, plan in taps if plan.group.kind != GroupKind.MLP or match_mlp_stats})
    axis_of = {t.value: t.axis for t, _ in taps}
    orig_stats = {n: Moments(("original", n), axis_of[n]) for n in names}
    fold_stats = {n: Moments(("folded", n), axis_of[n]) for n in names}
    if names:
        reduce_activations(
            {"original": original, "folded": tensors.model},
            feeds,
            [*orig_stats.values(), *fold_stats.values()],
            batch=batch,
            desc="repair statistics",
            progress=progress,
        )
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
        refit_consumers(
            original, tensors, consumers, feeds, mode=mode, batch=batch, notes=notes, progress=progress
        )
    return factors


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


def _rows(a: np.ndarray, pick: np.ndarray | None, samples: np.ndarray | None = None) -> np.ndarray:
    """[B, T, C] → rows of the picked token positions; [B, C] → rows. ``samples`` (a boolean
    mask over B) keeps only those samples, without copying the others first."""
    if samples is not None:
        index = np.nonzero(samples)[0]
        if a.ndim == 3 and pick is not None:
            return a[index[:, None], pick[index]].reshape(-1, a.shape[-1])
        a = a[index]
    elif a.ndim == 3 and pick is not None:
        a = np.take_along_axis(a, pick[:, :, None], axis=1)
    return a.reshape(-1, a.shape[-1])


# ----------------------------------------------------------------------------------------
# Consumer refit: numerics (pure numpy)

# rows per float32 product block of the Gram statistics (the float64 sums add the blocks)
_GRAM_BLOCK = 1024


@dataclass
class RefitRows:
    """Weighted rows of a consumer fit: hidden ``h`` ``[n, d]``, target ``y`` ``[n, o]``
    (float32, as ONNX Runtime gives them), row weights ``w`` ``[n]`` (a weight counts as that
    many copies of the row)."""

    h: np.ndarray
    y: np.ndarray
    w: np.ndarray

    @property
    def total(self) -> float:
        return float(self.w.sum())


def refit_stats(rows: RefitRows) -> LsqStats:
    """:class:`LsqStats` of *rows*. The products are float32 matrix products over blocks of
    rows of ``H − m`` (``m`` the mean of the first block: activations with a large common
    offset would otherwise lose the centred covariance to float32 rounding), summed in float64
    and moved back to ``[H 1]`` exactly in float64 (about 3x faster than float64 products; the
    held-out errors of the ridge candidates chosen on DINOv2-S stay within 1e-6)."""
    stats = LsqStats()
    n, d = rows.h.shape
    o = rows.y.shape[1]
    m = np.asarray(rows.h[:_GRAM_BLOCK], np.float32).mean(axis=0) if n else np.zeros(d, np.float32)
    g = np.zeros((d, d))  # Σ w (h−m)(h−m)ᵀ
    c = np.zeros((d, o))  # Σ w (h−m) yᵀ
    s1, sy = np.zeros(d), np.zeros(o)  # Σ w (h−m), Σ w y
    n_w, yy = 0.0, 0.0
    for i in range(0, n, _GRAM_BLOCK):
        h = np.asarray(rows.h[i : i + _GRAM_BLOCK], np.float32) - m
        y = np.asarray(rows.y[i : i + _GRAM_BLOCK], np.float32)
        w = np.asarray(rows.w[i : i + _GRAM_BLOCK], np.float64)
        hw = h * w.astype(np.float32)[:, None]
        g += hw.T @ h
        c += hw.T @ y
        s1 += hw.sum(axis=0, dtype=np.float64)
        wy = w[:, None] * y
        sy += wy.sum(axis=0)
        yy += float((wy * y).sum())
        n_w += float(w.sum())
    m64 = m.astype(np.float64)
    gram = np.empty((d + 1, d + 1))
    gram[:-1, :-1] = g + np.outer(s1, m64) + np.outer(m64, s1) + n_w * np.outer(m64, m64)
    gram[:-1, -1] = gram[-1, :-1] = s1 + n_w * m64
    gram[-1, -1] = n_w
    cross = np.empty((d + 1, o))
    cross[:-1] = c + np.outer(m64, sy)
    cross[-1] = sy
    stats.gram, stats.cross, stats.yy = gram, cross, yy
    return stats


def _row_sse(h: np.ndarray, y: np.ndarray, sw: np.ndarray, w: np.ndarray, delta: np.ndarray) -> float:
    """``Σᵢ wᵢ‖hᵢ·W + δ − yᵢ‖²`` for rows already scaled by ``sw = √w``."""
    e = h @ w + sw[:, None] * delta[None, :] - y
    return float(np.einsum("ij,ij->", e, e))


def choose_refit_rows(
    train: LsqStats,
    judge: RefitRows,
    full: LsqStats,
    w0: np.ndarray,
    mode: str,
    alphas: tuple[float, ...] = ALPHAS,
) -> tuple[np.ndarray, np.ndarray, str, dict[str, float]]:
    """:func:`~foldonnx.numerics.lsq.choose_refit` with the held-out errors computed on the
    held-out *rows* ``judge`` instead of their Gram matrix: the same candidates (the merged
    weights, the bias correction and the ridge fits of *train* for every α, toward ``W₀``),
    the lowest held-out error wins and is refit on *full* (train + held-out statistics).

    The ridge fits share one eigendecomposition ``H_cᵀH_c = VΛVᵀ`` of the training rows; a
    fit is ``W_α = V·Z_α`` with ``Z_α = (Vᵀ·C_c + λ·Vᵀ·W₀) / (Λ + λ)``, and its held-out
    residuals ``(H_j − μ_h)·V·Z_α − (Y_j − μ_y)`` need one product with the ``n_j`` held-out
    rows per α, never ``W_α`` itself — the held-out rows (a quarter of the calibration
    images, ``n_j ≈ 1000``) are fewer than the hidden units. Errors are per row (weighted), as
    :func:`~foldonnx.numerics.lsq.lsq_error` gives them."""
    w0 = np.asarray(w0, np.float64)
    zero = np.zeros(w0.shape[1])
    n = max(train.gram[-1, -1], 1e-12)
    mu_h, mu_y = train.gram[-1, :-1] / n, train.cross[-1] / n
    sw = np.sqrt(np.asarray(judge.w, np.float64))
    hj = np.asarray(judge.h, np.float64) * sw[:, None]
    yj = np.asarray(judge.y, np.float64) * sw[:, None]
    rows = max(judge.total, 1e-12)
    errs = {"none": _row_sse(hj, yj, sw, w0, zero) / rows}
    if mode in ("bias", "ridge"):
        errs["bias"] = _row_sse(hj, yj, sw, w0, bias_correction(train, w0)) / rows
    if mode == "ridge":
        gc = train.gram[:-1, :-1] - n * np.outer(mu_h, mu_h)
        cc = train.cross[:-1] - n * np.outer(mu_h, mu_y)
        with _one_blas_thread():  # LAPACK's eigh is slower multi-threaded on 2 busy cores
            evals, evecs = np.linalg.eigh((gc + gc.T) / 2)
        evals = np.maximum(evals, 0.0)
        scale = float(np.mean(np.diag(gc))) + 1e-12
        r, r0 = evecs.T @ cc, evecs.T @ w0
        a = (hj - sw[:, None] * mu_h[None, :]) @ evecs  # centred held-out rows in the eigenbasis
        b = yj - sw[:, None] * mu_y[None, :]
        for alpha in alphas:
            lam = alpha * scale
            e = a @ ((r + lam * r0) / (evals + lam)[:, None]) - b
            errs[f"ridge{alpha:g}"] = float(np.einsum("ij,ij->", e, e)) / rows
    best = min(errs, key=errs.__getitem__)
    if best == "none":
        return w0, zero, best, errs
    if best == "bias":
        return w0, bias_correction(full, w0), best, errs
    w, d = ridge_solve(full, w0, float(best[len("ridge") :]))
    return w, d, best, errs


def _one_blas_thread() -> Any:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# ----------------------------------------------------------------------------------------
# Consumer refit: the sequential pass


def _refit_one(
    tensors: ModelTensors,
    c: Consumer,
    y: np.ndarray,
    cut_o: dict[str, np.ndarray],
    have_f: dict[str, np.ndarray],
    inp: str,
    feeds: dict[str, np.ndarray],
    val: np.ndarray,
    rng: np.random.Generator,
    mode: str,
    batch: int,
    tokens: int,
    first_token_weight: float | None,
    target: str,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit consumer *c* (original output *y*, the original's cut *cut_o*, the folded model's
    cut *have_f*); returns its result and the folded model's cut after its block."""
    # the folded block up to the consumer's input, and the skip its residual Add reads (the
    # tail from there is run again after the refit, not the whole block)
    skip_run = bool(c.residual and c.skip and c.skip not in have_f)
    wanted = [c.hidden, *([c.skip] if skip_run else [])]
    h, *s_f = run_subgraph(tensors.model, have_f, wanted, batch, spinning=False)
    pick = None
    if h.ndim == 3 and tokens and h.shape[1] > tokens + 1:
        rest = np.argsort(rng.random((h.shape[0], h.shape[1] - 1)), axis=1)[:, :tokens] + 1
        pick = np.concatenate([np.zeros((h.shape[0], 1), np.int64), rest], axis=1)
    if target == "residual" and c.skip and c.skip in cut_o and c.skip in have_f:
        scale = np.broadcast_to(_branch_scale(tensors, c), (y.shape[-1],))
        safe = np.where(np.abs(scale) > 1e-12, scale, np.inf)
        y = y + ((cut_o[c.skip] - have_f[c.skip]) / safe).astype(y.dtype)
    wts = None
    if h.ndim == 3:
        n_tok = h.shape[1] if pick is None else pick.shape[1]
        wts = np.ones(n_tok)
        wts[0] = (n_tok - 1) if first_token_weight is None else first_token_weight
    parts = {}
    for part, mask in (("train", ~val), ("val", val)):
        hr = _rows(h, pick, mask)
        weights = np.ones(len(hr)) if wts is None else np.tile(wts, int(mask.sum()))
        parts[part] = RefitRows(hr, _rows(y, pick, mask), weights)
    tr, va = refit_stats(parts["train"]), refit_stats(parts["val"])
    full = LsqStats()
    full += tr
    full += va
    judge = parts["val"] if va.rows else parts["train"]
    w0 = tensors.get(c.weight)
    w, delta, label, errs = choose_refit_rows(tr, judge, full, w0, mode)
    del parts, judge
    if label != "none":
        if c.bias is None and np.abs(delta).max() > 0:
            label = "none"  # no bias Add to take the intercept: keep the merged weights
        if label != "none":
            tensors.set(c.weight, w.astype(w0.dtype))
            if c.bias is not None:
                bname = tensors.own(c.bias, {c.bias_node}, "refit")
                tensors.set(bname, tensors.get(bname).astype(np.float64) + delta)
    logger.info(
        "refit group %d (%s): %s, held-out MSE %.4g -> %.4g",
        c.gid, c.weight, label, errs["none"], errs[label],
    )  # fmt: skip
    if c.residual:
        tail = {**feeds, c.hidden: h, c.skip: have_f[c.skip] if c.skip in have_f else s_f[0]}
        (r_f,) = run_subgraph(tensors.model, tail, [c.residual], batch, spinning=False)
        have_f = {**feeds, c.residual: r_f}
    return {"variant": label, "errors": errs}, have_f


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
    progress: bool = False,
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

    Cost: the folded block runs once — its hidden input and skip, then only the consumer's
    tail (MatMul, bias, scale, residual Add) after the refit, not the whole block again; the
    original's next block runs in a background thread meanwhile; the fit
    (:func:`choose_refit_rows`) takes one eigendecomposition per consumer. ViT-B/16 (64
    synthetic images, 12 MLP consumers, ``benchmarks/fold.md``): ``fold --repair ar`` 202 → 93
    CPU seconds, the same refit choices and DINOv2-S fidelity to 4 decimals.
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
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def original_block(have: dict[str, np.ndarray], c: Consumer) -> list[np.ndarray]:
        return run_subgraph(
            original, have, [c.output, *([c.residual] if c.residual else [])], batch, spinning=False
        )

    # the original model's next block runs in the background while this consumer is fitted:
    # it needs only the original's own residual stream
    with ThreadPoolExecutor(max_workers=1) as background:
        ahead = background.submit(original_block, have_o, consumers[0])
        for i, c in enumerate(
            tqdm(consumers, desc="repair refit", unit="layer", disable=not progress, leave=False)
        ):
            y, *r_o = ahead.result()
            cut_o = have_o  # the cached cut this consumer's block started from
            if c.residual:
                have_o = {**feeds, c.residual: r_o[0]}
            if i + 1 < len(consumers):
                ahead = background.submit(original_block, have_o, consumers[i + 1])
            results[c.gid], have_f = _refit_one(
                tensors,
                c,
                y,
                cut_o,
                have_f,
                inp,
                feeds,
                val,
                rng,
                mode,
                batch,
                tokens,
                first_token_weight,
                target,
            )
            del y, r_o
    if notes is not None:
        counts: dict[str, int] = {}
        for r in results.values():
            counts[r["variant"]] = counts.get(r["variant"], 0) + 1
        notes.append(
            "consumer refit (" + mode + "): " + ", ".join(f"{v} ×{k}" for k, v in sorted(counts.items()))
        )
    return results
