"""Data repair by consumer refit: the numerics on arrays, and the sequential refit on tiny
two-block residual MLPs (hand-built channel groups), plus the augmented calibration set."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx.analysis.channel_groups import ChannelGroup, GroupKind, Member, Role
from foldonnx.numerics.lsq import LsqStats, bias_correction, choose_refit, lsq_error, ridge_refit
from foldonnx.passes.fold import fold

D, H, T = 6, 8, 5


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------- numerics
def _stats(h, y):
    s = LsqStats()
    s.add(h, y)
    return s


def test_lsq_error_matches_direct_computation(rng):
    h, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 3))
    w, d = rng.normal(size=(4, 3)), rng.normal(size=3)
    direct = float(np.mean(np.sum((h @ w + d - y) ** 2, axis=1)))
    assert lsq_error(_stats(h, y), w, d) == pytest.approx(direct, rel=1e-9)


def test_ridge_refit_recovers_a_planted_linear_consumer(rng):
    h = rng.normal(size=(400, 12)) + 3.0
    w_true, b_true = rng.normal(size=(12, 4)), rng.normal(size=4)
    y = h @ w_true + b_true
    train, val = _stats(h[:300], y[:300]), _stats(h[300:], y[300:])
    w0 = rng.normal(size=(12, 4))
    w, d, label, errs = choose_refit(train, val, w0, "ridge")
    assert label == "ridge1e-06"
    np.testing.assert_allclose(w, w_true, atol=1e-4)
    np.testing.assert_allclose(d, b_true, atol=1e-3)
    assert errs[label] < 1e-6 * errs["none"]


def test_large_ridge_tends_to_the_bias_corrected_merged_weights(rng):
    h, y = rng.normal(size=(200, 5)), rng.normal(size=(200, 2)) + 4.0
    s = _stats(h, y)
    w0 = rng.normal(size=(5, 2))
    ((w, d),) = ridge_refit(s, w0, [1e9])
    np.testing.assert_allclose(w, w0, atol=1e-6)
    np.testing.assert_allclose(d, bias_correction(s, w0), atol=1e-6)
    # the bias correction matches the output mean per channel
    np.testing.assert_allclose((h @ w0 + bias_correction(s, w0)).mean(0), y.mean(0), atol=1e-9)


def test_ridge_never_raises_the_training_error_above_the_merged_weights(rng):
    h, y = rng.normal(size=(60, 10)), rng.normal(size=(60, 3))
    s = _stats(h, y)
    w0 = rng.normal(size=(10, 3))
    base = lsq_error(s, w0, bias_correction(s, w0))
    assert base <= lsq_error(s, w0, np.zeros(3))
    for w, d in ridge_refit(s, w0, [1e-6, 1e-2, 1.0, 100.0]):
        assert lsq_error(s, w, d) <= base + 1e-9


def test_bias_mode_never_changes_weights(rng):
    h, y = rng.normal(size=(80, 4)), rng.normal(size=(80, 2)) + 1.0
    w0 = rng.normal(size=(4, 2))
    w, d, label, _ = choose_refit(_stats(h[:60], y[:60]), _stats(h[60:], y[60:]), w0, "bias")
    assert label in ("none", "bias")
    np.testing.assert_array_equal(w, w0)


# ------------------------------------------------------------------------- graphs
def _two_block_model(blocks, t: int = T) -> onnx.ModelProto:
    """x[N,t,D] -> 2 × (r + fc2(relu(fc1(r) + b1)) + b2)."""
    nodes, inits = [], {}
    r = "x"
    for i, (w1, b1, w2, b2) in enumerate(blocks):
        p = f"l{i}_"
        nodes += [
            helper.make_node("MatMul", [r, p + "w1"], [p + "h0"], name=p + "fc1"),
            helper.make_node("Add", [p + "h0", p + "b1"], [p + "h1"], name=p + "fc1_bias"),
            helper.make_node("Relu", [p + "h1"], [p + "h2"], name=p + "act"),
            helper.make_node("MatMul", [p + "h2", p + "w2"], [p + "y0"], name=p + "fc2"),
            helper.make_node("Add", [p + "y0", p + "b2"], [p + "y1"], name=p + "fc2_bias"),
            helper.make_node("Add", [r, p + "y1"], [p + "r"], name=p + "residual"),
        ]
        inits.update({p + "w1": w1, p + "b1": b1, p + "w2": w2, p + "b2": b2})
        r = p + "r"
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", t, D]) for n in ("x", r)]
    graph = helper.make_graph(
        nodes, "g", vi[:1], vi[1:],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _random_blocks(rng, n: int = 2) -> list[tuple]:
    """(w1, b1, w2, b2) of *n* random residual MLP blocks."""
    return [
        (rng.normal(size=(D, H)), rng.normal(size=H), rng.normal(size=(H, D)), rng.normal(size=D))
        for _ in range(n)
    ]


def _groups(n: int, h: int) -> list[ChannelGroup]:
    return [
        ChannelGroup(
            id=i,
            kind=GroupKind.MLP,
            channels=h,
            name=f"mlp{i}",
            members=(
                Member(f"l{i}_w1", 1, Role.PRODUCER, node=f"l{i}_fc1", op_type="MatMul", param="weight"),
                Member(f"l{i}_b1", 0, Role.PARAM, node=f"l{i}_fc1_bias", op_type="Add", param="bias"),
                Member(f"l{i}_w2", 0, Role.CONSUMER, node=f"l{i}_fc2", op_type="MatMul", param="weight"),
            ),
        )
        for i in range(n)
    ]


def _run(model, x, outputs=None):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in outputs or []:
        m.graph.output.add().name = name
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_refit_recovers_a_planted_consumer_after_pruning(rng):
    """Half the hidden units are 0.3× copies of the other half (ReLU is positively homogeneous),
    so the original fc2 output is linear in the units prune-l1 keeps: the refit finds it."""
    blocks = []
    for _ in range(2):
        w1, b1 = rng.normal(size=(D, H // 2)), rng.normal(size=H // 2)
        w2 = rng.normal(size=(H, D)) * np.repeat([1.0, 0.3], H // 2)[:, None]
        blocks.append((np.hstack([w1, 0.3 * w1]), np.hstack([b1, 0.3 * b1]), w2, rng.normal(size=D)))
    model = _two_block_model(blocks)
    calib = rng.normal(size=(48, T, D)).astype(np.float32)
    x = rng.normal(size=(4, T, D)).astype(np.float32)
    ref = _run(model, x)[0]
    plain, _ = fold(model, 0.5, channel_groups=_groups(2, H), method="prune-l1")
    refit, report = fold(
        model, 0.5, channel_groups=_groups(2, H), method="prune-l1", repair="data", calib=calib, refit="ridge"
    )
    assert [g.channels_after for g in report.groups] == [H // 2, H // 2]
    assert _init(refit, "l0_w2").shape == (H // 2, D)
    onnx.checker.check_model(refit)
    assert np.abs(_run(plain, x)[0] - ref).max() > 0.1  # pruning alone is far off
    np.testing.assert_allclose(_run(refit, x)[0], ref, atol=1e-3)
    assert any("consumer refit (ridge)" in n for n in report.notes)


@pytest.mark.parametrize("mode", ["bias", "ridge"])
def test_sequential_refit_never_worsens_a_block_output_on_the_calibration_set(rng, mode):
    """Each block's consumer output, computed from the refit model's own hidden activations,
    is at least as close to the original's as with the merged weights on the same activations."""
    blocks = _random_blocks(rng)
    model = _two_block_model(blocks)
    calib = rng.normal(size=(64, T, D)).astype(np.float32)
    merged, _ = fold(model, 0.5, channel_groups=_groups(2, H))
    refit, report = fold(model, 0.5, channel_groups=_groups(2, H), repair="data", calib=calib, refit=mode)
    names = [f"l{i}_{v}" for i in range(2) for v in ("h2", "y1")]
    orig = dict(zip(names, _run(model, calib, names)[1:], strict=True))
    mine = dict(zip(names, _run(refit, calib, names)[1:], strict=True))
    improved = 0
    for i in range(2):
        h, target = mine[f"l{i}_h2"], orig[f"l{i}_y1"]
        e_merged = np.mean((h @ _init(merged, f"l{i}_w2") + _init(merged, f"l{i}_b2") - target) ** 2)
        e_refit = np.mean((h @ _init(refit, f"l{i}_w2") + _init(refit, f"l{i}_b2") - target) ** 2)
        assert e_refit <= e_merged * (1 + 1e-5), (i, e_refit, e_merged)
        improved += e_refit < 0.99 * e_merged
        if mode == "bias":
            np.testing.assert_array_equal(_init(refit, f"l{i}_w2"), _init(merged, f"l{i}_w2"))
    assert improved >= 1
    e_final = [np.mean((_run(m, calib)[0] - _run(model, calib)[0]) ** 2) for m in (merged, refit)]
    assert e_final[1] < e_final[0]


def test_refit_none_leaves_the_folded_model_unchanged(rng):
    blocks = _random_blocks(rng)
    model = _two_block_model(blocks)
    calib = rng.normal(size=(16, T, D)).astype(np.float32)
    a, _ = fold(model, 0.5, channel_groups=_groups(2, H))
    b, _ = fold(model, 0.5, channel_groups=_groups(2, H), repair="data", calib=calib, refit="none")
    x = rng.normal(size=(2, T, D)).astype(np.float32)
    np.testing.assert_array_equal(_run(a, x)[0], _run(b, x)[0])


# ------------------------------------------------------------------------- calibration set
def _seeded_image_set(make, n: int, size: int):
    """*make(n, size=, seed=)* gives n RGB uint8 images, the same for a seed, others for another."""
    a, b, c = (make(n, size=size, seed=s) for s in (3, 3, 4))
    assert len(a) == n and all(im.shape == (size, size, 3) and im.dtype == np.uint8 for im in a.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.images, c.images, strict=True))
    return a, c


def test_augmented_calibration_set_is_seeded_and_sized():
    from foldonnx.data.calibration import augmented_images, parse_augmented

    _seeded_image_set(augmented_images, 12, 64)
    assert parse_augmented("augmented") == 256 and parse_augmented("augmented:40") == 40
    assert parse_augmented("photos") is None


@pytest.mark.parametrize("source", ["augmented:6", "synthetic:5"])
def test_calibration_feeds_accept_the_generated_sources(source):
    from foldonnx.data.calibration import calibration_feeds

    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 32, 32]) for n in ("img", "out")]
    graph = helper.make_graph([helper.make_node("Identity", ["img"], ["out"])], "g", vi[:1], vi[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = calibration_feeds(model, source, limit=4)
    assert list(feeds) == ["img"] and feeds["img"].shape == (4, 3, 32, 32)
    assert feeds["img"].dtype == np.float32 and np.isfinite(feeds["img"]).all()


# ------------------------------------------------------------------------- synthetic (ar)
def _radial_power_slope(img: np.ndarray) -> float:
    """Log-log slope of the radially averaged power spectrum of a grey image (2 ≤ f ≤ size/4)."""
    g = img.astype(np.float64).mean(axis=2)
    p = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
    n = g.shape[0]
    yy, xx = np.indices(p.shape)
    r = np.hypot(yy - n // 2, xx - n // 2).astype(int)
    radial = np.bincount(r.ravel(), p.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    f = np.arange(2, n // 4)
    return float(np.polyfit(np.log(f), np.log(radial[f]), 1)[0])


def test_synthetic_images_are_seeded_and_have_a_natural_power_spectrum():
    from foldonnx.data.calibration import parse_synthetic, synthetic_images

    a, c = _seeded_image_set(synthetic_images, 6, 128)
    assert not any(np.array_equal(x, y) for x, y in zip(a.images, c.images, strict=True))
    # natural photos have power ~ 1/f^2 (slope -2); white noise would be 0
    slopes = [_radial_power_slope(im) for im in a.images]
    assert all(-3.5 < s < -1.4 for s in slopes), slopes
    assert all(20 < im.std() < 110 for im in a.images)  # neither flat nor saturated
    assert parse_synthetic("synthetic") == 256 and parse_synthetic("synthetic:8") == 8
    assert parse_synthetic("augmented") is None


def _image_two_block_model(blocks) -> onnx.ModelProto:
    """img[N,3,4,4] -> Reshape [N,T=8,D=6] -> the two residual MLP blocks of _two_block_model."""
    m = _two_block_model(blocks, t=8)
    g = m.graph
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == "x":
                node.input[i] = "tokens"
    shape = numpy_helper.from_array(np.array([-1, 8, 6], np.int64), "tok_shape")
    g.initializer.append(shape)
    g.node.insert(0, helper.make_node("Reshape", ["img", "tok_shape"], ["tokens"], name="to_tokens"))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 4, 4]))
    onnx.checker.check_model(m)
    return m


def _run_img(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"img": x})[0]


def test_repair_ar_refits_mlp_consumers_on_synthetic_images(rng):
    from foldonnx.data.calibration import synthetic_images
    from foldonnx.data.sources import Preprocess

    blocks = _random_blocks(rng)
    model = _image_two_block_model(blocks)
    plain, _ = fold(model, 0.5, channel_groups=_groups(2, H))
    ar, report = fold(model, 0.5, channel_groups=_groups(2, H), repair="ar", synthetic_count=32)
    assert report.repair == "ar"
    assert any(n.startswith("ar (synthetic:32) consumer refit (ridge)") for n in report.notes), report.notes
    assert _init(ar, "l0_w2").shape == (H // 2, D)
    assert not np.array_equal(_init(ar, "l0_w2"), _init(plain, "l0_w2"))
    # fidelity on *other* synthetic images (another seed) than the 32 it was fitted on
    x = Preprocess(size=4)(synthetic_images(16, size=4, seed=99))
    ref = _run_img(model, x)
    err = {name: float(np.mean((_run_img(m, x) - ref) ** 2)) for name, m in (("plain", plain), ("ar", ar))}
    assert err["ar"] < 0.7 * err["plain"], err
    # --refit none: ar leaves mlp groups as folded
    same, rep = fold(model, 0.5, channel_groups=_groups(2, H), repair="ar", refit="none")
    np.testing.assert_array_equal(_run_img(same, x), _run_img(plain, x))
    assert any("refit none" in n for n in rep.notes)


def test_repair_ar_on_a_model_without_image_input_is_the_plain_fold_with_a_note(rng):
    blocks = _random_blocks(rng)
    model = _two_block_model(blocks)
    plain, _ = fold(model, 0.5, channel_groups=_groups(2, H))
    ar, report = fold(model, 0.5, channel_groups=_groups(2, H), repair="ar")
    x = rng.normal(size=(2, T, D)).astype(np.float32)
    np.testing.assert_array_equal(_run(ar, x)[0], _run(plain, x)[0])
    assert any("input is not an image" in n for n in report.notes)


def test_fold_ar_joins_the_pass_registry(rng):
    from foldonnx.passes.registry import make_pass

    blocks = _random_blocks(rng)
    model = _image_two_block_model(blocks)
    for name, method in (("fold-ar", "fold"), ("prune-l1-ar", "prune-l1")):
        p = make_pass(name, {"ratio": 0.5, "synthetic_count": 8}, channel_groups=_groups(2, H))
        res = p.run(model)
        report = res.report.to_dict()
        assert report["name"] == name and report["method"] == method and report["repair"] == "ar"
        assert any(n.startswith("ar (synthetic:8)") for n in report["notes"])
        assert _init(res.model, "l1_w2").shape == (H // 2, D)


def _conv_relu_conv(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """img[N,3,8,8] -> Conv(w1, b1) -> Relu -> Conv 1x1 (w2): a conv group with no BatchNorm
    (as exporters leave CNNs once BN is fused into the convs)."""
    nodes = [
        helper.make_node("Conv", ["img", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    weights = {"w1": w1, "b1": b1, "w2": w2}
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w2.shape[0], 8, 8])],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in weights.items()],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_repair_ar_matches_statistics_of_conv_groups_without_batchnorm(rng):
    from foldonnx.analysis import find_channel_groups

    c = 8
    w1, b1, w2 = rng.normal(size=(c, 3, 3, 3)), rng.normal(size=c), rng.normal(size=(4, c, 1, 1))
    model = _conv_relu_conv(w1, b1, w2)
    assert [g.kind.value for g in find_channel_groups(model) if g.foldable] == ["conv"]
    plain, _ = fold(model, 0.5, groups="conv", round_to=1)
    ar, report = fold(model, 0.5, groups="conv", round_to=1, repair="ar", synthetic_count=16)
    assert any("statistics matched in 1 group(s)" in n for n in report.notes), report.notes
    g = report.groups[0]
    assert (
        g.repair == "ar" and g.repair_factor_mean is not None and g.repair_factor_min != g.repair_factor_max
    )
    assert not np.array_equal(_init(ar, "w1"), _init(plain, "w1"))
    # exact duplicates stay exact: every merged channel already has its members' statistics
    dup_model = _conv_relu_conv(
        np.concatenate([w1, w1]), np.concatenate([b1, b1]), np.concatenate([w2, w2], axis=1) / 2
    )
    folded, rep = fold(dup_model, 0.5, groups="conv", round_to=1, repair="ar", synthetic_count=16)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run_img(folded, x), _run_img(dup_model, x), rtol=1e-4, atol=1e-4)
    assert rep.groups[0].repair_factor_min == pytest.approx(1.0, abs=1e-4)
    assert rep.groups[0].repair_factor_max == pytest.approx(1.0, abs=1e-4)


def test_repair_normalises_calibration_images_as_the_file_records(rng):
    """Synthetic (and --calib) images are normalised like the model's own inputs: the mean/std
    `fold-onnx export` wrote into the file (EfficientNet: [-1, 1]), else ImageNet's."""
    from foldonnx.graph.metadata import write_metadata
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.fold import FoldPass

    model = _conv_relu_conv(rng.normal(size=(8, 3, 3, 3)), rng.normal(size=8), rng.normal(size=(4, 8, 1, 1)))
    ctx = PassContext()
    assert (
        FoldPass(ratio=0.5).preprocess(model, ctx) is None
    )  # nothing recorded: ImageNet mean/std downstream
    write_metadata(
        model,
        {"foldonnx.image_size": "8", "foldonnx.mean": "[0.5, 0.5, 0.5]", "foldonnx.std": "[0.5, 0.5, 0.5]"},
    )
    pre = FoldPass(ratio=0.5).preprocess(model, ctx)
    assert pre.size == 8 and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    given = object()
    assert FoldPass(ratio=0.5).preprocess(model, PassContext(preprocess=given)) is given


def test_synthetic_calibration_shrinks_with_the_input_size():
    from foldonnx.passes.fold.fold_pass import synthetic_count_for

    assert synthetic_count_for(64, 224) == 64 and synthetic_count_for(64, 32) == 64
    assert synthetic_count_for(64, 448) == 16  # same pixels: a quarter of the images
    assert synthetic_count_for(64, 1024) == 4  # SAM: 4 images, not 64
    assert synthetic_count_for(2, 1024) == 2  # never more than asked
