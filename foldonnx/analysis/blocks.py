"""Transformer blocks found in an ONNX graph from its residual stream — not from node names.

:func:`find_blocks` is a pure analysis (it never mutates the model) returning a frozen,
printable :class:`BlockStack`: the blocks in order, the *boundary* tensors of the residual
stream between consecutive blocks, and the parameters inside each block. The block
approximation pass (:mod:`foldonnx.passes.blocks`) replaces the nodes between two boundaries
by one linear map; ``inspect`` lists the blocks.

How blocks are found:

1. **Residual adds.** An ``Add`` whose one input (the *skip*) is a data ancestor of the other
   (the *branch*), where the nodes between them hold a weighted op (``MatMul`` / ``Gemm`` /
   ``Conv`` / ``Einsum`` with a constant operand). Paths through ``Shape`` carry no data, so a
   shape computed from the stream does not make an add residual; adds without weights on the
   branch (the tanh-GELU's ``x + 0.044715·x³``) are not residual. Adds nested inside another
   residual branch are dropped.
2. **The stream.** Residual adds chain when the next add's skip is the previous add's output
   (pre-LN: timm ViT/DeiT, DINOv2, CLIP, SAM's ``[B, H, W, C]`` windowed blocks) or a
   normalisation of it (post-LN: BERT / MiniLM). Normalisations are those of the channel-group
   analysis's residual-stream group (fused ``LayerNormalization`` / ``RMSNormalization`` or the
   decomposed ReduceMean/Sub/Pow/Sqrt/Div chain of foreign exports). The longest chain with
   attention is the encoder.
3. **Blocks.** A branch is *attention* when it mixes tokens: a ``Softmax``, an attention op,
   or a ``MatMul`` / ``Einsum`` of two tensors that both depend on the stream. A block starts at
   the stream tensor entering an attention sublayer and ends where the next one starts; the last
   block ends after its last residual add (pre-LN: before the final norm, which stays) or after
   the norm that follows it (post-LN: the norm belongs to the block).

Parameters are counted as :func:`foldonnx.graph.stats.count_params` counts them (every scalar
of a constant tensor, once). A constant belongs to the set of blocks whose nodes read it
(through constant-only nodes such as a transposed weight); :meth:`BlockStack.removed_params`
is exact under sharing — exporters share identical tensors (all-zero biases of a random-init
model) across blocks, and such a tensor leaves the model only when every block reading it does.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from foldonnx.analysis.graph_view import GraphView
from foldonnx.errors import UsageError

__all__ = [
    "Block",
    "BlockStack",
    "Span",
    "find_blocks",
    "parse_block_spec",
    "format_spans",
]

logger = logging.getLogger(__name__)

#: owner id of constants read outside every block
OUTSIDE = -1

_WEIGHTED = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", "FusedMatMul"}
_MIXING = {"MatMul", "Einsum", "FusedMatMul"}
_ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}
_NORM_OPS = {
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
}
_SHAPE_OPS = {"Shape", "Size"}


@dataclass(frozen=True)
class Block:
    """One transformer block: the nodes between two boundary tensors of the residual stream."""

    index: int
    start: str  # boundary tensor entering the block
    end: str  # boundary tensor leaving it
    name: str  # readable location (common module path of its weights), e.g. "blocks.3"
    sublayers: tuple[str, ...]  # kinds of its residual branches in order: "attention", "mlp"
    params: int  # parameters read only by this block's nodes
    nodes: int  # nodes between the two boundaries

    def __str__(self) -> str:
        return (
            f"block {self.index} {self.name} [{'+'.join(self.sublayers)}] "
            f"{self.params} params, {self.start} -> {self.end}"
        )


Span = tuple[int, int]  # first and last block index, inclusive


@dataclass(frozen=True)
class BlockStack:
    """The blocks of a model's residual stream (empty, with ``reason``, when none were found)."""

    blocks: tuple[Block, ...] = ()
    norm: str = ""  # "pre-LN" | "post-LN"
    layout: str = ""  # "tokens" ([B, T, D]) | "grid" ([B, H, W, C])
    width: int = 0  # channels of the stream (its last axis)
    shape: tuple[int, ...] = ()  # boundary shape at batch 1
    total_params: int = 0
    reason: str | None = None
    #: (owner block indices, parameters): constants grouped by the blocks reading them
    #: (OUTSIDE = -1 marks constants also read outside every block)
    param_owners: tuple[tuple[tuple[int, ...], int], ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def boundaries(self) -> tuple[str, ...]:
        """Stream tensors between blocks: ``boundaries[k]`` enters block k, the last leaves the last."""
        if not self.blocks:
            return ()
        return tuple(b.start for b in self.blocks) + (self.blocks[-1].end,)

    def removed_params(self, blocks: Iterable[int]) -> int:
        """Parameters that leave the model when the nodes of *blocks* are deleted (exact when
        constants are shared between blocks)."""
        chosen = set(blocks)
        return sum(n for owners, n in self.param_owners if set(owners) <= chosen)

    def span_params(self, span: Span) -> int:
        return self.removed_params(range(span[0], span[1] + 1))

    def check_spans(self, spans: Sequence[Span]) -> None:
        """:class:`UsageError` for spans out of range or overlapping."""
        n = len(self.blocks)
        taken: set[int] = set()
        for a, b in spans:
            if not (0 <= a <= b < n):
                raise UsageError(
                    f"blocks {format_spans([(a, b)])} out of range: the model has blocks 0-{n - 1}"
                )
            if taken & set(range(a, b + 1)):
                raise UsageError(f"block spans overlap: {format_spans(spans)}")
            taken |= set(range(a, b + 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["boundaries"] = list(self.boundaries)
        d.pop("param_owners")
        return d

    def __str__(self) -> str:
        if not self.blocks:
            return f"no transformer blocks: {self.reason}"
        head = (
            f"{len(self.blocks)} {self.norm} blocks, stream {self.layout} {list(self.shape)} "
            f"(width {self.width})"
        )
        return "\n".join([head, *(f"  {b}" for b in self.blocks)])


def parse_block_spec(spec: str | Sequence[Any]) -> list[Span]:
    """``"9-11"`` → ``[(9, 11)]``; ``"8-9,11"`` → ``[(8, 9), (11, 11)]``; sorted, merged only
    when the user wrote them as one range. One-line :class:`UsageError` otherwise."""
    parts = spec.split(",") if isinstance(spec, str) else [str(p) for p in spec]
    out: list[Span] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise UsageError(f"bad block span {part!r} (expected N or N-M, e.g. 8-9,11)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UsageError(f"bad block span {part!r}: {b} < {a}")
        out.append((a, b))
    if not out:
        raise UsageError("no blocks given (expected e.g. 9-11 or 8-9,11)")
    return sorted(out)


def format_spans(spans: Sequence[Span]) -> str:
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


# ------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------


@dataclass
class _Residual:
    node: int
    skip: str
    branch: str
    out: str
    span: frozenset[int]
    attention: bool


class _Graph:
    """Data dependencies of a graph (paths through Shape/Size carry no data)."""

    def __init__(self, view: GraphView) -> None:
        self.view = view
        self.nodes = view.nodes
        self.data: set[str] = set(view.graph_inputs)
        self.const_derived: set[str] = set()
        for node in self.nodes:
            ins = [i for i in node.input if i]
            if node.op_type in _SHAPE_OPS:
                continue
            if any(i in self.data for i in ins):
                self.data.update(o for o in node.output if o)
            elif all(view.is_const(i) or i in self.const_derived for i in ins):
                self.const_derived.update(o for o in node.output if o)

    def is_data(self, name: str) -> bool:
        return name in self.data

    def is_weight(self, name: str) -> bool:
        return bool(name) and (self.view.is_const(name) or name in self.const_derived)

    def span(self, start: str, end: str, *, data_only: bool = True) -> frozenset[int]:
        """Node indices that *end* depends on and that depend on *start* (through data edges
        only, or through every edge, shape arithmetic included)."""
        view = self.view
        hi = view.producer.get(end)
        if hi is None:
            return frozenset()
        down: set[int] = set()
        todo = [start]
        while todo:
            v = todo.pop()
            for c in view.consumers.get(v, []):
                if c in down or c > hi or (data_only and self.nodes[c].op_type in _SHAPE_OPS):
                    continue
                down.add(c)
                todo.extend(o for o in self.nodes[c].output if o)
        if hi not in down:
            return frozenset()
        out: set[int] = set()
        stack = [hi]
        while stack:
            i = stack.pop()
            if i in out:
                continue
            out.add(i)
            for x in self.nodes[i].input:
                p = view.producer.get(x) if x and x != start else None
                if p is not None and p in down and p not in out:
                    stack.append(p)
        return frozenset(out)


def _residual(g: _Graph, idx: int) -> _Residual | None:
    node = g.nodes[idx]
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    a, b = node.input
    if not (g.is_data(a) and g.is_data(b)) or a == b:
        return None
    view = g.view
    for skip, branch in ((a, b), (b, a)):
        span = g.span(skip, branch)
        if not span:
            continue
        ops = [g.nodes[i] for i in span]
        if not any(n.op_type in _WEIGHTED and any(g.is_weight(x) for x in n.input) for n in ops):
            return None
        sa, so = view.shape(skip), view.shape(node.output[0])
        if sa is not None and so is not None and sa != so:
            return None
        inside = set(span)
        produced = {o for i in inside for o in g.nodes[i].output} | {skip}
        attention = any(
            n.op_type in _ATTENTION_OPS
            or (n.op_type in _MIXING and sum(1 for x in n.input if x in produced) >= 2)
            for n in ops
        )
        return _Residual(idx, skip, branch, node.output[0], span, attention)
    return None


def _norm_outputs(view: GraphView, groups: Sequence[Any] | None) -> dict[str, str]:
    """Stream tensor -> output of the normalisation applied to it (residual-stream norms of the
    channel-group analysis, plus any fused norm op)."""
    index = {name: i for i, name in enumerate(view.node_names)}
    out: dict[str, str] = {}
    for g in groups or ():
        if getattr(g.kind, "value", g.kind) != "residual":
            continue
        for norm in g.norms:
            ids = [index[n] for n in norm.nodes if n in index]
            if not ids:
                continue
            first, last = view.nodes[ids[0]], view.nodes[ids[-1]]
            if first.input and last.output:
                out.setdefault(first.input[0], last.output[0])
    for node in view.nodes:
        if node.op_type in _NORM_OPS and node.input and node.output:
            out.setdefault(node.input[0], node.output[0])
    return out


def _chains(res: list[_Residual], norm_out: dict[str, str]) -> list[list[tuple[_Residual, str]]]:
    """Residual adds linked into chains: (add, link) where link is "" (first), "direct" or "norm"."""
    chains: list[list[tuple[_Residual, str]]] = []
    tail: dict[str, tuple[int, str]] = {}  # stream tensor -> (chain id, link kind)
    for r in res:
        hit = tail.get(r.skip)
        if hit is None:
            chains.append([(r, "")])
            cid = len(chains) - 1
        else:
            cid, link = hit
            chains[cid].append((r, link))
        tail[r.out] = (cid, "direct")
        if r.out in norm_out:
            tail[norm_out[r.out]] = (cid, "norm")
    return chains


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    common: list[str] = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def find_blocks(model: onnx.ModelProto, groups: Sequence[Any] | None = None) -> BlockStack:
    """The transformer blocks of *model* (see module docstring). *groups* are the model's
    channel groups (:func:`foldonnx.analysis.find_channel_groups`), computed when not given."""
    from foldonnx.graph.stats import count_params

    if groups is None:
        from foldonnx.analysis import find_channel_groups

        groups = find_channel_groups(model)
    view = GraphView(model)
    total = count_params(model)
    g = _Graph(view)
    residuals = [r for r in (_residual(g, i) for i in range(len(view.nodes))) if r is not None]
    nested: set[int] = set()
    for r in residuals:
        nested |= {o.node for o in residuals if o.node in r.span}
    residuals = [r for r in residuals if r.node not in nested]
    if not residuals:
        return BlockStack(total_params=total, reason="no residual adds with weights on the branch")
    norm_out = _norm_outputs(view, groups)
    chains = [c for c in _chains(residuals, norm_out) if any(r.attention for r, _ in c)]
    if not chains:
        return BlockStack(total_params=total, reason="no attention sublayers on a residual stream")
    chain = max(chains, key=lambda c: sum(r.attention for r, _ in c))
    first = next(k for k, (r, _) in enumerate(chain) if r.attention)
    chain = chain[first:]
    links = {link for _, link in chain[1:]}
    post = "norm" in links
    starts = [k for k, (r, _) in enumerate(chain) if r.attention]
    bounds = [chain[k][0].skip for k in starts]
    last = chain[-1][0].out
    if post and last in norm_out:
        last = norm_out[last]
    bounds.append(last)
    shapes = [view.shape(b) for b in bounds]
    shape = next((s for s in shapes if s is not None), None)
    if shape is None or any(s is not None and s != shape for s in shapes):
        return BlockStack(total_params=total, reason=f"the stream's shape changes between blocks: {shapes}")
    # nodes of every block (all edges: shape arithmetic of the stream belongs to the block)
    owner: dict[int, int] = {}
    spans = []
    for k in range(len(starts)):
        span = g.span(bounds[k], bounds[k + 1], data_only=False)
        spans.append(span)
        for i in span:
            owner.setdefault(i, k)
    owners_of = _constant_owners(g, owner)
    by_owner: dict[tuple[int, ...], int] = {}
    for name, owners in owners_of.items():
        n = view.numel(name) if view.const_proto(name) is not None else 0
        if n and view.const_proto(name).data_type != onnx.TensorProto.STRING:
            by_owner[owners] = by_owner.get(owners, 0) + n
    blocks = []
    for k, span in enumerate(spans):
        kinds = [
            "attention" if r.attention else "mlp"
            for r, _ in chain[starts[k] : starts[k + 1] if k + 1 < len(starts) else len(chain)]
        ]
        paths = [
            view.module_path(i, x)
            for i in sorted(span)
            if view.nodes[i].op_type in _WEIGHTED
            for x in view.nodes[i].input[1:2]
            if g.is_weight(x)
        ]
        name = _common_path(paths).rstrip(".") or f"block {k}"
        params = sum(n for owners, n in by_owner.items() if owners == (k,))
        blocks.append(Block(k, bounds[k], bounds[k + 1], name, tuple(kinds), params, len(span)))
    stack = BlockStack(
        blocks=tuple(blocks),
        norm="post-LN" if post else "pre-LN",
        layout={3: "tokens", 4: "grid"}.get(len(shape), f"{len(shape)}-d"),
        width=int(shape[-1]),
        shape=tuple(shape),
        total_params=total,
        param_owners=tuple(sorted(by_owner.items())),
    )
    logger.info("found %d %s blocks (stream %s)", len(blocks), stack.norm, list(shape))
    return stack


def _constant_owners(g: _Graph, owner: dict[int, int]) -> dict[str, tuple[int, ...]]:
    """Every stored constant (initializer / Constant output) -> sorted owner ids of the nodes
    reading it, looking through constant-only nodes (a transposed or cast weight)."""
    view = g.view
    memo: dict[str, frozenset[int]] = {}

    def users(name: str, depth: int = 0) -> frozenset[int]:
        if name in memo:
            return memo[name]
        out: set[int] = set()
        for c in view.consumers.get(name, []):
            node = view.nodes[c]
            if c in owner:
                out.add(owner[c])
            elif depth < 16 and node.output and all(o in g.const_derived for o in node.output if o):
                for o in node.output:
                    if o:
                        out |= users(o, depth + 1)
            else:
                out.add(OUTSIDE)
        if name in view.graph_outputs:
            out.add(OUTSIDE)
        memo[name] = frozenset(out)
        return memo[name]

    names = list(view.initializers) + [
        n.output[0] for n in view.nodes if n.op_type == "Constant" and n.output
    ]
    return {name: tuple(sorted(users(name))) for name in names}


def blocks_to_json(stack: BlockStack) -> str:
    return json.dumps(stack.to_dict(), indent=1)
