"""Models in ONNX Runtime: checked sessions (the one session wrapper), interleaved latency
benchmarks and profiler tables.

``bench`` and ``profile`` mirror the ``fold-onnx bench|profile`` commands; every result is a
dataclass with ``to_dict``/``from_dict`` and JSON helpers. Quantization is a pass
(:mod:`foldonnx.passes.quantize`).
"""

from __future__ import annotations

from foldonnx.runtime.bench import bench
from foldonnx.runtime.profile import compare_op_types, parse_trace, profile, profile_compare
from foldonnx.runtime.results import (
    BenchResult,
    FidelityReport,
    LatencyStats,
    NodeStat,
    OpTypeRatio,
    OpTypeStat,
    ProfileComparison,
    ProfileResult,
    QuantizeResult,
    dump_json,
    load_json,
)
from foldonnx.runtime.session import (
    PROVIDERS,
    BatchSizeError,
    RuntimeSession,
    available_providers,
    create_session,
    make_inputs,
    resolve_providers,
)

__all__ = [
    "bench",
    "profile",
    "profile_compare",
    "compare_op_types",
    "parse_trace",
    "create_session",
    "make_inputs",
    "resolve_providers",
    "available_providers",
    "RuntimeSession",
    "BatchSizeError",
    "PROVIDERS",
    "BenchResult",
    "LatencyStats",
    "ProfileResult",
    "ProfileComparison",
    "OpTypeStat",
    "OpTypeRatio",
    "NodeStat",
    "FidelityReport",
    "QuantizeResult",
    "dump_json",
    "load_json",
]
