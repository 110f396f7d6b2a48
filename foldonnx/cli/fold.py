"""``fold-onnx fold IN.onnx OUT.onnx``: fold or magnitude-prune channel groups.

The flags are the fold pass's config (:class:`foldonnx.passes.fold.FoldConfig`) plus what the
command itself needs (calibration data, ``--json``, ``--no-verify``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foldonnx.cli.common import (
    add_calibration_arguments,
    add_json_argument,
    calibration_preprocess,
    claim_json,
    fmt_count,
    size_table,
    write_json,
)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from foldonnx.passes.config import add_config_arguments
    from foldonnx.passes.fold import FoldConfig

    p = subparsers.add_parser(
        "fold",
        help="fold (cluster + merge) or magnitude-prune channel groups of an ONNX model",
        description="Fold channel groups (MLP hidden units, attention heads, conv channels, ...) "
        "by k-means clustering and merging, or prune them by magnitude (the baseline).",
    )
    p.add_argument("input", help="input ONNX file")
    p.add_argument("output", help="output ONNX file (never the input)")
    add_config_arguments(p, FoldConfig)
    add_calibration_arguments(p, what="--repair data")
    add_json_argument(p, "--report", help="write the report as JSON (--report is an alias)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the result")
    p.set_defaults(func=run)
    return p


def _print_report(report, out_size: int, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    if quiet:
        return
    console = Console(file=sys.stdout, highlight=False)
    title = f"fold-onnx fold ({report.method}, repair {report.repair})"
    console.print(size_table(title, report.before, report.after, out_size))
    by_kind: dict[str, list] = {}
    for g in report.groups:
        by_kind.setdefault(g.kind, []).append(g)
    gt = Table(title="groups")
    for col in (
        "kind",
        "groups",
        "channels before → after",
        "distortion (mean)",
        "repair factor (min/mean/max)",
    ):
        gt.add_column(col)
    for kind, gs in by_kind.items():
        before = sum(g.channels_before for g in gs)
        after = sum(g.channels_after for g in gs)
        dist = sum(g.distortion for g in gs) / len(gs)
        facs = [g for g in gs if g.repair_factor_mean is not None]
        fac = (
            f"{min(g.repair_factor_min for g in facs):.3f}/"
            f"{sum(g.repair_factor_mean for g in facs) / len(facs):.3f}/"
            f"{max(g.repair_factor_max for g in facs):.3f}"
            if facs
            else "-"
        )
        gt.add_row(kind, str(len(gs)), f"{before} → {after}", f"{dist:.4f}", fac)
    console.print(gt)
    if report.skipped:
        console.print(f"skipped {len(report.skipped)} group(s):")
        for s in report.skipped[:10]:
            console.print(f"  #{s.id} {s.kind} {s.what}: {s.reason}")
        if len(report.skipped) > 10:
            console.print(f"  ... and {len(report.skipped) - 10} more (see --json)")
    for note in report.notes[:8]:
        console.print(f"note: {note}")
    if len(report.notes) > 8:
        console.print(f"  ... and {len(report.notes) - 8} more notes (see --json)")
    console.print(
        f"{fmt_count(report.before.params)} → {fmt_count(report.after.params)} parameters "
        f"({100 * report.params_removed:.1f}% removed); time: {report.seconds:.1f} s "
        f"(analysis {report.analysis_seconds:.1f} s)"
    )


def run(args: argparse.Namespace) -> int:
    from foldonnx.onnx_file import OutputGuard, load_model
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.config import config_from_args
    from foldonnx.passes.fold import FoldConfig, FoldPass

    src, dst = Path(args.input), Path(args.output)
    config = config_from_args(args, FoldConfig)  # bad options: one line, before anything else
    guard = OutputGuard([src])
    guard.claim(dst, "output")
    claim_json(guard, args)
    loaded = load_model(src)
    if config.repair == "data" and not args.calib:
        from foldonnx.errors import UsageError

        raise UsageError("--repair data needs calibration data: give --calib SOURCE")
    images_in = bool(args.calib) or config.repair == "ar"
    preprocess = calibration_preprocess(loaded.model, args.calib_norm) if images_in else None
    ctx = PassContext(
        calib=args.calib,
        preprocess=preprocess,
        verify=not args.no_verify,
        donate_input=True,  # the loaded model is not needed afterwards
        progress=sys.stderr.isatty() and not args.quiet,
        file_size=loaded.file_size,
    )
    if args.calib:  # calibration data is checked against the model before the fold starts
        ctx.calibration(loaded.model, limit=config.calib_limit, seed=config.seed)
    result = FoldPass(config).run(loaded.model, ctx)
    guard.save_model(result.model, dst, source=src, external_data=loaded.external_data or None)
    out_size = load_model(dst, load_weights=False).file_size
    report = result.report
    report.after.bytes = out_size
    write_json(guard, args, report.to_dict())
    _print_report(report, out_size, args.quiet)
    print(f"wrote {dst}", file=sys.stderr)
    return 0
