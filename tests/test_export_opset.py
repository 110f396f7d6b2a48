"""``export --opset N`` writes opset N or refuses; it never writes another opset with exit 0.

The dynamo exporter builds at opset 18 and converts down with onnx's version converter; where
that fails (a ReduceMean without constant axes, timm's antialiased Resize) torch keeps opset 18
and only logs a warning. The exporter checks the written opset and refuses instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from foldonnx.cli import main
from foldonnx.errors import ExportError
from foldonnx.exporter.export import _check_opset
from foldonnx.models import registry
from foldonnx.models.registry import ModelSpec


def _opset_of(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def test_check_opset_refuses_another_opset() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _check_opset(model, 18, "dynamo")
    with pytest.raises(ExportError, match=r"wrote opset 18, not the requested 16 \(--exporter torchscript"):
        _check_opset(model, 16, "dynamo")
    with pytest.raises(ExportError, match="wrote opset 18, not the requested 20; nothing written"):
        _check_opset(model, 20, "torchscript")


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> str:
    torch = pytest.importorskip("torch")

    class TinyNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    spec = ModelSpec(
        name="test:opset",
        family="test",
        task="classifier",
        image_size=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        num_classes=5,
        builder=lambda spec, pretrained, checkpoint, size: TinyNet(),
    )
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec.name


CASES = [
    ("dynamo", 14),
    ("dynamo", 16),
    ("dynamo", 18),
    ("dynamo", 20),
    ("torchscript", 14),
    ("torchscript", 16),
]


@pytest.mark.parametrize(("exporter", "opset"), CASES)
def test_export_writes_the_requested_opset_or_refuses(
    tiny: str, exporter: str, opset: int, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m.onnx"
    rc = main(["export", tiny, str(out), "--opset", str(opset), "--exporter", exporter, "-q"])
    err = capsys.readouterr().err
    if rc == 0:
        assert _opset_of(out) == opset
    else:
        assert not out.exists() and list(tmp_path.iterdir()) == []
        assert f"wrote opset 18, not the requested {opset}" in err
        assert "Traceback" not in err and "version_converter" not in err
    if exporter == "torchscript" or opset >= 18:
        assert rc == 0  # these always give the opset asked for


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_vit_at_opset_16(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """timm's ViT: dynamo cannot convert its antialiased Resize below 18; torchscript can."""
    out = tmp_path / "vit.onnx"
    rc = main(["export", "timm:test_vit", str(out), "--opset", "16", "-q"])
    if rc == 0:
        assert _opset_of(out) == 16
    else:
        assert "not the requested 16" in capsys.readouterr().err and not out.exists()
    ts = tmp_path / "vit_ts.onnx"
    assert main(["export", "timm:test_vit", str(ts), "--opset", "16", "--exporter", "torchscript", "-q"]) == 0
    assert _opset_of(ts) == 16
