"""The fast consumer refit: its statistics and α choice against the reference numerics of
:mod:`foldonnx.numerics.lsq`, the folded model's cut after each refit (the consumer's tail is
run, not the whole block), and :class:`SubgraphRunner` filling its outputs in place."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import foldonnx.passes.fold.repair_data as repair_data
from foldonnx.analysis.channel_groups import ChannelGroup, GroupKind, Member, Role
from foldonnx.data.activations import SubgraphRunner
from foldonnx.numerics.lsq import ALPHAS, LsqStats, choose_refit
from foldonnx.passes.fold import fold
from foldonnx.passes.fold.repair_data import RefitRows, choose_refit_rows, refit_stats

D, H, T = 6, 8, 5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _rows(rng: np.random.Generator, n: int, d: int, o: int, offset: float = 3.0, seed: int = 7) -> RefitRows:
    """Correlated rows with a large common offset (as transformer activations have), a planted
    linear map plus noise, and the CLS-style weights (first row of every 9 weighs 8)."""
    planted = np.random.default_rng(seed).normal(size=(d, o)) / np.sqrt(d)  # the same for every call
    mix = rng.normal(size=(d, d)) * np.exp(-np.arange(d) / (d / 4))[None, :]
    h = (rng.normal(size=(n, d)) @ mix.T + offset).astype(np.float32)
    y = (h @ planted + 0.1 * rng.normal(size=(n, o))).astype(np.float32)
    w = np.tile(np.r_[8.0, np.ones(8)], n // 9 + 1)[:n]
    return RefitRows(h, y, w)


def _reference_stats(rows: RefitRows) -> LsqStats:
    s = LsqStats()
    s.add(rows.h, rows.y, rows.w)
    return s


def test_refit_stats_matches_the_float64_statistics(rng: np.random.Generator) -> None:
    rows = _rows(rng, 2500, 40, 7)  # several blocks of float32 products
    fast, ref = refit_stats(rows), _reference_stats(rows)
    assert fast.rows == pytest.approx(ref.rows) == rows.total
    np.testing.assert_allclose(fast.gram, ref.gram, rtol=1e-6, atol=1e-6 * np.abs(ref.gram).max())
    np.testing.assert_allclose(fast.cross, ref.cross, rtol=1e-6, atol=1e-6 * np.abs(ref.cross).max())
    assert fast.yy == pytest.approx(ref.yy, rel=1e-9)
    # the centred covariance (what the ridge solves with) survives the large offset
    n = ref.gram[-1, -1]
    centred = [s.gram[:-1, :-1] - np.outer(s.gram[-1, :-1], s.gram[-1, :-1]) / n for s in (fast, ref)]
    np.testing.assert_allclose(centred[0], centred[1], rtol=1e-4, atol=1e-5 * np.abs(centred[1]).max())
    empty = refit_stats(RefitRows(rows.h[:0], rows.y[:0], rows.w[:0]))
    assert empty.rows == 0 and empty.gram.shape == (41, 41) and not empty.gram.any()


@pytest.mark.parametrize("mode", ["none", "bias", "ridge"])
def test_choose_refit_rows_picks_what_choose_refit_picks(rng: np.random.Generator, mode: str) -> None:
    d, o = 30, 5
    train, judge = _rows(rng, 900, d, o), _rows(rng, 300, d, o)
    w0 = np.random.default_rng(7).normal(size=(d, o)) / np.sqrt(d) + 0.3 * rng.normal(size=(d, o)) / np.sqrt(
        d
    )
    tr, va = _reference_stats(train), _reference_stats(judge)
    full = LsqStats()
    full += tr
    full += va
    w_ref, d_ref, label_ref, errs_ref = choose_refit(tr, va, w0, mode)
    w, delta, label, errs = choose_refit_rows(tr, judge, full, w0, mode)
    assert label == label_ref
    assert errs.keys() == errs_ref.keys()
    for k, e in errs.items():
        assert e == pytest.approx(errs_ref[k], rel=1e-6), k
    np.testing.assert_allclose(w, w_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(delta, d_ref, rtol=1e-9, atol=1e-12)
    if mode == "ridge":
        assert set(errs) == {"none", "bias", *(f"ridge{a:g}" for a in ALPHAS)}
        assert label.startswith("ridge")  # a planted linear map: some ridge fit beats the prior


# ------------------------------------------------------------------------- sequential refit
def _inner_skip_model(rng: np.random.Generator, blocks: int = 2) -> onnx.ModelProto:
    """x[N,T,D] -> blocks × (r1 = r + r·A; r2 = r1 + fc2(relu(fc1(r1) + b1)) + b2): the MLP's
    residual Add reads r1, a value inside the block (not a cut the refit caches)."""
    nodes, inits = [], {}
    r = "x"
    for i in range(blocks):
        p = f"l{i}_"
        nodes += [
            helper.make_node("MatMul", [r, p + "a"], [p + "a0"], name=p + "mix"),
            helper.make_node("Add", [r, p + "a0"], [p + "r1"], name=p + "mix_residual"),
            helper.make_node("MatMul", [p + "r1", p + "w1"], [p + "h0"], name=p + "fc1"),
            helper.make_node("Add", [p + "h0", p + "b1"], [p + "h1"], name=p + "fc1_bias"),
            helper.make_node("Relu", [p + "h1"], [p + "h2"], name=p + "act"),
            helper.make_node("MatMul", [p + "h2", p + "w2"], [p + "y0"], name=p + "fc2"),
            helper.make_node("Add", [p + "y0", p + "b2"], [p + "y1"], name=p + "fc2_bias"),
            helper.make_node("Add", [p + "r1", p + "y1"], [p + "r"], name=p + "residual"),
        ]
        inits.update(
            {
                p + "a": 0.3 * rng.normal(size=(D, D)),
                p + "w1": rng.normal(size=(D, H)),
                p + "b1": rng.normal(size=H),
                p + "w2": rng.normal(size=(H, D)),
                p + "b2": rng.normal(size=D),
            }
        )
        r = p + "r"
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", T, D]) for n in ("x", r)]
    graph = helper.make_graph(
        nodes,
        "g",
        vi[:1],
        vi[1:],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _mlp_groups(blocks: int) -> list[ChannelGroup]:
    return [
        ChannelGroup(
            id=i,
            kind=GroupKind.MLP,
            channels=H,
            name=f"mlp{i}",
            members=(
                Member(f"l{i}_w1", 1, Role.PRODUCER, node=f"l{i}_fc1", op_type="MatMul", param="weight"),
                Member(f"l{i}_b1", 0, Role.PARAM, node=f"l{i}_fc1_bias", op_type="Add", param="bias"),
                Member(f"l{i}_w2", 0, Role.CONSUMER, node=f"l{i}_fc2", op_type="MatMul", param="weight"),
            ),
        )
        for i in range(blocks)
    ]


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for name in outputs:
        m.graph.output.add().name = name
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_each_refit_continues_from_the_folded_models_own_residual_stream(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a consumer's refit only its tail (fc2, bias, residual Add) is run again; the cut the
    next consumer starts from must be what the final folded model computes there."""
    blocks = 3
    model = _inner_skip_model(rng, blocks)
    calib = rng.normal(size=(24, T, D)).astype(np.float32)
    seen: list[dict[str, np.ndarray]] = []
    real = repair_data.run_subgraph

    def spy(m: onnx.ModelProto, have: dict, outputs: list, *args: object, **kw: object) -> list:
        if m is not model:  # the folded model's runs: record the cut each starts from
            seen.append({k: v.copy() for k, v in have.items()})
        return real(m, have, outputs, *args, **kw)

    monkeypatch.setattr(repair_data, "run_subgraph", spy)
    folded, report = fold(
        model, 0.5, channel_groups=_mlp_groups(blocks), repair="data", calib=calib, refit="ridge"
    )
    assert report.notes and "consumer refit (ridge)" in " ".join(report.notes)
    cuts = [have for have in seen if any(k.endswith("_r") for k in have)]
    checked = 0
    for have in cuts:
        for name, value in have.items():
            if name.endswith("_r") and "h" not in name:
                (expected,) = _run(folded, calib, [name])
                np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked >= blocks - 1
    # and the refit still brings the output closer to the original's than the plain fold
    plain, _ = fold(model, 0.5, channel_groups=_mlp_groups(blocks))
    out = f"l{blocks - 1}_r"
    (ref,) = _run(model, calib, [out])
    errors = [np.mean((_run(m, calib, [out])[0] - ref) ** 2) for m in (plain, folded)]
    assert errors[1] < errors[0]


# ------------------------------------------------------------------------- subgraph runner
def test_subgraph_runner_fills_outputs_in_place_and_keeps_non_sample_outputs() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("ReduceSum", ["y", "axis0"], ["s"], keepdims=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 3]),
        ],
        [numpy_helper.from_array(np.array([0], np.int64), "axis0")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.linspace(-1, 1, 21, dtype=np.float32).reshape(7, 3)
    (y,) = SubgraphRunner(model, ["x"], ["y"], spinning=False).run({"x": x}, batch=3)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    y2, s = SubgraphRunner(model, ["x"], ["y", "s"]).run({"x": x}, batch=3)
    np.testing.assert_array_equal(y2, np.maximum(x, 0))
    # a sum over the batch is not per sample: one row per batch, concatenated as before
    relu = np.maximum(x, 0)
    np.testing.assert_allclose(s, [relu[0:3].sum(0), relu[3:6].sum(0), relu[6:].sum(0)], rtol=1e-6)
