"""Command line: ``segnest <command> [flags]``; each command maps its flags onto one call.

User errors (``SegnestError``) are printed as one line without a traceback; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

import segnest
from segnest.errors import EXIT_ERROR, STOP_EXIT_CODES, RunStopped, SegnestError

# What an interrupted (Ctrl-C) command leaves behind and how to go on, per command.
RESUME_ADVICE = ("the checkpoints in the work folder are intact: run the same command with "
                 "--resume to continue")
INTERRUPT_ADVICE = {
    "train": RESUME_ADVICE,
    "pretrain": RESUME_ADVICE,
    "demo": "finished steps are kept: run segnest demo again and it resumes by itself",
    "eval": "nothing was lost: the checkpoint and the dataset are untouched and every "
            "prediction file written so far is complete; run the same command again to "
            "evaluate from the start",
    "predict": "nothing was lost: every mask written so far is a complete file; run the same "
               "command again to redo them all",
    "export": "nothing was written (the file appears only once verified); run the same "
              "command again",
}


def cmd_models(args: argparse.Namespace) -> int:
    for name in segnest.list_models():
        print(name)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """Without a name: each packaged recipe with what it trains, the published number it
    targets and the hardware it assumes. With a name: that recipe's YAML, as shipped."""
    from segnest.commands import config

    if args.name:
        print(config.find_recipe(args.name)[1], end="")
        return 0
    for name in config.packaged_recipes():
        _, recipe = config.read_recipe(name)
        print(f"{name}  ({recipe.get('dataset')}, {recipe.get('backbone')})")
        print(f"    target:   {recipe.get('target', 'not stated')}")
        print(f"    hardware: {recipe.get('hardware', 'not stated')}")
    print("run one with 'segnest train --config NAME'; 'segnest recipes NAME' prints its keys")
    return 0


def _load(target: str) -> Callable:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _command(settings: str, runner: str, presets: str | None = None,
             resolver: str = "segnest.commands.config:resolve_config"
             ) -> Callable[[argparse.Namespace], int]:
    """A command: its flags merged with the recipe and the presets ``presets`` into the
    validated settings class ``settings`` by ``resolver``, then passed to ``runner`` (each
    "module:name"; the resolver has resolve_config's signature). The runner's module (and
    torch) is imported only once the settings are valid, so that a bad flag is reported at
    once."""

    def handler(args: argparse.Namespace) -> int:
        given = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
        table = _load(presets) if presets else None
        cfg = _load(resolver)(_load(settings), given, table)
        result = _load(runner)(cfg)
        if isinstance(result, dict) and result.get("interrupted"):
            raise RunStopped(result.get("signal"))  # exits with the signal's code
        return 0

    handler.settings = settings  # type: ignore[attr-defined]
    return handler


# Each command: its settings class (the flags), what runs it and the presets under its flags.
COMMANDS = {
    "train": _command("segnest.tasks.train:TrainFlags", "segnest.tasks.train:run_train",
                      "segnest.presets:DATASET_PRESETS",
                      resolver="segnest.tasks.train:resolve_train_config"),
    "eval": _command("segnest.inference.config:EvalConfig", "segnest.tasks.dispatch:run_eval"),
    "predict": _command("segnest.inference.config:PredictConfig",
                        "segnest.tasks.dispatch:run_predict"),
    "export": _command("segnest.inference.config:ExportConfig",
                       "segnest.tasks.dispatch:run_export"),
    "quantize": _command("segnest.inference.config:QuantizeConfig",
                         "segnest.inference.quantize:run_quantize"),
    "pretrain": _command("segnest.tasks.classification.config:PretrainConfig",
                         "segnest.tasks.classification.task:run_pretrain",
                         "segnest.tasks.classification.config:PRETRAIN_PRESETS"),
    "bench": _command("segnest.tools.config:BenchConfig", "segnest.tools.bench:run_bench"),
    "demo": _command("segnest.tools.config:DemoConfig", "segnest.tools.demo:run_demo"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="segnest",
        description="Semantic segmentation with ResNeSt + DeepLabV3: train, evaluate and use "
                    "models; the commands are listed below.",
    )
    parser.add_argument("--version", action="version", version=f"segnest {segnest.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable] = {}

    sub.add_parser("models", help="list the model names create_model accepts")
    handlers["models"] = cmd_models
    recipes = sub.add_parser("recipes", help="list the packaged recipes, or print one")
    recipes.add_argument("name", nargs="?", metavar="NAME", help="print this recipe's YAML")
    handlers["recipes"] = cmd_recipes

    from segnest.commands.config import add_dataclass_arguments

    for name, handler in COMMANDS.items():
        cls = _load(handler.settings)
        summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split(":", 1)[-1].split())
        command = sub.add_parser(name, help=summary, description=summary)
        if name == "predict":
            command.add_argument("inputs", nargs="+", metavar="IMAGE|DIR",
                                 help="image files or folders")
        add_dataclass_arguments(command, cls, skip=("inputs",))
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks for errors")
        handlers[name] = COMMANDS[name]
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
        return EXIT_ERROR
    except RunStopped as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once for all processes
            print(f"segnest: stopped by {stop.signal_name}; {_interrupt_advice(args.command)}",
                  file=sys.stderr)
        return stop.exit_code
    except BrokenPipeError:
        # The reader went away (``segnest recipes | head``): not an error of ours. Point
        # stdout at nothing so that Python's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"\nsegnest: interrupted; {_interrupt_advice(args.command)}", file=sys.stderr)
        return STOP_EXIT_CODES["SIGINT"]


def _interrupt_advice(command: str) -> str:
    return INTERRUPT_ADVICE.get(command, "nothing was written; run the same command again")


if __name__ == "__main__":
    raise SystemExit(main())
