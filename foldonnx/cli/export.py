"""``fold-onnx export NAME OUT.onnx``: export a registry model to a verified ONNX file."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from foldonnx.cli.common import add_json_argument, claim_json, write_json
from foldonnx.errors import UsageError

if TYPE_CHECKING:
    from foldonnx.exporter import ExportReport

__all__ = ["register", "run", "format_report"]


def _batch(value: str) -> int | str:
    if value == "dynamic":
        return value
    try:
        b = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {value!r}") from None
    if b < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {value!r}")
    return b


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from foldonnx.exporter.export import DEFAULT_OPSET, DEFAULT_TOLERANCE

    p = subparsers.add_parser(
        "export",
        help="export a model (timm:, open_clip:, sam:, efficientnet_lite0, dinov2_s ...) to verified ONNX",
        description="Export a registry model to ONNX and verify it: onnx.checker, ONNX Runtime "
        "loads it, ORT vs torch max-abs-diff on a seeded input within --tolerance (else exit 1 "
        "and nothing is written). Models over ~1.8 GB get external data (OUT.onnx.data).",
    )
    p.add_argument("name", metavar="NAME", help="model name, see 'fold-onnx list-models'")
    p.add_argument("out", metavar="OUT.onnx", help="output file")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--batch", type=_batch, default=1, metavar="N|dynamic", help="batch dimension (default 1)")
    p.add_argument(
        "--checkpoint", metavar="PATH", default=None, help="local weights (state dict, SAM .pth, ...)"
    )
    p.add_argument(
        "--pretrained", action="store_true", help="download weights with the model library (needs network)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest allowed ORT vs torch max-abs-diff (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch exporter")
    add_json_argument(p, help="write the export report as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from foldonnx.exporter import export_model
    from foldonnx.onnx_file import OutputGuard

    if args.pretrained and args.checkpoint:
        raise UsageError("--pretrained and --checkpoint exclude each other")
    guard = OutputGuard([args.checkpoint] if args.checkpoint else [])
    guard.claim(args.out, "output")
    claim_json(guard, args)
    to_stdout = args.json == "-"
    report = export_model(
        args.name,
        args.out,
        opset=args.opset,
        image_size=args.image_size,
        batch=args.batch,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        dynamo=args.exporter == "dynamo",
        tolerance=args.tolerance,
        on_stage=None if to_stdout or args.quiet else _show_stage,
    )
    if report.weights == "random init":
        print(
            f"WARNING: {report.model} was exported with RANDOM weights (no --pretrained or --checkpoint): "
            "fine for testing graph handling, meaningless for accuracy or fidelity",
            file=sys.stderr,
        )
    if not to_stdout and not args.quiet:
        print(format_report(report))
    write_json(guard, args, report.to_dict())
    sys.stdout.flush()
    return 0


def _show_stage(text: str) -> None:
    print(f"... {text}", flush=True)


def format_report(report: ExportReport) -> str:
    """The short human-readable export report."""
    mb = report.file_size / 1e6
    layout = f"external data {report.output.name}.data" if report.external_data else "single file"
    shape = "x".join(str(d) for d in report.input_shape)
    verdict = "OK" if report.passed else "FAIL"
    rows = [
        ("model", f"{report.model} ({report.task}, {report.weights})"),
        ("output", f"{report.output} ({mb:.1f} MB, {layout})"),
        ("params", f"{report.params / 1e6:.2f} M"),
        ("opset", f"{report.opset} ({report.exporter})"),
        ("input", f"{report.input_name} {shape}; outputs {', '.join(report.output_names)}"),
        (
            "parity",
            f"max-abs-diff {report.max_abs_diff:.2e} (relative {report.max_rel_diff:.2e}) vs tolerance "
            f"{report.tolerance:.0e}: {verdict} [ORT {', '.join(report.providers)}, batch "
            f"{', '.join(str(b) for b in report.checked_batches)}]",
        ),
        ("checker", "onnx.checker OK, ONNX Runtime loads it"),
        ("time", f"export {report.export_seconds:.1f} s, verify {report.verify_seconds:.1f} s"),
    ]
    return "\n".join(f"{k:<8} {v}" for k, v in rows)
