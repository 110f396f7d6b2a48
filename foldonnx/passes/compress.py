"""``foldonnx.compress``: run a recipe of passes on a model, in memory, verified once.

The output model records how it was made in its metadata (``foldonnx.recipe``, every option
spelled out). When the input already carries a recipe (it was compressed before), the output's
recipe is the input's followed by this one, so ``compress --recipe`` applied to the original
model reproduces the output.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx

from foldonnx.errors import UsageError
from foldonnx.graph.metadata import RECIPE_KEY, read_metadata, write_metadata
from foldonnx.onnx_file import LoadedModel, load_model
from foldonnx.passes.base import PassContext, PipelineReport
from foldonnx.passes.recipe import build_pipeline

__all__ = ["compress", "check_feeds_for"]

logger = logging.getLogger(__name__)


def check_feeds_for(
    model: onnx.ModelProto, check: Any, *, limit: int | None = 20, preprocess: Any = None
) -> tuple[dict | None, str | None]:
    """Check data for the pipeline's fidelity column: feeds and a label (None when not given)."""
    if check is None:
        return None, None
    from foldonnx.data.feeds import model_feeds

    feeds, _ = model_feeds(model, check, limit=limit, preprocess=preprocess, what="check data")
    label = check if isinstance(check, str) else "given"
    return feeds, f"{label} ({len(next(iter(feeds.values())))} samples)"


def compress(
    model: onnx.ModelProto | LoadedModel | str | os.PathLike,
    recipe: str | os.PathLike | Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    auto: bool = False,
    target_params: float | None = None,
    target_macs: float | None = None,
    target_latency: float | None = None,
    methods: str | Sequence[str] | None = None,
    quantize: str | None = None,
    budget_minutes: float | None = None,
    calib: Any = None,
    check: Any = None,
    check_limit: int | None = 20,
    preprocess: Any = None,
    verify: bool = True,
    progress: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, PipelineReport]:
    """Compress *model* with *recipe*; returns ``(model, report)``. The input is not modified.

    *recipe*: a file, inline JSON/YAML, or a list like ``[{"fold": {"target_params": 0.15}},
    {"quantize": {"mode": "dynamic"}}]`` (see :mod:`foldonnx.passes.recipe`). *calib*:
    calibration data for passes that need it (a SOURCE such as ``augmented:256``, an ImageSet,
    an array or ``{input: array}``). *check*: data on which the fidelity of the model after
    every pass is measured (``imagenet20``, an ``.npz``…; *check_limit* samples).

    ``auto=True`` searches the recipe instead (:mod:`foldonnx.passes.auto`) for one of
    *target_params* / *target_macs* (fractions to remove) or *target_latency* (a fraction of the
    original's latency), mixing *methods* (default fold, prune, blocks, lowrank) within
    *budget_minutes*, optionally followed by *quantize*; the recipe it finds is the one recorded.
    """
    if auto:
        if recipe is not None:
            raise UsageError("give either a recipe or auto=True, not both")
        options: dict[str, Any] = {
            "target_params": target_params, "target_macs": target_macs, "target_latency": target_latency,
        }  # fmt: skip
        if methods is not None:
            options["methods"] = methods
        if quantize is not None:
            options["quantize"] = quantize
        if budget_minutes is not None:
            options["budget_minutes"] = budget_minutes
        recipe = [{"auto": {k: v for k, v in options.items() if v is not None}}]
    elif any(v is not None for v in (target_params, target_macs, target_latency, methods, budget_minutes)):
        raise UsageError(
            "targets, methods and budget_minutes are options of auto=True (or of a recipe's steps)"
        )
    if recipe is None:
        raise UsageError("give a recipe (a list of passes) or auto=True with a target")
    file_size = None
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(model, LoadedModel):
        file_size = model.file_size
        model = model.model
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"model must be an ONNX ModelProto or a path, got {type(model).__name__}")
    pipeline = build_pipeline(recipe)  # names and options checked before any work
    if calib is not None:  # calibration data checked against the model before any pass runs
        from foldonnx.data.calibration import calibration_feeds

        calibration_feeds(model, calib, limit=2, preprocess=preprocess)
    feeds, label = check_feeds_for(model, check, limit=check_limit, preprocess=preprocess)
    pipeline.check, pipeline.check_name = feeds, label
    ctx = PassContext(
        calib=calib,
        preprocess=preprocess,
        verify=verify,
        progress=progress,
        file_size=file_size,
        on_progress=on_progress,
    )
    result = pipeline.run(model, ctx)
    steps = []
    for p, rep in zip(pipeline.passes, result.report.steps, strict=True):  # type: ignore[attr-defined]
        expand = getattr(p, "expanded_recipe", None)
        steps += expand(rep) if expand is not None else [{p.name: p.config.to_dict()}]
    earlier = read_metadata(model).get(RECIPE_KEY)
    if earlier:
        try:
            steps = list(json.loads(earlier)) + steps
        except (ValueError, TypeError):
            logger.warning("the input's %s metadata is not a recipe; recording this run's only", RECIPE_KEY)
    write_metadata(result.model, {RECIPE_KEY: json.dumps(steps)})
    return result.model, result.report  # type: ignore[return-value]
