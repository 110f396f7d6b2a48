"""The fold pass: cluster-and-merge (or magnitude-prune) channel groups of an ONNX model.

:class:`FoldPass` is registered as ``fold`` and, with the method fixed, as ``prune-l1`` /
``prune-l2`` (structured magnitude pruning of the same groups: the baseline) and with the
data-free repair fixed as ``fold-ar`` / ``prune-l1-ar``. :func:`fold` is the functional API
mirroring ``fold-onnx fold``. The input model is never modified (unless the caller donates it,
``PassContext(donate_input=True)``, as the CLI does to save one copy of a large model).

Stages of one run: analyse (channel groups) → select the groups of the chosen kinds and their
ratios (per kind, or allocated for a parameter target) → plan and write each group (merge
matrix, merged slices, copy-on-write) → repair (Fold-AR / synthetic or data refit) → report.

Repair stays an option of this pass rather than a pass of its own: every repair needs the fold's
merge matrices (cluster sizes and members) and runs on the folded model against the original,
so a separate pass would have to carry both models and the plans across the pass boundary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from foldonnx.analysis.channel_groups import ChannelGroup, GroupKind
from foldonnx.data.sources import Preprocess, read_preprocess
from foldonnx.errors import PassError, UsageError
from foldonnx.graph.stats import ModelStats
from foldonnx.graph.tensors import ModelTensors, clear_value_info
from foldonnx.numerics import merge as nx
from foldonnx.numerics.lsq import REFIT_MODES
from foldonnx.onnx_file import LoadedModel, load_model
from foldonnx.passes.base import Change, Pass, PassContext, PassReport, PassResult, Skipped
from foldonnx.passes.config import PassConfig, check_fraction, option
from foldonnx.passes.fold.plan import METHODS, REPAIRS, GroupPlan, kept_channels, plan_group
from foldonnx.passes.fold.rewrite import add_to_tensor, weight_norms, write_group
from foldonnx.passes.registry import register_pass

__all__ = [
    "FoldPass",
    "FoldConfig",
    "FoldReport",
    "GroupReport",
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
            part = str(part).strip()
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
            check_fraction(value, f"ratio for {name}")
        out[name] = value
    return out


def _group_spec_text(value: Any) -> str | None:
    """A recipe's ``groups`` (``"mlp,heads"``, ``[mlp, heads]`` or ``{mlp: 0.3}``) as the
    CLI's spec string."""
    if value is None:
        return None
    spec = parse_group_spec(value if not isinstance(value, str) else value)
    return ",".join(k if v is None else f"{k}={v:g}" for k, v in spec.items())


@dataclass(frozen=True)
class FoldConfig(PassConfig):
    """Options of ``fold`` / ``prune-*`` (see :class:`FoldPass`)."""

    ratio: float | None = option(None, "fraction of the channels removed in every selected group")
    target_params: float | None = option(
        None,
        "fraction of the model's parameters to remove; per-group ratios by a data-free criterion",
        metavar="F",
    )
    groups: str | None = option(
        None,
        "kinds to fold: mlp,heads,residual,conv,depthwise,se (default: all but residual); "
        "per-kind ratios as mlp=0.3,heads=0.2",
        metavar="KINDS",
        parse=_group_spec_text,
    )
    method: str = option("fold", "fold (cluster + merge) or structured magnitude pruning", choices=METHODS)
    repair: str = option(
        "none",
        "none; ar = data-free (Fold-AR on BatchNorm groups; mlp/heads consumers refit and BN-less "
        "conv groups statistics-matched on synthetic noise images); data = statistics matching + "
        "refit on the calibration images (--calib)",
        choices=REPAIRS,
    )
    refit: str = option(
        "ridge",
        "consumer refit of mlp/heads groups (fc2, attention out-proj) in the repair: ridge least "
        "squares, bias only, none",
        choices=REFIT_MODES,
    )
    calib_limit: int = option(64, "calibration images used by --repair data", metavar="N")
    synthetic_count: int = option(
        64, "synthetic images of --repair ar (fewer for inputs over 224 px)", metavar="N"
    )
    round_to: int = option(
        8,
        "keep channel counts of neuron/conv groups at multiples of N (keeps ORT's blocked CPU kernels "
        "and GPU tensor cores in use; 1 = off); widths not divisible by N are left as they are",
        metavar="N",
    )
    seed: int = option(0, "seed of the clustering and of generated calibration images")
    n_init: int = option(3, "k-means restarts", cli=False)
    weighted_norms: bool = option(
        True, "residual stream: weight merged channels by n_c/n in LayerNorms", cli=False
    )
    mlp_correction: bool = option(False, "ar: mean correction of merged MLP units", cli=False)

    def validate(self) -> None:
        check_fraction(self.ratio, "ratio")
        check_fraction(self.target_params, "target-params")
        if self.ratio is not None and self.target_params is not None:
            raise UsageError("give either a ratio or target-params, not both")
        spec = parse_group_spec(self.groups)
        if (
            self.ratio is None
            and self.target_params is None
            and not any(v is not None for v in spec.values())
        ):
            raise UsageError("give --ratio R, --target-params F or per-kind ratios in --groups (mlp=0.3)")
        if self.round_to < 1:
            raise UsageError(f"round-to must be >= 1, got {self.round_to}")
        if self.calib_limit < 1 or self.synthetic_count < 1:
            raise UsageError("calib-limit and synthetic-count must be >= 1")
        if self.seed < 0:
            raise UsageError(f"seed must be >= 0, got {self.seed}")
        if self.n_init < 1:
            raise UsageError(f"n-init must be >= 1, got {self.n_init}")


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
class FoldReport(PassReport):
    """What a fold did: sizes before/after, per group, skipped groups, time."""

    method: str = "fold"
    repair: str = "none"
    seed: int = 0
    ratio: float | None = None
    target_params: float | None = None
    kind_ratios: dict[str, float] = field(default_factory=dict)
    groups: list[GroupReport] = field(default_factory=list)
    analysis_seconds: float = 0.0

    def changes(self) -> list[Change]:
        return [
            Change(
                what=g.name or f"group {g.id}",
                kind=g.kind,
                before=f"{g.channels_before}" + (f"x{g.unit}" if g.unit > 1 else ""),
                after=f"{g.channels_after}" + (f"x{g.unit}" if g.unit > 1 else ""),
                detail={"id": g.id, "ratio": g.ratio, "distortion": g.distortion, "repair": g.repair},
            )
            for g in self.groups
        ]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FoldReport:
        vals = cls._field_values(d)
        vals["groups"] = [GroupReport(**g) for g in d.get("groups", [])]
        vals.setdefault("name", "fold")
        vals.setdefault("config", {})
        return cls(**vals)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> FoldReport:
        return cls.from_dict(json.loads(text))


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="group", leave=False)


@dataclass
class _Selection:
    """The groups a run folds, their ratios, and what was left out."""

    ratios: dict[int, float]
    skipped: list[Skipped]
    kind_ratios: dict[str, float]


class FoldPass(Pass):
    """Fold (cluster + merge) or magnitude-prune the channel groups of a model.

    The options are :class:`FoldConfig`'s: ``ratio`` (fraction of channels removed in every
    selected group) or ``target_params`` (fraction of the model's parameters, per-group ratios
    from :func:`foldonnx.passes.fold.allocation.allocate_ratios`); ``groups`` selects kinds and
    optional per-kind ratios; ``method`` is ``fold``, ``prune-l1`` or ``prune-l2``; ``repair``
    is ``none``, ``ar`` (data-free) or ``data`` (needs calibration data in the context).
    ``round_to`` (8) rounds the channels kept by single-channel groups to a multiple of it:
    unaligned widths knock ONNX Runtime's CPU convolutions off their blocked kernels
    (EfficientNet-Lite0 folded 30 %: 0.56x the original's speed unrounded, 1.42x faster rounded
    to 8; benchmarks/runtime.md).

    ``channel_groups`` skips the analysis (groups computed elsewhere, e.g. in tests).
    """

    name = "fold"
    summary = "model folding: k-means cluster the channels of each group, merge them"
    Config = FoldConfig
    Report = FoldReport
    budget: ClassVar[Mapping[str, str]] = {"params": "target_params", "channels": "ratio"}

    def __init__(
        self,
        config: FoldConfig | None = None,
        *,
        channel_groups: Sequence[ChannelGroup] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(config, **options)
        self.channel_groups = list(channel_groups) if channel_groups is not None else None

    @property
    def kind_spec(self) -> dict[str, float | None]:
        return parse_group_spec(self.config.groups)

    @property
    def is_identity(self) -> bool:
        c = self.config
        fixed = [v for v in self.kind_spec.values() if v is not None]
        return (c.ratio in (None, 0) and c.target_params in (None, 0)) and all(v == 0 for v in fixed)

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        if self.config.repair == "data" and ctx.calib is None:
            raise UsageError("--repair data needs calibration data (--calib SOURCE)")

    # -- stages ----------------------------------------------------------------------------
    def analyse(self, model: onnx.ModelProto) -> list[ChannelGroup]:
        if self.channel_groups is not None:
            return list(self.channel_groups)
        from foldonnx.analysis import find_channel_groups

        return list(find_channel_groups(model))

    def select(self, groups: list[ChannelGroup], model: onnx.ModelProto, ctx: PassContext) -> _Selection:
        """The groups to fold and their ratios (per kind, or allocated for target_params)."""
        c = self.config
        spec = self.kind_spec
        present = {g.kind.value for g in groups}
        if spec:
            missing = [k for k in spec if k not in present]
            if missing:
                raise UsageError(
                    f"the model has no {', '.join(missing)} groups "
                    f"(it has: {', '.join(sorted(present)) or 'none'})"
                )
            kinds = list(spec)
        else:
            kinds = [k for k in DEFAULT_KINDS if k in present]
        skipped: list[Skipped] = []
        chosen: list[ChannelGroup] = []
        for g in groups:
            if g.kind.value not in kinds:
                continue
            if not g.foldable:
                skipped.append(Skipped(g.name, g.blocked or "blocked", g.kind.value, g.id))
            elif g.channels < 2:
                skipped.append(Skipped(g.name, "fewer than 2 channels", g.kind.value, g.id))
            else:
                chosen.append(g)
        if not chosen:
            raise PassError(f"no foldable groups of kind {', '.join(kinds) or '-'} in the model")
        if c.target_params is not None:
            from foldonnx.passes.fold.allocation import allocate_ratios

            fixed = {k: v for k, v in spec.items() if v is not None}
            ratios = allocate_ratios(
                ModelTensors(model),
                chosen,
                c.target_params,
                total_params=ctx.stats(model).params,
                fixed=fixed,
                method=c.method,
                seed=c.seed,
                round_to=c.round_to,
            )
            return _Selection(ratios, skipped, fixed)
        kind_ratios: dict[str, float] = {}
        for k in kinds:
            v = spec.get(k)
            r = c.ratio if v is None else v
            if r is None:
                raise UsageError(f"no ratio for group kind {k!r}: give --ratio or {k}=R")
            kind_ratios[k] = r
        return _Selection({g.id: kind_ratios[g.kind.value] for g in chosen}, skipped, kind_ratios)

    def preprocess(self, model: onnx.ModelProto, ctx: PassContext) -> Preprocess | None:
        """How calibration images become inputs: as the context gives, else as recorded in the
        model's metadata by ``fold-onnx export``, else (None) ImageNet mean/std at the input size."""
        if ctx.preprocess is not None:
            return ctx.preprocess
        return read_preprocess(model)

    def _fold_groups(
        self, tensors: ModelTensors, todo: list[ChannelGroup], sel: _Selection, progress: bool
    ) -> tuple[list[GroupPlan], list[GroupReport]]:
        """Plan and write every group; groups a pass cannot fold are added to ``sel.skipped``."""
        c = self.config
        plans: list[GroupPlan] = []
        reports: list[GroupReport] = []
        for g in _progress(todo, progress, f"{c.method} groups"):
            ratio = sel.ratios[g.id]
            k = kept_channels(g, ratio, c.round_to)
            if k >= g.channels:
                if ratio > 0 and c.target_params is None:
                    why = f"ratio {ratio:g} removes no channel of {g.channels}" + (
                        f" (kept at a multiple of {c.round_to}; --round-to 1 to fold it)"
                        if nx.target_channels(g.channels, ratio) < g.channels
                        else ""
                    )
                    sel.skipped.append(Skipped(g.name, why, g.kind.value, g.id))
                continue
            try:
                plan = plan_group(
                    tensors,
                    g,
                    k,
                    method=c.method,
                    repair=c.repair if c.repair == "ar" else "none",
                    seed=c.seed,
                    n_init=c.n_init,
                    mlp_correction=c.mlp_correction,
                )
                write_group(tensors, g, plan.merged, plan.k)
                for node, tensor, delta in plan.extra:
                    add_to_tensor(tensors, node, tensor, delta, f"g{g.id}")
                # written: keep only what the report and data repair need (the float64 merged
                # slices of every group held to the end cost ~1.5x a ViT-B's weights)
                plan.merged, plan.extra = {}, []
            except PassError as exc:
                sel.skipped.append(Skipped(g.name, str(exc), g.kind.value, g.id))
                logger.warning("group %d (%s) skipped: %s", g.id, g.name, exc)
                continue
            plans.append(plan)
            if g.norms and g.kind == GroupKind.RESIDUAL and c.weighted_norms and c.method == "fold":
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
                    method=c.method,
                    repair=plan.repair,
                    distortion=round(float(plan.distortion), 6),
                    repair_factor_min=None if f is None else float(f.min()),
                    repair_factor_mean=None if f is None else float(f.mean()),
                    repair_factor_max=None if f is None else float(f.max()),
                    notes=plan.notes,
                )
            )
        return plans, reports

    def _repair_synthetic(
        self,
        model: onnx.ModelProto,
        tensors: ModelTensors,
        plans: list[GroupPlan],
        notes: list[str],
        ctx: PassContext,
    ) -> dict[int, np.ndarray]:
        """The data-free part of ``repair="ar"`` for groups Fold-AR cannot repair: the data
        repair (:func:`~foldonnx.passes.fold.repair_data.repair_with_data`: consumer refit of
        MLP / heads groups, statistics matching of conv groups without BatchNorm members)
        calibrated on synthetic images made from random numbers only
        (:func:`~foldonnx.data.calibration.synthetic_images`). Models whose input is not an
        image are left as folded, with a note. Returns the scale factors per group."""
        from foldonnx.data.calibration import synthetic_images
        from foldonnx.data.feeds import graph_inputs
        from foldonnx.passes.fold.repair_data import repair_with_data

        todo = [
            p
            for p in plans
            if p.group.kind in SYNTHETIC_REFIT_KINDS
            or (p.group.kind in SYNTHETIC_STATS_KINDS and p.repair_factors is None)
        ]
        if not todo:
            return {}
        inputs = graph_inputs(model)
        dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
        if len(dims) != 4 or (dims[1].HasField("dim_value") and dims[1].dim_value != 3):
            notes.append(
                "ar: no data-free repair of groups without BatchNorm (the model input is not an image)"
            )
            return {}
        size = dims[-1].dim_value if dims[-1].HasField("dim_value") and dims[-1].dim_value > 0 else 224
        count = synthetic_count_for(self.config.synthetic_count, size)
        images = synthetic_images(count, size=size, seed=self.config.seed)
        n_before = len(notes)
        stats = repair_with_data(
            model,
            tensors,
            todo,
            images,
            limit=count,
            preprocess=self.preprocess(model, ctx),
            refit=self.config.refit,
            notes=notes,
            progress=ctx.progress,
        )
        for i in range(n_before, len(notes)):
            if notes[i].startswith("consumer refit"):
                notes[i] = f"ar (synthetic:{count}) " + notes[i]
        if stats:
            notes.append(f"ar (synthetic:{count}): statistics matched in {len(stats)} group(s)")
        if self.config.refit == "none" and any(p.group.kind in SYNTHETIC_REFIT_KINDS for p in todo):
            notes.append("ar: refit none: mlp/heads groups left as folded")
        return stats

    def _repair(
        self,
        model: onnx.ModelProto,
        tensors: ModelTensors,
        plans: list[GroupPlan],
        reports: list[GroupReport],
        notes: list[str],
        ctx: PassContext,
    ) -> None:
        c = self.config
        stats: dict[int, np.ndarray] = {}
        if c.repair == "ar" and plans and self._needs_synthetic(plans):
            stats = self._repair_synthetic(model, tensors, plans, notes, ctx)
        if c.repair == "data" and plans:
            from foldonnx.passes.fold.repair_data import repair_with_data

            stats = repair_with_data(
                model,
                tensors,
                plans,
                ctx.calib,
                limit=c.calib_limit,
                preprocess=self.preprocess(model, ctx),
                refit=c.refit,
                notes=notes,
                progress=ctx.progress,
            )
        by_gid = {r.id: r for r in reports}
        for gid, fac in stats.items():
            r = by_gid[gid]
            r.repair = c.repair
            r.repair_factor_min, r.repair_factor_mean, r.repair_factor_max = (
                float(fac.min()),
                float(fac.mean()),
                float(fac.max()),
            )

    @staticmethod
    def _needs_synthetic(plans: Iterable[GroupPlan]) -> bool:
        return any(p.group.kind in SYNTHETIC_REFIT_KINDS + SYNTHETIC_STATS_KINDS for p in plans)

    # -- the pass --------------------------------------------------------------------------
    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, FoldReport]:
        c = self.config
        t0 = time.perf_counter()
        groups = self.analyse(model)
        t_analysis = time.perf_counter() - t0
        by_id = {g.id: g for g in groups}
        sel = self.select(groups, model, ctx)
        needs_original = c.repair == "data" or (
            c.repair == "ar" and any(by_id[i].kind in SYNTHETIC_REFIT_KINDS + SYNTHETIC_STATS_KINDS
                                     for i, r in sel.ratios.items() if r > 0)
        )  # fmt: skip
        if ctx.donate_input and not needs_original:
            out = model  # the caller gave the model away: no second copy in memory
        else:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        tensors = ModelTensors(out, dealias=True)
        todo = [by_id[i] for i in sorted(sel.ratios)]
        plans, reports = self._fold_groups(tensors, todo, sel, ctx.progress)
        clear_value_info(out)
        notes: list[str] = []
        self._repair(model, tensors, plans, reports, notes, ctx)
        empty = ModelStats(0, 0, 0)  # run() fills in the sizes
        report = FoldReport(
            name=self.name,
            config=c.to_dict(),
            before=empty,
            after=empty,
            method=c.method,
            repair=c.repair,
            seed=c.seed,
            ratio=c.ratio,
            target_params=c.target_params,
            kind_ratios=sel.kind_ratios,
            groups=reports,
            skipped=sel.skipped,
            analysis_seconds=round(t_analysis, 3),
            notes=notes,
        )
        return out, report

    def run(self, model: onnx.ModelProto | LoadedModel, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        if isinstance(model, LoadedModel):
            ctx = ctx.child(file_size=model.file_size)
            model = model.model
        result = super().run(model, ctx)
        report = result.report
        c = self.config
        if c.target_params is not None:
            reached = report.params_removed
            if abs(reached - c.target_params) > 0.01:
                report.notes.append(
                    f"target-params {c.target_params:g} reached {reached:.3f}: channel counts "
                    f"move in steps of {c.round_to} (--round-to 1 for finer steps)"
                    if c.round_to > 1
                    else f"target-params {c.target_params:g} reached {reached:.3f}"
                )
                logger.info(report.notes[-1])
        return result


def synthetic_count_for(count: int, size: int, base: int = 224) -> int:
    """Synthetic images for an input of ``size`` px: *count* at ``base`` px or less, fewer for
    larger inputs so the pixels (and the tokens a ViT makes of them) stay about the same — SAM
    at 1024 px gets 4 images (16 384 tokens), not 64 that would take hours on a CPU."""
    if size <= base:
        return count
    return max(min(count, 4), int(round(count * (base / size) ** 2)))


def fold(
    model_or_path: onnx.ModelProto | LoadedModel | str | os.PathLike,
    ratio: float | None = None,
    *,
    target_params: float | None = None,
    groups: str | Sequence[str] | Mapping[str, float] | None = None,
    method: str = "fold",
    repair: str = "none",
    calib: Any = None,
    calib_preprocess: Preprocess | None = None,
    channel_groups: Sequence[ChannelGroup] | None = None,
    verify: bool = True,
    progress: bool = False,
    **options: Any,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold a model (ModelProto, LoadedModel or path); returns ``(folded_model, report)``.

    ``calib`` is a data SOURCE string (see :func:`foldonnx.data.sources.load_source`), an
    ``ImageSet``/``TensorSet`` or an array of preprocessed inputs; other options are
    :class:`FoldConfig`'s (``round_to``, ``refit``, ``seed``, …). The input is not modified.
    """
    if isinstance(model_or_path, (str, os.PathLike, Path)):
        model_or_path = load_model(model_or_path)
    if ratio is not None and not isinstance(ratio, (int, float)):
        raise UsageError(f"ratio must be a number, got {ratio!r}")
    if groups is not None and not isinstance(groups, str):
        groups = _group_spec_text(groups)
    p = FoldPass(
        ratio=ratio,
        target_params=target_params,
        groups=groups,
        method=method,
        repair=repair,
        channel_groups=channel_groups,
        **options,
    )
    ctx = PassContext(calib=calib, preprocess=calib_preprocess, verify=verify, progress=progress)
    res = p.run(model_or_path, ctx)
    return res.model, res.report  # type: ignore[return-value]


register_pass(FoldPass)
register_pass(
    FoldPass,
    name="prune-l1",
    preset={"method": "prune-l1"},
    summary="structured magnitude pruning: keep the channels of largest L1 norm (the baseline)",
)
register_pass(
    FoldPass,
    name="prune-l2",
    preset={"method": "prune-l2"},
    summary="structured magnitude pruning: keep the channels of largest L2 norm",
)
register_pass(
    FoldPass,
    name="fold-ar",
    preset={"repair": "ar"},
    summary="model folding with the data-free repair: Fold-AR on BatchNorm groups, mlp/heads "
    "consumers refit on synthetic images",
)
register_pass(
    FoldPass,
    name="prune-l1-ar",
    preset={"method": "prune-l1", "repair": "ar"},
    summary="L1 magnitude pruning with the same data-free repair as fold-ar",
)
