"""Real data loaders and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from foldonnx.data.sources import Preprocess, fashion_mnist, foolbox_images, load_source
from foldonnx.errors import DataError


def test_foolbox_imagenet_has_labels():
    data = foolbox_images("imagenet")
    assert len(data) == 20
    assert data.labels is not None and data.labels.min() >= 0 and data.labels.max() < 1000
    assert all(img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 for img in data.images)


def test_fashion_mnist_balanced_subset():
    data = fashion_mnist("train", limit=50, seed=1)
    assert len(data) == 50
    assert np.bincount(data.labels, minlength=10).tolist() == [5] * 10
    assert data.images[0].shape == (28, 28, 3)
    again = fashion_mnist("train", limit=50, seed=1)
    assert np.array_equal(again.labels, data.labels)


def test_preprocess_normalises_and_crops():
    img = np.full((50, 80, 3), 255, np.uint8)
    x = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))([img])
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0, atol=1e-6)


def test_image_folder_and_npz(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    data = load_source(str(tmp_path / "imgs"))
    assert data.labels.tolist() == [0, 0, 1, 1] and data.classes == ["a", "b"]

    np.savez(tmp_path / "x.npz", input=np.zeros((3, 3, 4, 4), np.float32), labels=np.arange(3))
    t = load_source(str(tmp_path / "x.npz"), limit=2)
    assert list(t.arrays) == [""] and len(t) == 2 and t.labels.tolist() == [0, 1]


def test_unknown_source():
    with pytest.raises(DataError, match="unknown data source"):
        load_source("no-such-source")
