"""Data turned into a model's input arrays, checked against the model before any session runs.

Every command that feeds data to a model (calibration for repair / low rank / block
approximation / static INT8, the fidelity check data, eval data) goes through
:func:`model_feeds`: a data SOURCE (built-in, image folder, ``.npz``, ``augmented:N``,
``synthetic:N``), an :class:`~foldonnx.data.sources.ImageSet` / ``TensorSet``, an array or a
``{input name: array}`` mapping becomes ``{input name: array}``, and :func:`check_feeds` makes
sure it fits: every input present, the rank and the fixed dimensions of each input, a numeric
dtype that converts without loss of meaning (floats are not fed to integer inputs), finite
values, at least one sample. A mismatch is one :class:`~foldonnx.errors.DataError` line naming
the input — never an ONNX Runtime error from deep inside a pass. Images can only feed a model
with one 4-D float input; models with token ids or several inputs need an ``.npz`` of their
inputs, and say so — or, for a text model that records its tokenizer (``minilm_l6``), the
``sentences`` source, tokenised as the model records (:mod:`foldonnx.data.text`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from foldonnx.data.sources import ImageSet, Preprocess, TensorSet, load_source, resolve_preprocess
from foldonnx.errors import DataError

__all__ = ["model_feeds", "check_feeds", "graph_inputs", "image_input_size", "describe_input"]

logger = logging.getLogger(__name__)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in vi.type.tensor_type.shape.dim
    ]


def describe_input(vi: onnx.ValueInfoProto) -> str:
    """``'input_ids' (int64 [?, 128])``."""
    elem = vi.type.tensor_type.elem_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name
    except Exception:  # noqa: BLE001 - exotic element types
        dtype = onnx.TensorProto.DataType.Name(elem).lower()
    dims = ", ".join("?" if d is None else str(d) for d in _dims(vi))
    return f"{vi.name!r} ({dtype} [{dims}])"


def _is_image_input(vi: onnx.ValueInfoProto) -> bool:
    elem = vi.type.tensor_type.elem_type
    dims = _dims(vi)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    return elem in floats and len(dims) == 4 and dims[1] in (None, 1, 3)


def image_input_size(model: onnx.ModelProto, default: int = 224) -> int:
    """The spatial size of the model's image input (``default`` when it is dynamic)."""
    inputs = graph_inputs(model)
    dims = _dims(inputs[0]) if inputs else []
    return int(dims[-1]) if len(dims) == 4 and dims[-1] else default


def _needs_npz(model: onnx.ModelProto, what: str) -> DataError:
    inputs = graph_inputs(model)
    desc = ", ".join(describe_input(i) for i in inputs) or "none"
    return DataError(
        f"{what}: images can only feed a model with one image input [N, 3, H, W]; this model's "
        f"inputs are {desc}: it needs an .npz of its inputs (arrays named after the inputs)"
    )


def model_feeds(
    model: onnx.ModelProto,
    source: Any,
    *,
    limit: int | None = None,
    preprocess: Preprocess | None = None,
    seed: int = 0,
    what: str = "data",
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``({input name: [N, ...]}, labels or None)`` for *model* from *source* (see module
    docstring), checked by :func:`check_feeds`. Generated sources: ``augmented:N`` (crops of the
    shipped photos and CIFAR), ``offdomain:N`` (CIFAR + Fashion-MNIST crops: nothing in common
    with the evaluation photos), ``synthetic:N`` (noise images, data-free); several joined by
    ``+`` are mixed (``offdomain:128+synthetic:128``). *limit* caps the number of samples."""
    from foldonnx.data.calibration import (
        augmented_images,
        offdomain_images,
        parse_augmented,
        parse_offdomain,
        parse_synthetic,
        synthetic_images,
    )

    if limit is not None and limit < 1:
        raise DataError(f"{what}: the sample limit must be positive, got {limit}")
    if isinstance(source, str) and "+" in source and not Path(source).exists():
        return _mixed_feeds(model, source, limit=limit, preprocess=preprocess, seed=seed, what=what), None
    inputs = graph_inputs(model)
    if not inputs:
        raise DataError(f"{what}: the model has no inputs to feed")
    labels = None
    data = source
    if isinstance(data, str):
        generated = {
            parse_augmented: augmented_images,
            parse_synthetic: synthetic_images,
            parse_offdomain: offdomain_images,
        }
        make = next(((p(data), m) for p, m in generated.items() if p(data) is not None), None)
        if make is not None:
            if len(inputs) != 1 or not _is_image_input(inputs[0]):
                raise _needs_npz(model, what)
            size = preprocess.size if preprocess is not None else image_input_size(model)
            count, fn = make
            data = fn(count, size=size, seed=seed)  # then cut to limit: the set does not depend on it
        else:
            data = load_source(data, limit=limit, seed=seed, model=model)
    if isinstance(data, ImageSet):
        if len(inputs) != 1 or not _is_image_input(inputs[0]):
            raise _needs_npz(model, what)
        if len(data) == 0:
            raise DataError(f"{what}: data source {data.name!r} holds no images")
        if limit is not None:
            data = data.subset(slice(0, limit))
        pre = preprocess if preprocess is not None else resolve_preprocess(model)
        feeds = {inputs[0].name: pre(data)}
        labels = data.labels
    elif isinstance(data, TensorSet):
        feeds = _named(model, dict(data.arrays), f"{what} ({data.name})")
        labels = data.labels
    elif isinstance(data, Mapping):
        feeds = _named(model, dict(data), what)
    elif data is None:
        raise DataError(f"{what}: no data given")
    else:
        try:
            arr = np.asarray(data)
        except Exception as exc:  # noqa: BLE001 - anything that is not array-like
            raise DataError(f"{what}: cannot use {type(data).__name__} as model inputs ({exc})") from None
        feeds = _named(model, {"": arr}, what)
    if limit is not None:
        feeds = {k: v[:limit] for k, v in feeds.items()}
        labels = None if labels is None else labels[:limit]
    return check_feeds(model, feeds, what=what), labels


def _mixed_feeds(
    model: onnx.ModelProto,
    spec: str,
    *,
    limit: int | None,
    preprocess: Preprocess | None,
    seed: int,
    what: str,
) -> dict[str, np.ndarray]:
    """``A+B+…`` (e.g. ``offdomain:128+synthetic:128``): every source loaded as alone, the
    samples interleaved in proportion (so any held-out subset draws on all of them), cut to
    *limit*. Labels are dropped (the sources do not share classes)."""
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if len(parts) < 2:
        raise DataError(f"{what}: {spec!r}: give two or more sources joined by '+'")
    each = [model_feeds(model, part, preprocess=preprocess, seed=seed, what=what)[0] for part in parts]
    sizes = [len(next(iter(f.values()))) for f in each]
    order = sorted((i / sizes[j], j, i) for j in range(len(each)) for i in range(sizes[j]))
    if limit is not None:
        order = order[:limit]
    return {k: np.stack([each[j][k][i] for _, j, i in order]) for k in each[0]}


def _named(model: onnx.ModelProto, arrays: dict[str, Any], what: str) -> dict[str, Any]:
    """Arrays keyed by input name: one unnamed array feeds a one-input model."""
    names = [i.name for i in graph_inputs(model)]
    if set(arrays) == {""}:
        if len(names) != 1:
            raise DataError(
                f"{what}: one unnamed array cannot feed a model with inputs {names}: "
                "name the arrays after the inputs"
            )
        return {names[0]: arrays[""]}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{what}: no array for model input {missing[0]!r} (have: {', '.join(arrays)})")
    return {n: arrays[n] for n in names}


def check_feeds(
    model: onnx.ModelProto, feeds: Mapping[str, Any], *, what: str = "data"
) -> dict[str, np.ndarray]:
    """*feeds* checked against *model*'s inputs and cast to their dtypes (see module docstring)."""
    out: dict[str, np.ndarray] = {}
    lengths = set()
    for vi in graph_inputs(model):
        if vi.name not in feeds:
            raise DataError(f"{what}: no data for model input {describe_input(vi)}")
        try:
            arr = np.asarray(feeds[vi.name])
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{what}: input {vi.name!r} is not an array ({exc})") from None
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{what}: input {vi.name!r} holds {arr.dtype} values, not numbers")
        want = _dims(vi)
        if arr.ndim != len(want) and vi.type.tensor_type.HasField("shape"):
            raise DataError(
                f"{what}: model input {describe_input(vi)} has rank {len(want)}, the data has shape "
                f"{list(arr.shape)}"
            )
        for axis, (w, a) in enumerate(zip(want, arr.shape, strict=False)):
            if axis > 0 and w is not None and w != a:
                raise DataError(
                    f"{what}: model input {describe_input(vi)} needs size {w} on axis {axis}, "
                    f"the data has shape {list(arr.shape)}"
                )
        if arr.ndim == 0 or len(arr) == 0:
            raise DataError(f"{what}: input {vi.name!r} has no samples")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        except Exception:  # noqa: BLE001 - unknown element type: feed as it is
            dtype = arr.dtype
        fractional = arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))
        if dtype.kind in "iub" and fractional:
            raise DataError(
                f"{what}: model input {describe_input(vi)} takes integers (token ids?), "
                "the data holds fractional values"
            )
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise DataError(f"{what}: input {vi.name!r} holds NaN or infinite values")
        lengths.add(len(arr))
        out[vi.name] = np.ascontiguousarray(arr.astype(dtype, copy=False))
    if len(lengths) > 1:
        raise DataError(f"{what}: the inputs hold different numbers of samples: {sorted(lengths)}")
    return out
