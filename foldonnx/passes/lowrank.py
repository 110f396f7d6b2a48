"""Activation-aware mixed-rank low rank: every linear layer ``x·W`` becomes ``(x·A)·B``.

:class:`LowRankPass` is registered as ``lowrank`` (budget ``{"params": "target_params"}``, so
``sweep --axis params --methods lowrank`` works). The method is Azizi, Nazemi, Pedram (arXiv
2402.06004) on the SVD-LLM / ASVD implementation path (ALGORITHMS.md §3); the numerics are
:mod:`foldonnx.numerics.lowrank`. Stages of a run (figures: DINOv2-S at 20 % fewer parameters,
CLS cosine on 30 real photos, calibrated on 256 images that share nothing with them — 128
off-domain CIFAR / Fashion-MNIST crops and 128 synthetic noise images; benchmarks/lowrank.md):

1. **Layers** (:func:`find_layers`) — every ``MatMul`` with a constant 2-D weight ``[in, out]``
   (``x·W``; a fused qkv is one layer), ``Gemm`` with a constant ``B`` (``transB`` 0 or 1,
   ``alpha``/``beta`` folded in), 1×1 ``Conv`` (``group=1``). A weight read by several nodes, a
   weight on the left (``W·x``), ``Gemm`` with ``transA``, k×k and grouped convolutions are
   skipped with the reason (k×k convolutions would need their im2col statistics). Layers
   reading the same input (q, k, v kept apart by an exporter) can share ``x·A``
   (``share_input``).
2. **Statistics** — the layer inputs on the calibration images, ``tokens`` rows per image (the
   first token always, padding never: a text model's attention mask is honoured), into
   :class:`~foldonnx.numerics.lowrank.LayerStats`; every ``held_out``-th image is held out
   (second terms are chosen and errors reported on it).
3. **Ranks** — ``rank_ratio``, ``ranks`` (per-layer spec) or ``target_params``, allocated by
   ``allocation``: ``sensitivity`` (default) — each layer alone truncated in the model, the
   damage to the model's outputs measured on a few held-out images and modelled as a power
   law of that layer's own whitened output error; a greedy over the lower convex hulls of the
   layers' (parameters saved, predicted damage) curves with an exact parameter ledger (a
   layer saves parameters only once ``k·(in+out) < in·out``); then every layer measured again
   at the rank it was given and the allocation redone (``sensitivity_rounds``: the damage of
   deep truncations grows faster than linearly, 1 round 0.899, 2 rounds 0.921 on 128
   images). ``uniform``: every layer loses the same fraction of its parameters (0.869);
   ``error``: each layer's own relative output error (0.855; the 2026-11-29 study: 0.836).
4. **Fit** — ``one-shot`` (default): the whitened SVD of every layer on the original model's
   inputs (SVD-LLM), with the bias absorbing the mean output error where the layer has one;
   ``sequential``: block by block (the model is cut where one tensor carries everything, the
   residual stream), each layer whitened on the inputs the already-compressed model gives it,
   with ``compensation`` fitting it toward the original outputs instead (a reduced-rank
   regression ``x̃·Ŵ ≈ x·W``, strength chosen per layer on the held-out images). Measured:
   one-shot 0.899, sequential 0.883, sequential + compensation 0.843 (off-domain calibration:
   the regression learns the calibration domain); calibrated on crops of photos and scored on
   other photos, 0.902 / 0.906 / 0.911 — within the noise of 20 images, at two to three times
   the cost, so one-shot is the default.
5. **Second term** (``second_term``) — ``columns``: low rank plus a few whole weight rows
   (input channels) at no more parameters; ``lowrank``: two low-rank terms, W₁ fitted to the
   layer on its own inputs, W₂ to what W₁ misses against the original outputs, refined by
   alternating least squares (written as one wider pair); ``auto`` tries both. Kept per layer
   only where it lowers the held-out output error; the report counts how often.
6. **Rewrite** (:class:`~foldonnx.graph.edit.GraphEditor`) — ``MatMul(x, W)`` becomes
   ``MatMul(MatMul(x, A), B)`` (``Gemm``: ``MatMul`` then ``Gemm``; 1×1 ``Conv``: two 1×1
   ``Conv``), a second term adds ``Gather(x, J)·R``; the output tensor keeps its name. The
   rewritten model is checked against the fitted weights on two calibration samples.

Without calibration data (``calib none``) the factors are a plain SVD of W (data-free;
0.596 CLS cosine at 20 % in the study). ``calib`` may join sources, ``A+B``: the calibration
set matters more than any option here — off-domain crops alone 0.805 (uniform allocation),
synthetic images alone 0.859, the two together 0.871.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from foldonnx.data.activations import extract_subgraph, static_batch
from foldonnx.errors import DataError, PassError, UsageError
from foldonnx.numerics import lowrank as lr
from foldonnx.numerics.allocate import BudgetError, Ladder, greedy_allocate
from foldonnx.passes.base import Change, Pass, PassContext, PassReport, Skipped
from foldonnx.passes.config import PassConfig, check_fraction, option
from foldonnx.passes.registry import register_pass

__all__ = [
    "LowRankPass",
    "LowRankConfig",
    "LowRankReport",
    "LayerReport",
    "LinearLayer",
    "FactorGroup",
    "find_layers",
    "mixed_calibration",
    "parse_rank_spec",
    "ALLOCATIONS",
    "FITS",
    "SECOND_TERMS",
]

logger = logging.getLogger(__name__)

ALLOCATIONS = ("sensitivity", "uniform", "error")
FITS = ("sequential", "one-shot")
SECOND_TERMS = ("none", "columns", "lowrank", "auto")
NO_DATA = ("none", "data-free")
#: the whitening ridge: DINOv2-S at 20 % (one-shot, off-domain calibration, CLS cosine on 30
#: photos) 0.849 at 1e-6, 0.855 at 1e-2, 0.852 at 0.1, 0.821 at 1.0 — a little shrinkage toward
#: the plain SVD keeps directions the calibration images under-represent
RIDGE = 1e-2
#: compensation strengths ``compensation auto`` tries per layer (see numerics.lowrank.reduced_rank_fit)
MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: how far (a fraction of the model's parameters) an allocation may miss the target before the
#: last layer's rank leaves the --round-to grid
TOLERANCE = 0.005


def _compensation_text(value: Any) -> str:
    return "auto" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# configuration and report
# ---------------------------------------------------------------------------------------------
def parse_rank_spec(spec: str | None) -> list[tuple[str, float | None]]:
    """``"*fc1*=128,*attn*=0.5,*head*=dense"`` → ``[(glob, 128), (glob, 0.5), (glob, None)]``:
    an integer is a rank, a fraction in (0, 1] a share of the layer's full rank, ``dense``
    leaves the layer alone. The first matching pattern wins; unmatched layers stay dense."""
    out: list[tuple[str, float | None]] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        pat, eq, value = part.rpartition("=")
        if not eq or not pat:
            raise UsageError(f"--ranks entry {part!r} is not GLOB=RANK")
        value = value.strip().lower()
        if value == "dense":
            out.append((pat.strip(), None))
            continue
        try:
            v = float(value)
        except ValueError:
            raise UsageError(
                f"--ranks entry {part!r}: {value!r} is not a rank, a fraction or 'dense'"
            ) from None
        if v <= 0 or (v > 1 and not v.is_integer()):
            raise UsageError(f"--ranks entry {part!r}: give a rank >= 1, a fraction in (0, 1] or 'dense'")
        out.append((pat.strip(), v))
    if spec is not None and not out:
        raise UsageError("--ranks is empty")
    return out


@dataclass(frozen=True)
class LowRankConfig(PassConfig):
    """Options of ``lowrank`` (see :class:`LowRankPass`)."""

    target_params: float | None = option(
        None, "fraction of the model's parameters to remove; ranks allocated over layers", metavar="F"
    )
    rank_ratio: float | None = option(
        None,
        "keep this fraction of every layer's full rank (layers where that saves nothing stay dense)",
        metavar="R",
    )
    ranks: str | None = option(
        None,
        "per-layer ranks: GLOB=RANK|FRACTION|dense, comma-separated (node names; first match wins)",
        metavar="SPEC",
    )
    allocation: str = option(
        "sensitivity",
        "how --target-params is spread over layers: sensitivity (each layer's output error weighted by "
        "its measured effect on the model's output), uniform (same fraction of every layer), error "
        "(each layer's own output error)",
        choices=ALLOCATIONS,
    )
    fit: str = option(
        "one-shot",
        "one-shot: every layer whitened on the original model's inputs; sequential: block by block, each "
        "layer fitted on the compressed model's inputs (with --compensation, against the original outputs)",
        choices=FITS,
    )
    second_term: str = option(
        "none",
        "second term per layer, kept only where it lowers the held-out output error at no more "
        "parameters: columns (a few whole weight rows), lowrank (two low-rank terms, ALS), auto (both)",
        choices=SECOND_TERMS,
    )
    calib_limit: int = option(256, "calibration images used", metavar="N")
    tokens: int = option(
        64, "token rows sampled per image for the statistics (the first token always; 0 = all)", metavar="T"
    )
    first_token_weight: float = option(
        1.0, "weight of a token input's first row (a ViT's CLS) against one other token row", metavar="W"
    )
    held_out: int = option(8, "every N-th calibration image is held out (second terms, errors)", metavar="N")
    sensitivity_samples: int = option(
        8, "held-out images on which the sensitivity of the output to each layer is measured", metavar="N"
    )
    sensitivity_rounds: int = option(
        2,
        "sensitivity measurements: at the uniform ranks, then again at each allocation's ranks",
        metavar="N",
    )
    round_to: int = option(
        8, "ranks are multiples of N (1 = any rank); see benchmarks/lowrank.md for the latency", metavar="N"
    )
    min_rank: int = option(8, "no layer goes below this rank", metavar="K")
    compensation: str = option(
        "0",
        "sequential fit: how far each layer is fitted to the original outputs rather than to what it "
        "computes on the compressed inputs (0..1), or auto (chosen per layer on the held-out images)",
        metavar="auto|A",
        parse=_compensation_text,
    )
    share_input: bool = option(
        False, "factor layers that read the same input jointly (x·A shared; e.g. separate q, k, v)"
    )
    intercept: bool = option(
        False,
        "let a layer's bias absorb its mean output error on the calibration images (layers with a bias)",
    )
    exclude: str | None = option(
        None, "node-name globs of layers to leave dense, comma-separated", metavar="GLOBS"
    )
    batch: int = option(8, "images per ONNX Runtime run", metavar="N", cli=False)
    eps: float = option(
        RIDGE,
        "ridge added to each layer's input second moment before whitening, relative to its mean diagonal",
    )
    seed: int = option(0, "seed of the token sampling and of generated calibration images")

    def validate(self) -> None:
        check_fraction(self.target_params, "target-params")
        check_fraction(self.rank_ratio, "rank-ratio", allow_one=True)
        given = [n for n in ("target_params", "rank_ratio", "ranks") if getattr(self, n) is not None]
        if len(given) > 1:
            raise UsageError("give one of --target-params, --rank-ratio, --ranks")
        if not given:
            raise UsageError("give --target-params F, --rank-ratio R or --ranks SPEC")
        parse_rank_spec(self.ranks)
        for name in ("calib_limit", "held_out", "round_to", "min_rank", "batch", "sensitivity_rounds"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tokens < 0 or self.sensitivity_samples < 0 or self.seed < 0:
            raise UsageError("tokens, sensitivity-samples and seed must be >= 0")
        if self.compensation != "auto":
            try:
                v = float(self.compensation)
            except ValueError:
                raise UsageError(
                    f"compensation must be auto or a number in [0, 1], got {self.compensation!r}"
                ) from None
            if not 0.0 <= v <= 1.0:
                raise UsageError(f"compensation must be in [0, 1], got {v:g}")
        if not 0 < self.eps < 1:
            raise UsageError(f"eps must be in (0, 1), got {self.eps:g}")


@dataclass
class LayerReport:
    """One factored layer (or group of layers sharing their input)."""

    name: str
    kind: str  # MatMul, Gemm, Conv1x1, or "MatMul x3" for a joint group
    n_in: int
    n_out: int
    rank: int
    max_rank: int
    params_before: int
    params_after: int
    second_term: str = "none"
    columns: int = 0
    train_error: float | None = None  # relative output error on the calibration rows it was fitted on
    heldout_error: float | None = None  # the same on the held-out images
    sensitivity: float | None = None  # output damage per unit of this layer's output error
    compensation: float | None = None  # the compensation strength chosen (sequential fit)
    members: list[str] = field(default_factory=list)


@dataclass
class LowRankReport(PassReport):
    """What ``lowrank`` did: per layer rank, parameters, errors; how ranks were chosen."""

    fit: str = "one-shot"
    allocation: str = "uniform"
    calib: str | None = None
    target_params: float | None = None
    layers: list[LayerReport] = field(default_factory=list)
    candidates: int = 0
    second_term_tried: int = 0
    second_term_kept: dict[str, int] = field(default_factory=dict)
    verify_max_error: float | None = None
    seconds_by_stage: dict[str, float] = field(default_factory=dict)

    def changes(self) -> list[Change]:
        return [
            Change(
                what=r.name,
                kind=r.kind,
                before=f"{r.n_in}x{r.n_out}",
                after=f"rank {r.rank}" + (f" + {r.columns} rows" if r.columns else ""),
                detail={
                    "params_before": r.params_before,
                    "params_after": r.params_after,
                    "heldout_error": r.heldout_error,
                },
            )
            for r in self.layers
        ]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LowRankReport:
        vals = cls._field_values(d)
        vals["layers"] = [LayerReport(**r) for r in d.get("layers", [])]
        vals.setdefault("name", "lowrank")
        vals.setdefault("config", {})
        return cls(**vals)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
@dataclass
class LinearLayer:
    """A linear layer of the graph: ``y = x·W_eff + b_eff`` with ``W_eff`` ``[in, out]``."""

    node: str  # node name (unique in the working copy)
    op: str  # MatMul, Gemm, Conv
    x: str
    y: str
    weight: str
    n_in: int
    n_out: int
    trans_b: bool = False  # Gemm
    alpha: float = 1.0
    beta: float = 1.0
    bias: str | None = None  # constant bias tensor (Add input, Gemm C, Conv B)
    bias_node: str | None = None  # the Add node of a MatMul's bias
    bias_free: bool = False  # the bias may be rewritten (a constant with one reader, numel = out)
    conv_attrs: dict[str, Any] = field(default_factory=dict)
    conv_nd: int = 2  # spatial dimensions of a convolution

    @property
    def kind(self) -> str:
        return "Conv1x1" if self.op == "Conv" else self.op

    @property
    def feature_axis(self) -> int:
        return 1 if self.op == "Conv" else -1


@dataclass
class FactorGroup:
    """Layers factored together: one layer, or several reading the same input (``share_input``)."""

    id: int
    members: list[LinearLayer]
    segment: int = 0
    stage: int = 0

    @property
    def x(self) -> str:
        return self.members[0].x

    @property
    def n_in(self) -> int:
        return self.members[0].n_in

    @property
    def n_out(self) -> int:
        return sum(m.n_out for m in self.members)

    @property
    def name(self) -> str:
        first = self.members[0].node
        return first if len(self.members) == 1 else f"{first} (+{len(self.members) - 1})"

    @property
    def kind(self) -> str:
        k = self.members[0].kind
        return k if len(self.members) == 1 else f"{k} x{len(self.members)}"

    @property
    def max_rank(self) -> int:
        return min(self.n_in, self.n_out)

    @property
    def dense_params(self) -> int:
        return self.n_in * self.n_out

    @property
    def intercept_ok(self) -> bool:
        return all(m.bias_free for m in self.members)


def _const_arrays(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed (or duplicately named) node of the main graph a unique name."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            base = n.name or f"{n.op_type}_{i}"
            name, j = base, 0
            while name in seen:
                j += 1
                name = f"{base}_{j}"
            n.name = name
        seen.add(n.name)


def find_layers(
    model: onnx.ModelProto, exclude: Sequence[str] = ()
) -> tuple[list[LinearLayer], list[Skipped]]:
    """The linear layers the pass can factor, and the candidates it cannot, with the reason.
    Node names must be unique (:func:`name_nodes`)."""
    g = model.graph
    consts = _const_arrays(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                readers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    layers: list[LinearLayer] = []
    skipped: list[Skipped] = []

    def skip(n: onnx.NodeProto, why: str) -> None:
        skipped.append(Skipped(n.name, why, n.op_type))

    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv") or len(n.input) < 2:
            continue
        a, w = n.input[0], n.input[1]
        if n.op_type == "MatMul" and a in consts and w not in consts:
            skip(n, "constant weight on the left (W·x): not factored")
            continue
        if w not in consts:
            continue  # activation × activation (attention): not a layer
        if any(fnmatch.fnmatchcase(n.name, pat) for pat in exclude):
            skip(n, "excluded (--exclude)")
            continue
        t = consts[w]
        dims = list(t.dims)
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            skip(n, f"weight of type {onnx.TensorProto.DataType.Name(t.data_type)}: not a float layer")
            continue
        if w in graph_inputs:
            skip(n, f"weight {w!r} is also a graph input (a caller may feed it): not factored")
            continue
        users = readers.get(w, [])
        if len(users) > 1 or w in graph_outputs:
            others = ", ".join(sorted({u.name for u in users if u is not n}))[:120]
            skip(
                n, f"weight {w!r} is shared with {others or 'a graph output'}: factoring it would change them"
            )
            continue
        layer = _layer_of(n, dims, consts, readers, graph_outputs, skip)
        if layer is not None:
            layers.append(layer)
    return layers, skipped


def _layer_of(n, dims, consts, readers, graph_outputs, skip) -> LinearLayer | None:  # noqa: ANN001
    if n.op_type == "MatMul":
        if len(dims) != 2:
            skip(n, f"weight of rank {len(dims)} (batched MatMul): not factored")
            return None
        layer = LinearLayer(n.name, "MatMul", n.input[0], n.output[0], n.input[1], dims[0], dims[1])
        _matmul_bias(layer, consts, readers, graph_outputs)
        return layer
    if n.op_type == "Gemm":
        if _attr(n, "transA", 0):
            skip(n, "Gemm with transA=1: not factored")
            return None
        trans_b = bool(_attr(n, "transB", 0))
        n_in, n_out = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
        layer = LinearLayer(
            n.name,
            "Gemm",
            n.input[0],
            n.output[0],
            n.input[1],
            n_in,
            n_out,
            trans_b=trans_b,
            alpha=float(_attr(n, "alpha", 1.0)),
            beta=float(_attr(n, "beta", 1.0)),
        )
        if len(n.input) > 2 and n.input[2]:
            c = n.input[2]
            if c in consts:
                numel = int(np.prod(consts[c].dims, dtype=np.int64))
                layer.bias = c if numel in (1, n_out) else None
                layer.bias_free = layer.bias is not None and len(readers.get(c, [])) == 1 and numel == n_out
            if layer.bias is None:
                skip(n, "Gemm with a non-constant or batch-shaped C: not factored")
                return None
        return layer
    # Conv
    if len(dims) < 3 or any(d != 1 for d in dims[2:]):
        skip(n, f"{'x'.join(map(str, dims[2:]))} convolution: only 1x1 convolutions are factored")
        return None
    if int(_attr(n, "group", 1)) != 1:
        skip(n, "grouped convolution: not factored")
        return None
    layer = LinearLayer(n.name, "Conv", n.input[0], n.output[0], n.input[1], dims[1], dims[0])
    layer.conv_nd = len(dims) - 2
    for a in n.attribute:
        if a.name in ("strides", "pads", "auto_pad", "dilations"):
            v = onnx.helper.get_attribute_value(a)
            layer.conv_attrs[a.name] = v.decode() if isinstance(v, bytes) else list(v)
    if len(n.input) > 2 and n.input[2]:
        if n.input[2] not in consts:
            skip(n, "convolution with a non-constant bias: not factored")
            return None
        layer.bias = n.input[2]
        layer.bias_free = len(readers.get(n.input[2], [])) == 1
    return layer


def _matmul_bias(layer: LinearLayer, consts, readers, graph_outputs) -> None:  # noqa: ANN001
    """The constant bias of ``Add(MatMul(x, W), b)`` when the MatMul's only reader is that Add."""
    users = readers.get(layer.y, [])
    if len(users) != 1 or layer.y in graph_outputs or users[0].op_type != "Add":
        return
    add = users[0]
    other = add.input[1] if add.input[0] == layer.y else add.input[0]
    if other not in consts:
        return
    dims = list(consts[other].dims)
    if int(np.prod(dims, dtype=np.int64)) != layer.n_out or (dims and dims[-1] != layer.n_out):
        return
    layer.bias, layer.bias_node = other, add.name
    layer.bias_free = len(readers.get(other, [])) == 1


def _weight(consts: Mapping[str, onnx.TensorProto], layer: LinearLayer) -> np.ndarray:
    """``W_eff`` ``[in, out]`` (float64) of *layer*."""
    w = numpy_helper.to_array(consts[layer.weight]).astype(np.float64)
    if layer.op == "Conv":
        return w.reshape(layer.n_out, layer.n_in).T
    if layer.op == "Gemm":
        return layer.alpha * (w.T if layer.trans_b else w)
    return w


def _bias(consts: Mapping[str, onnx.TensorProto], layer: LinearLayer) -> np.ndarray | None:
    """``b_eff`` ``[out]`` (float64) of *layer*, or None."""
    if layer.bias is None:
        return None
    b = numpy_helper.to_array(consts[layer.bias]).astype(np.float64).reshape(-1)
    if layer.op == "Gemm":
        b = layer.beta * np.broadcast_to(b, (layer.n_out,))
    return np.array(b, np.float64)


def _stored_weight(layer: LinearLayer, w_eff: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """*w_eff* ``[in, out]`` in the layout *layer* stores its weight in."""
    if layer.op == "Conv":
        w = w_eff.T.reshape(layer.n_out, layer.n_in, *([1] * layer.conv_nd))
    elif layer.op == "Gemm":
        w = w_eff / layer.alpha
        w = w.T if layer.trans_b else w
    else:
        w = w_eff
    return np.ascontiguousarray(w).astype(dtype)


def _stored_bias(layer: LinearLayer, b_eff: np.ndarray, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    b = b_eff / layer.beta if layer.op == "Gemm" else b_eff
    return np.asarray(b).reshape(tuple(shape)).astype(dtype)


def _initializers_for(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """``Constant`` nodes producing *names* become initializers of the same name (the fitted
    weights are fed to ONNX Runtime by name, which only graph inputs and initializers allow)."""
    wanted = set(names)
    keep = []
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] in wanted:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                t = onnx.TensorProto()
                t.CopyFrom(value)
                t.name = n.output[0]
                model.graph.initializer.append(t)
                continue
        keep.append(n)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def group_layers(layers: Sequence[LinearLayer], share_input: bool) -> list[FactorGroup]:
    """One group per layer, or (``share_input``) one per set of MatMuls reading the same input."""
    groups: list[FactorGroup] = []
    by_x: dict[str, FactorGroup] = {}
    for layer in layers:
        if share_input and layer.op == "MatMul":
            grp = by_x.get(layer.x)
            if grp is not None:
                grp.members.append(layer)
                continue
            grp = FactorGroup(len(groups), [layer])
            by_x[layer.x] = grp
            groups.append(grp)
        else:
            groups.append(FactorGroup(len(groups), [layer]))
    return groups


# ---------------------------------------------------------------------------------------------
# segments: the model cut where one tensor carries everything (the residual stream)
# ---------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """Nodes between two cut tensors (``cut`` None: the graph inputs) and the groups in them."""

    index: int
    cut: str | None
    end_cut: str | None
    groups: list[FactorGroup] = field(default_factory=list)
    stages: int = 0


def plan_segments(model: onnx.ModelProto, groups: Sequence[FactorGroup]) -> list[Segment]:
    """Cut the model between factor groups wherever a single tensor that depends on a layer is
    alive (every later node reads only it, constants and what the graph inputs give), and
    number each group's stage within its segment (how many of the segment's layers lie
    upstream of its input)."""
    g = model.graph
    nodes = list(g.node)
    pos = {n.name: i for i, n in enumerate(nodes)}
    layer_pos = {pos[m.node]: grp for grp in groups for m in grp.members}
    dep: set[str] = set()
    produced: dict[str, int] = {}
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if i in layer_pos or any(t in dep for t in n.input):
            dep.update(o for o in n.output if o)
        for o in n.output:
            produced[o] = i
        for t in n.input:
            last_use[t] = i
    for o in g.output:
        last_use[o.name] = len(nodes)
    # live dependent tensors at each position p (before node p)
    starts: dict[int, list[str]] = {}
    for t in dep:
        if t in last_use and last_use[t] > produced[t]:
            starts.setdefault(produced[t] + 1, []).append(t)
    ends: dict[int, list[str]] = {}
    for t in dep:
        if t in last_use and last_use[t] > produced[t]:
            ends.setdefault(last_use[t] + 1, []).append(t)
    live: set[str] = set()
    cut_at: dict[int, str] = {}
    for p in range(len(nodes) + 1):
        live.update(starts.get(p, []))
        live.difference_update(ends.get(p, []))
        if len(live) == 1:
            cut_at[p] = next(iter(live))
    order = sorted(layer_pos)
    segments = [Segment(0, None, None)]
    prev = None
    for p in order:
        grp = layer_pos[p]
        if prev is not None and grp is not layer_pos[prev]:
            cuts = [q for q in range(prev + 1, p + 1) if q in cut_at]
            if cuts:
                c = cut_at[cuts[-1]]
                segments[-1].end_cut = c
                segments.append(Segment(len(segments), c, None))
        if grp not in segments[-1].groups and all(grp not in s.groups for s in segments):
            segments[-1].groups.append(grp)
        prev = p
    segments = [s for s in segments if s.groups]
    for i, s in enumerate(segments):
        s.index = i
        for grp in s.groups:
            grp.segment = i
    _number_stages(nodes, segments)
    return segments


def _number_stages(nodes: Sequence[onnx.NodeProto], segments: Sequence[Segment]) -> None:
    """A group's stage: the longest chain of layers upstream of its input, renumbered 0, 1, …
    within its segment (layers of one stage can be fitted together)."""
    members = {m.node: grp for seg in segments for grp in seg.groups for m in grp.members}
    level: dict[str, int] = {}
    for n in nodes:
        grp = members.get(n.name)
        if grp is not None:
            grp.stage = level.get(grp.x, 0)
            out_level = grp.stage + 1
        else:
            out_level = max((level.get(t, 0) for t in n.input), default=0)
        for o in n.output:
            level[o] = out_level
    for seg in segments:
        remap = {s: i for i, s in enumerate(sorted({grp.stage for grp in seg.groups}))}
        for grp in seg.groups:
            grp.stage = remap[grp.stage]
        seg.stages = len(remap)


# ---------------------------------------------------------------------------------------------
# running parts of the model with the layer weights fed as inputs
# ---------------------------------------------------------------------------------------------
class _Runner:
    """The nodes computing *outputs* from *inputs* (cut tensors, graph inputs), with the
    tensors *fed* (weights, biases) as inputs too, so one session serves the original and
    every compressed version of them."""

    def __init__(
        self,
        model: onnx.ModelProto,
        inputs: Sequence[str],
        outputs: Sequence[str],
        fed: Sequence[str],
        *,
        threads: int | None,
        label: str,
    ) -> None:
        from foldonnx.runtime.session import create_session

        sub = extract_subgraph(model, [*inputs, *fed], list(outputs))
        consts = {t.name: t for t in sub.graph.initializer}
        read = {i for n in sub.graph.node for i in n.input}
        fed_set = set(fed)
        keep = []
        for vi in sub.graph.input:
            if vi.name not in read and vi.name not in outputs:
                continue  # a cached tensor these nodes do not need
            if vi.name in fed_set:
                if vi.name not in consts:
                    continue
                t = consts[vi.name]  # typed like its initializer, which is dropped
                vi.CopyFrom(onnx.helper.make_tensor_value_info(vi.name, t.data_type, list(t.dims)))
            keep.append(vi)
        del sub.graph.input[:]
        sub.graph.input.extend(keep)
        inits = [t for t in sub.graph.initializer if t.name not in fed_set]
        del sub.graph.initializer[:]
        sub.graph.initializer.extend(inits)
        self.inputs = [vi.name for vi in keep]
        self.fed = [n for n in self.inputs if n in fed_set]
        self.batched = [n for n in self.inputs if n not in fed_set]
        self.outputs = list(outputs)
        self.session = create_session(sub, "cpu", threads=threads, label=label).session
        self.label = label

    def run(self, batch: Mapping[str, np.ndarray], fed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {n: batch[n] for n in self.batched}
        feeds.update({n: fed[n] for n in self.fed})
        try:
            return self.session.run(self.outputs, feeds)
        except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PassError(f"{self.label} fails to run on the calibration data: {first}") from None


def _chunks(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _pad(arrays: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A batch padded to a graph's fixed batch size by repeating its last sample."""
    out = {}
    for k, v in arrays.items():
        got = len(v)
        out[k] = v if got >= size else np.concatenate([v, np.repeat(v[-1:], size - got, axis=0)])
    return out


@dataclass
class _RowPicker:
    """Rows ``[n, features]`` of a layer input: per sample the first token and *tokens* others
    (seeded by the sample's index, so the original and the compressed model give the same
    positions); 2-D inputs as they are; NCHW inputs per pixel. Token rows come with weights:
    the first token (a ViT's CLS) weighs *first_weight* times the mean of the others."""

    tokens: int
    seed: int
    first_weight: float = 1.0
    #: ``[N, T]`` 0/1 token mask of the calibration samples (a text model's attention mask):
    #: rows of ``[B, T, D]`` tensors at masked positions (padding) are never picked
    valid: np.ndarray | None = None

    def __call__(self, a: np.ndarray, axis: int, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        a = np.asarray(a)
        if a.ndim <= 2:
            return (a.reshape(len(a), -1) if a.ndim == 2 else a.reshape(-1, 1)), None
        tokens_first = axis != 1 and a.ndim == 3
        if axis == 1:  # channels first: pixels become tokens
            a = np.moveaxis(a, 1, -1)
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        t = a.shape[1]
        masked = tokens_first and self.valid is not None and self.valid.shape[1] == t
        if not masked and (self.tokens <= 0 or t <= self.tokens + 1):
            rows, first = a.reshape(-1, a.shape[-1]), np.arange(0, len(samples) * t, t)
        else:
            picked, first, at = [], [], 0
            for i, s in enumerate(samples):
                pos = np.flatnonzero(self.valid[int(s)]) if masked else np.arange(t)
                if not len(pos):
                    continue
                rest = pos[pos > 0]
                if 0 < self.tokens < len(rest):
                    rng = np.random.default_rng((self.seed, int(s)))
                    rest = np.sort(rng.choice(rest, self.tokens, replace=False))
                idx = np.concatenate([[0], rest]) if pos[0] == 0 else rest
                picked.append(a[i, idx])
                if pos[0] == 0:
                    first.append(at)
                at += len(idx)
            rows, first = np.concatenate(picked), np.asarray(first, np.int64)
        if not tokens_first or self.first_weight == 1.0:
            return rows, None
        w = np.ones(len(rows), np.float32)
        w[first] = self.first_weight
        return rows, w


@dataclass
class _Sweep:
    """Runs a model part over all calibration samples, keeping some outputs whole (the next
    cut) and the picked rows of others (layer inputs) with their held-out mask."""

    pick: _RowPicker
    held: np.ndarray
    size: int
    fixed: int | None

    def run(
        self,
        model: onnx.ModelProto,
        cut: Sequence[str],
        have: Mapping[str, np.ndarray],
        fed: Mapping[str, np.ndarray],
        whole: Sequence[str],
        rows: Mapping[str, int],
        threads: int | None,
        label: str,
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        n = len(self.held)
        full: dict[str, list[np.ndarray]] = {o: [] for o in whole}
        picked: dict[str, list[np.ndarray]] = {o: [] for o in rows}
        masks: dict[str, list[np.ndarray]] = {o: [] for o in rows}
        weights: dict[str, list[np.ndarray]] = {o: [] for o in rows}
        wanted = [o for o in dict.fromkeys([*whole, *rows]) if o not in have]
        runner = _Runner(model, cut, wanted, list(fed), threads=threads, label=label) if wanted else None
        for sl in _chunks(n, self.size):
            got = sl.stop - sl.start
            outs = {o: have[o][sl] for o in dict.fromkeys([*whole, *rows]) if o in have}
            if runner is not None:
                b_in = {k: v[sl] for k, v in have.items() if k in runner.batched}
                if self.fixed:
                    b_in = _pad(b_in, self.fixed)
                outs.update({o: v[:got] for o, v in zip(runner.outputs, runner.run(b_in, fed), strict=True)})
            samples = np.arange(sl.start, sl.stop)
            for o in whole:
                full[o].append(outs[o])
            for o, axis in rows.items():
                held_rows = []
                for i, s in enumerate(samples):  # one sample at a time: rows per sample may differ
                    r, wt = self.pick(outs[o][i : i + 1], axis, samples[i : i + 1])
                    picked[o].append(r)
                    held_rows.append(np.full(len(r), self.held[s]))
                    weights[o].append(np.ones(len(r), np.float32) if wt is None else wt)
                masks[o].append(np.concatenate(held_rows))
        out_rows = {
            o: (np.concatenate(picked[o]), np.concatenate(masks[o]), np.concatenate(weights[o])) for o in rows
        }
        return {o: np.concatenate(v) for o, v in full.items()}, out_rows


def _output_damage(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> float:
    """Relative squared error of the model's outputs, averaged over outputs; token outputs
    ``[B, T, D]`` count their first token (a ViT's CLS) as much as all the others together."""

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        return float(np.sum((a64 - b64) ** 2) / max(np.sum(a64**2), 1e-30))

    vals = []
    for a, b in zip(ref, out, strict=True):
        if a.dtype.kind != "f":
            continue
        if a.ndim == 3 and a.shape[1] > 1:
            vals.append(0.5 * (rel(a[:, 0], b[:, 0]) + rel(a[:, 1:], b[:, 1:])))
        else:
            vals.append(rel(a, b))
    return float(np.mean(vals)) if vals else 0.0


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
class _Stages(dict):
    """Seconds spent per stage of a run."""

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - t0, 2)


@dataclass
class _DamageModel:
    """A group's measured output damage ``D`` against its own output error ``e``, modelled as
    ``D = scale·e^power`` (power fitted in log space when two or more ranks were measured,
    clipped to [0.5, 3]; 1 with one)."""

    ranks: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    damages: list[float] = field(default_factory=list)
    scale: float = float("nan")
    power: float = 1.0

    def add(self, rank: int, error: float, damage: float) -> None:
        self.ranks.append(int(rank))
        self.errors.append(float(error))
        self.damages.append(float(damage))
        ok = [(e, d) for e, d in zip(self.errors, self.damages, strict=True) if e > 1e-30 and d > 1e-30]
        if not ok:
            return
        le = np.log([e for e, _ in ok])
        ld = np.log([d for _, d in ok])
        if len(ok) >= 2 and np.ptp(le) > 1e-3:
            p = float(np.polyfit(le, ld, 1)[0])
            self.power = float(np.clip(p, 0.5, 3.0))
        self.scale = float(np.exp(np.mean(ld - self.power * le)))

    def cost(self, errors: np.ndarray) -> np.ndarray:
        if not np.isfinite(self.scale):
            return np.asarray(errors, np.float64) * 0.0
        return self.scale * np.power(np.maximum(np.asarray(errors, np.float64), 0.0), self.power)


class _DamageProbe:
    """Runs the model on a few held-out samples with one group's weights truncated, from that
    group's segment on, and measures the damage to the outputs (:func:`_output_damage`). The
    model runs as a chain of per-segment sessions, each made once (together one copy of the
    model): a session per segment reaching to the outputs cost ViT-B/16 ~1 s to make, 26 times
    per round."""

    def __init__(
        self,
        model: onnx.ModelProto,
        segments: Sequence[Segment],
        feeds: Mapping[str, np.ndarray],
        idx: np.ndarray,
        threads: int | None,
    ) -> None:
        self.model = model
        self.consts = _const_arrays(model)
        self.threads = threads
        self.segments = list(segments)
        self.position = {grp.id: i for i, seg in enumerate(self.segments) for grp in seg.groups}
        self.outputs = [o.name for o in model.graph.output]
        self.fixed = static_batch(model)
        self.size = self.fixed or 8
        self.n = len(idx)
        self.chain: dict[int, _Runner] = {}
        self.have = self._forward(0, {k: v[idx] for k, v in feeds.items()}, None)
        self.ref = [self.have[o] for o in self.outputs]

    def _runner(self, i: int) -> _Runner:
        if i not in self.chain:
            seg = self.segments[i]
            last = i + 1 == len(self.segments) or not seg.end_cut
            self.chain[i] = _Runner(
                self.model,
                [seg.cut] if seg.cut else [],
                self.outputs if last else [seg.end_cut],
                self._weights(i),
                threads=self.threads,
                label="lowrank sensitivity",
            )
        return self.chain[i]

    def _weights(self, i: int) -> list[str]:
        return [m.weight for grp in self.segments[i].groups for m in grp.members]

    def _forward(
        self, start: int, have: Mapping[str, np.ndarray], changed: Mapping[str, np.ndarray] | None
    ) -> dict:
        """Every segment from *start* on (weights *changed* replacing the originals)."""
        x = dict(have)
        for i in range(start, len(self.segments)):
            runner = self._runner(i)
            fed = {nm: numpy_helper.to_array(self.consts[nm]) for nm in self._weights(i)}
            fed.update(changed or {})
            parts: list[list[np.ndarray]] = [[] for _ in runner.outputs]
            for sl in _chunks(self.n, self.size):
                b_in = {k: v[sl] for k, v in x.items() if k in runner.batched}
                if self.fixed:
                    b_in = _pad(b_in, self.fixed)
                for lst, o in zip(parts, runner.run(b_in, fed), strict=True):
                    lst.append(o[: sl.stop - sl.start])
            x.update({o: np.concatenate(p) for o, p in zip(runner.outputs, parts, strict=True)})
            if runner.outputs == self.outputs:
                break
        return x

    def damage(self, grp: FactorGroup, fit: lr.ReducedRankFit, k: int) -> float:
        a, b, _ = fit.factors(k)
        w_hat = a @ b
        changed, col = {}, 0
        for m in grp.members:
            dtype = self.consts[m.weight].data_type
            changed[m.weight] = _stored_weight(
                m, w_hat[:, col : col + m.n_out], onnx.helper.tensor_dtype_to_np_dtype(dtype)
            )
            col += m.n_out
        out = self._forward(self.position[grp.id], self.have, changed)
        return _output_damage(self.ref, [out[o] for o in self.outputs])


@dataclass
class _GroupFit:
    rank: int
    a: np.ndarray  # [in, k]
    b: np.ndarray  # [k, out]
    delta: np.ndarray | None  # new effective bias [out] (None: biases unchanged)
    cols: np.ndarray | None = None
    r: np.ndarray | None = None  # [m, out]
    variant: str = "none"
    mix: float = 0.0
    train_error: float | None = None
    heldout_error: float | None = None

    def dense(self) -> np.ndarray:
        w = self.a @ self.b
        if self.cols is not None:
            w[self.cols] += self.r
        return w

    def params(self, n_in: int, n_out: int) -> int:
        extra = 0 if self.cols is None else len(self.cols) * (n_out + 1)
        return self.rank * (n_in + n_out) + extra


class _Ledger:
    """Exact parameters removed by the ranks given up (see numerics.allocate.Ledger)."""

    def __init__(self, groups: Mapping[int, FactorGroup]) -> None:
        self.groups = groups
        self.units = dict.fromkeys(groups, 0)
        self.removed = 0

    def _params(self, gid: int, units: int) -> int:
        grp = self.groups[gid]
        return lr.factor_params(grp.max_rank - units, grp.n_in, grp.n_out)

    def delta(self, key: int, units: int) -> int:
        u = self.units[key]
        return self._params(key, u) - self._params(key, u + units)

    def apply(self, key: int, units: int) -> None:
        self.removed += self.delta(key, units)
        self.units[key] += units


def token_mask(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """A text model's attention mask among its inputs: a 2-D integer input named ``*mask*``
    holding only 0 and 1 (padding rows are then left out of the statistics)."""
    for name, v in feeds.items():
        if "mask" in name.lower() and v.ndim == 2 and v.dtype.kind in "iub" and np.isin(v, (0, 1)).all():
            return np.asarray(v, bool)
    return None


def mixed_calibration(
    model: onnx.ModelProto, ctx: PassContext, spec: str, limit: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Calibration feeds from several sources, ``A+B+…`` (e.g. ``offdomain:64+synthetic:64``):
    each source loaded as ``--calib`` would, the samples interleaved (so every held-out subset
    draws on all of them) and cut to *limit*."""
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if len(parts) < 2:
        raise DataError(f"calibration sources {spec!r}: give two or more, joined by '+'")
    each = []
    for part in parts:
        sub = ctx.child(calib=part)
        each.append(sub.calibration(model, limit=limit, seed=seed))
    n = [len(next(iter(f.values()))) for f in each]
    order = sorted((i / n[j], j, i) for j in range(len(each)) for i in range(n[j]))[:limit]
    return {k: np.stack([each[j][k][i] for _, j, i in order]) for k in each[0]}


class LowRankPass(Pass):
    """Activation-aware mixed-rank low rank (see module docstring and :class:`LowRankConfig`)."""

    name = "lowrank"
    summary = "activation-aware mixed-rank low rank: each linear layer x·W becomes (x·A)·B"
    Config = LowRankConfig
    Report = LowRankReport
    budget: ClassVar[Mapping[str, str]] = {"params": "target_params"}

    @property
    def is_identity(self) -> bool:
        c = self.config
        return c.target_params == 0 or c.rank_ratio == 1

    # -- calibration -------------------------------------------------------------------------
    def _feeds(
        self, model: onnx.ModelProto, ctx: PassContext, notes: list[str]
    ) -> dict[str, np.ndarray] | None:
        c = self.config
        src = ctx.calib
        if isinstance(src, str) and src.strip().lower() in NO_DATA:
            return None
        default = None
        if src is None:
            default = f"synthetic:{min(c.calib_limit, 64)}"
        try:
            if isinstance(src, str) and "+" in src:
                feeds = mixed_calibration(model, ctx, src, c.calib_limit, c.seed)
            else:
                feeds = ctx.calibration(model, limit=c.calib_limit, default=default, seed=c.seed)
        except DataError as exc:
            if src is not None:
                raise
            notes.append(f"no calibration data ({exc}): plain SVD (give --calib SOURCE)")
            return None
        if src is None:
            notes.append(f"no --calib given: whitened on {default} (noise images; --calib none: plain SVD)")
        n = len(next(iter(feeds.values())))
        if n < 2:
            raise DataError(f"lowrank needs at least 2 calibration samples, got {n}")
        return feeds

    # -- the pass ------------------------------------------------------------------------------
    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, LowRankReport]:
        from threadpoolctl import threadpool_limits

        # one BLAS thread for the Grams, Choleskys and SVDs: with the two cores shared, BLAS threads
        # waiting on each other cost 6-8x (DINOv2-S, load ~5: the fits of 72 layers 130 s -> 16 s)
        with threadpool_limits(limits=1, user_api="blas"):
            return self._apply(model, ctx)

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, LowRankReport]:
        c = self.config
        t_start = time.perf_counter()
        work = onnx.ModelProto()
        work.CopyFrom(model)
        name_nodes(work)
        report = self._empty_report()
        if self.is_identity:
            report.notes.append("zero budget: the model is unchanged")
            return work, report
        layers, report.skipped = find_layers(
            work, [p.strip() for p in (c.exclude or "").split(",") if p.strip()]
        )
        report.candidates = len(layers)
        if not layers:
            raise PassError("no linear layer with a constant weight to factor (MatMul/Gemm/1x1 Conv)")
        _initializers_for(work, [t for m in layers for t in (m.weight, m.bias) if t])
        groups = group_layers(layers, c.share_input)
        consts = _const_arrays(work)
        weights = {grp.id: np.concatenate([_weight(consts, m) for m in grp.members], 1) for grp in groups}
        biases = {grp.id: self._group_bias(consts, grp) for grp in groups}
        total_params = ctx.stats(model).params
        stages = _Stages()
        feeds = self._feeds(work, ctx, report.notes)
        sens: dict[int, float] = {}
        tried = 0
        if feeds is None:  # data-free: plain SVD, ranks uniform or as given
            report.calib, report.fit = "none", "plain-svd"
            report.allocation = "uniform" if c.target_params is not None else report.allocation
            ranks = self._ranks(groups, total_params)
            todo = self._todo(groups, ranks, report)
            fits = {}
            for grp in todo:
                a, b, _ = lr.plain_svd_fit(weights[grp.id]).factors(ranks[grp.id])
                fits[grp.id] = _GroupFit(ranks[grp.id], a, b, None)
        else:
            report.calib = ctx.calib if isinstance(ctx.calib, str) else "given"
            n = len(next(iter(feeds.values())))
            held = np.zeros(n, bool)
            if n >= 2 * c.held_out:
                held[c.held_out - 1 :: c.held_out] = True
            segments = plan_segments(work, groups)
            allocating = c.target_params is not None and c.allocation != "uniform"
            oneshot: dict[str, tuple[lr.LayerStats, lr.LayerStats]] = {}
            if c.fit == "one-shot" or allocating:
                ctx.say("lowrank: activation statistics of the original model")
                with stages.time("statistics"):
                    oneshot = self._oneshot_stats(work, groups, feeds, held, ctx)
            with stages.time("ranks"):
                ranks = self._ranks(groups, total_params)
                fits0 = {}
                if oneshot:  # the whitened SVD of every layer: the allocation's costs, the one-shot fit
                    fits0 = {
                        grp.id: self._whitened(grp, oneshot[grp.x][0], weights, biases) for grp in groups
                    }
                if allocating:
                    if c.allocation == "sensitivity":
                        ctx.say("lowrank: sensitivity of the output to each layer")
                        ranks, damage = self._sensitivity(
                            work, segments, groups, fits0, ranks, total_params, feeds, held, ctx, report.notes
                        )
                        sens = {gid: d.scale for gid, d in damage.items() if d.ranks}
                    else:
                        ranks = self._allocate(groups, total_params, fits0, None, report.notes)
            todo = self._todo(groups, ranks, report)
            with stages.time("fit"):
                if c.fit == "one-shot":
                    fits = {}
                    for grp in todo:
                        fit_s, held_s = oneshot[grp.x]
                        fits[grp.id], t = self._fit_group(
                            grp, fit_s, held_s, weights, biases, ranks, fits0.get(grp.id)
                        )
                        tried += t
                else:
                    ctx.say("lowrank: sequential fit, block by block")
                    fits, tried = self._sequential(
                        work, segments, todo, weights, biases, ranks, feeds, held, ctx
                    )
        with stages.time("rewrite"):
            out, dense_model = self._rewrite(work, todo, fits, consts)
            if feeds is not None:
                report.verify_max_error = self._check(dense_model, out, feeds)
        report.layers = [self._layer_report(grp, fits[grp.id], sens.get(grp.id)) for grp in todo]
        report.second_term_tried = tried
        for f in fits.values():
            if f.variant != "none":
                report.second_term_kept[f.variant] = report.second_term_kept.get(f.variant, 0) + 1
        stages["total"] = round(time.perf_counter() - t_start, 2)
        report.seconds_by_stage = dict(stages)
        return out, report

    @staticmethod
    def _todo(
        groups: Sequence[FactorGroup], ranks: Mapping[int, int], report: LowRankReport
    ) -> list[FactorGroup]:
        """The groups whose rank saves parameters; the others are reported left dense."""
        todo = [grp for grp in groups if ranks.get(grp.id, grp.max_rank) < grp.max_rank]
        for grp in groups:
            if grp not in todo:
                report.skipped.append(Skipped(grp.name, "left dense (its rank would save nothing)", grp.kind))
        return todo

    def _empty_report(self) -> LowRankReport:
        from foldonnx.graph.stats import ModelStats

        c = self.config
        empty = ModelStats(0, 0, 0)
        return LowRankReport(
            name=self.name,
            config=c.to_dict(),
            before=empty,
            after=empty,
            fit=c.fit,
            allocation=c.allocation
            if c.target_params is not None
            else ("ratio" if c.rank_ratio else "ranks"),
            target_params=c.target_params,
        )

    @staticmethod
    def _group_bias(consts: Mapping[str, onnx.TensorProto], grp: FactorGroup) -> np.ndarray | None:
        bs = [_bias(consts, m) for m in grp.members]
        if all(b is None for b in bs):
            return None
        return np.concatenate(
            [np.zeros(m.n_out) if b is None else b for m, b in zip(grp.members, bs, strict=True)]
        )

    # -- statistics -----------------------------------------------------------------------------
    def _batch_size(self, model: onnx.ModelProto) -> tuple[int, int | None]:
        fixed = static_batch(model)
        return (fixed or self.config.batch), fixed

    def _oneshot_stats(
        self,
        model: onnx.ModelProto,
        groups: Sequence[FactorGroup],
        feeds: Mapping[str, np.ndarray],
        held: np.ndarray,
        ctx: PassContext,
    ) -> dict[str, tuple[lr.LayerStats, lr.LayerStats]]:
        """Gram of every layer input on the original model (fit rows, held-out rows)."""
        from foldonnx.data.activations import TapSession

        axis = {grp.x: grp.members[0].feature_axis for grp in groups}
        dims = {grp.x: grp.n_in for grp in groups}
        graph_inputs = set(feeds)
        taps = [x for x in axis if x not in graph_inputs]
        session = TapSession(model, taps, label="lowrank statistics", threads=ctx.threads)
        stats = {x: (lr.LayerStats(dims[x]), lr.LayerStats(dims[x])) for x in axis}
        pick = self._picker(feeds)
        n = len(held)
        size, _ = self._batch_size(model)
        for sl in self._progress(list(_chunks(n, size)), ctx, "lowrank statistics"):
            batch = {k: v[sl] for k, v in feeds.items()}
            outs = session.run(batch, taps) if taps else {}
            samples = np.arange(sl.start, sl.stop)
            for x, (fit_s, held_s) in stats.items():
                a = outs[x] if x in outs else batch[x]
                for st, mask in ((fit_s, ~held[sl]), (held_s, held[sl])):
                    if mask.any():
                        rows, wt = pick(a[mask], axis[x], samples[mask])  # held-out split by sample
                        st.add(rows, weights=wt)
        return stats

    def _picker(self, feeds: Mapping[str, np.ndarray]) -> _RowPicker:
        c = self.config
        return _RowPicker(c.tokens, c.seed, c.first_token_weight, token_mask(feeds))

    @staticmethod
    def _progress(items: list, ctx: PassContext, desc: str) -> Iterable:
        if not ctx.progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False)

    # -- ranks ------------------------------------------------------------------------------------
    def _ranks(self, groups: Sequence[FactorGroup], total_params: int) -> dict[int, int]:
        """Ranks from rank_ratio / ranks / uniform target_params (the starting point of the
        other allocations: the reference ranks of the sensitivity measurement)."""
        c = self.config
        if c.rank_ratio is not None:
            out = {}
            for grp in groups:
                k = lr.round_rank(c.rank_ratio * grp.max_rank, self._step(grp), min(c.min_rank, grp.max_rank))
                out[grp.id] = k if k <= lr.break_even_rank(grp.n_in, grp.n_out) else grp.max_rank
            return out
        if c.ranks is not None:
            spec = parse_rank_spec(c.ranks)
            out = {}
            for grp in groups:
                v = next(
                    (v for pat, v in spec if any(fnmatch.fnmatchcase(m.node, pat) for m in grp.members)), None
                )
                if v is None:
                    out[grp.id] = grp.max_rank
                    continue
                k = int(v) if v > 1 else int(round(v * grp.max_rank))
                k = min(max(k, 1), grp.max_rank)
                out[grp.id] = k if k <= lr.break_even_rank(grp.n_in, grp.n_out) else grp.max_rank
            return out
        return self._uniform(groups, total_params)

    def _step(self, grp: FactorGroup) -> int:
        return self.config.round_to if grp.max_rank >= 4 * self.config.round_to else 1

    def _uniform(self, groups: Sequence[FactorGroup], total_params: int) -> dict[int, int]:
        """Every group loses the same fraction of its parameters (bisection on the fraction)."""
        c = self.config
        need = c.target_params * total_params

        def ranks_for(f: float) -> tuple[dict[int, int], int]:
            out, saved = {}, 0
            for grp in groups:
                k = lr.round_rank(
                    (1 - f) * grp.dense_params / (grp.n_in + grp.n_out),
                    self._step(grp),
                    min(c.min_rank, grp.max_rank),
                )
                if k > lr.break_even_rank(grp.n_in, grp.n_out):
                    k = grp.max_rank
                out[grp.id] = k
                saved += grp.dense_params - lr.factor_params(k, grp.n_in, grp.n_out)
            return out, saved

        lo, hi = 0.0, 1.0
        best = ranks_for(1.0)
        if best[1] < need:
            raise PassError(
                f"target-params {c.target_params:g} is out of reach: factoring every layer to rank "
                f"{c.min_rank} removes {best[1] / total_params:.3f} of the parameters"
            )
        for _ in range(40):
            mid = (lo + hi) / 2
            r, saved = ranks_for(mid)
            if saved >= need:
                hi, best = mid, (r, saved)
            else:
                lo = mid
        ranks, saved = dict(best[0]), best[1]
        # rank steps are coarse: give back single steps while the target stays reached
        for grp in sorted(groups, key=lambda g: g.dense_params):
            k = ranks[grp.id]
            if k >= grp.max_rank:
                continue
            up = k + self._step(grp)
            if up > lr.break_even_rank(grp.n_in, grp.n_out):
                continue
            gain = lr.factor_params(up, grp.n_in, grp.n_out) - lr.factor_params(k, grp.n_in, grp.n_out)
            if saved - gain >= need:
                ranks[grp.id], saved = up, saved - gain
        for _ in range(len(groups)):  # still a step off: groups leave the rank grid, one at a time
            if saved - need <= TOLERANCE * total_params:
                break
            options = []
            for grp in groups:
                k = ranks[grp.id]
                for up in range(k + 1, min(k + self._step(grp), lr.break_even_rank(grp.n_in, grp.n_out) + 1)):
                    gain = lr.factor_params(up, grp.n_in, grp.n_out) - lr.factor_params(
                        k, grp.n_in, grp.n_out
                    )
                    if saved - gain >= need:
                        options.append((saved - gain, grp.id, up))
            if not options:
                break
            saved, gid, up = min(options)
            ranks[gid] = up
        return ranks

    def _allocate(
        self,
        groups: Sequence[FactorGroup],
        total_params: int,
        fits0: Mapping[int, lr.ReducedRankFit],
        damage: Mapping[int, _DamageModel] | None,
        notes: list[str],
    ) -> dict[int, int]:
        """Greedy over the convex hulls of the groups' (parameters saved, cost) curves; cost =
        sensitivity × whitened truncation error (``sens`` given) or the relative error."""
        c = self.config
        need = c.target_params * total_params
        by_id = {grp.id: grp for grp in groups}
        curves = []
        for grp in groups:
            fit = fits0[grp.id]
            step = self._step(grp)
            be = lr.break_even_rank(grp.n_in, grp.n_out)
            lo = min(c.min_rank, grp.max_rank)
            ks = [k for k in range(lr.round_rank(be, step, lo), lo - 1, -step) if k <= be]
            ks = [grp.max_rank, *sorted(set(ks), reverse=True)]
            losses = np.array([fit.loss(k) for k in ks])
            errs = np.maximum(losses - losses[0], 0.0)
            costs = errs / fit.energy if damage is None else damage[grp.id].cost(errs)
            saved = [grp.dense_params - lr.factor_params(k, grp.n_in, grp.n_out) for k in ks]
            hull = lr.hull_ladder(saved, costs)
            curves.append((grp, step, [grp.max_rank - ks[i] for i in hull], [float(costs[i]) for i in hull]))

        def run(on_grid: bool) -> tuple[dict[int, int], int]:
            ladders = [
                Ladder(
                    grp.id,
                    units,
                    costs,
                    allowed=(lambda u, g=grp, s=step: (g.max_rank - u) % s == 0) if on_grid else None,
                )
                for grp, step, units, costs in curves
            ]
            ledger = _Ledger(by_id)
            try:
                return greedy_allocate(ladders, need, ledger), ledger.removed
            except BudgetError as exc:
                raise PassError(
                    f"target-params {c.target_params:g} is out of reach: every layer at rank {c.min_rank} "
                    f"removes {exc.reached / total_params:.3f} of the parameters"
                ) from None

        units, removed = run(True)
        if abs(removed - need) > TOLERANCE * total_params:  # the last step may leave the rank grid
            units, _ = run(False)
        return {gid: by_id[gid].max_rank - u for gid, u in units.items()}

    # -- sensitivity -----------------------------------------------------------------------------
    def _sensitivity(
        self,
        model: onnx.ModelProto,
        segments: Sequence[Segment],
        groups: Sequence[FactorGroup],
        fits0: Mapping[int, lr.ReducedRankFit],
        ref_ranks: Mapping[int, int],
        total_params: int,
        feeds: Mapping[str, np.ndarray],
        held: np.ndarray,
        ctx: PassContext,
        notes: list[str],
    ) -> tuple[dict[int, int], dict[int, _DamageModel]]:
        """Ranks allocated by measured output damage. Round 1 truncates each group alone at
        its reference (uniform) rank; every further round measures each group again at the
        rank the last allocation gave it, so its damage model (a power law in its own output
        error, fitted to the points measured) holds where it is used."""
        c = self.config
        idx = np.flatnonzero(held) if held.any() else np.arange(len(held))
        probe = _DamageProbe(model, segments, feeds, idx[: max(c.sensitivity_samples, 1)], ctx.threads)
        models = {grp.id: _DamageModel() for grp in groups}
        want = {
            grp.id: max(min(ref_ranks[grp.id], lr.break_even_rank(grp.n_in, grp.n_out)), 1) for grp in groups
        }
        ranks: dict[int, int] = dict(ref_ranks)
        counts: list[int] = []
        for rnd in range(max(c.sensitivity_rounds, 1)):
            todo = []
            for grp in groups:
                k = want[grp.id]
                near = max(self._step(grp), 0.2 * k)  # close to a rank measured: its model holds there
                if k < grp.max_rank and all(abs(k - k0) > near for k0 in models[grp.id].ranks):
                    todo.append((grp, k))
            if not todo:
                break
            for grp, k in self._progress(todo, ctx, f"lowrank sensitivity {rnd + 1}"):
                fit = fits0[grp.id]
                err = fit.loss(k) - fit.loss(grp.max_rank)
                models[grp.id].add(k, err, probe.damage(grp, fit, k))
            ranks = self._allocate(groups, total_params, fits0, models, notes)
            want = {gid: k for gid, k in ranks.items()}
            counts.append(len(todo))
        notes.append(
            f"sensitivity: {' + '.join(map(str, counts))} truncated runs on {probe.n} held-out samples "
            f"({len(counts)} round{'s' if len(counts) > 1 else ''})"
        )
        return ranks, models

    # -- fitting ----------------------------------------------------------------------------------
    def _fit_group(
        self,
        grp: FactorGroup,
        fit_stats: lr.LayerStats,
        held_stats: lr.LayerStats,
        weights: Mapping[int, np.ndarray],
        biases: Mapping[int, np.ndarray | None],
        ranks: Mapping[int, int],
        whitened: lr.ReducedRankFit | None = None,
    ) -> tuple[_GroupFit, int]:
        """The reduced-rank fit at the group's rank, and the second terms tried against it on
        the held-out rows. Returns (fit, number of second terms tried)."""
        c = self.config
        w, b, k = weights[grp.id], biases[grp.id], ranks[grp.id]
        intercept = c.intercept and grp.intercept_ok and b is not None
        has_held = held_stats.n > 0
        judge = held_stats if has_held else fit_stats
        best, best_err, rrf = None, np.inf, None
        white = None
        for mix in self._mixes(fit_stats.paired, has_held):
            if whitened is not None and not fit_stats.paired:
                fit = whitened  # computed for the allocation already
            else:
                fit = lr.reduced_rank_fit(
                    fit_stats, w, b, intercept=intercept, mix=mix, eps=c.eps, white=white
                )
                white = fit.whitener  # the same moments for every mix
            a, bb, delta = fit.factors(k)
            cand = _GroupFit(k, a, bb, delta if intercept else None, variant="none", mix=mix)
            err = lr.quadratic_loss(judge, w, b, cand.dense(), delta)
            if err < best_err:
                best, best_err, rrf = cand, err, fit
        tried = 0
        for variant in self._variants():
            cand = self._second_term(variant, grp, fit_stats, rrf, w, b, k, intercept, best.mix)
            if cand is None:
                continue
            tried += 1
            err = lr.quadratic_loss(judge, w, b, cand.dense(), cand.delta if intercept else b)
            if err < best_err * (1 - 1e-6):
                best, best_err = cand, err
        if best.variant == "none" and not fit_stats.paired:  # from the singular values
            best.train_error = rrf.loss(k) / rrf.energy
        else:
            best.train_error = (
                lr.quadratic_loss(fit_stats, w, b, best.dense(), best.delta if intercept else b) / rrf.energy
            )
        if has_held:
            best.heldout_error = best_err / lr._output_energy(held_stats, w, b)
        return best, tried

    def _whitened(
        self,
        grp: FactorGroup,
        stats: lr.LayerStats,
        weights: Mapping[int, np.ndarray],
        biases: Mapping[int, np.ndarray | None],
    ) -> lr.ReducedRankFit:
        """The one-shot whitened SVD of *grp* (its bias absorbing the mean error where allowed)."""
        c = self.config
        b = biases[grp.id]
        intercept = c.intercept and grp.intercept_ok and b is not None
        return lr.reduced_rank_fit(stats, weights[grp.id], b, intercept=intercept, eps=c.eps)

    def _mixes(self, paired: bool, has_held: bool) -> list[float]:
        """Compensation strengths tried (chosen on the held-out rows)."""
        if not paired:
            return [0.0]
        comp = self.config.compensation
        if comp == "auto":
            return list(MIXES) if has_held else [0.5]
        return [float(comp)]

    def _variants(self) -> list[str]:
        st = self.config.second_term
        return ["columns", "lowrank"] if st == "auto" else ([] if st == "none" else [st])

    def _second_term(
        self,
        variant: str,
        grp: FactorGroup,
        stats: lr.LayerStats,
        rrf: lr.ReducedRankFit,
        w: np.ndarray,
        b: np.ndarray | None,
        k: int,
        intercept: bool,
        mix: float,
    ) -> _GroupFit | None:
        c = self.config
        step = self._step(grp)
        if variant == "columns":
            k2 = k - step
            if k2 < 1:
                return None
            m = (step * (grp.n_in + grp.n_out)) // (grp.n_out + 1)
            if m < 1 or m >= grp.n_in:
                return None
            cols = lr.pick_columns(rrf, stats, k2, m)
            a, bb, r, delta = lr.columns_fit(stats, w, b, k2, cols, intercept=intercept, mix=mix, eps=c.eps)
            return _GroupFit(k2, a, bb, delta if intercept else None, cols, r, "columns", mix=mix)
        if variant == "lowrank":
            k2 = max(step, (k // 4) // step * step)
            if k - k2 < 1:
                return None
            (a1, b1), (a2, b2), delta = lr.split_fit(
                stats, w, b, k - k2, k2, intercept=intercept, mix=mix, eps=c.eps
            )
            return _GroupFit(
                k,
                np.concatenate([a1, a2], 1),
                np.concatenate([b1, b2], 0),
                delta if intercept else None,
                variant="lowrank",
                mix=mix,
            )
        raise UsageError(f"unknown second term {variant!r}")

    def _sequential(
        self,
        model: onnx.ModelProto,
        segments: Sequence[Segment],
        todo: Sequence[FactorGroup],
        weights: Mapping[int, np.ndarray],
        biases: Mapping[int, np.ndarray | None],
        ranks: Mapping[int, int],
        feeds: Mapping[str, np.ndarray],
        held: np.ndarray,
        ctx: PassContext,
    ) -> tuple[dict[int, _GroupFit], int]:
        """Segment by segment: the original's layer inputs and the compressed model's, row
        aligned; each stage of a segment fitted on the compressed inputs against the original
        outputs, then the compressed stream carried to the next segment."""
        c = self.config
        consts = _const_arrays(model)
        todo_ids = {grp.id for grp in todo}
        sweep = _Sweep(self._picker(feeds), held, *self._batch_size(model))
        # the original model's rows are needed for any compensation (one more forward pass)
        paired = c.compensation == "auto" or float(c.compensation) > 0.0
        orig_have: dict[str, np.ndarray] = dict(feeds)
        comp_have: dict[str, np.ndarray] = dict(feeds)
        current: dict[str, np.ndarray] = {}  # the compressed values of the fed tensors
        fits: dict[int, _GroupFit] = {}
        tried = 0
        for seg in self._progress(list(segments), ctx, "lowrank blocks"):
            groups = [grp for grp in seg.groups if grp.id in todo_ids]
            fed = [m.weight for grp in seg.groups for m in grp.members]
            fed += [m.bias for grp in seg.groups for m in grp.members if m.bias is not None and m.bias_free]
            original = {nm: numpy_helper.to_array(consts[nm]) for nm in fed}
            for nm in fed:
                current.setdefault(nm, original[nm])
            start = [seg.cut] if seg.cut else []
            axis = {grp.x: grp.members[0].feature_axis for grp in groups}
            ends = [seg.end_cut] if seg.end_cut else []
            label = f"lowrank block {seg.index}"
            o_full: dict[str, np.ndarray] = {}
            o_rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            if paired:  # the original: every layer input (rows) and the next cut
                o_full, o_rows = sweep.run(model, start, orig_have, original, ends, axis, ctx.threads, label)
            for stage in range(seg.stages):
                sg = [grp for grp in groups if grp.stage == stage]
                if not sg:
                    continue
                s_axis = {grp.x: axis[grp.x] for grp in sg}
                # the compressed model from the latest cached tensors of this segment
                full, c_rows = sweep.run(
                    model, start, comp_have, current, list(s_axis), s_axis, ctx.threads, label
                )
                comp_have.update(full)
                start = [*start, *full]
                for grp in sg:
                    xt, mask, wt = c_rows[grp.x]
                    x0 = o_rows[grp.x][0] if paired else None
                    fit_s, held_s = lr.LayerStats(grp.n_in, paired), lr.LayerStats(grp.n_in, paired)
                    fit_s.add(xt[~mask], None if x0 is None else x0[~mask], wt[~mask])
                    if mask.any():
                        held_s.add(xt[mask], None if x0 is None else x0[mask], wt[mask])
                    fit, t = self._fit_group(grp, fit_s, held_s, weights, biases, ranks)
                    fits[grp.id], tried = fit, tried + t
                    self._install(grp, fit, current, consts)
            if ends:
                c_full, _ = sweep.run(model, start, comp_have, current, ends, {}, ctx.threads, label)
                orig_have = {**feeds, **o_full}
                comp_have = {**feeds, **c_full}
        return fits, tried

    @staticmethod
    def _install(
        grp: FactorGroup,
        fit: _GroupFit,
        current: dict[str, np.ndarray],
        consts: Mapping[str, onnx.TensorProto],
    ) -> None:
        """Put the fitted weights (dense, ``A·B`` + rows) and biases into the fed tensors."""
        w_hat = fit.dense()
        col = 0
        for m in grp.members:
            dtype = numpy_helper.to_array(consts[m.weight]).dtype
            current[m.weight] = _stored_weight(m, w_hat[:, col : col + m.n_out], dtype)
            if fit.delta is not None and m.bias is not None and m.bias_free:
                old = numpy_helper.to_array(consts[m.bias])
                current[m.bias] = _stored_bias(m, fit.delta[col : col + m.n_out], old.shape, old.dtype)
            col += m.n_out

    # -- rewrite ------------------------------------------------------------------------------------
    def _rewrite(
        self,
        model: onnx.ModelProto,
        todo: Sequence[FactorGroup],
        fits: Mapping[int, _GroupFit],
        consts: Mapping[str, onnx.TensorProto],
    ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        """The factored model, and the same model with the fitted weights dense (to check it)."""
        from foldonnx.graph.edit import GraphEditor
        from foldonnx.graph.tensors import ModelTensors

        dense = onnx.ModelProto()
        dense.CopyFrom(model)
        tensors = ModelTensors(dense)
        current: dict[str, np.ndarray] = {}
        for grp in todo:
            self._install(grp, fits[grp.id], current, consts)
        for name, value in current.items():
            tensors.set(name, value)
        ed = GraphEditor(model)
        for grp in todo:
            _rewrite_group(ed, grp, fits[grp.id], consts)
        ed.cleanup()
        out = ed.to_proto()
        del out.graph.value_info[:]
        return out, dense

    def _check(self, dense: onnx.ModelProto, out: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> float:
        """Largest relative difference between the factored model and the fitted weights put in
        dense, on two calibration samples (rounding only, or the rewrite is wrong)."""
        from foldonnx.runtime.session import create_session

        size, fixed = self._batch_size(dense)
        take = fixed or min(2, len(next(iter(feeds.values()))))
        batch = {k: v[:take] for k, v in feeds.items()}
        ya = create_session(dense, "cpu", label="lowrank check").session.run(None, batch)
        yb = create_session(out, "cpu", label="lowrank check").session.run(None, batch)
        worst = 0.0
        for a, b in zip(ya, yb, strict=True):
            if a.dtype.kind != "f":
                continue
            scale = float(np.max(np.abs(a))) + 1e-12
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))) / scale)
        if not np.isfinite(worst) or worst > 1e-2:
            raise PassError(f"the factored model differs from its fitted weights by {worst:.3g} (relative)")
        return worst

    def _layer_report(self, grp: FactorGroup, fit: _GroupFit, sens: float | None) -> LayerReport:
        return LayerReport(
            name=grp.name,
            kind=grp.kind,
            n_in=grp.n_in,
            n_out=grp.n_out,
            rank=fit.rank,
            max_rank=grp.max_rank,
            params_before=grp.dense_params,
            params_after=fit.params(grp.n_in, grp.n_out),
            second_term=fit.variant,
            columns=0 if fit.cols is None else len(fit.cols),
            train_error=None if fit.train_error is None else round(float(fit.train_error), 6),
            heldout_error=None if fit.heldout_error is None else round(float(fit.heldout_error), 6),
            sensitivity=None if sens is None else float(sens),
            compensation=fit.mix,
            members=[m.node for m in grp.members],
        )


def _conv_weight(w_io: np.ndarray, layer: LinearLayer) -> np.ndarray:
    """A ``[in, out]`` matrix as a 1x1 convolution weight ``[out, in, 1, …]``."""
    return np.ascontiguousarray(w_io.T).reshape(w_io.shape[1], w_io.shape[0], *([1] * layer.conv_nd))


def _rewrite_group(ed: Any, grp: FactorGroup, fit: _GroupFit, consts: Mapping[str, onnx.TensorProto]) -> None:
    """``x·W`` → ``(x·A)·B`` (+ ``Gather(x, J)·R``) for every member; outputs keep their names."""
    first = grp.members[0]
    dtype = numpy_helper.to_array(consts[first.weight]).dtype
    base = first.node
    a = fit.a.astype(dtype)
    if first.op == "Conv":
        w_a = ed.initializer(_conv_weight(a, first), f"{base}/lowrank_a_weight")
        h = ed.node("Conv", [first.x, w_a], name=f"{base}/lowrank_a", attributes=first.conv_attrs)[0]
    else:
        h = ed.matmul(first.x, a, name=f"{base}/lowrank_a")
    gathered = None
    if fit.cols is not None:
        idx = ed.initializer(np.asarray(fit.cols, np.int64), f"{base}/lowrank_cols")
        axis = 1 if first.op == "Conv" else -1
        gathered = ed.node(
            "Gather", [first.x, idx], name=f"{base}/lowrank_gather", attributes={"axis": axis}
        )[0]
    col = 0
    for m in grp.members:
        sl = slice(col, col + m.n_out)
        col += m.n_out
        delta = None if fit.delta is None else fit.delta[sl]
        new_bias = None
        if delta is not None and m.bias is not None and m.bias_free:
            old = numpy_helper.to_array(consts[m.bias])
            new_bias = ed.initializer(_stored_bias(m, delta, old.shape, old.dtype), f"{m.node}/lowrank_bias")
        y = _second_factor(ed, m, h, fit.b[:, sl].astype(dtype), new_bias)
        if gathered is not None:
            r = fit.r[:, sl].astype(dtype)
            if m.op == "Conv":
                w_r = ed.initializer(_conv_weight(r, m), f"{m.node}/lowrank_rows_weight")
                z = ed.node("Conv", [gathered, w_r], name=f"{m.node}/lowrank_rows", attributes=m.conv_attrs)[
                    0
                ]
            else:
                z = ed.matmul(gathered, r, name=f"{m.node}/lowrank_rows")
            y = ed.add(y, z, name=f"{m.node}/lowrank_sum")
        _take_over(ed, m.y, y)
        if new_bias is not None and m.op == "MatMul":  # the bias Add keeps its place, new constant
            add = next(node for node in ed.graph if node.name == m.bias_node)
            for i, v in enumerate(add.inputs):
                if v is not None and v.name == m.bias:
                    add.replace_input_with(i, new_bias)


def _second_factor(ed: Any, m: LinearLayer, h: Any, b: np.ndarray, new_bias: Any) -> Any:
    """The second factor of member *m* applied to ``h = x·A``; Gemm and Conv keep their bias
    input (*new_bias* when the fit changed it)."""
    if m.op == "MatMul":
        return ed.matmul(h, b, name=f"{m.node}/lowrank_b")
    bias = new_bias if new_bias is not None else m.bias
    if m.op == "Gemm":
        w = ed.initializer(np.ascontiguousarray(b.T) if m.trans_b else b, f"{m.node}/lowrank_b_weight")
        attrs: dict[str, Any] = {"transB": int(m.trans_b)}  # A·B holds alpha·W
        if bias is not None:
            attrs["beta"] = m.beta
        return ed.node(
            "Gemm",
            [h, w] + ([bias] if bias is not None else []),
            name=f"{m.node}/lowrank_b",
            attributes=attrs,
        )[0]
    w = ed.initializer(_conv_weight(b, m), f"{m.node}/lowrank_b_weight")
    return ed.node("Conv", [h, w] + ([bias] if bias is not None else []), name=f"{m.node}/lowrank_b")[0]


def _take_over(ed: Any, old_name: str, new: Any) -> None:
    """Consumers of tensor *old_name* read *new*, which takes the old name too."""
    old = ed.value(old_name)
    was_output = old.is_graph_output()
    ed.replace_uses(old, new)
    if not was_output:  # replace_uses renames graph outputs itself
        keep = old.name
        old.name = ed.fresh(f"{keep}_dense")
        new.name = keep
        ed.reindex()


register_pass(LowRankPass)
