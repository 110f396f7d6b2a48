"""Where the time goes: ONNX Runtime's profiler reduced to per-op-type and per-node tables.

The session runs with ``enable_profiling``; its JSON trace (Chrome trace format) holds one
``model_run`` event per run and one ``<node>_kernel_time`` event per kernel call, with the op
type ORT really ran (after its graph fusions, e.g. ``FusedConv``). Warm-up runs are dropped by
keeping only kernel events inside the last ``iters`` ``model_run`` windows. With two models the
runs are interleaved and the per-op-type before/after ratio shows where a folded model wins.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from foldonnx.errors import RuntimeBackendError, UsageError
from foldonnx.runtime.results import NodeStat, OpTypeRatio, OpTypeStat, ProfileComparison, ProfileResult
from foldonnx.runtime.session import create_session, make_inputs, model_label

__all__ = ["profile", "profile_compare", "parse_trace", "compare_op_types", "TraceTables"]

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | bytes
_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class TraceTables:
    """Tables reduced from one trace (see :func:`parse_trace`)."""

    runs: int
    run_ms: float
    kernel_ms: float
    op_types: list[OpTypeStat]
    nodes: list[NodeStat]


def parse_trace(events: list[dict[str, Any]], iters: int | None = None) -> TraceTables:
    """Reduce ORT profiler events to op-type and node tables over the last ``iters`` runs.

    Pure function over the decoded JSON list. Times in the tables are milliseconds; shares are
    fractions of the kernel total; tables are sorted by total time, largest first.
    """
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    if not runs:
        raise RuntimeBackendError("profiler trace holds no model_run events")
    if iters is not None:
        if iters < 1:
            raise UsageError(f"iters must be >= 1, got {iters}")
        runs = runs[-iters:]
    windows = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in runs]
    run_us = sum(float(e["dur"]) for e in runs)

    node_us: dict[str, float] = defaultdict(float)
    node_count: dict[str, int] = defaultdict(int)
    node_op: dict[str, str] = {}
    starts = [w[0] for w in windows]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith(_KERNEL_SUFFIX):
            continue
        ts = float(e["ts"])
        k = bisect.bisect_right(starts, ts) - 1
        if k < 0 or ts > windows[k][1]:
            continue  # a warm-up run or outside every kept run
        name = e["name"][: -len(_KERNEL_SUFFIX)]
        node_us[name] += float(e["dur"])
        node_count[name] += 1
        node_op[name] = str(e.get("args", {}).get("op_name", "?"))
    kernel_us = sum(node_us.values())
    n_runs = len(runs)

    op_us: dict[str, float] = defaultdict(float)
    op_count: dict[str, int] = defaultdict(int)
    for name, us in node_us.items():
        op_us[node_op[name]] += us
        op_count[node_op[name]] += node_count[name]

    def share(us: float) -> float:
        return us / kernel_us if kernel_us > 0 else 0.0

    op_table = [
        OpTypeStat(
            op_type=op,
            total_ms=us / 1e3,
            share=share(us),
            count=op_count[op],
            avg_ms=us / 1e3 / op_count[op],
            per_run_ms=us / 1e3 / n_runs,
        )
        for op, us in sorted(op_us.items(), key=lambda kv: -kv[1])
    ]
    node_table = [
        NodeStat(
            node=name,
            op_type=node_op[name],
            total_ms=us / 1e3,
            share=share(us),
            count=node_count[name],
            avg_ms=us / 1e3 / node_count[name],
            per_run_ms=us / 1e3 / n_runs,
        )
        for name, us in sorted(node_us.items(), key=lambda kv: -kv[1])
    ]
    return TraceTables(n_runs, run_us / 1e3, kernel_us / 1e3, op_table, node_table)


class _Profiled:
    def __init__(
        self,
        model: ModelLike,
        label: str,
        provider: str,
        batch: int,
        threads: int | None,
        dims: dict[str, int] | None,
        seed: int,
        prefix: Path,
        spinning: bool | None,
    ) -> None:
        self.label = label
        self.rs = create_session(
            model,
            provider,
            threads=threads,
            profile=True,
            profile_prefix=prefix,
            label=label,
            spinning=spinning,
        )
        self.feeds = make_inputs(self.rs.inputs, batch, dims=dims, seed=seed)
        self.wall_ms = 0.0

    def run(self, timed: bool) -> None:
        t0 = time.perf_counter()
        self.rs.session.run(None, self.feeds)
        if timed:
            self.wall_ms += (time.perf_counter() - t0) * 1e3

    def finish(self, provider: str, batch: int, iters: int, top: int, keep: Path | None) -> ProfileResult:
        trace = Path(self.rs.session.end_profiling())
        events = json.loads(trace.read_text())
        tables = parse_trace(events, iters)
        kept = ""
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            dest = keep / trace.name
            shutil.copy(trace, dest)
            kept = str(dest)
        return ProfileResult(
            model=self.label,
            provider=provider,
            providers=self.rs.providers,
            batch=batch,
            iters=tables.runs,
            run_ms=tables.run_ms,
            kernel_ms=tables.kernel_ms,
            overhead_ms=tables.run_ms - tables.kernel_ms,
            wall_ms=self.wall_ms,
            op_types=tables.op_types,
            top_nodes=tables.nodes[:top],
            node_count=len(tables.nodes),
            trace_file=kept,
        )


def _profile_many(
    models: Sequence[ModelLike],
    labels: Sequence[str] | None,
    provider: str,
    batch: int,
    iters: int,
    warmup: int,
    threads: int | None,
    top: int,
    dims: dict[str, int] | None,
    seed: int,
    trace_dir: str | os.PathLike | None,
    spinning: bool | None,
) -> list[ProfileResult]:
    if iters < 1 or warmup < 0 or top < 1:
        raise UsageError(f"need iters >= 1, warmup >= 0, top >= 1 (got {iters}, {warmup}, {top})")
    names = list(labels) if labels else [model_label(m, i) for i, m in enumerate(models)]
    keep = Path(trace_dir) if trace_dir is not None else None
    if spinning is None and len(models) > 1:
        spinning = False  # interleaved sessions: one's busy-waiting threads would slow the other
    with tempfile.TemporaryDirectory(prefix="foldonnx-profile-") as tmp:
        profiled = [
            _Profiled(m, names[i], provider, batch, threads, dims, seed, Path(tmp) / f"m{i}", spinning)
            for i, m in enumerate(models)
        ]
        for _ in range(warmup):
            for p in profiled:
                p.run(timed=False)
        for r in range(iters):  # interleaved, starting model rotating
            for k in range(len(profiled)):
                profiled[(r + k) % len(profiled)].run(timed=True)
        return [p.finish(provider, batch, iters, top, keep) for p in profiled]


def profile(
    model: ModelLike,
    provider: str = "auto",
    batch: int = 1,
    iters: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    top: int = 15,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    trace_dir: str | os.PathLike | None = None,
    label: str | None = None,
    spinning: bool | None = None,
) -> ProfileResult:
    """Profile ``iters`` runs of one model (after ``warmup``) with ORT's profiler."""
    return _profile_many(
        [model],
        [label] if label else None,
        provider,
        batch,
        iters,
        warmup,
        threads,
        top,
        dims,
        seed,
        trace_dir,
        spinning,
    )[0]


def compare_op_types(before: ProfileResult, after: ProfileResult) -> list[OpTypeRatio]:
    """Per-run kernel time per op type in both profiles and ``after / before`` (pure)."""
    b = {s.op_type: s.per_run_ms for s in before.op_types}
    a = {s.op_type: s.per_run_ms for s in after.op_types}
    ops = sorted(set(a) | set(b), key=lambda op: -max(a.get(op, 0.0), b.get(op, 0.0)))
    return [
        OpTypeRatio(
            op_type=op,
            before_ms=b.get(op, 0.0),
            after_ms=a.get(op, 0.0),
            ratio=(a.get(op, 0.0) / b[op]) if b.get(op, 0.0) > 0 else None,
        )
        for op in ops
    ]


def profile_compare(
    before: ModelLike,
    after: ModelLike,
    provider: str = "auto",
    batch: int = 1,
    iters: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    top: int = 15,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    trace_dir: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    spinning: bool | None = None,
) -> ProfileComparison:
    """Profile two models interleaved and compare them per op type."""
    pb, pa = _profile_many(
        [before, after], labels, provider, batch, iters, warmup, threads, top, dims, seed, trace_dir, spinning
    )
    return ProfileComparison(
        before=pb,
        after=pa,
        rows=compare_op_types(pb, pa),
        kernel_ratio=pa.kernel_ms / pb.kernel_ms if pb.kernel_ms > 0 else None,
        run_ratio=pa.run_ms / pb.run_ms if pb.run_ms > 0 else None,
    )
