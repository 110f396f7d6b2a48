"""Parity between a reference (torch, or the source ONNX graph) and an exported ONNX file.

The numerics are pure numpy (:func:`compare_outputs`); :func:`run_onnx` is the one place
that runs a file in ONNX Runtime for verification.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from foldonnx.errors import ExportError

__all__ = ["ParityResult", "compare_outputs", "run_onnx", "ort_session"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityResult:
    """Largest absolute difference over all outputs, and that difference relative to the
    largest reference magnitude of the same output (robust where values cross zero)."""

    max_abs_diff: float
    max_rel_diff: float
    num_outputs: int
    finite: bool

    def within(self, tolerance: float) -> bool:
        return self.finite and self.max_abs_diff <= tolerance

    def merge(self, other: ParityResult) -> ParityResult:
        return ParityResult(
            max_abs_diff=max(self.max_abs_diff, other.max_abs_diff),
            max_rel_diff=max(self.max_rel_diff, other.max_rel_diff),
            num_outputs=max(self.num_outputs, other.num_outputs),
            finite=self.finite and other.finite,
        )


def compare_outputs(reference: list[np.ndarray], actual: list[np.ndarray]) -> ParityResult:
    """Compare output lists elementwise (shapes must match exactly)."""
    if len(reference) != len(actual):
        raise ExportError(f"exported graph has {len(actual)} outputs, the reference {len(reference)}")
    max_abs = 0.0
    max_rel = 0.0
    finite = True
    for i, (ref, act) in enumerate(zip(reference, actual, strict=True)):
        ref = np.asarray(ref)
        act = np.asarray(act)
        if ref.shape != act.shape:
            raise ExportError(f"output {i}: exported shape {list(act.shape)} != reference {list(ref.shape)}")
        if ref.size == 0:
            continue
        r = ref.astype(np.float64)
        a = act.astype(np.float64)
        finite = finite and bool(np.isfinite(a).all())
        diff = float(np.max(np.abs(r - a))) if finite else float("inf")
        scale = float(np.max(np.abs(r)))
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return ParityResult(max_abs_diff=max_abs, max_rel_diff=max_rel, num_outputs=len(reference), finite=finite)


def ort_session(path: str | os.PathLike, threads: int | None = None):  # -> onnxruntime.InferenceSession
    """A CPU ONNX Runtime session on *path* (one-line :class:`ExportError` if ORT refuses it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX Runtime cannot load {path}: {first}") from None
    logger.debug("ORT session on %s, providers %s", path, sess.get_providers())
    return sess


def run_onnx(session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run all outputs of *session* on *feeds*."""
    try:
        return list(session.run(None, feeds))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX Runtime failed to run the exported model: {first}") from None
