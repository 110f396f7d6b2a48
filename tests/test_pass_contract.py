"""The contract every registered pass keeps, parametrized over the registry (timm-style):

* a zero budget (ratio / target 0) is the identity (outputs equal to 1e-6);
* with a budget, the output passes verification (onnx.checker, ORT runs it, same output names
  and shapes) and the report is JSON-serialisable and reads back as its own type;
* the input model is never modified (its bytes are unchanged);
* every config field round-trips through the recipe parser and through the generated CLI flags.

Runs on a 3-block random-init ViT (graph handling only). Passes that need calibration data get
16 synthetic images.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from foldonnx.errors import PassError, UsageError
from foldonnx.passes.base import PassContext, Pipeline
from foldonnx.passes.config import add_config_arguments, config_from_args
from foldonnx.passes.recipe import build_passes, load_recipe
from foldonnx.passes.registry import get_pass, list_passes, make_pass, report_from_dict

PASSES = list_passes()


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def vit(tiny_vit_onnx) -> onnx.ModelProto:
    return onnx.load(str(tiny_vit_onnx))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)


def _ctx() -> PassContext:
    return PassContext(calib="synthetic:16")


def _budget_options(name: str, value: float) -> dict[str, float]:
    entry = get_pass(name)
    field = entry.budget.get("params") or next(iter(entry.budget.values()), None)
    return {} if field is None else {field: value}


def test_registry_has_the_builtin_passes() -> None:
    assert {"fold", "fold-ar", "prune-l1", "prune-l2", "prune-l1-ar", "quantize"} <= set(PASSES)
    for name in PASSES:
        e = get_pass(name)
        assert e.summary and e.cls.Config.option_names(), name


@pytest.mark.parametrize("name", PASSES)
def test_zero_budget_is_the_identity(name: str, vit: onnx.ModelProto, images: np.ndarray) -> None:
    entry = get_pass(name)
    if not entry.budget:
        pytest.skip(f"{name} has no budget (it always rewrites)")
    before = vit.SerializeToString()
    res = make_pass(name, _budget_options(name, 0.0)).run(vit, _ctx())
    assert res.model is not vit
    np.testing.assert_allclose(_run(res.model, images), _run(vit, images), atol=1e-6, rtol=0)
    assert res.report.after.params == res.report.before.params
    assert vit.SerializeToString() == before


@pytest.mark.parametrize("name", PASSES)
def test_a_real_budget_is_verified_reported_and_leaves_the_input_alone(
    name: str, vit: onnx.ModelProto, images: np.ndarray
) -> None:
    before = vit.SerializeToString()
    p = make_pass(name, _budget_options(name, 0.2))
    res = p.run(vit, _ctx())  # PassContext.verify is on: checker, ORT runs it, same outputs
    assert vit.SerializeToString() == before
    onnx.checker.check_model(res.model)
    y, y0 = _run(res.model, images), _run(vit, images)
    assert y.shape == y0.shape and np.isfinite(y).all()
    rep = res.report
    assert rep.name == name and rep.config == p.config.to_dict()
    if get_pass(name).budget:
        assert rep.after.params < rep.before.params
    text = json.dumps(rep.to_dict())
    again = report_from_dict(json.loads(text))
    assert type(again) is type(rep) and again.to_dict() == json.loads(text)
    assert isinstance(rep.changes(), list) and all(c.what for c in rep.changes())


@pytest.mark.parametrize("name", PASSES)
def test_config_round_trips_through_recipe_and_cli(name: str) -> None:
    entry = get_pass(name)
    config = entry.make(_budget_options(name, 0.15)).config
    # recipe: the full config, as compress records it in a model's metadata
    (p,) = build_passes(
        load_recipe(
            json.dumps([{name: {k: v for k, v in config.to_dict().items() if k not in entry.preset}}])
        )
    )
    assert p.config == config and p.name == name
    # CLI: every field given as its flag, parsed back
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, entry.cls.Config)
    argv = []
    for spec in entry.cls.Config.options():
        value = getattr(config, spec.name)
        if not spec.cli or value is None:
            continue
        if spec.kind is bool:
            argv.append(spec.flag if value else f"--no-{spec.flag[2:]}")
        else:
            argv += [spec.flag, str(value)]
    parsed = config_from_args(parser.parse_args(argv), entry.cls.Config)
    hidden = {s.name for s in entry.cls.Config.options() if not s.cli}
    assert {k: v for k, v in parsed.to_dict().items() if k not in hidden} == {
        k: v for k, v in config.to_dict().items() if k not in hidden
    }


@pytest.mark.parametrize("name", PASSES)
def test_unknown_option_is_a_one_line_error_naming_the_valid_ones(name: str) -> None:
    with pytest.raises(UsageError) as info:
        make_pass(name, {"no_such_option": 1})
    msg = str(info.value)
    assert "unknown option 'no_such_option'" in msg and "valid:" in msg and "\n" not in msg


def test_preset_options_are_fixed() -> None:
    with pytest.raises(UsageError, match="fixed to 'prune-l1'"):
        make_pass("prune-l1", {"method": "fold", "ratio": 0.1})
    assert make_pass("prune-l1", {"method": "prune-l1", "ratio": 0.1}).config.method == "prune-l1"


def test_pipeline_error_names_the_passes_already_run(vit: onnx.ModelProto) -> None:
    steps = [make_pass("fold", {"ratio": 0.25}), make_pass("fold", {"ratio": 0.25, "groups": "residual"})]
    with pytest.raises(PassError) as info:
        Pipeline(steps).run(vit, _ctx())
    msg = str(info.value)
    assert "step 2 of 2" in msg and "passes already run: fold" in msg and "\n" not in msg


def test_requires_refuses_with_the_reason(vit: onnx.ModelProto) -> None:
    with pytest.raises(UsageError, match="needs calibration data"):
        make_pass("fold", {"ratio": 0.2, "repair": "data"}).run(vit, PassContext())
