"""The ONNX file module: loading errors, atomic and safe writing, external data."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx import onnx_file
from foldonnx.errors import ModelFileError
from foldonnx.onnx_file import load_model, save_model


def _tiny_model(width: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, width)).astype(np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    node.metadata_props.add(key="origin", value="test")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="foldonnx.model", value="tiny")
    return model


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_round_trip_keeps_metadata(tmp_path):
    out = save_model(_tiny_model(), tmp_path / "m.onnx")
    loaded = load_model(out)
    assert not loaded.external_data
    assert loaded.model.graph.node[0].metadata_props[0].value == "test"
    assert {p.key: p.value for p in loaded.model.metadata_props}["foldonnx.model"] == "tiny"
    assert loaded.file_size == os.path.getsize(out)
    assert os.listdir(tmp_path) == ["m.onnx"]  # no temp leftovers


@pytest.mark.parametrize(
    "content, match",
    [(b"", "empty"), (b"\x08\x07garbage\xff\xfe" * 10, "cannot read|no graph")],
)
def test_load_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelFileError, match=match) as info:
        load_model(p)
    assert "\n" not in str(info.value)


def test_load_truncated(tmp_path):
    good = save_model(_tiny_model(), tmp_path / "m.onnx")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        load_model(trunc)


def test_load_missing_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelFileError, match="directory"):
        load_model(tmp_path)


def test_refuses_to_overwrite_input(tmp_path):
    src = save_model(_tiny_model(), tmp_path / "m.onnx")
    before = _digest(src)
    with pytest.raises(ModelFileError, match="input"):
        save_model(_tiny_model(16), src, source=src)
    assert _digest(src) == before


def test_invalid_model_leaves_nothing(tmp_path):
    model = _tiny_model()
    model.graph.node[0].input[1] = "missing_tensor"
    with pytest.raises(ModelFileError, match="invalid"):
        save_model(model, tmp_path / "bad.onnx")
    assert os.listdir(tmp_path) == []


def test_unwritable_and_missing_folder(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        save_model(_tiny_model(), tmp_path / "no" / "m.onnx")
    # even root cannot create files in /proc
    with pytest.raises(ModelFileError, match="cannot write|not writable"):
        save_model(_tiny_model(), "/proc/fold-onnx-test.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: permission bits are not enforced")
        with pytest.raises(ModelFileError, match="not writable"):
            save_model(_tiny_model(), ro / "m.onnx")
    finally:
        ro.chmod(0o700)


def test_external_data_over_threshold(tmp_path, monkeypatch):
    # the >2 GB rule, exercised with a lowered threshold so the test stays small
    monkeypatch.setattr(onnx_file, "_EXTERNAL_THRESHOLD", 64)
    model = _tiny_model(64)
    out = save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    loaded = load_model(out)
    assert loaded.external_data
    assert loaded.file_size == os.path.getsize(out) + os.path.getsize(tmp_path / "big.onnx.data")
    # the caller's in-memory model still carries its weights
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (4, 64)
    x = np.ones((1, 4), np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ numpy_helper.to_array(model.graph.initializer[0]), rtol=1e-6)


def test_external_data_with_only_small_tensors(tmp_path):
    # every tensor under the external-data size threshold: no .data file, still a valid model
    out = save_model(_tiny_model(4), tmp_path / "small.onnx", external_data=True)
    assert load_model(out).model.graph.initializer[0].dims == [4, 4]
    assert sorted(os.listdir(tmp_path)) == ["small.onnx"]
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)


def test_missing_external_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_file, "_EXTERNAL_THRESHOLD", 64)
    out = save_model(_tiny_model(64), tmp_path / "big.onnx")
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(ModelFileError, match="external data") as info:
        load_model(out)
    assert "\n" not in str(info.value)
