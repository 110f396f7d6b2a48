"""Fidelity of compressed candidates to a reference model on real inputs, plus accuracy.

:class:`Evaluator` runs the reference once over the (already preprocessed) inputs, detects the
task from the output shape and metadata, fits the reference linear probe when probe data is
given, and then scores any number of candidates against it -- the same object serves
``fold-onnx eval`` and every point of ``fold-onnx sweep``.

Task detection (``--task`` overrides): an [N, C] output is a ``classifier`` when C ≥ 10 and the
model's ``foldonnx.task`` metadata says classifier (or, without metadata, when a ``Gemm`` or a
``Softmax`` computes it), otherwise an ``embedding``; [N, T, D] tokens
are an ``embedding`` (with CLS/patch-token metrics); [N, C, H, W] is ``dense``.

Metrics per task:

============ ====================================================================
classifier   ``top1_agreement``, ``kl_div``, ``cosine``; ``accuracy`` when labels exist
embedding    ``cosine``; for tokens also ``cls_cosine`` and ``patch_cosine``
dense        ``cosine``, ``mask_iou`` (see :func:`foldonnx.evaluate.metrics.mask_iou`)
============ ====================================================================
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from foldonnx.data.sources import Preprocess, load_source
from foldonnx.errors import DataError, UsageError
from foldonnx.evaluate import metrics as M
from foldonnx.evaluate.probe import LinearProbe, ProbeResult, evaluate_probe, fit_probe, probe_features
from foldonnx.evaluate.runner import ModelInputs, ModelSession
from foldonnx.graph.metadata import read_task

__all__ = [
    "TASKS",
    "CandidateEval",
    "EvalReport",
    "ProbeData",
    "Evaluator",
    "detect_task",
    "output_head",
    "fidelity_metrics",
    "load_probe_data",
]

logger = logging.getLogger(__name__)

TASKS = ("classifier", "embedding", "dense")


def output_head(model: onnx.ModelProto, output: str) -> str | None:
    """The op type that computes *output*, looking through Identity/Flatten/Reshape/Squeeze."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = output
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type not in ("Identity", "Flatten", "Reshape", "Squeeze", "Cast"):
            return node.op_type
        name = node.input[0]
    return None


def detect_task(
    shape: tuple[int, ...],
    metadata_task: str | None = None,
    override: str | None = None,
    head: str | None = None,
) -> str:
    """The task of an output of *shape* (see module docstring). Without metadata, an
    ``[N, C]`` output (C ≥ 10) computed by ``Gemm`` or a ``Softmax`` is a classifier (what
    timm, torchvision and Keras exports end with); embeddings end with a MatMul or a norm."""
    if override:
        if override not in TASKS:
            raise UsageError(f"unknown task {override!r} (choose from {', '.join(TASKS)})")
        return override
    if len(shape) == 2:
        if metadata_task is None and head in ("Gemm", "Softmax", "LogSoftmax"):
            metadata_task = "classifier"
        return "classifier" if shape[1] >= 10 and metadata_task == "classifier" else "embedding"
    if len(shape) == 3:
        return "dense" if metadata_task == "dense" else "embedding"
    if len(shape) == 4:
        return "dense"
    return metadata_task if metadata_task in TASKS else "embedding"


def fidelity_metrics(task: str, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Metrics of *candidate* against *reference* for *task* (pure numpy)."""
    out = {"cosine": M.cosine_similarity(reference, candidate)}
    if task == "classifier":
        out["top1_agreement"] = M.top1_agreement(reference, candidate)
        out["kl_div"] = M.kl_divergence(reference, candidate)
    elif task == "embedding" and reference.ndim == 3:
        out["cls_cosine"] = M.cls_token_cosine(reference, candidate)
        if reference.shape[1] > 1:
            out["patch_cosine"] = M.patch_token_cosine(reference, candidate)
    elif task == "dense":
        out["mask_iou"] = M.mask_iou(reference, candidate)
    return out


@dataclass
class ProbeData:
    """Labelled model inputs for the linear probe."""

    train: ModelInputs
    test: ModelInputs
    source: str


def load_probe_data(
    source: str,
    preprocess: Preprocess,
    model: onnx.ModelProto,
    *,
    train: int | None = None,
    test: int | None = None,
    seed: int = 0,
) -> ProbeData:
    """Probe train/test inputs: Fashion-MNIST uses its own train/test splits (class-balanced
    subsets of *train* / *test* images); any other labelled source is split with a seeded
    stratified 70/30 split, then cut to *train* / *test*."""
    from foldonnx.evaluate.probe import stratified_split
    from foldonnx.evaluate.runner import prepare_inputs

    name = source.partition(":")[0]
    if name == "fashion-mnist":
        tr = load_source("fashion-mnist:train", limit=train, seed=seed)
        te = load_source("fashion-mnist:test", limit=test, seed=seed)
        train_in, test_in = prepare_inputs(tr, model, preprocess), prepare_inputs(te, model, preprocess)
    else:
        data = load_source(source, seed=seed)
        if data.labels is None:
            raise DataError(f"probe data {source!r} has no labels (use a labelled source)")
        all_in = prepare_inputs(data, model, preprocess)
        tri, tei = stratified_split(data.labels, 0.3, seed)
        train_in, test_in = all_in.subset(tri[:train]), all_in.subset(tei[:test])
    for part, what in ((train_in, "train"), (test_in, "test")):
        if part.labels is None or len(part) == 0:
            raise DataError(f"probe {what} split of {source!r} is empty or unlabelled")
    return ProbeData(train=train_in, test=test_in, source=source)


@dataclass
class CandidateEval:
    """One candidate's scores against the reference."""

    name: str
    path: str | None
    metrics: dict[str, float]
    accuracy: float | None = None
    probe: ProbeResult | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["probe"] = None if self.probe is None else self.probe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CandidateEval:
        probe = ProbeResult(**d["probe"]) if d.get("probe") else None
        return cls(**{**d, "probe": probe})


@dataclass
class EvalReport:
    """Result of ``fold-onnx eval``: the reference's own scores and one row per candidate."""

    reference: str
    output: str
    output_shape: list[int]
    task: str
    data: str
    n_samples: int
    reference_accuracy: float | None = None
    reference_probe: float | None = None
    probe_source: str | None = None
    probe_train: int | None = None
    probe_test: int | None = None
    candidates: list[CandidateEval] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        return cls(**{**d, "candidates": [CandidateEval.from_dict(c) for c in d.get("candidates", [])]})


def _digest(inputs: ModelInputs) -> str:
    h = hashlib.sha1()
    for name in sorted(inputs.arrays):
        a = np.ascontiguousarray(inputs.arrays[name])
        h.update(f"{name}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    if inputs.labels is not None:
        h.update(np.ascontiguousarray(inputs.labels).tobytes())
    return h.hexdigest()


def _cache_key(
    reference: str | os.PathLike | onnx.ModelProto, output: str, inputs: ModelInputs, probe: ProbeData | None
) -> str:
    if isinstance(reference, onnx.ModelProto):
        ref = hashlib.sha1(reference.SerializeToString()).hexdigest()
    else:
        st = Path(reference).stat()
        ref = f"{Path(reference).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    parts = [ref, output, _digest(inputs)]
    if probe is not None:
        parts += [probe.source, _digest(probe.train), _digest(probe.test)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def _load_cache(path: str | os.PathLike, key: str) -> dict[str, np.ndarray] | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            if str(z["key"]) != key:
                logger.info("cache %s is for other inputs: recomputing", p)
                return None
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - a broken cache is recomputed
        logger.warning("ignoring unreadable cache %s: %s", p, exc)
        return None


def _static(shape: list) -> list | None:
    """The shape when every non-batch dimension is a fixed number, else None."""
    return list(shape) if shape and all(isinstance(d, int) and d > 0 for d in shape[1:]) else None


class Evaluator:
    """Reference outputs (and reference probe) computed once; candidates scored against them."""

    def __init__(
        self,
        reference: str | os.PathLike | onnx.ModelProto,
        inputs: ModelInputs,
        *,
        output: str | None = None,
        task: str | None = None,
        probe: ProbeData | None = None,
        batch_size: int = 16,
        threads: int | None = None,
        progress: bool = True,
        seed: int = 0,
        cache: str | os.PathLike | None = None,
    ) -> None:
        """*cache*: an ``.npz`` file holding the reference outputs and probe features of an
        earlier run with the same reference file, output, inputs and probe data (recomputed and
        rewritten when anything differs)."""
        if len(inputs) == 0:
            raise DataError("no samples to evaluate on")
        self.inputs = inputs
        self.probe_data = probe
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress
        self.seed = seed
        self.reference_name = str(reference) if not isinstance(reference, onnx.ModelProto) else "reference"
        session = ModelSession(
            reference, outputs=[output] if output else None, threads=threads, name="reference"
        )
        self.output = output or session.output_names[0]
        self.reference_shape = session.output_shape(self.output)
        ref_proto = (
            reference
            if isinstance(reference, onnx.ModelProto)
            else onnx.load(str(reference), load_external_data=False)
        )
        key = _cache_key(reference, self.output, inputs, probe) if cache is not None else ""
        cached = _load_cache(cache, key) if cache is not None else None
        if cached is not None:
            logger.info("reference outputs and probe features from %s", cache)
            self.reference_out = cached["reference_out"]
        else:
            self.reference_out = session.run(inputs, batch_size=batch_size, progress=progress)[self.output]
        self.task = detect_task(
            tuple(self.reference_out.shape), read_task(ref_proto), task, output_head(ref_proto, self.output)
        )
        logger.info(
            "reference output %s %s -> task %s", self.output, list(self.reference_out.shape), self.task
        )
        self.reference_accuracy = self._accuracy(self.reference_out)
        self.reference_probe: LinearProbe | None = None
        self.reference_probe_acc: float | None = None
        if probe is not None:
            if cached is not None:
                tr, te = cached["probe_train"], cached["probe_test"]
            else:
                tr, te = self._probe_features(session)
            self.reference_probe = fit_probe(tr, probe.train.labels, seed=seed)  # type: ignore[arg-type]
            self.reference_probe_acc = self.reference_probe.accuracy(te, probe.test.labels)  # type: ignore[arg-type]
            logger.info("reference probe accuracy %.4f", self.reference_probe_acc)
        if cache is not None and cached is None:
            arrays = {"key": np.array(key), "reference_out": self.reference_out}
            if probe is not None:
                arrays.update(probe_train=tr, probe_test=te)
            with open(cache, "wb") as fh:  # a file object: numpy adds no ".npz" suffix
                np.savez(fh, **arrays)

    def _accuracy(self, out: np.ndarray) -> float | None:
        labels = self.inputs.labels
        if self.task != "classifier" or labels is None:
            return None
        if labels.max() >= out.reshape(len(out), -1).shape[1]:
            logger.warning("labels exceed the number of classes: no accuracy")
            return None
        return M.top1_accuracy(out, labels)

    def _probe_features(self, session: ModelSession) -> tuple[np.ndarray, np.ndarray]:
        assert self.probe_data is not None
        out = self.output

        def feats(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {out: probe_features(batch[out])}

        kw = dict(batch_size=self.batch_size, transform=feats, progress=self.progress)
        return session.run(self.probe_data.train, **kw)[out], session.run(self.probe_data.test, **kw)[out]

    def candidate_output(
        self, candidate: str | os.PathLike | onnx.ModelProto, label: str = "candidate"
    ) -> tuple[ModelSession, np.ndarray]:
        """The candidate's session and its output on the inputs (same shape as the reference's,
        else a :class:`DataError`)."""
        session = ModelSession(candidate, outputs=[self.output], threads=self.threads, name=label)
        ref_static, cand_static = _static(self.reference_shape), _static(session.output_shape(self.output))
        if ref_static and cand_static and ref_static[1:] != cand_static[1:]:
            raise DataError(
                f"candidate {label} output {self.output!r} has shape {cand_static}, reference {ref_static}"
            )
        out = session.run(self.inputs, batch_size=self.batch_size, progress=self.progress)[self.output]
        if out.shape != self.reference_out.shape:
            raise DataError(
                f"candidate {label} output {self.output!r} has shape {list(out.shape)}, "
                f"reference {list(self.reference_out.shape)}"
            )
        return session, out

    def evaluate(
        self, candidate: str | os.PathLike | onnx.ModelProto, name: str | None = None
    ) -> CandidateEval:
        """Score one candidate; a candidate whose output shape differs is a :class:`DataError`."""
        t0 = time.perf_counter()
        label = name or (Path(candidate).name if not isinstance(candidate, onnx.ModelProto) else "candidate")
        session, out = self.candidate_output(candidate, label)
        result = CandidateEval(
            name=label,
            path=None if isinstance(candidate, onnx.ModelProto) else str(candidate),
            metrics=fidelity_metrics(self.task, self.reference_out, out),
            accuracy=self._accuracy(out),
        )
        if self.probe_data is not None and self.reference_probe is not None:
            tr, te = self._probe_features(session)
            result.probe = evaluate_probe(
                self.reference_probe,
                tr,
                self.probe_data.train.labels,  # type: ignore[arg-type]
                te,
                self.probe_data.test.labels,  # type: ignore[arg-type]
                seed=self.seed,
            )
        result.seconds = time.perf_counter() - t0
        return result

    def report(self, candidates: list[CandidateEval]) -> EvalReport:
        pd = self.probe_data
        return EvalReport(
            reference=self.reference_name,
            output=self.output,
            output_shape=[int(d) for d in self.reference_out.shape],
            task=self.task,
            data=self.inputs.name,
            n_samples=len(self.inputs),
            reference_accuracy=self.reference_accuracy,
            reference_probe=self.reference_probe_acc,
            probe_source=pd.source if pd else None,
            probe_train=len(pd.train) if pd else None,
            probe_test=len(pd.test) if pd else None,
            candidates=candidates,
        )
