"""``fold-onnx quantize IN.onnx OUT.onnx --mode dynamic|static|fp16``: ORT quantization + fidelity."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from foldonnx.cli.bench import wide_console
from foldonnx.errors import UsageError

__all__ = ["register", "run", "render_quantize"]


def _floats3(text: str | None, what: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"{what} must be three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise UsageError(f"{what} must be three comma-separated numbers (R,G,B), got {text!r}")
    return values  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="INT8 (dynamic or static QDQ over real images) or FP16 with ONNX Runtime, fidelity checked",
        description="Quantize IN to OUT with ONNX Runtime's tools, keeping LayerNorm/Softmax/GELU and "
        "attention MatMuls in float by default, then compare OUT to IN on real images.",
    )
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("--mode", choices=["dynamic", "static", "fp16"], default="dynamic")
    p.add_argument(
        "--calib",
        default=None,
        metavar="SOURCE",
        help="calibration data for static: imagenet20, cifar10, cifar100, photos, fashion-mnist, mnist5k, "
        "an image folder or an .npz of preprocessed inputs (default for static: photos)",
    )
    p.add_argument("--limit", type=int, default=64, metavar="N", help="calibration samples (default 64)")
    p.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    p.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="7-bit weights (default: on for static on x86 CPUs without VNNI, where 8-bit products saturate)",
    )
    p.add_argument("--exclude", default="", metavar="OP,...", help="op types to keep in float")
    p.add_argument(
        "--op-types", default=None, metavar="OP,...", help="op types to quantize (replaces the default)"
    )
    p.add_argument(
        "--calibrate-method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="static only",
    )
    p.add_argument(
        "--quantize-attention", action="store_true", help="also quantize MatMuls between two activations"
    )
    p.add_argument("--no-pre-process", action="store_true", help="skip ORT's quant_pre_process")
    p.add_argument(
        "--check", default="imagenet20", metavar="SOURCE", help="fidelity-check data (default imagenet20)"
    )
    p.add_argument("--check-limit", type=int, default=20, metavar="N", help="images for the fidelity check")
    p.add_argument("--no-check", action="store_true", help="skip the fidelity check")
    p.add_argument("--image-size", type=int, default=None, metavar="PX", help="override the input size")
    p.add_argument("--mean", default=None, metavar="R,G,B", help="normalisation mean (0..1 scale)")
    p.add_argument("--std", default=None, metavar="R,G,B", help="normalisation std (0..1 scale)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ORT threads for the check")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    p.set_defaults(func=run)
    return p


def _preprocess(args: argparse.Namespace) -> Any:
    mean, std = _floats3(args.mean, "--mean"), _floats3(args.std, "--std")
    if mean is None and std is None and args.image_size is None:
        return None  # the model's metadata or ImageNet defaults
    from foldonnx.data.sources import Preprocess
    from foldonnx.onnx_file import load_model
    from foldonnx.runtime.quantize import preprocess_for

    base = preprocess_for(load_model(args.input, load_weights=False).model)
    return Preprocess(
        size=args.image_size or base.size,
        mean=mean or base.mean,
        std=std or base.std,
        resize=None if args.image_size else base.resize,
    )


def render_quantize(r: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"fold-onnx quantize ({r.mode})", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("input → output", f"{r.input} → {r.output}")
    table.add_row(
        "size",
        f"{r.size_before / 1e6:.2f} MB → {r.size_after / 1e6:.2f} MB ({r.size_after / r.size_before:.1%})",
    )
    table.add_row("quantized op types", ", ".join(r.op_types) or "-")
    table.add_row("kept in float", f"{', '.join(r.excluded_ops) or '-'} ({r.excluded_nodes} nodes)")
    if r.calib_source:
        table.add_row("calibration", f"{r.calib_count} samples of {r.calib_source}")
    table.add_row("per-channel / pre-process", f"{r.per_channel} / {r.preprocessed}")
    f = r.fidelity
    if f is not None:
        table.add_row(
            f"fidelity on {f.n} × {f.source} ({f.output})",
            f"cosine mean {f.cosine_mean:.4f}, min {f.cosine_min:.4f}, max |diff| {f.max_abs_diff:.4g}",
        )
        if f.top1_agreement is not None:
            acc = ""
            if f.top1_acc_reference is not None:
                acc = f"; top-1 accuracy {f.top1_acc_reference:.1%} → {f.top1_acc_candidate:.1%}"
            table.add_row("top-1", f"agreement {f.top1_agreement:.1%}{acc}")
    for note in r.notes:
        table.add_row("note", note)
    table.add_row("time", f"{r.seconds:.1f} s")
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from foldonnx.runtime import dump_json, quantize

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be positive, got {args.limit}")
    calib = args.calib or ("photos" if args.mode == "static" else None)
    if args.calib and args.mode != "static":
        raise UsageError(f"--calib is only used by --mode static, not {args.mode}")
    exclude = [x.strip() for x in args.exclude.split(",") if x.strip()]
    op_types = [x.strip() for x in args.op_types.split(",") if x.strip()] if args.op_types else None
    with Console(stderr=True).status(f"quantizing ({args.mode})…"):
        result = quantize(
            args.input,
            args.output,
            mode=args.mode,
            calib=calib,
            per_channel=args.per_channel,
            exclude_ops=exclude,
            op_types=op_types,
            limit=args.limit,
            preprocess=_preprocess(args),
            calibrate_method=args.calibrate_method,
            pre_process=not args.no_pre_process,
            quantize_attention=args.quantize_attention,
            reduce_range=args.reduce_range,
            check_source=None if args.no_check else args.check,
            check_limit=args.check_limit,
            threads=args.threads,
        )
    render_quantize(result, wide_console())
    if args.json:
        dump_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
