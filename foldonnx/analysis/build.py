"""Turn solved axis classes into :class:`~foldonnx.analysis.channel_groups.ChannelGroup` objects."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from foldonnx.analysis.channel_groups import ChannelGroup, DimRef, GroupKind, Member, NormRef, Role
from foldonnx.analysis.dims import Atom, Expansion
from foldonnx.analysis.handlers import AnalysisState

__all__ = ["build_groups"]

logger = logging.getLogger(__name__)

_TRANSPARENT = set(
    [
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Cast",
        "Identity",
        "Slice",
        "Gather",
        "Split",
        "Flatten",
        "Expand",
        "Concat",
        "Dropout",
    ]
)


@dataclass
class _Draft:
    cls: int
    count: int
    members: list[tuple[Member, int, Atom]] = field(default_factory=list)  # member, unit, atom
    reasons: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    norms: list[NormRef] = field(default_factory=list)
    dims: list[DimRef] = field(default_factory=list)
    unit: int = 1


def _atom_classes(state: AnalysisState, d: int) -> tuple[set[int], list[str]]:
    """All atom classes inside axis ``d`` (its atoms and, recursively, the classes of its units)."""
    solver = state.solver
    out: set[int] = set()
    problems: list[str] = []
    todo = [d]
    seen: set[int] = set()
    while todo:
        x = solver.find(todo.pop())
        if x in seen:
            continue
        seen.add(x)
        exp = solver.expand(x)
        out.update(a.cls for a in exp.atoms)
        problems += exp.problems
        todo += [k for k, _ in exp.inner]
    return out, problems


def build_groups(state: AnalysisState) -> list[ChannelGroup]:
    """The channel groups of an analysed graph, in stages: members per class of axes, the
    classes that are groups (they have a producer), why a group is blocked, its unit, the size
    constants and norms that encode its width, and the frozen :class:`ChannelGroup` records."""
    drafts, inner_of = _draft_members(state)
    groups = _groups_with_producers(state, drafts)
    _block_reasons(state, groups, inner_of)
    _assign_units(groups)
    _attach_dims(state, groups)
    _attach_norms(state, groups)
    return _assemble(state, groups)


def _add_reason(groups: dict[int, _Draft], cls: int, text: str) -> None:
    if cls in groups and text not in groups[cls].reasons:
        groups[cls].reasons.append(text)


def _draft_members(state: AnalysisState) -> tuple[dict[int, _Draft], dict[int, str]]:
    """Every role declared by the handlers, expanded into the classes of axes it covers; and
    the classes that are also flattened into a wider axis (and where)."""
    view, solver = state.view, state.solver
    drafts: dict[int, _Draft] = {}
    inner_of: dict[int, str] = {}
    for r in state.roles:
        exp = solver.expand(r.dim)
        for k, _ in exp.inner:
            for cls in _atom_classes(state, k)[0]:
                inner_of.setdefault(cls, f"{r.tensor} (at {view.node_names[r.node_idx]})")
        for atom in exp.atoms:
            draft = drafts.setdefault(atom.cls, _Draft(atom.cls, atom.count))
            node = view.nodes[r.node_idx]
            member = Member(
                tensor=r.tensor,
                axis=r.axis,
                role=r.role,
                node=view.node_names[r.node_idx],
                op_type=node.op_type,
                param=r.param,
                offset=atom.offset,
                unit_stride=None if atom.stride == atom.unit else atom.stride,
            )
            draft.members.append((member, atom.unit, atom))
            for p in exp.problems:
                draft.reasons.append(p)
    return drafts, inner_of


def _groups_with_producers(state: AnalysisState, drafts: dict[int, _Draft]) -> dict[int, _Draft]:
    """A group needs a producer; a class whose producer is a weight computed at run time is
    listed too (blocked), so that it does not silently disappear."""
    data_const: set[int] = set()
    for d, flag, _node in state.solver.flags:
        if flag == "const_data":
            data_const |= _atom_classes(state, d)[0]
    return {
        cls: d
        for cls, d in drafts.items()
        if any(m.role == Role.PRODUCER for m, _, _ in d.members)
        or (cls in data_const and any(m.role == Role.CONSUMER for m, _, _ in d.members))
    }


def _block_reasons(state: AnalysisState, groups: dict[int, _Draft], inner_of: dict[int, str]) -> None:
    """Why groups cannot be folded: blocked ops, graph inputs and outputs, reductions over the
    channels, run-time indexing, opaque or unrelated run-time sizes, wider flattened axes."""
    view, solver = state.view, state.solver
    for d, text in solver.blocks:
        classes, problems = _atom_classes(state, d)
        for cls in classes:
            _add_reason(groups, cls, text)
            for p in problems:
                _add_reason(groups, cls, p)
    for name in view.graph_outputs:
        shape = view.shape(name) or ()
        for ax, s in enumerate(shape):
            key = (name, ax) if not view.is_const(name) else None
            if s > 1 and key in solver.keys:
                for cls in _atom_classes(state, solver.keys[key])[0]:
                    _add_reason(groups, cls, f"reaches graph output {name}")
    for name in view.graph_inputs:
        for ax, s in enumerate(view.shape(name) or ()):
            if s > 1 and (name, ax) in solver.keys:
                for cls in _atom_classes(state, solver.keys[(name, ax)])[0]:
                    _add_reason(groups, cls, f"comes from graph input {name}")
    for d, flag, node in solver.flags:
        for cls in _atom_classes(state, d)[0]:
            if cls not in groups:
                continue
            groups[cls].flags.add(flag)
            if flag == "reduced" and node not in state.excused_reductions:
                _add_reason(groups, cls, f"reduced over the channel axis at {node}")
            elif flag == "gathered":
                _add_reason(groups, cls, f"indexed at run time at {node}")
            elif flag == "opaque_size":
                _add_reason(groups, cls, f"axis size computed by an opaque shape expression at {node}")
    for cls, where in inner_of.items():
        _add_reason(groups, cls, f"channels also flattened into a wider axis of {where}")
    for d, sd, node in state.runtime_sizes:
        a, b = _atom_classes(state, d)[0], _atom_classes(state, sd)[0]
        if a != b:
            for cls in a | b:
                _add_reason(groups, cls, f"axis sized at run time from an unrelated tensor at {node}")


def _assign_units(groups: dict[int, _Draft]) -> None:
    """The scalars per channel (head_dim for heads): the producers' unit, members must agree."""
    for g in groups.values():
        units = Counter(u for m, u, _ in g.members if m.role == Role.PRODUCER) or Counter(
            u for _, u, _ in g.members
        )
        g.unit = units.most_common(1)[0][0]
        odd = sorted({u for _, u, _ in g.members if u != g.unit})
        if odd:
            g.reasons.append(f"members disagree on the unit size ({g.unit} vs {odd})")


def _attach_dims(state: AnalysisState, groups: dict[int, _Draft]) -> None:
    """Size constants (Reshape targets, split sizes, num_heads) that encode a group's width."""
    solver = state.solver
    for sc in state.size_consts:
        exp = solver.expand(sc.dim)
        atoms = [a for a in exp.atoms if a.cls in groups]
        if not atoms:
            # a group's axis flattened as an inner factor of a wider axis (the windows x heads
            # batch of windowed attention): the size is a multiple of the group's size
            factor = _inner_factor_of_one_group(state, exp, sc.value, groups) if sc.kind == "size" else None
            if factor is not None:
                cls, what, multiple = factor
                groups[cls].dims.append(DimRef(sc.tensor, sc.index, what, sc.node, multiple))
            continue
        if sc.kind == "size" and len(exp.atoms) == 1 and atoms[0].offset == 0:
            g = groups[atoms[0].cls]
            if sc.value == g.count * g.unit:
                g.dims.append(DimRef(sc.tensor, sc.index, "total", sc.node))
                continue
            if sc.value == g.count:
                g.dims.append(DimRef(sc.tensor, sc.index, "channels", sc.node))
                continue
        # a fused width (3 x D of a qkv) or an offset into the axis (where the k slice starts)
        prefix = _prefix_of_one_group(exp.atoms, sc.value, groups)
        if prefix is not None:
            cls, multiple = prefix
            groups[cls].dims.append(DimRef(sc.tensor, sc.index, "total", sc.node, multiple))
            continue
        what = "size" if sc.kind == "size" else "offset"
        for a in atoms:
            _add_reason(
                groups,
                a.cls,
                f"{what} {sc.value} in {sc.tensor} at {sc.node} depends on the widths of several groups",
            )


def _attach_norms(state: AnalysisState, groups: dict[int, _Draft]) -> None:
    for d, norm in state.norms:
        for cls in _atom_classes(state, d)[0]:
            if cls in groups and norm not in groups[cls].norms:
                groups[cls].norms.append(norm)


def _group_params(state: AnalysisState, g: _Draft, members: list[Member]) -> int:
    """Scalars of all members' slices (a tensor on one axis counted once)."""
    params = 0
    seen: set[tuple[str, int, int, int | None]] = set()
    for m in members:
        key = (m.tensor, m.axis, m.offset, m.unit_stride)
        if key in seen:
            continue
        seen.add(key)
        proto = state.view.const_proto(m.tensor)
        dims = list(proto.dims) if proto is not None else []
        if dims and dims[m.axis]:
            params += g.count * g.unit * math.prod(dims) // dims[m.axis]
    return params


def _group_notes(
    state: AnalysisState,
    g: _Draft,
    members: list[Member],
    users: dict[str, set[int]],
    node_index: dict[str, int],
) -> list[str]:
    """Shared member tensors (copy before editing) and depthwise convs whose group follows."""
    notes = []
    shared = sorted({m.tensor for m in members if len(users[m.tensor]) > 1})
    if shared:
        notes.append(f"{len(shared)} member tensors are shared with other nodes: copy before editing")
    width = g.count * g.unit
    grouped = sorted(
        {
            m.node
            for m in members
            if m.op_type in ("Conv", "ConvTranspose")
            and any(
                a.name == "group" and a.i == width > 1 for a in state.view.nodes[node_index[m.node]].attribute
            )
        }
    )
    if grouped:
        more = f" and {len(grouped) - 3} more" if len(grouped) > 3 else ""
        notes.append(f"Conv group attribute equals the width (depthwise) at {', '.join(grouped[:3])}{more}")
    return notes


def _assemble(state: AnalysisState, groups: dict[int, _Draft]) -> list[ChannelGroup]:
    """Frozen groups in graph order (of their first member), with kind, name and size."""
    view = state.view
    users: dict[str, set[int]] = defaultdict(set)
    for r in state.roles:
        users[r.tensor].add(r.node_idx)
    node_index = {n: i for i, n in enumerate(view.node_names)}
    order = {cls: min(node_index.get(m.node, 0) for m, _, _ in g.members) for cls, g in groups.items()}
    result: list[ChannelGroup] = []
    for gid, cls in enumerate(sorted(groups, key=lambda c: order[c])):
        g = groups[cls]
        kind = _kind(g)
        members = list(dict.fromkeys(_tag_members(state, g, kind, node_index)))  # drop exact repeats
        result.append(
            ChannelGroup(
                id=gid,
                kind=kind,
                channels=g.count,
                unit=g.unit,
                members=tuple(members),
                dims=tuple(dict.fromkeys(g.dims)),
                norms=tuple(g.norms),
                name=_name(state, g, kind, node_index),
                params=_group_params(state, g, members),
                blocked=_reason_text(g.reasons),
                notes=tuple(_group_notes(state, g, members, users, node_index)),
            )
        )
    return result


def _inner_factor_of_one_group(
    state: AnalysisState, exp: Expansion, value: int, groups: dict[int, _Draft]
) -> tuple[int, str, int] | None:
    """(group, what, m) when an axis of size ``value`` is a row-major flattening whose only
    group-carrying factor is one whole inner axis of one group (``value`` = m x its count or
    width); None otherwise."""
    solver = state.solver
    found: list[tuple[int, int]] = []  # (group class, size of the inner axis)
    for k, _ in exp.inner:
        root = solver.find(k)
        classes = _atom_classes(state, root)[0] & set(groups)
        if not classes:
            continue
        sub = solver.expand(root)
        if root in groups:
            found.append((root, solver.size[root]))
        elif (
            len(sub.atoms) == 1 and not sub.inner and sub.atoms[0].cls in groups and sub.atoms[0].offset == 0
        ):
            found.append((sub.atoms[0].cls, solver.size[root]))
        else:
            return None
    if len(found) != 1:
        return None
    cls, size = found[0]
    g = groups[cls]
    if size <= 0 or value % size:
        return None
    if size == g.count:
        return cls, "channels", value // size
    if size == g.count * g.unit:
        return cls, "total", value // size
    return None


def _prefix_of_one_group(atoms: list[Atom], value: int, groups: dict[int, _Draft]) -> tuple[int, int] | None:
    """(group, m) when positions ``[0, value)`` of an axis are exactly m whole contiguous atoms of
    one group (so ``value`` = m x its width); None otherwise."""
    if value <= 0:
        return None
    covered = 0
    cls: int | None = None
    m = 0
    for a in sorted(atoms, key=lambda a: a.offset):
        if a.offset >= value:
            break
        width = a.count * a.unit
        if a.offset != covered or (a.count > 1 and a.stride != a.unit) or a.cls not in groups:
            return None
        if cls is not None and a.cls != cls:
            return None
        cls, m, covered = a.cls, m + 1, covered + width
    if cls is None or covered != value or groups[cls].count * groups[cls].unit * m != value:
        return None
    return cls, m


def _reason_text(reasons: list[str], keep: int = 4) -> str | None:
    """One line: the first few distinct reasons and how many more there are."""
    unique = list(dict.fromkeys(reasons))
    if not unique:
        return None
    text = "; ".join(unique[:keep])
    return text + (f"; and {len(unique) - keep} more" if len(unique) > keep else "")


def _kind(g: _Draft) -> GroupKind:
    prod_ops = {m.op_type for m, _, _ in g.members if m.role == Role.PRODUCER}
    cons_ops = {m.op_type for m, _, _ in g.members if m.role == Role.CONSUMER}
    linear = {"MatMul", "Gemm", "Einsum"}
    convs = {"Conv", "ConvTranspose"}
    if g.unit > 1 and "attn_batch" in g.flags:
        return GroupKind.HEADS
    layernorm = any(n.kind.startswith("layernorm") or n.kind == "rmsnorm" for n in g.norms)
    if "residual" in g.flags and (layernorm or prod_ops & linear):
        return GroupKind.RESIDUAL
    if "depthwise" in g.flags or ("residual" in g.flags and prod_ops & convs):
        return GroupKind.DEPTHWISE
    if "pooled_out" in g.flags and "spatial_out" not in g.flags and cons_ops and cons_ops <= convs:
        return GroupKind.SE
    if not cons_ops:
        return GroupKind.OTHER
    if prod_ops <= linear and g.unit == 1:
        return GroupKind.MLP
    if prod_ops <= convs:
        return GroupKind.CONV
    return GroupKind.OTHER


def _tag_members(
    state: AnalysisState, g: _Draft, kind: GroupKind, node_index: dict[str, int]
) -> list[Member]:
    from dataclasses import replace

    members = [m for m, _, _ in g.members]
    if kind != GroupKind.HEADS:
        return members
    out = []
    for m, _, atom in g.members:
        if m.role == Role.CONSUMER:
            tag = "o"
        elif atom.select and len(atom.select) == 1:
            tag = "qkv"[atom.select[0]] if atom.select[0] < 3 else ""
        elif atom.via >= 0:  # cut out of a fused tensor by Split / Slice: follow that piece
            tag = _attention_side(state, -1, _values_of_class(state, atom.via))
        else:
            tag = _attention_side(state, node_index.get(m.node, -1))
        out.append(replace(m, tag=tag))
    return out


def _values_of_class(state: AnalysisState, cls: int) -> list[str]:
    """Activations with an axis in class ``cls``."""
    solver = state.solver
    return [
        key[0]
        for d, key in enumerate(solver.key_of)
        if solver.find(d) == cls and not state.view.is_const(key[0]) and "@" not in key[0]
    ][:1]


def _attention_side(state: AnalysisState, idx: int, start: list[str] | None = None) -> str:
    """'q', 'k' or 'v': where the output of node ``idx`` (or the values ``start``) enters the
    attention MatMuls."""
    view = state.view
    if idx < 0 and not start:
        return ""
    hits: set[str] = set()
    queue = deque([(o, 0) for o in (start if start else view.nodes[idx].output)])
    seen: set[str] = set()
    while queue:
        value, depth = queue.popleft()
        if value in seen or depth > 24:
            continue
        seen.add(value)
        for c in view.consumers.get(value, []):
            node = view.nodes[c]
            if node.op_type == "MatMul" and not any(view.is_const(i) for i in node.input):
                pos = list(node.input).index(value)
                score = _reaches(state, node.output[0], "Softmax", 4)
                hits.add(("q" if pos == 0 else "k") if score else ("v" if pos == 1 else "?"))
            elif node.op_type in _TRANSPARENT:
                queue.extend((o, depth + 1) for o in node.output)
    return hits.pop() if len(hits) == 1 else ""


def _reaches(state: AnalysisState, value: str, op: str, depth: int) -> bool:
    view = state.view
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for c in view.consumers.get(v, []):
                if view.nodes[c].op_type == op:
                    return True
                nxt += list(view.nodes[c].output)
        frontier = nxt
    return False


def _name(state: AnalysisState, g: _Draft, kind: GroupKind, node_index: dict[str, int]) -> str:
    view = state.view
    paths = []
    for m, _, _ in g.members:
        if m.role in (Role.PRODUCER, Role.CONSUMER):
            paths.append(view.module_path(node_index.get(m.node, 0), m.tensor))
    if all(p in view.node_names for p in paths):
        # no scope metadata (e.g. after a version conversion): the named parameters still say
        # where the group lives (a qkv bias -> blocks.0.attn.qkv)
        named = [
            view.module_path(node_index.get(m.node, 0), m.tensor)
            for m, _, _ in g.members
            if m.role == Role.PARAM
        ]
        paths = [p for p in named if p not in view.node_names][:1] or paths
    split = [p.split(".") for p in paths if p]
    common: list[str] = []
    if split:
        for parts in zip(*split, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
    prefix = ".".join(common)
    # members spread over several blocks: "_blocks.3-5", "layer1+layer2"
    nxt = sorted({p[len(common)] for p in split if len(p) > len(common)})
    span = ""
    if len(nxt) > 1:
        if all(x.isdigit() for x in nxt):
            nums = sorted(int(x) for x in nxt)
            span = f"{nums[0]}-{nums[-1]}"
        elif len(nxt) == 2 or not common:
            span = "+".join(nxt[:3]) + ("+..." if len(nxt) > 3 else "")
    full = ".".join(x for x in (prefix, span) if x)
    if kind == GroupKind.RESIDUAL:
        return f"residual {full}".strip() if full and len(nxt) <= 3 and prefix else "residual"
    if kind in (GroupKind.MLP, GroupKind.HEADS) and prefix:
        return prefix  # "blocks.3.mlp.fc1" & "blocks.3.mlp.fc2" -> "blocks.3.mlp"
    if full and len(split) > 1:
        return full
    return paths[0] if paths else ""
