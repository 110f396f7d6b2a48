"""Typed results of the runtime module, with a JSON round trip.

Every result is a dataclass with ``to_dict()`` / ``from_dict()``; :func:`dump_json` and
:func:`load_json` write and read lists of them. Nested dataclasses are rebuilt from their
field annotations, so ``from_dict(to_dict(x)) == x`` holds for every type here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "LatencyStats",
    "latency_stats",
    "BenchResult",
    "OpTypeStat",
    "NodeStat",
    "ProfileResult",
    "OpTypeRatio",
    "ProfileComparison",
    "FidelityReport",
    "QuantizeResult",
    "dump_json",
    "load_json",
]

T = TypeVar("T", bound="_Record")


class _Record:
    """``to_dict`` / ``from_dict`` for the dataclasses below (nested records and lists of them)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            kwargs[f.name] = _rebuild(hints[f.name], data[f.name])
        return cls(**kwargs)


def _rebuild(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        for a in args:
            if a is type(None):
                continue
            return _rebuild(a, value)
    if origin is list and args:
        return [_rebuild(args[0], v) for v in value]
    if isinstance(hint, type) and issubclass(hint, _Record) and isinstance(value, dict):
        return hint.from_dict(value)
    return value


@dataclass(frozen=True)
class LatencyStats(_Record):
    """Latency of one call in milliseconds over ``n`` timed calls."""

    n: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float


def latency_stats(samples_ms: np.ndarray | list[float]) -> LatencyStats:
    """Summary statistics of latency samples (pure numpy)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencyStats(
        n=int(a.size),
        mean_ms=float(a.mean()),
        std_ms=float(a.std(ddof=1)) if a.size > 1 else 0.0,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(a.min()),
        max_ms=float(a.max()),
    )


@dataclass
class BenchResult(_Record):
    """One model at one batch size, measured interleaved with the other models of the run.

    ``order`` lists, for every timed call of this batch size, the index of the model that ran
    (the same list in every result of the batch), so the interleaving can be checked.
    ``latency_ratio`` is the median over rounds of (this model's latency / the first model's
    latency in the same round); ``speedup`` is its inverse. Both are ``None`` for the first
    model's own comparison baseline only when it did not run.
    """

    model: str
    model_index: int
    batch: int
    provider: str  # what was asked: auto / cpu / cuda / tensorrt
    providers: list[str] = field(default_factory=list)  # what the session really runs on
    status: str = "ok"  # ok / skipped / failed
    reason: str = ""
    latency: LatencyStats | None = None
    throughput: float | None = None  # items per second = batch / mean latency
    session_create_s: float | None = None
    memory_mb: float | None = None
    memory_method: str = ""
    io_binding: bool = False
    threads: int | None = None
    warmup: int = 0
    iters: int = 0
    block: int = 1
    spinning: bool | None = None  # ORT intra-op threads busy-wait between runs
    order: list[int] = field(default_factory=list)
    latency_ratio: float | None = None
    latency_ratio_p25: float | None = None
    latency_ratio_p75: float | None = None
    speedup: float | None = None
    reference: str = ""  # the model the ratios refer to

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class OpTypeStat(_Record):
    """Kernel time of one op type (as ORT ran it, after its graph fusions) over all profiled runs."""

    op_type: str
    total_ms: float
    share: float  # of the kernel total
    count: int  # kernel calls over all runs
    avg_ms: float  # per call
    per_run_ms: float


@dataclass(frozen=True)
class NodeStat(_Record):
    """Kernel time of one node over all profiled runs."""

    node: str
    op_type: str
    total_ms: float
    share: float
    count: int
    avg_ms: float
    per_run_ms: float


@dataclass
class ProfileResult(_Record):
    """ORT profiler trace of ``iters`` runs (warm-up runs dropped) reduced to tables.

    ``run_ms`` is the sum of ORT's ``model_run`` events, ``kernel_ms`` the sum of all node
    kernel times inside them, ``overhead_ms = run_ms - kernel_ms`` (scheduling, allocation,
    copies). The op-type table and the full node table both sum to ``kernel_ms``.
    """

    model: str
    provider: str
    providers: list[str]
    batch: int
    iters: int
    run_ms: float
    kernel_ms: float
    overhead_ms: float
    wall_ms: float  # perf_counter around the profiled runs, for comparison
    op_types: list[OpTypeStat] = field(default_factory=list)
    top_nodes: list[NodeStat] = field(default_factory=list)
    node_count: int = 0  # nodes in the full node table (top_nodes is its head)
    trace_file: str = ""


@dataclass(frozen=True)
class OpTypeRatio(_Record):
    """Per-run kernel time of one op type before and after (``ratio = after / before``)."""

    op_type: str
    before_ms: float
    after_ms: float
    ratio: float | None  # None when the op type is absent before


@dataclass
class ProfileComparison(_Record):
    before: ProfileResult
    after: ProfileResult
    rows: list[OpTypeRatio] = field(default_factory=list)
    kernel_ratio: float | None = None
    run_ratio: float | None = None


@dataclass
class FidelityReport(_Record):
    """Outputs of a compressed model vs the reference on real inputs."""

    source: str
    n: int
    output: str  # the output compared
    cosine_mean: float
    cosine_min: float
    max_abs_diff: float
    top1_agreement: float | None = None  # when the output looks like class scores [N, C]
    top1_acc_reference: float | None = None  # when the source has labels in the class range
    top1_acc_candidate: float | None = None


@dataclass
class QuantizeResult(_Record):
    input: str
    output: str
    mode: str
    size_before: int
    size_after: int
    per_channel: bool = False
    op_types: list[str] = field(default_factory=list)
    excluded_ops: list[str] = field(default_factory=list)
    excluded_nodes: int = 0
    calib_source: str = ""
    calib_count: int = 0
    preprocessed: bool = False  # quant_pre_process ran
    seconds: float = 0.0
    fidelity: FidelityReport | None = None
    notes: list[str] = field(default_factory=list)


def dump_json(records: _Record | list[Any], path: str | os.PathLike) -> Path:
    """Write one result or a list of results as JSON (``{"type": ..., "data": ...}`` entries)."""
    items = records if isinstance(records, list) else [records]
    payload = [{"type": type(r).__name__, "data": r.to_dict()} for r in items]
    out = Path(path)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


_TYPES: dict[str, type[_Record]] = {
    c.__name__: c for c in (BenchResult, ProfileResult, ProfileComparison, QuantizeResult, FidelityReport)
}


def load_json(path: str | os.PathLike) -> list[Any]:
    """Read what :func:`dump_json` wrote."""
    payload = json.loads(Path(path).read_text())
    return [_TYPES[entry["type"]].from_dict(entry["data"]) for entry in payload]
