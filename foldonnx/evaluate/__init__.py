"""Evaluation of compressed models: fidelity metrics, accuracy, linear probe, Pareto sweeps.

* :mod:`~foldonnx.evaluate.metrics` -- pure numpy metrics (agreement, KL, cosine, mask IoU, top-1).
* :mod:`~foldonnx.evaluate.probe` -- linear probe on frozen features.
* :mod:`~foldonnx.evaluate.runner` -- running models in ONNX Runtime over data, interleaved latency.
* :mod:`~foldonnx.evaluate.evaluation` -- :class:`Evaluator`: reference once, candidates scored.
* :mod:`~foldonnx.evaluate.sweep` / :mod:`~foldonnx.evaluate.plot` -- method × ratio sweeps, Pareto PNG.
"""

from __future__ import annotations

from foldonnx.evaluate.evaluation import (
    CandidateEval,
    EvalReport,
    Evaluator,
    ProbeData,
    detect_task,
    fidelity_metrics,
    load_probe_data,
)
from foldonnx.evaluate.plot import plot_pareto
from foldonnx.evaluate.probe import LinearProbe, ProbeResult, fit_probe, probe_features
from foldonnx.evaluate.runner import (
    ModelInputs,
    ModelSession,
    prepare_inputs,
    run_model,
)
from foldonnx.evaluate.sweep import SweepPoint, SweepReport, run_sweep

__all__ = [
    "CandidateEval",
    "EvalReport",
    "Evaluator",
    "ProbeData",
    "detect_task",
    "fidelity_metrics",
    "load_probe_data",
    "LinearProbe",
    "ProbeResult",
    "fit_probe",
    "probe_features",
    "ModelInputs",
    "ModelSession",
    "prepare_inputs",
    "run_model",
    "SweepPoint",
    "SweepReport",
    "run_sweep",
    "plot_pareto",
]
