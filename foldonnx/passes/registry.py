"""Passes by name: what recipes, ``compress``, ``sweep`` and the CLI look up.

An entry is a pass class plus, optionally, a *preset*: options the name fixes. ``prune-l1`` is
:class:`~foldonnx.passes.fold.FoldPass` with ``method="prune-l1"``; ``fold-ar`` is the fold with
the data-free repair. A recipe step may set any other option of the pass; setting a preset
option to another value is an error naming the entry to use instead.

Register a pass of your own::

    @register_pass
    class MyPass(Pass):
        name = "my-pass"
        Config = MyConfig
        ...

Built-in passes are imported the first time the registry is read.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from foldonnx.errors import UsageError
from foldonnx.passes.base import Pass, PassReport

__all__ = [
    "PassEntry",
    "register_pass",
    "get_pass",
    "list_passes",
    "make_pass",
    "report_from_dict",
    "BUILTIN_MODULES",
]

logger = logging.getLogger(__name__)

P = TypeVar("P", bound=type[Pass])

#: modules whose import registers the built-in passes
BUILTIN_MODULES = (
    "foldonnx.passes.fold.fold_pass",
    "foldonnx.passes.quantize",
    "foldonnx.passes.lowrank",
    "foldonnx.passes.auto",
    "foldonnx.passes.blocks",
)

_PASSES: dict[str, PassEntry] = {}
_loaded = False


@dataclass(frozen=True)
class PassEntry:
    """A registered pass: the class, the options its name fixes, a one-line summary."""

    name: str
    cls: type[Pass]
    preset: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def config(self) -> type:
        return self.cls.Config

    @property
    def budget(self) -> Mapping[str, str]:
        return self.cls.budget

    def options(self) -> list[str]:
        """The options a recipe step of this entry may set."""
        return [n for n in self.cls.Config.option_names() if n not in self.preset]

    def make(self, options: Mapping[str, Any] | None = None, **extra: Any) -> Pass:
        """The pass with *options* (validated; a preset option may only be repeated as it is)."""
        opts = {str(k).replace("-", "_"): v for k, v in (options or {}).items()}
        specs = {s.name: s for s in self.cls.Config.options()}
        for key, fixed in self.preset.items():
            if key in opts and specs[key].parse(opts[key], self.name) != fixed:
                raise UsageError(
                    f"{self.name}: option {key} is fixed to {fixed!r} by this pass name "
                    f"(use the pass {self.cls.name!r} to set it)"
                )
        config = self.cls.Config.from_options({**opts, **self.preset}, owner=self.name)
        p = self.cls(config, **extra)
        p.name = self.name  # reports and recipes use the registered name
        return p


def register_pass(
    cls: P | None = None,
    *,
    name: str | None = None,
    preset: Mapping[str, Any] | None = None,
    summary: str | None = None,
    replace: bool = False,
) -> Any:
    """Register *cls* under *name* (default ``cls.name``), with *preset* options fixed. Usable
    as ``@register_pass`` or ``register_pass(Cls, name=..., preset=...)``."""

    def deco(c: P) -> P:
        key = name or c.name
        if not key:
            raise ValueError(f"{c.__name__} has no name")
        if key in _PASSES and not replace:
            raise ValueError(f"pass {key!r} is already registered")
        _PASSES[key] = PassEntry(key, c, dict(preset or {}), summary or c.summary)
        return c

    return deco(cls) if cls is not None else deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def list_passes() -> list[str]:
    """Names of the registered passes, sorted."""
    _load_builtins()
    return sorted(_PASSES)


def get_pass(name: str) -> PassEntry:
    """The entry called *name*; :class:`UsageError` listing the known names otherwise."""
    _load_builtins()
    try:
        return _PASSES[name]
    except KeyError:
        raise UsageError(f"unknown pass {name!r} (known: {', '.join(sorted(_PASSES))})") from None


def make_pass(name: str, options: Mapping[str, Any] | None = None, **extra: Any) -> Pass:
    """The pass *name* configured with *options* (validated before any work)."""
    return get_pass(name).make(options, **extra)


def report_from_dict(d: Mapping[str, Any]) -> PassReport:
    """A report read back from its JSON form, typed by the pass that wrote it."""
    _load_builtins()
    entry = _PASSES.get(str(d.get("name", "")))
    cls: Callable[..., Any] = getattr(entry.cls, "Report", PassReport) if entry else PassReport
    return cls.from_dict(d)  # type: ignore[attr-defined]
