"""The ``foldonnx.*`` entries of a model's ``metadata_props``: what a file says about itself.

``fold-onnx export`` records the model name, task and preprocessing (``foldonnx.model``,
``foldonnx.task``, ``foldonnx.image_size``, ``foldonnx.mean``, ``foldonnx.std``); every rewrite
records how it was made (``foldonnx.recipe``: the passes with their full configs, as JSON), so a
compressed file can be reproduced with ``fold-onnx compress --recipe`` from its own metadata.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from foldonnx.onnx_file import LoadedModel

__all__ = [
    "METADATA_PREFIX",
    "RECIPE_KEY",
    "read_metadata",
    "write_metadata",
    "read_task",
    "as_proto",
]

METADATA_PREFIX = "foldonnx."
RECIPE_KEY = "foldonnx.recipe"


def as_proto(model: onnx.ModelProto | LoadedModel | str | os.PathLike) -> onnx.ModelProto:
    """The ModelProto of a ModelProto, a LoadedModel or a path (read without its weights)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if hasattr(model, "model") and isinstance(model.model, onnx.ModelProto):
        return model.model
    from foldonnx.onnx_file import load_model

    return load_model(model, load_weights=False).model  # type: ignore[arg-type]


def read_metadata(model: onnx.ModelProto | LoadedModel | str | os.PathLike) -> dict[str, str]:
    """The ``foldonnx.*`` metadata_props of *model* (a ModelProto, LoadedModel or path)."""
    proto = as_proto(model)
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)}


def write_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set (replace) metadata_props entries of *model* in place, keeping the others."""
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.append(p)
    for k, v in props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def read_task(model: onnx.ModelProto | LoadedModel | str | os.PathLike) -> str | None:
    """The ``foldonnx.task`` an exported model records (classifier, embedding, dense), if any."""
    return read_metadata(model).get("foldonnx.task") or None
