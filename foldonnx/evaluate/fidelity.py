"""Fidelity of one candidate to a reference model on real inputs, as ``fold-onnx quantize``
and ``fold-onnx compress`` report it (:class:`~foldonnx.runtime.results.FidelityReport`:
cosine per sample, max |difference|, top-1 agreement and accuracy for classifiers).

Built on :class:`~foldonnx.evaluate.evaluation.Evaluator` — the one path that runs a reference
and candidates over data — so the task is inferred the way ``eval`` infers it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import onnx

from foldonnx.evaluate.evaluation import Evaluator
from foldonnx.evaluate.runner import ModelInputs
from foldonnx.runtime.results import FidelityReport

__all__ = ["FidelityCheck", "fidelity", "cosine_rows"]

logger = logging.getLogger(__name__)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` and ``b`` flattened per sample (pure numpy);
    two zero rows count as identical."""
    x = np.asarray(a, np.float64).reshape(len(a), -1)
    y = np.asarray(b, np.float64).reshape(len(b), -1)
    num = (x * y).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 1.0, 0.0))
    return cos


class FidelityCheck:
    """The reference's outputs on *source* computed once (data checked against the model
    before anything runs); :meth:`compare` scores a candidate against them."""

    def __init__(
        self,
        reference: onnx.ModelProto | str | os.PathLike,
        source: Any = "imagenet20",
        *,
        limit: int | None = 20,
        preprocess: Any = None,
        threads: int | None = None,
        output: str | None = None,
        what: str = "fidelity check data",
    ) -> None:
        from foldonnx.data.feeds import model_feeds
        from foldonnx.graph.metadata import as_proto

        proto = as_proto(reference)
        feeds, labels = model_feeds(proto, source, limit=limit, preprocess=preprocess, what=what)
        self.source = source if isinstance(source, str) else "given"
        self.evaluator = Evaluator(
            reference, ModelInputs(feeds, labels, self.source), output=output, threads=threads, progress=False
        )

    def compare(self, candidate: onnx.ModelProto | str | os.PathLike) -> FidelityReport:
        ev = self.evaluator
        _, c = ev.candidate_output(candidate)
        r = ev.reference_out
        cos = cosine_rows(r, c)
        report = FidelityReport(
            source=self.source,
            n=len(r),
            output=ev.output,
            cosine_mean=float(cos.mean()),
            cosine_min=float(cos.min()),
            max_abs_diff=float(np.abs(np.asarray(r, np.float64) - c).max()),
        )
        if ev.task == "classifier":
            top_r, top_c = r.argmax(1), c.argmax(1)
            report.top1_agreement = float((top_r == top_c).mean())
            labels = ev.inputs.labels
            if (
                labels is not None
                and len(labels) == len(r)
                and labels.min() >= 0
                and labels.max() < r.shape[1]
            ):
                report.top1_acc_reference = float((top_r == labels).mean())
                report.top1_acc_candidate = float((top_c == labels).mean())
        return report


def fidelity(
    reference: onnx.ModelProto | str | os.PathLike,
    candidate: onnx.ModelProto | str | os.PathLike,
    source: Any = "imagenet20",
    limit: int | None = 20,
    preprocess: Any = None,
    threads: int | None = None,
    output: str | None = None,
) -> FidelityReport:
    """Compare *candidate* to *reference* on *source* (see :class:`FidelityCheck`)."""
    check = FidelityCheck(
        reference, source, limit=limit, preprocess=preprocess, threads=threads, output=output
    )
    return check.compare(candidate)
