"""``fold-onnx sweep MODEL.onnx --ratios ... --methods ...``: a size/quality/latency table and plot."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from foldonnx.cli.common import check_numbers
from foldonnx.cli.eval import add_data_arguments, build_evaluator, check_data_arguments, parse_floats
from foldonnx.errors import UsageError

__all__ = ["register", "run", "parse_options"]


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> dict (numbers and true/false converted)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option needs KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from foldonnx.evaluate.sweep import QUANTIZE_MODES
    from foldonnx.passes.registry import list_passes

    p = subparsers.add_parser(
        "sweep",
        help="compress at several ratios with several methods; table + Pareto plot",
        description="Run every method at every ratio (optionally quantized too), measure size, "
        "fidelity/accuracy and interleaved latency, write DIR/sweep.json, sweep.md, pareto.png.",
    )
    p.add_argument("model", help="model to compress (.onnx)")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4", help="fractions to remove (of what: see --axis)")
    p.add_argument(
        "--axis",
        choices=("channels", "params"),
        default="channels",
        help="channels: each ratio removes that fraction of every group's channels; params: "
        "that fraction of the model's parameters, allocated over groups by each method",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"registered passes, comma-separated (default: fold,prune-l1; {', '.join(list_passes())})",
    )
    p.add_argument(
        "--recipes",
        default=None,
        metavar="A.yaml,B.json",
        help="whole pipelines (recipe files, see compress) to compare beside the methods, one point each",
    )
    p.add_argument(
        "--quantize",
        choices=sorted(QUANTIZE_MODES),
        default=None,
        help="also quantize every variant: int8 = ONNX Runtime dynamic INT8, int8-static = QDQ "
        "calibrated on --calib (default: --data), fp16",
    )
    p.add_argument("--calib", default=None, metavar="SOURCE", help="calibration data for int8-static")
    p.add_argument(
        "--option",
        action="append",
        metavar="[METHOD.]KEY=VALUE",
        help="an option of the methods that have it, or of METHOD only (repeatable; unknown "
        "options are errors)",
    )
    p.add_argument("--out", default="sweep", metavar="DIR", help="output folder (default: ./sweep)")
    p.add_argument(
        "--bench-iters", type=int, default=20, help="interleaved latency rounds (0: skip; default: 20)"
    )
    p.add_argument("--bench-warmup", type=int, default=3, help="untimed runs per variant (default: 3)")
    p.add_argument("--reuse", action="store_true", help="reuse variant files an earlier run left in DIR")
    add_data_arguments(p, data_required=False)
    p.set_defaults(func=run)
    return p


def _validate(args: argparse.Namespace, methods: list[str], recipes: list[str], ratios: list[float]) -> None:
    """Everything a sweep can refuse, before any variant is written."""
    from foldonnx.evaluate.sweep import _check_plan, split_options
    from foldonnx.extras import require
    from foldonnx.passes.recipe import build_pipeline

    check_data_arguments(args)
    check_numbers(args, nonnegative=("bench_iters", "bench_warmup"))
    require("matplotlib", "the Pareto plot of sweep")
    _check_plan(ratios, methods, args.quantize, args.axis, recipes)
    split_options(methods, parse_options(args.option))
    for r in recipes:
        build_pipeline(r)
    if args.data is None and (args.probe_data or args.probe_train or args.probe_test):
        raise UsageError("the linear probe needs --data (the fidelity set)")


def run(args: argparse.Namespace) -> int:
    import shutil

    from foldonnx.evaluate.plot import plot_pareto
    from foldonnx.evaluate.sweep import run_sweep
    from foldonnx.onnx_file import OutputGuard, check_model_file, make_temp_dir

    ratios = parse_floats(args.ratios, "--ratios") or []
    recipes = [r.strip() for r in (args.recipes or "").split(",") if r.strip()]
    default_methods = "" if recipes else "fold,prune-l1"
    methods = [m.strip() for m in (args.methods or default_methods).split(",") if m.strip()]
    _validate(args, methods, recipes, ratios)
    out = OutputGuard([args.model]).claim(args.out, "--out", folder=True)
    check_model_file(args.model)  # a missing/bad model fails before any work
    evaluator = build_evaluator(args, args.model) if args.data else None
    # variants go to a private folder beside --out and move in only when the sweep is complete:
    # a failed or interrupted sweep leaves no empty or partial folder (--reuse resumes in place)
    work = out if args.reuse else make_temp_dir(out.parent, "sweep")
    if args.reuse:
        out.mkdir(exist_ok=True)
    try:
        report = run_sweep(
            args.model,
            ratios=ratios,
            methods=methods,
            out_dir=work,
            quantize=args.quantize,
            evaluator=evaluator,
            calib=args.calib or args.data,
            bench_iters=args.bench_iters,
            bench_warmup=args.bench_warmup,
            threads=args.threads,
            seed=args.seed,
            method_options=parse_options(args.option),
            reuse=args.reuse,
            axis=args.axis,
            recipes=recipes,
        )
        for pt in report.points:  # the paths the files will have once moved
            if pt.path and Path(pt.path).parent == work:
                pt.path = str(out / Path(pt.path).name)
        (work / "sweep.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        md = report.to_markdown()
        (work / "sweep.md").write_text(md)
        plot_pareto(report, work / "pareto.png")
        if work != out:
            out.mkdir(exist_ok=True)
            for f in work.iterdir():
                os.replace(f, out / f.name)
            work.rmdir()
    except BaseException:
        if work != out:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not args.quiet:
        print(md)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'pareto.png'}", file=sys.stderr)
    return 0 if any(p.ok for p in report.points if p.method != "original") else 1
