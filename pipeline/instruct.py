"""`magiclens instruct`: pairs -> triplets (query image, instruction, target image).

A pipeline of its own, reading only the pairs dataset: writing triplets again with a new prompt or
writer never repeats crawling, fetching or dedupe.
"""

from __future__ import annotations

import argparse
import logging
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet, WriteToParquet

from pipeline import schemas
from pipeline.accounting import (
    REJECTS_TAG,
    StageCounters,
    counters_from_result,
    stats_from_counters,
    unbalanced_stages,
    write_json,
)
from pipeline.beam_options import pipeline_options
from pipeline.pairs import stable_hash
from pipeline.records import Reject
from pipeline.writers import InstructionWriter, WriterRejected, make_writer

LOG = logging.getLogger("magiclens.instruct")


def triplet_rows(pair: dict, instructions: list[str], writer: InstructionWriter) -> list[dict]:
    """Rows of the triplets schema (pipeline/schemas.py) for one pair."""
    return [
        {
            "triplet_id": stable_hash(pair["pair_id"], writer.prompt_id, writer.writer_id, str(index)),
            "query_image": pair["query_image"],
            "instruction": instruction,
            "target_image": pair["target_image"],
            "pair_id": pair["pair_id"],
            "page_url": pair["page_url"],
            "query_url": pair["query_url"],
            "target_url": pair["target_url"],
            "query_caption": None,
            "target_caption": None,
            "prompt_id": writer.prompt_id,
            "writer": writer.writer_id,
        }
        for index, instruction in enumerate(instructions)
    ]


class WriteInstructions(beam.DoFn):
    def __init__(self, writer_name: str, instructions_per_pair: int):
        self.writer_name = writer_name
        self.instructions_per_pair = instructions_per_pair

    def setup(self):
        self.writer = make_writer(self.writer_name)
        self.pairs = StageCounters("instruct")
        self.triplets = beam.metrics.Metrics.counter("magiclens", "outputs.triplets")

    def process(self, pair: dict):
        self.pairs.received()
        try:
            instructions = self.writer.write(pair, self.instructions_per_pair)
        except WriterRejected as rejected:
            yield self.pairs.reject(pair.get("pair_id") or "", rejected.reason, rejected.detail)
            return
        self.pairs.kept()
        for row in triplet_rows(pair, instructions, self.writer):
            self.triplets.inc()
            yield row


def pairs_pattern(path: str) -> str:
    """A pairs directory means its Parquet files; anything else is taken as a glob."""
    if path.endswith(".parquet") or any(ch in path for ch in "*?["):
        return path
    return FileSystems.join(path, "*.parquet")


def build_pipeline(pipeline: beam.Pipeline, pairs: str, output: str, writer: str, instructions_per_pair: int) -> None:
    written = (
        pipeline
        | "ReadPairs" >> ReadFromParquet(pairs_pattern(pairs))
        | "Write" >> beam.ParDo(WriteInstructions(writer, instructions_per_pair)).with_outputs(REJECTS_TAG, main="triplets")
    )
    written.triplets | "WriteTriplets" >> WriteToParquet(
        FileSystems.join(output, "triplets", "part"), schemas.TRIPLETS, file_name_suffix=".parquet"
    )
    (
        written[REJECTS_TAG]
        | "RejectRows" >> beam.Map(Reject.as_row)
        | "WriteRejects"
        >> WriteToParquet(FileSystems.join(output, "rejects", "part"), schemas.REJECTS, file_name_suffix=".parquet")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write instructions for mined pairs. Reads PAIRS (a pairs directory or glob), writes "
        "OUTPUT/triplets/*.parquet, OUTPUT/rejects/ and OUTPUT/stats.json. Unlisted arguments are "
        "Beam pipeline options; the default runner is Beam's in-process FnApiRunner."
    )
    parser.add_argument("--pairs", required=True, metavar="DIR_OR_GLOB", help="pairs written by `magiclens mine` (DIR/pairs)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (local, gs://, s3://)")
    parser.add_argument("--writer", default="template", choices=["template"],
                        help="instruction writer: template (rule-based, offline; default)")
    parser.add_argument("--instructions-per-pair", type=int, default=1, metavar="N",
                        help="write up to N triplets per pair, each with its own instruction (default 1)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.instructions_per_pair < 1:
        raise SystemExit(f"--instructions-per-pair must be at least 1, got {args.instructions_per_pair}")
    pattern = pairs_pattern(args.pairs)
    if not FileSystems.match([pattern])[0].metadata_list:
        raise SystemExit(f"--pairs {args.pairs!r}: no Parquet files match {pattern!r}; run `magiclens mine` first")
    options = pipeline_options(extra)
    started = time.time()
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, args.pairs, args.output, args.writer, args.instructions_per_pair)
    result = pipeline.run()
    result.wait_until_finish()
    stats = stats_from_counters(counters_from_result(result))
    write_json(
        FileSystems.join(args.output, "stats.json"),
        {"command": "instruct", "pairs": args.pairs, "writer": args.writer, "seconds": round(time.time() - started, 2), "stages": stats},
    )
    entry = stats.get("instruct", {"in": 0, "out": 0, "rejected": {}, "rejected_total": 0})
    triplets = stats.get("outputs", {}).get("triplets", 0)
    print(f"triplets written: {triplets}  ->  {FileSystems.join(args.output, 'triplets')}")
    print(f"  pairs in {entry['in']}, with instructions {entry['out']}, rejected {entry['rejected_total']} {entry['rejected']}")
    print(f"stats: {FileSystems.join(args.output, 'stats.json')}")
    broken = unbalanced_stages(stats)
    if broken:
        LOG.error("stages whose counts do not balance: %s", ", ".join(broken))
        return 1
    return 0
