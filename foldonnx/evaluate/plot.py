"""Pareto plot of a sweep: quality vs parameters, vs file size and vs measured latency, one line
per method.

Drawn with matplotlib's Agg backend (no display needed). Each line is one method (and one
quantization setting); it starts at the original model (ratio 0) and follows increasing ratios.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from foldonnx.evaluate.sweep import ORIGINAL, SweepPoint, SweepReport, point_quality, primary_metric

__all__ = ["plot_pareto"]

logger = logging.getLogger(__name__)


def _series(report: SweepReport) -> dict[str, list[SweepPoint]]:
    series: dict[str, list[SweepPoint]] = {}
    quants = [None] + ([report.quantize] if report.quantize else [])
    for quant in quants:
        orig = report.original(quant)
        for method in report.methods:
            pts = sorted(
                (p for p in report.points if p.ok and p.method == method and p.quantize == quant),
                key=lambda p: p.ratio,
            )
            if orig is not None and orig.ok:
                pts = [orig, *pts]
            label = method + (f" + {quant}" if quant else "")
            series[label] = pts
    return series


def plot_pareto(
    report: SweepReport, path: str | os.PathLike, *, metric: str | None = None, dpi: int = 120
) -> Path:
    """Write a three-panel PNG (quality vs params, vs file size, vs latency ratio) to *path*."""
    from foldonnx.extras import require

    require("matplotlib", "the Pareto plot").use("Agg")
    plt = require("matplotlib.pyplot", "the Pareto plot")
    metric = metric or primary_metric(report)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    markers = "osD^v<>pXh"
    for i, (label, pts) in enumerate(_series(report).items()):
        quality = [point_quality(p, metric) for p in pts]
        for ax, xs in (
            (axes[0], [p.params / 1e6 if p.params is not None else None for p in pts]),
            (axes[1], [p.bytes / 1e6 if p.bytes is not None else None for p in pts]),
            (axes[2], [p.latency_ratio for p in pts]),
        ):
            xy = [(x, y) for x, y in zip(xs, quality, strict=True) if x is not None and y is not None]
            if not xy:
                continue
            ls = "--" if "+" in label else "-"
            ax.plot([a for a, _ in xy], [b for _, b in xy], ls, marker=markers[i % len(markers)], label=label)
            for p, x, y in zip(pts, xs, quality, strict=True):
                if x is not None and y is not None and p.method != ORIGINAL:
                    ax.annotate(f"{p.ratio:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    orig = report.original()
    if orig is not None and orig.ok:
        q = point_quality(orig, metric)
        if q is not None and orig.params is not None:
            axes[0].plot([orig.params / 1e6], [q], "k*", markersize=12, label="original")
        if q is not None and orig.bytes is not None:
            axes[1].plot([orig.bytes / 1e6], [q], "k*", markersize=12, label="original")
        if q is not None and orig.latency_ratio is not None:
            axes[2].plot([orig.latency_ratio], [q], "k*", markersize=12, label="original")
    axes[0].set_xlabel("parameters (M)")
    axes[1].set_xlabel("file size (MB)")
    axes[2].set_xlabel("latency ratio to original (interleaved, batch 1, CPU)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(report.model).name}: {metric} vs size and latency")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    logger.info("wrote %s", out)
    return out
