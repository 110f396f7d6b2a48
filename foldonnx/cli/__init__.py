"""The ``fold-onnx`` command line.

Each subcommand lives in its own module ``foldonnx.cli.<name>`` exposing
``register(subparsers) -> argparse.ArgumentParser`` whose parser has ``func=run`` set, where
``run(args) -> int``. Only subcommands listed in :data:`COMMANDS` appear in ``--help``: add a
name here when the command works. Library code logs; only this package prints.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import typing

from foldonnx.errors import FoldOnnxError, UsageError

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS: list[str] = [
    "export",
    "list_models",
    "inspect",
    "fold",
    "lowrank",
    "approx_blocks",
    "quantize",
    "eval",
    "sweep",
    "compress",
    "bench",
    "profile",
]


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help lines end with the option's default, unless the line already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or isinstance(default, (list, tuple)) and not default
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit code 2), like every other error, and
    help that shows the defaults."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{' '.join(message.split())} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from foldonnx import __version__

    parser = _Parser(
        prog="fold-onnx",
        description="Compress exported vision models: analyse channel groups, fold, prune, "
        "quantize and measure ONNX graphs.",
    )
    parser.add_argument("--version", action="version", version=f"fold-onnx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors, no tables")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"foldonnx.cli.{name}")
        module.register(sub)
    for sp in sub.choices.values():  # -v / -q after the subcommand too
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
        sp.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors, no tables"
        )
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` cleans up (temporary files, partial
    outputs) exactly as it does for SIGINT."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    with contextlib.suppress(ValueError):  # not in the main thread (e.g. called from a worker)
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    except _Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except FoldOnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
