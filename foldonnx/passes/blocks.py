"""Transformer-block approximation (TBA / TOAST, Cannistraci et al., arXiv 2410.04941): replace a
run of consecutive blocks by one linear map between the residual-stream tensors around them,
fitted in closed form on calibration images — no training.

:class:`BlocksPass` (registered as ``blocks``; ``fold-onnx approx-blocks``; recipe step
``blocks``; ``sweep --methods blocks --axis params``) works on any graph whose blocks
:func:`foldonnx.analysis.blocks.find_blocks` finds (pre-LN ViTs, the foreign DINOv2 export,
open_clip, SAM's windowed ``[B, H, W, C]`` blocks, post-LN BERT / MiniLM).

Stages of one run:

1. **Statistics** — one streaming pass of the calibration set through the model, the stream
   tapped at every boundary the run needs. Of each image, the first token (a ViT's CLS) and
   ``tokens`` others drawn at random feed :class:`BoundaryStats`: ``[X 1]ᵀ[X 1]`` per boundary,
   ``[X_i 1]ᵀX_j`` per candidate span, the mean row cosine of every pair of boundaries — never
   the activations themselves. Every ``1/holdout``-th image goes to a held-out part.
2. **Choice** (``target_params``) — every span (i, j) of up to the budget's block count is a
   candidate, scored by the cosine between its input and output, linear CKA, and its held-out
   fit error; sets of disjoint spans whose removal is closest to the target are ranked by each
   criterion (the sum over their spans); with ``select="e2e"`` the best sets of the cheap
   criteria are shortlisted and decided by the end-to-end fidelity of the patched model on the
   held-out images: the stream at every boundary is cached for them once, and scoring a set
   only runs the part of the model after its first span. Every criterion's choice is reported.
3. **Fit** — per span, ``Y ≈ X·T + b`` by ridge least squares toward the identity ("skip the
   blocks"; the identity itself is a candidate, so a block that is an exact identity is
   replaced exactly), the ridge strength chosen on the held-out part; ``map="lowrank:R"`` /
   ``"id+lowrank:R"`` keep the best rank-R map ``A·B`` / ``I + A·B`` (reduced-rank regression).
   With ``sequential``, each later span is fitted on the activations of the model with the
   earlier spans already replaced.
4. **Rewrite** (:func:`replace_spans`) — the nodes between the two boundary tensors are deleted,
   ``MatMul`` + ``Add`` (or the low-rank pair) inserted, consumers rewired; the new output takes
   the old boundary tensor's name, every other node and name is kept.

Measured on the real DINOv2-S backbone (calibration ``offdomain:256``, CLS cosine on 41 real
photos — imagenet20 and the scikit-image photos — never used to fit or choose; with this few
photos a difference under ~0.03 is noise; full tables in ``benchmarks/blocks.md``):

* ridge toward the identity vs toward zero at the same α = 0.1: blocks 4: 0.922 vs 0.849,
  blocks 10: 0.916 vs 0.879, blocks 10-11: 0.825 vs 0.820 (equal at α ≤ 0.01);
* first token weighted as all other picked tokens together vs unweighted: blocks 11 0.866 vs
  0.817, blocks 10-11 0.825 vs 0.772, middle spans within ±0.01;
* 64 token rows per image vs all 257: identical to ±0.002 on six spans (hence the default);
* an extra token-mean or CLS input to the map, or a map on the LayerNorm-ed stream: no gain
  beyond ±0.01 except on the last block; sequential vs independent fits of several spans:
  within ±0.01 (2 blocks as 2,4: 0.784 vs 0.785; ten pairs of single blocks: mean −0.001), so
  ``sequential`` is off by default;
* the calibration domain is what limits the fit: the same spans reach 0.94–0.98 on held-out
  *calibration* images, 0.81–0.92 on the photos;
* choice criteria, CLS cosine of each one's pick at 1 / 2 / 3 / 4 blocks — e2e: 0.908 / 0.785 /
  0.768 / 0.725, fit error: 0.913 / 0.744 / 0.725 / 0.717, cosine: 0.897 / 0.813 / 0.768 /
  0.725, CKA: 0.908 / 0.796 / 0.757 / 0.719; with 256 CIFAR crops as calibration — e2e: 0.921 /
  0.845 / 0.803 / 0.790, fit: 0.922 / 0.774 / 0.728 / 0.681, cosine: 0.900 / 0.812 / 0.799 /
  0.780, CKA: 0.926 / 0.812 / 0.793 / 0.769. End-to-end is best or within noise of the best
  in 7 of 8 cells (the fit error alone picks the first blocks, whose errors grow downstream),
  hence the default.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from foldonnx.analysis.blocks import BlockStack, Span, find_blocks, format_spans, parse_block_spec
from foldonnx.data.activations import DEFAULT_BATCH, Reducer, SubgraphRunner, extract_subgraph
from foldonnx.errors import PassError, UsageError
from foldonnx.numerics.lsq import ALPHAS, LsqStats, bias_correction, choose_refit, lsq_error
from foldonnx.passes.base import Change, Pass, PassContext, PassReport
from foldonnx.passes.config import PassConfig, check_fraction, option
from foldonnx.passes.registry import register_pass

__all__ = [
    "BlocksPass",
    "BlocksConfig",
    "BlocksReport",
    "SpanCandidate",
    "SpanMap",
    "BoundaryStats",
    "RowPicker",
    "MapKind",
    "parse_map",
    "fit_map",
    "linear_cka",
    "relative_error",
    "output_fidelity",
    "replace_spans",
    "approx_blocks",
    "BlockPlanner",
    "max_blocks_for",
    "calibration_for",
    "SELECT_CRITERIA",
]

logger = logging.getLogger(__name__)

#: block-set choice criteria: cheap ones score spans from the statistics, e2e runs the model
SELECT_CRITERIA = ("e2e", "fit", "cosine", "cka")
_CHEAP = ("fit", "cosine", "cka")
#: held-out streams cached for end-to-end scoring, at most this many bytes
_E2E_CACHE_BYTES = 1 << 30
#: at most this many block sets are enumerated per block count (larger models: fewer spans)
_MAX_SETS = 20000


# ------------------------------------------------------------------------------------------
# numerics (pure numpy)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapKind:
    """``linear`` (a full D×D map), ``lowrank`` (``A·B`` of rank R) or ``id+lowrank`` (``I + A·B``)."""

    kind: str = "linear"
    rank: int | None = None

    def params(self, d: int) -> int:
        """Parameters the map adds (weights and bias) for a stream of width *d*."""
        if self.kind == "linear" or self.rank is None:
            return d * d + d
        return 2 * d * self.rank + d

    def __str__(self) -> str:
        return self.kind if self.rank is None else f"{self.kind}:{self.rank}"


def parse_map(spec: str) -> MapKind:
    """``linear`` | ``lowrank:R`` | ``id+lowrank:R`` → :class:`MapKind`."""
    text = str(spec).strip().lower()
    if text == "linear":
        return MapKind()
    m = re.fullmatch(r"(lowrank|id\+lowrank):(\d+)", text)
    if not m or int(m.group(2)) < 1:
        raise UsageError(f"bad map {spec!r} (expected linear, lowrank:R or id+lowrank:R with R >= 1)")
    return MapKind(m.group(1), int(m.group(2)))


class RowPicker:
    """Which rows of a boundary tensor the statistics see: per sample the first token and
    *tokens* others drawn at random (seeded per batch, the same rows for every boundary), with
    the first token weighted (``cls_weight``: None = as much as all the others together; a
    number = that weight; 1 = unweighted). A ``[B, H, W, C]`` grid has no class token: rows
    are drawn from all positions, unweighted."""

    def __init__(self, layout: str, tokens: int | None, cls_weight: float | None, seed: int = 0) -> None:
        self.layout = layout
        self.tokens = tokens
        self.cls_weight = cls_weight
        self.seed = seed

    def pick(self, shape: tuple[int, ...], batch_index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(row indices ``[B, k]`` into the flattened positions, or None for all; row weights
        ``[k]`` or None)."""
        b = shape[0]
        t = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        rng = np.random.default_rng((self.seed, batch_index))
        cls = self.layout == "tokens" and t > 1
        idx = None
        if self.tokens is not None and t > self.tokens + int(cls):
            if cls:
                rest = np.argsort(rng.random((b, t - 1)), axis=1)[:, : self.tokens] + 1
                idx = np.concatenate([np.zeros((b, 1), np.int64), rest], axis=1)
            else:
                idx = np.argsort(rng.random((b, t)), axis=1)[:, : self.tokens]
        k = t if idx is None else idx.shape[1]
        if not cls or self.cls_weight == 1.0:
            return idx, None
        w = np.ones(k)
        w[0] = float(max(k - 1, 1)) if self.cls_weight is None else float(self.cls_weight)
        return idx, w

    @staticmethod
    def take(a: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
        """Rows ``[n, D]`` of *a* at the picked positions."""
        a = np.asarray(a)
        flat = a.reshape(a.shape[0], -1, a.shape[-1])
        if idx is not None:
            flat = np.take_along_axis(flat, idx[:, :, None], axis=1)
        return flat.reshape(-1, a.shape[-1])


class BoundaryStats:
    """Sufficient statistics of every candidate span between boundary tensors, in two parts
    (``fit`` and ``held``): ``[X_i 1]ᵀ[X_i 1]`` and ``ΣX_i²`` per boundary, ``[X_i 1]ᵀX_j`` per
    pair in *pairs*, and the weighted sum of row cosines of every pair of boundaries."""

    PARTS = ("fit", "held")

    def __init__(self, n_boundaries: int, pairs: Sequence[tuple[int, int]]) -> None:
        self.n = n_boundaries
        self.pairs = sorted(set(pairs))
        self.gram: dict[str, dict[int, np.ndarray]] = {p: {} for p in self.PARTS}
        self.yy: dict[str, dict[int, float]] = {p: {} for p in self.PARTS}
        self.cross: dict[str, dict[tuple[int, int], np.ndarray]] = {p: {} for p in self.PARTS}
        self.cos_sum = np.zeros((n_boundaries, n_boundaries))
        self.weight = 0.0
        self.seen: set[int] = set()
        self.needed = sorted({i for pair in self.pairs for i in pair})

    def add(self, part: str, rows: Mapping[int, np.ndarray], weights: np.ndarray | None = None) -> None:
        """Add rows ``{boundary: [n, D]}`` (the same rows of every boundary) to *part*."""
        any_rows = next(iter(rows.values()))
        n = len(any_rows)
        w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        wt = w[:, None]
        aug = {}
        for i, r in rows.items():
            r64 = np.asarray(r, np.float64)
            aug[i] = np.concatenate([r64, np.ones((n, 1))], axis=1)
        for i in self.needed:
            if i not in aug:
                continue
            a = aug[i]
            g = (a * wt).T @ a
            yy = float((wt * a[:, :-1] ** 2).sum())
            if i in self.gram[part]:
                self.gram[part][i] += g
                self.yy[part][i] += yy
            else:
                self.gram[part][i], self.yy[part][i] = g, yy
        for i, j in self.pairs:
            if i in aug and j in aug:
                c = (aug[i] * wt).T @ aug[j][:, :-1]
                if (i, j) in self.cross[part]:
                    self.cross[part][(i, j)] += c
                else:
                    self.cross[part][(i, j)] = c
        # row cosines of every pair of boundaries present
        keys = sorted(rows)
        self.seen.update(keys)
        unit = {}
        for i in keys:
            r = np.asarray(rows[i], np.float64)
            unit[i] = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        for a_i, i in enumerate(keys):
            for j in keys[a_i + 1 :]:
                c = float((w * (unit[i] * unit[j]).sum(1)).sum())
                self.cos_sum[i, j] += c
                self.cos_sum[j, i] += c
        self.weight += float(w.sum())

    def lsq(self, i: int, j: int, part: str = "fit") -> LsqStats:
        """:class:`LsqStats` of ``X_j ≈ X_i·T + b`` on *part* (``"all"``: both parts; an empty
        held-out part when every image was fitted)."""
        s = LsqStats()
        for p in self.PARTS if part == "all" else (part,):
            if (i, j) not in self.cross[p]:
                continue
            one = LsqStats()
            one.gram, one.cross, one.yy = self.gram[p][i], self.cross[p][(i, j)], self.yy[p][j]
            s += one
        if s.gram is None and part != "held":
            raise PassError(f"no statistics for the span from boundary {i} to {j}")
        return s

    def cosine_matrix(self) -> np.ndarray:
        """Mean (weighted) row cosine between every pair of boundaries (1 on the diagonal, NaN
        for boundaries the statistics did not see)."""
        m = self.cos_sum / max(self.weight, 1e-12)
        np.fill_diagonal(m, 1.0)
        unseen = [i for i in range(self.n) if i not in self.seen]
        m[unseen, :] = np.nan
        m[:, unseen] = np.nan
        return m

    def cka(self, i: int, j: int) -> float:
        """Linear CKA between boundaries *i* and *j* over all rows (both parts)."""
        gi = sum(self.gram[p][i] for p in self.PARTS if i in self.gram[p])
        gj = sum(self.gram[p][j] for p in self.PARTS if j in self.gram[p])
        cij = sum(self.cross[p][(i, j)] for p in self.PARTS if (i, j) in self.cross[p])
        return linear_cka(gi, gj, cij)


def linear_cka(gram_x: np.ndarray, gram_y: np.ndarray, cross_xy: np.ndarray) -> float:
    """Linear CKA from the augmented statistics ``[X 1]ᵀ[X 1]``, ``[Y 1]ᵀ[Y 1]``, ``[X 1]ᵀY``:
    ``‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`` with centred X̃, Ỹ."""
    n = max(float(gram_x[-1, -1]), 1e-12)
    mx, my = gram_x[-1, :-1] / n, gram_y[-1, :-1] / n
    cx = gram_x[:-1, :-1] - n * np.outer(mx, mx)
    cy = gram_y[:-1, :-1] - n * np.outer(my, my)
    cxy = cross_xy[:-1] - n * np.outer(mx, my)
    den = float(np.linalg.norm(cx) * np.linalg.norm(cy))
    return float(np.sum(cxy * cxy) / den) if den > 0 else 0.0


def relative_error(stats: LsqStats, w: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of ``X·W + b`` relative to the variance of Y (1 − R²)."""
    n = max(stats.rows, 1e-12)
    mu_y = stats.cross[-1] / n
    var = stats.yy / n - float(mu_y @ mu_y)
    return lsq_error(stats, w, b) / max(var, 1e-12)


@dataclass
class MapFit:
    """A fitted span map ``Y ≈ X·W + b`` (``W = I + A·B`` or ``A·B`` for the low-rank kinds)."""

    weight: np.ndarray  # the full D×D map (what the statistics judge)
    bias: np.ndarray
    label: str  # which candidate won: none / bias / ridgeα / ...
    held_error: float  # relative held-out error
    factors: tuple[np.ndarray, np.ndarray] | None = None  # (A, B) of the low-rank kinds


def fit_map(
    train: LsqStats,
    held: LsqStats | None,
    *,
    prior: str = "identity",
    kind: MapKind = MapKind(),
    alphas: tuple[float, ...] = ALPHAS,
) -> MapFit:
    """Fit one span map on *train*, the ridge strength chosen on *held* (see module docstring).

    ``prior="identity"`` pulls toward ``W = I`` (the identity plus bias and the identity alone
    are candidates), ``"zero"`` toward 0 (plain ridge)."""
    d = train.cross.shape[1]
    w0 = np.eye(d) if prior == "identity" else np.zeros((d, d))
    w, b, label, _ = choose_refit(train, held, w0, "ridge", alphas)
    if kind.kind != "linear" and kind.rank is not None and kind.rank < d:
        full = LsqStats()
        full += train
        if held is not None:
            full += held
        base = np.eye(d) if kind.kind == "id+lowrank" else np.zeros((d, d))
        a, bb = _reduced_rank(full, w - base, base, kind.rank)
        w = base + a @ bb
        b = bias_correction(full, w)
        label = f"{label} rank {kind.rank}"
        judge = held if held is not None and held.rows else train
        return MapFit(w, b, label, relative_error(judge, w, b), (a, bb))
    judge = held if held is not None and held.rows else train
    return MapFit(w, b, label, relative_error(judge, w, b))


def _reduced_rank(
    stats: LsqStats, delta: np.ndarray, base: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """The rank-*rank* part ``A·B`` of ``base + delta`` that keeps the most of the fitted
    values: ``delta`` projected on the top right singular directions of ``X̃·delta`` (reduced-
    rank regression on the centred rows)."""
    n = max(stats.rows, 1e-12)
    mu = stats.gram[-1, :-1] / n
    gc = stats.gram[:-1, :-1] - n * np.outer(mu, mu)
    m = delta.T @ gc @ delta
    evals, evecs = np.linalg.eigh((m + m.T) / 2)
    v = evecs[:, np.argsort(evals)[::-1][:rank]]
    return delta @ v, v.T


def output_fidelity(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """End-to-end fidelity of a patched model: per output, the mean cosine per sample; for
    token outputs ``[N, T, D]`` the mean of the first-token cosine and the mean token cosine."""
    scores = []
    for r, c in zip(reference, candidate, strict=True):
        r = np.asarray(r, np.float64)
        c = np.asarray(c, np.float64)
        if r.ndim == 3 and r.shape[1] > 1:
            scores.append(0.5 * _cos(r[:, 0], c[:, 0]).mean() + 0.5 * _cos(r, c).mean())
        else:
            scores.append(_cos(r.reshape(len(r), -1), c.reshape(len(c), -1)).mean())
    return float(np.mean(scores))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na * nb, 1e-12)


# ------------------------------------------------------------------------------------------
# rewrite
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanMap:
    """What replaces a span: blocks ``first..last``, the boundary tensors around them, the map."""

    first: int
    last: int
    start: str
    end: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    factors: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    identity_plus: bool = False


def replace_spans(
    model: onnx.ModelProto, maps: Sequence[SpanMap], dtype: Any = np.float32
) -> onnx.ModelProto:
    """*model* with the nodes of every span deleted and its map inserted between the boundary
    tensors (in order; a span that starts where another ends reads that one's map output).
    The map's output takes the end boundary's name. The input model is not modified."""
    from foldonnx.graph.edit import GraphEditor

    ed = GraphEditor(model)
    renamed: dict[str, str] = {}
    for sm in sorted(maps, key=lambda s: s.first):
        start = renamed.get(sm.start, sm.start)
        tag = f"tba/blocks_{sm.first}_{sm.last}"
        x = ed.value(start)
        if sm.factors is not None:
            a, b = sm.factors
            h = ed.matmul(x, np.asarray(a, dtype), name=f"{tag}/down")
            y = ed.matmul(h, np.asarray(b, dtype), name=f"{tag}/up")
            if sm.identity_plus:
                y = ed.node("Add", [x, y], name=f"{tag}/skip")[0]
        else:
            y = ed.matmul(x, np.asarray(sm.weight, dtype), name=f"{tag}/map")
        y = ed.add(y, np.asarray(sm.bias, dtype), name=f"{tag}/add")
        old = ed.value(sm.end)
        was_output = any(v is old for v in ed.graph.outputs)
        ed.remove_span(start, sm.end, y)
        if not was_output and not ed.has(sm.end):
            y.name = sm.end  # the boundary keeps its name
            ed.reindex()
        renamed[sm.end] = y.name
    ed.cleanup()
    return ed.to_proto()


# ------------------------------------------------------------------------------------------
# the pass
# ------------------------------------------------------------------------------------------


def _map_text(value: Any) -> str:
    return str(value)


def _blocks_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class BlocksConfig(PassConfig):
    """Options of the block approximation (CLI flags of ``approx-blocks``, recipe options)."""

    blocks: str | None = option(
        None, "blocks to replace: N-M spans, comma-separated (e.g. 9-11 or 8-9,11)", metavar="SPEC",
        parse=_blocks_text,
    )  # fmt: skip
    target_params: float | None = option(
        None, "fraction of the parameters to remove: the spans are chosen automatically", metavar="F"
    )
    select: str = option("e2e", "how spans are chosen for --target-params", choices=SELECT_CRITERIA)
    shortlist: int = option(8, "block sets shortlisted for the end-to-end choice (select e2e)", metavar="K")
    e2e_images: int = option(32, "held-out images the end-to-end choice runs on", metavar="N")
    map: str = option(
        "linear", "the map: linear (D x D + bias), lowrank:R or id+lowrank:R", metavar="KIND", parse=_map_text
    )
    prior: str = option("identity", "ridge toward the identity (skip the blocks) or toward zero",
                        choices=("identity", "zero"))  # fmt: skip
    cls_weight: float | None = option(
        None, "weight of the first (class) token's rows; default: as much as all other rows of the image"
    )
    sequential: bool = option(
        False, "fit later spans on the activations of the model with the earlier spans replaced"
    )
    calib_limit: int = option(256, "calibration images used", metavar="N")
    holdout: float = option(0.25, "fraction of the calibration images held out (ridge, choice)")
    tokens: int | None = option(64, "token rows per image in the statistics besides the first (none: all)")
    batch: int = option(DEFAULT_BATCH, "calibration batch size", metavar="N")
    seed: int = option(0, "seed of the token sampling")

    def validate(self) -> None:
        if self.blocks is None and self.target_params is None:
            raise UsageError("blocks: give the blocks to replace (--blocks 9-11) or --target-params F")
        if self.blocks is not None and self.target_params is not None:
            raise UsageError("blocks: give either --blocks or --target-params, not both")
        if self.blocks is not None:
            parse_block_spec(self.blocks)
        check_fraction(self.target_params, "target-params")
        parse_map(self.map)
        if not 0.0 < self.holdout < 1.0:
            raise UsageError(f"holdout must be in (0, 1), got {self.holdout:g}")
        if self.calib_limit < 4:
            raise UsageError(f"calib-limit must be at least 4, got {self.calib_limit}")
        if self.e2e_images < 1:
            raise UsageError(f"e2e-images must be positive, got {self.e2e_images}")
        if self.shortlist < 1:
            raise UsageError(f"shortlist must be at least 1, got {self.shortlist}")
        if self.tokens is not None and self.tokens < 1:
            raise UsageError(f"tokens must be positive, got {self.tokens}")
        if self.batch < 1:
            raise UsageError(f"batch must be positive, got {self.batch}")
        if self.cls_weight is not None and self.cls_weight < 0:
            raise UsageError(f"cls-weight must be >= 0, got {self.cls_weight:g}")


@dataclass
class SpanCandidate:
    """One candidate span and its scores (boundary cosine, CKA, held-out fit error, params)."""

    first: int
    last: int
    cosine: float
    cka: float
    fit_error: float
    params_removed: int

    @property
    def text(self) -> str:
        return format_spans([(self.first, self.last)])


@dataclass
class SpanReport:
    """A span replaced: its blocks, the map and how well it fits."""

    first: int
    last: int
    start: str
    end: str
    params_removed: int  # the blocks' parameters (the map's not subtracted)
    map_params: int
    map: str
    fit: str  # the ridge candidate that won
    held_error: float  # relative held-out error (1 - R²)
    fitted_on: str  # "original" or "patched" (sequential)


@dataclass
class BlocksReport(PassReport):
    """The blocks found, every candidate and criterion (target mode), the spans replaced."""

    blocks_found: int = 0
    norm: str = ""
    layout: str = ""
    width: int = 0
    spans: list[SpanReport] = field(default_factory=list)
    candidates: list[SpanCandidate] = field(default_factory=list)
    #: criterion -> the block set it chose ("9-10,11") and, when scored, its e2e fidelity
    choices: dict[str, str] = field(default_factory=dict)
    e2e_scores: dict[str, float] = field(default_factory=dict)
    select: str | None = None
    similarity: list[list[float]] = field(default_factory=list)  # cosine between boundaries
    calib_images: int = 0
    held_images: int = 0
    seconds_stats: float = 0.0
    seconds_select: float = 0.0
    seconds_fit: float = 0.0

    def changes(self) -> list[Change]:
        out = []
        for s in self.spans:
            n = s.last - s.first + 1
            what = f"blocks {format_spans([(s.first, s.last)])}"
            out.append(
                Change(
                    what=what,
                    kind="span",
                    before=f"{n} block{'s' if n > 1 else ''}, {s.params_removed} params",
                    after=f"{s.map} map, {s.map_params} params",
                    detail={"fit": s.fit, "held_error": s.held_error, "fitted_on": s.fitted_on},
                )
            )
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlocksReport:
        vals = cls._field_values(d)
        vals["spans"] = [SpanReport(**s) for s in d.get("spans", [])]
        vals["candidates"] = [SpanCandidate(**c) for c in d.get("candidates", [])]
        return cls(**vals)


class _Collector(Reducer):
    """Feeds :class:`BoundaryStats` (fit / held-out by image) and caches the held-out images'
    streams and outputs for end-to-end scoring."""

    def __init__(
        self,
        taps: Sequence[tuple[int, str]],
        stats: BoundaryStats,
        picker: RowPicker,
        held: np.ndarray,
        cache_names: Sequence[str],
        cache_ids: np.ndarray,
        batch: int,
    ) -> None:
        self.taps = list(taps)
        self.inputs = (*(name for _, name in self.taps), *cache_names)
        self.stats = stats
        self.picker = picker
        self.held = held
        self.cache_names = list(cache_names)
        self.cache_ids = {int(i) for i in cache_ids}
        self.cache: dict[str, list[np.ndarray]] = {n: [] for n in self.cache_names}
        self.batch = batch

    def update(self, values: Sequence[np.ndarray], batch_index: int) -> None:
        vals = [np.asarray(v) for v in values]
        n = len(vals[0])
        ids = np.arange(batch_index * self.batch, batch_index * self.batch + n)
        idx, w = self.picker.pick(vals[0].shape, batch_index)
        held = self.held[ids]
        for part, mask in (("fit", ~held), ("held", held)):
            if not mask.any():
                continue
            sel = None if idx is None else idx[mask]
            rows = {b: RowPicker.take(v[mask], sel) for (b, _), v in zip(self.taps, vals, strict=False)}
            self.stats.add(part, rows, None if w is None else np.tile(w, int(mask.sum())))
        keep = np.array([int(i) in self.cache_ids for i in ids])
        if keep.any():
            for name, v in zip(self.cache_names, vals[len(self.taps) :], strict=True):
                self.cache[name].append(v[keep])

    def cached(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.cache.items() if v}


class _PairReducer(Reducer):
    """Statistics of one span between the patched model's stream (x) and the original's (y)."""

    def __init__(
        self, x: tuple[str, str], y: tuple[str, str], picker: RowPicker, held: np.ndarray, batch: int
    ) -> None:
        self.inputs = (x, y)
        self.picker = picker
        self.held = held
        self.batch = batch
        self.parts = {"fit": LsqStats(), "held": LsqStats()}

    def update(self, values: Sequence[np.ndarray], batch_index: int) -> None:
        x, y = (np.asarray(v) for v in values)
        n = len(x)
        ids = np.arange(batch_index * self.batch, batch_index * self.batch + n)
        idx, w = self.picker.pick(x.shape, batch_index)
        held = self.held[ids]
        for part, mask in (("fit", ~held), ("held", held)):
            if mask.any():
                sel = None if idx is None else idx[mask]
                ww = None if w is None else np.tile(w, int(mask.sum()))
                self.parts[part].add(RowPicker.take(x[mask], sel), RowPicker.take(y[mask], sel), ww)


def _truncate(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The part of *model* that computes *output* from the graph inputs (all of them declared)."""
    inits = {t.name for t in model.graph.initializer}
    return extract_subgraph(model, [i.name for i in model.graph.input if i.name not in inits], [output])


class BlockPlanner:
    """Calibration statistics of a model's blocks, gathered once; spans chosen and fitted from
    them as often as wanted (the pass does it once; benchmarks compare criteria and budgets).

    *max_blocks*: the longest span that is a candidate (None: only the spans of *spans*);
    *spans*: spans whose statistics are needed besides; *e2e*: cache the held-out images'
    streams and outputs for end-to-end scoring."""

    def __init__(
        self,
        model: onnx.ModelProto,
        config: BlocksConfig,
        feeds: Mapping[str, np.ndarray],
        *,
        stack: BlockStack | None = None,
        max_blocks: int | None = None,
        spans: Sequence[Span] = (),
        e2e: bool = False,
        ctx: PassContext | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.ctx = ctx or PassContext()
        self.stack = stack or find_blocks(model)
        self.kind = parse_map(config.map)
        self.feeds = feeds
        self.bounds = list(self.stack.boundaries)
        n_b = len(self.bounds)
        pairs = {(a, b + 1) for a, b in spans}
        if max_blocks is not None:
            pairs |= {(i, j) for i in range(n_b) for j in range(i + 1, min(n_b, i + max_blocks + 1))}
        self.n = len(next(iter(feeds.values())))
        step = max(2, int(round(1.0 / config.holdout)))
        # fewer than 4 images: no held-out part (the ridge is judged on the fit rows)
        self.held = np.arange(self.n) % step == 0 if self.n >= 4 else np.zeros(self.n, bool)
        self.picker = RowPicker(self.stack.layout, config.tokens, config.cls_weight, config.seed)
        self.stats = BoundaryStats(n_b, sorted(pairs))
        self.outputs = [o.name for o in model.graph.output]
        self.cache_ids = self._cache_images() if e2e else np.zeros(0, np.int64)
        # every boundary up to the last one a span needs (the similarity matrix shows them all)
        needed = list(range(max(j for _, j in pairs) + 1)) if pairs else [0]
        t0 = time.perf_counter()
        self.ctx.say(f"blocks: statistics at {len(needed)} boundaries on {self.n} images")
        cache_names = [*self.bounds, *self.outputs] if len(self.cache_ids) else []
        taps = [(i, self.bounds[i]) for i in needed]
        collector = _Collector(
            taps, self.stats, self.picker, self.held, cache_names, self.cache_ids, config.batch
        )
        from foldonnx.data.activations import reduce_activations

        run_model = model if len(self.cache_ids) else _truncate(model, self.bounds[max(needed)])
        reduce_activations(
            {"model": run_model}, feeds, [collector], batch=config.batch, threads=self.ctx.threads,
            progress=self.ctx.progress, desc="blocks: calibration",
        )  # fmt: skip
        self.seconds_stats = time.perf_counter() - t0
        self._scorer = (
            _EndToEnd(model, self.stack, collector.cached(), feeds, self.cache_ids, config.batch, self.ctx)
            if len(self.cache_ids)
            else None
        )
        self._fits: dict[Span, MapFit] = {}

    def _cache_images(self) -> np.ndarray:
        ids = np.flatnonzero(self.held)
        per_image = 4 * (len(self.bounds) + 1) * int(np.prod(self.stack.shape[1:]))
        keep = max(4, min(len(ids), self.config.e2e_images, _E2E_CACHE_BYTES // max(per_image, 1)))
        if keep < len(ids):
            logger.info("end-to-end scoring on %d of %d held-out images (cache limit)", keep, len(ids))
        return ids[:keep]

    @property
    def map_params(self) -> int:
        return self.kind.params(self.stack.width)

    def span_fit(self, span: Span) -> MapFit:
        """The map of *span* fitted on the fit part, its ridge chosen on the held-out part."""
        if span not in self._fits:
            i, j = span[0], span[1] + 1
            held = self.stats.lsq(i, j, "held")
            self._fits[span] = fit_map(
                self.stats.lsq(i, j, "fit"),
                held if held.rows else None,
                prior=self.config.prior,
                kind=self.kind,
            )
        return self._fits[span]

    def candidates(self) -> dict[Span, SpanCandidate]:
        """Every candidate span with its boundary cosine, CKA, held-out fit error and size."""
        sims = self.stats.cosine_matrix()
        out = {}
        for i, j in self.stats.pairs:
            span = (i, j - 1)
            out[span] = SpanCandidate(
                first=i, last=j - 1, cosine=round(float(sims[i, j]), 5), cka=round(self.stats.cka(i, j), 5),
                fit_error=round(self.span_fit(span).held_error, 6),
                params_removed=self.stack.span_params(span),
            )  # fmt: skip
        return out

    def e2e(self, spans: Sequence[Span]) -> float:
        """End-to-end fidelity on the held-out images with *spans* replaced (maps fitted on the
        fit part)."""
        if self._scorer is None:
            raise PassError("end-to-end scoring needs the held-out streams (e2e=True)")
        return self._scorer.score([(a, b, self.span_fit((a, b))) for a, b in spans])

    def choose(self, target: float, select: str, report: BlocksReport | None = None) -> list[Span]:
        """The block set for *target* (fraction of the parameters) by *select*; every
        criterion's choice (and the end-to-end scores) go into *report*."""
        cands = self.candidates()
        sets = _block_sets(self.stack, list(cands), target, self.map_params)
        if not sets:
            raise PassError(f"no set of blocks removes about {target:g} of the parameters")
        cost = {
            "fit": lambda s: sum(cands[x].fit_error for x in s),
            "cosine": lambda s: sum(1.0 - cands[x].cosine for x in s),
            "cka": lambda s: sum(1.0 - cands[x].cka for x in s),
        }
        ranked = {k: sorted(sets, key=f) for k, f in cost.items()}
        choices = {k: format_spans(ranked[k][0]) for k in _CHEAP}
        scores: dict[str, float] = {}
        best = ranked.get(select, ranked["fit"])[0]
        if select == "e2e" and self._scorer is None:
            logger.warning("no held-out images to score block sets end to end: chose by the fit error")
        elif select == "e2e":
            best = self._choose_e2e(sets, ranked, cands, choices, scores)
        if report is not None:
            report.candidates = list(cands.values())
            report.choices, report.e2e_scores = choices, scores
        return list(best)

    def _choose_e2e(
        self,
        sets: list[tuple[Span, ...]],
        ranked: dict[str, list[tuple[Span, ...]]],
        cands: Mapping[Span, SpanCandidate],
        choices: dict[str, str],
        scores: dict[str, float],
    ) -> tuple[Span, ...]:
        """Shortlist block sets, decide by end-to-end fidelity. The shortlist: the best sets of
        the fit error (the first ``shortlist/2``), the cosine (``shortlist/4``) and CKA (1), and
        the best ``shortlist/2`` by the summed end-to-end damage of their blocks replaced one at
        a time (every single block scored once: how the errors of a span grow on the way to
        the output, which none of the statistics at the boundaries see)."""
        k = self.config.shortlist
        singles = {}
        for span in sorted(cands):
            if span[0] == span[1]:
                singles[span[0]] = 1.0 - self.e2e([span])
                scores[format_spans([span])] = round(1.0 - singles[span[0]], 5)
        worst = max(singles.values(), default=1.0)

        def damage(s: tuple[Span, ...]) -> float:
            return sum(singles.get(b, worst) for a, z in s for b in range(a, z + 1))

        ranked["damage"] = sorted(sets, key=damage)
        choices["damage"] = format_spans(ranked["damage"][0])
        quota = {"fit": max(1, k // 2), "cosine": max(1, k // 4), "cka": 1, "damage": max(1, k // 2)}
        short: list[tuple[Span, ...]] = []
        for name, q in quota.items():
            for s in ranked[name][:q]:
                if s not in short:
                    short.append(s)
        self.ctx.say(f"blocks: {len(short)} block sets scored end to end on {len(self.cache_ids)} images")
        for s in short:
            key = format_spans(s)
            if key not in scores:
                scores[key] = round(self.e2e(s), 5)
        best = max(short, key=lambda s: scores[format_spans(s)])
        choices["e2e"] = format_spans(best)
        return best

    def fit(self, spans: Sequence[Span], report: BlocksReport | None = None) -> list[SpanMap]:
        """The maps of *spans* (in order; with ``sequential``, each after the first fitted on
        the activations of the model with the earlier ones replaced)."""
        from foldonnx.data.activations import reduce_activations

        c = self.config
        maps: list[SpanMap] = []
        for k, (a, b) in enumerate(sorted(spans)):
            i, j = a, b + 1
            fitted_on = "original"
            if c.sequential and k > 0:
                self.ctx.say(f"blocks: refitting blocks {format_spans([(a, b)])} on the patched model")
                patched = replace_spans(self.model, maps)
                red = _PairReducer(
                    ("cur", self.bounds[i]), ("orig", self.bounds[j]), self.picker, self.held, c.batch
                )
                models = {
                    "cur": _truncate(patched, self.bounds[i]),
                    "orig": _truncate(self.model, self.bounds[j]),
                }
                reduce_activations(
                    models, self.feeds, [red], batch=c.batch, threads=self.ctx.threads,
                    progress=self.ctx.progress, desc=f"blocks {a}-{b}: patched activations",
                )  # fmt: skip
                fit = fit_map(
                    red.parts["fit"], red.parts["held"] if red.parts["held"].rows else None,
                    prior=c.prior, kind=self.kind,
                )  # fmt: skip
                fitted_on = "patched"
            else:
                fit = self.span_fit((a, b))
            factors = None if fit.factors is None else (fit.factors[0], fit.factors[1])
            maps.append(
                SpanMap(
                    a,
                    b,
                    self.bounds[i],
                    self.bounds[j],
                    fit.weight,
                    fit.bias,
                    factors,
                    identity_plus=self.kind.kind == "id+lowrank",
                )  # fmt: skip
            )
            if report is not None:
                report.spans.append(
                    SpanReport(
                        first=a,
                        last=b,
                        start=self.bounds[i],
                        end=self.bounds[j],
                        params_removed=self.stack.span_params((a, b)),
                        map_params=self.map_params,
                        map=str(self.kind),
                        fit=fit.label,
                        held_error=round(fit.held_error, 6),
                        fitted_on=fitted_on,
                    )  # fmt: skip
                )
            logger.info("blocks %s: %s, held-out relative error %.4f", format_spans([(a, b)]), fit.label,
                        fit.held_error)  # fmt: skip
        return maps

    def similarity(self) -> list[list[float | None]]:
        """The cosine matrix between boundaries, None where not measured (JSON-safe)."""
        return [
            [None if np.isnan(v) else round(float(v), 5) for v in row] for row in self.stats.cosine_matrix()
        ]


def max_blocks_for(stack: BlockStack, target: float, map_params: int) -> int:
    """The longest span worth considering for *target*: one block more than the count nearest it."""
    per = max(float(np.mean([b.params for b in stack.blocks])), 1.0)
    need = math.ceil((target * stack.total_params + map_params) / per) + 1
    return int(min(len(stack.blocks) - 1, max(1, need)))


class BlocksPass(Pass):
    """Replace runs of transformer blocks by fitted linear maps (see module docstring)."""

    name = "blocks"
    summary = (
        "transformer-block approximation: runs of blocks replaced by linear maps fitted on calibration data"
    )
    Config = BlocksConfig
    Report = BlocksReport
    budget: ClassVar[Mapping[str, str]] = {"params": "target_params"}

    def __init__(
        self, config: PassConfig | None = None, *, stack: BlockStack | None = None, **options: Any
    ) -> None:
        super().__init__(config, **options)
        self._stack = stack
        self._stack_of: int | None = None if stack is None else -1

    @property
    def is_identity(self) -> bool:
        return self.config.target_params == 0

    def analyse(self, model: onnx.ModelProto) -> BlockStack:
        """The model's blocks (computed once per model)."""
        if self._stack is None or (self._stack_of not in (-1, id(model))):
            self._stack = find_blocks(model)
            self._stack_of = id(model)
        return self._stack

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        if self.is_identity:  # a zero budget changes nothing, whatever the model
            return
        stack = self.analyse(model)
        if not stack.blocks:
            raise PassError(f"no transformer blocks found: {stack.reason}")
        if len(stack.blocks) < 2:
            raise PassError("the model has a single block: nothing to replace it with")
        if self.config.blocks is not None:
            spans = parse_block_spec(self.config.blocks)
            stack.check_spans(spans)
            if sum(b - a + 1 for a, b in spans) >= len(stack.blocks):
                raise PassError(f"cannot replace every block (the model has {len(stack.blocks)})")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, BlocksReport]:
        c = self.config
        stack = self.analyse(model)
        report = self._new_report(stack)
        if self.is_identity:
            out = onnx.ModelProto()
            out.CopyFrom(model)
            report.notes.append("target-params 0: the model is unchanged")
            return out, report
        fixed = parse_block_spec(c.blocks) if c.blocks is not None else None
        kind = parse_map(c.map)
        feeds = self._feeds(model, ctx)
        longest = None if fixed else max_blocks_for(stack, c.target_params or 0.0, kind.params(stack.width))
        planner = self._planner(model, ctx, feeds, stack, fixed, longest)
        report.calib_images, report.held_images = planner.n, int(planner.held.sum())
        report.seconds_stats = round(planner.seconds_stats, 3)
        report.similarity = planner.similarity()
        t1 = time.perf_counter()
        spans = fixed if fixed is not None else planner.choose(c.target_params or 0.0, c.select, report)
        report.seconds_select = round(time.perf_counter() - t1, 3)
        t2 = time.perf_counter()
        maps = planner.fit(spans, report)
        report.seconds_fit = round(time.perf_counter() - t2, 3)
        out = replace_spans(model, maps)
        removed = stack.removed_params(b for a, z in spans for b in range(a, z + 1))
        report.notes.append(
            f"replaced blocks {format_spans(spans)}: {removed} block parameters removed, "
            f"{sum(s.map_params for s in report.spans)} map parameters added"
        )
        return out, report

    def _planner(
        self,
        model: onnx.ModelProto,
        ctx: PassContext,
        feeds: Mapping[str, np.ndarray],
        stack: BlockStack,
        fixed: list[Span] | None,
        longest: int | None,
    ) -> BlockPlanner:
        """The planner of *model* on *feeds*: its statistics are gathered once per context and
        reused by later runs that differ only in the budget or the criterion (the ``auto``
        search tries several budgets on the same model)."""
        c = self.config
        e2e = fixed is None and c.select == "e2e"
        options = {k: v for k, v in c.to_dict().items() if k not in ("target_params", "blocks", "select")}
        key = (json.dumps(options), tuple(fixed or ()), longest, e2e)
        cache: list = ctx.cache.setdefault("blocks_planners", [])
        for m, f, k, planner in cache:
            if m is model and f is feeds and k == key:
                return planner
        planner = BlockPlanner(
            model, c, feeds, stack=stack, spans=fixed or (), max_blocks=longest, e2e=e2e, ctx=ctx
        )
        cache.append((model, feeds, key, planner))
        del cache[:-2]  # each holds held-out streams: keep the two most recent
        return planner

    def _new_report(self, stack: BlockStack) -> BlocksReport:
        from foldonnx.graph.stats import ModelStats

        empty = ModelStats(0, 0, 0)
        return BlocksReport(
            name=self.name, config=self.config.to_dict(), before=empty, after=empty,
            blocks_found=len(stack.blocks), norm=stack.norm, layout=stack.layout, width=stack.width,
            select=self.config.select if self.config.target_params is not None else None,
        )  # fmt: skip

    def _feeds(self, model: onnx.ModelProto, ctx: PassContext) -> dict[str, np.ndarray]:
        return calibration_for(model, ctx, self.config)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None):  # type: ignore[override]
        result = super().run(model, ctx)
        c = self.config
        rep = result.report
        if c.target_params is not None and c.target_params > 0:
            reached = rep.params_removed
            if abs(reached - c.target_params) > 0.01:
                step = np.mean([b.params for b in self.analyse(model).blocks]) / max(rep.before.params, 1)
                rep.notes.append(
                    f"target-params {c.target_params:g} reached {reached:.3f}: whole blocks move the "
                    f"count in steps of about {step:.3f}"
                )
                logger.warning(rep.notes[-1])
        return result


def calibration_for(model: onnx.ModelProto, ctx: PassContext, config: BlocksConfig) -> dict[str, np.ndarray]:
    """Calibration feeds of the pass: the context's data, preprocessed as the context says,
    else as the model's metadata records."""
    from foldonnx.data.sources import read_preprocess

    if ctx.preprocess is None:
        pre = read_preprocess(model)
        if pre is not None:
            ctx = ctx.child(preprocess=pre)
    return ctx.calibration(model, limit=config.calib_limit, seed=config.seed)


class _EndToEnd:
    """Fidelity of the model with some spans replaced, on the held-out images whose streams
    were cached: runs only from the first replaced boundary on."""

    def __init__(
        self,
        model: onnx.ModelProto,
        stack: BlockStack,
        cached: Mapping[str, np.ndarray],
        feeds: Mapping[str, np.ndarray],
        ids: np.ndarray,
        batch: int,
        ctx: PassContext,
    ) -> None:
        from foldonnx.data.activations import static_batch

        self.model = model
        self.bounds = list(stack.boundaries)
        self.cached = cached
        self.inputs = {k: v[ids] for k, v in feeds.items()}
        self.outputs = [o.name for o in model.graph.output]
        self.reference = [cached[o] for o in self.outputs]
        self.batch = static_batch(model) or batch
        self.threads = ctx.threads
        self.runners: dict[tuple[int, int | None], SubgraphRunner] = {}

    def _run(self, a: int, b: int | None, x: np.ndarray) -> list[np.ndarray]:
        key = (a, b)
        if key not in self.runners:
            outs = self.outputs if b is None else [self.bounds[b]]
            self.runners[key] = SubgraphRunner(self.model, [self.bounds[a]], outs, threads=self.threads)
        have = {**self.inputs, self.bounds[a]: x}
        return self.runners[key].run(have, batch=self.batch)

    def score(self, spans: Sequence[tuple[int, int, MapFit]]) -> float:
        x = None
        pos = None
        for a, b, fit in sorted(spans, key=lambda s: s[0]):
            if x is None:
                x = self.cached[self.bounds[a]].astype(np.float64)
            elif pos != a:
                x = self._run(pos, a, x.astype(np.float32))[0].astype(np.float64)
            x = x @ fit.weight + fit.bias
            pos = b + 1
        assert x is not None and pos is not None
        if pos == len(self.bounds) - 1 and self.bounds[pos] in self.outputs and len(self.outputs) == 1:
            out = [x.astype(np.float32)]
        else:
            out = self._run(pos, None, x.astype(np.float32))
        return output_fidelity(self.reference, out)


def _block_sets(
    stack: BlockStack, spans: list[Span], target: float, map_params: int
) -> list[tuple[Span, ...]]:
    """Sets of disjoint, non-adjacent candidate spans whose removed fraction is closest to
    *target* (within one point of the closest reachable)."""
    total = max(stack.total_params, 1)
    n_blocks = len(stack.blocks)
    per = float(np.mean([b.params for b in stack.blocks]))
    counts = sorted({b - a + 1 for a, b in spans})
    best_n = max(1, min(counts[-1], int(round((target * total + map_params) / max(per, 1.0)))))
    options = [k for k in (best_n - 1, best_n, best_n + 1) if 1 <= k <= min(counts[-1], n_blocks - 1)]
    span_set = set(spans)
    found: list[tuple[tuple[Span, ...], float]] = []
    for k in options:
        combos = itertools.combinations(range(n_blocks), k)
        if math.comb(n_blocks, k) > _MAX_SETS:  # large models: at most two runs of blocks
            combos = (c for c in combos if _runs(c) <= 2)
        for chosen in combos:
            runs = _as_spans(chosen)
            if any(r not in span_set for r in runs):
                continue
            removed = stack.removed_params(chosen) - map_params * len(runs)
            found.append((tuple(runs), abs(removed / total - target)))
    if not found:
        return []
    best = min(d for _, d in found)
    return [s for s, d in found if d <= max(best, 0.01) + 1e-9]


def _runs(blocks: Sequence[int]) -> int:
    return len(_as_spans(blocks))


def _as_spans(blocks: Sequence[int]) -> list[Span]:
    out: list[Span] = []
    for b in sorted(blocks):
        if out and out[-1][1] == b - 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


def approx_blocks(
    model: onnx.ModelProto | str,
    *,
    blocks: str | None = None,
    target_params: float | None = None,
    calib: Any = None,
    preprocess: Any = None,
    verify: bool = True,
    progress: bool = False,
    **options: Any,
) -> tuple[onnx.ModelProto, BlocksReport]:
    """Replace blocks of *model* (a ModelProto or a path) by fitted maps; returns ``(model,
    report)``. Options are :class:`BlocksConfig`'s. The input is not modified."""
    from foldonnx.onnx_file import load_model

    file_size = None
    if not isinstance(model, onnx.ModelProto):
        loaded = load_model(model)
        model, file_size = loaded.model, loaded.file_size
    p = BlocksPass(blocks=blocks, target_params=target_params, **options)
    ctx = PassContext(
        calib=calib, preprocess=preprocess, verify=verify, progress=progress, file_size=file_size
    )
    res = p.run(model, ctx)
    return res.model, res.report  # type: ignore[return-value]


register_pass(BlocksPass)
