"""Activations at chosen tensors, streamed through ONNX Runtime and reduced batch by batch.

Data-driven passes (fold's data repair, block approximation, activation-aware low rank) need
statistics of internal tensors on calibration data — a Gram matrix ``XᵀX`` of a layer's input,
cross-products ``XᵀY`` against a tensor of another model, per-channel mean / variance, a sample
of token rows — never all activations at once (256 images of a ViT-B are 256·197·768 floats per
tensor). This module runs models with the tensors it needs exposed as outputs and hands each
batch to *reducers* that keep only their running statistics:

* :class:`TapSession` — a model run on the CPU with internal tensors exposed (the one session
  wrapper, :func:`foldonnx.runtime.session.create_session`, underneath);
* :class:`Reducer` and :class:`Gram`, :class:`CrossProduct`, :class:`Moments`,
  :class:`RowSample` — what is kept of each batch;
* :func:`reduce_activations` — stream the calibration feeds through one or several models
  (e.g. the original and the compressed one) and update the reducers;
* :class:`SubgraphRunner` / :func:`run_subgraph` — run the part of a model between cached
  tensors and a cut, for sequential fitting where each step starts from the compressed model's
  own activations and only the next block is run.

Rows of token tensors ``[B, T, D]`` are picked by :class:`Rows`: all tokens, or the first token
(a ViT's CLS) plus a seeded sample of the others, with the first token weighted so it is not
drowned by the patch tokens.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from foldonnx.errors import PassError
from foldonnx.numerics.lsq import LsqStats

__all__ = [
    "TapSession",
    "Rows",
    "Reducer",
    "Gram",
    "CrossProduct",
    "Moments",
    "RowSample",
    "reduce_activations",
    "collect_activations",
    "SubgraphRunner",
    "run_subgraph",
    "extract_subgraph",
    "static_batch",
    "batches",
    "DEFAULT_BATCH",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 8
TensorRef = str | tuple[str, str]  # "name" (the only / default model) or (model key, name)


def static_batch(model: onnx.ModelProto) -> int | None:
    """The first input's batch size when the graph fixes it (exported with batch 1, say)."""
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
            return None
    return None


def batches(feeds: Mapping[str, np.ndarray], size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(start, batch)`` slices of *feeds* of at most *size* samples."""
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        yield i, {k: v[i : i + size] for k, v in feeds.items()}


@contextlib.contextmanager
def _exposed(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """*model* with *names* as extra graph outputs and no stale value_info, restored on exit
    (no copy of the weights is made; the caller's model is unchanged afterwards)."""
    g = model.graph
    have = {o.name for o in g.output}
    n_out = len(g.output)
    saved_vi = list(g.value_info)
    try:
        for name in dict.fromkeys(names):
            if name and name not in have:
                g.output.add().name = name
        del g.value_info[:]
        yield model
    finally:
        del g.output[n_out:]
        del g.value_info[:]
        g.value_info.extend(saved_vi)


class TapSession:
    """*model* on ONNX Runtime's CPU provider with the internal tensors *taps* exposed.

    ``run(feeds)`` returns ``{name: array}`` for the graph outputs and the taps. A model whose
    batch is fixed by the graph is run in chunks of that size (the last chunk padded by
    repeating its last sample, the padding cut off again). ``spinning=False`` stops ORT's idle
    threads from busy-waiting after each run (numpy work between runs gets the cores)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        taps: Sequence[str] = (),
        *,
        label: str = "model",
        threads: int | None = None,
        spinning: bool | None = None,
    ) -> None:
        from foldonnx.runtime.session import create_session

        produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
        missing = [t for t in taps if t not in produced]
        if missing:
            raise PassError(f"{label}: no tensor named {missing[0]!r} in the model")
        self.label = label
        with _exposed(model, taps) as m:
            self.rs = create_session(m, "cpu", threads=threads, label=label, spinning=spinning)
        self.names = list(self.rs.output_names)
        self.fixed_batch = static_batch(model)

    def run(
        self, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        want = list(names) if names is not None else self.names
        n = len(next(iter(feeds.values())))
        step = self.fixed_batch or n
        parts: dict[str, list[np.ndarray]] = {k: [] for k in want}
        for i in range(0, n, step):
            chunk = {k: v[i : i + step] for k, v in feeds.items()}
            got = len(next(iter(chunk.values())))
            if self.fixed_batch and got < step:
                chunk = {
                    k: np.concatenate([v, np.repeat(v[-1:], step - got, axis=0)]) for k, v in chunk.items()
                }
            try:
                outs = self.rs.session.run(want, chunk)
            except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise PassError(f"{self.label} fails to run on the calibration data: {first}") from None
            for k, o in zip(want, outs, strict=True):
                parts[k].append(np.asarray(o)[:got])
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}


@dataclass(frozen=True)
class Rows:
    """Which rows of a token tensor ``[B, T, D]`` a reducer sees (a ``[B, D]`` or NCHW tensor
    is used as it is: one row per sample, or per pixel for ``axis=1`` channel statistics).

    ``tokens=None``: every token. ``tokens=k``: the first token and ``k`` others drawn per
    sample (seeded). Row weights: none by default; ``first_weighted=True`` gives the first
    token's row the weight of all the other picked tokens together; ``first_weight=w`` gives it
    exactly ``w``."""

    tokens: int | None = None
    first_weighted: bool = False
    first_weight: float | None = None
    seed: int = 0

    def pick(self, shape: tuple[int, ...], batch_index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(token indices ``[B, k]`` or None for all, row weights ``[k]`` or None)."""
        if len(shape) != 3:
            return None, None
        b, t = shape[0], shape[1]
        idx = None
        if self.tokens is not None and t > self.tokens + 1:
            rng = np.random.default_rng((self.seed, batch_index))
            rest = np.argsort(rng.random((b, t - 1)), axis=1)[:, : self.tokens] + 1
            idx = np.concatenate([np.zeros((b, 1), np.int64), rest], axis=1)
        k = t if idx is None else idx.shape[1]
        if not self.first_weighted and self.first_weight is None:
            return idx, None
        w = np.ones(k)
        w[0] = float(self.first_weight) if self.first_weight is not None else float(max(k - 1, 1))
        return idx, w

    @staticmethod
    def take(a: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
        """Rows ``[n, D]`` of *a* at the picked token positions (all rows when *idx* is None)."""
        if a.ndim == 3 and idx is not None:
            a = np.take_along_axis(a, idx[:, :, None], axis=1)
        return a.reshape(-1, a.shape[-1])


ALL_ROWS = Rows()


class Reducer(ABC):
    """Keeps a running statistic of some tensors; sees every batch once."""

    #: the tensors this reducer reads, as ``name`` or ``(model key, name)``
    inputs: tuple[TensorRef, ...] = ()

    @abstractmethod
    def update(self, values: Sequence[np.ndarray], batch_index: int) -> None:
        """Add one batch: ``values[i]`` is the batch of ``inputs[i]``."""


class Gram(Reducer):
    """``XᵀX`` (and ``Σx``, row count) of tensor *x* over the rows picked by *rows*
    (weighted rows count as that many copies). ``mean``/``cov`` give the moments."""

    def __init__(self, x: TensorRef, rows: Rows = ALL_ROWS) -> None:
        self.inputs = (x,)
        self.rows = rows
        self.gram: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.n = 0.0

    def update(self, values: Sequence[np.ndarray], batch_index: int) -> None:
        (x,) = values
        idx, w = self.rows.pick(x.shape, batch_index)
        r = Rows.take(np.asarray(x), idx).astype(np.float64)
        if w is not None:
            wt = np.tile(w, len(r) // len(w))[:, None]
            g, s, n = (r * wt).T @ r, (r * wt).sum(0), float(wt.sum())
        else:
            g, s, n = r.T @ r, r.sum(0), float(len(r))
        if self.gram is None:
            self.gram, self.sum = g, s
        else:
            self.gram += g
            self.sum += s
        self.n += n

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1e-12)

    @property
    def second_moment(self) -> np.ndarray:
        """``XᵀX / N``."""
        return self.gram / max(self.n, 1e-12)


class CrossProduct(Reducer):
    """Least-squares statistics of ``Y ≈ X·W + b`` (:class:`~foldonnx.numerics.lsq.LsqStats`)
    between tensors *x* and *y* — which may come from two models (the compressed model's input
    to a layer, the original model's output of it). ``split`` sends the samples whose index
    ``i % split == 0`` to ``held_out`` (a held-out part to choose a regulariser on)."""

    def __init__(self, x: TensorRef, y: TensorRef, rows: Rows = ALL_ROWS, split: int | None = None) -> None:
        self.inputs = (x, y)
        self.rows = rows
        self.split = split
        self.fit = LsqStats()
        self.held_out = LsqStats()
        self._seen = 0

    def update(self, values: Sequence[np.ndarray], batch_index: int) -> None:
        x, y = (np.asarray(v) for v in values)
        if x.shape[:-1] != y.shape[:-1]:
            raise PassError(f"cross-product rows differ: {list(x.shape)} vs {list(y.shape)}")
        idx, w = self.rows.pick(x.shape, batch_index)
        n = len(x)
        sample = np.arange(self._seen, self._seen + n)
        self._seen += n
        held = (sample % self.split == 0) if self.split else np.zeros(n, bool)
        for stats, mask in ((self.fit, ~held), (self.held_out, held)):
            if not mask.any():
                continue
            sel = None if idx is None else idx[mask]
            rw = None if w is None else np.tile(w, int(mask.sum()))
            stats.add(Rows.take(x[mask], sel), Rows.take(y[mask], sel), rw)

    def combined(self) -> LsqStats:
        out = LsqStats()
        out += self.fit
        out += self.held_out
        return out


class Moments(Reducer):
    """Per-channel mean and standard deviation of *x* along *axis* over every other axis."""

    def __init__(self, x: TensorRef, axis: int = -1) -> None:
        self.inputs = (x,)
        self.axis = axis
        self.n = 0
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def update(self, values: Sequence[np.ndarray], batch_index: int) -> None:
        (x,) = values
        x = np.moveaxis(np.asarray(x), self.axis, -1).reshape(-1, np.shape(x)[self.axis]).astype(np.float64)
        if self.s1 is None:
            self.s1, self.s2 = x.sum(0), (x * x).sum(0)
        else:
            self.s1 += x.sum(0)
            self.s2 += (x * x).sum(0)
        self.n += x.shape[0]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.s1 / self.n
        return mu, np.sqrt(np.maximum(self.s2 / self.n - mu * mu, 1e-12))


class RowSample(Reducer):
    """A seeded sample of at most *size* rows of *x* (reservoir sampling over all rows)."""

    def __init__(self, x: TensorRef, size: int, seed: int = 0) -> None:
        self.inputs = (x,)
        self.size = int(size)
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.seen = 0

    def update(self, values: Sequence[np.ndarray], batch_index: int) -> None:
        (x,) = values
        r = np.asarray(x).reshape(-1, np.shape(x)[-1])
        if self.rows is None:
            self.rows = np.empty((0, r.shape[1]), r.dtype)
        take = max(0, self.size - len(self.rows))
        if take:
            self.rows = np.concatenate([self.rows, r[:take]])
        for i in range(take, len(r)):  # reservoir: row i replaces a kept one with prob size/(seen+i+1)
            j = int(self.rng.integers(0, self.seen + i + 1))
            if j < self.size:
                self.rows[j] = r[i]
        self.seen += len(r)


def _split_ref(ref: TensorRef, default: str) -> tuple[str, str]:
    return ref if isinstance(ref, tuple) else (default, ref)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, leave=False)


def reduce_activations(
    models: onnx.ModelProto | Mapping[str, onnx.ModelProto | TapSession],
    feeds: Mapping[str, np.ndarray],
    reducers: Sequence[Reducer],
    *,
    batch: int = DEFAULT_BATCH,
    threads: int | None = None,
    progress: bool = False,
    desc: str = "activations",
) -> None:
    """Stream *feeds* through *models* in batches and update every reducer.

    *models*: one model, or ``{key: model or TapSession}`` when reducers read tensors of
    several models (refer to them as ``(key, name)``). Only the tensors some reducer reads are
    exposed; each model runs once per batch."""
    if isinstance(models, onnx.ModelProto):
        models = {"model": models}
    default = next(iter(models))
    wanted: dict[str, list[str]] = {k: [] for k in models}
    for r in reducers:
        for ref in r.inputs:
            key, name = _split_ref(ref, default)
            if key not in models:
                raise PassError(f"reducer reads {name!r} of unknown model {key!r}")
            if name not in wanted[key]:
                wanted[key].append(name)
    sessions = {
        k: m if isinstance(m, TapSession) else TapSession(m, wanted[k], label=k, threads=threads)
        for k, m in models.items()
        if wanted[k]
    }
    n = len(next(iter(feeds.values())))
    with _progress(n, desc, progress) as bar:
        for start, b in batches(feeds, batch):
            outs = {k: s.run(b, wanted[k]) for k, s in sessions.items()}
            for r in reducers:
                vals = []
                for ref in r.inputs:
                    key, name = _split_ref(ref, default)
                    vals.append(outs[key][name])
                r.update(vals, start // batch)
            bar.update(len(next(iter(b.values()))))


def collect_activations(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    tensors: Sequence[str],
    *,
    batch: int = DEFAULT_BATCH,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """All values of *tensors* over *feeds*, concatenated (for small sets only: it holds them)."""
    session = TapSession(model, tensors, threads=threads)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    n = len(next(iter(feeds.values())))
    with _progress(n, "activations", progress) as bar:
        for _, b in batches(feeds, batch):
            for k, v in session.run(b, list(tensors)).items():
                parts[k].append(v)
            bar.update(len(next(iter(b.values()))))
    return {k: np.concatenate(v) for k, v in parts.items()}


def extract_subgraph(
    model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]
) -> onnx.ModelProto:
    """The nodes computing *outputs* from *inputs* (plus graph inputs and constants they need),
    as a model of its own whose inputs are *inputs* and any graph input still needed."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    inits = {t.name for t in g.initializer}
    stop = set(inputs)
    keep: set[int] = set()
    need_graph_inputs: list[str] = []
    todo = list(outputs)
    seen: set[str] = set()
    while todo:
        v = todo.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in stop or v in inits:
            continue
        if v not in producer:
            need_graph_inputs.append(v)
            continue
        i = producer[v]
        if i not in keep:
            keep.add(i)
            todo.extend(g.node[i].input)
            for a in g.node[i].attribute:  # outer-scope names used by subgraphs
                if a.type == onnx.AttributeProto.GRAPH:
                    todo.extend(x for n in a.g.node for x in n.input)
    used = {x for i in keep for x in g.node[i].input}
    graph = onnx.GraphProto()
    graph.name = "sub"
    graph.node.extend(g.node[i] for i in sorted(keep))
    graph.initializer.extend(t for t in g.initializer if t.name in used)
    graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
    f32 = onnx.TensorProto.FLOAT
    by_name = {i.name: i for i in g.input}
    for name in dict.fromkeys([*inputs, *need_graph_inputs]):
        if name in by_name:
            graph.input.append(by_name[name])
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(name, f32, None))
    for name in outputs:
        graph.output.append(onnx.helper.make_tensor_value_info(name, f32, None))
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


class SubgraphRunner:
    """Runs the part of *model* that computes *outputs* from the cached tensors *inputs*
    (typically the residual stream at a block boundary plus the graph input)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        inputs: Sequence[str],
        outputs: Sequence[str],
        *,
        threads: int | None = None,
        label: str = "subgraph",
        spinning: bool | None = None,
    ) -> None:
        sub = extract_subgraph(model, [k for k in inputs if k], list(outputs))
        self.inputs = [i.name for i in sub.graph.input]
        self.outputs = list(outputs)
        self.session = TapSession(sub, (), label=label, threads=threads, spinning=spinning)

    def run(self, have: Mapping[str, np.ndarray], batch: int = DEFAULT_BATCH) -> list[np.ndarray]:
        missing = [n for n in self.inputs if n not in have]
        if missing:
            raise PassError(f"subgraph needs {missing[0]!r}, which is not cached")
        feeds = {k: have[k] for k in self.inputs}
        n = len(next(iter(feeds.values())))
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        out: list[np.ndarray] | None = None  # per-sample outputs are filled in place (no copy)
        for start, b in batches(feeds, batch):
            got = self.session.run(b, self.outputs)
            res = [got[name] for name in self.outputs]
            rows = len(next(iter(b.values())))
            if start == 0 and all(r.ndim and len(r) == rows for r in res):
                out = [np.empty((n, *r.shape[1:]), r.dtype) for r in res]
            if out is not None and all(r.ndim and len(r) == rows for r in res):
                for o, r in zip(out, res, strict=True):
                    o[start : start + rows] = r
                continue
            if out is not None:  # an output that is not per sample after all
                parts = [[o[:start]] for o in out]
                out = None
            for p, r in zip(parts, res, strict=True):
                p.append(r)
        return out if out is not None else [np.concatenate(p) for p in parts]


def run_subgraph(
    model: onnx.ModelProto,
    have: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    batch: int = DEFAULT_BATCH,
    threads: int | None = None,
    spinning: bool | None = None,
) -> list[np.ndarray]:
    """*outputs* of *model* computed from the cached tensors *have* (one-off
    :class:`SubgraphRunner`)."""
    runner = SubgraphRunner(model, [k for k in have if k], outputs, threads=threads, spinning=spinning)
    return runner.run(have, batch)
