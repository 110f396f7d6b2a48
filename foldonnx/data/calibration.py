"""Calibration sets: augmented crops of the shipped images (never ``imagenet20``), synthetic
images made from random numbers only, and calibration data as model feeds.

``augmented_images(n)`` draws random resized crops (scale 0.08–1 of the area, aspect 3/4–4/3)
with random horizontal flips from the scikit-image photos, and upsampled CIFAR-10/100 images
(a random crop of 24–32 px, flipped at random), every image resized to ``size``×``size``.
Token-level statistics of a ViT give ``N·T`` rows per image, so a few hundred images are
plenty for the least-squares refit of a 1536-wide consumer.

The source string ``augmented`` (``augmented:N``) selects it for ``--calib``; ``synthetic``
(``synthetic:N``) the synthetic images (1/f spectral noise and dead leaves: the power spectrum
of natural photos, no photo involved) — the calibration of every data-free path.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

from foldonnx.data.sources import ImageSet, Preprocess, load_source
from foldonnx.errors import DataError
from foldonnx.extras import require

__all__ = [
    "augmented_images",
    "AUGMENTED_SOURCE",
    "parse_augmented",
    "synthetic_images",
    "SYNTHETIC_SOURCE",
    "parse_synthetic",
    "spectral_noise",
    "dead_leaves",
    "calibration_feeds",
    "offdomain_images",
    "parse_offdomain",
    "OFFDOMAIN_SOURCE",
]

AUGMENTED_SOURCE = "augmented"
DEFAULT_COUNT = 256

logger = logging.getLogger(__name__)


def _parse_count(spec: str, source: str) -> int | None:
    """``"<source>"`` → the default count, ``"<source>:N"`` → N (a positive integer; anything
    else is a one-line :class:`DataError`), another source → None."""
    name, _, arg = spec.partition(":")
    if name != source:
        return None
    if not arg:
        return DEFAULT_COUNT
    try:
        count = int(arg)
    except ValueError:
        count = 0
    if count < 1:
        raise DataError(f"{spec!r}: the image count after '{source}:' must be a positive integer")
    return count


def parse_augmented(spec: str) -> int | None:
    """``"augmented"`` → 256, ``"augmented:128"`` → 128, anything else → None."""
    return _parse_count(spec, AUGMENTED_SOURCE)


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
    Image = require("PIL.Image", "making calibration images")

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


OFFDOMAIN_SOURCE = "offdomain"


def parse_offdomain(spec: str) -> int | None:
    """``"offdomain"`` → 256, ``"offdomain:128"`` → 128, anything else → None."""
    return _parse_count(spec, OFFDOMAIN_SOURCE)


def offdomain_images(n: int = DEFAULT_COUNT, *, size: int = 224, seed: int = 0) -> ImageSet:
    """*n* calibration images that share nothing with the evaluation photos (``imagenet20``,
    ``photos``): three in four are random crops (60–100 % of the side) of the 40 CIFAR-10/100
    images, one in four of Fashion-MNIST training images (grey, upsampled); all flipped at
    random and jittered in brightness and contrast (±20 %). Drawing per image from the pools
    (not from all images at once) keeps the 40 colour photos from drowning in 2000 grey
    garment images: with that 98 % grey mix, two DINOv2-S blocks replaced kept 0.785 CLS cosine
    on real photos, with CIFAR crops 0.845 (benchmarks/blocks.md). The calibration of the
    benchmarks, so fidelity is measured on photos the fit never saw."""
    Image = require("PIL.Image", "making calibration images")
    rng = np.random.default_rng(seed)
    cifar = [img for src in ("cifar10", "cifar100") for img in load_source(src).images]  # type: ignore[union-attr]
    try:
        grey = list(load_source("fashion-mnist:train", limit=2000, seed=seed).images)  # type: ignore[union-attr]
    except DataError as exc:
        logger.warning("offdomain calibration without Fashion-MNIST (%s)", exc)
        grey = []
    out: list[np.ndarray] = []
    for _ in range(n):
        pool = cifar if (not grey or rng.random() < 0.75) else grey
        img = pool[int(rng.integers(len(pool)))]
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        h, w = img.shape[:2]
        c = int(rng.integers(max(1, int(0.6 * min(h, w))), min(h, w) + 1))
        left, top = int(rng.integers(0, w - c + 1)), int(rng.integers(0, h - c + 1))
        pil = Image.fromarray(np.ascontiguousarray(img[:, :, :3])).crop((left, top, left + c, top + c))
        pil = pil.resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(pil, dtype=np.float32)
        a = (a - a.mean()) * rng.uniform(0.8, 1.2) + a.mean() * rng.uniform(0.8, 1.2)
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    logger.info("offdomain calibration set: %d images", n)
    return ImageSet(name=f"offdomain:{n}", images=out)


# ---------------------------------------------------------------------------------------------
# Synthetic images: the data-free calibration of ``--repair ar`` on LayerNorm models
# ---------------------------------------------------------------------------------------------
SYNTHETIC_SOURCE = "synthetic"


def parse_synthetic(spec: str) -> int | None:
    """``"synthetic"`` → 256, ``"synthetic:64"`` → 64, anything else → None."""
    return _parse_count(spec, SYNTHETIC_SOURCE)


def spectral_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size×size×3`` float image in [0, 1] with a natural-image power spectrum.

    Amplitude ``∝ 1/f^α`` with α drawn in [0.8, 1.4] per image (power ``1/f^{2α}``; natural
    photos sit near α = 1), random phases, channels mixed by a random colour matrix whose
    luminance part dominates (natural RGB channels are strongly correlated)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0 / size
    alpha = rng.uniform(0.8, 1.4)
    amp = f**-alpha
    amp[0, 0] = 0.0
    planes = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        planes.append(np.fft.irfft2(amp * np.exp(1j * phase), s=(size, size)))
    x = np.stack(planes, -1)
    x /= x.std() + 1e-12
    mix = 0.8 * np.ones((3, 3)) / 3 + 0.35 * rng.normal(size=(3, 3))
    x = x @ mix.T
    x = (x - x.mean((0, 1))) / (x.std() + 1e-12)
    x = 0.5 + rng.uniform(0.12, 0.25) * x + rng.uniform(-0.15, 0.15, size=3)
    return np.clip(x, 0.0, 1.0)


def dead_leaves(size: int, rng: np.random.Generator, n: int = 1500) -> np.ndarray:
    """A ``size×size×3`` float image in [0, 1]: occluding discs of random colour whose radii
    follow a ``1/r³`` law (the dead-leaves model: scale-invariant, with sharp edges)."""
    r_min, r_max = 0.008 * size, 0.3 * size
    u = rng.uniform(size=n)
    radii = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5  # inverse CDF of p(r) ∝ r^-3

    def colour() -> np.ndarray:  # a grey level plus a little chroma (natural colours are muted)
        return np.clip(rng.uniform(0.05, 0.95) + rng.normal(0, 0.12, 3), 0.0, 1.0)

    img = np.tile(colour(), (size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    for r in radii:  # later discs occlude earlier ones
        cy, cx = rng.uniform(-r, size + r, 2)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, size)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        mask = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r
        img[y0:y1, x0:x1][mask] = colour()
    return img


def synthetic_images(n: int = DEFAULT_COUNT, *, size: int = 224, seed: int = 0) -> ImageSet:
    """*n* images made from nothing but random numbers: half spectral (1/f) noise, half
    dead-leaves, each with a random mild texture on top. No photo, no data set: the
    calibration of the data-free repair of LayerNorm / MLP groups (``--repair ar``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = spectral_noise(size, rng) if i % 2 == 0 else dead_leaves(size, rng)
        if i % 2 == 1:  # texture inside the leaves
            img = np.clip(img + 0.25 * (spectral_noise(size, rng) - 0.5), 0.0, 1.0)
        out.append(np.round(img * 255).astype(np.uint8))
    logger.info("synthetic calibration set: %d images (%d px)", n, size)
    return ImageSet(name=f"{SYNTHETIC_SOURCE}:{n}", images=out)


def calibration_feeds(
    model: onnx.ModelProto,
    calib: Any,
    *,
    limit: int | None = None,
    preprocess: Preprocess | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Calibration data for *model* as checked input arrays (see
    :func:`foldonnx.data.feeds.model_feeds`): a SOURCE string (built-in, folder, ``.npz``,
    ``augmented:N``, ``synthetic:N``), an ImageSet / TensorSet, an array or a mapping."""
    from foldonnx.data.feeds import model_feeds

    feeds, _ = model_feeds(model, calib, limit=limit, preprocess=preprocess, seed=seed, what="calibration")
    return feeds
