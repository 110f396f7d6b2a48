"""One handler per ONNX op type: how the op maps channel axes between its inputs and outputs.

A handler receives a :class:`NodeContext` and states relations between axes (``eq``, ``compose``,
``part``), declares the role of every constant it reads as a weight (``role``), records integers
that encode axis sizes (``size_const``) and marks what the analysis cannot prove (``block_node``).
Ops without a handler block every axis they touch, with the op named in the reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from foldonnx.analysis.channel_groups import NormRef, Role
from foldonnx.analysis.dims import DimSolver, align_sizes
from foldonnx.analysis.graph_view import GraphView
from foldonnx.analysis.shape_values import ShapeValues

__all__ = ["HANDLERS", "register_handler", "NodeContext", "AnalysisState", "RoleDecl", "SizeConst"]

logger = logging.getLogger(__name__)

Handler = Callable[["NodeContext"], None]
HANDLERS: dict[str, Handler] = {}


def register_handler(*op_types: str) -> Callable[[Handler], Handler]:
    """Register a handler for one or more op types (default domain)."""

    def deco(fn: Handler) -> Handler:
        for op in op_types:
            HANDLERS[op] = fn
        return fn

    return deco


@dataclass(frozen=True)
class RoleDecl:
    """A constant's axis that carries channels, with its role."""

    dim: int
    tensor: str  # the initializer / Constant output holding the data
    axis: int
    role: Role
    node_idx: int
    param: str


@dataclass(frozen=True)
class SizeConst:
    """An integer stored in a constant that states the size of (or an offset in) an axis."""

    tensor: str
    index: int
    value: int
    dim: int
    node: str
    kind: str = "size"  # "size" | "offset"


@dataclass
class AnalysisState:
    view: GraphView
    solver: DimSolver = field(default_factory=DimSolver)
    roles: list[RoleDecl] = field(default_factory=list)
    size_consts: list[SizeConst] = field(default_factory=list)
    runtime_sizes: list[tuple[int, int, str]] = field(default_factory=list)  # (dim, source dim, node)
    norms: list[tuple[int, NormRef]] = field(default_factory=list)
    excused_reductions: set[str] = field(default_factory=set)
    # values computed from constants by layout ops only (a position embedding reshaped and
    # resized at run time): value -> axes of the source constants, waiting for a PARAM use
    derived: dict[str, list[tuple[int, str, int, int]]] = field(default_factory=dict)
    shape_values: ShapeValues | None = None

    def __post_init__(self) -> None:
        if self.shape_values is None:
            self.shape_values = ShapeValues(self.view)


class NodeContext:
    """What a handler sees of one node."""

    def __init__(self, state: AnalysisState, idx: int) -> None:
        self.state = state
        self.view = state.view
        self.solver = state.solver
        self.idx = idx
        self.node = self.view.nodes[idx]
        self.name = self.view.node_names[idx]
        self.op = self.node.op_type
        self._attrs = {a.name: a for a in self.node.attribute}
        self._touched_const: dict[int, tuple[str, int]] = {}
        self._roled: set[int] = set()
        self._claimed: set[str] = set()  # derived inputs this node used as a per-channel PARAM

    # ------------------------------------------------------------------ access
    @property
    def label(self) -> str:
        return f"{self.op} ({self.name})"

    def inp(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def out(self, i: int = 0) -> str:
        return self.node.output[i] if i < len(self.node.output) else ""

    def attr(self, name: str, default: object = None) -> object:
        a = self._attrs.get(name)
        return default if a is None else onnx.helper.get_attribute_value(a)

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.view.shape(name) if name else None

    def is_const(self, name: str) -> bool:
        return bool(name) and self.view.is_const(name)

    def ints(self, name: str) -> list[int] | None:
        return self.view.const_ints(name) if name else None

    def d(self, name: str, axis: int) -> int | None:
        """The dim of ``name``'s axis (None for length-1 axes, unknown shapes, empty names)."""
        shape = self.shape(name)
        if shape is None:
            return None
        if axis < 0:
            axis += len(shape)
        if not 0 <= axis < len(shape) or shape[axis] <= 1:
            return None
        if self.is_const(name):
            key = (f"{self.view.const_source(name)}@{self.idx}:{name}", axis)
            dim = self.solver.dim(key, shape[axis])
            self._touched_const[dim] = (name, axis)
            return dim
        return self.solver.dim((name, axis), shape[axis])

    # ------------------------------------------------------------------ relations
    def eq(self, a: str, ax: int, b: str, bx: int) -> None:
        da, db = self.d(a, ax), self.d(b, bx)
        if da is not None and db is not None:
            self.solver.equal(da, db, self.label)
        elif (da is None) != (db is None):
            # one side known and > 1, the other unknown or 1: the analysis cannot follow
            sa, sb = self.shape(a), self.shape(b)
            if sa is not None and sb is not None:
                return  # a genuine broadcast (size 1 against size n)
            for d in (da, db):
                if d is not None:
                    self.solver.block(d, f"unknown shape at {self.label}")

    def eq_all(self, a: str, b: str) -> None:
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None:
            self.block_node(f"unknown shape at {self.label}")
            return
        if len(sa) != len(sb):
            self.reshape(a, b)
            return
        for ax in range(len(sa)):
            self.eq(a, ax, b, ax)

    def reshape(self, a: str, b: str) -> None:
        """Relate the axes of ``a`` and ``b`` (same number of elements) by row-major order."""
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None:
            self.block_node(f"unknown shape at {self.label}")
            return
        ia = [i for i, s in enumerate(sa) if s > 1]
        ib = [i for i, s in enumerate(sb) if s > 1]
        runs = align_sizes([sa[i] for i in ia], [sb[i] for i in ib])
        if runs is None:
            self.block_node(f"reshape {list(sa)} -> {list(sb)} cannot be followed at {self.label}")
            return
        for ra, rb in runs:
            axa = [ia[k] for k in ra]
            axb = [ib[k] for k in rb]
            if len(axa) == 1 and len(axb) == 1:
                self.eq(a, axa[0], b, axb[0])
            elif len(axa) == 1:
                self.solver.compose(self.d(a, axa[0]), [self.d(b, x) for x in axb], self.label)
            elif len(axb) == 1:
                self.solver.compose(self.d(b, axb[0]), [self.d(a, x) for x in axa], self.label)
            else:
                reason = f"reshape mixes axes {list(sa)} -> {list(sb)} at {self.label}"
                for x in axa:
                    self.solver.block(self.d(a, x), reason)
                for x in axb:
                    self.solver.block(self.d(b, x), reason)

    def part(self, parent: str, pax: int, child: str | None, cax: int, start: int, length: int) -> None:
        dp = self.d(parent, pax)
        if dp is None:
            return
        dc = self.d(child, cax) if child is not None else None
        if dc is None and length > 1:
            self.solver.block(dp, f"unknown shape at {self.label}")
            return
        self.solver.part(dp, dc, start, length, self.label)

    def role(self, name: str, axis: int, role: Role, param: str) -> None:
        d = self.d(name, axis)
        if d is None:
            return
        shape = self.shape(name) or ()
        axis = axis + len(shape) if axis < 0 else axis
        self._roled.add(d)
        self.state.roles.append(RoleDecl(d, self.view.const_source(name), axis, role, self.idx, param))

    def is_derived(self, name: str) -> bool:
        return bool(name) and name in self.state.derived

    def param_roles(self, name: str, param: str) -> None:
        """Every axis of constant ``name`` already tied by this handler is a per-channel PARAM.

        For a value derived from constants by layout ops, the axes of the source constants are.
        """
        if self.is_derived(name):
            self._claimed.add(name)
            for d, tensor, axis, node_idx in self.state.derived[name]:
                self.state.roles.append(RoleDecl(d, tensor, axis, Role.PARAM, node_idx, param))
            return
        if not self.is_const(name):
            return
        shape = self.shape(name) or ()
        for ax in range(len(shape)):
            d = self.d(name, ax)
            if d is not None and self._touched_const.get(d) is not None:
                self.role(name, ax, Role.PARAM, param)

    def flag(self, name: str, axis: int, flag: str) -> None:
        d = self.d(name, axis)
        if d is not None:
            self.solver.flag(d, flag, self.label)

    def block_node(self, reason: str) -> None:
        """Block every axis of every input and output of this node (and of the outer values its
        subgraphs read, for If / Loop / Scan)."""
        for name in list(self.node.input) + list(self.node.output) + _outer_refs(self.node):
            shape = self.shape(name)
            if not name or shape is None:
                continue
            for ax in range(len(shape)):
                d = self.d(name, ax)
                if d is not None:
                    self.solver.block(d, reason)
                    self._roled.add(d)

    def size_entries(self, shape_input: str, out: str, what: str) -> None:
        """Record how each entry of a shape vector (``shape_input``) sizes axis j of ``out``."""
        oshape = self.shape(out)
        if oshape is None:
            return
        entries = self.state.shape_values.entries(shape_input, self.name)
        if entries is None or len(entries) != len(oshape):
            for ax in range(len(oshape)):
                d = self.d(out, ax)
                if d is not None and self.is_const(shape_input) is False:
                    self.solver.flag(d, "opaque_size", self.label)
            return
        for ax, e in enumerate(entries):
            d = self.d(out, ax)
            if d is None:
                continue
            if (what == "reshape" and e.value in (0, -1)) or (what == "expand" and e.value == 1):
                continue  # copied from the input / inferred / broadcast: follows a fold by itself
            if e.kind == "const":
                self.state.size_consts.append(
                    SizeConst(e.tensor, e.index, int(e.value), d, e.node or self.name)
                )
            elif e.kind == "dim":
                src = self.view.shape(e.tensor)
                if src is not None and src[e.index] > 1:
                    sd = (
                        self.solver.dim((e.tensor, e.index), src[e.index])
                        if not self.is_const(e.tensor)
                        else None
                    )
                    if sd is not None:
                        self.state.runtime_sizes.append((d, sd, self.label))
            else:
                self.solver.block(d, f"axis size computed by arithmetic at {self.label}")

    def finish(self) -> None:
        """Constants whose channel axes were tied without a declared role block their class.

        Layout ops (Reshape, Transpose, Resize, ...) whose data inputs are all constants or
        derived from them produce a *derived* value instead: the role is decided by its use.
        """
        data = [i for i in (self.node.input[:1] if self.op != "Concat" else self.node.input) if i]
        if self.op in LAYOUT_OPS and data and all(self.is_const(i) or self.is_derived(i) for i in data):
            pending: list[tuple[int, str, int, int]] = []
            for d, (name, axis) in self._touched_const.items():
                if d not in self._roled and name in data:
                    pending.append((d, self.view.const_source(name), axis, self.idx))
                    self._roled.add(d)
            for name in data:
                if self.is_derived(name):
                    pending += self.state.derived[name]
                    self._claimed.add(name)
            for out in self.node.output:
                if out:
                    self.state.derived[out] = pending
        for name in self.node.input:
            if self.op in ("Shape", "Size"):
                break  # reads only the shape
            if self.is_derived(name) and name not in self._claimed:
                first = self.state.derived[name]
                src = first[0][1] if first else name
                for d, *_ in first:
                    self.solver.flag(d, "const_data", self.label)
                    self.solver.block(d, f"constant {src} transformed at run time feeds {self.label} as data")
        for d, (name, axis) in self._touched_const.items():
            if d not in self._roled:
                self.solver.flag(d, "const_data", self.label)
                self.solver.block(
                    d, f"constant {self.view.const_source(name)} axis {axis} used by {self.label} as data"
                )


LAYOUT_OPS = {
    "Reshape",
    "Transpose",
    "Cast",
    "Resize",
    "Upsample",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Identity",
    "Concat",
    "Gather",
    "Expand",
    "Split",
    "Tile",
}


def _outer_refs(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from the enclosing graph."""
    refs: list[str] = []
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                refs += [i for i in list(n.input) + _outer_refs(n) if i and i not in local]
                local.update(n.output)
    return refs


def run_handler(state: AnalysisState, idx: int) -> None:
    ctx = NodeContext(state, idx)
    node = ctx.node
    if node.op_type == "Constant":
        return
    if node.op_type == "Identity" and node.input and ctx.is_const(node.input[0]):
        return  # an alias of a constant (TorchScript shares tensors this way)
    handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if handler is None:
        ctx.block_node(f"unhandled op {node.op_type} ({ctx.name})")
        return
    # every output must have a known shape, or the analysis cannot follow the node
    for name in node.output:
        used = state.view.consumers.get(name) or name in state.view.graph_outputs
        if name and ctx.shape(name) is None and used:
            ctx.block_node(f"unknown shape of {name} at {ctx.label}")
            return
    try:
        handler(ctx)
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        logger.debug("handler for %s failed: %s", ctx.label, exc)
        ctx.block_node(f"cannot analyse {ctx.label}: {exc}")
    ctx.finish()


# ====================================================================== elementwise
_UNARY = [
    "Relu",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Gelu",
    "HardSwish",
    "HardSigmoid",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Log",
    "Reciprocal",
    "Sign",
    "Floor",
    "Ceil",
    "Round",
    "Mish",
    "Sin",
    "Cos",
    "Not",
    "IsNaN",
    "IsInf",
    "ThresholdedRelu",
    "Shrink",
    "Identity",
    "Cast",
    "Dropout",
    "Clip",
    "CastLike",
    "Swish",
]


@register_handler(*_UNARY)
def _unary(ctx: NodeContext) -> None:
    if ctx.op == "Clip":
        for i in (1, 2):
            if ctx.inp(i) and not ctx.is_const(ctx.inp(i)):
                ctx.block_node(f"Clip with run-time bounds at {ctx.label}")
                return
    ctx.eq_all(ctx.inp(0), ctx.out(0))


_BINARY = [
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Mod",
    "PRelu",
    "BitShift",
]

_PARAM_NAMES = {"Add": "bias", "Sub": "bias", "Mul": "scale", "Div": "divisor", "PRelu": "slope"}


def _param_name(ctx: NodeContext, name: str) -> str:
    """``pos_embed`` from ``blocks.pos_embed``; else what the op makes of it (bias, scale, ...)."""
    src = ctx.view.const_source(name) if ctx.is_const(name) else ""
    if ctx.is_derived(name) and ctx.state.derived[name]:
        src = ctx.state.derived[name][0][1]
    last = src.rsplit(".", 1)[-1]
    generated = "::" in src or "/" in src or re.fullmatch(r"[A-Za-z_]*_\d+", last) is not None
    if src and not generated:
        return last  # a module's own name: pos_embed, cls_token, gamma, lambda1, ...
    return _PARAM_NAMES.get(ctx.op, "param")


@register_handler(*_BINARY)
def _broadcast(ctx: NodeContext) -> None:
    out = ctx.out(0)
    oshape = ctx.shape(out)
    if oshape is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    full_inputs: dict[int, int] = {}
    for name in ctx.node.input:
        if not name:
            continue
        shape = ctx.shape(name)
        if shape is None:
            ctx.block_node(f"unknown shape of {name} at {ctx.label}")
            return
        off = len(oshape) - len(shape)
        for ax, s in enumerate(shape):
            if s > 1 and s == oshape[ax + off]:
                ctx.eq(name, ax, out, ax + off)
                if not ctx.is_const(name) and not ctx.is_derived(name):
                    full_inputs[ax + off] = full_inputs.get(ax + off, 0) + 1
        if ctx.is_const(name) or ctx.is_derived(name):
            ctx.param_roles(name, _param_name(ctx, name))
    if ctx.op in ("Add", "Sum", "Sub"):
        for ax, n in full_inputs.items():
            if n >= 2:
                ctx.flag(out, ax, "residual")


@register_handler("Expand")
def _expand(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    xs, os_ = ctx.shape(x), ctx.shape(out)
    if xs is None or os_ is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    off = len(os_) - len(xs)
    for ax, s in enumerate(xs):
        if s > 1:
            ctx.eq(x, ax, out, ax + off)
    ctx.size_entries(ctx.inp(1), out, "expand")


@register_handler("Tile")
def _tile(ctx: NodeContext) -> None:
    reps = ctx.ints(ctx.inp(1))
    xs = ctx.shape(ctx.inp(0))
    if reps is None or xs is None:
        ctx.block_node(f"Tile with run-time repeats at {ctx.label}")
        return
    for ax, r in enumerate(reps):
        if r == 1:
            ctx.eq(ctx.inp(0), ax, ctx.out(0), ax)
        else:
            for name in (ctx.inp(0), ctx.out(0)):
                d = ctx.d(name, ax)
                if d is not None:
                    ctx.solver.block(d, f"Tile repeats axis {ax} at {ctx.label}")


# ====================================================================== linear algebra
@register_handler("MatMul")
def _matmul(ctx: NodeContext) -> None:
    a, b, out = ctx.inp(0), ctx.inp(1), ctx.out(0)
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(out)
    if sa is None or sb is None or so is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    if len(sa) < 2 or len(sb) < 2:
        ctx.block_node(f"MatMul with a 1-D operand at {ctx.label}")
        return
    ra, rb, ro = len(sa), len(sb), len(so)
    ctx.eq(a, ra - 1, b, rb - 2)  # contraction
    ctx.eq(a, ra - 2, out, ro - 2)
    ctx.eq(b, rb - 1, out, ro - 1)
    for k in range(3, ro + 1):  # broadcast batch axes
        for name, shape in ((a, sa), (b, sb)):
            if len(shape) >= k and shape[-k] == so[-k]:
                ctx.eq(name, len(shape) - k, out, ro - k)
    const_a, const_b = ctx.is_const(a), ctx.is_const(b)
    if const_b and rb == 2:
        ctx.role(b, 0, Role.CONSUMER, "weight")
        ctx.role(b, 1, Role.PRODUCER, "weight")
    if const_a and ra == 2:
        ctx.role(a, 1, Role.CONSUMER, "weight")
        ctx.role(a, 0, Role.PRODUCER, "weight")
    if (const_a and ra != 2) or (const_b and rb != 2):
        ctx.block_node(f"MatMul with a batched constant operand at {ctx.label}")
    if not const_a and not const_b:
        for k in range(3, ro + 1):
            ctx.flag(out, ro - k, "attn_batch")


@register_handler("Gemm")
def _gemm(ctx: NodeContext) -> None:
    a, b, c, out = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    a_k, a_m = (0, 1) if ta else (1, 0)
    b_k, b_n = (1, 0) if tb else (0, 1)
    ctx.eq(a, a_k, b, b_k)
    ctx.eq(a, a_m, out, 0)
    ctx.eq(b, b_n, out, 1)
    if ctx.is_const(b):
        ctx.role(b, b_k, Role.CONSUMER, "weight")
        ctx.role(b, b_n, Role.PRODUCER, "weight")
    if ctx.is_const(a):
        ctx.role(a, a_k, Role.CONSUMER, "weight")
        ctx.role(a, a_m, Role.PRODUCER, "weight")
    if c:
        cs = ctx.shape(c)
        if cs is None:
            ctx.block_node(f"unknown shape at {ctx.label}")
            return
        so = ctx.shape(out) or ()
        off = len(so) - len(cs)
        for ax, s in enumerate(cs):
            if s > 1:
                ctx.eq(c, ax, out, ax + off)
        if ctx.is_const(c):
            ctx.param_roles(c, "bias")


def _conv_common(ctx: NodeContext, transpose: bool) -> None:
    x, w, bias, out = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    xs, ws, os_ = ctx.shape(x), ctx.shape(w), ctx.shape(out)
    if xs is None or ws is None or os_ is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    if not ctx.is_const(w):
        ctx.block_node(f"{ctx.op} with a non-constant weight at {ctx.label}")
        return
    group = int(ctx.attr("group", 1))
    cin, cout = xs[1], os_[1]
    ctx.eq(x, 0, out, 0)
    if group == 1:
        if transpose:
            ctx.eq(x, 1, w, 0)
            ctx.eq(w, 1, out, 1)
            ctx.role(w, 0, Role.CONSUMER, "weight")
            ctx.role(w, 1, Role.PRODUCER, "weight")
        else:
            ctx.eq(x, 1, w, 1)
            ctx.eq(w, 0, out, 1)
            ctx.role(w, 1, Role.CONSUMER, "weight")
            ctx.role(w, 0, Role.PRODUCER, "weight")
    elif group == cin == cout and ws[0 if transpose else 1] == 1 and ws[1 if transpose else 0] == cin:
        # depthwise: input channel c only feeds output channel c
        ctx.eq(x, 1, out, 1)
        waxis = 0
        ctx.eq(w, waxis, out, 1)
        ctx.role(w, waxis, Role.PRODUCER, "weight")
        ctx.flag(out, 1, "depthwise")
    else:
        ctx.block_node(f"grouped {ctx.op} (group={group}, {cin}->{cout}) at {ctx.label}")
        return
    if bias:
        ctx.eq(bias, 0, out, 1)
        ctx.role(bias, 0, Role.PARAM, "bias")
    if ctx.view.pooled(x):
        ctx.flag(out, 1, "pooled_out")  # squeeze-excitation style: runs on pooled features
    else:
        ctx.flag(out, 1, "spatial_out")


@register_handler("Conv")
def _conv(ctx: NodeContext) -> None:
    _conv_common(ctx, transpose=False)


@register_handler("ConvTranspose")
def _conv_transpose(ctx: NodeContext) -> None:
    _conv_common(ctx, transpose=True)


@register_handler("Einsum")
def _einsum(ctx: NodeContext) -> None:
    eq = str(
        ctx.attr("equation", b"")
        if not isinstance(ctx.attr("equation"), bytes)
        else ctx.attr("equation").decode()
    )
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        ctx.block_node(f"Einsum '{eq}' (ellipsis or implicit output) at {ctx.label}")
        return
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len([i for i in ctx.node.input]):
        ctx.block_node(f"Einsum '{eq}' does not match its inputs at {ctx.label}")
        return
    where: dict[str, list[tuple[str, int]]] = {}
    for name, term in zip(ctx.node.input, terms, strict=True):
        for ax, ch in enumerate(term):
            where.setdefault(ch, []).append((name, ax))
    for ax, ch in enumerate(rhs):
        where.setdefault(ch, []).append((ctx.out(0), ax))
    for places in where.values():
        first = places[0]
        for other in places[1:]:
            ctx.eq(first[0], first[1], other[0], other[1])
    for name, term in zip(ctx.node.input, terms, strict=True):
        if ctx.is_const(name) and len(term) == 2:  # a linear map; other constants are data
            for ax, ch in enumerate(term):
                ctx.role(name, ax, Role.PRODUCER if ch in rhs else Role.CONSUMER, "weight")


# ====================================================================== normalisation
@register_handler("BatchNormalization")
def _batchnorm(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    ctx.eq_all(x, out)
    for i, role, param in (
        (1, Role.PARAM, "bn_scale"),
        (2, Role.PARAM, "bn_bias"),
        (3, Role.STAT, "bn_mean"),
        (4, Role.STAT, "bn_var"),
    ):
        name = ctx.inp(i)
        if not name:
            continue
        ctx.eq(name, 0, x, 1)
        if ctx.is_const(name):
            ctx.role(name, 0, role, param)
        else:
            ctx.block_node(f"BatchNormalization with run-time {param} at {ctx.label}")


@register_handler("InstanceNormalization")
def _instancenorm(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    ctx.eq_all(x, out)
    for i, param in ((1, "in_scale"), (2, "in_bias")):
        ctx.eq(ctx.inp(i), 0, x, 1)
        ctx.param_roles(ctx.inp(i), param)


@register_handler("LayerNormalization", "RMSNormalization")
def _layernorm(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    xs = ctx.shape(x)
    if xs is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    axis = int(ctx.attr("axis", -1))
    axis = axis + len(xs) if axis < 0 else axis
    ctx.eq_all(x, out)
    normalised = [ax for ax in range(axis, len(xs)) if xs[ax] > 1]
    if len(normalised) > 1:
        ctx.block_node(f"{ctx.op} over several axes at {ctx.label}")
        return
    for i, param in ((1, "ln_scale"), (2, "ln_bias")):
        name = ctx.inp(i)
        if not name:
            continue
        ns = ctx.shape(name) or ()
        if ns and normalised:
            ctx.eq(name, len(ns) - 1, x, normalised[0])
        ctx.param_roles(name, param)
    if normalised:
        d = ctx.d(x, normalised[0])
        scale, bias = (
            _source_name(ctx, ctx.inp(i)) if ctx.is_const(ctx.inp(i)) or ctx.is_derived(ctx.inp(i)) else ""
            for i in (1, 2)
        )
        kind = "rmsnorm" if ctx.op == "RMSNormalization" else "layernorm"
        ctx.state.norms.append((d, NormRef(kind, (ctx.name,), scale, bias)))


_REDUCE = [
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "ArgMax",
    "ArgMin",
]


@register_handler(*_REDUCE)
def _reduce(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    xs, os_ = ctx.shape(x), ctx.shape(out)
    if xs is None or os_ is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    if ctx.op in ("ArgMax", "ArgMin"):
        axes = [int(ctx.attr("axis", 0))]
    else:
        axes = ctx.attr("axes", None)
        if axes is None and ctx.inp(1):
            axes = ctx.ints(ctx.inp(1))
            if axes is None:
                ctx.block_node(f"{ctx.op} over run-time axes at {ctx.label}")
                return
        if not axes:
            axes = [] if int(ctx.attr("noop_with_empty_axes", 0)) else list(range(len(xs)))
    axes = sorted(a + len(xs) if a < 0 else a for a in axes)
    keep = int(ctx.attr("keepdims", 1))
    j = 0
    for ax in range(len(xs)):
        if ax in axes:
            if xs[ax] > 1:
                ctx.flag(x, ax, "reduced")
            if keep:
                j += 1
            continue
        ctx.eq(x, ax, out, j)
        j += 1
    if ctx.op == "ReduceMean" and len(axes) == 1 and keep:
        _match_decomposed_layernorm(ctx, axes[0])


def _single_consumer(view: GraphView, name: str, op: str) -> int | None:
    for c in view.consumers.get(name, []):
        if view.nodes[c].op_type == op:
            return c
    return None


def _reduce_axes(view: GraphView, node: onnx.NodeProto) -> list[int] | None:
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    return view.const_ints(node.input[1]) if len(node.input) > 1 and node.input[1] else None


def _match_decomposed_layernorm(ctx: NodeContext, axis: int) -> None:
    """ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div (-> Mul scale -> Add bias).

    Over the last axis (DINOv2 tokens) or the channel axis of NCHW maps (SAM's LayerNorm2d).
    """
    v = ctx.view
    x = ctx.inp(0)
    sub = _single_consumer(v, ctx.out(0), "Sub")
    if sub is None or v.nodes[sub].input[0] != x:
        return
    centred = v.nodes[sub].output[0]
    pow_ = _single_consumer(v, centred, "Pow")
    div = _single_consumer(v, centred, "Div")
    if pow_ is None or div is None:
        return
    rm2 = _single_consumer(v, v.nodes[pow_].output[0], "ReduceMean")
    if rm2 is None or _reduce_axes(v, v.nodes[rm2]) != _reduce_axes(v, ctx.node):
        return
    add = _single_consumer(v, v.nodes[rm2].output[0], "Add")
    if add is None:
        return
    sqrt = _single_consumer(v, v.nodes[add].output[0], "Sqrt")
    if sqrt is None or v.nodes[div].input[1] != v.nodes[sqrt].output[0]:
        return
    nodes = [ctx.idx, sub, pow_, rm2, add, sqrt, div]
    scale = bias = ""
    mul = _single_consumer(v, v.nodes[div].output[0], "Mul")
    if mul is not None:
        other = [i for i in v.nodes[mul].input if i != v.nodes[div].output[0]]
        if other and (v.is_const(other[0]) or ctx.is_derived(other[0])):
            scale = _source_name(ctx, other[0])
            nodes.append(mul)
            badd = _single_consumer(v, v.nodes[mul].output[0], "Add")
            if badd is not None:
                other = [i for i in v.nodes[badd].input if i != v.nodes[mul].output[0]]
                if other and (v.is_const(other[0]) or ctx.is_derived(other[0])):
                    bias = _source_name(ctx, other[0])
                    nodes.append(badd)
    names = tuple(v.node_names[i] for i in nodes)
    ctx.state.excused_reductions.update({ctx.label, f"ReduceMean ({v.node_names[rm2]})"})
    d = ctx.d(x, axis)
    if d is not None:
        ctx.state.norms.append((d, NormRef("layernorm_decomposed", names, scale, bias)))


def _source_name(ctx: NodeContext, name: str) -> str:
    """The stored constant behind a constant or a value derived from one."""
    if ctx.is_derived(name) and ctx.state.derived[name]:
        return ctx.state.derived[name][0][1]
    return ctx.view.const_source(name)


@register_handler("Softmax", "LogSoftmax", "Hardmax")
def _softmax(ctx: NodeContext) -> None:
    x = ctx.inp(0)
    ctx.eq_all(x, ctx.out(0))
    xs = ctx.shape(x) or ()
    axis = int(ctx.attr("axis", -1))
    if xs:
        ctx.flag(x, axis, "reduced")


# ====================================================================== pooling / resampling
@register_handler("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(ctx: NodeContext) -> None:
    ctx.eq(ctx.inp(0), 0, ctx.out(0), 0)
    ctx.eq(ctx.inp(0), 1, ctx.out(0), 1)


@register_handler("MaxPool", "AveragePool", "LpPool", "MaxRoiPool")
def _pool(ctx: NodeContext) -> None:
    ctx.eq(ctx.inp(0), 0, ctx.out(0), 0)
    ctx.eq(ctx.inp(0), 1, ctx.out(0), 1)
    if ctx.out(1):
        ctx.block_node(f"{ctx.op} with indices output at {ctx.label}")


@register_handler("Resize", "Upsample")
def _resize(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    xs, os_ = ctx.shape(x), ctx.shape(out)
    if xs is None or os_ is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    for ax, (a, b) in enumerate(zip(xs, os_, strict=True)):
        if a == b:
            ctx.eq(x, ax, out, ax)
        elif a > 1 and ax < 2:
            ctx.block_node(f"{ctx.op} resizes axis {ax} at {ctx.label}")
            return
    sizes = ctx.inp(3) if ctx.op == "Resize" else ""
    if sizes:
        ctx.size_entries(sizes, out, "resize")


@register_handler("Pad")
def _pad(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    xs = ctx.shape(x)
    pads = ctx.ints(ctx.inp(1)) if ctx.inp(1) else ctx.attr("pads")
    if xs is None or pads is None:
        ctx.block_node(f"Pad with run-time pads at {ctx.label}")
        return
    axes = ctx.ints(ctx.inp(3)) if ctx.inp(3) else list(range(len(xs)))
    if axes is None:
        ctx.block_node(f"Pad with run-time axes at {ctx.label}")
        return
    padded = {a + len(xs) if a < 0 else a for i, a in enumerate(axes) if pads[i] or pads[i + len(axes)]}
    for ax in range(len(xs)):
        if ax in padded:
            for name in (x, out):
                d = ctx.d(name, ax)
                if d is not None:
                    ctx.solver.block(d, f"Pad pads axis {ax} at {ctx.label}")
        else:
            ctx.eq(x, ax, out, ax)


# ====================================================================== layout
@register_handler("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    ctx.reshape(x, out)  # of a constant: a derived value, its use decides (see finish())
    if ctx.op == "Reshape":
        ctx.size_entries(ctx.inp(1), out, "reshape")


@register_handler("Transpose")
def _transpose(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    xs = ctx.shape(x)
    if xs is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    perm = ctx.attr("perm") or list(reversed(range(len(xs))))
    for j, p in enumerate(perm):
        ctx.eq(x, int(p), out, j)


@register_handler("Concat")
def _concat(ctx: NodeContext) -> None:
    out = ctx.out(0)
    os_ = ctx.shape(out)
    if os_ is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    axis = int(ctx.attr("axis", 0))
    axis = axis + len(os_) if axis < 0 else axis
    start = 0
    for name in ctx.node.input:
        s = ctx.shape(name)
        if s is None:
            ctx.block_node(f"unknown shape of {name} at {ctx.label}")
            return
        for ax in range(len(os_)):
            if ax != axis:
                ctx.eq(name, ax, out, ax)
        n = s[axis]
        if n:
            ctx.part(out, axis, name if n > 1 else None, axis, start, n)
        start += n
    if not all(ctx.is_const(i) or ctx.is_derived(i) for i in ctx.node.input):
        for name in ctx.node.input:  # a cls token / register tokens concatenated to the tokens
            if ctx.is_const(name) or ctx.is_derived(name):
                ctx.param_roles(name, _param_name(ctx, name))


@register_handler("Split")
def _split(ctx: NodeContext) -> None:
    x = ctx.inp(0)
    xs = ctx.shape(x)
    if xs is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    axis = int(ctx.attr("axis", 0))
    axis = axis + len(xs) if axis < 0 else axis
    start = 0
    sizes_name = ctx.inp(1)
    for i, out in enumerate(ctx.node.output):
        os_ = ctx.shape(out)
        if os_ is None:
            ctx.block_node(f"unknown shape of {out} at {ctx.label}")
            return
        for ax in range(len(xs)):
            if ax != axis:
                ctx.eq(x, ax, out, ax)
        n = os_[axis]
        ctx.part(x, axis, out if n > 1 else None, axis, start, n)
        if sizes_name and ctx.is_const(sizes_name):
            d = ctx.d(out, axis)
            if d is not None:
                ctx.state.size_consts.append(SizeConst(ctx.view.const_source(sizes_name), i, n, d, ctx.name))
        start += n


@register_handler("Slice")
def _slice(ctx: NodeContext) -> None:
    x, out = ctx.inp(0), ctx.out(0)
    xs, os_ = ctx.shape(x), ctx.shape(out)
    attributes = not ctx.inp(1)  # opset < 10: bounds are attributes, which a fold cannot rewrite
    if attributes:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes, steps = ctx.attr("axes"), None
    else:
        starts, ends = ctx.ints(ctx.inp(1)), ctx.ints(ctx.inp(2))
        axes = ctx.ints(ctx.inp(3)) if ctx.inp(3) else None
        steps = ctx.ints(ctx.inp(4)) if ctx.inp(4) else None
    if xs is None or os_ is None or starts is None or ends is None:
        ctx.block_node(f"Slice with run-time bounds at {ctx.label}")
        return
    starts, ends = [int(v) for v in starts], [int(v) for v in ends]
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    sliced: dict[int, int] = {}
    strided: set[int] = set()
    for i, a in enumerate(axes):
        a = a + len(xs) if a < 0 else a
        s = starts[i]
        n = xs[a]
        s = max(0, min(n, s + n if s < 0 else s))
        if steps[i] != 1:
            # every other element (rotary embeddings): that axis cannot be followed, the rest can
            strided.add(a)
            for name in (x, out):
                d = ctx.d(name, a)
                if d is not None:
                    ctx.solver.block(d, f"Slice with step {steps[i]} at {ctx.label}")
            continue
        if os_[a] == n:
            continue
        sliced[a] = s
        d = ctx.d(x, a)
        if attributes:
            if d is not None:
                ctx.solver.block(d, f"Slice with attribute bounds (opset < 10) at {ctx.label}")
            continue
        src = ctx.view.const_source(ctx.inp(1))
        if d is not None and s:
            ctx.state.size_consts.append(SizeConst(src, i, starts[i], d, ctx.name, "offset"))
        e = ends[i]
        if d is not None and -n <= e < n:
            ctx.state.size_consts.append(
                SizeConst(ctx.view.const_source(ctx.inp(2)), i, e, d, ctx.name, "offset")
            )
    for ax in range(len(xs)):
        if ax in sliced:
            ctx.part(x, ax, out if os_[ax] > 1 else None, ax, sliced[ax], os_[ax])
        elif ax not in strided:
            ctx.eq(x, ax, out, ax)


@register_handler("Gather")
def _gather(ctx: NodeContext) -> None:
    data, idx, out = ctx.inp(0), ctx.inp(1), ctx.out(0)
    ds, is_, os_ = ctx.shape(data), ctx.shape(idx), ctx.shape(out)
    if ds is None or is_ is None or os_ is None:
        ctx.block_node(f"unknown shape at {ctx.label}")
        return
    axis = int(ctx.attr("axis", 0))
    axis = axis + len(ds) if axis < 0 else axis
    for ax in range(axis):
        ctx.eq(data, ax, out, ax)
    for ax in range(axis + 1, len(ds)):
        ctx.eq(data, ax, out, ax - 1 + len(is_))
    values = ctx.ints(idx)
    n = ds[axis]
    if values is not None and n > 1:
        values = [v + n if v < 0 else v for v in values]
        if len(values) == 1:
            ctx.part(data, axis, None if not is_ or os_[axis] == 1 else out, axis, values[0], 1)
        elif values == list(range(values[0], values[0] + len(values))) and len(is_) == 1:
            ctx.part(data, axis, out, axis, values[0], len(values))
        else:
            d = ctx.d(data, axis)
            if d is not None:
                ctx.solver.block(d, f"Gather picks scattered indices at {ctx.label}")
    elif n > 1:
        d = ctx.d(data, axis)
        if d is not None:
            ctx.solver.flag(d, "gathered", ctx.label)


# ====================================================================== shape computation
@register_handler("Shape", "Size", "ConstantOfShape", "Range", "NonZero")
def _shape_ops(ctx: NodeContext) -> None:
    """Outputs are integers or fresh tensors: no channel flows through."""
    if ctx.op == "ConstantOfShape":
        ctx.size_entries(ctx.inp(0), ctx.out(0), "constant_of_shape")
