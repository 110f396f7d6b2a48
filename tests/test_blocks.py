"""Transformer-block approximation: block discovery, the numerics, the rewrite, the pass, the CLI.

Tiny pre-LN and post-LN transformers are built with onnx.helper (single-head attention with
Softmax, an MLP, LayerNorm). A block whose branch outputs are zeroed is an exact identity:
replacing it must reproduce the model to float precision, and the automatic choice must find it.
Random-init graphs test graph handling only; the real DINOv2-S tier is tests/test_blocks_real.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx.analysis.blocks import BlockStack, find_blocks, format_spans, parse_block_spec
from foldonnx.cli import main
from foldonnx.errors import PassError, UsageError
from foldonnx.numerics.lsq import LsqStats
from foldonnx.passes.blocks import (
    BlocksConfig,
    BlocksPass,
    BoundaryStats,
    MapKind,
    RowPicker,
    _block_sets,
    approx_blocks,
    fit_map,
    linear_cka,
    output_fidelity,
    parse_map,
    relative_error,
)

D, T, F = 16, 9, 32


def _tiny(
    n_blocks: int = 3, *, zero: tuple[int, ...] = (), post_ln: bool = False, seed: int = 0
) -> onnx.ModelProto:
    """x [B, T, D] -> n blocks (LN, attention, residual, LN, MLP, residual) -> LN -> y. Blocks in
    *zero* have zero out-projection and fc2 (weights and biases): they are the identity."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def w(name: str, shape: tuple[int, ...], scale: float = 0.3, zeros: bool = False) -> str:
        a = np.zeros(shape, np.float32) if zeros else (rng.standard_normal(shape) * scale).astype(np.float32)
        inits.append(numpy_helper.from_array(a, name))
        return name

    def ln(x: str, name: str) -> str:
        nodes.append(helper.make_node(
            "LayerNormalization", [x, w(f"{name}.g", (D,), 0.1) , w(f"{name}.b", (D,), 0.1)], [f"{name}_out"],
            name=name, axis=-1,
        ))  # fmt: skip
        return f"{name}_out"

    def lin(x: str, name: str, din: int, dout: int, zeros: bool = False) -> str:
        nodes.append(helper.make_node("MatMul", [x, w(f"{name}.w", (din, dout), zeros=zeros)], [f"{name}_mm"],
                                      name=f"{name}/MatMul"))  # fmt: skip
        nodes.append(helper.make_node("Add", [f"{name}_mm", w(f"{name}.bias", (dout,), 0.1, zeros=zeros)],
                                      [f"{name}_out"], name=f"{name}/Add"))  # fmt: skip
        return f"{name}_out"

    inits.append(numpy_helper.from_array(np.array(1.0 / np.sqrt(D), np.float32), "scale"))
    x = "x"
    for k in range(n_blocks):
        p = f"blocks.{k}"
        z = k in zero
        h = x if post_ln else ln(x, f"{p}.norm1")
        q, kk, v = (lin(h, f"{p}.attn.{t}", D, D) for t in "qkv")
        nodes.append(helper.make_node("Transpose", [kk], [f"{p}.kT"], perm=[0, 2, 1], name=f"{p}/attn/T"))
        nodes.append(helper.make_node("MatMul", [q, f"{p}.kT"], [f"{p}.s"], name=f"{p}/attn/QK"))
        nodes.append(helper.make_node("Mul", [f"{p}.s", "scale"], [f"{p}.ss"], name=f"{p}/attn/scale"))
        nodes.append(helper.make_node("Softmax", [f"{p}.ss"], [f"{p}.a"], axis=-1, name=f"{p}/attn/softmax"))
        nodes.append(helper.make_node("MatMul", [f"{p}.a", v], [f"{p}.ctx"], name=f"{p}/attn/AV"))
        o = lin(f"{p}.ctx", f"{p}.attn.proj", D, D, zeros=z)
        nodes.append(helper.make_node("Add", [x, o], [f"{p}.res1"], name=f"{p}/add1"))
        x = f"{p}.res1"
        if post_ln:
            x = ln(x, f"{p}.norm1")
        h = x if post_ln else ln(x, f"{p}.norm2")
        h = lin(h, f"{p}.mlp.fc1", D, F)
        nodes.append(helper.make_node("Tanh", [h], [f"{p}.act"], name=f"{p}/mlp/act"))
        o = lin(f"{p}.act", f"{p}.mlp.fc2", F, D, zeros=z)
        nodes.append(helper.make_node("Add", [o, x], [f"{p}.res2"], name=f"{p}/add2"))  # branch first
        x = f"{p}.res2"
        if post_ln:
            x = ln(x, f"{p}.norm2")
    if post_ln:
        nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    else:
        nodes.append(helper.make_node("Identity", [ln(x, "norm")], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", T, D])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _feeds(n: int = 48, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, T, D)).astype(np.float32)}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


# ------------------------------------------------------------------------------ discovery
def test_pre_ln_blocks_found_from_the_stream() -> None:
    model = _tiny(3)
    st = find_blocks(model)
    assert len(st) == 3 and st.norm == "pre-LN" and st.layout == "tokens" and st.width == D
    assert st.boundaries == ("x", "blocks.0.res2", "blocks.1.res2", "blocks.2.res2")
    assert all(b.sublayers == ("attention", "mlp") for b in st.blocks)
    assert [b.name for b in st.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    # every block holds 4 D x D + D x F + F x D weights, their biases and 2 LayerNorms
    per = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 4 * D
    assert [b.params for b in st.blocks] == [per] * 3
    assert st.removed_params([0, 2]) == 2 * per
    assert st.total_params == per * 3 + 2 * D + 1  # final LN + the attention scale


def test_post_ln_blocks_end_after_their_norm() -> None:
    st = find_blocks(_tiny(3, post_ln=True))
    assert len(st) == 3 and st.norm == "post-LN"
    assert st.boundaries == ("x", "blocks.0.norm2_out", "blocks.1.norm2_out", "blocks.2.norm2_out")


def test_no_blocks_without_attention() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["x", "h"], ["y"])],
        "mlp", [x], [y], [w],
    )  # fmt: skip
    st = find_blocks(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    assert not st.blocks and "attention" in (st.reason or "")
    with pytest.raises(PassError, match="no transformer blocks"):
        BlocksPass(blocks="0").requires(
            helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), None
        )


def test_shared_constants_leave_only_with_every_block_reading_them() -> None:
    model = _tiny(3)
    # one bias tensor shared by blocks 0 and 2 (as exporters dedupe identical tensors)
    for n in model.graph.node:
        if n.name == "blocks.2.mlp.fc1/Add":
            n.input[1] = "blocks.0.mlp.fc1.bias"
    model.graph.initializer.remove(
        next(t for t in model.graph.initializer if t.name == "blocks.2.mlp.fc1.bias")
    )
    st = find_blocks(model)
    per = st.blocks[1].params
    assert st.blocks[0].params == per - F and st.blocks[2].params == per - F
    assert st.removed_params([0]) == per - F
    assert st.removed_params([0, 2]) == 2 * per - F


def test_block_spec_parsing() -> None:
    assert parse_block_spec("9-11") == [(9, 11)]
    assert parse_block_spec("11, 8-9") == [(8, 9), (11, 11)]
    assert format_spans([(8, 9), (11, 11)]) == "8-9,11"
    for bad in ("", "a", "3-1", "1-2-3"):
        with pytest.raises(UsageError):
            parse_block_spec(bad)
    st = find_blocks(_tiny(3))
    with pytest.raises(UsageError, match="out of range"):
        st.check_spans([(2, 3)])
    with pytest.raises(UsageError, match="overlap"):
        st.check_spans([(0, 1), (1, 1)])


# ------------------------------------------------------------------------------ numerics
def _stats(x: np.ndarray, y: np.ndarray) -> LsqStats:
    s = LsqStats()
    s.add(x, y)
    return s


def test_fit_map_recovers_an_affine_map_and_the_identity() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8))
    a = rng.standard_normal((8, 8))
    b = rng.standard_normal(8)
    fit = fit_map(_stats(x[:1500], x[:1500] @ a + b), _stats(x[1500:], x[1500:] @ a + b))
    np.testing.assert_allclose(fit.weight, a, atol=1e-3)
    np.testing.assert_allclose(fit.bias, b, atol=1e-3)
    assert fit.held_error < 1e-6
    ident = fit_map(_stats(x[:1500], x[:1500]), _stats(x[1500:], x[1500:]))
    assert ident.label == "none"  # the identity itself wins: exact
    np.testing.assert_array_equal(ident.weight, np.eye(8))
    np.testing.assert_array_equal(ident.bias, np.zeros(8))


def test_fit_map_low_rank_kinds() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 12))
    low = rng.standard_normal((12, 2)) @ rng.standard_normal((2, 12))
    y = x @ (np.eye(12) + low) + 0.5
    fit = fit_map(_stats(x[:2000], y[:2000]), _stats(x[2000:], y[2000:]), kind=MapKind("id+lowrank", 2))
    a, b = fit.factors
    assert a.shape == (12, 2) and b.shape == (2, 12)
    np.testing.assert_allclose(np.eye(12) + a @ b, np.eye(12) + low, atol=1e-3)
    assert fit.held_error < 1e-6
    plain = fit_map(_stats(x[:2000], y[:2000]), _stats(x[2000:], y[2000:]), kind=MapKind("lowrank", 2))
    assert plain.held_error > 0.01  # the identity part of the map is not rank 2
    assert MapKind("lowrank", 2).params(12) == 2 * 12 * 2 + 12 and MapKind().params(12) == 12 * 12 + 12
    assert parse_map("id+lowrank:4") == MapKind("id+lowrank", 4)
    for bad in ("lowrank", "lowrank:0", "svd:3"):
        with pytest.raises(UsageError):
            parse_map(bad)


def test_cka_and_relative_error() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6))
    g = _stats(x, x).gram
    assert linear_cka(g, g, _stats(x, x).cross) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))  # CKA is invariant to rotations and scale
    y = 3 * x @ q
    assert linear_cka(g, _stats(y, y).gram, _stats(x, y).cross) == pytest.approx(1.0)
    z = rng.standard_normal((500, 6))
    assert linear_cka(g, _stats(z, z).gram, _stats(x, z).cross) < 0.1
    s = _stats(x, z)
    assert relative_error(s, np.zeros((6, 6)), z.mean(0)) == pytest.approx(1.0, abs=1e-9)


def test_row_picker_and_boundary_stats() -> None:
    picker = RowPicker("tokens", tokens=3, cls_weight=None)
    idx, w = picker.pick((4, 10, 5), 0)
    assert idx.shape == (4, 4) and (idx[:, 0] == 0).all() and (idx[:, 1:] > 0).all()
    np.testing.assert_array_equal(w, [3, 1, 1, 1])
    assert RowPicker("tokens", None, 1.0).pick((2, 10, 5), 0) == (None, None)
    gidx, gw = RowPicker("grid", 5, None).pick((2, 4, 4, 3), 0)
    assert gidx.shape == (2, 5) and gw is None
    rng = np.random.default_rng(3)
    xs = {i: rng.standard_normal((30, 4)) for i in range(3)}
    st = BoundaryStats(3, [(0, 2)])
    st.add("fit", xs)
    direct = _stats(xs[0], xs[2])
    np.testing.assert_allclose(st.lsq(0, 2).gram, direct.gram)
    np.testing.assert_allclose(st.lsq(0, 2).cross, direct.cross)
    assert st.lsq(0, 2).yy == pytest.approx(direct.yy)
    cos = st.cosine_matrix()
    ref = np.mean(np.sum(xs[0] * xs[1], 1) / np.linalg.norm(xs[0], axis=1) / np.linalg.norm(xs[1], axis=1))
    assert cos[0, 1] == pytest.approx(ref) and cos[1, 1] == 1.0
    assert output_fidelity([xs[0][None]], [xs[0][None]]) == pytest.approx(1.0)


def test_block_sets_match_the_budget() -> None:
    st = find_blocks(_tiny(4))
    per = st.blocks[0].params
    spans = [(a, b) for a in range(4) for b in range(a, 4) if b - a < 3]
    one = _block_sets(st, spans, (per - 100) / st.total_params, 100)
    assert one and all(sum(b - a + 1 for a, b in s) == 1 for s in one)
    two = _block_sets(st, spans, (2 * per - 10) / st.total_params, 10)
    assert ((0, 1),) in two and ((1, 1), (3, 3)) in two  # one span of two, or two spans of one
    assert all(sum(b - a + 1 for a, b in s) == 2 for s in two)


# ------------------------------------------------------------------------------ the pass
def test_identity_block_is_replaced_exactly_and_the_input_is_unchanged() -> None:
    model = _tiny(3, zero=(1,))
    before = model.SerializeToString()
    out, rep = approx_blocks(model, blocks="1", calib=_feeds())
    assert model.SerializeToString() == before
    x = _feeds(8, seed=7)["x"]
    np.testing.assert_allclose(_run(out, x), _run(model, x), atol=1e-5)
    assert [s.fit for s in rep.spans] == ["none"]
    new = [n for n in out.graph.node if n.name.startswith("tba/")]
    assert sorted(n.op_type for n in new) == ["Add", "MatMul"]
    names = {n.name for n in out.graph.node}
    old = {n.name for n in model.graph.node}
    assert not any(n.startswith("blocks.1") for n in names)
    assert {n for n in old if not n.startswith("blocks.1")} <= names  # every other node kept
    assert "blocks.1.res2" in {o for n in out.graph.node for o in n.output}  # boundary keeps its name
    assert rep.before.params - rep.after.params == find_blocks(model).blocks[1].params - (D * D + D)


def test_target_zero_is_the_identity() -> None:
    model = _tiny(3)
    out, rep = approx_blocks(model, target_params=0.0, calib=_feeds())
    assert out.graph == model.graph and rep.spans == [] and rep.params_removed == 0


@pytest.mark.parametrize("select", ["e2e", "fit", "cosine"])
def test_target_finds_the_planted_identity_block(select: str) -> None:
    model = _tiny(4, zero=(2,))
    st = find_blocks(model)
    target = (st.blocks[0].params - D * D - D) / st.total_params
    out, rep = approx_blocks(model, target_params=target, calib=_feeds(64), select=select, e2e_images=8)
    assert [(s.first, s.last) for s in rep.spans] == [(2, 2)]
    assert rep.choices[select] == "2"
    x = _feeds(8, seed=5)["x"]
    np.testing.assert_allclose(_run(out, x), _run(model, x), atol=1e-5)
    assert abs(rep.params_removed - target) < 0.01
    assert {c.text for c in rep.candidates} >= {"0", "1", "2", "3", "0-1"}
    if select == "e2e":
        assert rep.e2e_scores["2"] == pytest.approx(1.0, abs=1e-5) and "damage" in rep.choices


def test_several_spans_adjacent_and_sequential() -> None:
    model = _tiny(4, post_ln=True)
    for seq in (False, True):
        out, rep = approx_blocks(model, blocks="0,1,3", calib=_feeds(), sequential=seq)
        assert [(s.first, s.last) for s in rep.spans] == [(0, 0), (1, 1), (3, 3)]
        assert [s.fitted_on for s in rep.spans] == (
            ["original", "patched", "patched"] if seq else ["original"] * 3
        )
        assert len([n for n in out.graph.node if n.op_type == "MatMul" and n.name.startswith("tba/")]) == 3
        assert [o.name for o in out.graph.output] == ["y"]
        assert _run(out, _feeds(2)["x"]).shape == (2, T, D)
        assert rep.params_removed > 0.5


def test_low_rank_map_rewrite() -> None:
    model = _tiny(3, zero=(1,))
    out, rep = approx_blocks(model, blocks="1", calib=_feeds(), map="id+lowrank:2")
    x = _feeds(4, seed=9)["x"]
    np.testing.assert_allclose(_run(out, x), _run(model, x), atol=1e-5)  # the identity has I + 0
    ops = sorted(n.op_type for n in out.graph.node if n.name.startswith("tba/"))
    assert ops == ["Add", "Add", "MatMul", "MatMul"] and rep.spans[0].map_params == 2 * D * 2 + D


def test_config_errors() -> None:
    with pytest.raises(UsageError, match="--blocks 9-11"):
        BlocksConfig()
    with pytest.raises(UsageError, match="not both"):
        BlocksConfig(blocks="1", target_params=0.1)
    with pytest.raises(UsageError):
        BlocksConfig(blocks="1", map="svd")
    with pytest.raises(UsageError):
        BlocksConfig(target_params=1.5)
    with pytest.raises(UsageError, match="out of range"):
        approx_blocks(_tiny(3), blocks="3", calib=_feeds())
    with pytest.raises(PassError, match="every block"):
        approx_blocks(_tiny(3), blocks="0-2", calib=_feeds())


def test_registry_recipe_and_sweep_axis(tmp_path) -> None:
    from foldonnx.evaluate.sweep import _check_plan
    from foldonnx.passes.compress import compress
    from foldonnx.passes.registry import get_pass, list_passes

    assert "blocks" in list_passes() and get_pass("blocks").budget == {"params": "target_params"}
    _check_plan([0.1], ["blocks", "fold"], None, "params")
    model = _tiny(3, zero=(1,))
    out, rep = compress(model, [{"blocks": {"blocks": "1"}}], calib=_feeds())
    assert rep.steps[0].name == "blocks" and rep.verified
    x = _feeds(4)["x"]
    np.testing.assert_allclose(_run(out, x), _run(model, x), atol=1e-5)
    from foldonnx.passes.registry import report_from_dict

    back = report_from_dict(json.loads(json.dumps(rep.steps[0].to_dict(), default=str)))
    assert back.spans[0].first == 1 and back.changes()[0].what == "blocks 1"


# ------------------------------------------------------------------------------ CLI
def test_cli_approx_blocks(tmp_path, capsys) -> None:
    src = tmp_path / "tiny.onnx"
    onnx.save(_tiny(4, zero=(2,)), src)
    np.savez(tmp_path / "calib.npz", x=_feeds(48)["x"])
    st = find_blocks(onnx.load(src))
    target = (st.blocks[0].params - D * D - D) / st.total_params
    code = main([
        "approx-blocks", str(src), str(tmp_path / "out.onnx"), "--target-params", f"{target:.4f}",
        "--calib", str(tmp_path / "calib.npz"), "--json", str(tmp_path / "rep.json"),
        "--plot", str(tmp_path / "sim.png"), "--e2e-images", "8",
    ])  # fmt: skip
    assert code == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [(s["first"], s["last"]) for s in rep["spans"]] == [(2, 2)]
    assert set(rep["choices"]) >= {"e2e", "fit", "cosine", "cka"} and len(rep["similarity"]) == 5
    assert (tmp_path / "sim.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "candidate spans" in text and "replaced" in text
    assert main(["approx-blocks", str(src), str(tmp_path / "o2.onnx"), "--blocks", "1"]) == 2  # no --calib
    assert main(["approx-blocks", str(src), str(src), "--blocks", "1", "--calib", "x.npz"]) != 0
    assert main(["approx-blocks", str(src), str(tmp_path / "o3.onnx"), "--blocks", "7", "--calib",
                 str(tmp_path / "calib.npz")]) == 2  # fmt: skip


def test_inspect_lists_blocks(tmp_path, capsys) -> None:
    src = tmp_path / "tiny.onnx"
    onnx.save(_tiny(3), src)
    assert main(["inspect", str(src), "--json", str(tmp_path / "i.json")]) == 0
    data = json.loads((tmp_path / "i.json").read_text())
    assert "groups" in data and data["blocks"]["norm"] == "pre-LN"
    assert len(data["blocks"]["blocks"]) == 3 and data["blocks"]["boundaries"][0] == "x"
    assert "transformer blocks" in capsys.readouterr().out


def test_block_stack_is_frozen_printable_data() -> None:
    st = find_blocks(_tiny(2))
    assert isinstance(st, BlockStack) and "2 pre-LN blocks" in str(st)
    with pytest.raises(AttributeError):
        st.norm = "x"  # type: ignore[misc]
    assert json.loads(json.dumps(st.to_dict()))["width"] == D


def test_few_calibration_images_fit_without_a_held_out_part() -> None:
    model = _tiny(3, zero=(1,))
    out, rep = approx_blocks(model, blocks="1", calib=_feeds(2))
    assert rep.held_images == 0 and rep.calib_images == 2
    x = _feeds(3, seed=4)["x"]
    np.testing.assert_allclose(_run(out, x), _run(model, x), atol=1e-5)
