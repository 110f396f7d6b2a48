"""From a ChannelGroup and the model's current tensors to merged member slices.

This is the glue between the graph-free numerics and the rewrite: it cuts every member's
slice out of the model, computes features, the :class:`MergeMatrix` (k-means or magnitude
pruning), the merged slices (producers/params → cluster mean, consumers → cluster sum, BN
statistics by the rules of ALGORITHMS.md §1) and the data-free repair factors.

Member roles → merge rule:

========== ====================================================================
PRODUCER   cluster mean (``D·M·W``); feature; counts for L1/L2 pruning
PARAM      cluster mean; feature (bias, BN/LN affine, LayerScale, depthwise weight …)
CONSUMER   cluster sum (``W·Mᵀ``); feature
STAT       BN running mean/var: ``1/σ' = mean(1/σᵢ)``, ``μ' = mean(μᵢ/σᵢ)·σ'``; not a feature
========== ====================================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from foldonnx.analysis.channel_groups import ChannelGroup, GroupKind, Member, Role
from foldonnx.errors import PassError
from foldonnx.graph.tensors import ModelTensors
from foldonnx.numerics import merge as nx
from foldonnx.passes.fold.rewrite import axis_edits, member_indices, member_key

__all__ = [
    "GroupPlan",
    "plan_group",
    "group_features",
    "kept_channels",
    "METHODS",
    "REPAIRS",
]

logger = logging.getLogger(__name__)

METHODS = ("fold", "prune-l1", "prune-l2")
REPAIRS = ("none", "ar", "data")


@dataclass
class GroupPlan:
    """What one group becomes: the merge and the new member slices."""

    group: ChannelGroup
    merge: nx.MergeMatrix
    merged: dict[tuple, np.ndarray]
    distortion: float = 0.0
    repair: str = "none"
    repair_factors: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    # additive edits of tensors outside the group: (node reading it, tensor, delta)
    extra: list[tuple[str, str, np.ndarray]] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.merge.k


def _bn_node(tensors: ModelTensors, m: Member) -> tuple[onnx.NodeProto, int] | None:
    """The BatchNormalization node reading member *m* and the input slot (1..4), if any."""
    node = tensors.node(m.node) if m.node else None
    if node is None or node.op_type != "BatchNormalization":
        return None
    cur = tensors.current(m.tensor, m.node)
    for i, name in enumerate(node.input):
        if name == cur and i >= 1:
            return node, i
    return None


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return a.f
    return default


def _feeding_node(tensors: ModelTensors, bn: onnx.NodeProto) -> str:
    """Name of the node whose output the BN normalises (skipping nothing: must be direct)."""
    x = bn.input[0]
    for node in tensors.graph.node:
        if x in node.output:
            return node.name
    return ""


def _unique_members(group: ChannelGroup) -> dict[tuple, Member]:
    members: dict[tuple, Member] = {}
    for m in group.members:
        members.setdefault(member_key(m), m)
    return members


def group_features(tensors: ModelTensors, group: ChannelGroup) -> tuple[np.ndarray, np.ndarray | None]:
    """(clustering features, producer rows or None) of *group* as it stands in the model."""
    feats, prods = [], []
    for m in _unique_members(group).values():
        if m.role == Role.STAT:
            continue
        arr = tensors.get(tensors.current(m.tensor, m.node))
        sl = nx.member_slice(arr, m.axis, member_indices(tensors, m, group.channels, group.unit))
        feats.append(sl)
        if m.role == Role.PRODUCER:
            prods.append(sl)
    return nx.channel_features(feats), (nx.channel_features(prods) if prods else None)


def kept_channels(group: ChannelGroup, ratio: float, round_to: int = 1) -> int:
    """Channels (units) *group* keeps at *ratio*; for groups of single channels (not heads)
    rounded to a multiple of *round_to* when the group's width is itself a multiple of it
    (ORT's blocked CPU kernels and GPU tensor cores want channel counts in multiples of 8 or 16)."""
    k = nx.target_channels(group.channels, ratio)
    return nx.round_channels(k, group.channels, round_to) if group.unit == 1 else k


def plan_group(
    tensors: ModelTensors,
    group: ChannelGroup,
    k: int,
    *,
    method: str = "fold",
    repair: str = "none",
    seed: int = 0,
    n_init: int = 3,
    mlp_correction: bool = False,
) -> GroupPlan:
    """Compute the merge of *group* down to *k* channels and its new member slices, in stages:
    member slices (BN normalisation folded in for Fold-AR), the merge (k-means or magnitude),
    merged slices, the data-free repair.

    ``repair="ar"`` applies Fold-AR to groups with BatchNorm members; ``mlp_correction`` adds
    the Gaussian bias correction of :func:`_repair_mlp` to MLP groups (off by default: it
    lowered DINOv2-S fidelity, see the report)."""
    if method not in METHODS:
        raise PassError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    n, unit = group.channels, group.unit
    members = _unique_members(group)
    slices: dict[tuple, np.ndarray] = {}
    for key, m in members.items():
        arr = tensors.get(tensors.current(m.tensor, m.node))
        slices[key] = nx.member_slice(arr, m.axis, member_indices(tensors, m, n, unit)).astype(np.float64)
    bns = _bn_slots(tensors, members)
    notes: list[str] = []
    if repair == "ar" and bns:
        _fold_bn_normalisation(tensors, members, slices, bns, notes)
    merge, distortion, prod_keys = _merge(group, members, slices, k, method, seed, n_init)
    merged = _merged_slices(tensors, members, slices, bns, merge)
    factors = None
    extra: list[tuple[str, str, np.ndarray]] = []
    if repair == "ar" and method == "fold" and merge.k < n:
        if bns:
            factors = _repair_bn(tensors, members, slices, merged, bns, merge, notes)
        elif group.kind == GroupKind.MLP and mlp_correction:
            factors, extra = _repair_mlp(tensors, members, slices, merged, merge, prod_keys, notes)
    _merge_along_axes(tensors, members, slices, merged, merge)
    return GroupPlan(
        group=group,
        merge=merge,
        merged=merged,
        distortion=distortion,
        repair=repair if factors is not None else "none",
        repair_factors=factors,
        notes=notes,
        extra=extra if repair == "ar" and method == "fold" else [],
    )


def _bn_slots(tensors: ModelTensors, members: dict[tuple, Member]) -> dict[str, dict[int, tuple]]:
    """BatchNorm node name -> {input slot (1 scale, 2 bias, 3 mean, 4 var): member key}."""
    bns: dict[str, dict[int, tuple]] = {}
    for key, m in members.items():
        hit = _bn_node(tensors, m)
        if hit is not None:
            node, slot = hit
            bns.setdefault(node.name, {})[slot] = key
    return bns


def _fold_bn_normalisation(
    tensors: ModelTensors,
    members: dict[tuple, Member],
    slices: dict[tuple, np.ndarray],
    bns: dict[str, dict[int, tuple]],
    notes: list[str],
) -> None:
    """Fold-AR step 1: fold each BN's normalisation into the producer feeding it (the BN
    becomes the affine γ, β with μ = 0, σ² = 1)."""
    bn_keys = {key for slots in bns.values() for key in slots.values()}
    for bn_name, slots in bns.items():
        if not {1, 2, 3, 4} <= set(slots):
            notes.append(f"BN {bn_name}: not all of scale/bias/mean/var are members; not folded")
            continue
        bn = tensors.node(bn_name)
        eps = _attr(bn, "epsilon", 1e-5)
        gamma, beta = slices[slots[1]][:, :, 0], slices[slots[2]][:, :, 0]
        mean, var = slices[slots[3]][:, :, 0], slices[slots[4]][:, :, 0]
        inv_sigma, beta_new = nx.fold_bn_into_affine(mean, var, eps, gamma, beta)
        feeder = _feeding_node(tensors, bn)
        scaled = 0
        for key, m in members.items():
            if m.node == feeder and m.role in (Role.PRODUCER, Role.PARAM) and key not in bn_keys:
                slices[key] = slices[key] * inv_sigma[:, :, None]
                scaled += 1
        if not scaled:
            notes.append(f"BN {bn_name}: producer feeding it is not a member; not folded")
            continue
        slices[slots[2]] = beta_new[:, :, None]
        slices[slots[3]] = np.zeros_like(slices[slots[3]])
        slices[slots[4]] = np.full_like(slices[slots[4]], 1.0 - eps)


def _merge(
    group: ChannelGroup,
    members: dict[tuple, Member],
    slices: dict[tuple, np.ndarray],
    k: int,
    method: str,
    seed: int,
    n_init: int,
) -> tuple[nx.MergeMatrix, float, list[tuple]]:
    """The merge matrix (k-means of the channel features, or the k largest producer norms),
    its relative distortion, and the producer keys."""
    feat_keys = [key for key, m in members.items() if m.role != Role.STAT]
    prod_keys = [key for key, m in members.items() if m.role == Role.PRODUCER]
    if not feat_keys:
        raise PassError(f"group {group.id} has no feature members")
    features = nx.channel_features([slices[key] for key in feat_keys])
    if method == "fold":
        merge = nx.cluster_channels(features, k, seed=seed, n_init=n_init)
    else:
        if not prod_keys:
            raise PassError(f"group {group.id} has no producer members to rank for pruning")
        rows = nx.channel_features([slices[key] for key in prod_keys])
        merge = nx.merge_from_keep(nx.prune_keep(rows, k, norm=method.split("-")[1]), group.channels)
    return merge, nx.cluster_distortion(features, merge), prod_keys


def _merged_slices(
    tensors: ModelTensors,
    members: dict[tuple, Member],
    slices: dict[tuple, np.ndarray],
    bns: dict[str, dict[int, tuple]],
    merge: nx.MergeMatrix,
) -> dict[tuple, np.ndarray]:
    """Producers and parameters by cluster mean, consumers by cluster sum, BN statistics by
    the rules of ALGORITHMS.md §1; other statistics by cluster mean."""
    merged: dict[tuple, np.ndarray] = {}
    for key, m in members.items():
        if m.role == Role.CONSUMER:
            merged[key] = nx.apply_consumer(slices[key], merge)
        elif m.role != Role.STAT:
            merged[key] = nx.apply_producer(slices[key], merge)
    for bn_name, slots in bns.items():
        if 3 in slots and 4 in slots:
            eps = _attr(tensors.node(bn_name), "epsilon", 1e-5)
            mu, var = nx.merge_bn_stats(slices[slots[3]][:, :, 0], slices[slots[4]][:, :, 0], eps, merge)
            merged[slots[3]], merged[slots[4]] = mu[:, :, None], var[:, :, None]
    for key in members:
        if key not in merged:  # a STAT member that is not BN: keep the cluster mean
            merged[key] = nx.apply_producer(slices[key], merge)
    return merged


def _merge_along_axes(
    tensors: ModelTensors,
    members: dict[tuple, Member],
    slices: dict[tuple, np.ndarray],
    merged: dict[tuple, np.ndarray],
    merge: nx.MergeMatrix,
) -> None:
    """Members of a tensor that holds the group on several axes (a square pointwise conv inside
    a residual-coupled group: producer on axis 0, consumer on axis 1): the merge is applied
    along each axis in turn (:func:`~foldonnx.passes.fold.rewrite.axis_edits` order), so the
    values of a later axis are recomputed from the tensor merged along the earlier ones —
    ``W' = D·M·W·Mᵀ``, as :func:`write_group` will write it."""
    pairs = [(tensors.current(m.tensor, m.node), m) for m in members.values()]
    axes: dict[str, set[int]] = {}
    for name, m in pairs:
        axes.setdefault(name, set()).add(m.axis)
    multi = {name for name, a in axes.items() if len(a) > 1}
    if not multi:
        return
    key_of = {id(m): key for key, m in members.items()}
    n, k = merge.n, merge.k
    unit = slices[next(iter(members))].shape[1]
    done: set[str] = set()
    current: dict[str, np.ndarray] = {}
    for (name, axis), on_axis in axis_edits([p for p in pairs if p[0] in multi]).items():
        if name not in current:
            current[name] = tensors.get(name)
        arr = current[name]
        if name in done:  # a later axis: recompute from the tensor merged so far
            for m in on_axis:
                key = key_of[id(m)]
                sl = nx.member_slice(arr, axis, member_indices(tensors, m, n, unit)).astype(np.float64)
                merged[key] = (
                    nx.apply_consumer(sl, merge) if m.role == Role.CONSUMER else nx.apply_producer(sl, merge)
                )
        done.add(name)
        current[name] = nx.replace_channels(
            arr, axis, [(member_indices(tensors, m, n, unit), merged[key_of[id(m)]]) for m in on_axis], k
        )


def _repair_bn(
    tensors: ModelTensors,
    members: dict[tuple, Member],
    slices: dict[tuple, np.ndarray],
    merged: dict[tuple, np.ndarray],
    bns: dict[str, dict[int, tuple]],
    merge: nx.MergeMatrix,
    notes: list[str],
) -> np.ndarray | None:
    """Fold-AR: γ'_c = mean(γᵢ)·sqrt(n_c / (1 + (n_c − 1)·ρ̄_c)), ρ̄ from the rows of the
    producer feeding each BN (cosine is invariant to the 1/σ scaling folded into them)."""
    all_factors = []
    for bn_name, slots in bns.items():
        if 1 not in slots:
            continue
        feeder = _feeding_node(tensors, tensors.node(bn_name))
        rows = [slices[key] for key, m in members.items() if m.node == feeder and m.role == Role.PRODUCER]
        if not rows:
            notes.append(f"Fold-AR: no producer rows for BN {bn_name}")
            continue
        f = nx.fold_ar_gamma_factor(nx.channel_features(rows), merge)
        merged[slots[1]] = merged[slots[1]] * f[:, None, None]
        all_factors.append(f)
    return np.concatenate(all_factors) if all_factors else None


def input_affine(tensors: ModelTensors, node_name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(γ, β) of the normalisation feeding MatMul *node_name*: a ``LayerNormalization`` node or
    a decomposed LayerNorm ending in ``Mul(·, γ) → Add(·, β)``; None when not found."""
    node = tensors.node(node_name)
    if node is None:
        return None
    producer = {o: n for n in tensors.graph.node for o in n.output}
    src = producer.get(node.input[0])
    if src is None:
        return None
    if src.op_type == "LayerNormalization" and len(src.input) >= 2:
        g = tensors.get(src.input[1]) if tensors.has(src.input[1]) else None
        b = tensors.get(src.input[2]) if len(src.input) > 2 and tensors.has(src.input[2]) else None
        if g is None:
            return None
        return g.astype(np.float64), (np.zeros_like(g) if b is None else b).astype(np.float64)
    if src.op_type == "Add":
        consts = [x for x in src.input if tensors.has(x)]
        others = [x for x in src.input if not tensors.has(x)]
        if len(consts) == 1 and len(others) == 1 and others[0] in producer:
            mul = producer[others[0]]
            mconst = [x for x in mul.input if tensors.has(x)]
            if mul.op_type == "Mul" and len(mconst) == 1:
                return tensors.get(mconst[0]).astype(np.float64), tensors.get(consts[0]).astype(np.float64)
    return None


def _activation_after(tensors: ModelTensors, value: str) -> str | None:
    """``gelu`` / ``relu`` when *value* feeds such an activation (Gelu op, Erf chain, Relu)."""
    users = tensors.users(value)
    ops = {u.op_type for u in users}
    if "Gelu" in ops:
        return "gelu"
    if "Relu" in ops and len(users) == 1:
        return "relu"
    for u in users:
        if u.op_type in ("Div", "Mul") and any(v.op_type == "Erf" for v in tensors.users(u.output[0])):
            return "gelu"
    return None


def _consumer_bias(tensors: ModelTensors, consumer: Member) -> tuple[str, str] | None:
    """(Add node, bias tensor) right after the consumer MatMul, if any."""
    node = tensors.node(consumer.node)
    if node is None or node.op_type != "MatMul":
        return None
    users = tensors.users(node.output[0])
    if len(users) == 1 and users[0].op_type == "Add":
        consts = [x for x in users[0].input if tensors.has(x)]
        if len(consts) == 1:
            return users[0].name, consts[0]
    return None


def _repair_mlp(
    tensors: ModelTensors,
    members: dict[tuple, Member],
    slices: dict[tuple, np.ndarray],
    merged: dict[tuple, np.ndarray],
    merge: nx.MergeMatrix,
    prod_keys: list[tuple],
    notes: list[str],
) -> tuple[np.ndarray | None, list[tuple[str, str, np.ndarray]]]:
    """Data-free MLP correction (our design: a Gaussian model of fc1's input).

    Model the normalised input of fc1 as ``x = γ ⊙ z + β`` with ``z`` zero-mean, unit-variance,
    uncorrelated (γ, β: the LayerNorm affine feeding fc1; 1 and 0 when there is none). Then
    hidden unit i has pre-activation ``hᵢ ~ N(wᵢ·β + bᵢ, ‖wᵢ ⊙ γ‖²)``. Merging keeps the first
    moment of the *pre*-activations but not of the *activations*: ``E[act(h')]`` of the merged
    unit differs from its members' ``E[act(hᵢ)]``. We correct the consumer's bias so the MLP's
    expected output is unchanged::

        b₂ += Σᵢ E[act(hᵢ)]·w₂ᵢ − Σ_c E[act(h'_c)]·Σ_{i∈c} w₂ᵢ

    (closed forms for GELU and ReLU, :func:`~foldonnx.numerics.merge.gaussian_act_mean`).
    This is the data-free bias correction of DFQ (Nagel et al. 2019) applied to merging. Exact
    (zero correction) when members are identical. Measured on DINOv2-S (20 ImageNet images,
    mlp+heads, 10 % of parameters): CLS cosine 0.814 without it, 0.692 with it — the input model
    (uncorrelated, unit-variance LayerNorm outputs) does not hold there (massive-activation
    channels), so it is opt-in (``mlp_correction=True``). A variance-restoring rescale of the
    merged rows (REPAIR-like, cosine or Gaussian std ratio) hurt too (CLS 0.72 → 0.65 at 30 %
    MLP) and is not shipped. Returns (std ratio members/merged per cluster, for the report; extra edits).
    """
    if len(prod_keys) != 1 or slices[prod_keys[0]].shape[1] != 1:
        notes.append("MLP AR: needs exactly one producer weight with unit 1")
        return None, []
    key = prod_keys[0]
    m = members[key]
    rows = slices[key][:, 0, :]  # [n, d_in]
    aff = input_affine(tensors, m.node)
    d_in = rows.shape[1]
    gamma, beta = (np.ones(d_in), np.zeros(d_in)) if aff is None else aff
    if gamma.shape[-1] != d_in:
        gamma, beta = np.ones(d_in), np.zeros(d_in)
    if aff is None:
        notes.append("MLP AR: no LayerNorm affine found before fc1; assumed γ=1, β=0")
    bias_keys = [k for k, mm in members.items() if mm.role == Role.PARAM and slices[k].shape[1:] == (1, 1)]
    cons_keys = [k for k, mm in members.items() if mm.role == Role.CONSUMER]
    if len(bias_keys) != 1 or len(cons_keys) != 1 or members[cons_keys[0]].axis != 0:
        notes.append("MLP AR: needs one fc1 bias and one fc2 weight (axis 0)")
        return None, []
    act = _activation_after(tensors, tensors.node(members[bias_keys[0]].node).output[0])
    if act is None:
        notes.append("MLP AR: activation is not GELU/ReLU; no correction")
        return None, []
    target = _consumer_bias(tensors, members[cons_keys[0]])
    if target is None:
        notes.append("MLP AR: fc2 has no bias to correct")
        return None, []
    b = slices[bias_keys[0]][:, 0, 0]
    mu = rows @ beta + b
    sd = np.linalg.norm(rows * gamma[None, :], axis=1)
    mrows = merged[key][:, 0, :]
    mb = merged[bias_keys[0]][:, 0, 0]
    mu_m = mrows @ beta + mb
    sd_m = np.linalg.norm(mrows * gamma[None, :], axis=1)
    w2 = slices[cons_keys[0]][:, 0, :]  # [n, d_out]
    w2m = merged[cons_keys[0]][:, 0, :]
    delta = nx.gaussian_act_mean(mu, sd, act) @ w2 - nx.gaussian_act_mean(mu_m, sd_m, act) @ w2m
    ratio = merge.mean(sd[:, None])[:, 0] / np.maximum(sd_m, 1e-12)
    return ratio, [(target[0], target[1], delta)]
