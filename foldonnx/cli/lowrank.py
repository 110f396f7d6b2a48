"""``fold-onnx lowrank IN.onnx OUT.onnx``: activation-aware mixed-rank low rank.

The flags are the pass's config (:class:`foldonnx.passes.lowrank.LowRankConfig`) plus what the
command needs: calibration data (``--calib SOURCE``; ``--calib none`` for the data-free plain
SVD), ``--json``, ``--plot`` (ranks by layer) and the interleaved latency check
(``--bench-iters``): two skinny GEMMs can be slower than one fat one, so the latency ratio is
printed beside the parameter ratio."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from foldonnx.cli.common import (
    add_calibration_arguments,
    add_json_argument,
    calibration_preprocess,
    claim_json,
    fmt_count,
    progress_printer,
    size_table,
    write_json,
)

__all__ = ["register", "run", "plot_ranks"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from foldonnx.passes.config import add_config_arguments
    from foldonnx.passes.lowrank import LowRankConfig

    p = subparsers.add_parser(
        "lowrank",
        help="factor linear layers into two low-rank matrices fitted on calibration activations",
        description="Replace every MatMul/Gemm/1x1 Conv weight W by A·B fitted to keep the layer's "
        "outputs on calibration images (whitened SVD), with --target-params the ranks allocated over "
        "layers by their measured effect on the model's output. --calib none: plain SVD (data-free).",
    )
    p.add_argument("input", help="input ONNX file")
    p.add_argument("output", help="output ONNX file (never the input)")
    add_config_arguments(p, LowRankConfig)
    add_calibration_arguments(p, what="the whitening ('none': data-free plain SVD)")
    add_json_argument(p, help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="plot the ranks by layer (matplotlib)")
    p.add_argument(
        "--bench-iters",
        type=int,
        default=20,
        metavar="N",
        help="interleaved latency rounds, original vs output, batch 1 on the CPU (0: skip; default: 20)",
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the result")
    p.set_defaults(func=run)
    return p


def plot_ranks(report: Any, path: str | Path, dpi: int = 120) -> Path:
    """Bar chart of each factored layer's rank (and its full rank) in graph order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(layers) + 2), 3.6))
    kinds = sorted({_short_kind(r.name) for r in layers})
    colours = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    xs = range(len(layers))
    ax.bar(xs, [r.max_rank for r in layers], color="none", edgecolor="0.7", linewidth=0.6, label="full rank")
    for k in kinds:
        idx = [i for i, r in enumerate(layers) if _short_kind(r.name) == k]
        ax.bar(idx, [layers[i].rank for i in idx], color=colours[k], label=k)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("rank")
    removed = 100 * report.params_removed
    ax.set_title(f"lowrank: ranks by layer ({report.allocation}, {removed:.1f}% of parameters removed)")
    ax.legend(fontsize=7, ncol=min(len(kinds) + 1, 6), loc="upper right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _short_kind(name: str) -> str:
    """A layer's role from its node name: the last path part before the op (``fc1``, ``qkv``)."""
    parts = [p for p in name.replace(" ", "/").split("/") if p and not p.startswith("(")]
    for p in reversed(parts[:-1]):
        if not p.isdigit() and not p.startswith("layer") and not p.startswith("blocks"):
            return p
    return parts[-1] if parts else name


def _print_report(report: Any, out_size: int, latency: float | None, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    if quiet:
        return
    console = Console(file=sys.stdout, highlight=False)
    console.print(
        size_table(
            f"fold-onnx lowrank ({report.fit}, {report.allocation})", report.before, report.after, out_size
        )
    )
    t = Table(title="factored layers")
    for col in ("layer", "shape", "rank", "params before → after", "second term", "held-out error"):
        t.add_column(col, justify="left" if col in ("layer", "second term") else "right", overflow="fold")
    show = report.layers if len(report.layers) <= 48 else report.layers[:48]
    for r in show:
        err = "-" if r.heldout_error is None else f"{r.heldout_error:.4f}"
        term = r.second_term + (f" ({r.columns} rows)" if r.columns else "")
        t.add_row(
            r.name,
            f"{r.n_in}x{r.n_out}",
            f"{r.rank}/{r.max_rank}",
            f"{fmt_count(r.params_before)} → {fmt_count(r.params_after)}",
            term,
            err,
        )
    console.print(t)
    if len(report.layers) > len(show):
        console.print(f"  ... and {len(report.layers) - len(show)} more layers (see --json)")
    before = sum(r.params_before for r in report.layers)
    after = sum(r.params_after for r in report.layers)
    console.print(
        f"{len(report.layers)} of {report.candidates} layers factored: {fmt_count(before)} → "
        f"{fmt_count(after)} parameters in them"
    )
    if report.second_term_tried:
        kept = sum(report.second_term_kept.values())
        console.print(
            f"second term kept in {kept} of {len(report.layers)} layers ({report.second_term_kept})"
        )
    if report.skipped:
        console.print(f"left alone: {len(report.skipped)} layer(s):")
        for s in report.skipped[:8]:
            console.print(f"  {s.what}: {s.reason}")
        if len(report.skipped) > 8:
            console.print(f"  ... and {len(report.skipped) - 8} more (see --json)")
    for note in report.notes[:8]:
        console.print(f"note: {note}")
    ratio = report.after.params / max(report.before.params, 1)
    lat = "not measured" if latency is None else f"{latency:.3f}"
    console.print(
        f"{fmt_count(report.before.params)} → {fmt_count(report.after.params)} parameters "
        f"(ratio {ratio:.3f}, {100 * report.params_removed:.1f}% removed); latency ratio {lat} "
        f"(batch 1, CPU, interleaved); time {report.seconds:.1f} s"
    )


def _latency(src: Path, dst: Path, iters: int, threads: int | None) -> float | None:
    from foldonnx.runtime.bench import latency_vs

    r = latency_vs(str(src), str(dst), iters=iters, threads=threads, label="lowrank")
    return r.latency_ratio if r.ok else None


def run(args: argparse.Namespace) -> int:
    from foldonnx.errors import UsageError
    from foldonnx.onnx_file import OutputGuard, load_model
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.config import config_from_args
    from foldonnx.passes.lowrank import NO_DATA, LowRankConfig, LowRankPass

    src, dst = Path(args.input), Path(args.output)
    config = config_from_args(args, LowRankConfig)  # bad options: one line, before anything else
    if args.bench_iters < 0:
        raise UsageError(f"--bench-iters must be >= 0, got {args.bench_iters}")
    guard = OutputGuard([src])
    guard.claim(dst, "output")
    claim_json(guard, args)
    if args.plot:
        guard.claim(args.plot, "--plot")
    loaded = load_model(src)
    data = bool(args.calib) and args.calib.strip().lower() not in NO_DATA
    preprocess = calibration_preprocess(loaded.model, args.calib_norm) if data else None
    ctx = PassContext(
        calib=args.calib,
        preprocess=preprocess,
        verify=not args.no_verify,
        progress=sys.stderr.isatty() and not args.quiet,
        threads=args.threads,
        file_size=loaded.file_size,
        on_progress=progress_printer(args.quiet),
    )
    if data:  # calibration data is checked against the model before any work
        ctx.calibration(loaded.model, limit=config.calib_limit, seed=config.seed)
    result = LowRankPass(config).run(loaded.model, ctx)
    guard.save_model(result.model, dst, source=src, external_data=loaded.external_data or None)
    out_size = load_model(dst, load_weights=False).file_size
    report = result.report
    report.after.bytes = out_size
    latency = _latency(src, dst, args.bench_iters, args.threads) if args.bench_iters else None
    d = report.to_dict()
    d["latency_ratio"] = latency
    d["params_ratio"] = report.after.params / max(report.before.params, 1)
    write_json(guard, args, d)
    if args.plot:
        plot_ranks(report, args.plot)  # claimed above
        print(f"wrote {args.plot}", file=sys.stderr)
    _print_report(report, out_size, latency, args.quiet)
    print(f"wrote {dst}", file=sys.stderr)
    return 0
