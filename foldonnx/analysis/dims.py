"""Union-find over tensor axes ("dims") with split / merge relations.

Handlers state how axes relate:

* ``equal(a, b)`` — index ``i`` of axis ``a`` is index ``i`` of axis ``b``;
* ``compose(parent, [c1, ..., ck])`` — ``parent`` is the row-major flattening of ``c1 x ... x ck``
  (a Reshape splitting hidden width into heads x head_dim, a Flatten);
* ``part(parent, child, start, length)`` — ``child`` (or a dropped length-1 axis when ``child`` is
  None) is ``parent[start:start+length]`` (Split, Slice, Gather, Concat).

After :meth:`DimSolver.solve`, :meth:`DimSolver.expand` maps any axis to its *atoms*: classes of
axes that are not split any further, each with the offset / stride / unit of its channels inside
that axis. Atoms that carry weights are channel groups. Axes of length 1 are never dims.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

__all__ = ["Atom", "DimSolver", "align_sizes"]


@dataclass(frozen=True)
class Atom:
    """Channels of atom class ``cls`` inside an axis: channel c at ``offset + c*stride + [0, unit)``."""

    cls: int
    offset: int
    stride: int
    unit: int
    count: int
    select: tuple[int, ...] = ()  # indices of the selector axes (fused q/k/v) this piece sits at
    via: int = -1  # the class of the outermost slice (Split / Slice part) this piece came through


@dataclass
class Expansion:
    atoms: list[Atom] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    inner: list[tuple[int, str]] = field(default_factory=list)  # classes hidden inside a unit


def align_sizes(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair consecutive runs of *a* and *b* with equal products (sizes > 1). None if impossible."""
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ia, jb = [i], [j]
        pa, pb = a[i], b[j]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(a):
                    return None
                ia.append(i)
                pa *= a[i]
            else:
                j += 1
                if j >= len(b):
                    return None
                jb.append(j)
                pb *= b[j]
        out.append((ia, jb))
        i += 1
        j += 1
    if i != len(a) or j != len(b):
        return None
    return out


class DimSolver:
    """Dims keyed by (value key, axis); relations; resolution into atoms."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.keys: dict[tuple[str, int], int] = {}
        self.key_of: list[tuple[str, int]] = []
        self._composes: list[tuple[int, tuple[int, ...], str]] = []
        self._parts: list[tuple[int, int | None, int, int, str]] = []
        self.blocks: list[tuple[int, str]] = []
        self.flags: list[tuple[int, str, str]] = []  # (dim, flag, node)
        self.comp: dict[int, tuple[int, ...]] = {}
        self.parts: dict[int, dict[tuple[int, int], int | None]] = {}
        self.conflicts: dict[int, str] = {}
        self._cache: dict[int, Expansion] = {}

    # ------------------------------------------------------------------ building
    def dim(self, key: tuple[str, int], size: int) -> int:
        idx = self.keys.get(key)
        if idx is None:
            idx = len(self.parent)
            self.parent.append(idx)
            self.size.append(size)
            self.keys[key] = idx
            self.key_of.append(key)
        return idx

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def equal(self, a: int, b: int, node: str = "") -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            reason = f"axes of sizes {self.size[ra]} and {self.size[rb]} tied at {node}"
            self.blocks += [(ra, reason), (rb, reason)]
            return
        if ra < rb:
            ra, rb = rb, ra
        self.parent[ra] = rb

    def compose(self, parent: int, children: list[int], node: str = "") -> None:
        if len(children) == 1:
            self.equal(parent, children[0], node)
            return
        if math.prod(self.size[c] for c in children) != self.size[parent]:
            self.blocks.append((parent, f"inconsistent reshape at {node}"))
            return
        self._composes.append((parent, tuple(children), node))

    def part(self, parent: int, child: int | None, start: int, length: int, node: str = "") -> None:
        if start == 0 and length == self.size[parent] and child is not None:
            self.equal(parent, child, node)
            return
        self._parts.append((parent, child, start, length, node))

    def block(self, d: int, reason: str) -> None:
        self.blocks.append((d, reason))

    def flag(self, d: int, flag: str, node: str = "") -> None:
        self.flags.append((d, flag, node))

    # ------------------------------------------------------------------ solving
    def solve(self) -> None:
        """Merge classes until compose / part definitions agree (fixpoint)."""
        for _ in range(50):
            changed = False
            comp: dict[int, tuple[int, ...]] = {}
            new_composes: list[tuple[int, tuple[int, ...], str]] = []
            for p, ch, node in self._composes:
                rp = self.find(p)
                rch = tuple(self.find(c) for c in ch)
                old = comp.get(rp)
                if old is None:
                    comp[rp] = rch
                    continue
                if old == rch:
                    continue
                sa = [self.size[c] for c in old]
                sb = [self.size[c] for c in rch]
                runs = align_sizes(sa, sb)
                if runs is None:
                    self.conflicts[rp] = f"axis reshaped in incompatible ways at {node}"
                    continue
                for ia, jb in runs:
                    ca, cb = [old[i] for i in ia], [rch[j] for j in jb]
                    if len(ca) == 1 and len(cb) == 1:
                        if self.find(ca[0]) != self.find(cb[0]):
                            self.equal(ca[0], cb[0], node)
                            changed = True
                    elif len(ca) == 1:
                        new_composes.append((ca[0], tuple(cb), node))
                    elif len(cb) == 1:
                        new_composes.append((cb[0], tuple(ca), node))
                    else:
                        self.conflicts[rp] = f"axis reshaped in incompatible ways at {node}"
            if new_composes:
                known = set(self._composes)
                fresh = [c for c in new_composes if c not in known]
                if fresh:
                    self._composes.extend(fresh)
                    changed = True
            parts: dict[int, dict[tuple[int, int], int | None]] = {}
            for p, child, start, length, node in self._parts:
                rp = self.find(p)
                rc = None if child is None else self.find(child)
                slots = parts.setdefault(rp, {})
                key = (start, length)
                if key in slots:
                    old = slots[key]
                    if old is None:
                        slots[key] = rc
                    elif rc is not None and old != rc:
                        self.equal(old, rc, node)
                        changed = True
                else:
                    slots[key] = rc
            if not changed:
                self.comp = comp
                self.parts = parts
                break
        for rp, slots in self.parts.items():
            ranges = sorted(slots)
            for (s1, l1), (s2, _l2) in itertools.pairwise(ranges):
                if s1 + l1 > s2:
                    self.conflicts.setdefault(rp, "axis split at overlapping ranges")
            if rp in self.comp:
                self.conflicts.setdefault(rp, "axis both reshaped and split")
        self._cache.clear()

    def is_selector(self, root: int) -> bool:
        """All of the axis is taken apart into single indices (e.g. the 3 of a fused qkv)."""
        slots = self.parts.get(root)
        return bool(slots) and all(child is None and length == 1 for (_s, length), child in slots.items())

    def expand(self, d: int) -> Expansion:
        return self._expand(self.find(d), 0)

    def _expand(self, root: int, depth: int) -> Expansion:
        cached = self._cache.get(root)
        if cached is not None:
            return cached
        out = Expansion()
        if depth > 32:
            out.problems.append("axis relations nest too deep")
            return out
        if root in self.conflicts:
            out.problems.append(self.conflicts[root])
        if root in self.parts:
            for (start, _length), child in sorted(self.parts[root].items()):
                if child is None:
                    continue
                sub = self._expand(child, depth + 1)
                out.atoms += [
                    Atom(a.cls, a.offset + start, a.stride, a.unit, a.count, a.select, child)
                    for a in sub.atoms
                ]
                out.problems += sub.problems
                out.inner += sub.inner
        elif root in self.comp:
            children = self.comp[root]
            sizes = [self.size[c] for c in children]
            strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
            j = 0
            while j < len(children) and self.is_selector(children[j]):
                j += 1
            if j < len(children):
                inner = strides[j]
                for k in children[j + 1 :]:
                    out.inner.append((k, "inner axis"))
                sub = self._expand(children[j], depth + 1)
                out.problems += sub.problems
                out.inner += sub.inner
                for sel in itertools.product(*[range(s) for s in sizes[:j]]):
                    base = sum(i * st for i, st in zip(sel, strides[:j], strict=True)) if sel else 0
                    for a in sub.atoms:
                        out.atoms.append(
                            Atom(
                                a.cls,
                                base + a.offset * inner,
                                a.stride * inner,
                                a.unit * inner,
                                a.count,
                                tuple(sel) + a.select,
                                a.via,
                            )
                        )
        else:
            out.atoms.append(Atom(root, 0, 1, 1, self.size[root]))
        self._cache[root] = out
        return out
