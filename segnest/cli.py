"""Command line: ``segnest <command> [flags]``; each command maps its flags onto one engine call.

User errors (``SegnestError``) are printed as one line without a traceback; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

import segnest
from segnest.errors import SegnestError


def cmd_models(args: argparse.Namespace) -> int:
    for name in segnest.list_models():
        print(name)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="segnest",
        description="Semantic segmentation with ResNeSt + DeepLabV3 (train, eval, predict, "
                    "pretrain, demo, bench).",
    )
    parser.add_argument("--version", action="version", version=f"segnest {segnest.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable] = {}

    sub.add_parser("models", help="list the model names create_model accepts")
    handlers["models"] = cmd_models
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return handlers[args.command](args) or 0
    except SegnestError as err:
        if args.debug:
            traceback.print_exc()
        print(f"segnest: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsegnest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
