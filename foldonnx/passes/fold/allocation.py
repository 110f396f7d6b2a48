"""Per-group ratios for a parameter target (``--target-params F``).

Criterion (data-free, greedy, "cheapest distortion per parameter first"):

1. For every selected group and every ratio on a grid (0.1, 0.2, …, 0.8) we run the group's
   own merge (for ``fold`` the Ward tree that seeds its k-means, built once and cut at each
   ratio; magnitude selection for ``prune-*``) on its features and record the *relative
   within-cluster distortion*
   ``D_g(r) = Σᵢ‖xᵢ − centroid(xᵢ)‖² / Σᵢ‖xᵢ − x̄‖²`` (0 = lossless; a pruned channel counts
   with its whole energy). Features are the group's concatenated member slices, as used for
   clustering, so the cost is measured in the weights the merge actually changes.
2. Starting from ratio 0 everywhere, we repeatedly raise, by one grid step, the group with the
   smallest ``ΔD_g / Δparams`` (distortion added per parameter removed), until the removed
   parameters reach ``F`` of the model. The last step is cut to the exact ratio that meets
   the target.

3. Fan-out: ``D_g`` is multiplied by the number of distinct consumer nodes of the group. A
   residual-coupled stream (EfficientNet's 24/40/80/112/192-wide streams, read by 2-4 blocks)
   carries every block's input, so an error in it reaches each reader, while its many
   parameters per channel (every block's project rows and expand columns) made it look the
   cheapest per parameter. Measured on EfficientNet-Lite0 (imagenet20, prune-l1, one group at
   a time at ratio 0.02): removing 1 of the 40 stream channels gives logit cosine 0.88, the
   worst single groups were all such streams and the expansions whose L1 rank ignores a large
   depthwise bias. MLP / conv / head groups (one consumer) are unchanged.

Groups whose channels are near-duplicates (low distortion) are folded hardest; groups whose
channels are all different keep their width. Kinds given a fixed ratio (``mlp=0.3``) keep it
and count towards the target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from foldonnx.errors import PassError
from foldonnx.passes.channel_groups import ChannelGroup, Role
from foldonnx.passes.fold import numerics as nx
from foldonnx.passes.fold.plan import group_features, params_per_channel
from foldonnx.passes.fold.rewrite import ModelTensors

__all__ = ["allocate_ratios", "fan_out", "RATIO_GRID"]

logger = logging.getLogger(__name__)

RATIO_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _curve(
    tensors: ModelTensors, g: ChannelGroup, method: str, seed: int, grid: Sequence[float]
) -> np.ndarray:
    feats, prods = group_features(tensors, g)
    out = np.zeros(len(grid))
    tree = None
    if method == "fold" and g.channels > 2:
        from scipy.cluster.hierarchy import linkage

        # one Ward tree per group, cut at every grid ratio (the k-means refinement the fold
        # itself runs changes the distortion little and would cost a clustering per ratio)
        tree = linkage(nx.reduce_features(feats, seed=seed), method="ward")
    for i, r in enumerate(grid):
        k = nx.target_channels(g.channels, r)
        if k >= g.channels:
            continue
        if tree is not None:
            from scipy.cluster.hierarchy import fcluster

            merge = nx.merge_from_labels(fcluster(tree, k, criterion="maxclust") - 1)
        elif method == "fold":
            merge = nx.cluster_channels(feats, k, seed=seed, n_init=1)
        else:
            rows = prods if prods is not None else feats
            merge = nx.merge_from_keep(nx.prune_keep(rows, k, method.split("-")[1]), g.channels)
        out[i] = nx.cluster_distortion(feats, merge)
    return np.maximum.accumulate(out) * fan_out(g)  # a larger ratio never costs less


def fan_out(g: ChannelGroup) -> int:
    """Distinct nodes reading the group's channels as a consumer (at least 1)."""
    return max(1, len({m.node for m in g.members if m.role == Role.CONSUMER}))


def allocate_ratios(
    tensors: ModelTensors,
    groups: Sequence[ChannelGroup],
    target: float,
    *,
    total_params: int,
    fixed: Mapping[str, float] | None = None,
    method: str = "fold",
    seed: int = 0,
    grid: Sequence[float] = RATIO_GRID,
) -> dict[int, float]:
    """Ratios per group id so that about ``target · total_params`` parameters are removed."""
    fixed = dict(fixed or {})
    need = target * total_params
    ratios: dict[int, float] = {}
    free: list[ChannelGroup] = []
    for g in groups:
        if g.kind.value in fixed:
            r = fixed[g.kind.value]
            ratios[g.id] = r
            need -= (g.channels - nx.target_channels(g.channels, r)) * params_per_channel(tensors, g)
        else:
            free.append(g)
    if need <= 0 or not free:
        return ratios
    ppc = {g.id: params_per_channel(tensors, g) for g in free}
    curves = {g.id: _curve(tensors, g, method, seed, grid) for g in free}
    step = {g.id: 0 for g in free}
    by_id = {g.id: g for g in free}

    def removed(g: ChannelGroup, r: float) -> int:
        return (g.channels - nx.target_channels(g.channels, r)) * ppc[g.id]

    saved = 0.0
    while saved < need:
        best, best_cost = None, np.inf
        for gid, s in step.items():
            if s + 1 >= len(grid):
                continue
            g = by_id[gid]
            dp = removed(g, grid[s + 1]) - removed(g, grid[s])
            if dp <= 0:
                step[gid] = s + 1
                continue
            cost = (curves[gid][s + 1] - curves[gid][s]) / dp
            if cost < best_cost:
                best, best_cost = gid, cost
        if best is None:
            raise PassError(
                f"target-params {target:g} is out of reach with the selected groups "
                f"(at most {saved / total_params:.3f} of the parameters at ratio {grid[-1]:g})"
            )
        g = by_id[best]
        s = step[best]
        gain = removed(g, grid[s + 1]) - removed(g, grid[s])
        if saved + gain >= need:  # cut the last step to hit the target
            frac = (need - saved) / gain
            r = grid[s] + frac * (grid[s + 1] - grid[s])
            ratios[best] = float(r)
            saved = need
            break
        saved += gain
        step[best] = s + 1
    for gid, s in step.items():
        ratios.setdefault(gid, float(grid[s]))
    logger.info("allocated ratios for target %.3f: %s", target, {k: round(v, 3) for k, v in ratios.items()})
    return ratios
