"""``fold-onnx approx-blocks IN.onnx OUT.onnx (--blocks SPEC | --target-params F) --calib SOURCE``:
replace runs of transformer blocks by linear maps fitted on calibration data.

The flags are the block pass's config (:class:`foldonnx.passes.blocks.BlocksConfig`) plus what
the command itself needs (calibration data, ``--plot``, ``--json``, ``--no-verify``)."""

from __future__ import annotations

import argparse
import os
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

__all__ = ["register", "run", "plot_similarity"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from foldonnx.passes.blocks import BlocksConfig
    from foldonnx.passes.config import add_config_arguments

    p = subparsers.add_parser(
        "approx-blocks",
        help="replace runs of transformer blocks by linear maps fitted on calibration data (TBA)",
        description="Find the transformer blocks of a model from its residual stream, and replace the "
        "blocks given (--blocks 9-11, several spans allowed: 8-9,11) or chosen for a parameter budget "
        "(--target-params F) by one linear map each, fitted in closed form on calibration images.",
    )
    p.add_argument("input", help="input ONNX file")
    p.add_argument("output", help="output ONNX file (never the input)")
    add_config_arguments(p, BlocksConfig)
    add_calibration_arguments(p, what="the fit (required)")
    p.add_argument(
        "--plot", metavar="FILE.png", default=None, help="draw the block-to-block similarity matrix"
    )
    add_json_argument(p, help="write the report as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the result")
    p.set_defaults(func=run)
    return p


def plot_similarity(report: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Heatmap of the mean cosine between the residual stream at every pair of block
    boundaries (boundary k enters block k), the replaced spans outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    sim = np.array([[np.nan if v is None else v for v in row] for row in report.similarity], dtype=float)
    if sim.size == 0:
        from foldonnx.errors import UsageError

        raise UsageError("no similarity matrix in this report (nothing was measured)")
    n = len(sim)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(sim, cmap="viridis", vmin=max(0.0, float(np.nanmin(sim))), vmax=1.0, origin="upper")
    fig.colorbar(im, ax=ax, label="cosine between boundary tensors")
    for s in report.spans:
        i, j = s.first, s.last + 1
        for x, y in ((j, i), (i, j)):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ticks = list(range(n))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("boundary (k = input of block k)")
    ax.set_ylabel("boundary")
    chosen = ",".join(f"{s.first}" if s.first == s.last else f"{s.first}-{s.last}" for s in report.spans)
    ax.set_title(title or f"block similarity; replaced: {chosen or '-'}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _print_report(report: Any, out_size: int, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    if quiet:
        return
    console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 140)
    console.print(size_table("fold-onnx approx-blocks", report.before, report.after, out_size))
    console.print(
        f"{report.blocks_found} {report.norm} blocks, stream {report.layout} (width {report.width}); "
        f"calibration: {report.calib_images} images ({report.held_images} held out)"
    )
    if report.candidates:
        t = Table(title="candidate spans (cosine in/out, linear CKA, held-out fit error 1-R², e2e)")
        for col in ("blocks", "cosine", "CKA", "fit error", "e2e", "params"):
            t.add_column(col, justify="left" if col == "blocks" else "right")
        for cand in sorted(report.candidates, key=lambda c: (c.last - c.first, c.first)):
            e2e = report.e2e_scores.get(cand.text)
            t.add_row(
                cand.text,
                f"{cand.cosine:.3f}",
                f"{cand.cka:.3f}",
                f"{cand.fit_error:.4f}",
                "-" if e2e is None else f"{e2e:.4f}",
                fmt_count(cand.params_removed),
            )
        console.print(t)
        console.print(
            "choice by criterion: "
            + ", ".join(
                f"{k} {v}" + (f" (e2e {report.e2e_scores[v]:.4f})" if v in report.e2e_scores else "")
                for k, v in report.choices.items()
            )
            + f"; used: {report.select}"
        )
    st = Table(title="replaced")
    for col in ("blocks", "block params", "map", "fit", "held-out error", "fitted on"):
        st.add_column(col, justify="left" if col in ("blocks", "map", "fit", "fitted on") else "right")
    for s in report.spans:
        text = f"{s.first}" if s.first == s.last else f"{s.first}-{s.last}"
        st.add_row(
            text, fmt_count(s.params_removed), f"{s.map} ({fmt_count(s.map_params)})", s.fit,
            f"{s.held_error:.4f}", s.fitted_on,
        )  # fmt: skip
    console.print(st)
    for note in report.notes[:8]:
        console.print(f"note: {note}")
    console.print(
        f"{fmt_count(report.before.params)} → {fmt_count(report.after.params)} parameters "
        f"({100 * report.params_removed:.1f}% removed), MACs {100 * report.macs_removed:.1f}% fewer; "
        f"time {report.seconds:.1f} s (statistics {report.seconds_stats:.1f}, choice "
        f"{report.seconds_select:.1f}, fit {report.seconds_fit:.1f})"
    )


def run(args: argparse.Namespace) -> int:
    from foldonnx.errors import UsageError
    from foldonnx.onnx_file import OutputGuard, load_model
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.blocks import BlocksConfig, BlocksPass
    from foldonnx.passes.config import config_from_args

    src, dst = Path(args.input), Path(args.output)
    config = config_from_args(args, BlocksConfig)  # bad options: one line, before anything else
    if not args.calib and config.target_params != 0:
        raise UsageError("approx-blocks needs calibration data: give --calib SOURCE (e.g. offdomain:256)")
    guard = OutputGuard([src])
    guard.claim(dst, "output")
    claim_json(guard, args)
    plot_path = guard.claim(args.plot, "--plot") if args.plot else None
    loaded = load_model(src)
    preprocess = calibration_preprocess(loaded.model, args.calib_norm) if args.calib else None
    ctx = PassContext(
        calib=args.calib,
        preprocess=preprocess,
        verify=not args.no_verify,
        progress=sys.stderr.isatty() and not args.quiet,
        file_size=loaded.file_size,
        on_progress=progress_printer(args.quiet),
    )
    result = BlocksPass(config).run(loaded.model, ctx)
    guard.save_model(result.model, dst, source=src, external_data=loaded.external_data or None)
    out_size = load_model(dst, load_weights=False).file_size
    report = result.report
    report.after.bytes = out_size
    write_json(guard, args, report.to_dict())
    if plot_path is not None and report.similarity:
        plot_similarity(report, plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
    _print_report(report, out_size, args.quiet)
    print(f"wrote {dst}", file=sys.stderr)
    return 0
