"""``fold-onnx eval`` and the Evaluator on tiny ONNX classifiers over npz / image-folder sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import foldonnx.cli
from foldonnx.data.sources import Preprocess, resolve_preprocess
from foldonnx.errors import DataError
from foldonnx.evaluate import (
    Evaluator,
    ModelInputs,
    ProbeData,
    load_probe_data,
    run_model,
)

C, FEAT = 10, 48  # classes; 3x4x4 inputs flattened


def main(argv: list[str]) -> int:
    """The real CLI entry point with only this module's subcommand registered, so the test does
    not depend on other subcommands being importable."""
    saved = list(foldonnx.cli.COMMANDS)
    foldonnx.cli.COMMANDS[:] = ["eval"]
    try:
        return foldonnx.cli.main(argv)
    finally:
        foldonnx.cli.COMMANDS[:] = saved


def tiny_classifier(
    w: np.ndarray, b: np.ndarray, *, batch: int | str = "N", task: str | None = None, hw: int = 4
) -> onnx.ModelProto:
    """x [batch,3,hw,hw] -> Flatten -> Gemm(transB) -> logits [batch, C']."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["feat"], axis=1),
            helper.make_node("Gemm", ["feat", "W", "B"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [batch, w.shape[0]])],
        [
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(b.astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if task:
        helper.set_model_props(model, {"foldonnx.task": task})
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval_models")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(C, FEAT))
    b = rng.normal(size=C) * 0.1
    perm = (np.arange(C) + 1) % C  # cyclic permutation of the last layer's rows
    noisy = w + rng.normal(size=w.shape) * 0.05
    paths = {
        "ref": tiny_classifier(w, b, task="classifier"),
        "same": tiny_classifier(w, b),
        "perm": tiny_classifier(w[perm], b[perm]),
        "noisy": tiny_classifier(noisy, b),
        "wide": tiny_classifier(np.vstack([w, w[:2]]), np.concatenate([b, b[:2]])),
        "batch1": tiny_classifier(w, b, batch=1),
    }
    out = {}
    for name, m in paths.items():
        onnx.save(m, str(d / f"{name}.onnx"))
        out[name] = d / f"{name}.onnx"
    x = rng.normal(size=(64, 3, 4, 4)).astype(np.float32)
    logits = x.reshape(64, -1) @ w.T + b
    np.savez(d / "data.npz", x=x, labels=np.argmax(logits, axis=1))
    np.savez(d / "data_nolabels.npz", x)
    out["npz"] = d / "data.npz"
    out["npz_nolabels"] = d / "data_nolabels.npz"
    return out


def test_eval_cli_writes_json_with_known_values(models: dict[str, Path], tmp_path: Path) -> None:
    js = tmp_path / "eval.json"
    rc = main(
        ["eval", str(models["ref"]), str(models["same"]), str(models["perm"]), str(models["noisy"]),
         "--data", str(models["npz"]), "--json", str(js), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    rep = json.loads(js.read_text())
    assert rep["task"] == "classifier"  # from the reference's foldonnx.task metadata
    assert rep["output"] == "logits" and rep["output_shape"] == [64, C] and rep["n_samples"] == 64
    assert rep["reference_accuracy"] == 1.0  # labels are the reference's own arg-max
    same, perm, noisy = rep["candidates"]
    assert same["name"] == "same.onnx" and same["path"].endswith("same.onnx")
    assert same["metrics"]["top1_agreement"] == 1.0
    assert same["metrics"]["cosine"] == pytest.approx(1.0)
    assert same["metrics"]["kl_div"] == pytest.approx(0.0, abs=1e-9)
    assert same["accuracy"] == 1.0
    assert perm["metrics"]["top1_agreement"] == 0.0
    assert perm["accuracy"] == 0.0
    assert perm["metrics"]["kl_div"] > 0.5
    assert noisy["metrics"]["top1_agreement"] >= 0.5 and noisy["metrics"]["kl_div"] > 1e-6
    assert 0.9 < noisy["metrics"]["cosine"] < 1.0


def test_task_flag_and_internal_output(models: dict[str, Path], tmp_path: Path) -> None:
    js = tmp_path / "e.json"
    rc = main(
        ["eval", str(models["same"]), str(models["perm"]), "--data", str(models["npz_nolabels"]),
         "--output", "feat", "--json", str(js), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    rep = json.loads(js.read_text())
    assert rep["task"] == "embedding" and rep["output_shape"] == [64, FEAT]
    # Flatten output is identical in both models (only the last layer differs)
    assert rep["candidates"][0]["metrics"] == {"cosine": pytest.approx(1.0)}
    assert rep["reference_accuracy"] is None
    # without metadata an [N, 10] output is an embedding unless --task says classifier
    rc = main(["eval", str(models["same"]), str(models["perm"]), "--data", str(models["npz"]),
               "--task", "classifier", "--json", str(js), "--no-progress"])  # fmt: skip
    assert rc == 0 and json.loads(js.read_text())["candidates"][0]["metrics"]["top1_agreement"] == 0.0


def test_fixed_batch_model_matches_dynamic(models: dict[str, Path]) -> None:
    x = np.random.default_rng(5).normal(size=(7, 3, 4, 4)).astype(np.float32)
    inputs = ModelInputs(arrays={"x": x}, labels=None, name="x")
    a = run_model(models["ref"], inputs, batch_size=3, progress=False)["logits"]
    b = run_model(models["batch1"], inputs, progress=False)["logits"]
    assert a.shape == b.shape == (7, C)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_probe_transfer_and_refit_on_models(models: dict[str, Path]) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 3, 4, 4)).astype(np.float32)
    ref_logits = run_model(models["ref"], ModelInputs({"x": x}, None, "p"), progress=False)["logits"]
    y = np.argmax(ref_logits[:, :3], axis=1)  # a planted 3-class linear rule on the features
    probe_in = ModelInputs({"x": x}, y, "probe")
    probe = ProbeData(train=probe_in.subset(slice(0, 200)), test=probe_in.subset(slice(200, 300)), source="p")
    ev = Evaluator(models["ref"], probe_in.subset(slice(0, 20)), probe=probe, progress=False)
    assert ev.reference_probe_acc is not None and ev.reference_probe_acc >= 0.9
    same = ev.evaluate(models["same"])
    perm = ev.evaluate(models["perm"])
    assert same.probe is not None and same.probe.transfer == ev.reference_probe_acc
    assert perm.probe is not None and perm.probe.refit >= 0.9  # information kept, order changed
    assert perm.probe.transfer < 0.7  # the reference's probe no longer reads it


def test_missing_data_source_is_one_line_error(
    models: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    rc = main(["eval", str(models["ref"]), str(models["same"]), "--data", "/nonexistent/data.npz"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error: unknown data source") and "\n" not in err


def test_output_shape_mismatch_is_one_line_error(
    models: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    rc = main(
        ["eval", str(models["ref"]), str(models["wide"]), "--data", str(models["npz"]), "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error: candidate wide.onnx output 'logits' has shape") and "\n" not in err


def test_missing_candidate_and_bad_input_shape(models: dict[str, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    rc = main(["eval", str(models["ref"]), str(tmp_path / "nope.onnx"), "--data", str(models["npz"])])
    assert rc == 1 and "model file not found" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", np.zeros((4, 3, 5, 5), np.float32))
    rc = main(["eval", str(models["ref"]), str(models["same"]), "--data", str(tmp_path / "bad.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "needs size 4 on axis 2, the data has shape [4, 3, 5, 5]" in err and "\n" not in err


def test_image_folder_source_with_labels(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    w = rng.normal(size=(C, 3 * 8 * 8))
    m = tiny_classifier(w, np.zeros(C), hw=8, task="classifier")
    onnx.save(m, str(tmp_path / "m.onnx"))
    js = tmp_path / "e.json"
    rc = main(["eval", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(tmp_path / "imgs"),
               "--json", str(js), "--no-progress"])  # fmt: skip
    assert rc == 0
    rep = json.loads(js.read_text())
    assert rep["n_samples"] == 6 and rep["candidates"][0]["metrics"]["top1_agreement"] == 1.0
    assert rep["reference_accuracy"] is not None  # labels from class sub-folders


def test_resolve_preprocess_metadata_and_flags() -> None:
    m = tiny_classifier(np.zeros((C, 3 * 8 * 8)), np.zeros(C), hw=8)
    assert resolve_preprocess(m).size == 8  # from the input shape
    onnx.helper.set_model_props(m, {"foldonnx.image_size": "8", "foldonnx.mean": "[0.5, 0.5, 0.5]",
                                    "foldonnx.std": "[0.5, 0.5, 0.5]"})  # fmt: skip
    p = resolve_preprocess(m)
    assert (p.size, p.mean, p.std) == (8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    p2 = resolve_preprocess(m, image_size=16, mean=[0.1], std=[0.2, 0.3, 0.4])
    assert p2 == Preprocess(size=16, mean=(0.1, 0.1, 0.1), std=(0.2, 0.3, 0.4))


def test_probe_on_unlabelled_source_is_error(models: dict[str, Path]) -> None:
    m = onnx.load(str(models["ref"]))
    with pytest.raises(DataError, match="no labels"):
        load_probe_data(str(models["npz_nolabels"]), Preprocess(size=4), m, train=10, test=10)


def test_reference_cache_is_used_and_keyed_on_inputs(models: dict[str, Path], tmp_path: Path) -> None:
    x = np.random.default_rng(9).normal(size=(12, 3, 4, 4)).astype(np.float32)
    inputs = ModelInputs({"x": x}, None, "c")
    cache = tmp_path / "ref.npz"
    first = Evaluator(models["ref"], inputs, cache=cache, progress=False)
    assert cache.is_file()
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["reference_out"] = arrays["reference_out"] * 2.0  # tamper: a cache hit must show it
    np.savez(cache, **arrays)
    hit = Evaluator(models["ref"], inputs, cache=cache, progress=False)
    np.testing.assert_allclose(hit.reference_out, 2.0 * first.reference_out)
    other = ModelInputs({"x": x[:6]}, None, "c")  # different inputs: recomputed, cache rewritten
    miss = Evaluator(models["ref"], other, cache=cache, progress=False)
    np.testing.assert_allclose(miss.reference_out, first.reference_out[:6], rtol=1e-6)


def _saliency(w: np.ndarray) -> onnx.ModelProto:
    """x [N,3,4,4] -> 1x1 Conv -> Sigmoid: a dense [N,1,4,4] probability map."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Sigmoid", ["c"], ["mask"])],
        "sal",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
        [numpy_helper.from_array(w.astype(np.float32).reshape(1, 3, 1, 1), "W")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_dense_output_cosine_and_iou(models: dict[str, Path], tmp_path: Path) -> None:
    w = np.array([1.0, -2.0, 0.5])
    for name, weights in (("ref", w), ("same", w), ("flip", -w)):
        onnx.save(_saliency(weights), str(tmp_path / f"{name}.onnx"))
    js = tmp_path / "d.json"
    rc = main(["eval", str(tmp_path / "ref.onnx"), str(tmp_path / "same.onnx"), str(tmp_path / "flip.onnx"),
               "--data", str(models["npz"]), "--json", str(js), "--no-progress"])  # fmt: skip
    assert rc == 0
    rep = json.loads(js.read_text())
    assert rep["task"] == "dense" and rep["output_shape"] == [64, 1, 4, 4]
    same, flip = rep["candidates"]
    assert same["metrics"] == {"cosine": pytest.approx(1.0), "mask_iou": 1.0}
    # sigmoid(-z) = 1 - sigmoid(z): every pixel above 0.5 falls below it, the masks are disjoint
    assert flip["metrics"]["mask_iou"] == 0.0 and flip["metrics"]["cosine"] < 1.0
