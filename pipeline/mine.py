"""`magiclens mine`: WARC files -> same-page image pairs (pairs/*.parquet), rejects/, stats.json, report.html.

The stages are plain functions in their own modules; this module composes them with Beam:

  WARC files (warc) -> pages -> image refs (extract, filters) --by image URL--> images (images)
           \-> image records ------------------------------------/        \-> fetch (fetch)
  -> post-decode checks (postdecode) -> corpus clusters, per-page dedupe, pairs (dedupe, pairs)
  -> optional NSFW and CLIP scores (scores) -> pairs/*.parquet

Every stage counts what it received, kept and rejected (pipeline/accounting.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import WriteToParquet
from apache_beam.options.pipeline_options import GoogleCloudOptions

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
from magiclens.pipeline.commoncrawl import add_crawl_arguments, inputs_from_args, is_http_url
from magiclens.pipeline.dedupe import DedupeAndPair
from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.fetch import FetchConfig, FetchImages, add_fetch_arguments
from magiclens.pipeline.filters import FilterConfig, add_filter_arguments, filter_page_refs
from magiclens.pipeline.images import ImageRejected, normalize_image
from magiclens.pipeline.pairs import PageImage, PageInfo, PairingConfig
from magiclens.pipeline.postdecode import CheckDecodedImages
from magiclens.pipeline.records import ImageRef, Page, PageImages, Reject
from magiclens.pipeline.report import write_report
from magiclens.pipeline.robots import robots_meta_opt_out, tdm_reserved, x_robots_opt_out
from magiclens.pipeline.warc import FILE_PROBLEMS, ReadLimits, SkippedRecord, read_warc

LOG = logging.getLogger("magiclens.mine")

PAGES_TAG = "pages"
IMAGES_TAG = "images"
TO_FETCH_TAG = "to_fetch"


@dataclass(frozen=True)
class ImageConfig:
    max_side: int = 512
    min_side: int = 150
    max_aspect: float = 3.0
    jpeg_quality: int = 90


@dataclass(frozen=True)
class MineConfig:
    inputs: tuple[str, ...]
    output: str
    html_parser: str = "lexbor"
    context_chars: int = 300
    image: ImageConfig = field(default_factory=ImageConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    read_limits: ReadLimits = field(default_factory=ReadLimits)
    fetch: FetchConfig | None = None  # None: --no-fetch, only images found in the input
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass(frozen=True)
class PageRef:
    """An image reference with the page it was found on; keyed by image URL between stages."""

    page: PageInfo
    ref: ImageRef


class ReadWarcFiles(beam.DoFn):
    """A matched WARC file -> pages and image records (tagged outputs) and rejects."""

    def __init__(self, limits: ReadLimits):
        self.limits = limits

    def setup(self):
        self.files = StageCounters("warc_files")
        self.records = StageCounters("records")

    def process(self, path: str):
        self.files.received()
        started = time.monotonic()
        broke_off = None
        kinds = {"records": 0, "pages": 0, "images": 0}
        for item in read_warc(path, self.limits):
            if isinstance(item, SkippedRecord) and item.reason in FILE_PROBLEMS:
                broke_off = item
                continue
            self.records.received()
            kinds["records"] += 1
            if isinstance(item, SkippedRecord):
                yield self.records.reject(item.element_id, item.reason, item.detail)
            elif isinstance(item, Page):
                self.records.kept()
                kinds["pages"] += 1
                yield beam.pvalue.TaggedOutput(PAGES_TAG, item)
            else:
                self.records.kept()
                kinds["images"] += 1
                yield beam.pvalue.TaggedOutput(IMAGES_TAG, (item.url, item))
        # Progress of a long run, on any runner: one line per WARC file read.
        LOG.info("read %s: %d records, %d pages, %d images in %.1f s%s", path, kinds["records"], kinds["pages"],
                 kinds["images"], time.monotonic() - started, f" ({broke_off.reason})" if broke_off else "")
        if broke_off is None:
            self.files.kept()
        else:
            yield self.files.reject(path, broke_off.reason, broke_off.detail)


def page_opt_out(page: Page, found: PageImages) -> tuple[str, str] | None:
    """(reason, detail) when the page opts out of AI use of its images: noai, noimageai or tdm."""
    token = x_robots_opt_out([page.x_robots_tag]) if page.x_robots_tag else None
    if token:
        return token, f"X-Robots-Tag: {page.x_robots_tag}"
    for name, content in (("robots", found.meta_robots), ("magiclens", found.meta_magiclens)):
        token = robots_meta_opt_out(content) if content else None
        if token:
            return token, f'<meta name="{name}" content="{content}">'
    if found.meta_tdm_reservation and tdm_reserved(found.meta_tdm_reservation):
        return "tdm", f'<meta name="tdm-reservation" content="{found.meta_tdm_reservation}">'
    return None


class ExtractImageRefs(beam.DoFn):
    """A page -> (image URL, PageRef) for each reference kept; pages with under two are rejected."""

    def __init__(self, config: MineConfig):
        self.config = config

    def setup(self):
        self.pages = StageCounters("pages")
        self.refs = StageCounters("refs")

    def process(self, page: Page):
        self.pages.received()
        try:
            found = extract_images(
                page.html,
                page.url,
                parser=self.config.html_parser,
                charset=page.charset,
                context_chars=self.config.context_chars,
            )
        except Exception as error:  # a parser failure is a reject, never a crash
            yield self.pages.reject(page.url, "parse_error", f"{type(error).__name__}: {error}")
            return
        opt_out = page_opt_out(page, found)
        if opt_out:
            yield self.pages.reject(page.url, opt_out[0], opt_out[1])
            return
        filtered = filter_page_refs(found.refs, found.lang, found.title, self.config.filters.refs)
        if len(filtered.refs) < 2:
            yield self.pages.reject(page.url, "fewer_than_2_images",
                                    f"{len(filtered.refs)} usable image reference(s) of {len(found.refs)}")
            return
        self.pages.kept()
        info = PageInfo(url=page.url, title=found.title, lang=filtered.page_lang, crawl=page.crawl)
        for reason, detail in found.skipped:
            self.refs.received()
            yield self.refs.reject(page.url, reason, detail)
        for dropped in filtered.dropped:
            self.refs.received()
            yield self.refs.reject(f"{page.url} {dropped.ref.url}", dropped.reason, dropped.detail)
        for ref in filtered.refs:
            self.refs.received()
            self.refs.kept()
            yield ref.url, PageRef(info, ref)


def _normalize(data: bytes, config: ImageConfig):
    return normalize_image(
        data,
        max_side=config.max_side,
        min_side=config.min_side,
        max_aspect=config.max_aspect,
        jpeg_quality=config.jpeg_quality,
    )


class ResolveImages(beam.DoFn):
    """(image URL, {refs, records}) -> one PageImage per reference, a reject, or a fetch request.

    An image is decoded once per URL, however many pages show it.
    """

    def __init__(self, config: MineConfig):
        self.config = config

    def setup(self):
        self.images = StageCounters("images")
        self.records = StageCounters("image_records")

    def process(self, element):
        url, grouped = element
        # A page group can be huge (a logo shown on many pages): iterate it, never hold it as a list.
        refs = grouped["refs"]
        records = sorted(grouped["records"], key=lambda record: record.record_id)
        self.records.received(len(records))
        has_refs = any(True for _ in refs)
        for position, record in enumerate(records):
            if not has_refs:
                yield self.records.reject(record.record_id, "unreferenced", url)
            elif position == 0:
                self.records.kept()
            else:
                yield self.records.reject(record.record_id, "duplicate_capture", url)
        if not has_refs:
            return
        if not records:
            for page_ref in refs:
                self.images.received()
                if self.config.fetch is None:
                    yield self.images.reject(f"{page_ref.page.url} {url}", "not_in_input", "--no-fetch")
                else:
                    yield beam.pvalue.TaggedOutput(TO_FETCH_TAG, (url, page_ref))
            return
        try:
            image = _normalize(records[0].data, self.config.image)
        except ImageRejected as rejected:
            for page_ref in refs:
                self.images.received()
                yield self.images.reject(f"{page_ref.page.url} {url}", rejected.reason, rejected.detail)
            return
        for page_ref in refs:
            self.images.received()
            self.images.kept()
            yield page_ref.page.url, PageImage(page_ref.page, page_ref.ref, image)


class AttachFetched(beam.DoFn):
    """(image URL, {refs, fetched, failed}) -> one PageImage per reference, or a reject per reference."""

    def setup(self):
        self.images = StageCounters("images")

    def process(self, element):
        url, grouped = element
        fetched = list(grouped["fetched"])
        failed = list(grouped["failed"])
        for page_ref in grouped["refs"]:
            element_id = f"{page_ref.page.url} {url}"
            if fetched:
                self.images.kept()
                yield page_ref.page.url, PageImage(page_ref.page, page_ref.ref, fetched[0])
            elif failed:
                yield self.images.reject(element_id, failed[0].reason, failed[0].detail)
            else:
                yield self.images.reject(element_id, "fetch_lost", "the fetch stage returned nothing")


_PAIRS_WRITTEN = beam.metrics.Metrics.counter("magiclens", "outputs.pairs")


def _count_written(row: dict) -> dict:
    _PAIRS_WRITTEN.inc()
    return row


def _fetch_images(to_fetch, fetch_config: FetchConfig):
    """Fetch the images not found in the input, once per URL.

    Returns (fetched, failed, rejects): (url, NormalizedImage), (url, Reject) and the fetch stage's
    own rejects (one per URL) for rejects/.
    """
    urls = to_fetch | "FetchUrls" >> beam.Keys() | "DistinctUrls" >> beam.Distinct()
    results = urls | "Fetch" >> FetchImages(fetch_config)
    failed = results[REJECTS_TAG] | "FailedByUrl" >> beam.Map(lambda reject: (reject.element_id, reject))
    return results.fetched, failed, results[REJECTS_TAG]


def build_pipeline(pipeline: beam.Pipeline, config: MineConfig) -> None:
    # Globs are matched by Beam's FileSystems; http(s) URLs (a crawl's WARCs) are read as they are.
    patterns = [path for path in config.inputs if not is_http_url(path)]
    urls = [path for path in config.inputs if is_http_url(path)]
    matched = (
        pipeline
        | "Patterns" >> beam.Create(patterns)
        | "Match" >> fileio.MatchAll()
        | "MatchedPaths" >> beam.Map(lambda metadata: metadata.path)
    )
    files = (
        (matched, pipeline | "Urls" >> beam.Create(urls))
        | "AllFiles" >> beam.Flatten()
        | "SpreadFiles" >> beam.Reshuffle()
    )
    read = files | "ReadWarc" >> beam.ParDo(ReadWarcFiles(config.read_limits)).with_outputs(
        PAGES_TAG, IMAGES_TAG, REJECTS_TAG
    )
    extracted = read[PAGES_TAG] | "Extract" >> beam.ParDo(ExtractImageRefs(config)).with_outputs(
        REJECTS_TAG, main="refs"
    )
    resolved = {"refs": extracted.refs, "records": read[IMAGES_TAG]} | "ByImageUrl" >> beam.CoGroupByKey()
    images = resolved | "Resolve" >> beam.ParDo(ResolveImages(config)).with_outputs(
        TO_FETCH_TAG, REJECTS_TAG, main="page_images"
    )
    page_images = [images.page_images]
    rejects = [read[REJECTS_TAG], extracted[REJECTS_TAG], images[REJECTS_TAG]]
    if config.fetch is not None:
        fetched, failed, fetch_rejects = _fetch_images(images[TO_FETCH_TAG], config.fetch)
        rejects.append(fetch_rejects)
        attached = (
            {"refs": images[TO_FETCH_TAG], "fetched": fetched, "failed": failed}
            | "JoinFetched" >> beam.CoGroupByKey()
            | "Attach" >> beam.ParDo(AttachFetched()).with_outputs(REJECTS_TAG, main="page_images")
        )
        page_images.append(attached.page_images)
        rejects.append(attached[REJECTS_TAG])
    checked = (
        page_images
        | "AllPageImages" >> beam.Flatten()
        | "CheckDecoded" >> beam.ParDo(CheckDecodedImages(config.filters.decoded)).with_outputs(REJECTS_TAG, main="images")
    )
    paired = checked.images | "DedupeAndPair" >> DedupeAndPair(config.pairing, config.filters.dedupe)
    rejects += [checked[REJECTS_TAG], paired["rejects"]]
    pairs = paired["pairs"]
    if config.filters.clip_model or config.filters.nsfw_model:
        from magiclens.pipeline.scores import ModelFilters  # imports torch: only when a model is asked for

        scored = pairs | "ModelFilters" >> ModelFilters(config.filters)
        pairs = scored["pairs"]
        rejects.append(scored["rejects"])
    (
        pairs
        | "CountPairs" >> beam.Map(_count_written)
        | "WritePairs" >> WriteToParquet(
            FileSystems.join(config.output, "pairs", "part"), schemas.PAIRS, file_name_suffix=".parquet"
        )
    )
    (
        rejects
        | "AllRejects" >> beam.Flatten()
        | "RejectRows" >> beam.Map(Reject.as_row)
        | "WriteRejects"
        >> WriteToParquet(FileSystems.join(config.output, "rejects", "part"), schemas.REJECTS, file_name_suffix=".parquet")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Mine same-page image pairs from WARC files. Writes OUTPUT/pairs/*.parquet, OUTPUT/rejects/ "
        "(every element dropped, with its reason) and OUTPUT/stats.json (per stage: in, out, rejected). "
        "Arguments not listed here are passed to Beam as pipeline options (e.g. --runner, "
        "--direct_num_workers=2); the default runner is Beam's in-process FnApiRunner."
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", action="append", metavar="GLOB",
                    help="WARC file or glob (local, gs://, s3://) or an http(s) URL; repeatable")
    io.add_argument("--output", required=True, metavar="DIR", help="output directory (local, gs://, s3://)")
    io.add_argument("--no-fetch", action="store_true",
                    help="use only images found in the input WARCs; images elsewhere are rejected as not_in_input")
    extract = parser.add_argument_group("extraction")
    extract.add_argument("--html-parser", choices=["lexbor", "bs4"], default="lexbor",
                         help="HTML parser: selectolax/Lexbor (fast, default) or BeautifulSoup")
    extract.add_argument("--context-chars", type=int, default=300, metavar="N",
                         help="cap on the nearby text kept per image (default 300)")
    images = parser.add_argument_group("images")
    images.add_argument("--max-side", type=int, default=512, help="resize so the longer side is at most this (default 512)")
    images.add_argument("--min-side", type=int, default=150, help="reject images whose shorter side is under this (default 150)")
    images.add_argument("--max-aspect", type=float, default=3.0, help="reject images with aspect ratio over this (default 3)")
    images.add_argument("--jpeg-quality", type=int, default=90, help="quality of the stored JPEG (default 90)")
    pairing = parser.add_argument_group("pairs")
    pairing.add_argument("--near-duplicate-distance", type=int, default=8, metavar="BITS",
                         help="pHash Hamming distance at or under which two images of a page are duplicates (default 8)")
    pairing.add_argument("--pairs-per-page", type=int, default=4, help="at most this many pairs per page (default 4)")
    pairing.add_argument("--both-directions", action="store_true",
                         help="also write (target, query) for each chosen (query, target)")
    add_crawl_arguments(parser)
    add_filter_arguments(parser)
    add_fetch_arguments(parser)


def config_from_args(args: argparse.Namespace, inputs: list[str]) -> MineConfig:
    positive = {
        "--max-side": args.max_side,
        "--pairs-per-page": args.pairs_per_page,
        "--context-chars": args.context_chars,
    }
    for flag, value in positive.items():
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")
    if args.max_aspect < 1:
        raise SystemExit(f"--max-aspect must be at least 1, got {args.max_aspect}")
    if not 1 <= args.jpeg_quality <= 95:
        raise SystemExit(f"--jpeg-quality must be between 1 and 95, got {args.jpeg_quality}")
    if not 0 <= args.near_duplicate_distance <= 64:
        raise SystemExit(f"--near-duplicate-distance must be between 0 and 64, got {args.near_duplicate_distance}")
    return MineConfig(
        inputs=tuple(inputs),
        output=args.output,
        html_parser=args.html_parser,
        context_chars=args.context_chars,
        image=ImageConfig(args.max_side, args.min_side, args.max_aspect, args.jpeg_quality),
        pairing=PairingConfig(args.near_duplicate_distance, args.pairs_per_page, args.both_directions),
        fetch=None if args.no_fetch else FetchConfig.from_args(args),
        filters=FilterConfig.from_args(args),
    )


def check_inputs_exist(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        if not is_http_url(pattern) and not FileSystems.match([pattern])[0].metadata_list:
            raise SystemExit(f"--input {pattern!r} matches no file")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    configure_logging()
    inputs = inputs_from_args(args)
    if args.dry_run:
        print("\n".join(inputs))
        return 0
    config = config_from_args(args, inputs)
    check_inputs_exist(config.inputs)
    options = pipeline_options(extra)
    started = time.time()
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    result = pipeline.run()
    if options.view_as(GoogleCloudOptions).template_location:
        print(f"Dataflow template written: {options.view_as(GoogleCloudOptions).template_location}")
        return 0
    result.wait_until_finish()
    stats = stats_from_counters(counters_from_result(result))
    described = asdict(config)
    # A whole crawl is tens of thousands of URLs: record the crawl and a count instead.
    described["inputs"] = list(args.input or [])
    if args.crawl:
        described["crawl"] = {"id": args.crawl, "warc_files": len(inputs) - len(described["inputs"])}
    summary = {"command": "mine", "config": described, "seconds": round(time.time() - started, 2), "stages": stats}
    write_json(FileSystems.join(config.output, "stats.json"), summary)
    pairs = stats.get("outputs", {}).get("pairs", 0)
    print(f"pairs written: {pairs}  ->  {FileSystems.join(config.output, 'pairs')}")
    for name, entry in stats.items():
        if "balanced" in entry:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(entry["rejected"].items()))
            print(f"  {name:<12} in {entry['in']:>7}  out {entry['out']:>7}  rejected {entry['rejected_total']:>7}"
                  + (f"  ({reasons})" if reasons else ""))
    print(f"stats: {FileSystems.join(config.output, 'stats.json')}  rejects: {FileSystems.join(config.output, 'rejects')}")
    print(f"report: {write_report(config.output)}")
    broken = unbalanced_stages(stats)
    if broken:
        LOG.error("stages whose counts do not balance (in != out + rejected): %s", ", ".join(broken))
        return 1
    return 0
