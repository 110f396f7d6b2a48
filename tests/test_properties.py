"""Property tests: random small graphs (MLP stacks with residuals, attention blocks with fused or
split q/k/v, conv / BatchNorm / depthwise / residual stacks — with shared initializers and fixed
or dynamic batch) through every registered pass, with the real channel-group analysis.

For every pass and graph: the input model's bytes are unchanged; a zero budget is the
identity; a real budget either refuses with a one-line error of our own or gives a model that
onnx.checker accepts, ONNX Runtime runs, with unchanged output shapes. For fold: channels
planted as exact duplicates fold back exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from foldonnx.errors import FoldOnnxError
from foldonnx.passes.base import PassContext
from foldonnx.passes.registry import get_pass, list_passes, make_pass

SETTINGS = settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inits: dict[str, np.ndarray], x_shape: list, y_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [_vi("x", x_shape)], [_vi("y", y_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


# ------------------------------------------------------------------------------ families
def mlp_stack(rng, *, depth, d, h, gelu, shared_bias, batch, dup) -> onnx.ModelProto:
    """x [B, 3, d] -> depth x (s + fc2(act(fc1(s)))) -> y; ``dup`` doubles every hidden layer
    with exact copies (fc1 columns, bias) and halves fc2 rows: folding 50 % gives it back."""
    nodes, inits, s = [], {}, "x"
    if shared_bias:  # one all-zero bias tensor read by every fc2 (exporters share these)
        inits["zeros_d"] = np.zeros(d, np.float32)
    for i in range(depth):
        w1, b1, w2 = rng.normal(size=(d, h)), rng.normal(size=h), rng.normal(size=(h, d)) / h
        if dup:
            w1, b1, w2 = np.concatenate([w1, w1], 1), np.concatenate([b1, b1]), np.concatenate([w2, w2]) / 2
        inits.update({f"w1_{i}": _f32(w1), f"b1_{i}": _f32(b1), f"w2_{i}": _f32(w2)})
        nodes += [
            helper.make_node("MatMul", [s, f"w1_{i}"], [f"a{i}"], name=f"fc1_{i}"),
            helper.make_node("Add", [f"a{i}", f"b1_{i}"], [f"ab{i}"], name=f"fc1b_{i}"),
        ]
        if gelu:
            inits.setdefault("sqrt2", np.float32(np.sqrt(2.0)))
            inits.setdefault("one", np.float32(1.0))
            inits.setdefault("half", np.float32(0.5))
            nodes += [
                helper.make_node("Div", [f"ab{i}", "sqrt2"], [f"g0_{i}"], name=f"gd{i}"),
                helper.make_node("Erf", [f"g0_{i}"], [f"g1_{i}"], name=f"ge{i}"),
                helper.make_node("Add", [f"g1_{i}", "one"], [f"g2_{i}"], name=f"ga{i}"),
                helper.make_node("Mul", [f"ab{i}", f"g2_{i}"], [f"g3_{i}"], name=f"gm{i}"),
                helper.make_node("Mul", [f"g3_{i}", "half"], [f"r{i}"], name=f"gh{i}"),
            ]
        else:
            nodes.append(helper.make_node("Relu", [f"ab{i}"], [f"r{i}"], name=f"relu{i}"))
        bias = "zeros_d" if shared_bias else f"b2_{i}"
        if not shared_bias:
            inits[bias] = _f32(rng.normal(size=d))
        nodes += [
            helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"m{i}"], name=f"fc2_{i}"),
            helper.make_node("Add", [f"m{i}", bias], [f"mb{i}"], name=f"fc2b_{i}"),
            helper.make_node("Add", [s, f"mb{i}"], [f"s{i + 1}" if i + 1 < depth else "y"], name=f"res{i}"),
        ]
        s = f"s{i + 1}"
    return _model(nodes, inits, [batch, 3, d], [batch, 3, d])


def attention(rng, *, d, heads, hd, fused, batch, dup) -> onnx.ModelProto:
    """x [B, 5, d] -> q/k/v (fused + Split, or three MatMuls) -> whole-head attention -> proj,
    plus the residual. ``dup`` doubles the heads with exact copies and halves proj's rows."""
    n_heads = 2 * heads if dup else heads
    wq, wk, wv = (rng.normal(size=(d, heads, hd)) for _ in range(3))
    wo = rng.normal(size=(heads, hd, d)) / (heads * hd)
    if dup:
        wq, wk, wv = (np.concatenate([w, w], 1) for w in (wq, wk, wv))
        wo = np.concatenate([wo, wo]) / 2
    width = n_heads * hd
    inits = {
        "wo": _f32(wo.reshape(width, d)),
        "shape4": np.array([0, 0, n_heads, hd], np.int64),
        "shape3": np.array([0, 0, width], np.int64),
        "scale": np.array(hd**-0.5, np.float32),
    }
    nodes = []
    if fused:
        inits["wqkv"] = _f32(np.concatenate([w.reshape(d, width) for w in (wq, wk, wv)], 1))
        inits["split"] = np.array([width] * 3, np.int64)
        nodes += [
            helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="qkv"),
            helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=2, name="split"),
        ]
    else:
        for name, w in (("q", wq), ("k", wk), ("v", wv)):
            inits[f"w{name}"] = _f32(w.reshape(d, width))
            nodes.append(helper.make_node("MatMul", ["x", f"w{name}"], [name], name=f"proj_{name}"))
    nodes += [
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
        helper.make_node("MatMul", ["o", "wo"], ["a"], name="out_proj"),
        helper.make_node("Add", ["x", "a"], ["y"], name="residual"),
    ]
    return _model(nodes, inits, [batch, 5, d], [batch, 5, d])


def conv_stack(rng, *, c, bn, depthwise, residual, batch, dup) -> onnx.ModelProto:
    """x [B, 3, 6, 6] -> conv3x3 (c) [-> BN] -> Relu [-> depthwise 3x3 -> Relu] -> conv1x1 (3)
    [+ x]; ``dup`` doubles the c channels with exact copies and halves the 1x1's columns."""
    k = 2 * c if dup else c
    w1, b1 = rng.normal(size=(c, 3, 3, 3)), rng.normal(size=c)
    g, be, mu, var = rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.5, 2, c)
    wdw, w3 = rng.normal(size=(c, 1, 3, 3)), rng.normal(size=(3, c, 1, 1)) / c
    if dup:
        w1, b1, g, be, mu, var, wdw = (np.concatenate([a, a]) for a in (w1, b1, g, be, mu, var, wdw))
        w3 = np.concatenate([w3, w3], 1) / 2
    inits = {"w1": _f32(w1), "b1": _f32(b1), "w3": _f32(w3)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    cur = "c1"
    if bn:
        inits.update(g=_f32(g), be=_f32(be), mu=_f32(mu), var=_f32(var))
        nodes.append(
            helper.make_node("BatchNormalization", [cur, "g", "be", "mu", "var"], ["bn"], name="bn1")
        )
        cur = "bn"
    nodes.append(helper.make_node("Relu", [cur], ["r1"], name="relu1"))
    cur = "r1"
    if depthwise:
        inits["wdw"] = _f32(wdw)
        nodes += [
            helper.make_node("Conv", [cur, "wdw"], ["d1"], group=k, pads=[1, 1, 1, 1], name="dw"),
            helper.make_node("Relu", ["d1"], ["r2"], name="relu2"),
        ]
        cur = "r2"
    out = "p" if residual else "y"
    nodes.append(helper.make_node("Conv", [cur, "w3"], [out], name="project"))
    if residual:
        nodes.append(helper.make_node("Add", ["x", "p"], ["y"], name="residual"))
    return _model(nodes, inits, [batch, 3, 6, 6], [batch, 3, 6, 6])


def _draw_mlp(draw, dup: bool) -> tuple[onnx.ModelProto, str]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    model = mlp_stack(
        rng, depth=draw(st.integers(1, 2)), d=draw(st.integers(3, 6)), h=draw(st.integers(2, 6)),
        gelu=draw(st.booleans()), shared_bias=draw(st.booleans()), batch=draw(st.sampled_from(["N", 1])),
        dup=dup,
    )  # fmt: skip
    return model, "mlp"


def _draw_attention(draw, dup: bool) -> tuple[onnx.ModelProto, str]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    model = attention(
        rng, d=draw(st.integers(4, 8)), heads=draw(st.integers(1, 3)), hd=draw(st.integers(2, 4)),
        fused=draw(st.booleans()), batch=draw(st.sampled_from(["N", 1])), dup=dup,
    )  # fmt: skip
    return model, "heads"


def _draw_conv(draw, dup: bool) -> tuple[onnx.ModelProto, str]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    depthwise = draw(st.booleans())
    model = conv_stack(
        rng, c=draw(st.integers(2, 5)), bn=draw(st.booleans()), depthwise=depthwise,
        residual=draw(st.booleans()), batch=draw(st.sampled_from(["N", 1])), dup=dup,
    )  # fmt: skip
    return model, "depthwise" if depthwise else "conv"


FAMILIES = {"mlp": _draw_mlp, "attention": _draw_attention, "conv": _draw_conv}


def _input(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else 2 for d in vi.type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _ctx(model: onnx.ModelProto) -> PassContext:
    vi = model.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
    calib = np.random.default_rng(1).normal(size=[8, *shape[1:]]).astype(np.float32)
    return PassContext(calib={"x": calib})


def _budget(name: str, value: float) -> dict[str, float]:
    entry = get_pass(name)
    field = entry.budget.get("channels") or entry.budget.get("params")
    return {} if field is None else {field: value}


def _check_pass_on(name: str, model: onnx.ModelProto) -> None:
    before = model.SerializeToString()
    feeds = _input(model)
    y0 = _run(model, feeds)
    entry = get_pass(name)
    if entry.budget:
        res = make_pass(name, _budget(name, 0.0)).run(model, _ctx(model))
        np.testing.assert_allclose(_run(res.model, feeds), y0, atol=1e-5, rtol=1e-5)
    try:
        res = make_pass(name, _budget(name, 0.5)).run(model, _ctx(model))
    except FoldOnnxError as exc:  # a refusal is fine when it says why, in one line
        assert str(exc) and "\n" not in str(exc)
    else:
        onnx.checker.check_model(res.model)
        assert _run(res.model, feeds).shape == y0.shape
    assert model.SerializeToString() == before


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", list_passes())
def test_every_pass_keeps_its_contract_on_random_graphs(name: str, family: str) -> None:
    @SETTINGS
    @given(st.data())
    def check(data) -> None:
        model, _ = FAMILIES[family](data.draw, dup=False)
        _check_pass_on(name, model)

    check()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_planted_duplicate_channels_fold_back_exactly(family: str) -> None:
    @SETTINGS
    @given(st.data())
    def check(data) -> None:
        model, kind = FAMILIES[family](data.draw, dup=True)
        before = model.SerializeToString()
        feeds = _input(model, seed=3)
        res = make_pass("fold", {"groups": f"{kind}=0.5", "round_to": 1}).run(model, PassContext())
        assert res.report.groups, res.report.skipped
        assert all(g.channels_after * 2 == g.channels_before for g in res.report.groups)
        np.testing.assert_allclose(_run(res.model, feeds), _run(model, feeds), atol=1e-4, rtol=1e-4)
        assert model.SerializeToString() == before

    check()
