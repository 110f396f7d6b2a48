"""Typed pass configuration: a frozen dataclass whose fields are at once the pass's CLI flags,
its recipe options and its sweep options.

A pass declares ``Config``, a :class:`PassConfig` subclass; each field is made with
:func:`option` (default, help, choices). From that one declaration:

* :meth:`PassConfig.from_options` builds a config from a mapping (a recipe step, ``sweep
  --option``, a Python call), converting strings (``"0.2"`` → 0.2, ``"true"`` → True) and
  refusing unknown keys with the list of valid ones — before any work starts;
* :func:`add_config_arguments` adds one ``--flag`` per field to an argparse parser (help shows
  the default) and :func:`config_from_args` reads back only the flags the user gave;
* ``validate()`` (overridden per pass) checks ranges and combinations, one-line
  :class:`~foldonnx.errors.UsageError` each;
* :meth:`PassConfig.to_dict` is what reports and a model's ``foldonnx.recipe`` metadata record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from foldonnx.errors import UsageError

__all__ = ["PassConfig", "OptionSpec", "option", "add_config_arguments", "config_from_args", "check_fraction"]

C = TypeVar("C", bound="PassConfig")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    parse: Callable[[Any], Any] | None = None,
    cli: bool = True,
) -> Any:
    """A config field: its default, a help line, optional choices, an optional parser that
    normalises recipe values (e.g. a mapping to a spec string), and whether it is a CLI flag."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "metavar": metavar}
    meta.update(parse=parse, cli=cli)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple or a string)")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One field of a config, as the CLI / recipe / sweep parsers see it."""

    name: str
    kind: type  # float, int, str or bool
    optional: bool
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    parse_hook: Callable[[Any], Any] | None = None
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any, owner: str = "") -> Any:
        """*value* (a string from the command line, or a recipe's JSON/YAML value) converted
        to the field's type; :class:`UsageError` naming the option otherwise."""
        where = f"{owner}: option {self.name}" if owner else f"option {self.name}"
        if self.parse_hook is not None and value is not None and not isinstance(value, str):
            value = self.parse_hook(value)
        if value is None or (
            isinstance(value, str) and value.strip().lower() in _NONE and self.kind is not str
        ):
            if self.optional:
                return None
            raise UsageError(f"{where} needs a value")
        if self.parse_hook is not None and isinstance(value, str):
            value = self.parse_hook(value)
            if value is None:
                return None
        try:
            out = self._convert(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected {self.kind.__name__}, got {value!r}") from None
        if self.choices is not None and out not in self.choices:
            raise UsageError(f"{where}: {out!r} is not one of {', '.join(map(str, self.choices))}")
        return out

    def _convert(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if self.kind is int:
            if isinstance(value, bool):
                raise TypeError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(str(value).strip())
        if self.kind is float:
            if isinstance(value, bool):
                raise TypeError(value)
            out = float(str(value).strip()) if isinstance(value, str) else float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if isinstance(value, (dict, list, tuple)):
            raise TypeError(value)
        return str(value)


def _base_type(tp: Any) -> tuple[type, bool]:
    """``float | None`` → (float, True); ``int`` → (int, False)."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported option type {tp!r}")
        base, _ = _base_type(rest[0])
        return base, type(None) in args
    if tp in (float, int, str, bool):
        return tp, False
    raise TypeError(f"unsupported option type {tp!r}")


def check_fraction(value: float | None, what: str, *, allow_one: bool = False) -> None:
    """A fraction in [0, 1) (or [0, 1]); one-line :class:`UsageError` otherwise."""
    if value is None:
        return
    ok = 0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0
    if not ok or not math.isfinite(value):
        raise UsageError(f"{what} must be in [0, {'1]' if allow_one else '1)'}, got {value:g}")


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass's configuration (a frozen dataclass; see module docstring)."""

    #: the pass name used in error messages (set by the registry's lookups)
    owner: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check ranges and combinations (override; raise :class:`UsageError`)."""

    @classmethod
    def options(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind, optional = _base_type(hints[f.name])
            out.append(
                OptionSpec(
                    name=f.name,
                    kind=kind,
                    optional=optional,
                    default=f.default,
                    help=f.metadata.get("help", ""),
                    choices=f.metadata.get("choices"),
                    metavar=f.metadata.get("metavar"),
                    parse_hook=f.metadata.get("parse"),
                    cli=f.metadata.get("cli", True),
                )
            )
        return out

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls: type[C], options: Mapping[str, Any] | None = None, *, owner: str = "") -> C:
        """A config from *options* (hyphens or underscores in keys), converted and validated."""
        owner = owner or cls.owner
        specs = {s.name: s for s in cls.options()}
        values: dict[str, Any] = {}
        for key, value in (options or {}).items():
            name = str(key).strip().replace("-", "_")
            if name not in specs:
                valid = ", ".join(sorted(specs)) or "none"
                prefix = f"{owner}: " if owner else ""
                raise UsageError(f"{prefix}unknown option {key!r} (valid: {valid})")
            values[name] = specs[name].parse(value, owner)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self: C, **changes: Any) -> C:
        return self.from_options({**self.to_dict(), **changes})

    def __str__(self) -> str:
        return json.dumps(self.to_dict())


def add_config_arguments(
    parser: argparse.ArgumentParser | Any,
    config: type[PassConfig],
    *,
    exclude: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One ``--flag`` per CLI field of *config*; only flags the user gives reach the namespace
    (read them with :func:`config_from_args`). Help lines show the defaults (*defaults*
    overrides what is shown where a command's default differs from the pass's; *aliases* adds
    other spellings of a flag)."""
    shown = dict(defaults or {})
    extra = {k: list(v) for k, v in (aliases or {}).items()}
    for spec in config.options():
        if not spec.cli or spec.name in exclude:
            continue
        default = shown.get(spec.name, spec.default)
        help_text = spec.help + (f" (default: {default})" if default not in (None, "") else "")
        kw: dict[str, Any] = dict(dest=f"cfg_{spec.name}", default=argparse.SUPPRESS, help=help_text)
        flags = [spec.flag, *extra.get(spec.name, [])]
        if spec.kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        if spec.choices:
            kw["choices"] = list(spec.choices)
        kw["metavar"] = spec.metavar or (None if spec.choices else spec.name.upper())
        kw["type"] = _cli_type(spec)
        parser.add_argument(*flags, **kw)


def _cli_type(spec: OptionSpec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = spec.kind.__name__
    return parse


def config_from_args(args: argparse.Namespace, config: type[C], **extra: Any) -> C:
    """The config made of the flags given on the command line (plus *extra* options)."""
    given = {
        k[len("cfg_") :]: v
        for k, v in vars(args).items()
        if k.startswith("cfg_") and k[4:] in config.option_names()
    }
    return config.from_options({**given, **extra})
