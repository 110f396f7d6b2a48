"""``fold-onnx profile MODEL.onnx [MODEL2.onnx]``: where the time goes, per op type and node."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

from foldonnx.cli.bench import add_session_arguments, parse_dims, wide_console
from foldonnx.cli.common import add_json_argument, check_numbers, claim_json, write_json

__all__ = ["register", "run", "render_profile", "render_comparison"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="ONNX Runtime profiler: time per op type and top nodes; two models: before/after ratio",
        description="Profile MODEL with ONNX Runtime's profiler (op types as ORT runs them, after its "
        "fusions). With MODEL2 the two are run interleaved and compared per op type.",
    )
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("model2", nargs="?", default=None, metavar="MODEL2.onnx", help="e.g. the folded model")
    add_session_arguments(p)
    p.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default: 1)")
    p.add_argument(
        "--warmup", type=int, default=5, metavar="N", help="untimed runs, dropped from the trace (default: 5)"
    )
    p.add_argument("--iters", type=int, default=20, metavar="N", help="profiled runs (default: 20)")
    p.add_argument("--top", type=int, default=15, metavar="N", help="rows of the node table (default: 15)")
    p.add_argument("--trace-dir", default=None, metavar="DIR", help="keep ORT's JSON traces here (created)")
    add_json_argument(p, help="write the result as JSON")
    p.set_defaults(func=run)
    return p


def _name(label: str) -> str:
    from pathlib import Path

    return Path(label).name or label


def _summary(r: Any) -> str:
    share = r.kernel_ms / r.run_ms if r.run_ms > 0 else 0.0
    return (
        f"{_name(r.model)} on {r.providers[0] if r.providers else '?'}, batch {r.batch}, {r.iters} runs: "
        f"{r.run_ms / r.iters:.3f} ms/run in ORT (kernels {r.kernel_ms / r.iters:.3f} ms = {share:.0%}, "
        f"overhead {r.overhead_ms / r.iters:.3f} ms), wall {r.wall_ms / r.iters:.3f} ms/run"
    )


def render_profile(r: Any, console: Any) -> None:
    from rich.table import Table

    console.print(_summary(r))
    ops = Table(title=f"per op type — {_name(r.model)}")
    for col in ("op type", "ms/run", "share", "calls", "avg ms/call", "total ms"):
        ops.add_column(col, justify="left" if col == "op type" else "right")
    for s in r.op_types:
        ops.add_row(
            s.op_type,
            f"{s.per_run_ms:.3f}",
            f"{s.share:.1%}",
            str(s.count),
            f"{s.avg_ms:.4f}",
            f"{s.total_ms:.2f}",
        )
    ops.add_row("(kernels total)", f"{r.kernel_ms / r.iters:.3f}", "100.0%", "", "", f"{r.kernel_ms:.2f}")
    console.print(ops)
    nodes = Table(title=f"top {len(r.top_nodes)} of {r.node_count} nodes — {_name(r.model)}")
    for col in ("node", "op type", "ms/run", "share", "calls"):
        nodes.add_column(col, justify="left" if col in ("node", "op type") else "right")
    for s in r.top_nodes:
        nodes.add_row(s.node, s.op_type, f"{s.per_run_ms:.3f}", f"{s.share:.1%}", str(s.count))
    console.print(nodes)


def render_comparison(c: Any, console: Any) -> None:
    from rich.table import Table

    before, after = _name(c.before.model), _name(c.after.model)
    table = Table(title=f"per op type, ms/run: {before} → {after} (ratio = after / before)")
    for col in ("op type", "before", "after", "ratio"):
        table.add_column(col, justify="left" if col == "op type" else "right")
    for row in c.rows:
        table.add_row(
            row.op_type,
            f"{row.before_ms:.3f}",
            f"{row.after_ms:.3f}",
            "new" if row.ratio is None else f"{row.ratio:.3f}",
        )
    kr = "-" if c.kernel_ratio is None else f"{c.kernel_ratio:.3f}"
    rr = "-" if c.run_ratio is None else f"{c.run_ratio:.3f}"
    table.add_row("(kernels total)", f"{c.before.kernel_ms / c.before.iters:.3f}",
                  f"{c.after.kernel_ms / c.after.iters:.3f}", kr)  # fmt: skip
    table.add_row("(ORT run total)", f"{c.before.run_ms / c.before.iters:.3f}",
                  f"{c.after.run_ms / c.after.iters:.3f}", rr)  # fmt: skip
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from foldonnx.onnx_file import OutputGuard, check_model_file
    from foldonnx.runtime import profile, profile_compare

    check_numbers(args, positive=("batch", "iters", "top", "threads"), nonnegative=("warmup", "seed"))
    models = [args.model] + ([args.model2] if args.model2 else [])
    guard = OutputGuard(models)
    claim_json(guard, args)
    if args.trace_dir:
        guard.claim(args.trace_dir, "--trace-dir", folder=True)
    for m in models:
        check_model_file(m)
    dims = parse_dims(args.dim)
    if args.trace_dir:
        Path(args.trace_dir).mkdir(exist_ok=True)
    common = dict(
        provider=args.provider, batch=args.batch, iters=args.iters, warmup=args.warmup, threads=args.threads,
        top=args.top, dims=dims, seed=args.seed, trace_dir=args.trace_dir, spinning=args.spinning,
    )  # fmt: skip
    status = Console(stderr=True).status("profiling…") if not args.quiet else nullcontext()
    with status:
        if args.model2 is None:
            result: Any = profile(args.model, **common)
        else:
            result = profile_compare(args.model, args.model2, **common)
    if not args.quiet:
        console = wide_console()
        if args.model2 is None:
            render_profile(result, console)
        else:
            render_profile(result.before, console)
            render_profile(result.after, console)
            render_comparison(result, console)
    write_json(guard, args, [{"type": type(result).__name__, "data": result.to_dict()}])
    return 0
