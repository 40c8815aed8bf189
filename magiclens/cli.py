"""The `magiclens` command: one subcommand per stage, each implemented in its own module.

A subcommand's module is imported only when that subcommand runs, so `magiclens mine` never
imports torch and `magiclens train` never imports Beam. Each module provides
`add_arguments(parser)` and `run(args, extra) -> int`; `extra` holds the arguments the module did
not declare (Beam pipeline options for the pipelines; an error elsewhere).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from magiclens import __version__

# name -> (module, one-line description, whether unknown arguments are passed through)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "mine": ("magiclens.pipeline.mine", "mine same-page image pairs from WARC files (Beam)", True),
    "instruct": ("magiclens.pipeline.instruct", "write instructions for mined pairs: triplets (Beam)", True),
    "report": ("magiclens.pipeline.report", "rebuild report.html of a mine or instruct run", False),
    "train": ("magiclens.model.train", "train MagicLens on triplet Parquet shards", False),
    "evaluate": ("magiclens.model.evaluate", "evaluate a checkpoint: recall@k and mAP@k, or a standard benchmark", False),
    "index": ("magiclens.model.index", "embed images (files, folders, globs, Parquet) into a searchable index", False),
    "search": ("magiclens.model.search", "search an index with an image and an instruction", False),
    "convert-official": ("magiclens.model.convert_official", "convert the released MagicLens Flax weights to a checkpoint", False),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<18}{desc}" for name, (_, desc, _) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="magiclens",
        description="The open MagicLens data engine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{lines}\n\nRun `magiclens COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"magiclens {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module_name, description, passes_extra = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"magiclens {name}", description=description)
    module.add_arguments(parser)
    if passes_extra:
        args, extra = parser.parse_known_args(rest)
    else:
        args, extra = parser.parse_args(rest), []
    return int(module.run(args, extra) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
