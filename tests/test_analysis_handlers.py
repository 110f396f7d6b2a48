"""Channel-group analysis on tiny graphs: one or more tests per op handler.

Every test asserts the exact groups (kind, channels x unit, members with axis / offset / role,
DimRefs, blocked reasons) and, for foldable groups, that deleting a channel keeps the graph valid
and equal to zeroing it (see ``test_analysis_foldcheck``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_analysis_foldcheck import build, check_all_groups

from foldonnx.analysis import HANDLERS, find_channel_groups, summarize_groups
from foldonnx.analysis.channel_groups import DimRef, GroupKind, Role, groups_from_json, groups_to_json
from foldonnx.errors import AnalysisError

H = '<ir_version: 8, opset_import: ["" : 17]>\n'
H20 = '<ir_version: 10, opset_import: ["" : 20]>\n'


def members(group) -> set[tuple]:
    return {(m.tensor, m.axis, m.role.value, m.offset, m.unit_stride, m.tag) for m in group.members}


def by_channels(groups, n: int):
    found = [g for g in groups if g.channels == n]
    assert len(found) == 1, [str(g) for g in groups]
    return found[0]


# ---------------------------------------------------------------------------- MatMul / Gemm
def test_mlp_matmul_add_gelu() -> None:
    model = build(
        H20
        + """
    g (float[1, 4, 8] x, float[8, 16] w1, float[16] b1, float[16, 8] w2, float[8] b2) => (float[1, 4, 8] y) {
        h = MatMul(x, w1)
        hb = Add(h, b1)
        a = Gelu(hb)
        z = MatMul(a, w2)
        y = Add(z, b2)
    }"""
    )
    groups = find_channel_groups(model)
    assert len(groups) == 2
    hidden = by_channels(groups, 16)
    assert hidden.kind == GroupKind.MLP and hidden.unit == 1 and hidden.foldable
    assert members(hidden) == {
        ("w1", 1, "producer", 0, None, ""),
        ("b1", 0, "param", 0, None, ""),
        ("w2", 0, "consumer", 0, None, ""),
    }
    assert hidden.params == 8 * 16 + 16 + 16 * 8
    out = by_channels(groups, 8)
    assert not out.foldable and "reaches graph output y" in out.blocked
    assert check_all_groups(model) == 1


def test_gemm_transb_and_transa() -> None:
    model = build(
        H
        + """
    g (float[2, 8] x, float[16, 8] w1, float[16] b1, float[16, 4] w2) => (float[2, 4] y) {
        h = Gemm <transB = 1> (x, w1, b1)
        a = Relu(h)
        y = Gemm(a, w2)
    }"""
    )
    hidden = by_channels(find_channel_groups(model), 16)
    assert members(hidden) == {
        ("w1", 0, "producer", 0, None, ""),
        ("b1", 0, "param", 0, None, ""),
        ("w2", 0, "consumer", 0, None, ""),
    }
    assert hidden.kind == GroupKind.MLP
    assert check_all_groups(model) == 1


def test_non_constant_weight_is_blocked() -> None:
    model = build(
        H
        + """
    g (float[1, 4, 8] x, float[8, 16] w1, float[16, 8] v) => (float[1, 4, 8] y) {
        h = MatMul(x, w1)
        a = Relu(h)
        y = MatMul(a, v)
    }"""
    )
    hidden = by_channels(find_channel_groups(model), 16)
    assert not hidden.foldable and "comes from graph input v" in hidden.blocked


# ---------------------------------------------------------------------------- conv / BN / pooling
CNN = (
    H
    + """
g (float[1, 3, 8, 8] x, float[6, 3, 3, 3] w1, float[6] b1, float[6] g1, float[6] p1, float[6] s1, float[6] s2,
   float[6, 1, 3, 3] wd, float[5, 6, 1, 1] w2, float[5] b2, float[4, 5] w3) => (float[1, 4] y) {
    zero = Constant <value = float {0.0}> ()
    six = Constant <value = float {6.0}> ()
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    n1 = BatchNormalization(c1, g1, p1, s1, s2)
    r1 = Clip(n1, zero, six)
    d1 = Conv <group = 6, pads = [1, 1, 1, 1]> (r1, wd)
    m1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (d1)
    r2 = HardSwish(m1)
    c2 = Conv(r2, w2, b2)
    gp = GlobalAveragePool(c2)
    f = Flatten(gp)
    y = Gemm <transB = 1> (f, w3)
}
"""
)


def _cnn() -> onnx.ModelProto:
    return build(CNN)


def test_conv_bn_depthwise_clip_pool() -> None:
    model = _cnn()
    groups = find_channel_groups(model)
    six = by_channels(groups, 6)
    assert six.kind == GroupKind.DEPTHWISE and six.foldable
    assert members(six) == {
        ("w1", 0, "producer", 0, None, ""),
        ("b1", 0, "param", 0, None, ""),
        ("g1", 0, "param", 0, None, ""),
        ("p1", 0, "param", 0, None, ""),
        ("s1", 0, "stat", 0, None, ""),
        ("s2", 0, "stat", 0, None, ""),
        ("wd", 0, "producer", 0, None, ""),
        ("w2", 1, "consumer", 0, None, ""),
    }
    five = by_channels(groups, 5)
    assert five.kind == GroupKind.CONV and five.foldable
    assert members(five) == {
        ("w2", 0, "producer", 0, None, ""),
        ("b2", 0, "param", 0, None, ""),
        ("w3", 1, "consumer", 0, None, ""),
    }
    assert not by_channels(groups, 4).foldable
    assert check_all_groups(model) == 2


def test_grouped_conv_is_blocked_with_reason() -> None:
    model = build(
        H
        + """
    g (float[1, 4, 8, 8] x, float[8, 4, 1, 1] w1, float[8, 4, 3, 3] w2,
        float[2, 8, 1, 1] w3) => (float[1, 2, 8, 8] y) {
        a = Conv(x, w1)
        b = Conv <group = 2, pads = [1, 1, 1, 1]> (a, w2)
        y = Conv(b, w3)
    }"""
    )
    groups = find_channel_groups(model)
    first = [g for g in groups if any(m.tensor == "w1" and m.role == Role.PRODUCER for m in g.members)][0]
    assert not first.foldable and "grouped Conv (group=2, 8->8)" in first.blocked


def test_conv_transpose() -> None:
    model = build(
        H
        + """
    g (float[1, 4, 4, 4] x, float[4, 6, 2, 2] w1, float[6] b1,
        float[3, 6, 1, 1] w2) => (float[1, 3, 8, 8] y) {
        a = ConvTranspose <strides = [2, 2]> (x, w1, b1)
        r = Relu(a)
        y = Conv(r, w2)
    }"""
    )
    six = by_channels(find_channel_groups(model), 6)
    assert members(six) == {
        ("w1", 1, "producer", 0, None, ""),
        ("b1", 0, "param", 0, None, ""),
        ("w2", 1, "consumer", 0, None, ""),
    }
    assert six.kind == GroupKind.CONV
    assert check_all_groups(model) == 1


def test_squeeze_excitation() -> None:
    model = build(
        H
        + """
    g (float[1, 3, 8, 8] x, float[8, 3, 1, 1] w0, float[2, 8, 1, 1] wr, float[2] br, float[8, 2, 1, 1] we,
       float[8] be, float[4, 8, 1, 1] w3) => (float[1, 4, 8, 8] y) {
        a = Conv(x, w0)
        p = GlobalAveragePool(a)
        r = Conv(p, wr, br)
        rr = Relu(r)
        e = Conv(rr, we, be)
        s = HardSigmoid(e)
        gated = Mul(a, s)
        y = Conv(gated, w3)
    }"""
    )
    groups = find_channel_groups(model)
    se = by_channels(groups, 2)
    assert se.kind == GroupKind.SE and se.foldable
    assert members(se) == {
        ("wr", 0, "producer", 0, None, ""),
        ("br", 0, "param", 0, None, ""),
        ("we", 1, "consumer", 0, None, ""),
    }
    main = by_channels(groups, 8)
    assert {m.tensor for m in main.members} == {"w0", "wr", "we", "be", "w3"}
    assert check_all_groups(model) == 2


def test_resize_pad_and_average_pool() -> None:
    model = build(
        H
        + """
    g (float[1, 3, 4, 4] x, float[6, 3, 1, 1] w1, float[2, 6, 1, 1] w2,
        float[2, 6, 1, 1] w3) => (float[1, 2, 10, 10] y, float[1, 2, 4, 4] z) {
        a = Conv(x, w1)
        sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
        u = Resize <mode = "nearest"> (a, , sc)
        pads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()
        p = Pad(u, pads)
        y = Conv(p, w2)
        q = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a)
        z = Conv(q, w3)
    }"""
    )
    six = by_channels(find_channel_groups(model), 6)
    assert six.foldable and {m.tensor for m in six.members} == {"w1", "w2", "w3"}
    assert check_all_groups(model) == 1


def test_pad_on_channel_axis_is_blocked() -> None:
    model = build(
        H
        + """
    g (float[1, 3, 4, 4] x, float[6, 3, 1, 1] w1, float[2, 8, 1, 1] w2) => (float[1, 2, 4, 4] y) {
        a = Conv(x, w1)
        pads = Constant <value = int64[8] {0, 1, 0, 0, 0, 1, 0, 0}> ()
        p = Pad(a, pads)
        y = Conv(p, w2)
    }"""
    )
    six = by_channels(find_channel_groups(model), 6)
    assert not six.foldable and "Pad pads axis 1" in six.blocked


# ---------------------------------------------------------------------------- concat / split / slice
def test_concat_gives_offsets_in_the_consumer() -> None:
    model = build(
        H
        + """
    g (float[1, 3, 4, 4] x, float[4, 3, 1, 1] wa, float[6, 3, 1, 1] wb,
        float[2, 10, 1, 1] wc) => (float[1, 2, 4, 4] y) {
        a = Conv(x, wa)
        b = Conv(x, wb)
        c = Concat <axis = 1> (a, b)
        r = Relu(c)
        y = Conv(r, wc)
    }"""
    )
    groups = find_channel_groups(model)
    four, six = by_channels(groups, 4), by_channels(groups, 6)
    assert members(four) == {("wa", 0, "producer", 0, None, ""), ("wc", 1, "consumer", 0, None, "")}
    assert members(six) == {("wb", 0, "producer", 0, None, ""), ("wc", 1, "consumer", 4, None, "")}
    assert check_all_groups(model) == 2


def test_split_gives_offsets_in_the_producer() -> None:
    model = build(
        H
        + """
    g (float[1, 3, 4, 4] x, float[10, 3, 1, 1] w, float[2, 4, 1, 1] wa,
        float[2, 6, 1, 1] wb) => (float[1, 2, 4, 4] y) {
        c = Conv(x, w)
        sizes = Constant <value = int64[2] {4, 6}> ()
        a, b = Split <axis = 1> (c, sizes)
        ya = Conv(a, wa)
        yb = Conv(b, wb)
        y = Add(ya, yb)
    }"""
    )
    groups = find_channel_groups(model)
    four, six = by_channels(groups, 4), by_channels(groups, 6)
    assert members(four) == {("w", 0, "producer", 0, None, ""), ("wa", 1, "consumer", 0, None, "")}
    assert members(six) == {("w", 0, "producer", 4, None, ""), ("wb", 1, "consumer", 0, None, "")}
    assert set(four.dims) == {DimRef("sizes", 0, "total", four.dims[0].node)}
    assert [d.index for d in six.dims] == [1]
    assert check_all_groups(model) == 2


def test_slice_and_flatten_mismatch() -> None:
    model = build(
        H
        + """
    g (float[1, 3, 2, 2] x, float[6, 3, 1, 1] w1, float[24, 5] w2) => (float[1, 5] y) {
        a = Conv(x, w1)
        f = Flatten(a)
        y = MatMul(f, w2)
    }"""
    )
    six = by_channels(find_channel_groups(model), 6)
    assert not six.foldable and "disagree on the unit size" in six.blocked


# ---------------------------------------------------------------------------- attention
FUSED_ATTN = (
    H20
    + """
g (float[1, 5, 8] x, float[8, 24] wqkv, float[24] bqkv, float[8, 8] wo, float[8] bo) => (float[1, 5, 8] y) {
    qkv = MatMul(x, wqkv)
    qkvb = Add(qkv, bqkv)
    s5 = Constant <value = int64[5] {1, 5, 3, 2, 4}> ()
    r = Reshape(qkvb, s5)
    t = Transpose <perm = [2, 0, 3, 1, 4]> (r)
    i0 = Constant <value = int64 {0}> ()
    i1 = Constant <value = int64 {1}> ()
    i2 = Constant <value = int64 {2}> ()
    q = Gather <axis = 0> (t, i0)
    k = Gather <axis = 0> (t, i1)
    v = Gather <axis = 0> (t, i2)
    kt = Transpose <perm = [0, 1, 3, 2]> (k)
    sc = Constant <value = float {0.5}> ()
    qs = Mul(q, sc)
    a = MatMul(qs, kt)
    p = Softmax <axis = -1> (a)
    o = MatMul(p, v)
    ot = Transpose <perm = [0, 2, 1, 3]> (o)
    s3 = Constant <value = int64[3] {1, 5, 8}> ()
    m = Reshape(ot, s3)
    z = MatMul(m, wo)
    zb = Add(z, bo)
    y = Add(x, zb)
}
"""
)


def test_fused_qkv_heads() -> None:
    model = build(FUSED_ATTN)
    groups = find_channel_groups(model)
    heads = [g for g in groups if g.kind == GroupKind.HEADS]
    assert len(heads) == 1
    h = heads[0]
    assert (h.channels, h.unit, h.foldable) == (2, 4, True)
    assert members(h) == {
        ("wqkv", 1, "producer", 0, None, "q"),
        ("wqkv", 1, "producer", 8, None, "k"),
        ("wqkv", 1, "producer", 16, None, "v"),
        ("bqkv", 0, "param", 0, None, "q"),
        ("bqkv", 0, "param", 8, None, "k"),
        ("bqkv", 0, "param", 16, None, "v"),
        ("wo", 0, "consumer", 0, None, "o"),
    }
    assert {(d.tensor, d.index, d.what) for d in h.dims} == {("s5", 3, "channels"), ("s3", 2, "total")}
    # the residual (x + attention) reaches the output: blocked with that reason
    res = by_channels(groups, 8)
    assert not res.foldable and "reaches graph output y" in res.blocked
    assert check_all_groups(model) == 1


SEPARATE_ATTN = (
    H
    + """
g (float[1, 5, 8] x, float[8, 8] wq, float[8, 8] wk, float[8, 8] wv, float[8, 8] wo, float[8] g1, float[8] b1,
   float[8, 3] w9) => (float[1, 5, 3] y) {
    n = LayerNormalization <axis = -1> (x, g1, b1)
    k = MatMul(n, wk)
    v = MatMul(n, wv)
    q = MatMul(n, wq)
    sh = Shape(k)
    i0 = Constant <value = int64 {0}> ()
    i1 = Constant <value = int64 {1}> ()
    d0 = Gather(sh, i0)
    d1 = Gather(sh, i1)
    ax = Constant <value = int64[1] {0}> ()
    u0 = Unsqueeze(d0, ax)
    u1 = Unsqueeze(d1, ax)
    nh = Constant <value = int64[1] {2}> ()
    hd = Constant <value = int64[1] {4}> ()
    shp = Concat <axis = 0> (u0, u1, nh, hd)
    kr = Reshape(k, shp)
    vr = Reshape(v, shp)
    qr = Reshape(q, shp)
    kt = Transpose <perm = [0, 2, 3, 1]> (kr)
    vt = Transpose <perm = [0, 2, 1, 3]> (vr)
    qt = Transpose <perm = [0, 2, 1, 3]> (qr)
    a = MatMul(qt, kt)
    p = Softmax <axis = -1> (a)
    o = MatMul(p, vt)
    ot = Transpose <perm = [0, 2, 1, 3]> (o)
    w8 = Constant <value = int64[1] {8}> ()
    shp2 = Concat <axis = 0> (u0, u1, w8)
    m = Reshape(ot, shp2)
    z = MatMul(m, wo)
    r = Add(x, z)
    y = MatMul(r, w9)
}
"""
)


def test_separate_qkv_with_runtime_shapes_and_layernorm() -> None:
    model = build(SEPARATE_ATTN)
    groups = find_channel_groups(model)
    h = next(g for g in groups if g.kind == GroupKind.HEADS)
    assert (h.channels, h.unit, h.foldable) == (2, 4, True)
    assert members(h) == {
        ("wq", 1, "producer", 0, None, "q"),
        ("wk", 1, "producer", 0, None, "k"),
        ("wv", 1, "producer", 0, None, "v"),
        ("wo", 0, "consumer", 0, None, "o"),
    }
    assert {(d.tensor, d.index, d.what) for d in h.dims} == {("nh", 0, "channels"), ("w8", 0, "total")}
    # a DimRef names the node that reads the constant (here the Concat building the Reshape shape)
    assert {model.graph.node[int(d.node.rsplit("_", 1)[1])].op_type for d in h.dims} == {"Concat"}
    res = next(g for g in groups if g.kind == GroupKind.RESIDUAL)
    assert res.channels == 8 and not res.foldable and "comes from graph input x" in res.blocked
    assert [n.kind for n in res.norms] == ["layernorm"]
    assert {m.tensor for m in res.members} == {"g1", "b1", "wq", "wk", "wv", "wo", "w9"}
    assert check_all_groups(model) == 1


def test_residual_with_decomposed_layernorm_layerscale_cls_and_pos_embed() -> None:
    model = build(
        H
        + """
    g (float[1, 3, 4, 4] x, float[8, 3, 2, 2] wp, float[8] bp, float[1, 1, 8] pcls, float[1, 5, 8] ppos,
       float[8] g1, float[8] b1, float[8, 16] w1, float[16, 8] w2, float[8] pls,
           float[8, 3] wh) => (float[1, 3] y) {
        c = Conv <strides = [2, 2]> (x, wp, bp)
        s = Constant <value = int64[3] {1, 8, 4}> ()
        f = Reshape(c, s)
        t = Transpose <perm = [0, 2, 1]> (f)
        tok = Concat <axis = 1> (pcls, t)
        h0 = Add(tok, ppos)
        mu = ReduceMean <axes = [-1]> (h0)
        xc = Sub(h0, mu)
        two = Constant <value = float {2.0}> ()
        sq = Pow(xc, two)
        var = ReduceMean <axes = [-1]> (sq)
        eps = Constant <value = float {1e-6}> ()
        ve = Add(var, eps)
        sd = Sqrt(ve)
        nrm = Div(xc, sd)
        sc = Mul(nrm, g1)
        ln = Add(sc, b1)
        m1 = MatMul(ln, w1)
        half = Constant <value = float {0.5}> ()
        rt = Constant <value = float {1.4142135}> ()
        e0 = Div(m1, rt)
        e1 = Erf(e0)
        one = Constant <value = float {1.0}> ()
        e2 = Add(e1, one)
        e3 = Mul(m1, e2)
        gl = Mul(e3, half)
        m2 = MatMul(gl, w2)
        ls = Mul(m2, pls)
        h1 = Add(h0, ls)
        i0 = Constant <value = int64 {0}> ()
        cls = Gather <axis = 1> (h1, i0)
        y = MatMul(cls, wh)
    }"""
    )
    groups = find_channel_groups(model)
    mlp = by_channels(groups, 16)
    assert mlp.kind == GroupKind.MLP and mlp.foldable
    res = by_channels(groups, 8)
    assert res.kind == GroupKind.RESIDUAL and res.foldable, res.blocked
    assert members(res) == {
        ("wp", 0, "producer", 0, None, ""),
        ("bp", 0, "param", 0, None, ""),
        ("pcls", 2, "param", 0, None, ""),
        ("ppos", 2, "param", 0, None, ""),
        ("g1", 0, "param", 0, None, ""),
        ("b1", 0, "param", 0, None, ""),
        ("w1", 0, "consumer", 0, None, ""),
        ("w2", 1, "producer", 0, None, ""),
        ("pls", 0, "param", 0, None, ""),
        ("wh", 0, "consumer", 0, None, ""),
    }
    assert [(d.tensor, d.index, d.what) for d in res.dims] == [("s", 1, "total")]
    assert len(res.norms) == 1 and res.norms[0].kind == "layernorm_decomposed"
    assert res.norms[0].scale == "g1" and res.norms[0].bias == "b1" and len(res.norms[0].nodes) == 9
    assert check_all_groups(model) == 2


def test_einsum_linear() -> None:
    model = build(
        H
        + """
    g (float[1, 4, 8] x, float[8, 16] w1, float[16, 8] w2) => (float[1, 4, 8] y) {
        h = Einsum <equation = "btc,cd->btd"> (x, w1)
        a = Relu(h)
        y = Einsum <equation = "btd,dc->btc"> (a, w2)
    }"""
    )
    hidden = by_channels(find_channel_groups(model), 16)
    assert members(hidden) == {("w1", 1, "producer", 0, None, ""), ("w2", 0, "consumer", 0, None, "")}
    assert check_all_groups(model) == 1


# ---------------------------------------------------------------------------- what blocks
def test_unhandled_op_blocks_with_its_name() -> None:
    model = build(
        H
        + """
    g (float[1, 4, 8] x, float[8, 16] w1, float[16, 8] w2) => (float[1, 4, 8] y) {
        h = MatMul(x, w1)
        a = CumSum(h, ax)
        y = MatMul(a, w2)
    }""".replace("h = MatMul", "ax = Constant <value = int64 {2}> ()\n        h = MatMul")
    )
    hidden = by_channels(find_channel_groups(model), 16)
    assert not hidden.foldable and hidden.blocked.startswith("unhandled op CumSum")


def test_reduction_over_channels_blocks() -> None:
    model = build(
        H
        + """
    g (float[1, 4, 8] x, float[8, 16] w1, float[16, 8] w2) => (float[1, 4, 8] y, float[1, 4, 1] s) {
        h = MatMul(x, w1)
        s = ReduceMax <axes = [-1]> (h)
        y = MatMul(h, w2)
    }"""
    )
    hidden = by_channels(find_channel_groups(model), 16)
    assert not hidden.foldable and "reduced over the channel axis at ReduceMax" in hidden.blocked


def test_weight_reshaped_at_run_time_blocks() -> None:
    model = build(
        H
        + """
    g (float[1, 4, 8] x, float[16, 8] w1, float[16, 8] w2) => (float[1, 4, 8] y) {
        wt = Transpose <perm = [1, 0]> (w1)
        h = MatMul(x, wt)
        y = MatMul(h, w2)
    }"""
    )
    hidden = by_channels(find_channel_groups(model), 16)
    assert not hidden.foldable and "constant w1 transformed at run time feeds MatMul" in hidden.blocked


def test_analysis_is_pure_and_json_round_trips() -> None:
    model = build(FUSED_ATTN)
    before = model.SerializeToString()
    groups = find_channel_groups(model)
    assert model.SerializeToString() == before
    again = groups_from_json(groups_to_json(groups))
    assert again == groups
    totals = summarize_groups(groups, model)
    assert totals["groups"] == len(groups) and 0 < totals["foldable_share"] < 1


def test_bad_input_and_registry() -> None:
    with pytest.raises(AnalysisError):
        find_channel_groups("model.onnx")  # type: ignore[arg-type]
    for op in (
        "MatMul",
        "Gemm",
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "LayerNormalization",
        "Reshape",
        "Transpose",
        "Split",
        "Slice",
        "Gather",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Flatten",
        "Softmax",
        "GlobalAveragePool",
        "ReduceMean",
        "MaxPool",
        "AveragePool",
        "Resize",
        "Pad",
        "Einsum",
        "Identity",
        "Cast",
        "Dropout",
        "Relu",
        "Clip",
        "Gelu",
        "Erf",
        "HardSwish",
        "HardSigmoid",
        "Sigmoid",
        "Tanh",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Expand",
    ):
        assert op in HANDLERS, op
    assert np.isfinite(len(HANDLERS))


def test_position_embedding_reshaped_at_run_time_is_a_param_of_its_source() -> None:
    # DINOv2 style: the stored embedding [1, 4, C] is reshaped to a grid, transposed, resized and
    # flattened back at run time before it is added: its channel axis is a PARAM member
    model = build(
        H
        + """
    g (float[1, 3, 4, 4] x, float[6, 3, 2, 2] wp, float[1, 1, 6] ppos, float[6, 3] wh) => (float[1, 4, 3] y) {
        c = Conv <strides = [2, 2]> (x, wp)
        s = Constant <value = int64[3] {1, 6, 4}> ()
        f = Reshape(c, s)
        t = Transpose <perm = [0, 2, 1]> (f)
        g4 = Constant <value = int64[4] {1, 1, 1, 6}> ()
        pg = Reshape(ppos, g4)
        pt = Transpose <perm = [0, 3, 1, 2]> (pg)
        sizes = Constant <value = int64[4] {1, 6, 2, 2}> ()
        pr = Resize <mode = "nearest"> (pt, , , sizes)
        pf = Reshape(pr, s)
        pp = Transpose <perm = [0, 2, 1]> (pf)
        h = Add(t, pp)
        r = Relu(h)
        y = MatMul(r, wh)
    }"""
    )
    six = by_channels(find_channel_groups(model), 6)
    assert six.foldable, six.blocked
    assert ("ppos", 2, "param", 0, None, "") in members(six)
    assert {(d.tensor, d.index, d.what) for d in six.dims} == {
        ("s", 1, "total"),
        ("g4", 3, "total"),
        ("sizes", 1, "total"),
    }
    assert check_all_groups(model) == 1


def test_rms_normalization_opset23_and_subgraph_reads_block() -> None:
    model = build(
        '<ir_version: 10, opset_import: ["" : 23]>\n'
        + """
    g (float[1, 4, 8] x, float[8, 16] w1, float[16] g1, float[16, 8] w2) => (float[1, 4, 8] y) {
        h = MatMul(x, w1)
        n = RMSNormalization <axis = -1> (h, g1)
        y = MatMul(n, w2)
    }"""
    )
    hidden = by_channels(find_channel_groups(model), 16)
    assert hidden.foldable and [n.kind for n in hidden.norms] == ["rmsnorm"]
    assert ("g1", 0, "param", 0, None, "") in members(hidden)
    # an If whose branch reads the hidden activations from the outer graph blocks the group
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["h"], ["t"])],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1, 4, 16])],
    )
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Neg", ["h"], ["e"])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [1, 4, 16])],
    )
    cond = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    model.graph.input.append(cond)
    model.graph.node.insert(
        1, onnx.helper.make_node("If", ["c"], ["hi"], then_branch=then_branch, else_branch=else_branch)
    )
    model.graph.node[2].input[0] = "hi"
    hidden = by_channels(find_channel_groups(model), 16)
    assert not hidden.foldable and hidden.blocked.startswith("unhandled op If")


def _qkv_split_text(split: str) -> str:
    """Fused qkv [8, 24] cut into q, k, v along the channel axis, then into 2 heads of 4."""
    return (
        H
        + """
    g (float[1, 5, 8] x, float[8, 24] wqkv, float[8, 8] wo, float[8, 3] wh) => (float[1, 5, 3] y) {
        qkv = MatMul(x, wqkv)
        """
        + split
        + """
        s4 = Constant <value = int64[4] {1, 5, 2, 4}> ()
        qr = Reshape(q, s4)
        kr = Reshape(k, s4)
        vr = Reshape(v, s4)
        qt = Transpose <perm = [0, 2, 1, 3]> (qr)
        kt = Transpose <perm = [0, 2, 3, 1]> (kr)
        vt = Transpose <perm = [0, 2, 1, 3]> (vr)
        a = MatMul(qt, kt)
        p = Softmax <axis = -1> (a)
        o = MatMul(p, vt)
        ot = Transpose <perm = [0, 2, 1, 3]> (o)
        s3 = Constant <value = int64[3] {1, 5, 8}> ()
        m = Reshape(ot, s3)
        z = MatMul(m, wo)
        r = Add(x, z)
        y = MatMul(r, wh)
    }"""
    )


@pytest.mark.parametrize(
    ("split", "dims"),
    [
        (
            """sizes = Constant <value = int64[3] {8, 8, 8}> ()
        q, k, v = Split <axis = 2> (qkv, sizes)""",
            {("sizes", 0, 1), ("sizes", 1, 1), ("sizes", 2, 1)},
        ),
        (
            """z1 = Constant <value = int64[1] {0}> ()
        e1 = Constant <value = int64[1] {8}> ()
        e2 = Constant <value = int64[1] {16}> ()
        e3 = Constant <value = int64[1] {24}> ()
        ax = Constant <value = int64[1] {2}> ()
        q = Slice(qkv, z1, e1, ax)
        k = Slice(qkv, e1, e2, ax)
        v = Slice(qkv, e2, e3, ax)""",
            {("e1", 0, 1), ("e2", 0, 2)},  # the k / v bounds move with the width; 24 = the end
        ),
    ],
    ids=["split", "slice"],
)
def test_fused_qkv_cut_along_channels(split: str, dims: set) -> None:
    model = build(_qkv_split_text(split))
    groups = find_channel_groups(model)
    h = next(g for g in groups if g.kind == GroupKind.HEADS)
    assert (h.channels, h.unit, h.foldable) == (2, 4, True), h.blocked
    assert {(m.tensor, m.offset, m.tag) for m in h.members if m.role == Role.PRODUCER} == {
        ("wqkv", 0, "q"),
        ("wqkv", 8, "k"),
        ("wqkv", 16, "v"),
    }
    found = {(d.tensor, d.index, d.multiple) for d in h.dims if d.tensor not in ("s4", "s3")}
    assert found == dims
    assert {(d.tensor, d.index, d.what) for d in h.dims if d.tensor in ("s4", "s3")} == {
        ("s4", 2, "channels"),
        ("s3", 2, "total"),
    }
    assert check_all_groups(model) == 1


def test_fused_width_in_one_reshape_constant_is_a_multiple() -> None:
    text = FUSED_ATTN.replace(
        "qkvb = Add(qkv, bqkv)",
        "qb = Add(qkv, bqkv)\n    w3 = Constant <value = int64[3] {1, 5, 24}> ()\n    qkvb = Reshape(qb, w3)",
    )
    model = build(text)
    h = next(g for g in find_channel_groups(model) if g.kind == GroupKind.HEADS)
    assert h.foldable and ("w3", 2, "total", 3) in {(d.tensor, d.index, d.what, d.multiple) for d in h.dims}
    assert check_all_groups(model) == 1
