"""``fold-onnx eval REFERENCE.onnx CANDIDATE.onnx [...] --data SOURCE``: fidelity and accuracy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from foldonnx.cli.common import add_json_argument, check_numbers, claim_json, write_json
from foldonnx.errors import UsageError

if TYPE_CHECKING:
    from foldonnx.evaluate.evaluation import EvalReport, Evaluator

__all__ = ["register", "run", "add_data_arguments", "build_evaluator", "parse_floats", "print_report"]


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}") from None


def add_data_arguments(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    """Options shared by ``eval`` and ``sweep``: data, preprocessing, probe, run settings."""
    p.add_argument(
        "--data",
        required=data_required,
        metavar="SOURCE",
        help="imagenet20, cifar10, cifar100, photos, fashion-mnist[:train|:test], mnist5k, "
        "an image folder (class sub-folders = labels) or an .npz of preprocessed inputs",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N samples")
    p.add_argument("--output", default=None, metavar="NAME", help="output (or internal tensor) to compare")
    p.add_argument("--task", choices=["classifier", "embedding", "dense"], default=None)
    p.add_argument("--image-size", type=int, default=None, metavar="PX")
    p.add_argument("--mean", default=None, metavar="R,G,B", help="normalisation mean (0..1 scale)")
    p.add_argument("--std", default=None, metavar="R,G,B", help="normalisation std (0..1 scale)")
    p.add_argument(
        "--probe-data",
        default=None,
        metavar="SOURCE",
        help="labelled source for the linear probe (fashion-mnist uses its own train/test "
        "splits; others a seeded stratified split); default: --data when --probe-train/-test given",
    )
    p.add_argument("--probe-train", type=int, default=None, metavar="N", help="probe training images")
    p.add_argument("--probe-test", type=int, default=None, metavar="M", help="probe test images")
    p.add_argument("--batch-size", type=int, default=16, help="samples per run (default: 16)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed of subsets and splits (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="fidelity (agreement, KL, cosine, IoU) and accuracy (top-1, linear probe) of candidates",
        description="Score compressed CANDIDATE models against the REFERENCE on real inputs.",
    )
    p.add_argument("reference", help="uncompressed model (.onnx)")
    p.add_argument("candidates", nargs="+", help="compressed model(s) (.onnx)")
    add_data_arguments(p, data_required=True)
    add_json_argument(p, help="write the report as JSON")
    p.set_defaults(func=run)
    return p


def check_data_arguments(args: argparse.Namespace) -> None:
    """Range checks of the shared data options, before any work."""
    check_numbers(
        args, positive=("limit", "batch_size", "threads", "image_size", "probe_train", "probe_test"),
        nonnegative=("seed",),
    )  # fmt: skip
    parse_floats(args.mean, "--mean")
    parse_floats(args.std, "--std")


def build_evaluator(args: argparse.Namespace, reference: str | Path) -> Evaluator:
    """The :class:`Evaluator` for *reference* from the shared options (also used by sweep)."""
    from foldonnx.data.feeds import model_feeds
    from foldonnx.data.sources import resolve_preprocess
    from foldonnx.evaluate.evaluation import Evaluator, load_probe_data
    from foldonnx.evaluate.runner import ModelInputs
    from foldonnx.onnx_file import load_model

    check_data_arguments(args)
    model = load_model(reference, load_weights=False).model
    pre = resolve_preprocess(
        model,
        image_size=args.image_size,
        mean=parse_floats(args.mean, "--mean"),
        std=parse_floats(args.std, "--std"),
    )
    feeds, labels = model_feeds(
        model, args.data, limit=args.limit, preprocess=pre, seed=args.seed, what="--data"
    )
    inputs = ModelInputs(feeds, labels, str(args.data))
    probe = None
    if args.probe_data or args.probe_train or args.probe_test:
        probe = load_probe_data(
            args.probe_data or args.data,
            pre,
            model,
            train=args.probe_train,
            test=args.probe_test,
            seed=args.seed,
        )
    return Evaluator(
        reference,
        inputs,
        output=args.output,
        task=args.task,
        probe=probe,
        batch_size=args.batch_size,
        threads=args.threads,
        progress=not args.no_progress,
        seed=args.seed,
    )


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_report(report: EvalReport) -> None:
    from rich.console import Console
    from rich.table import Table

    metric_names: list[str] = []
    for c in report.candidates:
        metric_names += [k for k in c.metrics if k not in metric_names]
    title = (
        f"{Path(report.reference).name} · output {report.output} {report.output_shape} · task "
        f"{report.task} · {report.data} ({report.n_samples} samples)"
    )
    table = Table(title=title)
    table.add_column("model")
    for m in metric_names:
        table.add_column(m, justify="right")
    has_acc = report.reference_accuracy is not None
    has_probe = report.reference_probe is not None
    if has_acc:
        table.add_column("top-1 acc", justify="right")
    if has_probe:
        table.add_column("probe (ref-fit)", justify="right")
        table.add_column("probe (refit)", justify="right")
    ref_row = ["reference"] + ["" for _ in metric_names]
    if has_acc:
        ref_row.append(_fmt(report.reference_accuracy))
    if has_probe:
        ref_row += [_fmt(report.reference_probe), _fmt(report.reference_probe)]
    table.add_row(*ref_row, style="dim")
    for c in report.candidates:
        row = [c.name] + [_fmt(c.metrics.get(m)) for m in metric_names]
        if has_acc:
            row.append(_fmt(c.accuracy))
        if has_probe:
            row += [_fmt(c.probe.transfer if c.probe else None), _fmt(c.probe.refit if c.probe else None)]
        table.add_row(*row)
    Console().print(table)
    if has_probe:
        print(
            f"linear probe on {report.probe_source}: "
            f"{report.probe_train} train / {report.probe_test} test images"
        )


def run(args: argparse.Namespace) -> int:
    from foldonnx.onnx_file import OutputGuard, check_model_file

    check_data_arguments(args)
    guard = OutputGuard([args.reference, *args.candidates])
    claim_json(guard, args)
    check_model_file(args.reference)
    for c in args.candidates:  # truncated, random or data-less candidates fail here, in one line
        check_model_file(c)
    evaluator = build_evaluator(args, args.reference)
    results = [evaluator.evaluate(c) for c in args.candidates]
    report = evaluator.report(results)
    if not args.quiet:
        print_report(report)
    write_json(guard, args, report.to_dict())
    return 0
