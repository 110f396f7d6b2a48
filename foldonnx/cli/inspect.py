"""``fold-onnx inspect MODEL.onnx [--json FILE]``: the channel groups of a model, as a table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from foldonnx.cli.common import add_json_argument, claim_json, write_json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="list the coupled channel groups of an ONNX model (what can be folded, and why not)",
        description="Find every coupled channel group (MLP hidden units, attention heads, residual "
        "stream, conv channels, depthwise/residual-coupled channels, squeeze-excitation) by "
        "propagating channel axes through the graph, and show which can be folded.",
    )
    p.add_argument("model", help="ONNX file to analyse")
    add_json_argument(
        p, help="write the model's totals (params, macs, bytes) and its groups (ChannelGroup dicts) as JSON"
    )
    p.add_argument("--blocked-only", action="store_true", help="list only groups that cannot be folded")
    p.add_argument("--members", action="store_true", help="list the members of every group too")
    p.set_defaults(func=run)
    return p


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from foldonnx.analysis import find_channel_groups, summarize_groups
    from foldonnx.graph.stats import model_stats
    from foldonnx.onnx_file import OutputGuard, load_model

    guard = OutputGuard([args.model])
    claim_json(guard, args)
    loaded = load_model(args.model)
    t0 = time.perf_counter()
    groups = find_channel_groups(loaded.model)
    seconds = time.perf_counter() - t0
    stats = model_stats(loaded.model, loaded.file_size)
    total = stats.params
    summary = summarize_groups(groups, loaded.model)
    from foldonnx.analysis.blocks import find_blocks

    blocks = find_blocks(loaded.model, groups)
    if args.quiet:
        write_json(guard, args, _json_report(args.model, stats, summary, groups, blocks))
        return 0

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 150)
    table = Table(title=f"channel groups of {Path(args.model).name}", show_lines=False)
    for col, justify in (
        ("id", "right"),
        ("kind", "left"),
        ("name", "left"),
        ("channels x unit", "right"),
        ("params", "right"),
        ("status", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")
    for g in groups:
        if args.blocked_only and g.foldable:
            continue
        size = f"{g.channels}" if g.unit == 1 else f"{g.channels} x {g.unit}"
        status = Text("foldable", style="green") if g.foldable else Text(f"blocked: {g.blocked}", style="red")
        table.add_row(str(g.id), g.kind.value, escape(g.name), size, _fmt(g.params), status)
        if args.members:
            for m in g.members:
                where = f"{m.tensor}[axis {m.axis}, offset {m.offset}]"
                role = f"  {m.role.value} {m.param} {m.tag}".rstrip()
                table.add_row("", "", role, "", "", escape(f"{where} @ {m.node}"))
    console.print(table)

    kinds = Table(title="totals by kind")
    for col in ("kind", "groups", "foldable", "params governed", "in foldable groups"):
        kinds.add_column(col, justify="left" if col == "kind" else "right")
    for kind, row in summary["by_kind"].items():
        kinds.add_row(
            kind, str(row["groups"]), str(row["foldable"]), _fmt(row["params"]), _fmt(row["foldable_params"])
        )
    console.print(kinds)
    share = summary["foldable_share"]
    console.print(
        f"{summary['foldable_groups']} of {summary['groups']} groups foldable; "
        f"{_fmt(summary['params_in_foldable_groups'])} of {_fmt(total)} parameters ({100 * share:.1f}%) "
        f"sit in tensors of foldable groups "
        f"({100 * summary['foldable_share_without_residual']:.1f}% without the residual stream); "
        f"analysis took {seconds:.2f} s"
    )
    console.print(
        f"model: {_fmt(stats.params)} parameters, {_fmt(stats.macs)} MACs per sample"
        + (
            f" (assuming {', '.join(f'{k} = {v}' for k, v in stats.assumed.items())})"
            if stats.assumed
            else ""
        )
        + f", {stats.bytes / 1e6:.2f} MB"
    )
    _print_blocks(console, blocks)
    write_json(guard, args, _json_report(args.model, stats, summary, groups, blocks))
    return 0


def _print_blocks(console: Any, blocks: Any) -> None:
    """The transformer blocks found on the residual stream (what ``approx-blocks`` replaces)."""
    from rich.markup import escape
    from rich.table import Table

    if not blocks.blocks:
        console.print(f"transformer blocks: none ({blocks.reason})")
        return
    t = Table(title=f"transformer blocks ({blocks.norm}, stream {blocks.layout} {list(blocks.shape)})")
    for col, justify in (("block", "right"), ("name", "left"), ("sublayers", "left"), ("params", "right"),
                         ("boundary in", "left"), ("boundary out", "left")):  # fmt: skip
        t.add_column(col, justify=justify, overflow="fold")
    for b in blocks.blocks:
        t.add_row(
            str(b.index),
            escape(b.name),
            "+".join(b.sublayers),
            _fmt(b.params),
            escape(b.start),
            escape(b.end),
        )
    console.print(t)


def _json_report(path: str, stats: Any, summary: dict, groups: list, blocks: Any = None) -> dict[str, Any]:
    """The model's totals (named as in every command's JSON) beside its groups and blocks."""
    out = {
        "model": str(path),
        **stats.to_dict(),
        "summary": summary,
        "groups": [g.to_dict() for g in groups],
    }
    if blocks is not None:
        out["blocks"] = blocks.to_dict()
    return out
