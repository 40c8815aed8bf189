"""`magiclens mine` composed from the stage modules, each of which owns its Beam code (see the
package docstring for the data flow); here the stages are only wired together and the run is
summarised. Per-file work (read .. post-decode) is persisted by pipeline/mine/work.py so a run
resumes and an output grows by file; fetching, dedupe and pairing run over all files; the run's
output is committed by pipeline/output.py."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import WriteToParquet
from apache_beam.options.pipeline_options import GoogleCloudOptions

from magiclens.pipeline import schemas
from magiclens.pipeline.accounting import (
    REJECTS_TAG,
    counters_from_result,
    stats_from_counters,
    write_json,
)
from magiclens.pipeline.beam_options import configure_logging, pipeline_options
from magiclens.pipeline.card import write_card
from magiclens.pipeline.commoncrawl import inputs_from_args, is_http_url
from magiclens.pipeline.dedupe import DedupeAndPair
from magiclens.pipeline.fetch import FETCHED_TAG, FetchConfig, FetchImages
from magiclens.pipeline.images.stage import TO_FETCH_TAG, AttachFetched
from magiclens.pipeline.mine.config import MineConfig, config_from_args
from magiclens.pipeline.mine.work import (
    FILES_NAME,
    MineWarcFiles,
    ReplayFileWork,
    WarcFile,
    file_funnel,
    finished_keys,
    warc_files,
    work_root,
)
from magiclens.pipeline.output import begin_run, check_filesystem_available, check_writable, local_path
from magiclens.pipeline.postdecode import CheckDecodedImages
from magiclens.pipeline.preflight import run_exit_status
from magiclens.pipeline.records import Reject
from magiclens.pipeline.report import REPORT_NAME, write_report

LOG = logging.getLogger("magiclens.mine")


_PAIRS_WRITTEN = beam.metrics.Metrics.counter("magiclens", "outputs.pairs")


def _count_written(row: dict) -> dict:
    _PAIRS_WRITTEN.inc()
    return row


def fetch_images(to_fetch, config: FetchConfig) -> dict:
    """(candidates, PageRef) of the references not found in their WARC file -> {"images": (page URL,
    PageImage), REJECTS_TAG: the fetch stage's rejects (one per image) and the references' rejects}.

    Corpus-wide, grouped by host across all files (per-host politeness holds for the whole run);
    each image is fetched once, trying its candidate URLs largest first."""
    fetched = (
        to_fetch
        | "FetchElements" >> beam.Keys()
        | "DistinctElements" >> beam.Distinct()
        | "Fetch" >> FetchImages(config)
    )
    by_first_candidate = {
        "refs": to_fetch | "RefsByFirst" >> beam.Map(lambda item: (item[0][0], item[1])),
        "fetched": fetched[FETCHED_TAG] | "FetchedByFirst" >> beam.Map(lambda item: (item[0][0], item[1])),
        "failed": fetched[REJECTS_TAG] | "FailedByFirst" >> beam.Map(lambda reject: (reject.element_id, reject)),
    }
    attached = (
        by_first_candidate
        | "JoinFetched" >> beam.CoGroupByKey()
        | "Attach" >> beam.ParDo(AttachFetched()).with_outputs(REJECTS_TAG, main="images")
    )
    rejects = (fetched[REJECTS_TAG], attached[REJECTS_TAG]) | "FetchRejects" >> beam.Flatten()
    return {"images": attached.images, REJECTS_TAG: rejects}


def build_pipeline(pipeline: beam.Pipeline, config: MineConfig, files: list[WarcFile], finished: set[str],
                   destination: str) -> None:
    """Mine the files whose work is not `finished`, then run the corpus-wide steps over the work of
    every file in `files`, writing pairs/ and rejects/ under `destination`."""
    root = work_root(config.output, config)
    done = [FileSystems.join(root, warc.key) for warc in files if warc.key in finished]
    mined = (
        pipeline
        | "FilesToMine" >> beam.Create([warc for warc in files if warc.key not in finished])
        | "SpreadFiles" >> beam.Reshuffle()
        | "MineWarcFiles" >> beam.ParDo(MineWarcFiles(config, root))
    )
    replayed = (
        (mined, pipeline | "FilesDone" >> beam.Create(done))
        | "AllFileWork" >> beam.Flatten()
        | "SpreadWork" >> beam.Reshuffle()
        | "ReplayFileWork" >> beam.ParDo(ReplayFileWork()).with_outputs(REJECTS_TAG, TO_FETCH_TAG, main="images")
    )
    images, rejects = [replayed.images], []
    if config.fetch is not None:
        fetched = fetch_images(replayed[TO_FETCH_TAG], config.fetch)
        checked = fetched["images"] | "CheckFetched" >> beam.ParDo(
            CheckDecodedImages(config.filters.decoded)).with_outputs(REJECTS_TAG, main="images")
        images.append(checked.images)
        rejects += [fetched[REJECTS_TAG], checked[REJECTS_TAG]]
    paired = images | "AllImages" >> beam.Flatten() | "DedupeAndPair" >> DedupeAndPair(
        config.pairing, config.filters.dedupe)
    rejects.append(paired[REJECTS_TAG])
    pairs = paired["pairs"]
    if config.filters.clip_model or config.filters.nsfw_model:
        from magiclens.pipeline.scores import ModelFilters  # imports torch: only when a model is asked for

        scored = pairs | "ModelFilters" >> ModelFilters(config.filters)
        pairs = scored["pairs"]
        rejects.append(scored[REJECTS_TAG])
    (
        pairs
        | "CountPairs" >> beam.Map(_count_written)
        | "WritePairs" >> WriteToParquet(
            FileSystems.join(destination, "pairs", "part"), schemas.PAIRS, file_name_suffix=".parquet"
        )
    )
    rows = rejects | "AllRejects" >> beam.Flatten() | "RejectRows" >> beam.Map(Reject.as_row)
    (
        (rows, replayed[REJECTS_TAG])
        | "RejectsWithFileWork" >> beam.Flatten()
        | "WriteRejects"
        >> WriteToParquet(FileSystems.join(destination, "rejects", "part"), schemas.REJECTS, file_name_suffix=".parquet")
    )


def check_inputs_exist(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        if is_http_url(pattern):
            continue
        check_filesystem_available(pattern, "--input")
        if not FileSystems.match([pattern])[0].metadata_list:
            raise SystemExit(f"--input {pattern!r} matches no file")


def _summary(args: argparse.Namespace, config: MineConfig, inputs: list[str], stats: dict, seconds: float,
             files: list[WarcFile], finished: set[str]) -> dict:
    described = asdict(config)
    # A whole crawl is tens of thousands of URLs: record the crawl and a count instead.
    described["inputs"] = list(args.input or [])
    if args.crawl:
        described["crawl"] = {"id": args.crawl, "warc_files": len(inputs) - len(described["inputs"])}
    reused = sum(warc.key in finished for warc in files)
    return {"command": "mine", "config": described, "seconds": round(seconds, 2), "stages": stats,
            "warc_files": {"total": len(files), "read_now": len(files) - reused, "reused": reused}}


def _print_stats(output: str, stats: dict) -> None:
    pairs = stats.get("outputs", {}).get("pairs", 0)
    print(f"pairs written: {pairs}  ->  {FileSystems.join(output, 'pairs')}")
    for name, entry in stats.items():
        if "balanced" in entry:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(entry["rejected"].items()))
            print(f"  {name:<12} in {entry['in']:>7}  out {entry['out']:>7}  rejected {entry['rejected_total']:>7}"
                  + (f"  ({reasons})" if reasons else ""))
    print(f"stats: {FileSystems.join(output, 'stats.json')}  rejects: {FileSystems.join(output, 'rejects')}")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    configure_logging()
    args.input = [local_path(path) for path in args.input or []] or None
    args.output = local_path(args.output)
    inputs = inputs_from_args(args)
    if args.dry_run:
        print("\n".join(inputs))
        return 0
    config = config_from_args(args, inputs)
    check_inputs_exist(config.inputs)
    options = pipeline_options(extra)
    template = options.view_as(GoogleCloudOptions).template_location
    if template:  # the job runs later, without this process to commit it: it writes in place
        check_writable(config.output)
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, config, warc_files(config.inputs), set(), config.output)
        pipeline.run()
        print(f"Dataflow template written: {template}")
        return 0
    output_run = begin_run(config.output, "mine", args.overwrite)
    try:
        started = time.time()
        files = warc_files(config.inputs)
        finished = finished_keys(work_root(config.output, config))
        reused = sum(warc.key in finished for warc in files)
        LOG.info("%d WARC file(s): %d to read, %d finished before (their work is reused)", len(files),
                 len(files) - reused, reused)
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, config, files, finished, output_run.temp)
        result = pipeline.run()
        result.wait_until_finish()
        stats = stats_from_counters(counters_from_result(result))
        summary = _summary(args, config, inputs, stats, time.time() - started, files, finished)
        write_json(FileSystems.join(output_run.temp, "stats.json"), summary)
        write_json(FileSystems.join(output_run.temp, FILES_NAME), file_funnel(files, work_root(config.output, config)))
        write_report(output_run.temp, shown_as=config.output)
        write_card(output_run.temp, summary)
        output_run.commit()
    except BaseException:
        output_run.abandon()
        raise
    _print_stats(config.output, stats)
    print(f"report: {FileSystems.join(config.output, REPORT_NAME)}")
    return run_exit_status("mine", stats, "pairs")
