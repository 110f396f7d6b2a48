"""What every subcommand shares: the ``--json`` flag, the output guard, size tables, number
formatting, progress messages. Library code logs; only this package prints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foldonnx.onnx_file import OutputGuard

__all__ = [
    "add_json_argument",
    "claim_json",
    "write_json",
    "fmt_count",
    "size_table",
    "pipeline_table",
    "add_calibration_arguments",
    "calibration_preprocess",
    "progress_printer",
    "check_numbers",
]


def add_json_argument(
    p: argparse.ArgumentParser, *aliases: str, help: str = "write the result as JSON"
) -> None:
    """``--json PATH`` (``-`` or no PATH: standard output), spelled the same in every command."""
    p.add_argument(
        "--json", *aliases, dest="json", metavar="PATH", nargs="?", const="-", default=None,
        help=f"{help} (to PATH; '-' or no PATH: standard output)",
    )  # fmt: skip


def claim_json(guard: OutputGuard, args: argparse.Namespace) -> Path | None:
    """Claim the ``--json`` path (before any work); None when absent or ``-``."""
    if not args.json or args.json == "-":
        return None
    return guard.claim(args.json, "--json")


def write_json(guard: OutputGuard, args: argparse.Namespace, data: Any) -> None:
    """Write *data* to the ``--json`` destination claimed earlier (stdout for ``-``)."""
    if not args.json:
        return
    text = json.dumps(data, indent=1, default=str) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
        return
    guard.write_text(args.json, text)
    print(f"wrote {args.json}", file=sys.stderr)


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _change(a: float, b: float) -> str:
    return f"{100 * (b - a) / max(a, 1):+.1f}%"


def size_table(title: str, before: Any, after: Any, after_bytes: int | None = None) -> Any:
    """A rich table: parameters, MACs, file bytes before / after / change."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    b_after = after.bytes if after_bytes is None else after_bytes
    for label, a, b in (
        ("parameters", before.params, after.params),
        ("MACs", before.macs, after.macs),
        ("file bytes", before.bytes, b_after),
    ):
        t.add_row(label, fmt_count(a), fmt_count(b), _change(a, b))
    return t


def _fidelity_text(fid: dict[str, float] | None) -> str:
    if not fid:
        return "-"
    for key in ("top1_agreement", "cls_cosine", "mask_iou", "cosine"):
        if key in fid:
            return f"{key} {fid[key]:.4f}"
    return "-"


def pipeline_table(report: Any, out_bytes: int | None = None) -> Any:
    """One row for the whole pipeline and one per pass: parameters, MACs, bytes, time, fidelity."""
    from rich.table import Table

    t = Table(title="fold-onnx compress")
    for col in ("step", "parameters", "MACs", "bytes", "time (s)", "fidelity"):
        t.add_column(col, justify="left" if col == "step" else "right")
    b = report.before
    t.add_row("input", fmt_count(b.params), fmt_count(b.macs), fmt_count(b.bytes), "", "")
    for i, s in enumerate(report.steps):
        t.add_row(
            f"{i + 1}. {s.name}",
            f"{fmt_count(s.after.params)} ({_change(s.before.params, s.after.params)})",
            f"{fmt_count(s.after.macs)} ({_change(s.before.macs, s.after.macs)})",
            f"{fmt_count(s.after.bytes)}",
            f"{s.seconds:.1f}",
            _fidelity_text(s.fidelity),
        )
    a = report.after
    size = a.bytes if out_bytes is None else out_bytes
    t.add_row(
        "output",
        f"{fmt_count(a.params)} ({_change(b.params, a.params)})",
        f"{fmt_count(a.macs)} ({_change(b.macs, a.macs)})",
        f"{fmt_count(size)} ({_change(b.bytes, size)})",
        f"{report.seconds:.1f}",
        _fidelity_text(report.fidelity),
    )
    return t


def add_calibration_arguments(p: argparse.ArgumentParser, *, what: str = "data-driven passes") -> None:
    p.add_argument(
        "--calib",
        metavar="SOURCE",
        help=f"calibration data for {what}: a data SOURCE (see README), augmented[:N] (crops of the "
        "shipped photos), offdomain[:N] (crops of CIFAR and Fashion-MNIST, nothing in common with "
        "the evaluation photos), synthetic[:N] (random-noise images), A+B (a mix, e.g. "
        "offdomain:128+synthetic:128), or an .npz of model inputs",
    )
    p.add_argument(
        "--calib-norm",
        choices=("imagenet", "unit"),
        default="imagenet",
        help="input normalisation of calibration images when the file does not record it: ImageNet "
        "mean/std, or unit = [-1, 1] (default: imagenet)",
    )


def calibration_preprocess(model: Any, norm: str) -> Any:
    """The preprocessing of calibration images: the file's metadata, else *norm* at its size."""
    from foldonnx.data.feeds import image_input_size
    from foldonnx.data.sources import Preprocess, read_preprocess

    pre = read_preprocess(model)
    if pre is not None:
        return pre
    size = image_input_size(model)
    if norm == "unit":
        return Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Preprocess(size=size)


def progress_printer(quiet: bool = False) -> Any:
    """A callback printing pipeline progress lines to stderr (none with ``-q``)."""

    def say(message: str) -> None:
        if not quiet:
            print(f"… {message}", file=sys.stderr, flush=True)

    return say


def check_numbers(
    args: argparse.Namespace, *, positive: Sequence[str] = (), nonnegative: Sequence[str] = ()
) -> None:
    """One-line :class:`UsageError` for an option out of range (given as attribute names of
    *args*; options left at None are not checked)."""
    from foldonnx.errors import UsageError

    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in nonnegative:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
