"""Recipes: a list of steps, each one registered pass with its options, read from JSON or YAML.

::

    - fold: {groups: "mlp,heads", target_params: 0.15, repair: ar}
    - quantize: {mode: dynamic}

A recipe is a file (``.json``, ``.yaml``, ``.yml``) or the same text inline (YAML's flow style is
an inline form: ``"[{fold: {target_params: 0.15}}, quantize]"``). A step is ``{pass: options}``,
``{pass: null}`` or just ``pass`` (its defaults); a mapping ``{steps: [...]}`` is accepted too.
Unknown passes and options are one-line errors naming the valid ones, raised by
:func:`load_recipe` / :func:`build_pipeline` before any work. The output model of ``compress``
records the recipe with every option spelled out (``foldonnx.recipe`` metadata), which this
module reads back (:func:`recipe_of_model`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from foldonnx.errors import UsageError
from foldonnx.passes.base import Pass, Pipeline
from foldonnx.passes.registry import get_pass

__all__ = ["RecipeStep", "load_recipe", "build_passes", "build_pipeline", "recipe_text", "recipe_of_model"]

_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class RecipeStep:
    """One step: a registered pass name and its options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {self.name: dict(self.options)}


def _parse_text(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        import yaml
    except ImportError:  # a third-party extra: JSON still works
        raise UsageError(f"{where}: not valid JSON, and PyYAML is not installed to read YAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid YAML"
        raise UsageError(f"{where}: cannot parse the recipe: {first}") from None


def _steps(data: Any, where: str) -> list[RecipeStep]:
    if isinstance(data, Mapping) and "steps" in data:
        data = data["steps"]
    elif isinstance(data, Mapping):
        data = [{k: v} for k, v in data.items()]
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, Sequence) or isinstance(data, str) or not data:
        raise UsageError(
            f"{where}: a recipe is a non-empty list of steps like {{fold: {{target_params: 0.2}}}}"
        )
    out = []
    for i, step in enumerate(data):
        if isinstance(step, str):
            out.append(RecipeStep(step.strip(), {}))
            continue
        if not isinstance(step, Mapping) or len(step) != 1:
            raise UsageError(f"{where}: step {i + 1} must map one pass name to its options, got {step!r}")
        ((name, options),) = step.items()
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise UsageError(f"{where}: step {i + 1} ({name}): options must be a mapping, got {options!r}")
        out.append(RecipeStep(str(name).strip(), dict(options)))
    return out


def _looks_like_path(text: str) -> bool:
    """A recipe file name rather than inline JSON/YAML text."""
    t = text.strip()
    if not t or t[0] in "[{" or "\n" in t or ":" in t:
        return t.endswith(_SUFFIXES) and t[0] not in "[{"
    if t.endswith(_SUFFIXES):
        return True
    try:
        return Path(t).is_file()
    except OSError:  # not a possible file name (too long, ...)
        return False


def load_recipe(recipe: str | os.PathLike | Sequence[Any] | Mapping[str, Any]) -> list[RecipeStep]:
    """The steps of *recipe* (a file, inline JSON/YAML text, or already-parsed data)."""
    if isinstance(recipe, (list, tuple, Mapping)):
        return _steps(recipe, "recipe")
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and _looks_like_path(recipe)):
        path = Path(recipe)
        if not path.is_file():
            raise UsageError(f"recipe file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the recipe {path}: {exc}") from None
        return _steps(_parse_text(text, str(path)), str(path))
    if not isinstance(recipe, str) or not recipe.strip():
        raise UsageError("empty recipe")
    return _steps(_parse_text(recipe, "recipe"), "recipe")


def build_passes(steps: Sequence[RecipeStep]) -> list[Pass]:
    """The configured passes of *steps* (every name and option validated, none run)."""
    passes = []
    for i, step in enumerate(steps):
        try:
            passes.append(get_pass(step.name).make(step.options))
        except UsageError as exc:
            raise UsageError(f"recipe step {i + 1}: {exc}") from None
    return passes


def build_pipeline(
    recipe: str | os.PathLike | Sequence[Any] | Mapping[str, Any],
    *,
    check: Mapping[str, np.ndarray] | None = None,
    check_name: str | None = None,
) -> Pipeline:
    """A :class:`~foldonnx.passes.base.Pipeline` of the recipe's passes."""
    return Pipeline(build_passes(load_recipe(recipe)), check=check, check_name=check_name)


def recipe_text(pipeline: Pipeline | Sequence[Pass]) -> str:
    """The recipe of *pipeline* as JSON, every option spelled out (``compress --recipe`` reads it)."""
    passes = pipeline.passes if isinstance(pipeline, Pipeline) else list(pipeline)
    return json.dumps([{p.name: p.config.to_dict()} for p in passes])


def recipe_of_model(model: onnx.ModelProto | str | os.PathLike) -> list[RecipeStep] | None:
    """The recipe a compressed model records in its metadata, or None."""
    from foldonnx.graph.metadata import RECIPE_KEY, read_metadata

    text = read_metadata(model).get(RECIPE_KEY)
    return load_recipe(json.loads(text)) if text else None
