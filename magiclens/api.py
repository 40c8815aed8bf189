"""The stages of MagicLens callable from Python; the `magiclens` command is a thin layer on the same code.

Each function takes the command's options as keyword arguments, spelled as the flags with
underscores (`min_side=64` is `--min-side 64`, `no_fetch=True` is `--no-fetch`, a list repeats the
flag), checks them exactly as the command does, runs the stage and returns what it produced:

    from magiclens import api

    stats = api.mine(inputs=["crawl/*.warc.gz"], output="out/mined", no_fetch=True, min_side=64)
    stats = api.instruct(pairs="out/mined", output="out/instructed", writer="template")
    api.export(input="out/instructed", output="out/shards", shard_size=1000)
    api.train(data="out/instructed/triplets/*.parquet", output="runs/tiny", model="tiny", steps=100)
    metrics = api.evaluate(checkpoint="runs/tiny", data="heldout/*.parquet")
    api.index(checkpoint="runs/tiny", images=["photos/"], output="runs/index")
    hits = api.search(index="runs/index", checkpoint="runs/tiny", image="query.jpg", instruction="at night")

A bad option raises `CommandError` with the command's message; a run that fails (or writes nothing)
raises `CommandError` with its exit status. Beam pipeline options of `mine` and `instruct` are given
as a list of flags: `beam_options=["--runner=DataflowRunner", "--project=p"]`.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any

from magiclens.cli import parse_command


class CommandError(RuntimeError):
    """A stage refused its options or failed; `exit_code` is what the command would exit with."""

    def __init__(self, command: str, exit_code: int, message: str):
        super().__init__(f"magiclens {command} (exit {exit_code}): {message}")
        self.command = command
        self.exit_code = exit_code


def command_line(options: dict[str, Any]) -> list[str]:
    """Keyword options -> the command's flags (None and False leave a flag out)."""
    argv: list[str] = []
    for name, value in options.items():
        flag = ("-" if len(name) == 1 else "--") + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _run(command: str, options: dict[str, Any], beam_options: Iterable[str] = (), capture: bool = False) -> str:
    """Run a command with these options; its stdout when `capture`. Raises CommandError unless it exits 0.

    Only argument parsing runs with stderr captured (for the message): the run itself logs as usual."""
    argv = command_line(options) + list(beam_options)
    errors, output = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            module, args, extra = parse_command(command, argv)
    except SystemExit:
        lines = [line for line in errors.getvalue().splitlines() if line.strip() and not line.startswith(" ")]
        raise CommandError(command, 2, lines[-1] if lines else "bad options") from None
    try:
        with contextlib.redirect_stdout(output) if capture else contextlib.nullcontext():
            code = int(module.run(args, extra) or 0)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            raise CommandError(command, 2, stop.code) from None
        code = stop.code or 0
    if code:
        raise CommandError(command, code, "the run failed or wrote nothing; its messages are above")
    return output.getvalue()


def _stats(output: str) -> dict[str, Any]:
    from magiclens.pipeline.accounting import read_json
    from apache_beam.io.filesystems import FileSystems

    return read_json(FileSystems.join(output, "stats.json"))


def mine(inputs: Sequence[str], output: str, beam_options: Iterable[str] = (), **options: Any) -> dict[str, Any]:
    """WARC files (paths, globs, gs:// or URLs) -> OUTPUT/pairs/*.parquet; returns stats.json."""
    _run("mine", {"input": list(inputs), "output": output, **options}, beam_options)
    return _stats(output)


def instruct(pairs: str, output: str, beam_options: Iterable[str] = (), **options: Any) -> dict[str, Any]:
    """Mined pairs (a `mine` output, its pairs/ or a glob) -> OUTPUT/triplets/*.parquet; returns stats.json."""
    _run("instruct", {"pairs": pairs, "output": output, **options}, beam_options)
    return _stats(output)


def export(input: str, output: str, shard_size: int = 10000) -> dict[str, Any]:  # noqa: A002 - the flag's name
    """Triplets -> WebDataset shards in OUTPUT; returns the counts and the shard names (export.json)."""
    from magiclens.export import ExportError, export_webdataset, triplet_files

    try:
        return export_webdataset(triplet_files(input), output, shard_size)
    except ExportError as error:
        raise CommandError("export", 2, str(error)) from None


def train(data: str, output: str, **options: Any) -> str:
    """Train on triplet Parquet shards; returns the output directory (checkpoints and logs)."""
    _run("train", {"data": data, "output": output, **options})
    return output


def evaluate(checkpoint: str, data: str | None = None, **options: Any) -> dict[str, Any]:
    """recall@k and mAP@k of a checkpoint on a triplet set (or `benchmark=..., data_dir=...`)."""
    printed = _run("evaluate", {"checkpoint": checkpoint, "data": data, "json": True, **options}, capture=True)
    return json.loads(printed.strip().splitlines()[-1])


def index(checkpoint: str, images: Sequence[str], output: str, **options: Any) -> dict[str, Any]:
    """Embed images (files, folders, globs, Parquet) into an index folder; returns its summary."""
    printed = _run("index", {"checkpoint": checkpoint, "images": list(images), "output": output, "json": True, **options},
                   capture=True)
    return json.loads(printed.strip().splitlines()[-1])


def search(index: str, checkpoint: str, image: str, instruction: str = "", k: int = 10,
           device: str | None = None) -> list[dict[str, Any]]:
    """The k best images of an index for a query image and instruction, best first."""
    from magiclens.model.checkpoint import CheckpointError
    from magiclens.model.index import SearchIndexError
    from magiclens.model.search import Searcher

    try:
        searcher = Searcher.open(index, checkpoint, device)
        return [hit.to_dict() for hit in searcher.search_file(image, instruction, k)]
    except (SearchIndexError, CheckpointError) as error:
        raise CommandError("search", 2, str(error)) from None

