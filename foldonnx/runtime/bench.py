"""Latency, throughput and memory of ONNX models in ONNX Runtime, measured interleaved.

Several models are timed in one process, round-robin: every round runs each model once (or a
small block of calls), and the starting model rotates from round to round, so slow drifts of a
noisy machine hit all models alike. Ratios to the first model are the median over rounds of the
paired per-round latency ratio. The order actually run is recorded in every result.

Memory: on the CPU, the peak resident set size while the session is created and warmed up,
minus the resident size just before: ``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs`` (psutil's RSS delta after warm-up where that is not possible), with
``malloc_trim`` first so heap freed by earlier sessions is not silently reused. On
CUDA, the change of the device's used memory reported by ``nvidia-smi`` (device-wide: other
processes on the GPU count too); nothing when ``nvidia-smi`` is absent.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from foldonnx.errors import FoldOnnxError, UsageError
from foldonnx.runtime.results import BenchResult, latency_stats
from foldonnx.runtime.session import (
    BatchSizeError,
    RuntimeSession,
    create_session,
    make_inputs,
    model_label,
)

__all__ = ["bench", "latency_vs", "MemoryProbe", "paired_ratios", "interleaved_order"]

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | bytes


def interleaved_order(n_models: int, rounds: int, rotate: bool = True) -> list[list[int]]:
    """The model order of each round: all models once, the starting one rotating if ``rotate``."""
    base = list(range(n_models))
    return [base[r % n_models :] + base[: r % n_models] if rotate else list(base) for r in range(rounds)]


def paired_ratios(per_round: np.ndarray, reference: int = 0) -> np.ndarray:
    """``per_round[r, i] / per_round[r, reference]`` for every round ``r`` and model ``i`` (pure numpy)."""
    a = np.asarray(per_round, dtype=np.float64)
    return a / a[:, reference : reference + 1]


class MemoryProbe:
    """Peak memory growth around a piece of work, on the CPU or on a CUDA device."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = self._pick()
        self._start = 0.0

    def _pick(self) -> str:
        if self.device == "cuda":
            return "nvidia-smi device used delta" if shutil.which("nvidia-smi") else "unavailable"
        if _reset_peak_rss():
            return "peak RSS delta (VmHWM)"
        try:
            import psutil  # noqa: F401
        except ImportError:
            return "unavailable"
        return "RSS delta after warm-up (psutil)"

    def start(self) -> None:
        if self.device == "cpu":
            # memory freed earlier in this process (other sessions) would otherwise be reused
            # without growing RSS, hiding this session's footprint
            gc.collect()
            _malloc_trim()
        if self.method.startswith("peak"):
            _reset_peak_rss()
            self._start = _proc_status_kb("VmRSS") / 1024
        elif self.method.startswith("RSS"):
            import psutil

            self._start = psutil.Process().memory_info().rss / 2**20
        elif self.method.startswith("nvidia"):
            self._start = _nvidia_used_mb()

    def stop(self) -> float | None:
        if self.method.startswith("peak"):
            return _proc_status_kb("VmHWM") / 1024 - self._start
        if self.method.startswith("RSS"):
            import psutil

            return psutil.Process().memory_info().rss / 2**20 - self._start
        if self.method.startswith("nvidia"):
            return _nvidia_used_mb() - self._start
        return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS growth measures new memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_kb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kb(key: str) -> float:
    m = re.search(rf"^{key}:\s+(\d+)\s*kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _nvidia_used_mb() -> float:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:
        return float(out.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return float("nan")


_ORT_ENV_READY = False


def _warm_ort_environment() -> None:
    """Create one trivial session first, so ORT's one-off process setup (thread pools, allocator
    registration) is not charged to the first model's memory and creation time."""
    global _ORT_ENV_READY
    if _ORT_ENV_READY:
        return
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "warmup",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    rs = create_session(model, "cpu", label="warm-up")
    rs.run({"x": np.zeros(1, np.float32)})
    _ORT_ENV_READY = True


@dataclass
class _Entry:
    index: int
    label: str
    result: BenchResult
    session: RuntimeSession | None = None
    call: Callable[[], Any] | None = None
    times: list[list[float]] = field(default_factory=list)  # per round, the block's call times (ms)


def _make_call(rs: RuntimeSession, feeds: dict[str, np.ndarray], io_binding: bool) -> Callable[[], Any]:
    sess = rs.session
    if not io_binding:
        return lambda: sess.run(None, feeds)
    import onnxruntime as ort

    device = rs.device
    binding = sess.io_binding()
    values = []
    for name, arr in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(arr, device, 0)
        values.append(value)  # keep alive as long as the binding
        binding.bind_ortvalue_input(name, value)
    for out in rs.output_names:
        binding.bind_output(out, device, 0)

    def call() -> None:
        sess.run_with_iobinding(binding)
        _ = values

    return call


def bench(
    models: Sequence[ModelLike],
    provider: str = "auto",
    batches: Sequence[int] = (1, 8, 32),
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    io_binding: bool | None = None,
    block: int = 1,
    rotate: bool = True,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    optimization: str = "all",
    progress: Callable[[str], None] | None = None,
    spinning: bool | None = None,
) -> list[BenchResult]:
    """Measure ``models`` interleaved at every batch size; one :class:`BenchResult` per pair.

    ``io_binding=None`` binds inputs/outputs on the device for CUDA/TensorRT sessions and not on
    the CPU. A model that cannot take a batch size is reported ``skipped`` with the reason.
    A provider mismatch (CUDA asked, CPU given) raises :class:`RuntimeBackendError`.
    ``spinning=None`` turns ORT's busy-waiting intra-op threads off when several models are
    timed (one session's spinning threads would slow the next model's run) and leaves ORT's
    default (on) for a single model.
    """
    if not models:
        raise UsageError("bench needs at least one model")
    if iters < 1 or warmup < 0 or block < 1:
        raise UsageError(f"need iters >= 1, warmup >= 0, block >= 1 (got {iters}, {warmup}, {block})")
    if not batches or any(b < 1 for b in batches):
        raise UsageError(f"batch sizes must be positive integers, got {list(batches)}")
    names = list(labels) if labels is not None else [model_label(m, i) for i, m in enumerate(models)]
    if len(names) != len(models):
        raise UsageError("one label per model")
    if spinning is None:
        spinning = len(models) == 1
    results: list[BenchResult] = []
    for batch in batches:
        results += _bench_batch(
            models,
            names,
            provider,
            batch,
            warmup,
            iters,
            threads,
            io_binding,
            block,
            rotate,
            dims,
            seed,
            optimization,
            progress,
            spinning,
        )
    return results


def latency_vs(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    iters: int = 20,
    threads: int | None = None,
    label: str = "candidate",
) -> BenchResult:
    """*candidate* timed against *reference* at batch 1 on the CPU, interleaved in one process
    (3 warm-up rounds): the result row of the candidate, whose ``latency_ratio`` is its time as
    a fraction of the reference's (``ok`` False with the reason when it could not be timed)."""
    results = bench(
        [reference, candidate], provider="cpu", batches=[1], warmup=3, iters=iters, threads=threads,
        labels=["original", label],
    )  # fmt: skip
    return results[1]


def _bench_batch(
    models: Sequence[ModelLike],
    names: list[str],
    provider: str,
    batch: int,
    warmup: int,
    iters: int,
    threads: int | None,
    io_binding: bool | None,
    block: int,
    rotate: bool,
    dims: dict[str, int] | None,
    seed: int,
    optimization: str,
    progress: Callable[[str], None] | None,
    spinning: bool,
) -> list[BenchResult]:
    _warm_ort_environment()
    entries: list[_Entry] = []
    for i, (model, label) in enumerate(zip(models, names, strict=True)):
        res = BenchResult(
            model=label,
            model_index=i,
            batch=batch,
            provider=provider,
            threads=threads,
            warmup=warmup,
            iters=iters,
            block=block,
            reference=names[0],
            spinning=spinning,
        )
        entry = _Entry(index=i, label=label, result=res)
        entries.append(entry)
        if progress:
            progress(f"batch {batch}: loading {label}")
        gc.collect()
        probe: MemoryProbe | None = None
        try:
            # the device is known only after the provider is resolved; probe the CPU first
            probe = MemoryProbe("cpu")
            probe.start()
            rs = create_session(
                model, provider, threads=threads, optimization=optimization, label=label, spinning=spinning
            )
            if rs.device != "cpu":
                probe = MemoryProbe(rs.device)
                probe.start()  # device memory: from after creation (weights counted on first run)
            res.providers = rs.providers
            res.session_create_s = rs.create_s
            use_binding = (rs.device != "cpu") if io_binding is None else io_binding
            res.io_binding = use_binding
            feeds = make_inputs(rs.inputs, batch, dims=dims, seed=seed)
            call = _make_call(rs, feeds, use_binding)
            for _ in range(max(1, warmup)):
                call()
            res.memory_mb = probe.stop()
            res.memory_method = probe.method
            entry.session, entry.call = rs, call
        except BatchSizeError as exc:
            res.status, res.reason = "skipped", str(exc)
            logger.info("%s at batch %d skipped: %s", label, batch, exc)
        except FoldOnnxError:  # provider mismatch, unreadable model, bad option: the whole run is wrong
            raise
        except Exception as exc:  # noqa: BLE001 - ORT run failures (e.g. out of memory) are per model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            res.status, res.reason = "failed", first
            logger.warning("%s at batch %d failed: %s", label, batch, first)

    active = [e for e in entries if e.call is not None]
    order: list[int] = []
    if progress and active:
        progress(f"batch {batch}: timing {len(active)} model(s) interleaved, {iters} rounds")
    for round_order in interleaved_order(len(active), iters, rotate) if active else []:
        for pos in round_order:
            e = active[pos]
            assert e.call is not None
            block_times = []
            for _ in range(block):
                t0 = time.perf_counter()
                e.call()
                block_times.append((time.perf_counter() - t0) * 1e3)
                order.append(e.index)
            e.times.append(block_times)

    if active:
        per_round = np.array([[float(np.mean(t)) for t in e.times] for e in active]).T  # [rounds, models]
        ref_pos = 0 if active[0].index == 0 else None
        ratios = paired_ratios(per_round, 0) if ref_pos is not None else None
        for pos, e in enumerate(active):
            res = e.result
            samples = np.concatenate([np.asarray(t) for t in e.times])
            res.latency = latency_stats(samples)
            res.throughput = batch * 1e3 / res.latency.mean_ms
            res.order = list(order)
            if ratios is not None:
                r = ratios[:, pos]
                res.latency_ratio = float(np.median(r))
                res.latency_ratio_p25, res.latency_ratio_p75 = (float(x) for x in np.percentile(r, [25, 75]))
                res.speedup = 1.0 / res.latency_ratio
            else:
                res.reason = (
                    res.reason or f"no ratio: reference {entries[0].label} did not run at batch {batch}"
                )
    for e in entries:
        e.call = None
        e.session = None
    gc.collect()
    return [e.result for e in entries]
