"""``fold-onnx fold IN.onnx OUT.onnx``: fold or magnitude-prune channel groups."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from foldonnx.errors import ModelFileError, UsageError

__all__ = ["register", "run"]


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fold",
        help="fold (cluster + merge) or magnitude-prune channel groups of an ONNX model",
        description="Fold channel groups (MLP hidden units, attention heads, conv channels, ...) "
        "by k-means clustering and merging, or prune them by magnitude (the baseline).",
    )
    p.add_argument("input", help="input ONNX file")
    p.add_argument("output", help="output ONNX file (never the input)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=_ratio, help="fraction of channels removed in every selected group")
    size.add_argument(
        "--target-params",
        type=_ratio,
        metavar="F",
        help="fraction of the model's parameters to remove; per-group ratios by a data-free criterion",
    )
    p.add_argument(
        "--groups",
        default=None,
        metavar="KINDS",
        help="kinds to fold: mlp,heads,residual,conv,depthwise,se (default: all but residual); "
        "per-kind ratios as mlp=0.3,heads=0.2",
    )
    p.add_argument("--method", choices=("fold", "prune-l1", "prune-l2"), default="fold")
    p.add_argument(
        "--repair",
        choices=("none", "ar", "data"),
        default="none",
        help="none; ar = data-free (Fold-AR on BatchNorm groups; mlp/heads consumers refit on "
        "synthetic noise images); data = statistics matching + refit on --calib images",
    )
    p.add_argument(
        "--calib",
        metavar="SOURCE",
        help="calibration data for --repair data: a data SOURCE (see README), augmented[:N] "
        "(crops of the shipped photos) or synthetic[:N] (random-noise images)",
    )
    p.add_argument("--calib-limit", type=int, default=64, metavar="N", help="calibration images used (64)")
    p.add_argument(
        "--calib-norm",
        choices=("imagenet", "unit"),
        default="imagenet",
        help="input normalisation of calibration (and ar's synthetic) images when the file does "
        "not record it: "
        "ImageNet mean/std, or unit = [-1, 1]",
    )
    p.add_argument(
        "--refit",
        nargs="?",
        const="ridge",
        default="ridge",
        choices=["none", "bias", "ridge"],
        help="with --repair data: refit the consumers of MLP/heads groups (fc2, attention "
        "out-proj) block by block on calibration data: ridge least squares (default), bias only, none",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=8,
        metavar="N",
        help="keep channel counts of neuron/conv groups at multiples of N (default 8: keeps ORT's "
        "blocked CPU kernels and GPU tensor cores in use; 1 = off); widths not divisible by N "
        "are left as they are",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the result")
    p.set_defaults(func=run)
    return p


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _print_table(report, out_size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False)
    t = Table(title=f"fold-onnx fold ({report.method}, repair {report.repair})")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    for label, a, b in (
        ("parameters", report.before.params, report.after.params),
        ("MACs", report.before.macs, report.after.macs),
        ("file bytes", report.before.bytes, out_size),
    ):
        t.add_row(label, _fmt(a), _fmt(b), f"{100 * (b - a) / max(a, 1):+.1f}%")
    console.print(t)
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
            console.print(f"  #{s.id} {s.kind} {s.name}: {s.reason}")
        if len(report.skipped) > 10:
            console.print(f"  ... and {len(report.skipped) - 10} more (see --report)")
    for note in report.notes[:8]:
        console.print(f"note: {note}")
    if len(report.notes) > 8:
        console.print(f"  ... and {len(report.notes) - 8} more notes (see --report)")
    console.print(f"time: {report.seconds:.1f} s (analysis {report.analysis_seconds:.1f} s)")


def run(args: argparse.Namespace) -> int:
    from foldonnx.data.sources import Preprocess
    from foldonnx.onnx_file import _same_file, load_model, save_model
    from foldonnx.passes.fold import FoldPass

    src, dst = Path(args.input), Path(args.output)
    if _same_file(src, dst):
        raise ModelFileError(f"output path is the input file: {dst} (choose another path)")
    if args.repair == "data" and not args.calib:
        raise UsageError("--repair data needs calibration data: give --calib SOURCE")
    if args.ratio is None and args.target_params is None and not (args.groups and "=" in args.groups):
        raise UsageError("give --ratio R, --target-params F or per-kind ratios in --groups (mlp=0.3)")
    if args.report and _same_file(src, Path(args.report)):
        raise UsageError("--report path is the input model")
    loaded = load_model(src)
    preprocess = None
    images_in = bool(args.calib) or args.repair == "ar"  # ar refits mlp/heads on synthetic images
    if images_in:
        from foldonnx.models.registry import read_preprocess

        preprocess = read_preprocess(loaded)  # recorded by `fold-onnx export`
    if images_in and preprocess is None:
        inp = loaded.model.graph.input[0].type.tensor_type.shape.dim
        size = inp[-1].dim_value if len(inp) == 4 and inp[-1].dim_value else 224
        preprocess = (
            Preprocess(size=size)
            if args.calib_norm == "imagenet"
            else Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        )
    fp = FoldPass(
        args.ratio,
        target_params=args.target_params,
        groups=args.groups,
        method=args.method,
        repair=args.repair,
        calib=args.calib,
        calib_limit=args.calib_limit,
        calib_preprocess=preprocess,
        refit=args.refit,
        seed=args.seed,
        round_to=args.round_to,
        verify=not args.no_verify,
        inplace=True,  # the loaded model is not needed afterwards
        progress=sys.stderr.isatty(),
    )
    result = fp.run(loaded)
    save_model(result.model, dst, source=src, external_data=loaded.external_data or None)
    written = load_model(dst, load_weights=False)
    out_size = written.file_size
    result.report.after.bytes = out_size
    if args.report:
        Path(args.report).write_text(json.dumps(result.report.to_dict(), indent=1))
    _print_table(result.report, out_size)
    print(f"wrote {dst}")
    return 0
