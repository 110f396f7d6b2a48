"""The fold pass: cluster-and-merge (or magnitude-prune) channel groups of an ONNX model.

``FoldPass(...).run(model) -> FoldResult(model, report)``; :func:`fold` is the functional API
mirroring the ``fold-onnx fold`` command. The input model is never modified.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from foldonnx.analysis.channel_groups import ChannelGroup, GroupKind
from foldonnx.errors import PassError, UsageError
from foldonnx.graph.stats import ModelStats, mac_shapes, model_stats
from foldonnx.graph.tensors import ModelTensors, clear_value_info
from foldonnx.graph.verify import verify_model, verify_reference
from foldonnx.numerics import merge as nx
from foldonnx.onnx_file import LoadedModel, load_model
from foldonnx.passes.fold.plan import METHODS, REPAIRS, GroupPlan, kept_channels, plan_group
from foldonnx.passes.fold.rewrite import add_to_tensor, weight_norms, write_group

__all__ = [
    "FoldPass",
    "FoldResult",
    "FoldReport",
    "GroupReport",
    "SkippedGroup",
    "fold",
    "parse_group_spec",
    "DEFAULT_KINDS",
]

logger = logging.getLogger(__name__)

# ``repair="ar"`` on groups without BatchNorm statistics to repair data-free (LayerNorm
# transformers; CNNs whose BN the exporter fused into the convs) runs the data repair on 64
# synthetic images instead of photos: MLP / heads consumers are refit, conv groups get their
# statistics matched. Measured (benchmarks/fold.md): DINOv2-S (mlp+heads, CLS cosine on
# imagenet20) 10 % params 0.82 -> 0.87, 20 % 0.68 -> 0.79, 30 % 0.62 -> 0.73;
# EfficientNet-Lite0 (BN fused; top-1 agreement) 20 % 0.60 -> 0.70, 30 % 0.05 -> 0.55.
SYNTHETIC_REFIT_KINDS = (GroupKind.MLP, GroupKind.HEADS)
SYNTHETIC_STATS_KINDS = (GroupKind.CONV, GroupKind.DEPTHWISE, GroupKind.SE)

# Kinds folded when --groups is not given. The residual stream is opt-in: on LayerNorm models
# merging stream channels changes every LayerNorm's statistics (see README / report notes).
DEFAULT_KINDS: tuple[str, ...] = ("mlp", "heads", "conv", "depthwise", "se")


@dataclass
class GroupReport:
    """One folded (or pruned) group."""

    id: int
    kind: str
    name: str
    channels_before: int
    channels_after: int
    unit: int
    ratio: float
    method: str
    repair: str
    distortion: float
    repair_factor_min: float | None = None
    repair_factor_mean: float | None = None
    repair_factor_max: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class SkippedGroup:
    id: int
    kind: str
    name: str
    reason: str


@dataclass
class FoldReport:
    """What a fold did: sizes before/after, per group, skipped groups, time."""

    method: str
    repair: str
    seed: int
    ratio: float | None
    target_params: float | None
    kind_ratios: dict[str, float]
    before: ModelStats
    after: ModelStats
    groups: list[GroupReport] = field(default_factory=list)
    skipped: list[SkippedGroup] = field(default_factory=list)
    seconds: float = 0.0
    analysis_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def params_removed(self) -> float:
        return 1.0 - self.after.params / max(self.before.params, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params_removed"] = self.params_removed
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FoldReport:
        d = dict(d)
        d.pop("params_removed", None)
        return cls(
            before=ModelStats.from_dict(d.pop("before")),
            after=ModelStats.from_dict(d.pop("after")),
            groups=[GroupReport(**g) for g in d.pop("groups", [])],
            skipped=[SkippedGroup(**s) for s in d.pop("skipped", [])],
            **d,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> FoldReport:
        return cls.from_dict(json.loads(text))


@dataclass
class FoldResult:
    model: onnx.ModelProto
    report: FoldReport


def parse_group_spec(spec: str | Sequence[str] | Mapping[str, float] | None) -> dict[str, float | None]:
    """``"mlp,heads"`` → ``{mlp: None, heads: None}``; ``"mlp=0.3,heads=0.2"`` → ratios."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(k), None if v is None else float(v)) for k, v in spec.items()]
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        items = []
        for part in parts:
            part = part.strip()
            if not part:
                continue
            name, eq, value = part.partition("=")
            try:
                items.append((name.strip(), float(value) if eq else None))
            except ValueError:
                raise UsageError(f"bad ratio in --groups entry {part!r}") from None
    known = {k.value for k in GroupKind}
    out: dict[str, float | None] = {}
    for name, value in items:
        if name not in known:
            raise UsageError(f"unknown group kind {name!r} (known: {', '.join(sorted(known))})")
        if value is not None:
            _check_ratio(value, f"ratio for {name}")
        out[name] = value
    return out


def _check_ratio(value: float, what: str = "ratio") -> None:
    if not (0.0 <= value < 1.0) or not np.isfinite(value):
        raise UsageError(f"{what} must be in [0, 1), got {value:g}")


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="group", leave=False)


class FoldPass:
    """Fold (cluster + merge) or magnitude-prune the channel groups of a model.

    Parameters mirror the CLI: ``ratio`` (fraction of channels removed in every selected
    group) or ``target_params`` (fraction of the model's parameters to remove, per-group ratios
    from :func:`foldonnx.passes.fold.allocation.allocate_ratios`); ``groups`` selects kinds and
    optional per-kind ratios; ``method`` is ``fold``, ``prune-l1`` or ``prune-l2``; ``repair``
    is ``none``, ``ar`` (data-free: Fold-AR on BatchNorm groups; MLP / heads consumers refit and
    BN-less conv groups statistics-matched on ``synthetic_count`` synthetic images) or ``data``
    (needs ``calib``).
    ``round_to`` (8) rounds the channels kept by single-channel groups to a multiple of it
    (widths that are multiples of it only; 1 turns it off): unaligned widths knock ONNX
    Runtime's CPU convolutions off their blocked kernels (EfficientNet-Lite0 folded 30 %:
    0.56x the original's speed unrounded, 1.42x faster rounded to 8; benchmarks/runtime.md).
    ``channel_groups`` skips the analysis (groups computed elsewhere). ``verify`` checks the
    result with onnx.checker and ONNX Runtime (loads, runs on zeros, same output shapes).
    ``inplace`` folds the given ModelProto itself instead of a copy (saves one model in memory;
    not with a refit, which runs the original model too).
    """

    def __init__(
        self,
        ratio: float | None = None,
        *,
        target_params: float | None = None,
        groups: str | Sequence[str] | Mapping[str, float] | None = None,
        method: str = "fold",
        repair: str = "none",
        calib: Any = None,
        calib_limit: int = 64,
        synthetic_count: int = 64,
        round_to: int = 8,
        calib_preprocess: Any = None,
        refit: bool | str = "ridge",
        seed: int = 0,
        n_init: int = 3,
        channel_groups: list[ChannelGroup] | None = None,
        weighted_norms: bool = True,
        mlp_correction: bool = False,
        verify: bool = True,
        inplace: bool = False,
        progress: bool = False,
    ) -> None:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
        if repair not in REPAIRS:
            raise UsageError(f"unknown repair {repair!r} (choose from {', '.join(REPAIRS)})")
        if repair == "data" and calib is None:
            raise UsageError("--repair data needs calibration data (--calib SOURCE)")
        if target_params is not None:
            _check_ratio(target_params, "target-params")
            if ratio is not None:
                raise UsageError("give either a ratio or target-params, not both")
        if ratio is not None:
            _check_ratio(ratio)
        self.kind_spec = parse_group_spec(groups)
        if (
            ratio is None
            and target_params is None
            and not any(v is not None for v in self.kind_spec.values())
        ):
            raise UsageError("give --ratio, --target-params or per-kind ratios in --groups")
        self.ratio = ratio
        self.target_params = target_params
        self.method = method
        self.repair = repair
        self.calib = calib
        self.calib_limit = calib_limit
        self.synthetic_count = synthetic_count
        if round_to < 1:
            raise UsageError(f"round-to must be >= 1, got {round_to}")
        self.round_to = int(round_to)
        self.calib_preprocess = calib_preprocess
        self.refit = refit
        self.seed = seed
        self.n_init = n_init
        self.channel_groups = channel_groups
        self.weighted_norms = weighted_norms
        self.mlp_correction = mlp_correction
        self.inplace = inplace
        self.verify = verify
        self.progress = progress

    # ------------------------------------------------------------------------------------
    def _analyse(self, model: onnx.ModelProto) -> list[ChannelGroup]:
        if self.channel_groups is not None:
            return list(self.channel_groups)
        try:
            from foldonnx.analysis import find_channel_groups
        except ImportError as exc:
            raise PassError(f"channel-group analysis is not available: {exc}") from None
        return list(find_channel_groups(model))

    def _select(
        self, groups: list[ChannelGroup], model: onnx.ModelProto
    ) -> tuple[dict[int, float], list[SkippedGroup], dict[str, float]]:
        present = {g.kind.value for g in groups}
        if self.kind_spec:
            missing = [k for k in self.kind_spec if k not in present]
            if missing:
                raise UsageError(
                    f"the model has no {', '.join(missing)} groups "
                    f"(it has: {', '.join(sorted(present)) or 'none'})"
                )
            kinds = list(self.kind_spec)
        else:
            kinds = [k for k in DEFAULT_KINDS if k in present]
        skipped: list[SkippedGroup] = []
        chosen: list[ChannelGroup] = []
        for g in groups:
            if g.kind.value not in kinds:
                continue
            if not g.foldable:
                skipped.append(SkippedGroup(g.id, g.kind.value, g.name, g.blocked or "blocked"))
            elif g.channels < 2:
                skipped.append(SkippedGroup(g.id, g.kind.value, g.name, "fewer than 2 channels"))
            else:
                chosen.append(g)
        if not chosen:
            raise PassError(f"no foldable groups of kind {', '.join(kinds) or '-'} in the model")
        kind_ratios: dict[str, float] = {}
        ratios: dict[int, float] = {}
        if self.target_params is not None:
            from foldonnx.passes.fold.allocation import allocate_ratios

            ratios = allocate_ratios(
                ModelTensors(model),
                chosen,
                self.target_params,
                total_params=model_stats_params(model),
                fixed={k: v for k, v in self.kind_spec.items() if v is not None},
                method=self.method,
                seed=self.seed,
                round_to=self.round_to,
            )
            kind_ratios = {k: v for k, v in self.kind_spec.items() if v is not None}
        else:
            for k in kinds:
                v = self.kind_spec.get(k)
                kind_ratios[k] = self.ratio if v is None else v
                if kind_ratios[k] is None:
                    raise UsageError(f"no ratio for group kind {k!r}: give --ratio or {k}=R")
            ratios = {g.id: kind_ratios[g.kind.value] for g in chosen}
        return ratios, skipped, kind_ratios

    def _preprocess(self, model: onnx.ModelProto) -> Any:
        """How calibration images become inputs: as given, else as recorded in the model's
        metadata by ``fold-onnx export``, else (None) ImageNet mean/std at the input size."""
        if self.calib_preprocess is not None:
            return self.calib_preprocess
        from foldonnx.models.registry import read_preprocess

        return read_preprocess(model)

    def _repair_synthetic(
        self, model: onnx.ModelProto, tensors: ModelTensors, plans: list[GroupPlan], notes: list[str]
    ) -> dict[int, np.ndarray]:
        """The data-free part of ``repair="ar"`` for groups Fold-AR cannot repair: the data
        repair (:func:`~foldonnx.passes.fold.repair_data.repair_with_data`: consumer refit of
        MLP / heads groups, statistics matching of conv groups without BatchNorm members)
        calibrated on synthetic images made from random numbers only
        (:func:`~foldonnx.data.calibration.synthetic_images`). Models whose input is not
        an image are left as folded, with a note. Returns the scale factors per group."""
        from foldonnx.data.calibration import synthetic_images
        from foldonnx.passes.fold.repair_data import repair_with_data

        todo = [
            p
            for p in plans
            if p.group.kind in SYNTHETIC_REFIT_KINDS
            or (p.group.kind in SYNTHETIC_STATS_KINDS and p.repair_factors is None)
        ]
        if not todo:
            return {}
        inits = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
        if len(dims) != 4 or (dims[1].HasField("dim_value") and dims[1].dim_value != 3):
            notes.append(
                "ar: no data-free repair of groups without BatchNorm (the model input is not an image)"
            )
            return {}
        size = dims[-1].dim_value if dims[-1].HasField("dim_value") and dims[-1].dim_value else 224
        count = synthetic_count_for(self.synthetic_count, size)
        images = synthetic_images(count, size=size, seed=self.seed)
        n_before = len(notes)
        stats = repair_with_data(
            model,
            tensors,
            todo,
            images,
            limit=count,
            preprocess=self._preprocess(model),
            refit=self.refit,
            notes=notes,
        )
        for i in range(n_before, len(notes)):
            if notes[i].startswith("consumer refit"):
                notes[i] = f"ar (synthetic:{count}) " + notes[i]
        if stats:
            notes.append(f"ar (synthetic:{count}): statistics matched in {len(stats)} group(s)")
        if self.refit in (False, "none") and any(p.group.kind in SYNTHETIC_REFIT_KINDS for p in todo):
            notes.append("ar: refit none: mlp/heads groups left as folded")
        return stats

    # ------------------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto | LoadedModel) -> FoldResult:
        t0 = time.perf_counter()
        file_size = None
        if isinstance(model, LoadedModel):
            file_size = model.file_size
            model = model.model
        groups = self._analyse(model)
        t_analysis = time.perf_counter() - t0
        by_id = {g.id: g for g in groups}
        ratios, skipped, kind_ratios = self._select(groups, model)
        ref_shapes = mac_shapes(model)
        before = model_stats(model, file_size, reference=ref_shapes, probe=False)

        reference = verify_reference(model) if self.verify else None
        synthetic = self.repair == "ar" and any(
            by_id[i].kind in SYNTHETIC_REFIT_KINDS + SYNTHETIC_STATS_KINDS for i, r in ratios.items() if r > 0
        )
        if self.inplace and self.repair != "data" and not synthetic:
            out = model  # the caller gave the model away: no second copy in memory
        else:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        tensors = ModelTensors(out, dealias=True)
        reports: list[GroupReport] = []
        plans: list[GroupPlan] = []
        todo = [by_id[i] for i in sorted(ratios)]
        for g in _progress(todo, self.progress, f"{self.method} groups"):
            ratio = ratios[g.id]
            k = kept_channels(g, ratio, self.round_to)
            if k >= g.channels:
                if ratio > 0 and self.target_params is None:
                    why = f"ratio {ratio:g} removes no channel of {g.channels}" + (
                        f" (kept at a multiple of {self.round_to}; --round-to 1 to fold it)"
                        if nx.target_channels(g.channels, ratio) < g.channels
                        else ""
                    )
                    skipped.append(SkippedGroup(g.id, g.kind.value, g.name, why))
                continue
            try:
                plan = plan_group(
                    tensors,
                    g,
                    k,
                    method=self.method,
                    repair=self.repair if self.repair == "ar" else "none",
                    seed=self.seed,
                    n_init=self.n_init,
                    mlp_correction=self.mlp_correction,
                )
                write_group(tensors, g, plan.merged, plan.k)
                for node, tensor, delta in plan.extra:
                    add_to_tensor(tensors, node, tensor, delta, f"g{g.id}")
                # written: keep only what the report and data repair need (the float64 merged
                # slices of every group held to the end cost ~1.5x a ViT-B's weights)
                plan.merged, plan.extra = {}, []
            except PassError as exc:
                skipped.append(SkippedGroup(g.id, g.kind.value, g.name, str(exc)))
                logger.warning("group %d (%s) skipped: %s", g.id, g.name, exc)
                continue
            plans.append(plan)
            if g.norms and g.kind == GroupKind.RESIDUAL and self.weighted_norms and self.method == "fold":
                plan.notes.extend(weight_norms(tensors, g, plan.merge.sizes))
                plan.notes.append(f"{len(g.norms)} LayerNorm(s) weighted by n_c/n")
            f = plan.repair_factors
            reports.append(
                GroupReport(
                    id=g.id,
                    kind=g.kind.value,
                    name=g.name,
                    channels_before=g.channels,
                    channels_after=plan.k,
                    unit=g.unit,
                    ratio=ratio,
                    method=self.method,
                    repair=plan.repair,
                    distortion=round(float(plan.distortion), 6),
                    repair_factor_min=None if f is None else float(f.min()),
                    repair_factor_mean=None if f is None else float(f.mean()),
                    repair_factor_max=None if f is None else float(f.max()),
                    notes=plan.notes,
                )
            )
        clear_value_info(out)
        notes: list[str] = []
        stats: dict[int, np.ndarray] = {}
        if synthetic and plans:
            stats = self._repair_synthetic(model, tensors, plans, notes)
        if self.repair == "data" and plans:
            from foldonnx.passes.fold.repair_data import repair_with_data

            stats = repair_with_data(
                model,
                tensors,
                plans,
                self.calib,
                limit=self.calib_limit,
                preprocess=self._preprocess(model),
                refit=self.refit,
                notes=notes,
            )
        by_gid = {r.id: r for r in reports}
        for gid, fac in stats.items():
            r = by_gid[gid]
            r.repair = self.repair
            r.repair_factor_min, r.repair_factor_mean, r.repair_factor_max = (
                float(fac.min()),
                float(fac.mean()),
                float(fac.max()),
            )
        if self.verify:
            verify_model(reference, out)
        after = model_stats(out, reference=ref_shapes, probe=False)
        if self.target_params is not None:
            reached = 1.0 - after.params / max(before.params, 1)
            if abs(reached - self.target_params) > 0.01:
                notes.append(
                    f"target-params {self.target_params:g} reached {reached:.3f}: channel counts "
                    f"move in steps of {self.round_to} (--round-to 1 for finer steps)"
                    if self.round_to > 1
                    else f"target-params {self.target_params:g} reached {reached:.3f}"
                )
                logger.warning(notes[-1])
        report = FoldReport(
            method=self.method,
            repair=self.repair,
            seed=self.seed,
            ratio=self.ratio,
            target_params=self.target_params,
            kind_ratios=kind_ratios,
            before=before,
            after=after,
            groups=reports,
            skipped=skipped,
            seconds=round(time.perf_counter() - t0, 3),
            analysis_seconds=round(t_analysis, 3),
            notes=notes,
        )
        logger.info(
            "%s: %d groups, params %d -> %d (%.1f%% removed) in %.1f s",
            self.method,
            len(reports),
            before.params,
            after.params,
            100 * report.params_removed,
            report.seconds,
        )
        return FoldResult(model=out, report=report)


def synthetic_count_for(count: int, size: int, base: int = 224) -> int:
    """Synthetic images for an input of ``size`` px: *count* at ``base`` px or less, fewer for
    larger inputs so the pixels (and the tokens a ViT makes of them) stay about the same — SAM
    at 1024 px gets 4 images (16 384 tokens), not 64 that would take hours on a CPU."""
    if size <= base:
        return count
    return max(min(count, 4), int(round(count * (base / size) ** 2)))


def model_stats_params(model: onnx.ModelProto) -> int:
    from foldonnx.graph.stats import count_params

    return count_params(model)


def fold(
    model_or_path: onnx.ModelProto | LoadedModel | str | os.PathLike,
    ratio: float | None = None,
    *,
    target_params: float | None = None,
    groups: str | Sequence[str] | Mapping[str, float] | None = None,
    method: str = "fold",
    repair: str = "none",
    calib: Any = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold a model (ModelProto or path); returns ``(folded_model, report)``.

    ``calib`` is a data SOURCE string (see :func:`foldonnx.data.sources.load_source`), an
    ``ImageSet``/``TensorSet`` or an array of preprocessed inputs.
    """
    if isinstance(model_or_path, (str, os.PathLike, Path)):
        model_or_path = load_model(model_or_path)
    p = FoldPass(
        ratio,
        target_params=target_params,
        groups=groups,
        method=method,
        repair=repair,
        calib=calib,
        seed=seed,
        **kwargs,
    )
    res = p.run(model_or_path)
    return res.model, res.report
