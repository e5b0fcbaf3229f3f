"""Command line: ``segnest <command> [flags]``; each command maps its flags onto one call.

User errors (``SegnestError``) are printed as one line without a traceback; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

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


def _configured(cls: type, presets: str | None = None) -> Callable[[argparse.Namespace], Any]:
    """Turn parsed flags into the command's config dataclass, merged with the recipe and
    the per-dataset presets named by ``presets`` (an attribute of segnest.config)."""

    def resolve(args: argparse.Namespace) -> Any:
        from segnest import config

        given = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
        table = getattr(config, presets) if presets else None
        return config.resolve_config(cls, given, table)

    return resolve


def _run_status(result: dict[str, Any]) -> int:
    """0 for a finished run; a stopped one raises, so the CLI exits with its signal's code."""
    if result.get("interrupted"):
        raise RunStopped(result.get("signal"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from segnest.config import TrainConfig
    from segnest.training.segmentation import run_train

    return _run_status(run_train(_configured(TrainConfig, "DATASET_PRESETS")(args)))


def cmd_eval(args: argparse.Namespace) -> int:
    from segnest.config import EvalConfig
    from segnest.inference.evaluate import run_eval

    run_eval(_configured(EvalConfig)(args))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from segnest.config import PredictConfig
    from segnest.inference.predict import run_predict

    run_predict(_configured(PredictConfig)(args))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from segnest.config import ExportConfig
    from segnest.inference.export import run_export

    run_export(_configured(ExportConfig)(args))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from segnest.config import PretrainConfig
    from segnest.training.classification import run_pretrain

    return _run_status(run_pretrain(_configured(PretrainConfig, "PRETRAIN_PRESETS")(args)))


def cmd_bench(args: argparse.Namespace) -> int:
    from segnest.config import BenchConfig
    from segnest.tools.bench import run_bench

    run_bench(_configured(BenchConfig)(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from segnest.config import DemoConfig
    from segnest.tools.demo import run_demo

    run_demo(_configured(DemoConfig)(args))
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

    from segnest import config

    commands = [
        ("train", config.TrainConfig, cmd_train),
        ("eval", config.EvalConfig, cmd_eval),
        ("predict", config.PredictConfig, cmd_predict),
        ("export", config.ExportConfig, cmd_export),
        ("pretrain", config.PretrainConfig, cmd_pretrain),
        ("bench", config.BenchConfig, cmd_bench),
        ("demo", config.DemoConfig, cmd_demo),
    ]
    for name, cls, handler in commands:
        summary = (cls.__doc__ or "").split(":", 1)[-1].strip()
        command = sub.add_parser(name, help=summary, description=summary)
        if name == "predict":
            command.add_argument("inputs", nargs="+", metavar="IMAGE|DIR",
                                 help="image files or folders")
        config.add_dataclass_arguments(command, cls, skip=("inputs",))
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks for errors")
        handlers[name] = handler
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
        print(f"segnest: stopped by {stop.signal_name}; {_interrupt_advice(args.command)}",
              file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"\nsegnest: interrupted; {_interrupt_advice(args.command)}", file=sys.stderr)
        return STOP_EXIT_CODES["SIGINT"]


def _interrupt_advice(command: str) -> str:
    return INTERRUPT_ADVICE.get(command, "nothing was written; run the same command again")


if __name__ == "__main__":
    raise SystemExit(main())
