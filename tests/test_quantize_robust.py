"""``fold-onnx quantize`` on models ONNX Runtime cannot work on, and the files ORT's tools leave.

Every refusal is one line and a non-zero exit, no output is written, and the working folder is
left as it was — also when quantizing succeeds on a graph where ORT's symbolic shape inference
stops early (it then saves ``sym_shape_infer_temp.onnx`` into the working folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx.cli import main
from foldonnx.errors import PassError
from foldonnx.passes.base import PassContext
from foldonnx.passes.quantize import QuantizePass, runtime_refusal

MODES = ("dynamic", "static", "fp16")


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    dtype: int = TensorProto.FLOAT,
    opsets: tuple[tuple[str, int], ...] = (("", 17),),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, [1, 8])],
        [helper.make_tensor_value_info("y", dtype, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def _weight(dtype: int = TensorProto.FLOAT) -> onnx.TensorProto:
    values = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    if dtype == TensorProto.BFLOAT16:
        return helper.make_tensor("w", TensorProto.BFLOAT16, [8, 8], values.reshape(-1).tolist())
    return numpy_helper.from_array(values, "w")


def custom_domain_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Frobnicate", ["h"], ["y"], domain="com.example"),
    ]
    return _model(nodes, [_weight()], opsets=(("", 17), ("com.example", 1)))


def bf16_model() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [_weight(TensorProto.BFLOAT16)], dtype=TensorProto.BFLOAT16)


def future_opset_model() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [_weight()], opsets=(("", onnx.defs.onnx_opset_version() + 1),))


def bad_type_model() -> onnx.ModelProto:
    """Loads in onnx, not in ORT (no Relu kernel for uint16)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT16, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.UINT16, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


REFUSED = {
    "custom_domain": (custom_domain_model, "op com.example.Frobnicate of a custom domain"),
    "bf16": (bf16_model, "bfloat16 tensors (x, y, w)"),
    "future_opset": (future_opset_model, f"opset {onnx.defs.onnx_opset_version() + 1} is newer"),
    "bad_type": (bad_type_model, "ONNX Runtime cannot load it: "),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_runtime_refusal_names_the_reason(case: str) -> None:
    make, reason = REFUSED[case]
    why = runtime_refusal(make())
    assert why is not None and reason in why and "\n" not in why
    assert "[ONNXRuntimeError]" not in why and "onnxruntime_src" not in why
    with pytest.raises(PassError, match="cannot quantize"):
        QuantizePass(mode="dynamic").run(make(), PassContext())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_cli_refuses_in_one_line_and_leaves_no_files(
    case: str, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    make, reason = REFUSED[case]
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(make(), src)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc = main(["quantize", str(src), str(out), "--mode", mode, "--no-check"])
    cap = capsys.readouterr()
    lines = [x for x in (cap.out + cap.err).splitlines() if x.strip()]
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("error: cannot quantize") and reason in lines[0], lines
    assert not out.exists()
    assert list(work.iterdir()) == []


def incomplete_shapes_model() -> onnx.ModelProto:
    """x[N,4,H,W] -> Conv/2 -> Resize x2 -> Add x: ORT's symbolic shape inference cannot prove
    ceil(H/2)*2 == H and stops (quant_pre_process then leaves sym_shape_infer_temp.onnx)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "s"], ["r"], mode="nearest"),
        helper.make_node("Add", ["x", "r"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("mode", MODES)
def test_ort_tool_leftovers_stay_out_of_the_working_folder(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    src, out, calib = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    onnx.save(incomplete_shapes_model(), src)
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["quantize", str(src), str(out), "--mode", mode, "--no-check", "--op-types", "Conv"]
    if mode == "static":
        args += ["--calib", str(calib)]
    if mode == "fp16":
        args = args[:-2]
    rc = main(args)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.exists()
    if mode != "fp16":
        assert "quant_pre_process skipped: Incomplete symbolic shape inference" in " ".join(text.split())
    assert list(work.iterdir()) == []
