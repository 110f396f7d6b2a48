"""Pure-numpy numerics of folding: features, k-means, merge matrices, pruning, repair factors."""

from __future__ import annotations

import numpy as np
import pytest

from foldonnx.numerics import merge as nx


def test_target_channels_rounds_and_validates():
    assert nx.target_channels(10, 0.0) == 10
    assert nx.target_channels(10, 0.3) == 7
    assert nx.target_channels(1536, 0.3) == 1075
    assert nx.target_channels(3, 0.9) == 1
    with pytest.raises(ValueError):
        nx.target_channels(10, 1.0)
    with pytest.raises(ValueError):
        nx.target_channels(10, -0.1)


@pytest.mark.parametrize(
    ("k", "n", "multiple", "expected"),
    [
        (86, 96, 16, 80),  # 86/16 = 5.4 -> 5
        (88, 96, 16, 96),  # 5.5 rounds up
        (3, 96, 16, 16),  # never below one multiple
        (70, 96, 1, 70),  # no rounding asked
        (17, 24, 16, 17),  # 24 is not a multiple of 16: left alone
        (20, 16, 16, 20),  # narrower than two multiples: left alone
        (1530, 1536, 8, 1528),
    ],
)
def test_round_channels(k, n, multiple, expected):
    assert nx.round_channels(k, n, multiple) == expected


def test_member_slice_moves_axis_and_groups_units():
    a = np.arange(2 * 6).reshape(2, 6)  # axis 1 carries 3 units of 2 scalars
    idx = np.arange(3)[:, None] * 2 + np.arange(2)[None, :]
    s = nx.member_slice(a, 1, idx)
    assert s.shape == (3, 2, 2)
    np.testing.assert_array_equal(s[1, :, 0], [2, 3])  # unit 1 = columns 2, 3 of row 0
    np.testing.assert_array_equal(s[1, :, 1], [8, 9])


def test_duplicates_cluster_together_and_merge_exactly():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 40))
    x = np.concatenate([base, base])[rng.permutation(10)]
    m = nx.cluster_channels(x, 5, seed=0)
    assert m.k == 5 and sorted(np.bincount(m.labels)) == [2] * 5
    merged = nx.apply_producer(x[:, None, :], m)[:, 0, :]
    for j in range(5):
        np.testing.assert_allclose(merged[j], x[m.labels == j][0], atol=1e-12)
    assert nx.cluster_distortion(x, m) < 1e-12


def test_kmeans_is_deterministic_and_honours_k():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 200))  # wider than MAX_FEATURE_DIMS: PCA-reduced first
    a = nx.cluster_channels(x, 20, seed=3)
    b = nx.cluster_channels(x, 20, seed=3)
    assert np.array_equal(a.labels, b.labels) and a.k == 20
    # fewer distinct points than k: clusters are split so exactly k remain
    dup = np.repeat(rng.normal(size=(3, 4)), 4, axis=0)
    assert nx.cluster_channels(dup, 6).k == 6


def test_kmeans_plus_plus_path_also_works():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(4, 8))] * 3)
    m = nx.cluster_channels(x, 4, init="k-means++", n_init=2)
    assert m.k == 4 and nx.cluster_distortion(x, m) < 1e-12


def test_merge_matrix_producer_mean_consumer_sum():
    m = nx.merge_from_labels(np.array([0, 1, 0, 1, 1]))
    np.testing.assert_allclose(m.producer, [[0.5, 0, 0.5, 0, 0], [0, 1 / 3, 0, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(m.consumer, [[1, 0, 1, 0, 0], [0, 1, 0, 1, 1]])
    w = np.arange(5.0)[:, None, None]
    np.testing.assert_allclose(nx.apply_producer(w, m)[:, 0, 0], [1.0, 8 / 3])
    np.testing.assert_allclose(nx.apply_consumer(w, m)[:, 0, 0], [2.0, 8.0])


def test_prune_keep_ranks_producer_rows_by_norm():
    rows = np.array([[1.0, 1.0], [3.0, 0.0], [0.0, 2.5], [0.1, 0.1]])
    assert nx.prune_keep(rows, 2, "l1").tolist() == [1, 2]  # L1: 2, 3, 2.5, 0.2
    rows2 = np.array([[2.0, 2.0], [2.9, 0.0], [0.0, 2.5]])
    assert nx.prune_keep(rows2, 1, "l1").tolist() == [0]  # L1: 4 > 2.9 > 2.5
    assert nx.prune_keep(rows2, 1, "l2").tolist() == [1]  # L2: 2.83 < 2.9 > 2.5
    m = nx.merge_from_keep(np.array([3, 1]), 4)
    assert m.labels.tolist() == [-1, 0, -1, 1]
    np.testing.assert_array_equal(m.producer, m.consumer)


def test_cluster_cosine_and_variance_factor():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    m = nx.merge_from_labels(np.array([0, 0, 1, 1]))
    rho = nx.cluster_cosine(rows, m)
    np.testing.assert_allclose(rho, [0.0, 1.0])
    f = nx.variance_factor(m.sizes, rho)
    np.testing.assert_allclose(f, [np.sqrt(2.0), 1.0])
    # three members with ρ̄ = 0.5: sqrt(3 / (1 + 2·0.5)) = sqrt(1.5)
    np.testing.assert_allclose(nx.variance_factor(np.array([3.0]), np.array([0.5])), [np.sqrt(1.5)])


def test_merge_bn_stats_formula_and_identity_on_duplicates():
    m = nx.merge_from_labels(np.array([0, 0]))
    mean, var = np.array([1.0, 3.0]), np.array([1.0, 4.0])
    mu, v = nx.merge_bn_stats(mean, var, 0.0, m)
    inv = (1.0 + 0.5) / 2  # mean of 1/σ = (1 + 1/2)/2
    np.testing.assert_allclose(v, [(1 / inv) ** 2])
    np.testing.assert_allclose(mu, [((1.0 / 1.0 + 3.0 / 2.0) / 2) / inv])
    mu2, v2 = nx.merge_bn_stats(np.array([2.0, 2.0]), np.array([5.0, 5.0]), 1e-5, m)
    np.testing.assert_allclose([mu2[0], v2[0]], [2.0, 5.0], rtol=1e-9)


def test_fold_bn_into_affine_is_equivalent():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3))  # conv outputs, 3 channels
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2, 3)
    g, b, eps = rng.normal(size=3), rng.normal(size=3), 1e-5
    ref = g * (x - mean) / np.sqrt(var + eps) + b
    inv, b2 = nx.fold_bn_into_affine(mean, var, eps, g, b)
    folded = g * (x * inv - 0.0) / np.sqrt(1.0 - eps + eps) + b2
    np.testing.assert_allclose(folded, ref, atol=1e-12)


def test_reduce_features_keeps_duplicates_identical():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(30, 300))
    x = np.concatenate([base, base[:5]])
    z = nx.reduce_features(x, max_dims=16)
    assert z.shape == (35, 16)
    np.testing.assert_allclose(z[30:], z[:5], atol=1e-9)


def test_cluster_distortion_matches_the_direct_formula():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 7))
    for m in (nx.merge_from_labels(rng.integers(0, 9, 40)), nx.merge_from_keep(np.arange(0, 40, 3), 40)):
        keep = m.labels >= 0
        cent = np.stack([x[m.labels == j].mean(0) for j in range(m.k)])
        direct = ((x[keep] - cent[m.labels[keep]]) ** 2).sum() + (x[~keep] ** 2).sum()
        direct /= ((x - x.mean(0)) ** 2).sum()
        assert nx.cluster_distortion(x, m) == pytest.approx(direct, rel=1e-9)
