"""The `magiclens` command: one subcommand per stage, each implemented in its own module.

A subcommand's module is imported only when that subcommand runs, so `magiclens mine` never
imports torch and `magiclens train` never imports Beam. Each module provides
`add_arguments(parser)` and `run(args, extra) -> int`; `extra` holds the arguments the module did
not declare, which only the Beam pipelines accept, and only when Beam knows them as pipeline options.

Exit codes: 0 done, 1 the run failed or wrote nothing (it says why), 2 a usage error (a bad or
unknown flag, a value out of range, an input that does not exist).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from types import ModuleType
from typing import NamedTuple

from magiclens import __version__

USAGE_ERROR = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Command(NamedTuple):
    module: str  # provides run(args, extra), and add_arguments(parser) unless `arguments` is given
    description: str
    beam_options: bool = False  # arguments it does not declare are Beam pipeline options
    arguments: str | None = None  # "module:function" declaring the options apart from a heavy run module

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        module, _, function = (self.arguments or f"{self.module}:add_arguments").partition(":")
        getattr(importlib.import_module(module), function)(parser)


_MODEL_ARGUMENTS = "magiclens.model.arguments"  # the model commands' options, without torch

COMMANDS: dict[str, Command] = {
    "mine": Command("magiclens.pipeline.mine", "mine same-page image pairs from WARC files (Beam)", True),
    "instruct": Command("magiclens.pipeline.instruct", "write instructions for mined pairs: triplets (Beam)", True,
                        arguments="magiclens.pipeline.instruct_arguments:add_arguments"),
    "report": Command("magiclens.pipeline.report", "rebuild report.html of a mine or instruct run",
                      arguments="magiclens.pipeline.report_arguments:add_arguments"),
    "export": Command("magiclens.export", "export triplets to WebDataset tar shards"),
    "train": Command("magiclens.model.train", "train MagicLens on triplet Parquet shards",
                     arguments=f"{_MODEL_ARGUMENTS}:add_train_arguments"),
    "evaluate": Command("magiclens.model.evaluate", "evaluate a checkpoint: recall@k and mAP@k, or a standard benchmark",
                        arguments=f"{_MODEL_ARGUMENTS}:add_evaluate_arguments"),
    "index": Command("magiclens.model.index", "embed images (files, folders, globs, Parquet) into a searchable index",
                     arguments=f"{_MODEL_ARGUMENTS}:add_index_arguments"),
    "search": Command("magiclens.model.search", "search an index with an image and an instruction (or many, --queries)",
                      arguments=f"{_MODEL_ARGUMENTS}:add_search_arguments"),
    "serve": Command("magiclens.model.serve", "serve an index over HTTP: a JSON endpoint and a search page"),
    "convert-official": Command("magiclens.model.convert_official", "convert the released MagicLens Flax weights to a checkpoint",
                                arguments=f"{_MODEL_ARGUMENTS}:add_convert_official_arguments"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class UsageError(SystemExit):
    """A usage error found after parsing (a value out of range, an input that does not exist): exits
    with status 2, as argparse's own errors do; str() is the message."""

    def __init__(self, message: str):
        super().__init__(USAGE_ERROR)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<18}{command.description}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="magiclens",
        description="The open MagicLens data engine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{lines}\n\nRun `magiclens COMMAND --help` for a command's options.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"magiclens {__version__}")
    _add_log_level(parser)
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def _add_log_level(parser: argparse.ArgumentParser, default: str | None = "INFO") -> None:
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
                        help="how much magiclens logs to stderr (default INFO; Beam and other libraries log WARNING and up)")


def configure_logging(level: str) -> None:
    """Our loggers at `level`, everyone else's (Beam's INFO chatter) at WARNING and up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("magiclens").setLevel(level)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command (no prefix matching of flags); it imports no heavy library."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"magiclens {name}", description=command.description, formatter_class=HelpFormatter, allow_abbrev=False
    )
    command.add_arguments(parser)
    _add_log_level(parser, default=None)
    return parser


def _unknown_flag_error(parser: argparse.ArgumentParser, unknown: list[str], beam: bool) -> None:
    known = [flag for action in parser._actions for flag in action.option_strings]
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
        if close:
            hints.append(f"{flag}: did you mean {close[0]}?")
    what = "neither an option of this command nor a Beam pipeline option" if beam else "not an option of this command"
    message = f"unrecognized arguments: {' '.join(unknown)} ({what})"
    parser.error(message + ("; " + "; ".join(hints) if hints else ""))


def parse_command(name: str, argv: list[str]) -> tuple[ModuleType, argparse.Namespace, list[str]]:
    """Parse a command's arguments, then import the module that runs it; a usage error prints the
    problem and exits with status 2 (before anything heavy is imported)."""
    parser = command_parser(name)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not COMMANDS[name].beam_options:
            _unknown_flag_error(parser, extra, beam=False)
        from magiclens.pipeline.beam_options import unknown_pipeline_options

        unknown = unknown_pipeline_options(extra)
        if unknown:
            _unknown_flag_error(parser, unknown, beam=True)
    return importlib.import_module(COMMANDS[name].module), args, extra


def run_command(name: str, argv: list[str], log_level: str | None = None) -> int:
    """Parse and run one command, as `magiclens NAME ARGV...` does; returns the exit status, or
    raises SystemExit with status 2 on a usage error (UsageError after parsing)."""
    module, args, extra = parse_command(name, argv)
    configure_logging(args.log_level or log_level or "INFO")
    try:
        return int(module.run(args, extra) or 0)
    except SystemExit as stop:
        # Configuration checks exit with a message saying what to change: a usage error.
        if isinstance(stop.code, str):
            print(f"magiclens {name}: error: {stop.code}", file=sys.stderr)
            raise UsageError(stop.code) from None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    log_level = None
    while argv[:1] and argv[0].startswith("--log-level"):
        if "=" in argv[0]:
            level, argv = argv[0].split("=", 1)[1], argv[1:]
        else:
            level, argv = (argv[1] if len(argv) > 1 else ""), argv[2:]
        if level.upper() not in LOG_LEVELS:
            top.error(f"--log-level: choose one of {', '.join(LOG_LEVELS)}")
        log_level = level.upper()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return USAGE_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    return run_command(name, rest, log_level)


if __name__ == "__main__":
    raise SystemExit(main())
