"""``compress --auto``: the search over mixes of passes. Graph handling and the search's
mechanics on a random-init ViT (its scores say nothing about real models: tools/bench_auto.py
measures those on the real DINOv2-S)."""

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
from foldonnx.passes import auto as auto_mod
from foldonnx.passes.recipe import recipe_of_model


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(0).normal(size=(24, 3, 32, 32)).astype(np.float32)}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


@pytest.fixture(scope="module")
def searched(tiny_vit_onnx: Path, calib):
    return foldonnx.compress(
        tiny_vit_onnx,
        auto=True,
        target_params=0.3,
        calib=calib,
        methods="fold,prune,lowrank",
        budget_minutes=1.5,
    )


def test_auto_meets_the_target_and_beats_every_single_method(searched) -> None:
    model, report = searched
    auto = report.steps[0]
    assert auto.name == "auto" and auto.metric == "cls_cosine" and auto.holdout == 6 and auto.fit == 18
    assert abs(report.params_removed - 0.3) <= 0.01  # the target, within one point
    singles = {c.methods[0]: c for c in auto.candidates if c.stage == "single"}
    assert set(singles) == {"fold", "prune", "lowrank"}
    (chosen,) = [c for c in auto.candidates if c.chosen]
    on_target = [c for c in auto.candidates if c.error is None and c.params_removed >= c.budget - 0.01]
    assert chosen in on_target and chosen.score == max(c.score for c in on_target)
    assert any(len(c.methods) > 1 for c in auto.candidates)  # mixes were tried
    json.dumps(report.to_dict())


def test_the_recorded_recipe_reproduces_the_model(searched, tiny_vit_onnx: Path, calib) -> None:
    model, report = searched
    steps = recipe_of_model(model)
    assert steps and "auto" not in [s.name for s in steps]  # the recipe found, not the search
    assert [s.to_dict() for s in steps] == report.steps[0].recipe
    again, _ = foldonnx.compress(tiny_vit_onnx, [s.to_dict() for s in steps], calib=calib)
    x = np.random.default_rng(5).normal(size=(3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(again, x), _run(model, x), atol=1e-5, rtol=1e-5)
    assert read_metadata(again)[RECIPE_KEY] == read_metadata(model)[RECIPE_KEY]


def test_auto_on_the_macs_axis(tiny_vit_onnx: Path, calib) -> None:
    model, report = foldonnx.compress(
        tiny_vit_onnx, auto=True, target_macs=0.25, calib=calib, methods="fold,prune", budget_minutes=0.5
    )
    assert abs(report.macs_removed - 0.25) <= 0.02
    assert any(c.stage == "macs target" or c.chosen for c in report.steps[0].candidates)


def test_latency_target_is_corrected_by_measurement(monkeypatch, tiny_vit_onnx: Path, calib) -> None:
    """The search's latency correction, with latency modelled as the MACs ratio (the real
    measurement is interleaved ORT timing: benchmarked in tools/bench_auto.py, not timed here)."""
    from foldonnx.graph.stats import model_stats

    m0 = model_stats(onnx.load(str(tiny_vit_onnx))).macs

    def fake_latency(self, model):
        return 0.1 + 0.9 * model_stats(model).macs / m0

    monkeypatch.setattr(auto_mod._Search, "_latency_ratio", fake_latency)
    model, report = foldonnx.compress(
        tiny_vit_onnx, auto=True, target_latency=0.8, calib=calib, methods="fold,prune", budget_minutes=0.5
    )
    chosen = next(c for c in report.steps[0].candidates if c.chosen)
    assert chosen.latency_ratio is not None and abs(chosen.latency_ratio - 0.8) <= 0.03
    assert abs(fake_latency(None, model) - 0.8) <= 0.05


def test_auto_cli_table_json_plot(tiny_vit_onnx: Path, tmp_path: Path, capsys) -> None:
    np.savez(
        tmp_path / "c.npz", image=np.random.default_rng(1).normal(size=(16, 3, 32, 32)).astype(np.float32)
    )
    out, js, png = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "c.png"
    rc = main(
        ["compress", str(tiny_vit_onnx), str(out), "--auto", "--target-params", "0.25", "--calib",
         str(tmp_path / "c.npz"), "--methods", "fold,prune", "--budget-minutes", "0.3", "--json", str(js),
         "--plot", str(png)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "← chosen" in text and "recipe: [" in text
    rep = json.loads(js.read_text())
    cands = rep["steps"][0]["candidates"]
    assert sum(c["chosen"] for c in cands) == 1 and all("label" in c for c in cands)
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500
    # the printed recipe, given back with --recipe, reproduces the model
    printed = next(ln for ln in text.splitlines() if ln.startswith("recipe: "))[len("recipe: ") :]
    out2 = tmp_path / "o2.onnx"
    assert (
        main(
            [
                "compress",
                str(tiny_vit_onnx),
                str(out2),
                "--recipe",
                printed,
                "--calib",
                str(tmp_path / "c.npz"),
            ]
        )
        == 0
    )
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(onnx.load(str(out2)), x), _run(onnx.load(str(out)), x), atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--auto"], "--auto needs --target-params"),
        (["--auto", "--target-params", "0.2", "--target-macs", "0.2"], "give one of target-params"),
        (["--auto", "--target-params", "0.2", "--methods", "fold,magic"], "unknown method(s) magic"),
        (["--auto", "--target-latency", "1.5"], "target-latency must be in (0, 1]"),
        (["--target-params", "0.2", "--recipe", "[fold]"], "go with --auto"),
        (["--auto", "--target-params", "0.2", "--recipe", "[fold]"], "do not give --recipe"),
    ],
)
def test_auto_bad_options_fail_before_any_work(
    tiny_vit_onnx: Path, tmp_path: Path, capsys, argv, message
) -> None:
    out = tmp_path / "o.onnx"
    rc = main(["compress", str(tiny_vit_onnx), str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and not out.exists()


def test_api_arguments_are_checked(tiny_vit_onnx: Path) -> None:
    with pytest.raises(UsageError, match="either a recipe or auto"):
        foldonnx.compress(tiny_vit_onnx, [{"fold": {"ratio": 0.1}}], auto=True, target_params=0.1)
    with pytest.raises(UsageError, match="options of auto=True"):
        foldonnx.compress(tiny_vit_onnx, [{"fold": {"ratio": 0.1}}], target_params=0.1)
