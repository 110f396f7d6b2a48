"""Exporter: parity numerics, the export pipeline on a tiny registered model (fast), and real
models from every family (slow tier)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from foldonnx.errors import ExportError, ModelFileError, ParityError, UsageError
from foldonnx.exporter import compare_outputs
from foldonnx.exporter.parity import ParityResult, ort_session

torch = pytest.importorskip("torch")

from foldonnx.data.sources import read_preprocess  # noqa: E402
from foldonnx.exporter import export_model, to_torch_export  # noqa: E402
from foldonnx.graph.metadata import read_metadata  # noqa: E402
from foldonnx.models import registry  # noqa: E402
from foldonnx.models.registry import ModelSpec  # noqa: E402

# ---------------------------------------------------------------------------------------------
# parity numerics (pure numpy)
# ---------------------------------------------------------------------------------------------


def test_compare_outputs_identical_is_zero() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    res = compare_outputs([a], [a.copy()])
    assert res == ParityResult(max_abs_diff=0.0, max_rel_diff=0.0, num_outputs=1, finite=True)
    assert res.within(0.0)


def test_compare_outputs_abs_and_relative_over_all_outputs() -> None:
    ref = [np.array([1.0, -4.0], np.float32), np.array([[10.0, 0.0]], np.float32)]
    act = [np.array([1.0, -4.5], np.float32), np.array([[10.0, 2.0]], np.float32)]
    res = compare_outputs(ref, act)
    assert res.max_abs_diff == pytest.approx(2.0)
    # 0.5 / 4 = 0.125 for the first output, 2 / 10 = 0.2 for the second
    assert res.max_rel_diff == pytest.approx(0.2)
    assert not res.within(1.0) and res.within(2.0)


def test_compare_outputs_non_finite_and_mismatches() -> None:
    ref = [np.ones((2, 2), np.float32)]
    res = compare_outputs(ref, [np.array([[1, np.nan], [1, 1]], np.float32)])
    assert not res.finite and not res.within(1e9)
    with pytest.raises(ExportError, match="shape"):
        compare_outputs(ref, [np.ones((2, 3), np.float32)])
    with pytest.raises(ExportError, match="outputs"):
        compare_outputs(ref, ref + ref)


# ---------------------------------------------------------------------------------------------
# the pipeline on a tiny registered model (a few seconds each)
# ---------------------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # conv weight 16x3x3x3 floats = 1.7 KB: over save_model's 1 KB external-data threshold
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


def _build_tiny(spec: ModelSpec, pretrained: bool, checkpoint: Path | None, size: int) -> torch.nn.Module:
    model = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics so the graph is not an identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    if checkpoint is not None:
        registry._load_into(model, registry.load_state_dict_file(checkpoint), checkpoint)
    return model


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = ModelSpec(
        name="test:tiny",
        family="test",
        task="classifier",
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        num_classes=5,
        builder=_build_tiny,
    )
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec.name


def _torch_reference(name: str, x: np.ndarray) -> np.ndarray:
    torch.manual_seed(0)  # the exporter seeds before building, so random init matches
    module = registry.get_model_spec(name).build()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".foldonnx")]


def test_export_writes_checked_model_with_metadata(tiny: str, tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    rep = export_model(tiny, out, opset=18)
    onnx.checker.check_model(str(out))
    model = onnx.load(str(out))
    assert rep.passed and rep.max_abs_diff <= 1e-5
    assert rep.opset == 18 and rep.exporter == "dynamo" and rep.external_data is False
    assert rep.params == sum(p.numel() for p in TinyNet().parameters())
    assert rep.file_size == out.stat().st_size
    meta = read_metadata(model)
    assert meta["foldonnx.model"] == tiny and meta["foldonnx.task"] == "classifier"
    assert json.loads(meta["foldonnx.std"]) == [0.25, 0.25, 0.25]
    pp = read_preprocess(out)
    assert pp is not None and pp.size == 32 and pp.mean == (0.5, 0.5, 0.5)
    # the file computes what torch computes (checked independently of the report)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = ort_session(out).run(None, {"image": x})[0]
    np.testing.assert_allclose(y, _torch_reference(tiny, x), atol=1e-5)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dynamic_batch_runs_other_batch_sizes(tiny: str, tmp_path: Path, exporter: str) -> None:
    out = tmp_path / f"tiny_{exporter}.onnx"
    rep = export_model(tiny, out, batch="dynamic", dynamo=exporter == "dynamo")
    assert rep.batch == "dynamic" and sorted(rep.checked_batches) == [1, 2]
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    sess = ort_session(out)
    for b in (1, 2, 5):
        x = np.random.default_rng(b).standard_normal((b, 3, 32, 32)).astype(np.float32)
        y = sess.run(None, {"image": x})[0]
        assert y.shape == (b, 5)
        np.testing.assert_allclose(y, _torch_reference(tiny, x), atol=1e-5)


def test_fixed_batch_rejects_other_batch(tiny: str, tmp_path: Path) -> None:
    out = tmp_path / "b2.onnx"
    rep = export_model(tiny, out, batch=2)
    assert rep.input_shape == [2, 3, 32, 32]
    sess = ort_session(out)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"image": np.zeros((3, 3, 32, 32), np.float32)})


def test_image_size_option(tiny: str, tmp_path: Path) -> None:
    rep = export_model(tiny, tmp_path / "s48.onnx", image_size=48)
    assert rep.input_shape == [1, 3, 48, 48]
    assert read_preprocess(tmp_path / "s48.onnx").size == 48  # type: ignore[union-attr]


def test_parity_failure_raises_and_writes_nothing(
    tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import foldonnx.exporter.export as ex

    def broken(ref: list[np.ndarray], act: list[np.ndarray]) -> ParityResult:
        return ParityResult(max_abs_diff=0.5, max_rel_diff=0.1, num_outputs=1, finite=True)

    monkeypatch.setattr(ex, "compare_outputs", broken)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match=r"max-abs-diff 5\.000e-01 .* exceeds tolerance"):
        export_model(tiny, out, tolerance=1e-3)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_external_data_above_threshold(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import foldonnx.onnx_file as onnx_file

    monkeypatch.setattr(onnx_file, "_EXTERNAL_THRESHOLD", 100)  # bytes: the tiny model is "large"
    out = tmp_path / "ext.onnx"
    rep = export_model(tiny, out)
    data = tmp_path / "ext.onnx.data"
    assert rep.external_data and data.exists() and data.stat().st_size > 0
    assert data.stat().st_mode & 0o777 == out.stat().st_mode & 0o777
    assert rep.file_size == out.stat().st_size + data.stat().st_size
    shallow = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in shallow.graph.initializer)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = ort_session(out).run(None, {"image": x})[0]
    np.testing.assert_allclose(y, _torch_reference(tiny, x), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


def test_checkpoint_is_used(tiny: str, tmp_path: Path) -> None:
    torch.manual_seed(123)
    trained = TinyNet()
    with torch.no_grad():
        trained.fc.bias.add_(3.0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    out = tmp_path / "ck.onnx"
    rep = export_model(tiny, out, checkpoint=ckpt)
    assert rep.weights == "checkpoint tiny.pth"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expect = trained.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_session(out).run(None, {"image": x})[0], expect, atol=1e-5)


def test_bad_arguments_fail_before_building(tiny: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="batch"):
        export_model(tiny, tmp_path / "x.onnx", batch=0)
    with pytest.raises(UsageError, match="batch"):
        export_model(tiny, tmp_path / "x.onnx", batch="many")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="tolerance"):
        export_model(tiny, tmp_path / "x.onnx", tolerance=-1)
    with pytest.raises(ModelFileError, match="does not exist"):
        export_model(tiny, tmp_path / "no" / "x.onnx")
    with pytest.raises(ModelFileError, match="directory"):
        export_model(tiny, tmp_path)
    with pytest.raises(ExportError, match="checkpoint not found"):
        export_model(tiny, tmp_path / "x.onnx", checkpoint=tmp_path / "missing.pth")
    assert list(tmp_path.iterdir()) == []


def test_to_torch_export_program_matches_module(tiny: str) -> None:
    prog = to_torch_export(tiny, batch="dynamic")
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(0)
    ref = registry.get_model_spec(tiny).build()
    with torch.no_grad():
        torch.testing.assert_close(prog.module()(x), ref(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# file-backed DINOv2-S
# ---------------------------------------------------------------------------------------------


def test_dinov2_export_refuses_to_overwrite_package_file(dinov2_onnx_path: Path) -> None:
    before = dinov2_onnx_path.stat().st_mtime_ns
    with pytest.raises(ModelFileError, match="input file"):
        export_model("dinov2_s", dinov2_onnx_path)
    assert dinov2_onnx_path.stat().st_mtime_ns == before


def test_dinov2_options_that_do_not_apply(dinov2_onnx_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="fixed ONNX file"):
        export_model("dinov2_s", tmp_path / "d.onnx", checkpoint=dinov2_onnx_path)
    with pytest.raises(ExportError, match="fixed input size"):
        export_model("dinov2_s", tmp_path / "d.onnx", image_size=256)
    with pytest.raises(ExportError, match="opset"):
        export_model("dinov2_s", tmp_path / "d.onnx", opset=18)
    assert list(tmp_path.iterdir()) == []


def test_dinov2_backbone_extraction(dinov2_backbone_onnx: Path, dinov2_onnx_path: Path) -> None:
    model = onnx.load(str(dinov2_backbone_onnx))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    assert not any(n.name.startswith("/decoder") or "decoder" in n.name for n in model.graph.node)
    full = onnx.load(str(dinov2_onnx_path))
    assert len(model.graph.node) < len(full.graph.node)
    meta = read_metadata(model)
    assert meta["foldonnx.model"] == "dinov2_s_backbone" and meta["foldonnx.task"] == "embedding"
    pp = read_preprocess(model)
    assert pp is not None and pp.size == 224 and pp.mean == (0.485, 0.456, 0.406)


# ---------------------------------------------------------------------------------------------
# real models (slow tier): every family exports within tolerance
# ---------------------------------------------------------------------------------------------


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kwargs", "out_name", "out_shape"),
    [
        ("timm:vit_tiny_patch16_224", {}, "logits", (1, 1000)),
        ("timm:resnet18", {"batch": "dynamic"}, "logits", (1, 1000)),
        ("open_clip:ViT-B-32", {}, "embedding", (1, 512)),
        ("open_clip:ViT-B-32/text", {}, "text_embedding", (1, 512)),
        ("sam:vit_b", {"image_size": 256}, "features", (1, 256, 16, 16)),
    ],
)
def test_real_architecture_export_parity(
    name: str, kwargs: dict, out_name: str, out_shape: tuple, tmp_path: Path
) -> None:
    _need({"timm": "timm", "open_clip": "open_clip", "sam": "segment_anything"}[name.split(":")[0]])
    out = tmp_path / "m.onnx"
    rep = export_model(name, out, **kwargs)
    onnx.checker.check_model(str(out))
    graph_outputs = [o.name for o in onnx.load(str(out), load_external_data=False).graph.output]
    assert graph_outputs == rep.output_names == [out_name]
    assert rep.passed and rep.max_abs_diff <= 1e-3, rep
    spec = registry.get_model_spec(name)
    x = spec.example_input(1, kwargs.get("image_size"), seed=7).numpy()
    y = ort_session(out).run(None, {rep.input_name: x})[0]
    assert y.shape == out_shape and np.isfinite(y).all()
    assert float(np.std(y)) > 0  # not a constant graph
    if kwargs.get("batch") == "dynamic":
        x2 = spec.example_input(3, None, seed=8).numpy()
        assert ort_session(out).run(None, {rep.input_name: x2})[0].shape[0] == 3


@pytest.mark.slow
def test_efficientnet_lite0_top1_on_imagenet_in_ort(efficientnet_lite0_onnx: Path) -> None:
    from foldonnx.data.sources import foolbox_images

    images = foolbox_images("imagenet")
    assert len(images) == 20
    pp = read_preprocess(efficientnet_lite0_onnx)
    assert pp is not None and pp.mean == (0.5, 0.5, 0.5) and pp.std == (0.5, 0.5, 0.5) and pp.size == 224
    x = pp(images)
    sess = ort_session(efficientnet_lite0_onnx)
    logits = np.concatenate([sess.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))])
    top1 = float((logits.argmax(1) == images.labels).mean())
    print(f"EfficientNet-Lite0 ORT top-1 on foolbox ImageNet-20: {top1:.2f}")
    assert top1 >= 0.8


@pytest.mark.slow
def test_efficientnet_lite0_dynamic_batch_matches_single(
    efficientnet_lite0_onnx: Path, efficientnet_lite0_dynamic_onnx: Path
) -> None:
    from foldonnx.data.sources import foolbox_images

    images = foolbox_images("imagenet").subset(slice(0, 4))
    x = read_preprocess(efficientnet_lite0_dynamic_onnx)(images)  # type: ignore[misc]
    batched = ort_session(efficientnet_lite0_dynamic_onnx).run(None, {"image": x})[0]
    single = ort_session(efficientnet_lite0_onnx)
    one_by_one = np.concatenate([single.run(None, {"image": x[i : i + 1]})[0] for i in range(4)])
    assert batched.shape == (4, 1000)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)
