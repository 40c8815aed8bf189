"""`magiclens instruct`: pairs -> triplets (query image, instruction, target image).

A pipeline of its own that reads only the pairs dataset and the caption cache: writing triplets
again with a new prompt or writer never repeats crawling, fetching or dedupe, and never captions an
image again for the same captioner and caption prompt (see pipeline/captions.py).

  pairs -> [captions: cache or captioner] -> writer tasks -> RunInference(writer) -> checked answers
  (the rule-based template writer runs in a plain ParDo instead: no RunInference, which imports torch)
        -> OUTPUT/triplets/*.parquet, OUTPUT/rejects/, OUTPUT/stats.json

Stages in stats.json: `captions` (images that needed a caption), `instruct` (pairs), `instructions`
(each instruction a model wrote), plus token counts reported by the backends.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, replace

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet, WriteToParquet
from apache_beam.options.pipeline_options import GoogleCloudOptions

from magiclens.pipeline import schemas
from magiclens.pipeline.accounting import (
    REJECTS_TAG,
    CheckStage,
    Problem,
    StageCounters,
    counters_from_result,
    stats_from_counters,
    write_json,
)
from magiclens.pipeline.beam_options import configure_logging, pipeline_options
from magiclens.pipeline.card import write_card
from magiclens.pipeline.captions import AttachCaptions, CaptionImages, default_captions_dir
from magiclens.pipeline.hashing import stable_hash
from magiclens.pipeline.preflight import run_exit_status
from magiclens.pipeline.instruct_arguments import add_arguments  # noqa: F401 - re-exported
from magiclens.pipeline.records import Reject
from magiclens.pipeline.output import begin_run, check_writable, require_committed_dataset
from magiclens.pipeline.report import REPORT_NAME, write_report
from magiclens.pipeline.writers import BackendConfig, WriterRejected, make_backend
from magiclens.pipeline.writers.chat import (
    GenerateInProcess,
    GenerationBackend,
    GenerationResult,
    GenerationTask,
    RejectFailedBatch,
    TokenCounters,
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
class InstructConfig:
    """`magiclens instruct`'s settings, checked and complete (defaults resolved) before the run."""

    pairs: str
    output: str
    writer: BackendConfig
    captioner: BackendConfig | None  # None: no captioner, alt text and nearby text only
    prompt: str  # prompt name or file of the instruction writer (unused by the template writer)
    caption_prompt: str
    captions: str | None  # the caption cache directory; None without a captioner
    instructions_per_pair: int = 1
    batch_size: int = 32
    seed: int = 0


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


def triplet_rows(pair: dict, instructions: list[str], spec: WriterSpec) -> list[dict]:
    """Rows of the triplets schema (pipeline/schemas.py) for one pair."""
    return [
        {
            "triplet_id": stable_hash(pair["pair_id"], spec.prompt_id, spec.writer_id, str(index)),
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
            # the pair's provenance and descriptions; None for columns a pairs dataset of an older schema lacks
            **{column: pair.get(column) for column in schemas.PAIR_COLUMNS_IN_TRIPLETS},
        }
        for index, instruction in enumerate(instructions)
    ]


class BuildWriterTasks(CheckStage):
    """A pair -> the writer's task (its rendered prompt), or a reject when a caption it needs is missing.

    The first step of stage `instruct`: TripletsFromGenerations counts the pairs the stage keeps.
    """

    stage = STAGE
    counts_kept = False

    def __init__(self, spec: WriterSpec):
        self.spec = spec

    def problem(self, pair: dict) -> Problem:
        if self.spec.captioned and not (pair.get("query_caption") and pair.get("target_caption")):
            missing = [side for side in ("query", "target") if not pair.get(f"{side}_caption")]
            detail = ", ".join(f"{side} image {pair.get(f'{side}_sha256')}" for side in missing)
            return "missing_caption", f"no caption for the {detail}; see the captions rejects"
        return None

    def element_id(self, pair: dict) -> str:
        return pair.get("pair_id") or ""

    def output(self, pair: dict) -> GenerationTask:
        request = instruction_request(self.spec.prompt, pair, self.spec.count, self.spec.seed) if self.spec.prompt else None
        return GenerationTask(key=self.element_id(pair), request=request, payload=pair)


class TripletsFromGenerations(beam.DoFn):
    """A writer's answer for a pair -> triplets, or counted rejects with the reason and the raw output."""

    def __init__(self, spec: WriterSpec):
        self.spec = spec

    def setup(self):
        self.pairs = StageCounters(STAGE)
        self.instructions = StageCounters(INSTRUCTIONS_STAGE)
        self.triplets = beam.metrics.Metrics.counter("magiclens", "outputs.triplets")
        self.tokens = TokenCounters("writer")

    def process(self, result: GenerationResult):
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


def pairs_location(path: str) -> str:
    """A `magiclens mine` output directory stands for its pairs/ folder; anything else is kept."""
    if path.endswith(".parquet") or any(ch in path for ch in "*?["):
        return path
    inner = FileSystems.join(path, "pairs")
    return inner if FileSystems.match([FileSystems.join(inner, "*.parquet")])[0].metadata_list else path


def pairs_pattern(path: str) -> str:
    """A pairs directory means its Parquet files; anything else is taken as a glob."""
    if path.endswith(".parquet") or any(ch in path for ch in "*?["):
        return path
    return FileSystems.join(path, "*.parquet")


def build_pipeline(pipeline: beam.Pipeline, config: InstructConfig) -> WriterSpec:
    """The instruct pipeline for a checked configuration (see config_from_args)."""
    writer = make_backend(config.writer)
    prompt = None if config.writer.name == "template" else load_prompt(config.prompt, INSTRUCTION)
    spec = WriterSpec(writer.backend_id, prompt, config.instructions_per_pair, config.seed, config.captioner is not None)
    pairs = pipeline | "ReadPairs" >> ReadFromParquet(pairs_pattern(config.pairs))
    rejects = []
    if config.captioner is not None:
        captioner = make_backend(config.captioner)
        caption_prompt = load_prompt(config.caption_prompt, CAPTION)
        captioned = pairs | "Captions" >> CaptionImages(
            config.captions, captioner, caption_prompt, config.batch_size, config.seed
        )
        pairs = pairs | "AttachCaptions" >> AttachCaptions(captioned["captions"])
        rejects.append(captioned[REJECTS_TAG])
    tasks = pairs | "WriterTasks" >> beam.ParDo(BuildWriterTasks(spec)).with_outputs(REJECTS_TAG, main="tasks")
    generated, failed = _write(tasks.tasks, writer, config)
    written = generated | "Check" >> beam.ParDo(TripletsFromGenerations(spec)).with_outputs(REJECTS_TAG, main="triplets")
    rejects += [tasks[REJECTS_TAG], written[REJECTS_TAG], failed]
    written.triplets | "WriteTriplets" >> WriteToParquet(
        FileSystems.join(config.output, "triplets", "part"), schemas.TRIPLETS, file_name_suffix=".parquet"
    )
    (
        rejects
        | "AllRejects" >> beam.Flatten()
        | "RejectRows" >> beam.Map(Reject.as_row)
        | "WriteRejects"
        >> WriteToParquet(FileSystems.join(config.output, "rejects", "part"), schemas.REJECTS, file_name_suffix=".parquet")
    )
    return spec


def _write(tasks: beam.PCollection, writer: GenerationBackend, config: InstructConfig) -> tuple[beam.PCollection, beam.PCollection]:
    """The writer's GenerationResults, and the rejects of the batches it failed on."""
    if config.writer.name == "template":
        written = tasks | "Write" >> GenerateInProcess(writer, config.batch_size, STAGE)
        return written.generated, written[REJECTS_TAG]
    from apache_beam.ml.inference.base import RunInference

    from magiclens.pipeline.writers.inference import GenerationModelHandler

    handler = GenerationModelHandler(writer, config.batch_size, "magiclens_writer")
    generated, dead_letters = tasks | "Write" >> RunInference(handler).with_exception_handling()
    return generated, dead_letters.failed_inferences | "FailedBatches" >> beam.ParDo(RejectFailedBatch(STAGE))


def _backend(args: argparse.Namespace, role: str) -> BackendConfig:
    captioner = role == "captioner"
    return BackendConfig(
        name=args.captioner if captioner else args.writer,
        role=role,
        model=(args.caption_model if captioner else None) or args.model,
        endpoint=(args.caption_endpoint if captioner else None) or args.endpoint,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        request_timeout_s=args.request_timeout,
        request_deadline_s=args.request_deadline,
        max_answer_bytes=args.max_answer_bytes,
        retry_backoff_s=args.retry_backoff,
        vllm_args=tuple(args.vllm_arg or ()),
        device=args.device,
        instructions_per_pair=args.instructions_per_pair,
    )


def config_from_args(args: argparse.Namespace) -> InstructConfig:
    """Check the arguments and build the configuration; SystemExit with what to do on anything the
    workers would trip on, before the pipeline starts."""
    if args.instructions_per_pair < 1:
        raise SystemExit(f"--instructions-per-pair must be at least 1, got {args.instructions_per_pair}")
    for flag in ("concurrency", "batch_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_retries < 0:
        raise SystemExit("--max-retries must be 0 or more")
    args.pairs = pairs_location(args.pairs)
    pattern = pairs_pattern(args.pairs)
    if pattern != args.pairs:  # a directory: only the committed output of a finished `mine`
        require_committed_dataset(args.pairs, "--pairs", "`magiclens mine`")
    if not FileSystems.match([pattern])[0].metadata_list:
        raise SystemExit(f"--pairs {args.pairs!r}: no Parquet files match {pattern!r}; run `magiclens mine` first")
    captioned = args.captioner != "none"
    captions = (args.captions or default_captions_dir(args.pairs)) if captioned else None
    if captioned and not captions:
        raise SystemExit("--pairs is a glob or a file: give the caption cache directory with --captions DIR")
    if "vllm" in (args.writer, args.captioner):
        from magiclens.pipeline.writers.vllm import import_vllm

        import_vllm()
    if "openai" in (args.writer, args.captioner):
        from magiclens.pipeline.preflight import check_endpoint_reachable

        if args.writer == "openai" and args.endpoint:
            check_endpoint_reachable(args.endpoint)
        if args.captioner == "openai" and (args.caption_endpoint or args.endpoint):
            check_endpoint_reachable(args.caption_endpoint or args.endpoint, "--caption-endpoint")
    if "openai" in (args.writer, args.captioner) and args.api_key_env and not os.environ.get(args.api_key_env):
        LOG.warning("%s is not set: sending requests without an API key (fine for local servers)", args.api_key_env)
    return InstructConfig(
        pairs=args.pairs,
        output=args.output,
        writer=_backend(args, "writer"),
        captioner=_backend(args, "captioner") if captioned else None,
        prompt=args.prompt,
        caption_prompt=args.caption_prompt,
        captions=captions,
        instructions_per_pair=args.instructions_per_pair,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    configure_logging()
    config = config_from_args(args)
    options = pipeline_options(extra)
    template = options.view_as(GoogleCloudOptions).template_location
    if template:  # the job runs later, without this process to commit it: it writes in place
        check_writable(config.output)
    output_run = None if template else begin_run(config.output, "instruct", args.overwrite)
    try:
        started = time.time()
        pipeline = beam.Pipeline(options=options)
        prompt_id = build_pipeline(pipeline, replace(config, output=output_run.temp) if output_run else config).prompt_id
        result = pipeline.run()
        if template:
            print(f"Dataflow template written: {template}")
            return 0
        result.wait_until_finish()
        stats = stats_from_counters(counters_from_result(result))
        _write_stats(output_run.temp, config, prompt_id, stats, time.time() - started)
        write_report(output_run.temp, shown_as=config.output)
        output_run.commit()
    except BaseException:
        if output_run is not None:
            output_run.abandon()
        raise
    entry = stats.get(STAGE, {})
    triplets = stats.get("outputs", {}).get("triplets", 0)
    print(f"triplets written: {triplets} ({prompt_id})  ->  {FileSystems.join(config.output, 'triplets')}")
    print(f"  pairs in {entry.get('in', 0)}, with instructions {entry.get('out', 0)}, "
          f"rejected {entry.get('rejected_total', 0)} {entry.get('rejected', {})}")
    if config.captioner is not None:
        captions = stats.get("captions", {})
        print(f"  captions: {captions.get('from_cache', 0)} from the cache, {captions.get('in', 0)} captioned now "
              f"({captions.get('out', 0)} kept, rejected {captions.get('rejected', {})})  cache: {config.captions}")
    print(f"stats: {FileSystems.join(config.output, 'stats.json')}")
    print(f"report: {FileSystems.join(config.output, REPORT_NAME)}")
    return run_exit_status("instruct", stats, "triplets")


def _write_stats(folder: str, config: InstructConfig, prompt_id: str, stats: dict, seconds: float) -> None:
    """stats.json and the dataset card (README.md)."""
    summary = {
        "command": "instruct",
        "pairs": config.pairs,
        "writer": config.writer.name,
        "model": config.writer.model,
        "prompt_id": prompt_id,
        "captioner": config.captioner.name if config.captioner else "none",
        "captions": config.captions,
        "instructions_per_pair": config.instructions_per_pair,
        "seconds": round(seconds, 2),
        "stages": stats,
    }
    write_json(FileSystems.join(folder, "stats.json"), summary)
    write_card(folder, summary)
