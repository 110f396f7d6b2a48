"""``fold-onnx bench MODEL.onnx [MODEL2.onnx ...]``: latency, throughput and memory, interleaved."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from typing import Any

from foldonnx.cli.common import add_json_argument, check_numbers, claim_json, write_json
from foldonnx.errors import UsageError
from foldonnx.onnx_file import check_model_file

__all__ = [
    "register",
    "run",
    "add_session_arguments",
    "parse_batches",
    "parse_dims",
    "render_bench",
    "short_names",
    "wide_console",
]


def parse_batches(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--batch needs positive integers, got {text!r}")
    return values


def parse_dims(items: list[str] | None) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise UsageError(f"--dim must look like NAME=SIZE, got {item!r}")
        try:
            dims[name] = int(value)
        except ValueError:
            raise UsageError(f"--dim {item!r}: size must be an integer") from None
    return dims


def add_session_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``bench`` and ``profile``."""
    p.add_argument(
        "--provider",
        default="auto",
        choices=["auto", "cuda", "tensorrt", "cpu"],
        help="execution provider; auto = TensorRT > CUDA > CPU among those installed. The provider "
        "the session really runs on is checked: asking for CUDA and getting CPU is an error",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ONNX Runtime intra-op threads")
    p.add_argument(
        "--dim",
        action="append",
        metavar="NAME=SIZE",
        help="size of a dynamic non-batch input dimension (symbolic name or INPUT:AXIS); repeatable",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (default: 0)")
    p.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ORT intra-op threads busy-wait between runs (default: off when several models are timed "
        "interleaved, else ORT's default, on)",
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="latency, throughput and memory in ONNX Runtime; several models interleaved, as ratios",
        description="Time MODELs in one process, round-robin (the starting model rotates each round), "
        "and report ratios to the first model (median of paired per-round ratios).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL.onnx")
    add_session_arguments(p)
    p.add_argument(
        "--batch",
        default=None,
        metavar="B,B,...",
        help="batch sizes (default: 1,8,32, or the models' own batch when the graphs fix it)",
    )
    p.add_argument(
        "--warmup", type=int, default=10, metavar="N", help="untimed runs per model and batch (default: 10)"
    )
    p.add_argument("--iters", type=int, default=50, metavar="N", help="timed rounds per batch (default: 50)")
    p.add_argument("--block", type=int, default=1, metavar="N", help="calls per model per round (default: 1)")
    p.add_argument(
        "--io-binding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bind inputs/outputs on the device (default: on for CUDA/TensorRT, off on the CPU); "
        "--no-io-binding measures host-device copies too",
    )
    add_json_argument(p, help="write the results as JSON")
    p.set_defaults(func=run)
    return p


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def short_names(labels: list[str]) -> dict[str, str]:
    """File names instead of paths where they stay unique."""
    from pathlib import Path

    names = {label: Path(label).name for label in labels}
    return names if len(set(names.values())) == len(names) else {label: label for label in labels}


def wide_console(stderr: bool = False, width: int = 150) -> Any:
    """A rich console; *width* columns when the output is not a terminal (files, pipes, CI)."""
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=width)


def render_bench(results: list[Any], console: Any) -> None:
    """The results as one table that fits 100 columns; rows that did not run are listed below it."""
    from rich.table import Table

    names = short_names(sorted({r.model for r in results}))
    table = Table(title="fold-onnx bench: ms, ratios vs the first model (interleaved runs)")
    for col, just in [
        ("model", "left"), ("batch", "right"), ("prov", "left"), ("p50", "right"), ("p90", "right"),
        ("items/s", "right"), ("create s", "right"), ("mem MB", "right"), ("ratio [p25-p75]", "right"),
        ("speed-up", "right"),
    ]:  # fmt: skip
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for r in results:
        if not r.ok:
            continue
        lat = r.latency
        ratio = (
            f"{r.latency_ratio:.3f} [{r.latency_ratio_p25:.3f}-{r.latency_ratio_p75:.3f}]"
            if r.latency_ratio is not None
            else "-"
        )
        prov = (r.providers[0].replace("ExecutionProvider", "") if r.providers else "-") + (
            "+iob" if r.io_binding else ""
        )
        table.add_row(
            names[r.model],
            str(r.batch),
            prov,
            _fmt(lat and lat.p50_ms),
            _fmt(lat and lat.p90_ms),
            _fmt(r.throughput, ".1f"),
            _fmt(r.session_create_s, ".2f"),
            _fmt(r.memory_mb, ".1f"),
            ratio,
            _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
        )
    console.print(table)
    for r in results:
        if not r.ok:
            console.print(f"{names[r.model]} batch {r.batch}: {r.status}: {r.reason}")
    methods = sorted({r.memory_method for r in results if r.memory_method})
    if methods:
        console.print(f"memory: {', '.join(methods)}; ratio = median over rounds of latency / first model's")


def _fixed_batches(models: list[str]) -> dict[str, int]:
    """Models whose graph fixes the batch size, with that size."""
    from foldonnx.data.feeds import graph_inputs
    from foldonnx.onnx_file import check_model_file

    out = {}
    for m in models:
        inputs = graph_inputs(check_model_file(m).model)
        dims = inputs[0].type.tensor_type.shape.dim if inputs else []
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            out[m] = int(dims[0].dim_value)
    return out


def default_batches(models: list[str]) -> tuple[list[int], str | None]:
    """1,8,32 — or the models' own batch when every graph fixes the same one (with a note)."""
    fixed = _fixed_batches(models)
    if fixed and len(fixed) == len(models) and len(set(fixed.values())) == 1:
        b = next(iter(fixed.values()))
        return [b], f"the models fix their batch at {b}: timing batch {b} only (give --batch to choose)"
    if fixed:
        which = ", ".join(f"{short_names(models)[m]} ({b})" for m, b in fixed.items())
        return [1, 8, 32], f"fixed batch in {which}: other batch sizes are skipped for them"
    return [1, 8, 32], None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from foldonnx.onnx_file import OutputGuard
    from foldonnx.runtime import bench

    check_numbers(args, positive=("iters", "block", "threads"), nonnegative=("warmup", "seed"))
    guard = OutputGuard(args.models)
    claim_json(guard, args)
    dims = parse_dims(args.dim)
    if args.batch is not None:
        batches = parse_batches(args.batch)
        for m in args.models:
            check_model_file(m)
    else:
        batches, note = default_batches(args.models)
        if note:
            print(f"note: {note}", file=sys.stderr)
    err = Console(stderr=True)
    status = err.status("benchmarking…") if not args.quiet else nullcontext()
    with status as st:
        results = bench(
            args.models,
            provider=args.provider,
            batches=batches,
            warmup=args.warmup,
            iters=args.iters,
            threads=args.threads,
            io_binding=args.io_binding,
            block=args.block,
            dims=dims,
            seed=args.seed,
            spinning=args.spinning,
            progress=(lambda msg: st.update(msg)) if st is not None else None,
        )
    if not args.quiet:
        render_bench(results, wide_console(width=100))
    write_json(guard, args, [{"type": type(r).__name__, "data": r.to_dict()} for r in results])
    return 0 if any(r.ok for r in results) else 1
