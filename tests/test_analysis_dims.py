"""The axis solver on its own: union-find, reshape alignment, splits, selectors, conflicts."""

from __future__ import annotations

from foldonnx.analysis.dims import Atom, DimSolver, align_sizes


def test_align_sizes() -> None:
    assert align_sizes([197, 384], [197, 6, 64]) == [([0], [0]), ([1], [1, 2])]
    assert align_sizes([3, 6, 64], [1152]) == [([0, 1, 2], [0])]
    assert align_sizes([6, 4], [4, 6]) == [([0, 1], [0, 1])]  # mixes axes: one many-to-many run
    assert align_sizes([6, 4], [5, 5]) is None


def test_fused_qkv_expands_into_three_head_members() -> None:
    s = DimSolver()
    p = s.dim(("qkv", 2), 1152)
    sel, heads, hd = s.dim(("r", 2), 3), s.dim(("r", 3), 6), s.dim(("r", 4), 64)
    s.compose(p, [sel, heads, hd])
    for i in range(3):  # Gather index i on the selector axis
        s.part(sel, None, i, 1)
    out = s.dim(("o", 1), 384)
    s.compose(out, [s.dim(("t", 1), 6), s.dim(("t", 2), 64)])
    s.equal(s.dim(("t", 1), 6), heads)
    s.solve()
    atoms = s.expand(p).atoms
    assert [(a.offset, a.stride, a.unit, a.count, a.select) for a in atoms] == [
        (0, 64, 64, 6, (0,)),
        (384, 64, 64, 6, (1,)),
        (768, 64, 64, 6, (2,)),
    ]
    assert {a.cls for a in atoms} == {s.find(heads)}
    assert s.expand(out).atoms == [Atom(s.find(heads), 0, 64, 64, 6)]
    assert s.is_selector(s.find(sel))


def test_concat_parts_and_equal_sizes() -> None:
    s = DimSolver()
    a, b, c = s.dim(("a", 1), 4), s.dim(("b", 1), 6), s.dim(("c", 1), 10)
    s.part(c, a, 0, 4)
    s.part(c, b, 4, 6)
    s.equal(a, s.dim(("d", 1), 6))  # different sizes: blocked, not merged
    s.solve()
    assert [(x.cls, x.offset) for x in s.expand(c).atoms] == [(s.find(a), 0), (s.find(b), 4)]
    assert s.find(a) != s.find(s.dim(("d", 1), 6)) and len(s.blocks) == 2


def test_two_reshapes_of_one_axis_are_unified_or_conflict() -> None:
    s = DimSolver()
    p = s.dim(("x", 1), 384)
    h1, d1 = s.dim(("y", 1), 6), s.dim(("y", 2), 64)
    h2, d2 = s.dim(("z", 1), 6), s.dim(("z", 2), 64)
    s.compose(p, [h1, d1])
    s.compose(p, [h2, d2])
    s.solve()
    assert s.find(h1) == s.find(h2) and s.find(d1) == s.find(d2)
    q = s.dim(("q", 1), 24)
    s.compose(q, [s.dim(("u", 1), 6), s.dim(("u", 2), 4)])
    s.compose(q, [s.dim(("v", 1), 4), s.dim(("v", 2), 6)])
    s.solve()
    assert "incompatible" in " ".join(s.expand(q).problems)
