"""``fold-onnx quantize IN.onnx OUT.onnx --mode dynamic|static|fp16``: ORT quantization + fidelity."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

from rich.console import Console

from foldonnx.cli.bench import wide_console
from foldonnx.cli.common import add_json_argument, claim_json, write_json
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
    from foldonnx.passes.config import add_config_arguments
    from foldonnx.passes.quantize import QuantizeConfig

    p = subparsers.add_parser(
        "quantize",
        help="INT8 (dynamic or static QDQ over real images) or FP16 with ONNX Runtime, fidelity checked",
        description="Quantize IN to OUT with ONNX Runtime's tools, keeping LayerNorm/Softmax/GELU and "
        "attention MatMuls in float by default, then compare OUT to IN on real images.",
    )
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("output", metavar="OUT.onnx")
    add_config_arguments(p, QuantizeConfig, aliases={"calib_limit": ["--limit"]})
    p.add_argument(
        "--calib",
        default=None,
        metavar="SOURCE",
        help="calibration data for static: imagenet20, cifar10, cifar100, photos, fashion-mnist, mnist5k, "
        "an image folder or an .npz of preprocessed inputs (default for static: photos)",
    )
    p.add_argument(
        "--check", default="imagenet20", metavar="SOURCE", help="fidelity-check data (default: imagenet20)"
    )
    p.add_argument(
        "--check-limit", type=int, default=20, metavar="N", help="images for the fidelity check (default: 20)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the fidelity check")
    p.add_argument("--image-size", type=int, default=None, metavar="PX", help="override the input size")
    p.add_argument("--mean", default=None, metavar="R,G,B", help="normalisation mean (0..1 scale)")
    p.add_argument("--std", default=None, metavar="R,G,B", help="normalisation std (0..1 scale)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ORT threads for the check")
    add_json_argument(p)
    p.set_defaults(func=run)
    return p


def _preprocess(args: argparse.Namespace) -> Any:
    mean, std = _floats3(args.mean, "--mean"), _floats3(args.std, "--std")
    if mean is None and std is None and args.image_size is None:
        return None  # the model's metadata or ImageNet defaults
    from foldonnx.data.sources import resolve_preprocess

    return resolve_preprocess(args.input, image_size=args.image_size, mean=mean, std=std)


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
    from foldonnx.onnx_file import OutputGuard
    from foldonnx.passes.config import config_from_args
    from foldonnx.passes.quantize import QuantizeConfig, quantize_file

    config = config_from_args(args, QuantizeConfig)
    if args.calib and config.mode != "static":
        raise UsageError(f"--calib is only used by --mode static, not {config.mode}")
    if args.check_limit is not None and args.check_limit < 1:
        raise UsageError(f"--check-limit must be positive, got {args.check_limit}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    guard = OutputGuard([args.input])
    guard.claim(args.output, "output")
    claim_json(guard, args)
    preprocess = _preprocess(args)
    calib = args.calib or ("photos" if config.mode == "static" else None)
    status = Console(stderr=True).status(f"quantizing ({config.mode})…") if not args.quiet else nullcontext()
    with status:
        result = quantize_file(
            args.input,
            args.output,
            mode=config.mode,
            calib=calib,
            limit=config.calib_limit,
            preprocess=preprocess,
            check_source=None if args.no_check else args.check,
            check_limit=args.check_limit,
            threads=args.threads,
            **{k: v for k, v in config.to_dict().items() if k not in ("mode", "calib_limit")},
        )
    if not args.quiet:
        render_quantize(result, wide_console())
    write_json(guard, args, [{"type": type(result).__name__, "data": result.to_dict()}])
    return 0
