"""Method × ratio (× quantization) sweeps: compress, measure, tabulate.

:func:`run_sweep` applies every registered method (:mod:`foldonnx.passes.registry`) at every
ratio to one model, optionally quantizes every variant (the original included) through
:func:`foldonnx.runtime.quantize`, then measures for each variant

* size: parameters, MACs (batch 1), bytes on disk (:mod:`foldonnx.graph.stats`);
* fidelity and accuracy against the original with an :class:`~foldonnx.evaluate.Evaluator`
  (when data is given);
* batch-1 latency of all variants **interleaved in one process**, as ratios to the original
  (:func:`foldonnx.runtime.bench`; :func:`foldonnx.evaluate.runner.interleaved_latency` when the
  runtime package is unavailable).

A failing point (e.g. a method refusing a ratio) is recorded with its one-line error instead of
stopping the sweep. Results: :class:`SweepReport` (JSON round-trip, markdown table).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from foldonnx.errors import FoldOnnxError, UsageError
from foldonnx.evaluate.evaluation import Evaluator
from foldonnx.graph.stats import model_stats
from foldonnx.onnx_file import load_model, save_model
from foldonnx.passes.registry import get_pass

__all__ = [
    "QUANTIZE_MODES",
    "SweepPoint",
    "SweepReport",
    "run_sweep",
    "compress_variants",
    "measure_sizes",
    "evaluate_points",
    "measure_latency",
    "primary_metric",
    "point_quality",
    "split_options",
]

logger = logging.getLogger(__name__)

# --quantize value -> foldonnx.runtime.quantize mode
QUANTIZE_MODES = {"int8": "dynamic", "int8-static": "static", "fp16": "fp16"}
ORIGINAL = "original"
# what a sweep's ratios mean: fraction of channels removed per group, or of the model's parameters
AXES = {"channels": "r", "params": "p"}


@dataclass
class SweepPoint:
    """One variant of the sweep."""

    name: str
    method: str  # "original" for the uncompressed model
    ratio: float
    quantize: str | None = None
    path: str | None = None
    params: int | None = None
    macs: int | None = None
    bytes: int | None = None  # on disk (the .onnx file and its external data)
    metrics: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None
    probe: dict[str, Any] | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    seconds: float = 0.0  # compression (+ quantization) time
    error: str | None = None
    method_report: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SweepReport:
    """Every point of a sweep plus what it was measured on."""

    model: str
    methods: list[str]
    ratios: list[float]
    quantize: str | None
    axis: str = "channels"
    data: str | None = None
    task: str | None = None
    output: str | None = None
    n_samples: int = 0
    reference_accuracy: float | None = None
    reference_probe: float | None = None
    probe_source: str | None = None
    probe_train: int | None = None
    probe_test: int | None = None
    latency_method: str = ""
    points: list[SweepPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [p.to_dict() for p in self.points]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepReport:
        points = []
        for p in d.get("points", []):
            p = dict(p)
            if "file_size" in p:  # sweeps written before sizes were named as everywhere else
                p["bytes"] = p.pop("file_size")
            points.append(SweepPoint(**p))
        return cls(**{**d, "points": points})

    def original(self, quantize: str | None = None) -> SweepPoint | None:
        return next((p for p in self.points if p.method == ORIGINAL and p.quantize == quantize), None)

    def to_markdown(self) -> str:
        return _markdown(self)


def primary_metric(report: SweepReport) -> str:
    """The quality measure the plot and the comparison use: labelled accuracy when there is
    some (top-1, else the refitted linear probe), otherwise the task's main fidelity metric."""
    if report.reference_accuracy is not None:
        return "accuracy"
    if report.reference_probe is not None:
        return "probe_refit"
    keys = {k for p in report.points for k in p.metrics}
    for k in ("top1_agreement", "cls_cosine", "mask_iou", "cosine"):
        if k in keys:
            return k
    return "cosine"


def point_quality(point: SweepPoint, metric: str) -> float | None:
    """Value of *metric* at *point* (see :func:`primary_metric`)."""
    if metric == "accuracy":
        return point.accuracy
    if metric.startswith("probe_"):
        return None if point.probe is None else point.probe.get(metric[len("probe_") :])
    return point.metrics.get(metric)


def _variant_name(method: str, ratio: float, axis: str = "channels") -> str:
    return ORIGINAL if method == ORIGINAL else f"{method}-{AXES[axis]}{ratio:g}"


def _quantize(
    model: onnx.ModelProto, quant: str, calib: str | None
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.quantize import QuantizePass

    res = QuantizePass(mode=QUANTIZE_MODES[quant]).run(model, PassContext(calib=calib))
    rep = res.report
    return res.model, {"mode": rep.config["mode"], "excluded_nodes": getattr(rep, "excluded_nodes", 0)}


def measure_latency(
    points: Sequence[SweepPoint], iters: int, warmup: int = 3, threads: int | None = None
) -> str:
    """Batch-1 latency of every successful point, interleaved in one process; returns how."""
    ok = [p for p in points if p.ok and p.path]
    if len(ok) == 0 or iters <= 0:
        return "not measured"
    from foldonnx.runtime import bench

    paths = [p.path for p in ok]
    results = bench(
        paths, provider="cpu", batches=[1], warmup=warmup, iters=iters, threads=threads,
        labels=[p.name for p in ok],
    )  # fmt: skip
    for p, r in zip(ok, results, strict=True):
        if r.ok and r.latency is not None:
            p.latency_ms = r.latency.p50_ms
            p.latency_ratio = r.latency_ratio
        else:
            logger.warning("latency of %s not measured: %s %s", p.name, r.status, r.reason)
    return f"foldonnx.runtime.bench (cpu, batch 1, interleaved, {iters} rounds, median of per-round ratios)"


def _check_plan(
    ratios: Sequence[float],
    methods: Sequence[str],
    quantize: str | None,
    axis: str = "channels",
    recipes: Sequence[str] = (),
) -> None:
    if axis not in AXES:
        raise UsageError(f"unknown sweep axis {axis!r} (choose {', '.join(AXES)})")
    if methods and (not ratios or any(not 0.0 < r < 1.0 for r in ratios)):
        raise UsageError(f"ratios must be in (0, 1), got {list(ratios)}")
    if not methods and not recipes:
        raise UsageError("no compression methods or recipes given")
    for m in methods:
        entry = get_pass(m)  # unknown names fail before any work
        if axis not in entry.budget:
            axes = ", ".join(entry.budget) or "none"
            raise UsageError(f"pass {m!r} has no budget on the {axis} axis (its axes: {axes})")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown quantization {quantize!r} (choose {', '.join(QUANTIZE_MODES)})")


def split_options(methods: Sequence[str], options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``--option`` values per method: ``key=value`` goes to every method that has the option
    (an option no method has is an error), ``method.key=value`` to that method only."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in (options or {}).items():
        name, dot, opt = key.rpartition(".")
        targets = [name] if dot else list(methods)
        if dot and name not in out:
            raise UsageError(f"--option {key}: {name!r} is not one of the methods ({', '.join(methods)})")
        opt = opt.replace("-", "_")
        takers = [m for m in targets if opt in get_pass(m).options()]
        if not takers:
            valid = sorted({o for m in targets for o in get_pass(m).options()})
            raise UsageError(f"--option {key}: no method takes {opt!r} (valid: {', '.join(valid)})")
        for m in takers:
            out[m][opt] = value
    for m, opts in out.items():  # a bad value fails now, not after hours of other variants
        entry = get_pass(m)
        probe = {**opts, next(iter(entry.budget.values()), "unused"): 0.1} if entry.budget else opts
        entry.make(probe)
    return out


def _reused(p: SweepPoint, path: Path, reuse: bool) -> bool:
    """With *reuse*, take a variant written by an earlier run (file + ``.report.json`` sidecar)."""
    side = path.with_suffix(".report.json")
    if not (reuse and path.is_file() and side.is_file()):
        return False
    saved = json.loads(side.read_text())
    p.path, p.method_report, p.seconds = str(path), saved.get("report", {}), saved.get("seconds", 0.0)
    logger.info("reusing %s", path)
    return True


def _remember(p: SweepPoint, path: Path) -> None:
    side = path.with_suffix(".report.json")
    side.write_text(json.dumps({"report": p.method_report, "seconds": p.seconds}) + "\n")


def _recipe_name(recipe: str) -> str:
    return "recipe:" + (Path(recipe).stem if recipe.endswith((".json", ".yaml", ".yml")) else "inline")


def _compress_point(
    p: SweepPoint, path: Path, build: Any, loaded: Any, calib: str | None, reuse: bool
) -> onnx.ModelProto | None:
    """Run one variant (a pass or a pipeline), write it to *path*; errors go into the point."""
    from foldonnx.passes.base import PassContext

    if _reused(p, path, reuse):
        return None
    t0 = time.perf_counter()
    model = None
    try:
        runner = build()
        result = runner.run(loaded.model, PassContext(calib=calib, file_size=loaded.file_size))
        model = result.model
        save_model(model, path, source=loaded.path)
        p.path, p.method_report = str(path), _summary(result.report.to_dict())
    except FoldOnnxError as exc:
        p.error = str(exc)
        logger.warning("%s failed: %s", p.name, exc)
    p.seconds = time.perf_counter() - t0
    if p.ok:
        _remember(p, path)
    return model


def compress_variants(
    model: str | os.PathLike,
    *,
    ratios: Sequence[float],
    methods: Sequence[str],
    out_dir: str | os.PathLike,
    quantize: str | None = None,
    calib: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    method_options: dict[str, Any] | None = None,
    reuse: bool = False,
    axis: str = "channels",
    recipes: Sequence[str] = (),
) -> list[SweepPoint]:
    """The original, every method at every ratio, every recipe, and (with *quantize*) each of
    those quantized; files go to *out_dir*. A point that fails carries its one-line error. With
    *reuse*, variants already in *out_dir* (with their ``.report.json``) are taken instead of
    recomputed. *calib* is the calibration data of data-driven passes and of ``int8-static``."""
    from foldonnx.passes.recipe import build_pipeline

    _check_plan(ratios, methods, quantize, axis, recipes)
    per_method = split_options(methods, method_options)
    pipelines = {r: build_pipeline(r) for r in recipes}  # bad recipes fail before any work
    src = Path(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(src)
    points = [SweepPoint(name=ORIGINAL, method=ORIGINAL, ratio=0.0, path=str(src))]
    for method in methods:
        entry = get_pass(method)
        opts = dict(per_method[method])
        if "seed" in entry.options():
            opts.setdefault("seed", seed)
        for ratio in ratios:
            p = SweepPoint(name=_variant_name(method, ratio, axis), method=method, ratio=float(ratio))
            points.append(p)

            def build(entry=entry, opts=opts, ratio=ratio) -> Any:
                return entry.make({**opts, entry.budget[axis]: float(ratio)})

            _compress_point(p, out / f"{p.name}.onnx", build, loaded, calib, reuse)
    for recipe, pipeline in pipelines.items():
        name = _recipe_name(recipe)
        p = SweepPoint(name=name, method=name, ratio=0.0)
        points.append(p)
        _compress_point(
            p, out / f"{name.replace(':', '-')}.onnx", lambda pl=pipeline: pl, loaded, calib, reuse
        )
    if quantize is not None:
        for p in list(points):
            q = SweepPoint(name=f"{p.name}+{quantize}", method=p.method, ratio=p.ratio, quantize=quantize)
            points.append(q)
            if not p.ok:
                q.error = p.error
                continue
            path = out / f"{p.name.replace(':', '-')}.{quantize}.onnx"
            if _reused(q, path, reuse):
                continue
            t0 = time.perf_counter()
            try:
                qmodel, qrep = _quantize(load_model(p.path).model, quantize, calib)  # type: ignore[arg-type]
                save_model(qmodel, path, source=src)
                q.method_report = {**p.method_report, "quantize": qrep}
                q.path = str(path)
            except FoldOnnxError as exc:
                q.error = str(exc)
                logger.warning("%s failed: %s", q.name, exc)
            q.seconds = p.seconds + time.perf_counter() - t0
            if q.ok:
                _remember(q, path)
    return points


def measure_sizes(points: Sequence[SweepPoint]) -> None:
    """Fill params, MACs and file size of every successful point."""
    for p in points:
        if p.ok and p.path:
            lm = load_model(p.path)
            st = model_stats(lm.model, lm.file_size)
            p.params, p.macs, p.bytes = st.params, st.macs, st.bytes


def evaluate_points(
    report: SweepReport,
    points: Sequence[SweepPoint],
    evaluator: Evaluator,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> None:
    """Score every successful point against the evaluator's reference (the original model);
    *on_point* is called after each (e.g. to save partial results)."""
    er = evaluator.report([])
    report.data, report.task, report.output, report.n_samples = er.data, er.task, er.output, er.n_samples
    report.reference_accuracy, report.reference_probe = er.reference_accuracy, er.reference_probe
    report.probe_source, report.probe_train, report.probe_test = (
        er.probe_source,
        er.probe_train,
        er.probe_test,
    )
    for p in points:
        if not (p.ok and p.path):
            continue
        try:
            ce = evaluator.evaluate(p.path, name=p.name)
        except FoldOnnxError as exc:
            p.error = str(exc)
            continue
        p.metrics, p.accuracy = ce.metrics, ce.accuracy
        p.probe = ce.probe.to_dict() if ce.probe else None
        if on_point is not None:
            on_point(p)


def run_sweep(
    model: str | os.PathLike,
    *,
    ratios: Sequence[float],
    methods: Sequence[str],
    out_dir: str | os.PathLike,
    quantize: str | None = None,
    evaluator: Evaluator | None = None,
    calib: str | None = None,
    bench_iters: int = 20,
    bench_warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
    method_options: dict[str, Any] | None = None,
    reuse: bool = False,
    axis: str = "channels",
    recipes: Sequence[str] = (),
) -> SweepReport:
    """Run the sweep (see module docstring); variant files are written to *out_dir*.

    *evaluator* must have the original *model* as its reference; without one, only sizes and
    latency are measured. *calib* is the calibration source for ``int8-static``.
    """
    _check_plan(ratios, methods, quantize, axis, recipes)
    report = SweepReport(
        model=str(model), methods=[*methods, *(_recipe_name(r) for r in recipes)],
        ratios=[float(r) for r in ratios], quantize=quantize, axis=axis,
    )  # fmt: skip
    points = compress_variants(
        model, ratios=ratios, methods=methods, out_dir=out_dir, quantize=quantize, calib=calib,
        threads=threads, seed=seed, method_options=method_options, reuse=reuse, axis=axis,
        recipes=recipes,
    )  # fmt: skip
    measure_sizes(points)
    if evaluator is not None:
        evaluate_points(report, points, evaluator)
    report.latency_method = measure_latency(points, bench_iters, bench_warmup, threads)
    report.points = points
    return report


def _summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The scalar fields of a method report (group-level detail stays out of the sweep table)."""
    keep = {k: v for k, v in rep.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if isinstance(rep.get("skipped"), list):
        keep["skipped_groups"] = len(rep["skipped"])
    if isinstance(rep.get("groups"), list):
        keep["groups"] = len(rep["groups"])
    return keep


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _markdown(report: SweepReport) -> str:
    metric_keys: list[str] = []
    for p in report.points:
        metric_keys += [k for k in p.metrics if k not in metric_keys]
    has_acc = report.reference_accuracy is not None
    has_probe = report.reference_probe is not None
    lines = [
        f"# Sweep of `{Path(report.model).name}`",
        "",
        f"- methods: {', '.join(report.methods)}; {_axis_label(report)}: "
        f"{', '.join(f'{r:g}' for r in report.ratios)}; quantization: {report.quantize or 'none'}",
    ]
    if report.data:
        lines.append(
            f"- fidelity on `{report.data}` ({report.n_samples} samples), output `{report.output}`, "
            f"task {report.task}"
        )
    if has_probe:
        lines.append(
            f"- linear probe on `{report.probe_source}`: {report.probe_train} train / "
            f"{report.probe_test} test images; *ref-fit* = probe fitted on the original's features, "
            "*refit* = fitted per variant"
        )
    lines.append(f"- latency: {report.latency_method}; ratio < 1 is faster than the original")
    lines.append("")
    head = ["variant", "params (M)", "params %", "MACs (M)", "MACs %", "size (MB)"] + metric_keys
    if has_acc:
        head.append("top-1 acc")
    if has_probe:
        head += ["probe ref-fit", "probe refit"]
    head += ["latency (ms)", "latency ratio"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    orig = report.original()
    for p in report.points:
        if not p.ok:
            lines.append(f"| {p.name} | failed: {p.error} |" + " |" * (len(head) - 2))
            continue
        row = [
            p.name,
            _fmt(p.params / 1e6 if p.params is not None else None, ".3f"),
            _fmt(
                100 * p.params / orig.params if orig and orig.params and p.params is not None else None, ".1f"
            ),
            _fmt(p.macs / 1e6 if p.macs is not None else None, ".1f"),
            _fmt(100 * p.macs / orig.macs if orig and orig.macs and p.macs is not None else None, ".1f"),
            _fmt(p.bytes / 1e6 if p.bytes is not None else None, ".2f"),
        ]
        row += [_fmt(p.metrics.get(k), ".4f") for k in metric_keys]
        if has_acc:
            row.append(_fmt(p.accuracy, ".4f"))
        if has_probe:
            row += [_fmt(p.probe.get("transfer") if p.probe else None, ".4f"),
                    _fmt(p.probe.get("refit") if p.probe else None, ".4f")]  # fmt: skip
        row += [_fmt(p.latency_ms, ".2f"), _fmt(p.latency_ratio, ".3f")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *_comparison(report)]
    return "\n".join(lines) + "\n"


def _axis_label(report: SweepReport) -> str:
    if report.axis == "params":
        return "fractions of the parameters removed (each method allocates them over its groups)"
    return "ratios (fraction of the channels removed in every group)"


def _comparison(report: SweepReport) -> list[str]:
    """One line per ratio (and quantization): does the first method beat each other method?"""
    if len(report.methods) < 2 or not report.points:
        return []
    metric = primary_metric(report)
    first = report.methods[0]
    by_key = {(p.method, p.ratio, p.quantize): p for p in report.points if p.ok}
    has_kl = any("kl_div" in p.metrics for p in report.points)
    note = "; KL divergence: lower is better" if has_kl else ""
    out = [f"## {first} vs the other methods ({metric}, higher is better{note})", ""]
    for quant in [None] + ([report.quantize] if report.quantize else []):
        for other in report.methods[1:]:
            for r in report.ratios:
                a, b = by_key.get((first, r, quant)), by_key.get((other, r, quant))
                qa = point_quality(a, metric) if a else None
                qb = point_quality(b, metric) if b else None
                tag = (
                    ("params" if report.axis == "params" else "ratio")
                    + f" {r:g}"
                    + (f", {quant}" if quant else "")
                )
                if qa is None or qb is None:
                    out.append(f"- {tag}: not comparable (a point failed or was not measured)")
                    continue
                verdict = "beats" if qa > qb else ("ties" if qa == qb else "does **not** beat")
                line = f"- {tag}: {first} {verdict} {other} ({qa:.4f} vs {qb:.4f})"
                extra = [
                    f"{k} {a.metrics[k]:.4f} vs {b.metrics[k]:.4f}"  # type: ignore[union-attr]
                    for k in _SECONDARY
                    if k != metric and k in a.metrics and k in b.metrics  # type: ignore[union-attr]
                ]
                out.append(line + (f"; {', '.join(extra)}" if extra else ""))
    return out


# fidelity shown beside the primary metric in the comparison (kl_div: lower is better)
_SECONDARY = ("top1_agreement", "kl_div", "cls_cosine")
