"""``auto``: search the mix of folding, pruning, block approximation and low rank (then
quantization) that keeps a model closest to the original at a size, MAC or latency target.

No single method wins at every budget (ALGORITHMS.md §5: on DINOv2-S one replaced block is best
near 7 %, whitened low rank at 20 %, two blocks + low rank at 30–40 %; a naive fixed mix can
lose to its parts), so the mix is searched per model and budget:

1. **Data.** The calibration set is split: every ``holdout_every``-th sample is held out for
   scoring, the rest fits the passes. Evaluation data is never seen.
2. **Candidates** are recipes: an ordered list of passes (blocks → fold / prune → low rank),
   each with a share of the target. A step's share is turned into its own ``target_params``
   from the parameters the steps before it actually removed, so the last step lands on the
   target (block counts are discrete; later steps absorb the difference).
3. **Score**: fidelity of the candidate to the original on the held-out samples, the task
   inferred as ``eval`` does (token outputs: CLS cosine, patch cosine to break ties;
   classifiers: top-1 agreement, then KL; embeddings: cosine).
4. **Search**: every single method at the full target; then mixes of the best methods on a
   coarse grid of shares; then greedy refinement — shift a slice of the budget from one step
   to another while the held-out score improves — until ``budget_minutes`` runs out.
   Candidates sharing a prefix reuse its model (the prefix ran once), and the passes share one
   context, so calibration feeds and cached activations are computed once.
5. **MAC and latency targets**: the search runs on a parameter budget; the winner's budget is
   then corrected (secant steps) until its MACs, or its latency measured interleaved with the
   original (``foldonnx.runtime.bench``), meet the target.
6. **Result**: the winning recipe re-run on the whole calibration set, so ``fold-onnx compress
   --recipe`` with the same ``--calib`` reproduces it exactly; the recipe (every option spelled
   out) is what ``compress`` records in the model's metadata.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from foldonnx.errors import FoldOnnxError, PassError, UsageError
from foldonnx.passes.base import Change, Pass, PassContext, PassReport, Pipeline
from foldonnx.passes.config import PassConfig, check_fraction, option
from foldonnx.passes.registry import get_pass, list_passes, register_pass

__all__ = ["AutoPass", "AutoConfig", "AutoReport", "Candidate", "METHODS", "plot_candidates"]

logger = logging.getLogger(__name__)

#: method name -> (registered pass, options), in the order they run inside a recipe
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "blocks": ("blocks", {}),
    "fold": ("fold", {}),
    "prune": ("prune-l1", {}),
    "lowrank": ("lowrank", {}),
}
QUANTIZE = ("none", "dynamic", "static", "fp16")
#: shares of the target given to the first method of a two-method mix on the coarse grid
GRID = (0.25, 0.5, 0.75)
#: a candidate counts as meeting its parameter budget within this fraction of the parameters
TOLERANCE = 0.01


def _methods_text(value: Any) -> str:
    return ",".join(value) if isinstance(value, (list, tuple)) else str(value)


@dataclass(frozen=True)
class AutoConfig(PassConfig):
    """Options of ``auto`` (see module docstring)."""

    target_params: float | None = option(None, "fraction of the parameters to remove", metavar="F")
    target_macs: float | None = option(None, "fraction of the MACs to remove", metavar="F")
    target_latency: float | None = option(
        None, "latency of the result as a fraction of the original's (interleaved, e.g. 0.7)", metavar="R"
    )
    methods: str = option(
        "fold,prune,blocks,lowrank", "methods the search may mix", metavar="M,M", parse=_methods_text
    )
    quantize: str = option("none", "quantize the result (ONNX Runtime) after the search", choices=QUANTIZE)
    budget_minutes: float = option(20.0, "stop searching after this many minutes", metavar="MIN")
    holdout_every: int = option(4, "every N-th calibration sample is held out for scoring", metavar="N")
    calib_limit: int = option(256, "calibration samples used (fit + held out)", metavar="N")
    latency_iters: int = option(20, "interleaved rounds per latency measurement", metavar="N")
    seed: int = option(0, "seed of the passes")

    def validate(self) -> None:
        targets = [t for t in (self.target_params, self.target_macs, self.target_latency) if t is not None]
        if len(targets) > 1:
            raise UsageError("give one of target-params, target-macs or target-latency")
        check_fraction(self.target_params, "target-params")
        check_fraction(self.target_macs, "target-macs")
        if self.target_latency is not None and not 0.0 < self.target_latency <= 1.0:
            raise UsageError(f"target-latency must be in (0, 1], got {self.target_latency:g}")
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown or not self.method_list:
            raise UsageError(
                f"unknown method(s) {', '.join(unknown) or '-'} (choose from {', '.join(METHODS)})"
            )
        if (
            self.budget_minutes <= 0
            or self.holdout_every < 2
            or self.calib_limit < 4
            or self.latency_iters < 1
        ):
            raise UsageError(
                "budget-minutes > 0, holdout-every >= 2, calib-limit >= 4 and latency-iters >= 1"
            )

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def axis(self) -> str:
        if self.target_macs is not None:
            return "macs"
        if self.target_latency is not None:
            return "latency"
        return "params"


@dataclass
class Candidate:
    """One recipe tried: its steps (method and absolute share of the parameter budget), what
    it removed, and its held-out fidelity."""

    methods: list[str]
    shares: list[float]
    budget: float  # fraction of the parameters the candidate was asked to remove
    params_removed: float = 0.0
    macs_removed: float = 0.0
    latency_ratio: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    score: float = -math.inf
    seconds: float = 0.0
    recipe: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None
    chosen: bool = False
    stage: str = ""

    @property
    def label(self) -> str:
        return " + ".join(f"{m} {s:.3f}" for m, s in zip(self.methods, self.shares, strict=True))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        return d


@dataclass
class AutoReport(PassReport):
    """The search: every candidate tried, the chosen recipe, how it was scored."""

    axis: str = "params"
    target: float | None = None
    metric: str = ""
    holdout: int = 0
    fit: int = 0
    candidates: list[Candidate] = field(default_factory=list)
    recipe: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    steps: list[PassReport] = field(default_factory=list)
    search_seconds: float = 0.0

    def changes(self) -> list[Change]:
        return [c for s in self.steps for c in s.changes()]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d["steps"] = [s.to_dict() for s in self.steps]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AutoReport:
        from foldonnx.passes.registry import report_from_dict

        vals = cls._field_values(d)
        vals["candidates"] = [
            Candidate(**{k: v for k, v in c.items() if k != "label"}) for c in d.get("candidates", [])
        ]
        vals["steps"] = [report_from_dict(s) for s in d.get("steps", [])]
        return cls(**vals)


class _Scorer:
    """The original's outputs on the held-out samples, and the score of a candidate."""

    def __init__(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], threads: int | None) -> None:
        from foldonnx.evaluate.evaluation import Evaluator
        from foldonnx.evaluate.runner import ModelInputs

        self.evaluator = Evaluator(
            model, ModelInputs(dict(feeds), None, "held-out"), threads=threads, progress=False
        )
        out = self.evaluator.reference_out
        task = self.evaluator.task
        if task == "classifier":
            self.metric, self.tiebreak = "top1_agreement", "kl_div"
        elif task == "embedding" and out.ndim == 3:
            self.metric, self.tiebreak = "cls_cosine", "patch_cosine"
        elif task == "dense":
            self.metric, self.tiebreak = "cosine", "mask_iou"
        else:
            self.metric, self.tiebreak = "cosine", ""

    def score(self, model: onnx.ModelProto) -> tuple[float, dict[str, float]]:
        metrics = self.evaluator.evaluate(model, name="candidate").metrics
        main = metrics.get(self.metric, -math.inf)
        tie = metrics.get(self.tiebreak, 0.0) if self.tiebreak else 0.0
        if self.tiebreak == "kl_div":
            tie = -tie
        return float(main + 1e-3 * tie), metrics


class AutoPass(Pass):
    """Search the best mix of passes for a target (see module docstring)."""

    name = "auto"
    summary = (
        "search the mix of fold / prune / blocks / low rank (then quantize) for a size, MAC or latency target"
    )
    Config = AutoConfig
    Report = AutoReport
    budget: ClassVar[Mapping[str, str]] = {"params": "target_params", "macs": "target_macs"}

    @property
    def is_identity(self) -> bool:
        c = self.config
        return c.target_params == 0 or c.target_macs == 0 or c.target_latency == 1

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        c = self.config
        if c.target_params is None and c.target_macs is None and c.target_latency is None:
            raise UsageError("auto needs a target: --target-params F, --target-macs F or --target-latency R")
        missing = [m for m in c.method_list if METHODS[m][0] not in list_passes()]
        if len(missing) == len(c.method_list):
            raise PassError(f"none of the methods {c.methods} is available")

    # -- the search -------------------------------------------------------------------------
    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, AutoReport]:
        search = _Search(self.config, model, ctx)
        return search.run()

    def expanded_recipe(self, report: AutoReport) -> list[dict[str, dict[str, Any]]]:
        """The recipe this run chose (what ``compress`` records instead of ``auto``)."""
        return list(report.recipe)


class _Search:
    def __init__(self, config: AutoConfig, model: onnx.ModelProto, ctx: PassContext) -> None:
        self.c = config
        self.model = model
        self.ctx = ctx
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60.0 * config.budget_minutes
        # models of recipe prefixes, reused by candidates that share them (a few, least recently
        # used dropped first: each is a whole model in memory)
        self.memo: OrderedDict[tuple, onnx.ModelProto] = OrderedDict()
        self.memo_size = 6
        self.candidates: list[Candidate] = []
        self.p0 = ctx.stats(model).params
        self.m0 = ctx.stats(model).macs

    # -- data ------------------------------------------------------------------------------
    def _split(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]:
        source = self.ctx.calib if self.ctx.calib is not None else "synthetic:128"
        if self.ctx.calib is None:
            logger.warning("auto: no calibration data given: searching data-free on synthetic:128 images")
        feeds = self.ctx.child(calib=source).calibration(
            self.model, limit=self.c.calib_limit, seed=self.c.seed
        )
        n = len(next(iter(feeds.values())))
        if n < 4:
            raise UsageError(f"auto needs at least 4 calibration samples, got {n}")
        held = np.arange(n) % self.c.holdout_every == 0
        fit = {k: v[~held] for k, v in feeds.items()}
        out = {k: v[held] for k, v in feeds.items()}
        return fit, out, source

    # -- candidates ------------------------------------------------------------------------
    def _step_options(self, method: str, share_cum: float, removed: int, params_now: int) -> dict[str, Any]:
        name, base = METHODS[method]
        want = max(share_cum * self.p0 - removed, 0.0)
        frac = min(want / max(params_now, 1), 0.95)
        opts = {**base, "target_params": round(frac, 6)}
        entry = get_pass(name)
        if "seed" in entry.options():
            opts.setdefault("seed", self.c.seed)
        if method in ("fold", "prune") and self.data_repair:
            opts.setdefault("repair", "data")
        if "calib_limit" in entry.options():  # all fitting samples in the search, all of them after
            opts.setdefault("calib_limit", self.c.calib_limit)
        return opts

    def _run_candidate(
        self, methods: list[str], shares: list[float], stage: str
    ) -> tuple[Candidate, onnx.ModelProto | None]:
        cand = Candidate(
            methods=list(methods), shares=[round(s, 6) for s in shares], budget=round(sum(shares), 6)
        )
        cand.stage = stage
        t0 = time.perf_counter()
        current: onnx.ModelProto | None = self.model
        removed, prefix, cum = 0, (), 0.0
        recipe: list[dict[str, dict[str, Any]]] = []
        try:
            for m, s in zip(methods, shares, strict=True):
                cum += s
                name = METHODS[m][0]
                entry = get_pass(name)
                opts = self._step_options(m, cum, removed, self.ctx.stats(current).params)
                full = entry.make(opts).config.to_dict()  # every option spelled out, as recipes record
                prefix = (*prefix, (name, json.dumps(full, sort_keys=True)))
                if prefix in self.memo:
                    self.memo.move_to_end(prefix)
                else:
                    self.memo[prefix] = entry.make(full).run(current, self.fit_ctx).model
                    while len(self.memo) > self.memo_size:
                        self.memo.popitem(last=False)
                current = self.memo[prefix]
                removed = self.p0 - self.ctx.stats(current).params
                recipe.append({name: full})
            cand.params_removed = round(removed / max(self.p0, 1), 6)
            cand.macs_removed = round(1.0 - self.ctx.stats(current).macs / max(self.m0, 1), 6)
            cand.score, cand.metrics = self.scorer.score(current)
            cand.recipe = recipe
        except FoldOnnxError as exc:
            cand.error = str(exc)
            current = None
            logger.info("auto: %s failed: %s", cand.label, exc)
        cand.seconds = round(time.perf_counter() - t0, 2)
        self.candidates.append(cand)
        self._say(cand, stage)
        return cand, current

    def _say(self, cand: Candidate, stage: str) -> None:
        metric = self.scorer.metric
        what = (
            f"failed ({cand.error})" if cand.error else f"{metric} {cand.metrics.get(metric, math.nan):.4f}"
        )
        best = self.best()
        tail = f"; best: {best.label} {best.metrics.get(metric, math.nan):.4f}" if best else ""
        self.ctx.say(f"auto [{len(self.candidates)}] {stage}: {cand.label} -> {what}{tail}")

    def best(self) -> Candidate | None:
        """The highest held-out score among candidates that met the parameter budget they were
        given (within 1 point: a smaller model must not lose to one that removed less)."""
        ok = [c for c in self.candidates if c.error is None and math.isfinite(c.score)]
        on_target = [c for c in ok if c.params_removed >= c.budget - TOLERANCE]
        pool = on_target or ok
        return max(pool, key=lambda c: c.score) if pool else None

    def _time_left(self) -> bool:
        return time.perf_counter() < self.deadline

    def _order(self, methods: Sequence[str]) -> list[str]:
        order = list(METHODS)
        return sorted(methods, key=order.index)

    # -- stages ----------------------------------------------------------------------------
    def _singles(self, target: float) -> list[Candidate]:
        out = []
        for m in self.available:
            if not self._time_left() and out:
                break
            out.append(self._run_candidate([m], [target], "single")[0])
        return out

    def _mixes(self, target: float, singles: list[Candidate]) -> None:
        ranked = [
            c.methods[0] for c in sorted((c for c in singles if c.error is None), key=lambda c: -c.score)
        ]
        top = ranked[:3]
        pairs = [(a, b) for i, a in enumerate(top) for b in top[i + 1 :]]
        for a, b in pairs:
            first, second = self._order([a, b])
            for g in GRID:
                if not self._time_left():
                    return
                self._run_candidate([first, second], [g * target, (1 - g) * target], "mix")

    def _refine(self, target: float) -> None:
        step = target / 8
        tried = {tuple(zip(c.methods, c.shares, strict=True)) for c in self.candidates}
        improved = True
        while improved and self._time_left():
            improved = False
            best = self.best()
            if best is None:
                return
            moves = []
            for i in range(len(best.methods)):
                for j in range(len(best.methods)):
                    if i != j and best.shares[i] >= step - 1e-9:
                        shares = list(best.shares)
                        shares[i] -= step
                        shares[j] += step
                        moves.append((list(best.methods), shares))
            for m in self.available:  # a little of a method the mix does not use yet
                if m not in best.methods:
                    methods = self._order([*best.methods, m])
                    k = methods.index(m)
                    shares = [s * (1 - 1 / 8) for s in best.shares]
                    shares.insert(k, step)
                    moves.append((methods, shares))
            for methods, shares in moves:
                keep = [(m, s) for m, s in zip(methods, shares, strict=True) if s > 1e-9]
                key = tuple((m, round(s, 6)) for m, s in keep)
                if key in tried or not self._time_left():
                    continue
                tried.add(key)
                cand, _ = self._run_candidate([m for m, _ in keep], [s for _, s in keep], "refine")
                if cand.error is None and cand.score > best.score + 1e-6:
                    improved = True
                    break

    # -- targets on other axes -----------------------------------------------------------------
    def _latency_ratio(self, model: onnx.ModelProto) -> float:
        from foldonnx.runtime.bench import latency_vs

        r = latency_vs(self.model, model, iters=self.c.latency_iters)
        if not r.ok or r.latency_ratio is None:
            raise PassError(f"auto: latency of the candidate not measured: {r.reason}")
        return float(r.latency_ratio)

    def _axis_value(self, cand: Candidate, model: onnx.ModelProto) -> float:
        if self.c.axis == "macs":
            return cand.macs_removed
        if self.c.quantize != "none":  # the latency that counts is the quantized model's
            model = get_pass("quantize").make({"mode": self.c.quantize}).run(model, self.fit_ctx).model
        cand.latency_ratio = round(self._latency_ratio(model), 4)
        return cand.latency_ratio

    def _initial_budget(self) -> float:
        """The parameter budget the search starts from: the target itself, or for MACs / latency
        a first guess that they follow the parameters one to one (corrected at the end)."""
        c = self.c
        if c.axis == "params":
            return float(c.target_params)  # type: ignore[arg-type]
        if c.axis == "macs":
            return float(c.target_macs)  # type: ignore[arg-type]
        return float(np.clip(1.0 - c.target_latency, 0.01, 0.9))  # type: ignore[operator]

    def _meet_target(self, cand: Candidate, model: onnx.ModelProto) -> tuple[Candidate, onnx.ModelProto]:
        """Correct the parameter budget of the chosen mix until the MACs / latency target holds."""
        goal = float(self.c.target_macs if self.c.axis == "macs" else self.c.target_latency)  # type: ignore[arg-type]
        tol = 0.005 if self.c.axis == "macs" else 0.02
        tried: list[tuple[Candidate, onnx.ModelProto, float]] = []
        cur, cur_model = cand, model
        for _ in range(5):
            value = self._axis_value(cur, cur_model)
            tried.append((cur, cur_model, value))
            if abs(value - goal) <= tol:
                break
            if len(tried) >= 2 and tried[-1][2] != tried[-2][2]:
                (c1, _, v1), (c2, _, v2) = tried[-2], tried[-1]
                nb = c2.budget + (goal - v2) * (c2.budget - c1.budget) / (v2 - v1)
            else:  # first correction: MACs / latency follow the parameters about one to one
                sign = 1.0 if self.c.axis == "macs" else -1.0
                nb = cur.budget + sign * (goal - value)
            nb = float(np.clip(nb, 0.005, 0.9))
            scale = nb / max(cur.budget, 1e-9)
            nxt, nxt_model = self._run_candidate(
                cur.methods, [s * scale for s in cur.shares], f"{self.c.axis} target"
            )
            if nxt_model is None:
                break
            cur, cur_model = nxt, nxt_model
        best = min(tried, key=lambda t: abs(t[2] - goal))
        return best[0], best[1]

    # -- run -------------------------------------------------------------------------------
    def run(self) -> tuple[onnx.ModelProto, AutoReport]:
        c = self.c
        fit, held, source = self._split()
        self.n_fit = len(next(iter(fit.values())))
        self.data_repair = not (isinstance(source, str) and source.startswith("synthetic"))
        self.fit_ctx = self.ctx.child(  # the passes' own progress lines stay quiet during the search
            calib=fit, verify=False, progress=False, file_size=None, donate_input=False, on_progress=None
        )
        self.scorer = _Scorer(self.model, held, self.ctx.threads)
        self.available = [m for m in c.method_list if METHODS[m][0] in list_passes()]
        target = self._initial_budget()
        singles = self._singles(target)
        self.available = [cd.methods[0] for cd in singles if cd.error is None] or self.available
        if self._time_left():
            self._mixes(target, singles)
        if self._time_left():
            self._refine(target)
        best = self.best()
        if best is None:
            errors = "; ".join(f"{cd.label}: {cd.error}" for cd in self.candidates[:4])
            raise PassError(f"auto: no candidate worked ({errors})")
        if c.axis != "params":
            _, model = self._run_candidate(best.methods, best.shares, "chosen")
            if model is not None:
                best, _ = self._meet_target(self.candidates[-1], model)
        best.chosen = True
        search_seconds = time.perf_counter() - self.t0
        # the winner, re-run from scratch on the whole calibration set: what --recipe reproduces
        recipe = list(best.recipe)
        if c.quantize != "none":
            recipe.append({"quantize": get_pass("quantize").make({"mode": c.quantize}).config.to_dict()})
        final_ctx = self.ctx.child(calib=source, verify=False, progress=self.ctx.progress, file_size=None,
                                   donate_input=False)  # fmt: skip
        from foldonnx.passes.recipe import build_passes, load_recipe

        result = Pipeline(build_passes(load_recipe(recipe))).run(self.model, final_ctx)
        n_held = len(next(iter(held.values())))
        source_text = source if isinstance(source, str) else "the given data"
        best_value = best.metrics.get(self.scorer.metric, math.nan)
        report = AutoReport(
            name="auto",
            config=c.to_dict(),
            before=self.ctx.stats(self.model),
            after=self.ctx.stats(result.model),
            axis=c.axis,
            target=c.target_params
            if c.axis == "params"
            else (c.target_macs if c.axis == "macs" else c.target_latency),
            metric=self.scorer.metric,
            holdout=n_held,
            fit=self.n_fit,
            candidates=self.candidates,
            recipe=recipe,
            steps=list(result.report.steps),  # type: ignore[attr-defined]
            search_seconds=round(search_seconds, 1),
            notes=[
                f"searched {len(self.candidates)} candidates in {search_seconds / 60:.1f} min on "
                f"{self.n_fit} fitting / {n_held} held-out samples of {source_text}",
                f"chosen: {best.label} ({self.scorer.metric} {best_value:.4f} held out)",
            ],
        )
        return result.model, report


register_pass(AutoPass)


def plot_candidates(report: AutoReport, path: Any) -> None:
    """Pareto PNG of every candidate: held-out fidelity against parameters, MACs and (when
    measured) latency removed; the chosen one marked."""
    from foldonnx.extras import require

    require("matplotlib", "the candidates plot").use("Agg")
    plt = require("matplotlib.pyplot", "the candidates plot")
    ok = [c for c in report.candidates if c.error is None]
    axes_spec = [("params_removed", "parameters removed"), ("macs_removed", "MACs removed")]
    if any(c.latency_ratio is not None for c in ok):
        axes_spec.append(("latency_ratio", "latency ratio"))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5 * len(axes_spec), 4.2), squeeze=False)
    stages = sorted({c.stage for c in ok})
    markers = dict(zip(stages, "osD^v<>p", strict=False))
    for ax, (attr, label) in zip(axes[0], axes_spec, strict=True):
        for st in stages:
            pts = [(getattr(c, attr), c.metrics.get(report.metric)) for c in ok if c.stage == st]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=markers[st], label=st, alpha=0.75)
        for cd in ok:
            if cd.chosen and getattr(cd, attr) is not None:
                ax.scatter([getattr(cd, attr)], [cd.metrics.get(report.metric)], s=220, facecolors="none",
                           edgecolors="red", linewidths=2, label="chosen")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel(f"{report.metric} (held out)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"fold-onnx auto: {len(ok)} candidates, target {report.axis} {report.target}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
