"""The ``fold-onnx`` command line.

Each subcommand lives in its own module ``foldonnx.cli.<name>`` exposing
``register(subparsers) -> argparse.ArgumentParser`` whose parser has ``func=run`` set, where
``run(args) -> int``. Only subcommands listed in :data:`COMMANDS` appear in ``--help``: add a
name here when the command works. Library code logs; only this package prints.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from foldonnx.errors import FoldOnnxError

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS: list[str] = [
    "export",
    "list_models",
    "inspect",
    "fold",
    "quantize",
    "eval",
    "sweep",
    "bench",
    "profile",
]


def build_parser() -> argparse.ArgumentParser:
    from foldonnx import __version__

    parser = argparse.ArgumentParser(
        prog="fold-onnx",
        description="Compress exported vision models: analyse channel groups, fold, prune, "
        "quantize and measure ONNX graphs.",
    )
    parser.add_argument("--version", action="version", version=f"fold-onnx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"foldonnx.cli.{name}")
        module.register(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except FoldOnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
