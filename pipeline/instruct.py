"""`magiclens instruct`: pairs -> triplets (query image, instruction, target image).

A pipeline of its own that reads only the pairs dataset and the caption cache: writing triplets
again with a new prompt or writer never repeats crawling, fetching or dedupe, and never captions an
image again for the same captioner and caption prompt (see pipeline/captions.py).

  pairs -> [captions: cache or captioner] -> writer tasks -> RunInference(writer) -> checked answers
        -> OUTPUT/triplets/*.parquet, OUTPUT/rejects/, OUTPUT/stats.json

Stages in stats.json: `captions` (images that needed a caption), `instruct` (pairs), `instructions`
(each instruction a model wrote), plus token counts reported by the backends.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet, WriteToParquet
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.ml.inference.base import PredictionResult, RunInference

from magiclens.pipeline import schemas
from magiclens.pipeline.accounting import (
    REJECTS_TAG,
    StageCounters,
    counters_from_result,
    stats_from_counters,
    unbalanced_stages,
    write_json,
)
from magiclens.pipeline.beam_options import configure_logging, pipeline_options
from magiclens.pipeline.captions import AttachCaptions, CaptionImages, default_captions_dir
from magiclens.pipeline.records import Reject
from magiclens.pipeline.report import write_report
from magiclens.pipeline.writers import WriterRejected
from magiclens.pipeline.writers.chat import (
    CAPTIONER_BACKENDS,
    WRITER_BACKENDS,
    GenerationModelHandler,
    GenerationTask,
    RejectFailedBatch,
    TokenCounters,
    make_backend,
)
from magiclens.pipeline.writers.prompt import CAPTION, INSTRUCTION, Prompt, instruction_request, load_prompt
from magiclens.pipeline.writers.template import TemplateWriter
from magiclens.pipeline.writers.validate import check_instructions, parse_answer, raw_output

LOG = logging.getLogger("magiclens.instruct")

STAGE = "instruct"
INSTRUCTIONS_STAGE = "instructions"
# The template writer's answers: rule-built, so only their shape is checked.
TEMPLATE_ANSWER_SCHEMA = {
    "type": "object",
    "required": ["instructions"],
    "properties": {"instructions": {"type": "array", "items": {"type": "string"}}},
}


@dataclass(frozen=True)
class WriterSpec:
    """What the writer steps need to know, picklable for the workers."""

    writer_id: str  # backend:model, recorded in every triplet
    prompt: Prompt | None  # None for the template writer
    count: int  # instructions per pair
    seed: int
    captioned: bool  # a captioner ran: a pair whose images lack captions is rejected

    @property
    def prompt_id(self) -> str:
        return self.prompt.prompt_id if self.prompt else TemplateWriter.prompt_id


def stable_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def triplet_rows(pair: dict, instructions: list[str], spec: WriterSpec) -> list[dict]:
    """Rows of the triplets schema (pipeline/schemas.py) for one pair."""
    return [
        {
            "triplet_id": stable_id(pair["pair_id"], spec.prompt_id, spec.writer_id, str(index)),
            "query_image": pair["query_image"],
            "instruction": instruction,
            "target_image": pair["target_image"],
            "pair_id": pair["pair_id"],
            "page_url": pair["page_url"],
            "query_url": pair["query_url"],
            "target_url": pair["target_url"],
            "query_caption": pair.get("query_caption"),
            "target_caption": pair.get("target_caption"),
            "prompt_id": spec.prompt_id,
            "writer": spec.writer_id,
        }
        for index, instruction in enumerate(instructions)
    ]


class BuildWriterTasks(beam.DoFn):
    """A pair -> the writer's task (its rendered prompt), or a reject when a caption it needs is missing."""

    def __init__(self, spec: WriterSpec):
        self.spec = spec

    def setup(self):
        self.pairs = StageCounters(STAGE)

    def process(self, pair: dict):
        self.pairs.received()
        pair_id = pair.get("pair_id") or ""
        if self.spec.captioned and not (pair.get("query_caption") and pair.get("target_caption")):
            missing = [side for side in ("query", "target") if not pair.get(f"{side}_caption")]
            detail = ", ".join(f"{side} image {pair.get(f'{side}_sha256')}" for side in missing)
            yield self.pairs.reject(pair_id, "missing_caption", f"no caption for the {detail}; see the captions rejects")
            return
        request = instruction_request(self.spec.prompt, pair, self.spec.count, self.spec.seed) if self.spec.prompt else None
        yield GenerationTask(key=pair_id, request=request, payload=pair)


class TripletsFromGenerations(beam.DoFn):
    """A writer's answer for a pair -> triplets, or counted rejects with the reason and the raw output."""

    def __init__(self, spec: WriterSpec):
        self.spec = spec

    def setup(self):
        self.pairs = StageCounters(STAGE)
        self.instructions = StageCounters(INSTRUCTIONS_STAGE)
        self.triplets = beam.metrics.Metrics.counter("magiclens", "outputs.triplets")
        self.tokens = TokenCounters("writer")

    def process(self, result: PredictionResult):
        task, generation = result.example, result.inference
        pair, prompt = task.payload, self.spec.prompt
        self.tokens.add(result)
        if generation.text is None:
            yield self.pairs.reject(task.key, generation.failure, generation.detail)
            return
        try:
            answer = parse_answer(generation.text, prompt.output_schema if prompt else TEMPLATE_ANSWER_SCHEMA)
        except WriterRejected as rejected:
            yield self.pairs.reject(task.key, rejected.reason, rejected.detail)
            return
        if prompt:
            kept, rejected = check_instructions(answer, pair, self.spec.count, prompt.min_words, prompt.max_words)
        else:
            kept, rejected = answer["instructions"][: self.spec.count], []
        self.instructions.received(len(kept) + len(rejected))
        self.instructions.kept(len(kept))
        for index, (instruction, reason) in enumerate(rejected):
            detail = f"{instruction!r} in the answer {raw_output(generation.text)}"
            yield self.instructions.reject(f"{task.key}/{index}", reason, detail)
        if not kept:
            reason = "no_valid_instruction" if answer["instructions"] else "model_declined"
            yield self.pairs.reject(task.key, reason, raw_output(generation.text))
            return
        self.pairs.kept()
        for row in triplet_rows(pair, kept, self.spec):
            self.triplets.inc()
            yield row


def pairs_pattern(path: str) -> str:
    """A pairs directory means its Parquet files; anything else is taken as a glob."""
    if path.endswith(".parquet") or any(ch in path for ch in "*?["):
        return path
    return FileSystems.join(path, "*.parquet")


def build_pipeline(pipeline: beam.Pipeline, args: argparse.Namespace) -> WriterSpec:
    """The instruct pipeline for checked command-line arguments (see add_arguments, check_arguments)."""
    writer = make_backend(args.writer, args, "writer")
    prompt = None if args.writer == "template" else load_prompt(args.prompt, INSTRUCTION)
    spec = WriterSpec(writer.backend_id, prompt, args.instructions_per_pair, args.seed, args.captioner != "none")
    pairs = pipeline | "ReadPairs" >> ReadFromParquet(pairs_pattern(args.pairs))
    rejects = []
    if args.captioner != "none":
        captioner = make_backend(args.captioner, args, "captioner")
        caption_prompt = load_prompt(args.caption_prompt, CAPTION)
        captions, caption_rejects = pairs | "Captions" >> CaptionImages(
            args.captions, captioner, caption_prompt, args.batch_size, args.seed
        )
        pairs = pairs | "AttachCaptions" >> AttachCaptions(captions)
        rejects.append(caption_rejects)
    tasks = pairs | "WriterTasks" >> beam.ParDo(BuildWriterTasks(spec)).with_outputs(REJECTS_TAG, main="tasks")
    handler = GenerationModelHandler(writer, args.batch_size, "magiclens_writer")
    generated, dead_letters = tasks.tasks | "Write" >> RunInference(handler).with_exception_handling()
    written = generated | "Check" >> beam.ParDo(TripletsFromGenerations(spec)).with_outputs(REJECTS_TAG, main="triplets")
    failed = dead_letters.failed_inferences | "FailedBatches" >> beam.ParDo(RejectFailedBatch(STAGE))
    rejects += [tasks[REJECTS_TAG], written[REJECTS_TAG], failed]
    written.triplets | "WriteTriplets" >> WriteToParquet(
        FileSystems.join(args.output, "triplets", "part"), schemas.TRIPLETS, file_name_suffix=".parquet"
    )
    (
        rejects
        | "AllRejects" >> beam.Flatten()
        | "RejectRows" >> beam.Map(Reject.as_row)
        | "WriteRejects"
        >> WriteToParquet(FileSystems.join(args.output, "rejects", "part"), schemas.REJECTS, file_name_suffix=".parquet")
    )
    return spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write instructions for mined pairs. Reads PAIRS (a pairs directory or glob) and the caption cache, "
        "writes OUTPUT/triplets/*.parquet, OUTPUT/rejects/ and OUTPUT/stats.json. To get a new triplet set, "
        "write a new prompt version and run again: nothing is mined, fetched or captioned again. Unlisted "
        "arguments are Beam pipeline options; the default runner is Beam's in-process FnApiRunner."
    )
    parser.add_argument("--pairs", required=True, metavar="DIR_OR_GLOB", help="pairs written by `magiclens mine` (DIR/pairs)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (local, gs://, s3://)")
    parser.add_argument("--writer", default="template", choices=WRITER_BACKENDS,
                        help="instruction writer: template (rule-based, offline; default), openai (an OpenAI-compatible "
                             "endpoint), vllm (vLLM offline engine on this machine's GPUs), transformers (local Hugging Face model)")
    parser.add_argument("--prompt", default="instruct", metavar="NAME_OR_FILE",
                        help="instruction prompt: a shipped prompt name (prompts/NAME.yaml) or a YAML file (default: instruct); "
                             "ignored by the template writer")
    parser.add_argument("--captioner", default="none", choices=CAPTIONER_BACKENDS,
                        help="captioner for the pairs' images: none (alt text and nearby text only; default), openai, vllm, "
                             "transformers (an image-text-to-text model)")
    parser.add_argument("--caption-prompt", default="caption", metavar="NAME_OR_FILE",
                        help="caption prompt: a shipped prompt name or a YAML file (default: caption)")
    parser.add_argument("--captions", metavar="DIR",
                        help="caption cache, a Parquet dataset keyed by image sha256, captioner and caption prompt "
                             "(default: captions/ beside the pairs directory)")
    parser.add_argument("--instructions-per-pair", type=int, default=1, metavar="N",
                        help="write up to N triplets per pair, each with its own instruction (default 1)")
    model = parser.add_argument_group("model backends (openai, vllm, transformers)")
    model.add_argument("--model", metavar="NAME",
                       help="the writer's model: the served model name (openai), or a local path or hub id (vllm, transformers)")
    model.add_argument("--caption-model", metavar="NAME", help="the captioner's model (default: --model)")
    model.add_argument("--endpoint", metavar="URL",
                       help="OpenAI-compatible API base for --writer openai, e.g. http://127.0.0.1:8000/v1")
    model.add_argument("--caption-endpoint", metavar="URL", help="API base for --captioner openai (default: --endpoint)")
    model.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="environment variable holding the API key, read on the workers (default OPENAI_API_KEY; "
                            "unset means no key, as local servers need)")
    model.add_argument("--concurrency", type=int, default=8, metavar="N",
                       help="openai: requests in flight at once per worker process (default 8)")
    model.add_argument("--max-retries", type=int, default=5, metavar="N",
                       help="openai: retries of a request after 429, 5xx, a timeout or a dropped connection (default 5)")
    model.add_argument("--retry-backoff", type=float, default=1.0, metavar="SECONDS",
                       help="openai: first retry delay, doubled each retry, with jitter; Retry-After wins (default 1.0)")
    model.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="openai: time allowed for one request (default 120)")
    model.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="elements per RunInference batch (default 32)")
    model.add_argument("--device", default="auto", metavar="DEVICE",
                       help="transformers: torch device, e.g. cpu or cuda:0 (default auto: cuda when available)")
    model.add_argument("--vllm-arg", action="append", metavar="KEY=VALUE",
                       help="vllm: an engine argument of vllm.LLM, repeatable, e.g. tensor_parallel_size=2 or max_model_len=8192")
    model.add_argument("--seed", type=int, default=0,
                       help="seed of the few-shot sampling and of generation; per element, so reruns repeat (default 0)")


def check_arguments(args: argparse.Namespace) -> None:
    """Fail before the pipeline starts, with what to do, on anything the workers would trip on."""
    if args.instructions_per_pair < 1:
        raise SystemExit(f"--instructions-per-pair must be at least 1, got {args.instructions_per_pair}")
    for flag in ("concurrency", "batch_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_retries < 0:
        raise SystemExit("--max-retries must be 0 or more")
    pattern = pairs_pattern(args.pairs)
    if not FileSystems.match([pattern])[0].metadata_list:
        raise SystemExit(f"--pairs {args.pairs!r}: no Parquet files match {pattern!r}; run `magiclens mine` first")
    if args.captioner != "none" and not args.captions and not default_captions_dir(args.pairs):
        raise SystemExit("--pairs is a glob or a file: give the caption cache directory with --captions DIR")
    if "vllm" in (args.writer, args.captioner):
        from magiclens.pipeline.writers.vllm import import_vllm

        import_vllm()
    if "openai" in (args.writer, args.captioner) and args.api_key_env and not os.environ.get(args.api_key_env):
        LOG.warning("%s is not set: sending requests without an API key (fine for local servers)", args.api_key_env)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    configure_logging()
    check_arguments(args)
    if args.captioner != "none":
        args.captions = args.captions or default_captions_dir(args.pairs)
    options = pipeline_options(extra)
    started = time.time()
    pipeline = beam.Pipeline(options=options)
    prompt_id = build_pipeline(pipeline, args).prompt_id
    result = pipeline.run()
    template = options.view_as(GoogleCloudOptions).template_location
    if template:
        print(f"Dataflow template written: {template}")
        return 0
    result.wait_until_finish()
    stats = stats_from_counters(counters_from_result(result))
    write_json(
        FileSystems.join(args.output, "stats.json"),
        {
            "command": "instruct",
            "pairs": args.pairs,
            "writer": args.writer,
            "model": args.model,
            "prompt_id": prompt_id,
            "captioner": args.captioner,
            "captions": args.captions,
            "instructions_per_pair": args.instructions_per_pair,
            "seconds": round(time.time() - started, 2),
            "stages": stats,
        },
    )
    entry = stats.get(STAGE, {})
    triplets = stats.get("outputs", {}).get("triplets", 0)
    print(f"triplets written: {triplets} ({prompt_id})  ->  {FileSystems.join(args.output, 'triplets')}")
    print(f"  pairs in {entry.get('in', 0)}, with instructions {entry.get('out', 0)}, "
          f"rejected {entry.get('rejected_total', 0)} {entry.get('rejected', {})}")
    if args.captioner != "none":
        captions = stats.get("captions", {})
        print(f"  captions: {captions.get('from_cache', 0)} from the cache, {captions.get('in', 0)} captioned now "
              f"({captions.get('out', 0)} kept, rejected {captions.get('rejected', {})})  cache: {args.captions}")
    print(f"stats: {FileSystems.join(args.output, 'stats.json')}")
    print(f"report: {write_report(args.output)}")
    broken = unbalanced_stages(stats)
    if broken:
        LOG.error("stages whose counts do not balance: %s", ", ".join(broken))
        return 1
    return 0
