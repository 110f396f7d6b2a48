"""``fold-onnx list-models [PATTERN]``: the names ``fold-onnx export`` accepts.

A pattern that matches nothing is an answer, not an error: exit 0 with "no models match
PATTERN" on stderr (stdout stays a plain list of names for scripts).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "list-models",
        help="list model names for 'export' (shell pattern, e.g. 'timm:vit_*')",
        description="List registry names: built-in real models, sam:*, and the timm:/open_clip: "
        "families (from the installed libraries). PATTERN is a shell-style pattern.",
    )
    p.add_argument("pattern", nargs="?", default="*", metavar="PATTERN")
    p.add_argument("--builtin", action="store_true", help="only the built-in entries (no timm/open_clip)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from foldonnx.models.registry import get_model_spec, list_models

    names = list_models(args.pattern, dynamic=not args.builtin)
    for name in names:
        if ":" not in name or name.startswith("sam:"):
            spec = get_model_spec(name)
            print(f"{name:<22} {spec.task:<10} {spec.description}")
        else:
            print(name)
    if not names:
        print(f"no models match {args.pattern}", file=sys.stderr)
    return 0
