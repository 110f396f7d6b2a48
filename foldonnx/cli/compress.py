"""``fold-onnx compress IN.onnx OUT.onnx --recipe RECIPE``: run passes in order, verify once.

RECIPE is a JSON or YAML file, or the same text inline, listing steps — one pass name mapped
to its options each::

    fold-onnx compress in.onnx out.onnx --calib augmented:128 --check imagenet20 \\
        --recipe "[{fold: {target_params: 0.15, repair: ar}}, {quantize: {mode: dynamic}}]"

``--list`` prints every pass with its options. The output model records the recipe in its
metadata (``foldonnx.recipe``); ``--recipe-from MODEL`` reuses the recipe another compressed
file records.
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
    p.set_defaults(func=run)
    return p


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

    from foldonnx.graph.metadata import RECIPE_KEY
    from foldonnx.onnx_file import OutputGuard, load_model
    from foldonnx.passes.compress import check_feeds_for
    from foldonnx.passes.recipe import build_pipeline, load_recipe, recipe_of_model, recipe_text

    if args.list:
        return _list_passes()
    if not args.input or not args.output:
        raise UsageError("give IN.onnx and OUT.onnx (or --list)")
    if bool(args.recipe) == bool(args.recipe_from):
        raise UsageError("give exactly one of --recipe RECIPE or --recipe-from MODEL.onnx")
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
        console.print(pipeline_table(report, out_size))
        if label:
            console.print(f"fidelity to the input on {label}")
    for note in report.notes[:10]:
        print(f"note: {note}", file=sys.stderr)
    write_json(guard, args, report.to_dict())
    print(f"wrote {dst} (recipe in its metadata: {recipe_text(pipeline)[:200]})", file=sys.stderr)
    return 0
