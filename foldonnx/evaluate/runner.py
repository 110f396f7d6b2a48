"""Running ONNX models on data in ONNX Runtime (CPU), in batches, with a progress bar.

* :func:`prepare_inputs` -- a data source (raw images or preprocessed npz arrays) turned into the
  model's input arrays once, so several models run over the same tensors.
* :class:`ModelSession` / :func:`run_model` -- a CPU session (optionally exposing an internal
  tensor as an extra output) run over the inputs: models whose batch dimension is fixed run in
  chunks of that size, dynamic-batch models in batches of ``batch_size``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from foldonnx.data.sources import ImageSet, Preprocess, TensorSet
from foldonnx.errors import DataError, ModelFileError, RuntimeBackendError, UsageError

__all__ = [
    "ModelInputs",
    "ModelSession",
    "prepare_inputs",
    "run_model",
]

logger = logging.getLogger(__name__)

_TYPE_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


@dataclass
class ModelInputs:
    """Model-ready input arrays (name -> [N, ...]) and the labels of the samples, if any."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    name: str

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def subset(self, index: np.ndarray | slice) -> ModelInputs:
        return ModelInputs(
            arrays={k: v[index] for k, v in self.arrays.items()},
            labels=None if self.labels is None else self.labels[index],
            name=self.name,
        )


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init_names = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init_names]


def prepare_inputs(data: ImageSet | TensorSet, model: onnx.ModelProto, preprocess: Preprocess) -> ModelInputs:
    """Preprocess *data* once into arrays named after *model*'s inputs."""
    inputs = _graph_inputs(model)
    if not inputs:
        raise DataError("model has no inputs")
    names = [i.name for i in inputs]
    if isinstance(data, ImageSet):
        if len(names) != 1:
            raise DataError(f"raw images can feed a one-input model only; this one has inputs {names}")
        if len(data) == 0:
            raise DataError(f"data source {data.name} holds no images")
        arrays = {names[0]: preprocess(data)}
    else:
        if set(data.arrays) == {""}:
            if len(names) != 1:
                raise DataError(f"npz holds one unnamed array but the model has inputs {names}")
            arrays = {names[0]: data.arrays[""]}
        else:
            missing = [n for n in names if n not in data.arrays]
            if missing:
                raise DataError(f"npz {data.name} lacks arrays for model inputs {missing}")
            arrays = {n: data.arrays[n] for n in names}
    return ModelInputs(arrays=arrays, labels=data.labels, name=data.name)


def _add_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of *model* exposing the internal tensors *names* as graph outputs."""
    existing = {o.name for o in model.graph.output}
    wanted = [n for n in names if n not in existing]
    if not wanted:
        return model
    produced = {o for node in model.graph.node for o in node.output}
    unknown = [n for n in wanted if n not in produced]
    if unknown:
        raise UsageError(f"output {unknown[0]!r} is neither a graph output nor a tensor of the model")
    known = {v.name: v for v in model.graph.value_info}
    if any(n not in known for n in wanted):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            known.update({v.name: v for v in inferred.graph.value_info})
        except Exception as exc:  # noqa: BLE001 - types fall back to float
            logger.debug("shape inference failed while adding outputs: %s", exc)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in wanted:
        elem = known[n].type.tensor_type.elem_type if n in known else onnx.TensorProto.FLOAT
        out.graph.output.append(onnx.helper.make_tensor_value_info(n, elem or onnx.TensorProto.FLOAT, None))
    return out


class ModelSession:
    """An ONNX Runtime CPU session with what the runner needs to know about its inputs."""

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        *,
        outputs: Sequence[str] | None = None,
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        from foldonnx.runtime.session import create_session

        proto: onnx.ModelProto | None = model if isinstance(model, onnx.ModelProto) else None
        path = None if proto is not None else Path(model)  # type: ignore[arg-type]
        if path is not None and not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        self.name = name or (path.name if path is not None else (proto.graph.name or "model"))
        internal = [o for o in (outputs or [])]
        if internal:
            if proto is None:
                from foldonnx.onnx_file import load_model

                proto = load_model(path).model
            with_outputs = _add_outputs(proto, internal)
            if with_outputs is not proto:
                proto, path = with_outputs, None
        source = str(path) if path is not None else proto
        self.rs = create_session(source, "cpu", threads=threads, label=self.name)  # type: ignore[arg-type]
        self.session = self.rs.session
        self.inputs = self.session.get_inputs()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.requested = list(outputs) if outputs else list(self.output_names)
        dim0 = {i.shape[0] if i.shape else None for i in self.inputs}
        fixed = [d for d in dim0 if isinstance(d, int) and d > 0]
        self.fixed_batch: int | None = fixed[0] if fixed else None

    def output_shape(self, name: str) -> list[int | str | None]:
        for o in self.session.get_outputs():
            if o.name == name:
                return list(o.shape or [])
        return []

    def feeds(self, inputs: ModelInputs) -> dict[str, np.ndarray]:
        """The input arrays checked against the session's input shapes and cast to its dtypes."""
        feed: dict[str, np.ndarray] = {}
        for meta in self.inputs:
            if meta.name not in inputs.arrays:
                raise DataError(f"{self.name}: no data for input {meta.name!r}")
            arr = inputs.arrays[meta.name]
            want = list(meta.shape or [])
            if len(want) != arr.ndim or any(
                isinstance(w, int) and w > 0 and w != a for w, a in zip(want[1:], arr.shape[1:], strict=False)
            ):
                raise DataError(
                    f"{self.name}: input {meta.name!r} expects shape {want}, data has {list(arr.shape)}"
                )
            feed[meta.name] = arr.astype(_TYPE_TO_NP.get(meta.type, arr.dtype), copy=False)
        return feed

    def run(
        self,
        inputs: ModelInputs,
        *,
        batch_size: int = 16,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """Run over all samples; returns the requested outputs (after *transform*, applied per
        batch to save memory) concatenated over the samples."""
        from tqdm import tqdm

        feed_all = self.feeds(inputs)
        n = len(inputs)
        step = self.fixed_batch or max(1, int(batch_size))
        chunks: dict[str, list[np.ndarray]] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            total=n,
            desc=self.name[:30],
            unit="img",
            file=sys.stderr,
            disable=None if progress else True,
            leave=False,
        )
        try:
            for start in range(0, n, step):
                stop = min(n, start + step)
                feed = {k: v[start:stop] for k, v in feed_all.items()}
                pad = step - (stop - start) if self.fixed_batch else 0
                if pad:  # a fixed batch > remaining samples: repeat the last one, trim afterwards
                    feed = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feed.items()}
                try:
                    outs = self.session.run(self.requested, feed)
                except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise RuntimeBackendError(f"{self.name} failed at sample {start}: {first}") from None
                batch = {k: np.asarray(v)[: stop - start] for k, v in zip(self.requested, outs, strict=True)}
                if transform is not None:
                    batch = transform(batch)
                for k, v in batch.items():
                    chunks.setdefault(k, []).append(v)
                bar.update(stop - start)
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        logger.info("%s: %d samples in %.1f s (%.1f/s)", self.name, n, dt, n / dt if dt > 0 else 0.0)
        return {k: np.concatenate(v, axis=0) for k, v in chunks.items()}


def run_model(
    model: str | os.PathLike | onnx.ModelProto,
    inputs: ModelInputs,
    *,
    outputs: Sequence[str] | None = None,
    batch_size: int = 16,
    threads: int | None = None,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Convenience: open a :class:`ModelSession` and run it over *inputs*."""
    session = ModelSession(model, outputs=outputs, threads=threads)
    return session.run(inputs, batch_size=batch_size, transform=transform, progress=progress)
