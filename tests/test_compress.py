"""``foldonnx.compress`` / ``fold-onnx compress``: recipes of passes run in order, verified once,
one row per pass that adds up to the whole, the recipe recorded in the output's metadata and
reproducible from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import foldonnx
from foldonnx.cli import main
from foldonnx.errors import UsageError
from foldonnx.graph.metadata import RECIPE_KEY, read_metadata
from foldonnx.passes.recipe import load_recipe, recipe_of_model


def independent_param_count(model: onnx.ModelProto) -> int:
    """Scalars of the file's initializers and Constant tensors, each once (written apart from
    foldonnx.graph.stats on purpose)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    sizes[n.output[0]] = int(np.prod(a.t.dims))
    return sum(sizes.values())


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


RECIPE = [{"fold": {"groups": "mlp=0.25,heads=0.5", "round_to": 1}}, {"quantize": {"mode": "dynamic"}}]


def _rows_add_up(report) -> None:
    steps = report.steps
    assert steps[0].before == report.before
    for a, b in zip(steps, steps[1:], strict=False):
        assert a.after.params == b.before.params and a.after.macs == b.before.macs
    assert steps[-1].after.params == report.after.params and steps[-1].after.macs == report.after.macs
    removed = sum(s.before.params - s.after.params for s in steps)
    assert removed == report.before.params - report.after.params


def test_compress_api_two_steps(tiny_vit_onnx: Path) -> None:
    before = tiny_vit_onnx.read_bytes()
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    model, report = foldonnx.compress(tiny_vit_onnx, RECIPE, check={"image": x})
    assert tiny_vit_onnx.read_bytes() == before
    onnx.checker.check_model(model)
    assert report.verified and [s.name for s in report.steps] == ["fold", "quantize"]
    _rows_add_up(report)
    assert report.after.params == independent_param_count(model)
    assert report.before.params == independent_param_count(onnx.load(str(tiny_vit_onnx)))
    fold_step, quant_step = report.steps
    assert fold_step.after.params < fold_step.before.params
    assert {c.kind for c in fold_step.changes()} == {"mlp", "heads"}
    assert {c.what for c in quant_step.changes()} >= {"MatMul"}
    # fidelity after every pass, to the pipeline's input, on the check data
    assert set(fold_step.fidelity) >= {"cosine", "cls_cosine"} and report.fidelity == quant_step.fidelity
    # the recipe, every option spelled out, is in the output's metadata
    steps = load_recipe(read_metadata(model)[RECIPE_KEY])
    assert [s.name for s in steps] == ["fold", "quantize"]
    assert steps[0].options["groups"] == "mlp=0.25,heads=0.5" and steps[0].options["method"] == "fold"
    assert _run(model, x).shape == _run(tiny_vit_onnx, x).shape
    json.dumps(report.to_dict())


def test_compress_recipe_from_the_output_reproduces_it(tiny_vit_onnx: Path, tmp_path: Path) -> None:
    model, _ = foldonnx.compress(tiny_vit_onnx, RECIPE)
    again, _ = foldonnx.compress(tiny_vit_onnx, [s.to_dict() for s in recipe_of_model(model)])
    assert {t.name: t.raw_data for t in again.graph.initializer} == {
        t.name: t.raw_data for t in model.graph.initializer
    }
    # compressing a compressed model records both recipes, so the original reproduces it
    once, _ = foldonnx.compress(tiny_vit_onnx, [{"fold": {"ratio": 0.25, "groups": "mlp", "round_to": 1}}])
    twice, _ = foldonnx.compress(once, [{"prune-l1": {"ratio": 0.5, "groups": "heads"}}])
    assert [s.name for s in recipe_of_model(twice)] == ["fold", "prune-l1"]
    replay, _ = foldonnx.compress(tiny_vit_onnx, [s.to_dict() for s in recipe_of_model(twice)])
    assert {t.name: t.raw_data for t in replay.graph.initializer} == {
        t.name: t.raw_data for t in twice.graph.initializer
    }


def test_compress_cli_with_yaml_recipe_json_and_check(tiny_vit_onnx: Path, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "- fold: {groups: 'mlp,heads', target_params: 0.2, round_to: 1}\n- quantize: {mode: dynamic}\n"
    )
    out, js = tmp_path / "out.onnx", tmp_path / "rep.json"
    x = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "check.npz", image=x)
    rc = main(
        ["compress", str(tiny_vit_onnx), str(out), "--recipe", str(recipe), "--json", str(js),
         "--check", str(tmp_path / "check.npz")]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1. fold" in printed and "2. quantize" in printed and "output" in printed
    rep = json.loads(js.read_text())
    assert [s["name"] for s in rep["steps"]] == ["fold", "quantize"] and rep["verified"]
    assert rep["after"]["bytes"] == out.stat().st_size
    assert rep["steps"][0]["params_removed"] == pytest.approx(0.2, abs=0.02)
    written = onnx.load(str(out))
    assert rep["after"]["params"] == independent_param_count(written)
    # --recipe-from: the recipe recorded in the output, applied to the input again
    out2 = tmp_path / "out2.onnx"
    assert main(["compress", str(tiny_vit_onnx), str(out2), "--recipe-from", str(out)]) == 0
    np.testing.assert_allclose(_run(out2, x), _run(out, x), atol=1e-6)


def test_compress_inline_recipe_and_list(tiny_vit_onnx: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.onnx"
    rc = main(
        ["compress", str(tiny_vit_onnx), str(out), "--recipe", "[{prune-l1: {ratio: 0.25, round_to: 1}}]"]
    )
    assert rc == 0 and out.exists()
    assert main(["compress", "--list"]) == 0
    text = capsys.readouterr().out
    assert "prune-l1" in text and "quantize" in text and "target_params" in text


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("[{nope: {}}]", "unknown pass 'nope' (known:"),
        ("[{fold: {ratoi: 0.1}}]", "unknown option 'ratoi' (valid:"),
        ("[{fold: {ratio: 1.5}}]", "ratio must be in [0, 1)"),
        ("[{quantize: {mode: int4}}]", "not one of dynamic, static, fp16"),
        ("[]", "non-empty list of steps"),
        ("[{fold: [1, 2]}]", "options must be a mapping"),
        ("missing.yaml", "recipe file not found"),
        ("{fold: {ratio: 0.1}", "cannot parse the recipe"),
    ],
)
def test_bad_recipes_fail_before_any_work(
    tiny_vit_onnx: Path, tmp_path: Path, capsys, recipe, message
) -> None:
    out = tmp_path / "o.onnx"
    rc = main(["compress", str(tiny_vit_onnx), str(out), "--recipe", recipe])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_compress_refuses_output_over_input_and_json_over_input(
    tiny_vit_onnx: Path, tmp_path: Path, capsys
) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(tiny_vit_onnx.read_bytes())
    before = src.read_bytes()
    assert main(["compress", str(src), str(src), "--recipe", "[{fold: {ratio: 0.1}}]"]) == 1
    assert "is the input file" in capsys.readouterr().err
    out = tmp_path / "o.onnx"
    assert (
        main(["compress", str(src), str(out), "--recipe", "[{fold: {ratio: 0.1}}]", "--json", str(src)]) == 1
    )
    assert "is the input file" in capsys.readouterr().err
    assert (
        main(["compress", str(src), str(out), "--recipe", "[{fold: {ratio: 0.1}}]", "--json", str(out)]) == 1
    )
    assert "also the output of this run" in capsys.readouterr().err
    assert src.read_bytes() == before and not out.exists()


def test_compress_api_validates(tiny_vit_onnx: Path) -> None:
    with pytest.raises(UsageError, match="give a recipe"):
        foldonnx.compress(tiny_vit_onnx)
    with pytest.raises(UsageError, match="ModelProto or a path"):
        foldonnx.compress(42, RECIPE)  # type: ignore[arg-type]


@pytest.mark.slow
def test_compress_real_dinov2_three_steps(dinov2_backbone_onnx: Path) -> None:
    """The real DINOv2-S backbone (foreign graph): fold the MLPs with the data-free repair,
    prune heads, quantize; every row adds up and the file's parameters are counted exactly."""
    recipe = [
        {"fold": {"groups": "mlp", "target_params": 0.1, "repair": "ar", "synthetic_count": 16}},
        {"prune-l1": {"groups": "heads", "ratio": 0.17}},
        {"quantize": {"mode": "dynamic"}},
    ]
    model, report = foldonnx.compress(dinov2_backbone_onnx, recipe, check="imagenet20", check_limit=6)
    _rows_add_up(report)
    assert report.verified and report.after.params == independent_param_count(model)
    assert report.steps[0].params_removed == pytest.approx(0.1, abs=0.01)
    assert report.steps[1].after.params < report.steps[1].before.params
    assert report.fidelity["cls_cosine"] > 0.3  # a drop-in 20 %-smaller model, not the original
    assert [s.name for s in recipe_of_model(model)] == ["fold", "prune-l1", "quantize"]


@pytest.mark.slow
def test_compress_real_efficientnet_fold_and_static_int8(efficientnet_lite0_onnx: Path) -> None:
    recipe = [
        {"fold": {"groups": "conv", "target_params": 0.1}},
        {"quantize": {"mode": "static", "calib_limit": 8}},
    ]
    model, report = foldonnx.compress(
        efficientnet_lite0_onnx, recipe, calib="photos", check="imagenet20", check_limit=8
    )
    _rows_add_up(report)
    assert report.verified and report.after.params == independent_param_count(model)
    assert "top1_agreement" in report.fidelity  # a classifier, inferred from its metadata
