"""Entry point of the flex template (dataflow/Dockerfile.launcher, dataflow/flex-template.json).

Dataflow's launcher runs this file with the template's parameters as `--name=value` (names with
underscores, booleans as true/false, one value each) followed by the Dataflow options it adds.
`magiclens_argv` turns them into a `magiclens mine|instruct` command line:

  --command=mine                 picks the command (default mine)
  --warc_limit=10                -> --warc-limit=10   (a magiclens option, spelled with dashes)
  --no_fetch=true / =false       -> --no-fetch / dropped   (on/off flags)
  --input=a/*.gz,b/*.gz          -> --input=a/*.gz --input=b/*.gz   (repeatable options, comma-separated)
  anything else                  passed on unchanged (Beam's options)

and DataflowRunner is the runner unless one is given.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from magiclens.cli import COMMANDS, main

FLEX_COMMANDS = ("mine", "instruct")


def command_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"magiclens {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser


def magiclens_argv(argv: list[str]) -> list[str]:
    command = "mine"
    rest = []
    for arg in argv:
        if arg.startswith("--command="):
            command = arg.partition("=")[2]
        else:
            rest.append(arg)
    if command not in FLEX_COMMANDS:
        raise SystemExit(f"--command={command}: the template runs one of {', '.join(FLEX_COMMANDS)}")
    actions = {option: action for action in command_parser(command)._actions for option in action.option_strings}
    translated = [command]
    for arg in rest:
        name, has_value, value = arg.partition("=")
        dashed = name.replace("_", "-")
        action = actions.get(dashed)
        if action is None or not name.startswith("--"):
            translated.append(arg)
        elif action.nargs == 0:  # an on/off flag
            if not has_value or value.lower() == "true":
                translated.append(dashed)
        elif isinstance(action, argparse._AppendAction):
            translated += [f"{dashed}={part.strip()}" for part in value.split(",") if part.strip()]
        else:
            translated.append(f"{dashed}={value}")
    if not any(arg.startswith("--runner") for arg in translated):
        translated.append("--runner=DataflowRunner")
    return translated


if __name__ == "__main__":
    raise SystemExit(main(magiclens_argv(sys.argv[1:])))
