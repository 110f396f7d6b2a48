"""The pass interface every rewrite of fold-onnx implements, and the pipeline that composes them.

A **pass** is a small class (``NounVerbPass`` naming, as onnx_ir does):

* ``name`` and ``Config`` — a frozen :class:`~foldonnx.passes.config.PassConfig` whose fields
  are the pass's CLI flags, recipe options and sweep options;
* ``requires(model, ctx)`` — refuses a model it cannot work on, with the reason
  (:class:`~foldonnx.errors.PassError`), before any work;
* ``apply(model, ctx) -> (model, report)`` — the rewrite; it must not mutate *model*;
* ``run(model, ctx) -> PassResult`` — the template every caller uses: ``requires``, sizes
  before (:func:`~foldonnx.graph.stats.model_stats`), ``apply``, sizes after, time, and — when
  run on its own — the checks of :mod:`foldonnx.graph.verify`.

A report (:class:`PassReport`, subclassed per pass for its typed details) carries the pass
name, its config, parameters / MACs / bytes before and after, what changed (:class:`Change`),
what was skipped and why (:class:`Skipped`), notes and time.

:class:`Pipeline` runs passes in order, each on the previous output, keeps intermediate models
in memory, verifies once at the end (onnx.checker, same input/output names, ONNX Runtime runs
it, same output shapes) and, given check data, measures fidelity to the input model after each
pass. An error names the passes that already ran.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from foldonnx.errors import FoldOnnxError, PassError
from foldonnx.graph.stats import ModelStats, mac_shapes, model_stats
from foldonnx.passes.config import PassConfig

__all__ = [
    "Change",
    "Skipped",
    "PassReport",
    "PassResult",
    "PassContext",
    "Pass",
    "Pipeline",
    "PipelineReport",
]

logger = logging.getLogger(__name__)


@dataclass
class Change:
    """One unit a pass rewrote: a channel group, a layer, a span of blocks, an op type."""

    what: str  # e.g. "blocks.3.mlp", "/encoder/layer.4/attention/query/MatMul", "blocks 9-10"
    kind: str  # e.g. "mlp", "linear", "span", "quantize"
    before: str  # readable size before ("1536 channels", "384x1536", "2 blocks, 3.55M params")
    after: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Skipped:
    """A unit a pass left alone, and why."""

    what: str
    reason: str
    kind: str = ""
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassReport:
    """What a pass did (subclassed per pass for its typed details; see :meth:`changes`)."""

    name: str
    config: dict[str, Any]
    before: ModelStats
    after: ModelStats
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: fidelity of the model after this pass to the pipeline's input model, on the check data
    fidelity: dict[str, float] | None = None

    def changes(self) -> list[Change]:
        """What changed, one entry per unit rewritten (subclasses derive it from their details)."""
        return []

    @property
    def params_removed(self) -> float:
        """Fraction of the parameters this pass removed (of its input's)."""
        return 1.0 - self.after.params / max(self.before.params, 1)

    @property
    def macs_removed(self) -> float:
        return 1.0 - self.after.macs / max(self.before.macs, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["changed"] = [c.to_dict() for c in self.changes()]
        d["params_removed"] = self.params_removed
        d["macs_removed"] = self.macs_removed
        return d

    @classmethod
    def _field_values(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls)}
        out = {k: v for k, v in d.items() if k in names}
        out["before"] = ModelStats.from_dict(d["before"])
        out["after"] = ModelStats.from_dict(d["after"])
        out["skipped"] = [Skipped(**s) for s in d.get("skipped", [])]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PassReport:
        return cls(**cls._field_values(d))


@dataclass
class PassResult:
    """A pass's output model and its report."""

    model: onnx.ModelProto
    report: PassReport


@dataclass
class PassContext:
    """What passes share within one run: calibration data, how to preprocess images, the
    sizes of models already counted, whether to check each result, progress display.

    ``calib`` is a data SOURCE string (``augmented:256``, ``synthetic:64``, a folder, an
    ``.npz``…), an ImageSet / TensorSet, an array or ``{input: array}``; passes turn it into
    feeds with :meth:`calibration`, which caches them for the next pass."""

    calib: Any = None
    preprocess: Any = None  # foldonnx.data.sources.Preprocess
    verify: bool = True
    #: the caller will not use the input model again: a pass may rewrite it in place (the CLI
    #: does this to keep one copy of a large model in memory, not two)
    donate_input: bool = False
    progress: bool = False
    threads: int | None = None
    file_size: int | None = None  # bytes on disk of the input model, when it came from a file
    on_progress: Callable[[str], None] | None = None
    #: shared by every child context: sizes of the last models counted, reference shapes,
    #: calibration feeds, and anything a pass wants to reuse (e.g. activations)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def child(self, **changes: Any) -> PassContext:
        """A context sharing this one's caches, with some settings changed."""
        return dataclasses.replace(self, **changes)

    def stats(self, model: onnx.ModelProto, *, file_size: int | None = None) -> ModelStats:
        """Sizes of *model*; the last few models counted are remembered (a pass's output is the
        next pass's input, counted once)."""
        seen: list[tuple[onnx.ModelProto, ModelStats]] = self.cache.setdefault("stats", [])
        for m, st in seen:
            if m is model:
                return st
        st = model_stats(model, file_size, reference=self.cache.get("shapes"))
        seen.append((model, st))
        del seen[:-4]
        return st

    def remember_shapes(self, model: onnx.ModelProto) -> None:
        """Record the MAC-node shapes of the first model seen, so the symbolic dims of its
        rewrites (token counts computed at run time) are known without running them."""
        if "shapes" not in self.cache:
            try:
                self.cache["shapes"] = mac_shapes(model, probe=True)
            except Exception as exc:  # noqa: BLE001 - shapes are an optimisation only
                logger.debug("no reference shapes: %s", exc)
                self.cache["shapes"] = {}

    def calibration(
        self, model: onnx.ModelProto, *, limit: int | None = None, default: Any = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Calibration feeds for *model* from ``calib`` (or *default* when none is given),
        checked against the model's inputs; cached by (source, limit, seed)."""
        from foldonnx.data.calibration import calibration_feeds
        from foldonnx.errors import UsageError

        source = self.calib if self.calib is not None else default
        if source is None:
            raise UsageError("this pass needs calibration data: give --calib SOURCE (e.g. augmented:256)")
        feeds = self.cache.setdefault("feeds", {})
        key = (source if isinstance(source, str) else id(source), limit, seed, repr(self.preprocess))
        if key not in feeds:
            feeds[key] = calibration_feeds(model, source, limit=limit, preprocess=self.preprocess, seed=seed)
        return feeds[key]

    def say(self, message: str) -> None:
        """Report what is running now (the CLI shows it; library code only logs)."""
        logger.info(message)
        if self.on_progress is not None:
            self.on_progress(message)


class Pass(ABC):
    """A rewrite of an ONNX model (see module docstring)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    Report: ClassVar[type[PassReport]] = PassReport
    #: sweep axis -> the config field that sets the budget on it ("params": "target_params")
    budget: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: PassConfig | None = None, **options: Any) -> None:
        if config is None:
            config = self.Config.from_options(options, owner=self.name)
        elif options:
            config = config.replace(**options)
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @property
    def is_identity(self) -> bool:
        """True when the config asks for no change (a zero budget)."""
        return any(getattr(self.config, f, None) == 0 for f in self.budget.values())

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PassError` with the reason when this pass cannot work on *model*."""

    @abstractmethod
    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, PassReport]:
        """The rewrite: a new model (never *model* itself, modified) and the report, whose
        ``before``/``after``/``seconds`` :meth:`run` fills in."""

    def new_report(self, **fields: Any) -> PassReport:
        """A report of this pass with placeholder sizes (:meth:`run` fills them in)."""
        empty = ModelStats(0, 0, 0)
        return PassReport(name=self.name, config=self.config.to_dict(), before=empty, after=empty, **fields)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        t0 = time.perf_counter()
        self.requires(model, ctx)
        ctx.remember_shapes(model)
        before = ctx.stats(model, file_size=ctx.file_size)
        reference = None
        if ctx.verify:
            from foldonnx.graph.verify import verify_reference

            reference = verify_reference(model)
        out, report = self.apply(model, ctx)
        if out is model and not ctx.donate_input:
            raise PassError(f"{self.name} returned its input model instead of a new one")
        if reference is not None:
            from foldonnx.graph.verify import verify_model

            verify_model(reference, out)
        report.name = self.name
        report.config = self.config.to_dict()
        report.before = before
        if out is model:  # a donated input edited in place: its cached size is stale
            ctx.cache["stats"] = [(m, st) for m, st in ctx.cache.get("stats", []) if m is not out]
        report.after = ctx.stats(out)
        report.seconds = round(time.perf_counter() - t0, 3)
        logger.info(
            "%s: params %d -> %d (%.1f%% removed), MACs %d -> %d in %.1f s",
            self.name,
            before.params,
            report.after.params,
            100 * report.params_removed,
            before.macs,
            report.after.macs,
            report.seconds,
        )
        return PassResult(out, report)


@dataclass
class PipelineReport(PassReport):
    """The whole pipeline (before = its input, after = its output) and one report per pass."""

    steps: list[PassReport] = field(default_factory=list)
    check_data: str | None = None
    verified: bool = False

    def changes(self) -> list[Change]:
        return [c for s in self.steps for c in s.changes()]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["steps"] = [s.to_dict() for s in self.steps]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PipelineReport:
        from foldonnx.passes.registry import report_from_dict

        vals = cls._field_values(d)
        vals["steps"] = [report_from_dict(s) for s in d.get("steps", [])]
        return cls(**vals)


@dataclass(frozen=True)
class _NoConfig(PassConfig):
    pass


class Pipeline(Pass):
    """Passes run in order, verified once at the end (see module docstring).

    ``check``: feeds (``{input: array}``) on which the fidelity of the model after every pass
    to the pipeline's input is measured (the task inferred from the output, as ``eval`` does);
    ``check_name`` labels them in the report."""

    name = "pipeline"
    summary = "passes run in order, verified once"
    Config = _NoConfig

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        check: Mapping[str, np.ndarray] | None = None,
        check_name: str | None = None,
    ) -> None:
        super().__init__(_NoConfig())
        if not passes:
            raise PassError("a pipeline needs at least one pass")
        self.passes = list(passes)
        self.check = check
        self.check_name = check_name

    def __repr__(self) -> str:
        return "Pipeline(" + ", ".join(repr(p) for p in self.passes) + ")"

    def recipe(self) -> list[dict[str, dict[str, Any]]]:
        """The passes with their full configs: ``[{name: options}, ...]``."""
        return [{p.name: p.config.to_dict()} for p in self.passes]

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        # each pass checks its own input when its turn comes (earlier passes change the model)
        return None

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, PassReport]:
        raise NotImplementedError  # run() is the pipeline's template

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        from foldonnx.graph.verify import verify_model, verify_reference

        ctx = ctx or PassContext()
        t0 = time.perf_counter()
        ctx.remember_shapes(model)
        before = ctx.stats(model, file_size=ctx.file_size)
        reference = verify_reference(model) if ctx.verify else None
        fidelity = _Fidelity(model, self.check, ctx) if self.check is not None else None
        step_ctx = ctx.child(verify=False, file_size=None, donate_input=False)
        current, steps, done = model, [], []
        for i, p in enumerate(self.passes):
            ctx.say(f"step {i + 1}/{len(self.passes)}: {p.name}")
            try:
                result = p.run(current, step_ctx)
            except FoldOnnxError as exc:
                raise _after_steps(exc, p.name, i, len(self.passes), done) from None
            if fidelity is not None:
                result.report.fidelity = fidelity.measure(result.model)
            steps.append(result.report)
            done.append(p.name)
            current = result.model
        if reference is not None:
            try:
                verify_model(reference, current)
            except FoldOnnxError as exc:
                raise _after_steps(exc, "verification", len(self.passes), len(self.passes), done) from None
        report = PipelineReport(
            name=self.name,
            config={"recipe": self.recipe()},
            before=before,
            after=ctx.stats(current),
            steps=steps,
            check_data=self.check_name,
            verified=reference is not None,
            notes=[f"{s.name}: {n}" for s in steps for n in s.notes],
            skipped=[s for r in steps for s in r.skipped],
        )
        report.fidelity = steps[-1].fidelity if steps else None
        report.seconds = round(time.perf_counter() - t0, 3)
        return PassResult(current, report)


def _after_steps(exc: FoldOnnxError, where: str, i: int, n: int, done: list[str]) -> FoldOnnxError:
    """*exc* with a message naming the step that failed and the passes that ran before it."""
    ran = ", ".join(done) if done else "none"
    msg = f"{where} (step {i + 1} of {n}) failed; passes already run: {ran}: {exc}"
    if where == "verification":
        msg = f"the result of the passes {ran} fails verification: {exc}"
    try:
        new = type(exc)(msg)
    except TypeError:
        new = PassError(msg)
    new.exit_code = exc.exit_code
    return new


class _Fidelity:
    """Reference outputs on the check data, computed once; candidates scored against them."""

    def __init__(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], ctx: PassContext) -> None:
        from foldonnx.data.feeds import check_feeds
        from foldonnx.evaluate.evaluation import Evaluator
        from foldonnx.evaluate.runner import ModelInputs

        inputs = ModelInputs(check_feeds(model, feeds, what="check data"), None, "check")
        self.evaluator = Evaluator(model, inputs, threads=ctx.threads, progress=ctx.progress)

    def measure(self, model: onnx.ModelProto) -> dict[str, float]:
        return self.evaluator.evaluate(model, name="candidate").metrics
