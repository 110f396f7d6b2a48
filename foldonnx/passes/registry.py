"""Compression methods by name, so sweeps (and later passes) compose without knowing each other.

A method is a function ``(model, ratio, *, seed, **options) -> (model, report)`` where *ratio* is
the fraction of channels to remove (0 = unchanged) and *report* is a JSON-able ``dict``. A sweep
along the parameter axis passes ``target_params=True``: *ratio* is then the fraction of the
model's parameters to remove (methods that cannot target parameters raise a ``UsageError``).
Register one with :func:`register_method`::

    @register_method("my-pass", "what it does")
    def _my_pass(model, ratio, *, seed=0, **options):
        ...
        return new_model, {"params_removed": 0.3}

``fold``, ``prune-l1`` and ``prune-l2`` are built in: thin wrappers of :func:`foldonnx.fold`
(imported when first used); ``fold-ar`` and ``prune-l1-ar`` add the data-free repair
(``repair="ar"``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx

from foldonnx.errors import PassError, UsageError

__all__ = [
    "MethodFn",
    "CompressionMethod",
    "register_method",
    "get_method",
    "list_methods",
    "apply_method",
    "TARGET_PARAMS",
]

logger = logging.getLogger(__name__)

MethodFn = Callable[..., tuple[onnx.ModelProto, dict[str, Any]]]

# Option a sweep along the parameter axis passes: ``ratio`` is then the fraction of the model's
# parameters to remove (the method allocates it), not the fraction of channels per group.
TARGET_PARAMS = "target_params"


@dataclass(frozen=True)
class CompressionMethod:
    """A named compression method."""

    name: str
    fn: MethodFn
    description: str = ""


_METHODS: dict[str, CompressionMethod] = {}


def register_method(
    name: str, description: str = "", *, replace: bool = False
) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method under *name* (``replace=True`` to override an existing one)."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in _METHODS and not replace:
            raise ValueError(f"compression method {name!r} is already registered")
        _METHODS[name] = CompressionMethod(
            name=name, fn=fn, description=description or (fn.__doc__ or "").strip()
        )
        return fn

    return deco


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> CompressionMethod:
    """The method called *name*; :class:`UsageError` listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UsageError(
            f"unknown compression method {name!r} (known: {', '.join(list_methods())})"
        ) from None


def _report_dict(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    if isinstance(report, dict):
        return report
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if dataclasses.is_dataclass(report):
        return dataclasses.asdict(report)
    return {"report": str(report)}


def apply_method(
    name: str, model: onnx.ModelProto, ratio: float, *, seed: int = 0, **options: Any
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run method *name* on *model* at *ratio*; returns the new model and a JSON-able report."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    method = get_method(name)
    new_model, report = method.fn(model, ratio, seed=seed, **options)
    return new_model, _report_dict(report)


def _fold_function() -> Callable[..., Any]:
    try:
        from foldonnx import fold  # type: ignore[attr-defined]
    except ImportError:
        try:
            from foldonnx.passes.fold import fold
        except ImportError as exc:
            raise PassError(f"the fold pass is not available: {exc}") from None
    return fold


def _fold_method(method: str, repair: str | None = None) -> MethodFn:
    def run(
        model: onnx.ModelProto, ratio: float, *, seed: int = 0, **options: Any
    ) -> tuple[onnx.ModelProto, Any]:
        if repair is not None:
            options = {**options, "repair": repair}
        if options.pop(TARGET_PARAMS, False):  # the sweep's parameter axis
            return _fold_function()(model, target_params=ratio, method=method, seed=seed, **options)
        return _fold_function()(model, ratio=ratio, method=method, seed=seed, **options)

    run.__name__ = f"_{method.replace('-', '_')}" + (f"_{repair}" if repair else "")
    return run


register_method("fold", "model folding: k-means cluster channels of each group, merge them")(
    _fold_method("fold")
)
register_method("prune-l1", "structured magnitude pruning: keep the channels of largest L1 norm")(
    _fold_method("prune-l1")
)
register_method("prune-l2", "structured magnitude pruning: keep the channels of largest L2 norm")(
    _fold_method("prune-l2")
)
register_method(
    "fold-ar",
    "model folding with the data-free repair: Fold-AR on BatchNorm groups, mlp/heads consumers "
    "refit on synthetic images",
)(_fold_method("fold", "ar"))
register_method(
    "prune-l1-ar",
    "L1 magnitude pruning with the same data-free repair as fold-ar (mlp/heads refit on synthetic images)",
)(_fold_method("prune-l1", "ar"))
