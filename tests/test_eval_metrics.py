"""Metrics and linear probe on synthetic arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from foldonnx.errors import DataError
from foldonnx.evaluate import metrics as M
from foldonnx.evaluate.probe import evaluate_probe, fit_probe, probe_features, stratified_split

RNG = np.random.default_rng(0)


def test_identical_outputs_are_perfect() -> None:
    x = RNG.normal(size=(50, 10))
    assert M.top1_agreement(x, x) == 1.0
    assert M.cosine_similarity(x, x) == pytest.approx(1.0)
    assert M.kl_divergence(x, x) == pytest.approx(0.0, abs=1e-12)


def test_permuted_classes_never_agree() -> None:
    x = RNG.normal(size=(100, 10))
    perm = np.roll(x, -1, axis=1)  # candidate class j scores what the reference gave class j+1
    assert M.top1_agreement(x, perm) == 0.0
    assert M.kl_divergence(x, perm) > 0.1


def test_kl_known_value() -> None:
    ref = np.array([[0.0, 0.0]])
    cand = np.array([[math.log(3.0), 0.0]])  # q = (0.75, 0.25)
    assert M.kl_divergence(ref, cand) == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-9)
    # softmax is shift-invariant: adding a constant per row changes nothing
    assert M.kl_divergence(ref + 5.0, cand - 2.0) == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-9)


def test_top1_agreement_partial() -> None:
    ref = np.eye(4)[[0, 1, 2, 3]]
    cand = np.eye(4)[[0, 1, 3, 3]]
    assert M.top1_agreement(ref, cand) == 0.75


def test_cosine_known_values() -> None:
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    cand = np.array([[0.0, 2.0], [-3.0, -3.0], [0.0, 0.0]])
    # orthogonal 0, opposite -1, both zero counts as identical 1
    assert M.cosine_similarity(ref, cand) == pytest.approx((0.0 - 1.0 + 1.0) / 3)
    assert M.cosine_similarity(ref, 7.0 * ref) == pytest.approx(1.0)


def test_token_cosines() -> None:
    ref = RNG.normal(size=(4, 5, 8))
    cand = ref.copy()
    cand[:, 0] *= -1  # CLS flipped, patches intact
    assert M.cls_token_cosine(ref, cand) == pytest.approx(-1.0)
    assert M.patch_token_cosine(ref, cand) == pytest.approx(1.0)
    cand2 = ref.copy()
    cand2[:, 1:] = 0.0
    assert M.cls_token_cosine(ref, cand2) == pytest.approx(1.0)
    assert M.patch_token_cosine(ref, cand2) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        M.cls_token_cosine(ref[:, 0], cand[:, 0])


def test_mask_iou_probabilities_and_logits() -> None:
    ref = np.zeros((1, 1, 4, 4))
    ref[0, 0, :2, :] = 0.9  # 8 pixels on
    cand = np.zeros((1, 1, 4, 4))
    cand[0, 0, :3, :] = 0.6  # 12 pixels on, 8 shared
    assert M.mask_threshold(ref[0]) == 0.5
    assert M.mask_iou(ref, cand) == pytest.approx(8 / 12)
    assert M.mask_iou(ref, ref) == 1.0
    # logits (values outside [0, 1]): threshold is the reference median, so ~half the pixels
    logits = np.arange(16, dtype=float).reshape(1, 4, 4) - 3.0
    assert M.mask_threshold(logits[0]) == pytest.approx(4.5)
    assert M.mask_iou(logits, logits) == 1.0
    assert M.mask_iou(logits, -logits) == 0.0


def test_top1_accuracy() -> None:
    logits = np.eye(3)[[0, 2, 1, 1]]
    assert M.top1_accuracy(logits, np.array([0, 2, 1, 0])) == 0.75


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        M.cosine_similarity(np.zeros((2, 3)), np.zeros((2, 4)))


def test_probe_recovers_planted_linear_separation() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(20, 4))
    x = rng.normal(size=(2400, 20)) * rng.uniform(0.1, 10, size=20)  # unequal scales: standardising matters
    y = np.argmax(x @ w, axis=1)
    probe = fit_probe(x[:2000], y[:2000])
    assert probe.accuracy(x[2000:], y[2000:]) >= 0.95  # measured 0.985 here: margin for BLAS differences


def test_probe_cannot_learn_random_labels() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 20))
    y = rng.integers(0, 4, size=600)
    assert fit_probe(x[:400], y[:400]).accuracy(x[400:], y[400:]) < 0.45


def test_probe_transfer_vs_refit() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 3))
    x = rng.normal(size=(900, 16))
    y = np.argmax(x @ w, axis=1)
    ref_probe = fit_probe(x[:600], y[:600])
    shuffled = x[:, rng.permutation(16)]  # same information, different feature order
    res = evaluate_probe(ref_probe, shuffled[:600], y[:600], shuffled[600:], y[600:])
    assert res.refit >= 0.95
    assert res.transfer < 0.8
    assert (res.n_train, res.n_test) == (600, 300)


def test_probe_features_shapes() -> None:
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    f = probe_features(tokens)
    assert f.shape == (2, 8)
    np.testing.assert_allclose(f[:, :4], tokens[:, 0])
    np.testing.assert_allclose(f[:, 4:], tokens[:, 1:].mean(axis=1))
    assert probe_features(np.ones((2, 5, 3, 3))).shape == (2, 5)


def test_stratified_split_is_seeded_and_stratified() -> None:
    y = np.repeat(np.arange(5), 10)
    tr, te = stratified_split(y, 0.3, seed=4)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 50
    assert all(np.sum(y[te] == c) == 3 for c in range(5))
    tr2, te2 = stratified_split(y, 0.3, seed=4)
    np.testing.assert_array_equal(te, te2)
    with pytest.raises(DataError):
        fit_probe(np.zeros((4, 2)), np.zeros(4))
