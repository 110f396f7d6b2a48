"""Low rank (``lowrank``): numerics on arrays, then the pass on tiny hand-built graphs.

* numerics — a weight of exact rank r comes back exactly at rank r; the error ladder from the
  singular values equals the error computed from the moments; with compensation 0 a paired fit
  is the whitened fit of the compressed inputs; a singular Gram still whitens; the convex hull;
  the second terms (rows beat nothing-extra, two low-rank terms never beat one of the same
  total rank on the rows they were fitted on);
* graphs — a residual two-block MLP whose weights have exact rank r is reproduced by the
  factored graph (sequential and one-shot); ``MatMul``, ``Gemm`` (transB) and 1x1 ``Conv``
  are rewritten into two factors keeping the output names; a shared weight is skipped with the
  reason; ratio 0 is the identity; ``target-params`` lands within one point; the CLI writes
  the model, the JSON report and the plot.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx.cli import main
from foldonnx.errors import UsageError
from foldonnx.numerics import lowrank as lr
from foldonnx.passes.base import PassContext
from foldonnx.passes.lowrank import LowRankPass, find_layers, name_nodes, parse_rank_spec, plan_segments
from foldonnx.passes.registry import get_pass, make_pass

OPSET = 17
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ numerics
def _rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * np.linspace(0.2, 3.0, d) + 0.3


def test_exact_rank_weight_comes_back_exactly() -> None:
    x = _rows(500, 12)
    w = RNG.normal(size=(12, 3)) @ RNG.normal(size=(3, 20))
    st = lr.LayerStats(12)
    st.add(x)
    fit = lr.reduced_rank_fit(st, w)
    a, b, _ = fit.factors(3)
    assert a.shape == (12, 3) and b.shape == (3, 20)
    np.testing.assert_allclose(a @ b, w, atol=1e-9)
    assert fit.loss(3) < 1e-9 * fit.energy and fit.loss(2) > 1e-3 * fit.energy


def test_loss_ladder_matches_the_moments() -> None:
    x = _rows(800, 10, 1)
    xt = x + 0.2 * RNG.normal(size=x.shape)
    w, b = RNG.normal(size=(10, 7)), RNG.normal(size=7)
    st = lr.LayerStats(10, paired=True)
    st.add(xt, x)
    for intercept in (False, True):
        fit = lr.reduced_rank_fit(st, w, b, intercept=intercept)
        for k in (1, 4, 7):
            a, bb, d = fit.factors(k)
            direct = np.mean(np.sum((xt @ (a @ bb) + d - (x @ w + b)) ** 2, axis=1))
            assert lr.quadratic_loss(st, w, b, a @ bb, d) == pytest.approx(
                direct, rel=1e-4
            )  # float32 products
            assert fit.loss(k) == pytest.approx(direct, rel=1e-3)  # the whitening ridge
        losses = fit.losses()
        assert np.all(np.diff(losses) <= 1e-12) and losses[-1] == pytest.approx(fit.loss(7))


def test_compensation_zero_is_the_whitened_fit_of_the_compressed_inputs() -> None:
    x = _rows(600, 8, 2)
    xt = x + 0.3 * RNG.normal(size=x.shape)
    w = RNG.normal(size=(8, 6))
    paired, alone = lr.LayerStats(8, paired=True), lr.LayerStats(8)
    paired.add(xt, x)
    alone.add(xt)
    a0, b0, _ = lr.reduced_rank_fit(paired, w, mix=0.0).factors(3)
    a1, b1, _ = lr.reduced_rank_fit(alone, w).factors(3)
    np.testing.assert_allclose(a0 @ b0, a1 @ b1, atol=1e-8)
    # full compensation fits the original outputs better on the rows it saw
    a2, b2, _ = lr.reduced_rank_fit(paired, w, mix=1.0).factors(3)
    assert lr.quadratic_loss(paired, w, None, a2 @ b2, None) < lr.quadratic_loss(
        paired, w, None, a0 @ b0, None
    )


def test_singular_gram_still_whitens() -> None:
    z = _rows(300, 6, 3)
    x = np.concatenate([z, z[:, :1]], axis=1)  # a repeated column: singular Gram
    x = x - x.mean(1, keepdims=True)  # and rows summing to zero (a LayerNorm's output)
    st = lr.LayerStats(7)
    st.add(x)
    g, *_ = st.moments(centre=True)
    wh = lr.whiten(g)
    assert wh.method in ("cholesky", "cholesky+ridge", "eigh")
    s = wh.root if wh.method != "eigh" else wh.root * wh.scale
    np.testing.assert_allclose(s @ s.T, g + wh.shift * np.eye(7), atol=1e-6 * np.abs(g).max())
    w = RNG.normal(size=(7, 5))
    a, b, _ = lr.reduced_rank_fit(st, w, intercept=True).factors(5)
    assert np.all(np.isfinite(a @ b))
    assert lr.whiten(np.zeros((3, 3))).root.shape == (3, 3)


def test_hull_ladder_takes_the_cheapest_slopes_first() -> None:
    saved = [0, 1, 2, 3, 4]
    costs = [0.0, 3.0, 3.2, 3.5, 5.0]
    assert lr.hull_ladder(saved, costs) == [0, 3, 4]
    assert lr.hull_ladder([0, 1, 2], [0.0, 1.0, 2.0]) in ([0, 2], [0, 1, 2])


def test_parameter_ledger() -> None:
    assert lr.break_even_rank(384, 384) == 191
    assert lr.factor_params(191, 384, 384) < 384 * 384
    assert lr.factor_params(192, 384, 384) == 384 * 384
    assert lr.break_even_rank(1536, 384) == 307
    assert lr.round_rank(213, 8) == 208 and lr.round_rank(3, 8) == 1


def test_second_terms() -> None:
    x = _rows(1500, 16, 4)
    x[:, 3] *= 30.0  # one input channel with huge activations
    w = RNG.normal(size=(16, 4)) @ RNG.normal(size=(4, 12)) + 0.2 * RNG.normal(size=(16, 12))
    w[3] += 5.0 * RNG.normal(size=12)
    st = lr.LayerStats(16, paired=True)
    st.add(x + 0.05 * RNG.normal(size=x.shape), x)
    fit = lr.reduced_rank_fit(st, w)
    cols = lr.pick_columns(fit, st, 3, 2)
    a, b, r, _ = lr.columns_fit(st, w, None, 3, cols)
    assert np.all(a[cols] == 0) and r.shape == (2, 12)
    w_hat = a @ b
    w_hat[cols] += r
    assert lr.quadratic_loss(st, w, None, w_hat, None) < fit.loss(3)  # the rows help at rank 3
    (a1, b1), (a2, b2), _ = lr.split_fit(st, w, None, 3, 2)
    split = lr.quadratic_loss(st, w, None, a1 @ b1 + a2 @ b2, None)
    assert split >= fit.loss(5) * (1 - 1e-9)  # Eckart-Young: never better than one rank-5 fit
    assert split < fit.loss(3)


# ------------------------------------------------------------------------------ graphs
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
    onnx.checker.check_model(m)
    return m


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _low_rank(n_in: int, n_out: int, r: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_in, r)) @ rng.normal(size=(r, n_out)) / np.sqrt(n_in)).astype(np.float32)


def residual_mlp(d: int = 16, h: int = 48, r: int = 4, blocks: int = 2, seed: int = 0) -> onnx.ModelProto:
    """``x [B, T, d]``; per block ``x = x + relu(x·W1 + b1)·W2 + b2`` with rank-r W1, W2."""
    nodes, inits = [], {}
    cur = "x"
    for i in range(blocks):
        inits[f"w1_{i}"] = _low_rank(d, h, r, seed + 2 * i)
        inits[f"b1_{i}"] = np.linspace(-0.1, 0.1, h).astype(np.float32)
        inits[f"w2_{i}"] = _low_rank(h, d, r, seed + 2 * i + 1)
        inits[f"b2_{i}"] = np.full(d, 0.05, np.float32)
        nodes += [
            helper.make_node("MatMul", [cur, f"w1_{i}"], [f"m1_{i}"], name=f"blk{i}/fc1/MatMul"),
            helper.make_node("Add", [f"m1_{i}", f"b1_{i}"], [f"a1_{i}"], name=f"blk{i}/fc1/Add"),
            helper.make_node("Relu", [f"a1_{i}"], [f"r_{i}"], name=f"blk{i}/relu"),
            helper.make_node("MatMul", [f"r_{i}", f"w2_{i}"], [f"m2_{i}"], name=f"blk{i}/fc2/MatMul"),
            helper.make_node("Add", [f"m2_{i}", f"b2_{i}"], [f"a2_{i}"], name=f"blk{i}/fc2/Add"),
            helper.make_node("Add", [cur, f"a2_{i}"], [f"x{i + 1}"], name=f"blk{i}/residual"),
        ]
        cur = f"x{i + 1}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    f = TensorProto.FLOAT
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", f, ["B", 5, d])],
        [helper.make_tensor_value_info("y", f, ["B", 5, d])],
    )


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(40, 5, 16)).astype(np.float32)


def _op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


@pytest.mark.parametrize(
    "options",
    [
        {"fit": "one-shot"},
        {"fit": "sequential"},
        {"fit": "sequential", "compensation": "auto", "intercept": True},
    ],
    ids=["one-shot", "sequential", "sequential-compensation-intercept"],
)
def test_exact_rank_network_is_reproduced_at_its_rank(options: dict, tokens: np.ndarray) -> None:
    m = residual_mlp(r=4)
    before = m.SerializeToString()
    res = LowRankPass(ranks="*=4", tokens=0, **options).run(m, PassContext(calib=tokens))
    assert m.SerializeToString() == before  # the input is left alone
    out = res.model
    onnx.checker.check_model(out)
    assert _op_count(out, "MatMul") == 8  # every MatMul became two
    assert {o.name for o in out.graph.output} == {"y"}
    produced = {o for n in out.graph.node for o in n.output}
    assert {"m1_0", "m2_0", "m1_1", "m2_1"} <= produced  # the factored outputs keep their names
    np.testing.assert_allclose(_run(out, tokens), _run(m, tokens), atol=1e-4, rtol=1e-4)
    rep = res.report
    assert [r.rank for r in rep.layers] == [4, 4, 4, 4]
    assert all(r.params_after == 4 * (r.n_in + r.n_out) for r in rep.layers)
    assert rep.after.params == rep.before.params - sum(r.params_before - r.params_after for r in rep.layers)
    assert rep.verify_max_error is not None and rep.verify_max_error < 1e-4
    assert max(r.train_error for r in rep.layers) < 1e-8


def test_segments_cut_at_the_residual_stream() -> None:
    m = residual_mlp(blocks=3)
    name_nodes(m)
    layers, _ = find_layers(m)
    from foldonnx.passes.lowrank import group_layers

    segs = plan_segments(m, group_layers(layers, False))
    # block 0 reads its residual from the graph input, so its hidden activation is a cut too
    assert [s.cut for s in segs] == [None, "r_0", "x1", "x2"]
    assert [s.end_cut for s in segs] == ["r_0", "x1", "x2", None]
    assert [[g.stage for g in s.groups] for s in segs] == [[0], [0], [0, 1], [0, 1]]


def test_ratio_zero_is_the_identity(tokens: np.ndarray) -> None:
    m = residual_mlp()
    for opts in ({"target_params": 0.0}, {"rank_ratio": 1.0}):
        res = make_pass("lowrank", opts).run(m, PassContext(calib=tokens))
        assert res.model is not m
        np.testing.assert_array_equal(_run(res.model, tokens), _run(m, tokens))
        assert res.report.after.params == res.report.before.params


def test_target_params_is_met_and_rank_is_allocated(tokens: np.ndarray) -> None:
    m = residual_mlp(d=32, h=96, r=32, blocks=2, seed=3)  # full rank: every layer costs something
    x = np.random.default_rng(2).normal(size=(64, 5, 32)).astype(np.float32)
    for alloc in ("uniform", "sensitivity", "error"):
        res = LowRankPass(target_params=0.25, allocation=alloc, round_to=1, min_rank=1, tokens=0).run(
            m, PassContext(calib=x)
        )
        assert abs(res.report.params_removed - 0.25) < 0.01, alloc
        assert res.report.allocation == alloc
        if alloc == "sensitivity":
            assert all(r.sensitivity is not None and r.sensitivity >= 0 for r in res.report.layers)


def test_gemm_and_conv_layers(tokens: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    f = TensorProto.FLOAT
    w_g = _low_rank(12, 10, 3, 7).T.copy()  # Gemm transB: [out, in]
    w_c = _low_rank(10, 8, 2, 8).T.reshape(8, 10, 1, 1).copy()  # 1x1 conv [out, in, 1, 1]
    nodes = [
        helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], name="fc", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Reshape", ["g", "shape"], ["img"], name="to_image"),
        helper.make_node("Conv", ["img", "wc", "bc"], ["y"], name="conv1x1"),
    ]
    inits = {
        "wg": w_g,
        "bg": rng.normal(size=10).astype(np.float32),
        "shape": np.array([-1, 10, 1, 1]),
        "wc": w_c,
        "bc": rng.normal(size=8).astype(np.float32),
    }
    m = _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", f, ["B", 12])],
        [helper.make_tensor_value_info("y", f, ["B", 8, 1, 1])],
    )
    x = rng.normal(size=(50, 12)).astype(np.float32)
    res = LowRankPass(ranks="fc=3,conv1x1=2").run(m, PassContext(calib=x))
    out = res.model
    assert _op_count(out, "Conv") == 2 and _op_count(out, "Gemm") == 1 and _op_count(out, "MatMul") == 1
    np.testing.assert_allclose(_run(out, x), _run(m, x), atol=1e-4, rtol=1e-4)
    assert [(r.kind, r.rank) for r in res.report.layers] == [("Gemm", 3), ("Conv1x1", 2)]


def test_shared_and_unsupported_weights_are_skipped_with_the_reason() -> None:
    f = TensorProto.FLOAT
    w = RNG.normal(size=(8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
        helper.make_node("MatMul", ["a", "w"], ["b"], name="second"),  # the same weight again
        helper.make_node("MatMul", ["b", "v"], ["c"], name="third"),
        helper.make_node("Conv", ["img", "k"], ["y2"], name="conv3x3"),
    ]
    inits = {
        "w": w,
        "v": RNG.normal(size=(8, 16)).astype(np.float32),
        "k": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32),
    }
    m = _model(
        nodes,
        inits,
        [
            helper.make_tensor_value_info("x", f, ["B", 8]),
            helper.make_tensor_value_info("img", f, [1, 3, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("c", f, ["B", 16]),
            helper.make_tensor_value_info("y2", f, [1, 4, 3, 3]),
        ],
    )
    name_nodes(m)
    layers, skipped = find_layers(m)
    assert [layer.node for layer in layers] == ["third"]
    reasons = {s.what: s.reason for s in skipped}
    assert "shared" in reasons["first"] and "second" in reasons["first"]
    assert "shared" in reasons["second"]
    assert "3x3 convolution" in reasons["conv3x3"]


def test_second_term_is_kept_only_where_it_helps(tokens: np.ndarray) -> None:
    d, h = 16, 40
    rng = np.random.default_rng(9)
    w = _low_rank(d, h, 3, 11) + 0.02 * rng.normal(size=(d, h)).astype(np.float32)
    w[2] += 3.0 * rng.normal(size=h).astype(np.float32)  # one input channel carries its own map
    f = TensorProto.FLOAT
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        {"w": w},
        [helper.make_tensor_value_info("x", f, ["B", d])],
        [helper.make_tensor_value_info("y", f, ["B", h])],
    )
    x = rng.normal(size=(400, d)).astype(np.float32)
    x[:, 2] *= 10.0
    res = LowRankPass(ranks="fc=8", second_term="auto", round_to=2, held_out=4).run(m, PassContext(calib=x))
    rep = res.report
    assert rep.second_term_tried == 2
    assert sum(rep.second_term_kept.values()) <= 1
    layer = rep.layers[0]
    assert layer.params_after <= 8 * (d + h)
    np.testing.assert_allclose(_run(res.model, x[:5]).shape, (5, h))
    if layer.second_term == "columns":
        assert _op_count(res.model, "Gather") == 1 and layer.columns > 0


def test_data_free_plain_svd(tokens: np.ndarray) -> None:
    m = residual_mlp(r=4)
    res = LowRankPass(ranks="*=4").run(m, PassContext(calib="none"))
    assert res.report.fit == "plain-svd"
    np.testing.assert_allclose(_run(res.model, tokens), _run(m, tokens), atol=1e-4, rtol=1e-4)


def test_config_errors_are_one_line() -> None:
    with pytest.raises(UsageError, match="one of"):
        LowRankPass(target_params=0.2, rank_ratio=0.5)
    with pytest.raises(UsageError, match="give --target-params"):
        LowRankPass()
    with pytest.raises(UsageError, match="GLOB=RANK"):
        parse_rank_spec("fc1")
    assert parse_rank_spec("*fc1*=128, *qkv*=0.5,head=dense") == [
        ("*fc1*", 128.0),
        ("*qkv*", 0.5),
        ("head", None),
    ]
    with pytest.raises(UsageError, match="compensation"):
        LowRankPass(target_params=0.2, compensation="lots")
    assert get_pass("lowrank").budget == {"params": "target_params"}


def test_cli_writes_model_report_and_plot(tmp_path, tokens: np.ndarray) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(residual_mlp(d=32, h=96, r=32, seed=4), src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).normal(size=(32, 5, 32)).astype(np.float32))
    out, rep, png = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "ranks.png"
    code = main(
        [
            "lowrank",
            str(src),
            str(out),
            "--target-params",
            "0.2",
            "--calib",
            str(calib),
            "--allocation",
            "uniform",
            "--json",
            str(rep),
            "--plot",
            str(png),
            "--bench-iters",
            "2",
            "-q",
        ]
    )
    assert code == 0
    d = json.loads(rep.read_text())
    assert d["name"] == "lowrank" and abs(d["params_removed"] - 0.2) < 0.02
    assert d["latency_ratio"] is not None and d["params_ratio"] < 0.85
    assert png.stat().st_size > 1000
    onnx.checker.check_model(onnx.load(str(out)))
    assert (
        main(["lowrank", str(src), str(tmp_path / "x.onnx"), "--target-params", "0.2", "--rank-ratio", "0.5"])
        == 2
    )


def test_token_rows_skip_padding_and_weight_the_first_token() -> None:
    from foldonnx.passes.lowrank import _RowPicker, token_mask

    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    assert token_mask({"input_ids": mask * 7, "attention_mask": mask}).tolist() == mask.astype(bool).tolist()
    a = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    rows, w = _RowPicker(0, 0, 4.0, mask.astype(bool))(a, -1, np.array([0, 1]))
    assert len(rows) == 3 + 5  # the padded positions of sample 0 are left out
    np.testing.assert_array_equal(rows[:3], a[0, :3])
    assert w.tolist() == [4, 1, 1, 4, 1, 1, 1, 1]
    rows, w = _RowPicker(2, 0)(a, -1, np.array([0, 1]))  # the first token and 2 others per sample
    assert len(rows) == 6 and w is None
    assert np.array_equal(rows[0], a[0, 0]) and np.array_equal(rows[3], a[1, 0])
    img = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)  # NCHW: pixels are rows
    rows, _ = _RowPicker(0, 0)(img, 1, np.array([0, 1]))
    assert rows.shape == (8, 3) and np.array_equal(rows[1], img[0, :, 0, 1])


def test_mixed_calibration_interleaves_sources(tmp_path) -> None:
    from foldonnx.passes.lowrank import mixed_calibration

    m = residual_mlp()
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=np.zeros((4, 5, 16), np.float32))
    np.savez(b, x=np.ones((4, 5, 16), np.float32))
    feeds = mixed_calibration(m, PassContext(), f"{a}+{b}", limit=6)
    assert feeds["x"].shape == (6, 5, 16)
    assert feeds["x"][:, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    res = LowRankPass(ranks="*=4").run(m, PassContext(calib=f"{a}+{b}"))
    assert res.report.calib == f"{a}+{b}"


def test_damage_model_and_allocation_favour_the_sensitive_layer() -> None:
    from foldonnx.passes.lowrank import FactorGroup, LinearLayer, _DamageModel

    dm = _DamageModel()
    dm.add(64, 0.01, 0.002)
    dm.add(32, 0.04, 0.016)  # damage grows as error^1.5
    assert dm.power == pytest.approx(1.5) and dm.cost(np.array([0.01]))[0] == pytest.approx(0.002)
    groups = [
        FactorGroup(i, [LinearLayer(f"fc{i}", "MatMul", "x", f"y{i}", f"w{i}", 64, 64)]) for i in range(2)
    ]
    w = RNG.normal(size=(64, 64))
    fits = {g.id: lr.plain_svd_fit(w) for g in groups}
    models = {0: _DamageModel(), 1: _DamageModel()}
    err16 = fits[0].loss(16) - fits[0].loss(64)
    models[0].add(16, err16, err16 * 1.0)
    models[1].add(16, err16, err16 * 100.0)  # the same error hurts the output 100x more
    p = LowRankPass(target_params=0.3, round_to=1, min_rank=1)
    total = 2 * 64 * 64
    ranks = p._allocate(groups, total, fits, models, [])
    assert ranks[1] > ranks[0]
    saved = sum(64 * 64 - lr.factor_params(k, 64, 64) for k in ranks.values())
    assert abs(saved - 0.3 * total) <= 0.005 * total


def test_constant_node_weights_are_factored() -> None:
    f = TensorProto.FLOAT
    w = _low_rank(12, 20, 3, 21)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    m = _model(nodes, {}, [helper.make_tensor_value_info("x", f, ["B", 12])],
               [helper.make_tensor_value_info("y", f, ["B", 20])])  # fmt: skip
    x = np.random.default_rng(4).normal(size=(30, 12)).astype(np.float32)
    res = LowRankPass(ranks="fc=3").run(m, PassContext(calib=x))
    assert _op_count(res.model, "MatMul") == 2 and _op_count(res.model, "Constant") == 0
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), atol=1e-4, rtol=1e-4)
