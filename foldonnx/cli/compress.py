"""``fold-onnx compress IN.onnx OUT.onnx --recipe RECIPE``: run passes in order, verify once.

RECIPE is a JSON or YAML file, or the same text inline, listing steps — one pass name mapped
to its options each::

    fold-onnx compress in.onnx out.onnx --calib augmented:128 --check imagenet20 \\
        --recipe "[{fold: {target_params: 0.15, repair: ar}}, {quantize: {mode: dynamic}}]"

``--list`` prints every pass with its options. The output model records the recipe in its
metadata (``foldonnx.recipe``); ``--recipe-from MODEL`` reuses the recipe another compressed
file records.

``--auto`` searches the recipe instead (folding, pruning, block approximation, low rank, then
optionally quantization) for ``--target-params F``, ``--target-macs F`` or ``--target-latency R``
(R × the original's latency), scored on a held-out part of ``--calib``; it prints every
candidate tried and the recipe it chose (``--plot`` draws them)::

    fold-onnx compress in.onnx out.onnx --auto --target-params 0.2 --calib offdomain:256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foldonnx.cli.common import (
    add_calibration_arguments,
    add_json_argument,
    calibration_preprocess,
    claim_json,
    pipeline_table,
    progress_printer,
    write_json,
)
from foldonnx.errors import UsageError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compress",
        help="run a recipe of passes (fold, prune, quantize, ...) in order, verified once",
        description="Compress IN with the passes of a recipe (a JSON/YAML file or inline text: a list "
        "of {pass: {option: value}} steps), each on the previous output, verified once at the end; "
        "prints one row per pass and writes the recipe into OUT's metadata.",
    )
    p.add_argument("input", nargs="?", help="input ONNX file")
    p.add_argument("output", nargs="?", help="output ONNX file (never the input)")
    p.add_argument("--recipe", metavar="RECIPE", help="recipe file (.json/.yaml) or inline JSON/YAML")
    p.add_argument(
        "--recipe-from", metavar="MODEL.onnx", help="use the recipe recorded in another compressed model"
    )
    add_calibration_arguments(p)
    p.add_argument(
        "--check",
        metavar="SOURCE",
        default=None,
        help="data to measure fidelity to the input after every pass (e.g. imagenet20, an .npz)",
    )
    p.add_argument(
        "--check-limit", type=int, default=20, metavar="N", help="samples of --check (default: 20)"
    )
    add_json_argument(p, help="write the pipeline report as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the final ONNX Runtime check")
    p.add_argument("--list", action="store_true", help="list the passes and their options, then exit")
    auto = p.add_argument_group("automatic recipe search (--auto)")
    auto.add_argument(
        "--auto", action="store_true", help="search the recipe for a target instead of giving one"
    )
    for spec in _auto_options():
        kw = {"type": spec.kind, "default": None, "dest": spec.name}
        if spec.choices:
            kw["choices"] = list(spec.choices)
        default = f" (default: {spec.default})" if spec.default is not None else ""
        auto.add_argument(spec.flag, metavar=spec.metavar or None, help=spec.help + default, **kw)
    auto.add_argument(
        "--plot", metavar="FILE.png", help="with --auto: every candidate tried, the chosen one marked"
    )
    p.set_defaults(func=run)
    return p


_AUTO_FLAGS = ("target_params", "target_macs", "target_latency", "methods", "quantize", "budget_minutes")


def _auto_options() -> list:
    from foldonnx.passes.auto import AutoConfig

    return [s for s in AutoConfig.options() if s.name in _AUTO_FLAGS]


def _auto_table(report, console) -> None:
    from rich.table import Table

    auto = report.steps[0]
    metric = auto.metric
    t = Table(title=f"fold-onnx compress --auto: {len(auto.candidates)} candidates ({metric} on "
                    f"{auto.holdout} held-out calibration samples)")  # fmt: skip
    for col in (
        "#",
        "stage",
        "recipe (method share of the parameters)",
        "params -",
        "MACs -",
        "latency",
        metric,
    ):
        t.add_column(
            col, justify="left" if col in ("stage", "recipe (method share of the parameters)") else "right"
        )
    ranked = sorted(range(len(auto.candidates)), key=lambda i: -auto.candidates[i].score)
    shown = set(ranked[:12]) | {i for i, c in enumerate(auto.candidates) if c.chosen}
    for i, c in enumerate(auto.candidates):
        if i not in shown:
            continue
        value = "failed" if c.error else f"{c.metrics.get(metric, float('nan')):.4f}"
        lat = "-" if c.latency_ratio is None else f"{c.latency_ratio:.3f}"
        style = "bold green" if c.chosen else None
        t.add_row(str(i + 1), c.stage, c.label + (" ← chosen" if c.chosen else ""), f"{c.params_removed:.3f}",
                  f"{c.macs_removed:.3f}", lat, value, style=style)  # fmt: skip
    console.print(t)


def _list_passes() -> int:
    from rich.console import Console
    from rich.table import Table

    from foldonnx.passes.registry import get_pass, list_passes

    table = Table(title="passes (recipe steps)", show_lines=True)
    for col in ("pass", "what", "options (default)"):
        table.add_column(col, overflow="fold")
    for name in list_passes():
        e = get_pass(name)
        specs = [s for s in e.cls.Config.options() if s.name in e.options()]
        opts = ", ".join(f"{s.name} ({s.default})" for s in specs)
        fixed = ", ".join(f"{k}={v}" for k, v in e.preset.items())
        table.add_row(name, e.summary + (f" [{fixed}]" if fixed else ""), opts)
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 140).print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from foldonnx.graph.metadata import RECIPE_KEY, read_metadata
    from foldonnx.onnx_file import OutputGuard, load_model
    from foldonnx.passes.compress import check_feeds_for
    from foldonnx.passes.recipe import build_pipeline, load_recipe, recipe_of_model

    if args.list:
        return _list_passes()
    if not args.input or not args.output:
        raise UsageError("give IN.onnx and OUT.onnx (or --list)")
    auto_given = {k: getattr(args, k) for k in _AUTO_FLAGS if getattr(args, k) is not None}
    if args.auto:
        if args.recipe or args.recipe_from:
            raise UsageError("--auto searches the recipe: do not give --recipe / --recipe-from too")
        from foldonnx.passes.auto import AutoConfig

        AutoConfig.from_options(auto_given, owner="--auto")  # bad targets fail before any work
        if not any(k.startswith("target") for k in auto_given):
            raise UsageError("--auto needs --target-params F, --target-macs F or --target-latency R")
        args.recipe = [{"auto": auto_given}]
    elif auto_given or args.plot:
        raise UsageError("--target-*, --methods, --quantize, --budget-minutes and --plot go with --auto")
    if bool(args.recipe) == bool(args.recipe_from):
        raise UsageError("give exactly one of --recipe RECIPE or --recipe-from MODEL.onnx (or --auto)")
    if args.check_limit is not None and args.check_limit < 1:
        raise UsageError(f"--check-limit must be positive, got {args.check_limit}")
    if args.recipe_from:
        steps = recipe_of_model(args.recipe_from)
        if not steps:
            raise UsageError(f"{args.recipe_from} records no recipe ({RECIPE_KEY} metadata)")
    else:
        steps = load_recipe(args.recipe)
    pipeline = build_pipeline([s.to_dict() for s in steps])  # every name and option checked first
    src, dst = Path(args.input), Path(args.output)
    guard = OutputGuard([src] + ([Path(args.recipe_from)] if args.recipe_from else []))
    guard.claim(dst, "output")
    claim_json(guard, args)
    if args.plot:
        guard.claim(args.plot, "--plot")
        from foldonnx.extras import require

        require("matplotlib", "--plot")
    loaded = load_model(src)
    needs_images = bool(args.calib) or bool(args.check)
    preprocess = calibration_preprocess(loaded.model, args.calib_norm) if needs_images else None
    feeds, label = check_feeds_for(loaded.model, args.check, limit=args.check_limit, preprocess=preprocess)
    pipeline.check, pipeline.check_name = feeds, label

    from foldonnx.passes.compress import compress

    model, report = compress(
        loaded,
        pipeline.recipe(),
        calib=args.calib,
        check=feeds,
        check_limit=None,
        preprocess=preprocess,
        verify=not args.no_verify,
        progress=sys.stderr.isatty() and not args.quiet,
        on_progress=progress_printer(args.quiet),
    )
    report.check_data = label
    guard.save_model(model, dst, source=src, external_data=loaded.external_data or None)
    out_size = load_model(dst, load_weights=False).file_size
    report.after.bytes = out_size
    if report.steps:
        report.steps[-1].after.bytes = out_size
    if not args.quiet:
        console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 140)
        if args.auto:
            _auto_table(report, console)
        console.print(pipeline_table(report, out_size))
        if label:
            console.print(f"fidelity to the input on {label}")
    for note in report.notes[:10]:
        print(f"note: {note}", file=sys.stderr)
    write_json(guard, args, report.to_dict())
    if args.plot:
        from foldonnx.passes.auto import plot_candidates

        plot_candidates(report.steps[0], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    recorded = read_metadata(model).get(RECIPE_KEY, "")
    if args.auto:  # the recipe found, reusable with --recipe (or --recipe-from OUT)
        print(f"recipe: {recorded}")
    print(
        f"wrote {dst} (recipe in its metadata: {recorded[:200]}{'…' if len(recorded) > 200 else ''})",
        file=sys.stderr,
    )
    return 0
