"""A seeded, augmented calibration set built from the shipped images (never ``imagenet20``).

``augmented_images(n)`` draws random resized crops (scale 0.08–1 of the area, aspect 3/4–4/3)
with random horizontal flips from the scikit-image photos, and upsampled CIFAR-10/100 images
(a random crop of 24–32 px, flipped at random), every image resized to ``size``×``size``.
Token-level statistics of a ViT give ``N·T`` rows per image, so a few hundred images are
plenty for the least-squares refit of a 1536-wide consumer.

The source string ``augmented`` (``augmented:N``) selects it for ``--calib``.
"""

from __future__ import annotations

import logging

import numpy as np

from foldonnx.models.data import ImageSet, load_source

__all__ = ["augmented_images", "AUGMENTED_SOURCE", "parse_augmented"]

AUGMENTED_SOURCE = "augmented"
DEFAULT_COUNT = 256

logger = logging.getLogger(__name__)


def parse_augmented(spec: str) -> int | None:
    """``"augmented"`` → 256, ``"augmented:128"`` → 128, anything else → None."""
    name, _, arg = spec.partition(":")
    if name != AUGMENTED_SOURCE:
        return None
    return int(arg) if arg else DEFAULT_COUNT


def _crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (left, top, right, bottom) on an h×w image."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    s = min(h, w)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def augmented_images(
    n: int = DEFAULT_COUNT,
    *,
    size: int = 224,
    seed: int = 0,
    photo_fraction: float = 0.6,
    sources: tuple[str, ...] = ("photos", "cifar10", "cifar100"),
) -> ImageSet:
    """*n* augmented RGB images of ``size``×``size`` from the shipped photos and CIFAR sets."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos: list[np.ndarray] = []
    small: list[np.ndarray] = []
    for src in sources:
        data = load_source(src)
        if not isinstance(data, ImageSet):
            continue
        (photos if src == "photos" else small).extend(data.images)
    if not photos and not small:
        raise ValueError("no calibration images available")
    n_photo = int(round(n * photo_fraction)) if photos and small else (n if photos else 0)
    out: list[np.ndarray] = []
    for i in range(n):
        if i < n_photo:
            img = photos[int(rng.integers(len(photos)))]
            left, top, right, bottom = _crop_box(img.shape[0], img.shape[1], rng)
        else:
            img = small[int(rng.integers(len(small)))]
            h, w = img.shape[:2]
            c = int(rng.integers(max(1, int(0.75 * min(h, w))), min(h, w) + 1))
            left, top = int(rng.integers(0, w - c + 1)), int(rng.integers(0, h - c + 1))
            right, bottom = left + c, top + c
        pil = Image.fromarray(img).crop((left, top, right, bottom))
        pil = pil.resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(pil, dtype=np.uint8))
    order = rng.permutation(n)  # photos and CIFAR interleaved, so any split holds both
    logger.info("augmented calibration set: %d images (%d from photos)", n, n_photo)
    return ImageSet(name=f"augmented:{n}", images=[out[i] for i in order])
