"""Exactness of folding on tiny hand-built graphs with hand-built ChannelGroups.

Each model is built twice: a narrow one and a "doubled" one whose channels (MLP neurons,
heads, conv channels, depthwise channels, residual channels) are exact copies, with the
consumer weights split between the copies so both compute the same function. Folding the
doubled model at ratio 0.5 must give back the narrow function to 1e-5; ratio 0 must change
nothing; results must be checker-valid, load in ORT and keep output shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx.analysis.channel_groups import ChannelGroup, DimRef, GroupKind, Member, NormRef, Role
from foldonnx.passes.fold import FoldPass, fold

OPSET = 17


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    m.metadata_props.add(key="author", value="test")
    onnx.checker.check_model(m)
    return m


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def split_dup(w: np.ndarray, axis: int, rng: np.random.Generator) -> np.ndarray:
    """Consumer weights of a doubled width: each copy gets half (copies stay identical, so
    cluster features are identical; only the consumer *sum* rule gives the original back)."""
    del rng
    return np.concatenate([w * 0.5, w * 0.5], axis=axis).astype(np.float32)


def dup(w: np.ndarray, axis: int) -> np.ndarray:
    return np.concatenate([w, w], axis=axis).astype(np.float32)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --------------------------------------------------------------------------- MLP
def mlp_model(w1, b1, w2, b2, act="Gelu", shared_bias_block2=False, batch=(1, 5)):
    """x[1,5,D] -> MatMul w1 + b1 -> act -> MatMul w2 + b2 (-> second identical block).
    GELU is the exact Erf chain exporters emit below opset 20."""
    d, h = w1.shape
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
    ]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["h1"], ["h2"], name="act"))
    else:
        nodes += [
            helper.make_node("Div", ["h1", "sqrt2"], ["e0"], name="gelu_div"),
            helper.make_node("Erf", ["e0"], ["e1"], name="gelu_erf"),
            helper.make_node("Add", ["e1", "one"], ["e2"], name="gelu_add"),
            helper.make_node("Mul", ["h1", "e2"], ["e3"], name="gelu_mul"),
            helper.make_node("Mul", ["e3", "half"], ["h2"], name="gelu_half"),
        ]
    nodes += [
        helper.make_node("MatMul", ["h2", "w2"], ["y0"], name="fc2"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias"),
    ]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    if act != "Relu":
        inits.update(sqrt2=np.float32(np.sqrt(2.0)), one=np.float32(1.0), half=np.float32(0.5))
    if shared_bias_block2:  # a second block reading the SAME bias tensor b1 (exporter sharing)
        nodes += [
            helper.make_node("MatMul", ["y", "w3"], ["g0"], name="fc3"),
            helper.make_node("Add", ["g0", "b1"], ["g1"], name="fc3_bias"),
            helper.make_node("Relu", ["g1"], ["g2"], name="act3"),
            helper.make_node("MatMul", ["g2", "w4"], ["z"], name="fc4"),
        ]
        rng = np.random.default_rng(5)
        inits["w3"] = rng.normal(size=(d, h)).astype(np.float32)
        inits["w4"] = rng.normal(size=(h, d)).astype(np.float32)
        out = "z"
    else:
        out = "y"
    return _model(nodes, inits, [_vi("x", [*batch, d])], [_vi(out, [*batch, d])])


def make_mlp_group(h: int) -> ChannelGroup:
    return ChannelGroup(
        id=0,
        kind=GroupKind.MLP,
        channels=h,
        name="mlp0",
        members=(
            Member("w1", 1, Role.PRODUCER, node="fc1", op_type="MatMul", param="weight"),
            Member("b1", 0, Role.PARAM, node="fc1_bias", op_type="Add", param="bias"),
            Member("w2", 0, Role.CONSUMER, node="fc2", op_type="MatMul", param="weight"),
        ),
    )


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _mlp_pair(rng, act="Gelu", shared=False):
    d, h = 6, 8
    w1 = rng.normal(size=(d, h)).astype(np.float32)
    b1 = rng.normal(size=h).astype(np.float32)
    w2 = rng.normal(size=(h, d)).astype(np.float32)
    b2 = rng.normal(size=d).astype(np.float32)
    narrow = mlp_model(w1, b1, w2, b2, act)
    doubled = mlp_model(dup(w1, 1), dup(b1, 0), split_dup(w2, 0, rng), b2, act, shared_bias_block2=shared)
    return narrow, doubled


@pytest.mark.parametrize("repair", ["none", "ar"])
@pytest.mark.parametrize("act", ["Gelu", "Relu"])
def test_mlp_duplicates_fold_back_exactly(rng, repair, act):
    narrow, doubled = _mlp_pair(rng, act)
    x = {"x": rng.normal(size=(1, 5, 6)).astype(np.float32)}
    ref = run(narrow, x)[0]
    assert np.allclose(run(doubled, x)[0], ref, atol=1e-5)
    folded, report = fold(
        doubled, 0.5, channel_groups=[make_mlp_group(16)], repair=repair, mlp_correction=repair == "ar"
    )
    onnx.checker.check_model(folded)
    assert init(folded, "w1").shape == (6, 8) and init(folded, "w2").shape == (8, 6)
    out = run(folded, x)[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert report.groups[0].channels_before == 16 and report.groups[0].channels_after == 8
    assert report.after.params == report.before.params - 8 * (6 + 1 + 6)
    assert report.groups[0].distortion < 1e-9
    if repair == "ar":  # identical members: the std ratio is exactly 1, the correction 0
        assert report.groups[0].repair_factor_max == pytest.approx(1.0)
        assert report.groups[0].repair == "ar"
    assert [p.key for p in folded.metadata_props] == ["author"]


@pytest.mark.parametrize("act", ["Gelu", "Relu"])
def test_mlp_ar_keeps_the_expected_output_on_gaussian_inputs(act):
    """The data-free MLP correction restores E[y] under its own input model (x ~ N(0, I))."""
    rng = np.random.default_rng(7)
    d, h, n = 16, 64, 4000
    w1 = (rng.normal(size=(d, h)) / np.sqrt(d)).astype(np.float32)
    b1 = rng.normal(size=h).astype(np.float32) * 0.5
    w2 = (rng.normal(size=(h, d)) / np.sqrt(h)).astype(np.float32)
    m = mlp_model(w1, b1, w2, np.zeros(d, np.float32), act, batch=(n,))
    x = {"x": rng.normal(size=(n, d)).astype(np.float32)}
    ref = run(m, x)[0].mean(axis=0)
    errs = {}
    for repair in ("none", "ar"):
        folded, report = fold(m, 0.5, channel_groups=[make_mlp_group(h)], repair=repair, mlp_correction=True)
        errs[repair] = float(np.linalg.norm(run(folded, x)[0].mean(axis=0) - ref))
    assert report.groups[0].repair == "ar" and report.groups[0].repair_factor_min >= 1.0
    # sampling noise of the mean over 4000 samples is ~0.02; the correction removes most bias
    assert errs["ar"] < 0.5 * errs["none"], errs


def test_ratio_zero_is_identity(rng):
    _, doubled = _mlp_pair(rng)
    x = {"x": rng.normal(size=(1, 5, 6)).astype(np.float32)}
    folded, report = fold(doubled, 0.0, channel_groups=[make_mlp_group(16)])
    assert np.array_equal(run(folded, x)[0], run(doubled, x)[0])
    assert report.groups == [] and report.after.params == report.before.params
    for a, b in zip(folded.graph.initializer, doubled.graph.initializer, strict=False):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_fold_does_not_modify_input_model(rng):
    _, doubled = _mlp_pair(rng)
    before = doubled.SerializeToString()
    fold(doubled, 0.5, channel_groups=[make_mlp_group(16)])
    assert doubled.SerializeToString() == before


def test_shared_initializer_is_copied_before_editing(rng):
    """b1 is read by fc1_bias (in the group) and fc3_bias (not): the second keeps 16 values."""
    _, doubled = _mlp_pair(rng, act="Relu", shared=True)
    x = {"x": rng.normal(size=(1, 5, 6)).astype(np.float32)}
    ref = run(doubled, x)[0]
    folded, _ = fold(doubled, 0.5, channel_groups=[make_mlp_group(16)])
    nodes = {n.name: n for n in folded.graph.node}
    assert nodes["fc3_bias"].input[1] == "b1" and init(folded, "b1").shape == (16,)
    copy = nodes["fc1_bias"].input[1]
    assert copy != "b1" and init(folded, copy).shape == (8,)
    np.testing.assert_allclose(run(folded, x)[0], ref, atol=1e-5)


def test_fold_is_deterministic_for_a_seed(rng):
    _, doubled = _mlp_pair(rng)
    g = [make_mlp_group(16)]
    a, _ = fold(doubled, 0.3, channel_groups=g, seed=3)
    b, _ = fold(doubled, 0.3, channel_groups=g, seed=3)
    assert a.SerializeToString() == b.SerializeToString()


def test_prune_keeps_the_highest_norm_channels(rng):
    d, h = 4, 6
    w1 = rng.normal(size=(d, h)).astype(np.float32)
    scale = np.array([0.1, 5.0, 0.2, 3.0, 4.0, 0.3], np.float32)  # columns 1, 3, 4 win
    w1 = w1 / np.abs(w1).sum(axis=0) * scale
    b1 = rng.normal(size=h).astype(np.float32) * 100  # biases do not count
    w2 = rng.normal(size=(h, d)).astype(np.float32)
    m = mlp_model(w1, b1, w2, np.zeros(d, np.float32))
    folded, report = fold(m, 0.5, channel_groups=[make_mlp_group(h)], method="prune-l1")
    keep = [1, 3, 4]
    np.testing.assert_array_equal(init(folded, "w1"), w1[:, keep])
    np.testing.assert_array_equal(init(folded, "b1"), b1[keep])
    np.testing.assert_array_equal(init(folded, "w2"), w2[keep])
    assert report.groups[0].method == "prune-l1"


# --------------------------------------------------------------------------- heads
def attention_model(wqkv, bqkv, wo, heads, hd):
    """Fused qkv [D, 3D] + Split, Reshape with a constant shape shared by q/k/v, whole-head
    attention, Reshape back with a constant width, output projection."""
    d = wqkv.shape[0]
    width = heads * hd
    nodes = [
        helper.make_node("MatMul", ["x", "wqkv"], ["qkv0"], name="qkv"),
        helper.make_node("Add", ["qkv0", "bqkv"], ["qkv1"], name="qkv_bias"),
        helper.make_node("Split", ["qkv1", "split"], ["q", "k", "v"], name="split", axis=2),
        helper.make_node("Reshape", ["q", "shape4"], ["q4"], name="rq"),
        helper.make_node("Reshape", ["k", "shape4"], ["k4"], name="rk"),
        helper.make_node("Reshape", ["v", "shape4"], ["v4"], name="rv"),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3], name="tq"),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1], name="tk"),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3], name="tv"),
        helper.make_node("MatMul", ["qt", "kt"], ["s0"], name="qk"),
        helper.make_node("Mul", ["s0", "scale"], ["s1"], name="scale_mul"),
        helper.make_node("Softmax", ["s1"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "vt"], ["o4"], name="pv"),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3], name="to"),
        helper.make_node("Reshape", ["o3", "shape3"], ["o"], name="ro"),
        helper.make_node("MatMul", ["o", "wo"], ["y"], name="proj"),
    ]
    inits = {
        "wqkv": wqkv,
        "bqkv": bqkv,
        "wo": wo,
        "split": np.array([width] * 3, np.int64),
        "shape4": np.array([1, -1, heads, hd], np.int64),
        "shape3": np.array([1, -1, width], np.int64),
        "scale": np.array(hd**-0.5, np.float32),
    }
    return _model(nodes, inits, [_vi("x", [1, 5, d])], [_vi("y", [1, 5, d])])


def heads_group(heads, hd):
    width = heads * hd
    members = []
    for i, tag in enumerate("qkv"):
        members.append(
            Member("wqkv", 1, Role.PRODUCER, node="qkv", op_type="MatMul", offset=i * width, tag=tag)
        )
        members.append(
            Member("bqkv", 0, Role.PARAM, node="qkv_bias", op_type="Add", offset=i * width, tag=tag)
        )
    members.append(Member("wo", 0, Role.CONSUMER, node="proj", op_type="MatMul", tag="o"))
    dims = (
        DimRef("split", 0, "total", node="split"),
        DimRef("split", 1, "total", node="split"),
        DimRef("split", 2, "total", node="split"),
        DimRef("shape4", 2, "channels", node="rq"),
        DimRef("shape4", 2, "channels", node="rk"),
        DimRef("shape4", 2, "channels", node="rv"),
        DimRef("shape3", 2, "total", node="ro"),
    )
    return ChannelGroup(
        id=1, kind=GroupKind.HEADS, channels=heads, unit=hd, members=tuple(members), dims=dims
    )


def test_duplicated_heads_fold_back_exactly(rng):
    d, heads, hd = 8, 2, 3
    w = rng.normal(size=(3, d, heads, hd)).astype(np.float32)  # q, k, v per head
    b = rng.normal(size=(3, heads, hd)).astype(np.float32)
    wo = rng.normal(size=(heads, hd, d)).astype(np.float32)
    narrow = attention_model(
        w.transpose(1, 0, 2, 3).reshape(d, -1), b.reshape(-1), wo.reshape(-1, d), heads, hd
    )
    w2 = np.concatenate([w, w], axis=2)  # heads 2, 3 copy heads 0, 1
    b2 = np.concatenate([b, b], axis=1)
    wo2 = split_dup(wo, 0, rng)  # whole heads share the output weight
    doubled = attention_model(
        w2.transpose(1, 0, 2, 3).reshape(d, -1), b2.reshape(-1), wo2.reshape(-1, d), 2 * heads, hd
    )
    x = {"x": rng.normal(size=(1, 5, d)).astype(np.float32)}
    ref = run(narrow, x)[0]
    assert np.allclose(run(doubled, x)[0], ref, atol=1e-5)
    folded, report = fold(doubled, 0.5, channel_groups=[heads_group(2 * heads, hd)])
    np.testing.assert_allclose(run(folded, x)[0], ref, atol=1e-5)
    assert init(folded, "wqkv").shape == (d, 3 * heads * hd)
    assert init(folded, "shape4").tolist() == [1, -1, heads, hd]
    assert init(folded, "shape3").tolist() == [1, -1, heads * hd]
    assert init(folded, "split").tolist() == [heads * hd] * 3
    assert report.groups[0].unit == hd


# --------------------------------------------------------------------------- conv + BN
def conv_bn_model(w1, b1, gamma, beta, mean, var, w2):
    c = w1.shape[0]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node(
            "BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], epsilon=1e-5, name="bn1"
        ),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    inits = {"w1": w1, "b1": b1, "g": gamma, "be": beta, "mu": mean, "var": var, "w2": w2}
    del c
    return _model(nodes, inits, [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, w2.shape[0], 6, 6])])


def conv_group(c):
    return ChannelGroup(
        id=2,
        kind=GroupKind.CONV,
        channels=c,
        members=(
            Member("w1", 0, Role.PRODUCER, node="conv1", op_type="Conv", param="weight"),
            Member("b1", 0, Role.PARAM, node="conv1", op_type="Conv", param="bias"),
            Member("g", 0, Role.PARAM, node="bn1", op_type="BatchNormalization", param="bn_scale"),
            Member("be", 0, Role.PARAM, node="bn1", op_type="BatchNormalization", param="bn_bias"),
            Member("mu", 0, Role.STAT, node="bn1", op_type="BatchNormalization", param="bn_mean"),
            Member("var", 0, Role.STAT, node="bn1", op_type="BatchNormalization", param="bn_var"),
            Member("w2", 1, Role.CONSUMER, node="conv2", op_type="Conv", param="weight"),
        ),
    )


@pytest.mark.parametrize("repair", ["none", "ar"])
def test_duplicated_conv_bn_channels_fold_back_exactly(rng, repair):
    c = 4
    w1 = rng.normal(size=(c, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=c).astype(np.float32)
    g, be = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    mu, var = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 3, c).astype(np.float32)
    w2 = rng.normal(size=(5, c, 1, 1)).astype(np.float32)
    narrow = conv_bn_model(w1, b1, g, be, mu, var, w2)
    doubled = conv_bn_model(
        dup(w1, 0), dup(b1, 0), dup(g, 0), dup(be, 0), dup(mu, 0), dup(var, 0), split_dup(w2, 1, rng)
    )
    x = {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)}
    ref = run(narrow, x)[0]
    folded, report = fold(doubled, 0.5, channel_groups=[conv_group(2 * c)], repair=repair)
    np.testing.assert_allclose(run(folded, x)[0], ref, atol=1e-5)
    assert init(folded, "w1").shape == (c, 3, 3, 3) and init(folded, "w2").shape == (5, c, 1, 1)
    if repair == "ar":
        # BN normalisation folded into the conv: running stats become 0 / 1 - eps
        np.testing.assert_allclose(init(folded, "mu"), 0.0)
        assert report.groups[0].repair == "ar"


def test_fold_ar_rescales_bn_gamma_of_merged_dissimilar_channels(rng):
    """Two orthogonal filters merged: ρ̄ = 0, γ' = mean(γ)·sqrt(2)."""
    w1 = np.zeros((2, 3, 3, 3), np.float32)
    w1[0, 0, 1, 1], w1[1, 1, 1, 1] = 1.0, 1.0
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    g = np.array([1.0, 3.0], np.float32)
    m = conv_bn_model(w1, zeros, g, zeros, zeros, ones, np.ones((1, 2, 1, 1), np.float32))
    folded, report = fold(m, 0.5, channel_groups=[conv_group(2)], repair="ar")
    np.testing.assert_allclose(init(folded, "g"), [2.0 * np.sqrt(2.0)], rtol=1e-5)
    assert report.groups[0].repair_factor_mean == pytest.approx(np.sqrt(2.0))


# --------------------------------------------------------------------------- depthwise
def dw_model(w1, wdw, w3):
    c = w1.shape[0]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="expand"),
        helper.make_node("Relu", ["a"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "wdw"], ["b"], group=c, pads=[1, 1, 1, 1], name="dw"),
        helper.make_node("Relu", ["b"], ["b1"], name="relu2"),
        helper.make_node("Conv", ["b1", "w3"], ["y"], name="project"),
    ]
    return _model(nodes, {"w1": w1, "wdw": wdw, "w3": w3}, [_vi("x", [1, 3, 5, 5])], [_vi("y", [1, 2, 5, 5])])


def test_duplicated_depthwise_channels_fold_back_exactly(rng):
    c = 3
    w1 = rng.normal(size=(c, 3, 1, 1)).astype(np.float32)
    wdw = rng.normal(size=(c, 1, 3, 3)).astype(np.float32)
    w3 = rng.normal(size=(2, c, 1, 1)).astype(np.float32)
    narrow = dw_model(w1, wdw, w3)
    doubled = dw_model(dup(w1, 0), dup(wdw, 0), split_dup(w3, 1, rng))
    group = ChannelGroup(
        id=3,
        kind=GroupKind.DEPTHWISE,
        channels=2 * c,
        members=(
            Member("w1", 0, Role.PRODUCER, node="expand", op_type="Conv", param="weight"),
            Member("wdw", 0, Role.PARAM, node="dw", op_type="Conv", param="weight"),
            Member("w3", 1, Role.CONSUMER, node="project", op_type="Conv", param="weight"),
        ),
    )
    x = {"x": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)}
    folded, _ = fold(doubled, 0.5, channel_groups=[group])
    np.testing.assert_allclose(run(folded, x)[0], run(narrow, x)[0], atol=1e-5)
    dw = next(n for n in folded.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == c


# --------------------------------------------------------------------------- residual + LN
def residual_model(we, g, b, w1, w2, b2, wh):
    """x -> embed (we) -> s0; s1 = s0 + MLP(LN(s0)); y = LN-free head(s1)."""
    nodes = [
        helper.make_node("MatMul", ["x", "we"], ["s0"], name="embed"),
        helper.make_node("LayerNormalization", ["s0", "g", "b"], ["n0"], axis=-1, epsilon=1e-5, name="ln"),
        helper.make_node("MatMul", ["n0", "w1"], ["h0"], name="fc1"),
        helper.make_node("Relu", ["h0"], ["h1"], name="act"),
        helper.make_node("MatMul", ["h1", "w2"], ["m0"], name="fc2"),
        helper.make_node("Add", ["m0", "b2"], ["m1"], name="fc2_bias"),
        helper.make_node("Add", ["s0", "m1"], ["s1"], name="residual"),
        helper.make_node("MatMul", ["s1", "wh"], ["y"], name="head"),
    ]
    inits = {"we": we, "g": g, "b": b, "w1": w1, "w2": w2, "b2": b2, "wh": wh}
    return _model(nodes, inits, [_vi("x", [1, 5, we.shape[0]])], [_vi("y", [1, 5, wh.shape[1]])])


def test_duplicated_residual_channels_fold_back_exactly(rng):
    d_in, d, h = 3, 4, 5
    we = rng.normal(size=(d_in, d)).astype(np.float32)
    g, b = rng.uniform(0.5, 2, d).astype(np.float32), rng.normal(size=d).astype(np.float32)
    w1 = rng.normal(size=(d, h)).astype(np.float32)
    w2 = rng.normal(size=(h, d)).astype(np.float32)
    b2 = rng.normal(size=d).astype(np.float32)
    wh = rng.normal(size=(d, 2)).astype(np.float32)
    narrow = residual_model(we, g, b, w1, w2, b2, wh)
    doubled = residual_model(
        dup(we, 1), dup(g, 0), dup(b, 0), split_dup(w1, 0, rng), dup(w2, 1), dup(b2, 0), split_dup(wh, 0, rng)
    )
    group = ChannelGroup(
        id=4,
        kind=GroupKind.RESIDUAL,
        channels=2 * d,
        members=(
            Member("we", 1, Role.PRODUCER, node="embed", op_type="MatMul"),
            Member("g", 0, Role.PARAM, node="ln", op_type="LayerNormalization", param="ln_scale"),
            Member("b", 0, Role.PARAM, node="ln", op_type="LayerNormalization", param="ln_bias"),
            Member("w1", 0, Role.CONSUMER, node="fc1", op_type="MatMul"),
            Member("w2", 1, Role.PRODUCER, node="fc2", op_type="MatMul"),
            Member("b2", 0, Role.PARAM, node="fc2_bias", op_type="Add"),
            Member("wh", 0, Role.CONSUMER, node="head", op_type="MatMul"),
        ),
    )
    x = {"x": rng.normal(size=(1, 5, d_in)).astype(np.float32)}
    ref = run(narrow, x)[0]
    folded, report = fold(doubled, 0.5, channel_groups=[group], groups="residual")
    np.testing.assert_allclose(run(folded, x)[0], ref, atol=1e-5)
    assert init(folded, "we").shape == (d_in, d)
    assert report.groups[0].kind == "residual"


def test_fold_pass_class_and_report_json_round_trip(rng):
    from foldonnx.passes.fold import FoldReport

    _, doubled = _mlp_pair(rng)
    res = FoldPass(ratio=0.25, channel_groups=[make_mlp_group(16)], round_to=1).run(doubled)
    again = FoldReport.from_json(res.report.to_json())
    assert again == res.report
    assert res.report.groups[0].channels_after == 12
    assert res.report.before.macs > res.report.after.macs > 0
    # at the default rounding (multiples of 8), 16 * 0.75 = 12 stays 16: skipped, with the reason
    res = FoldPass(ratio=0.25, channel_groups=[make_mlp_group(16)]).run(doubled)
    assert not res.report.groups and "multiple of 8" in res.report.skipped[0].reason


def _uneven_residual(rng, fused: bool):
    """Residual stream of width 3 widened to 7: channel 0 x3, channels 1, 2 x2 each."""
    d_in, d, h = 3, 3, 5
    we = rng.normal(size=(d_in, d)).astype(np.float32)
    g, b = rng.uniform(0.5, 2, d).astype(np.float32), rng.normal(size=d).astype(np.float32)
    w1 = rng.normal(size=(d, h)).astype(np.float32)
    w2 = rng.normal(size=(h, d)).astype(np.float32)
    b2 = rng.normal(size=d).astype(np.float32)
    wh = rng.normal(size=(d, 2)).astype(np.float32)
    narrow = residual_model(we, g, b, w1, w2, b2, wh)
    rep = np.array([0, 0, 0, 1, 1, 2, 2])
    share = (1.0 / np.bincount(rep))[rep][:, None].astype(np.float32)
    wide = residual_model(we[:, rep], g[rep], b[rep], w1[rep] * share, w2[:, rep], b2[rep], wh[rep] * share)
    if not fused:
        wide = _decompose_layernorm(wide)
    group = ChannelGroup(
        id=5,
        kind=GroupKind.RESIDUAL,
        channels=7,
        members=(
            Member("we", 1, Role.PRODUCER, node="embed", op_type="MatMul"),
            Member("g", 0, Role.PARAM, node="ln" if fused else "ln_mul", param="ln_scale"),
            Member("b", 0, Role.PARAM, node="ln" if fused else "ln_add", param="ln_bias"),
            Member("w1", 0, Role.CONSUMER, node="fc1", op_type="MatMul"),
            Member("w2", 1, Role.PRODUCER, node="fc2", op_type="MatMul"),
            Member("b2", 0, Role.PARAM, node="fc2_bias", op_type="Add"),
            Member("wh", 0, Role.CONSUMER, node="head", op_type="MatMul"),
        ),
        norms=(
            (NormRef("layernorm", ("ln",), scale="g", bias="b"),)
            if fused
            else (
                NormRef(
                    "layernorm_decomposed",
                    tuple(n.name for n in wide.graph.node if n.name.startswith("ln_")),
                    scale="g",
                    bias="b",
                ),
            )
        ),
    )
    return narrow, wide, group


def _decompose_layernorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the fused LayerNormalization by the ReduceMean/Sub/Pow/... chain torch emits."""
    h = helper
    nodes = []
    for n in model.graph.node:
        if n.op_type != "LayerNormalization":
            nodes.append(n)
            continue
        x, g, b = n.input
        nodes += [
            h.make_node("ReduceMean", [x], ["m"], axes=[-1], name="ln_mean"),
            h.make_node("Sub", [x, "m"], ["d"], name="ln_sub"),
            h.make_node("Pow", ["d", "two"], ["d2"], name="ln_pow"),
            h.make_node("ReduceMean", ["d2"], ["v"], axes=[-1], name="ln_var"),
            h.make_node("Add", ["v", "eps"], ["ve"], name="ln_eps"),
            h.make_node("Sqrt", ["ve"], ["sd"], name="ln_sqrt"),
            h.make_node("Div", ["d", "sd"], ["nn"], name="ln_div"),
            h.make_node("Mul", ["nn", g], ["ns"], name="ln_mul"),
            h.make_node("Add", ["ns", b], [n.output[0]], name="ln_add"),
        ]
    graph = h.make_graph(
        nodes,
        "g",
        model.graph.input,
        model.graph.output,
        initializer=list(model.graph.initializer)
        + [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(1e-5), "eps")],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("fused", [True, False])
def test_uneven_residual_duplicates_need_the_weighted_layernorm(rng, fused):
    """Clusters of 3, 2, 2: the wide model's LayerNorm averages over 7 channels, i.e. weights
    the 3 distinct values by 3/7, 2/7, 2/7. Plain statistics over the 3 merged channels are
    wrong; the n_c/n-weighted LayerNorm makes the fold exact."""
    narrow, wide, group = _uneven_residual(rng, fused)
    x = {"x": rng.normal(size=(1, 5, 3)).astype(np.float32)}
    ref = run(wide, x)[0]
    assert np.abs(run(narrow, x)[0] - ref).max() > 1e-2  # uneven copies change LN statistics
    ratio = 4 / 7  # k = round(7 · 3/7) = 3
    weighted, rw = fold(wide, ratio, channel_groups=[group], groups="residual")
    plain, _ = fold(wide, ratio, channel_groups=[group], groups="residual", weighted_norms=False)
    assert rw.groups[0].channels_after == 3
    np.testing.assert_allclose(run(weighted, x)[0], ref, atol=1e-5)
    assert np.abs(run(plain, x)[0] - ref).max() > 1e-2
    onnx.checker.check_model(weighted)


def test_data_repair_matches_merged_channel_statistics(rng):
    """REPAIR on conv+BN: duplicates stay exact (scale 1, shift 0); on distinct channels the
    merged channels' BN-output mean/std equal the mean of their members' on the calibration set."""
    from foldonnx.graph.tensors import ModelTensors
    from foldonnx.passes.fold.plan import plan_group

    c = 4
    w1 = rng.normal(size=(c, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=c).astype(np.float32)
    g, be = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    mu, var = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 3, c).astype(np.float32)
    w2 = rng.normal(size=(5, c, 1, 1)).astype(np.float32)
    narrow = conv_bn_model(w1, b1, g, be, mu, var, w2)
    doubled = conv_bn_model(
        dup(w1, 0), dup(b1, 0), dup(g, 0), dup(be, 0), dup(mu, 0), dup(var, 0), split_dup(w2, 1, rng)
    )
    calib = rng.normal(size=(16, 3, 6, 6)).astype(np.float32)
    folded, report = fold(doubled, 0.5, channel_groups=[conv_group(2 * c)], repair="data", calib=calib)
    x = {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, x)[0], run(narrow, x)[0], atol=1e-4)
    assert report.groups[0].repair == "data"
    assert report.groups[0].repair_factor_min == pytest.approx(1.0, abs=1e-4)

    # distinct channels: statistics matched exactly on the calibration data
    model = conv_bn_model(w1, b1, g, be, mu, var, w2)
    folded, _ = fold(model, 0.5, channel_groups=[conv_group(c)], repair="data", calib=calib)
    merge = plan_group(ModelTensors(model), conv_group(c), 2).merge  # same seed -> same clusters

    def bn_stats(m):
        mm = onnx.ModelProto()
        mm.CopyFrom(m)
        mm.graph.output.add().name = "bn"
        y = np.concatenate([run(mm, {"x": calib[i : i + 1]})[1] for i in range(len(calib))])
        y = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]).astype(np.float64)
        return y.mean(0), y.std(0)

    m0, s0 = bn_stats(model)
    m1, s1 = bn_stats(folded)
    np.testing.assert_allclose(m1, merge.producer @ m0, atol=1e-4)
    np.testing.assert_allclose(s1, merge.producer @ s0, rtol=1e-3)


# --------------------------------------------------------------------------- one tensor, two axes
def square_residual_model(w0, w1, b1, w2):
    """x -> conv0 -> a; b = conv1(a) (square 1x1: the group's producer *and* consumer);
    y = conv2(a + b). MobileNetV3's first block has this shape (regression: issue 2)."""
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0"),
        helper.make_node("Conv", ["a", "w1", "b1"], ["b"], name="conv1"),
        helper.make_node("Add", ["a", "b"], ["s"], name="residual"),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2"),
    ]
    inits = {"w0": w0, "w1": w1, "b1": b1, "w2": w2}
    return _model(nodes, inits, [_vi("x", [1, 3, 5, 5])], [_vi("y", [1, 2, 5, 5])])


def square_residual_group(c: int, consumer_first: bool) -> ChannelGroup:
    prod = Member("w1", 0, Role.PRODUCER, node="conv1", op_type="Conv", param="weight")
    cons = Member("w1", 1, Role.CONSUMER, node="conv1", op_type="Conv", param="weight")
    return ChannelGroup(
        id=6,
        kind=GroupKind.DEPTHWISE,
        channels=c,
        members=(
            Member("w0", 0, Role.PRODUCER, node="conv0", op_type="Conv", param="weight"),
            *((cons, prod) if consumer_first else (prod, cons)),
            Member("b1", 0, Role.PARAM, node="conv1", op_type="Conv", param="bias"),
            Member("w2", 1, Role.CONSUMER, node="conv2", op_type="Conv", param="weight"),
        ),
    )


@pytest.mark.parametrize("consumer_first", [False, True])
@pytest.mark.parametrize("method", ["fold", "prune-l1"])
def test_tensor_on_two_axes_of_a_group_merges_along_each(rng, consumer_first, method):
    """``W1' = D·M·W1·Mᵀ``: rows averaged (producer), columns summed (consumer), one after the
    other on the same tensor; duplicates fold back exactly, pruning keeps a c×c block."""
    c = 3
    w0 = rng.normal(size=(c, 3, 1, 1)).astype(np.float32)
    w1 = rng.normal(size=(c, c, 1, 1)).astype(np.float32)
    b1 = rng.normal(size=c).astype(np.float32)
    w2 = rng.normal(size=(2, c, 1, 1)).astype(np.float32)
    narrow = square_residual_model(w0, w1, b1, w2)
    doubled = square_residual_model(
        dup(w0, 0), dup(split_dup(w1, 1, rng), 0), dup(b1, 0), split_dup(w2, 1, rng)
    )
    x = {"x": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)}
    group = square_residual_group(2 * c, consumer_first)
    folded, report = fold(doubled, 0.5, channel_groups=[group], method=method)
    assert init(folded, "w1").shape == (c, c, 1, 1) and init(folded, "w2").shape == (2, c, 1, 1)
    assert report.groups[0].channels_after == c
    if method == "fold":
        np.testing.assert_allclose(run(folded, x)[0], run(narrow, x)[0], atol=1e-5)
        np.testing.assert_allclose(init(folded, "w1"), w1, atol=1e-6)
    else:  # distinct channels: the pruned w1 is the kept rows x kept columns of the original
        wide = square_residual_model(
            rng.normal(size=(2 * c, 3, 1, 1)).astype(np.float32),
            rng.normal(size=(2 * c, 2 * c, 1, 1)).astype(np.float32),
            rng.normal(size=2 * c).astype(np.float32),
            rng.normal(size=(2, 2 * c, 1, 1)).astype(np.float32),
        )
        pruned, _ = fold(wide, 0.5, channel_groups=[group], method=method)
        keep = _kept(wide, pruned)
        assert len(set(keep.tolist())) == c
        np.testing.assert_allclose(init(pruned, "w1"), init(wide, "w1")[keep][:, keep], atol=1e-6)


def _kept(before: onnx.ModelProto, after: onnx.ModelProto) -> np.ndarray:
    """Indices of w0's rows that survived pruning (rows are matched by value)."""
    w0, w0p = init(before, "w0")[:, :, 0, 0], init(after, "w0")[:, :, 0, 0]
    return np.array([int(np.argmin(np.abs(w0 - r).sum(1))) for r in w0p])


def test_square_conv_group_from_the_analysis_folds_exactly(rng):
    """The analysis puts w1 on both axes of one group; the fold of its own groups is exact."""
    from foldonnx.analysis import find_channel_groups

    c = 3
    w0 = rng.normal(size=(c, 3, 1, 1)).astype(np.float32)
    w1 = rng.normal(size=(c, c, 1, 1)).astype(np.float32)
    b1 = rng.normal(size=c).astype(np.float32)
    w2 = rng.normal(size=(2, c, 1, 1)).astype(np.float32)
    doubled = square_residual_model(
        dup(w0, 0), dup(split_dup(w1, 1, rng), 0), dup(b1, 0), split_dup(w2, 1, rng)
    )
    groups = find_channel_groups(doubled)
    (g,) = [g for g in groups if any(m.tensor == "w1" for m in g.members)]
    assert {m.axis for m in g.members if m.tensor == "w1"} == {0, 1}
    folded, _ = fold(doubled, 0.5, channel_groups=groups, groups=g.kind.value)
    x = {"x": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)}
    narrow = square_residual_model(w0, w1, b1, w2)
    np.testing.assert_allclose(run(folded, x)[0], run(narrow, x)[0], atol=1e-5)


# --------------------------------------------------------------------------- DimRef.multiple
def test_dimref_multiple_is_rewritten_as_multiple_times_k(rng):
    """A Reshape target holding ``5·h`` (tokens x hidden flattened, like SAM's windows x heads)
    becomes ``5·k`` (issue 1: it stayed ``5·h`` and ORT refused the Reshape)."""
    d, h = 4, 6
    w1 = rng.normal(size=(d, h)).astype(np.float32)
    w2 = rng.normal(size=(h, d)).astype(np.float32)

    def model(w1, w2):
        n = w1.shape[1]
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
            helper.make_node("Relu", ["h0"], ["h1"], name="act"),
            helper.make_node("Reshape", ["h1", "flat"], ["f"], name="flatten"),
            helper.make_node("Reshape", ["f", "unflat"], ["h2"], name="unflatten"),
            helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"),
        ]
        inits = {"w1": w1, "w2": w2, "flat": np.array([1, 5 * n]), "unflat": np.array([1, 5, n])}
        return _model(nodes, inits, [_vi("x", [1, 5, d])], [_vi("y", [1, 5, d])])

    group = ChannelGroup(
        id=7,
        kind=GroupKind.MLP,
        channels=2 * h,
        members=(
            Member("w1", 1, Role.PRODUCER, node="fc1", op_type="MatMul"),
            Member("w2", 0, Role.CONSUMER, node="fc2", op_type="MatMul"),
        ),
        dims=(DimRef("flat", 1, "total", "flatten", multiple=5), DimRef("unflat", 2, "total", "unflatten")),
    )
    folded, _ = fold(model(dup(w1, 1), split_dup(w2, 0, rng)), 0.5, channel_groups=[group])
    assert init(folded, "flat").tolist() == [1, 5 * h] and init(folded, "unflat").tolist() == [1, 5, h]
    x = {"x": rng.normal(size=(1, 5, d)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, x)[0], run(model(w1, w2), x)[0], atol=1e-5)
