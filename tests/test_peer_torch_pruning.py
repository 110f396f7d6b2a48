"""tools/peer_torch_pruning.py: the Torch-Pruning peer of the benchmark.

Fast: the option sets, the ratio search on step functions (a jump in the count is reported,
not papered over), one-line CLI errors. Slow (real DINOv2-S): the timm model built from the
ONNX file's weights matches ONNX Runtime, and one pruning lands on its target.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool() -> ModuleType:
    name = "peer_torch_pruning"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "peer_torch_pruning.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class _StepCurve:
    """The interface of the tool's ``_Curve`` on a known function of the ratio."""

    def __init__(self, fn, target: float, tolerance: float) -> None:
        self.fn, self.target, self.tolerance = fn, target, tolerance
        self.points: dict[float, float] = {}
        self.runs = 0
        self.hit = None

    def __call__(self, ratio: float) -> float:
        if ratio not in self.points:
            self.runs += 1
            self.points[ratio] = self.fn(ratio)
            if abs(self.points[ratio] - self.target) <= self.tolerance and self.hit is None:
                self.hit = (ratio, None, self.points[ratio])
        return self.points[ratio]


def test_variants_are_the_eight_settings() -> None:
    peer = _tool()
    names = [peer.variant_name(**v) for v in peer.variants()]
    assert len(set(names)) == 8
    assert "l1-uniform-dims" in names and "l2-global-heads" in names
    assert {v["importance"] for v in peer.variants()} == {"l1", "l2"}


def test_search_finds_a_ratio_on_a_fine_staircase() -> None:
    peer = _tool()
    f0 = 0.02  # what the conversion removes before pruning
    curve = _StepCurve(lambda r: f0 + 0.7 * np.floor(r * 1536) / 1536, target=0.3, tolerance=0.005)
    assert peer._search(curve, 0.28, f0, max_runs=40)
    ratio, _, frac = curve.hit
    assert abs(frac - 0.3) <= 0.005
    assert abs(ratio - 0.28 / 0.7) < 0.01
    assert curve.runs <= 6


def test_search_reports_a_target_inside_a_jump() -> None:
    peer = _tool()
    # whole heads: 0.10 → 0.18 at ratio 1/6, nothing in between
    curve = _StepCurve(lambda r: 0.10 if r < 1 / 6 else 0.18, target=0.14, tolerance=0.005)
    assert not peer._search(curve, 0.14, 0.0, max_runs=40)
    assert curve.hit is None
    below = max(r for r, f in curve.points.items() if f < 0.14)
    above = min(r for r, f in curve.points.items() if f > 0.14)
    assert below < 1 / 6 <= above and above - below < peer.MIN_BRACKET


def test_search_stops_beyond_the_largest_ratio() -> None:
    peer = _tool()
    curve = _StepCurve(lambda r: 0.5 * r, target=0.6, tolerance=0.005)
    assert not peer._search(curve, 0.6, 0.0, max_runs=40)
    assert max(curve.points) == peer.MAX_RATIO


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ratios", "0.1,x"], "--ratios: comma-separated fractions"),
        (["--ratios", "1.5"], "--ratios: fractions in (0, 1)"),
        (["--variants", "l3-uniform-dims"], "--variants: unknown"),
    ],
)
def test_cli_bad_input_is_one_line(argv, message, tmp_path, capsys) -> None:
    peer = _tool()
    assert peer.main([str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_timm_weights_match_onnx_runtime_and_prune_to_target(dinov2_backbone_onnx: Path) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    import torch

    peer = _tool()
    model = peer.load_timm_dinov2_from_onnx(dinov2_backbone_onnx, check_images=2)
    assert model.foldonnx_transfer_diff <= peer.TRANSFER_TOLERANCE
    # the file's count, and the timm model's: the 518-px position table (1370 tokens) is 257 at 224 px
    assert model.foldonnx_reference_params == 22_056_607
    assert peer.param_count(model) == 21_628_800

    res = peer.prune_to(model, 0.2, importance="l1")
    assert abs(res.params_removed - 0.2) <= 0.005
    assert res.params == peer.param_count(res.model) < peer.param_count(model)
    assert peer.param_count(model) == 21_628_800  # the input model is not pruned
    st = res.structure()
    assert st["heads"] == [6] * 12 and len(set(st["head_dim"])) == 1 and st["head_dim"][0] < 64
    assert len(set(st["mlp_hidden"])) == 1 and st["mlp_hidden"][0] < 1536
    with torch.no_grad():
        out = res.model.forward_features(torch.zeros(2, 3, 224, 224))
    assert tuple(out.shape) == (2, 257, 384)
