"""Per-WARC-file work of `magiclens mine`, persisted so a run resumes and an output grows by file.

Everything up to the decoded page images is done per WARC file, in one call: read, extract,
resolve against the file's own image records, post-decode checks. References whose image is not in
the file are kept as fetch requests: fetching is a corpus-wide step, grouped by host across all
files, so that per-host politeness holds for the whole run (and its image cache makes a rerun send
no request that succeeded before). Each file's results go to OUT/_work/<settings key>/<file key>/:

  images.parquet   the post-decode page images (PAGE_IMAGES), input of the corpus-wide steps
  to_fetch.parquet the references to fetch (TO_FETCH: candidate URLs, largest first, and the reference)
  rejects.parquet  what the file's stages rejected (schemas.REJECTS)
  counts.json      the file's stage counters (`stage.in`, `stage.out`, `stage.rejected.REASON`)
  _DONE            written last: the file is finished

The settings key hashes the flags that change per-file results, so changed settings never reuse
old work. A run mines only the files without _DONE, then `ReplayFileWork` hands the corpus-wide
steps (dedupe, furniture, pairing) the images of every finished file of the run's inputs and adds
each file's counts to the run's counters, so stats.json balances over the whole output.
"""

from __future__ import annotations

import io
import json
import logging
import re
import typing
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from magiclens.pipeline import schemas
from magiclens.pipeline.accounting import NAMESPACE, REJECTS_TAG, StageCounters
from magiclens.pipeline.commoncrawl import is_http_url
from magiclens.pipeline.extract.stage import ExtractConfig, ExtractImageRefs, PageRef
from magiclens.pipeline.extract.urls import canonical_url_key
from magiclens.pipeline.hashing import stable_hash
from magiclens.pipeline.images.stage import (
    TO_FETCH_TAG,
    ChooseCandidate,
    DecodeArchived,
    candidate_probes,
    reference_key,
)
from magiclens.pipeline.mine.config import MineConfig
from magiclens.pipeline.pairs import ImageCapture, PageImage, PageInfo
from magiclens.pipeline.postdecode import CheckDecodedImages
from magiclens.pipeline.records import ImageRef, NormalizedImage, Reject
from magiclens.pipeline.warc import IMAGES_TAG, PAGES_TAG, ReadWarcFiles, warc_file_name

LOG = logging.getLogger("magiclens.mine")

WORK = "_work"
DONE = "_DONE"

# ---------------------------------------------------------------------------------------------
# Page images as Parquet rows: a struct per dataclass, its columns derived from the dataclass fields

_ARROW_TYPES = {
    "str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "bytes": pa.binary(),
    "tuple[str, ...]": pa.list_(pa.string()),
}


def _arrow_type(annotation: str) -> pa.DataType:
    name = re.sub(r"\s*\|\s*None$", "", annotation)
    if name not in _ARROW_TYPES:
        raise TypeError(f"no Parquet type for the field annotation {annotation!r}: add it to _ARROW_TYPES")
    return _ARROW_TYPES[name]


def _struct(cls: type) -> pa.StructType:
    return pa.struct([pa.field(item.name, _arrow_type(str(item.type))) for item in fields(cls)])


PAGE_IMAGES = pa.schema([
    pa.field("page", _struct(PageInfo)),
    pa.field("ref", _struct(ImageRef)),
    pa.field("image", _struct(NormalizedImage)),
    pa.field("image_url", pa.string()),
    pa.field("capture", _struct(ImageCapture)),
])


TO_FETCH = pa.schema([
    pa.field("candidates", pa.list_(pa.string())),
    pa.field("page", _struct(PageInfo)),
    pa.field("ref", _struct(ImageRef)),
])


def page_image_row(item: PageImage) -> dict:
    return asdict(item)


def _from_dict(cls: type, values: dict):
    kinds = typing.get_type_hints(cls)
    return cls(**{name: tuple(value) if kinds[name] == tuple[str, ...] else value for name, value in values.items()})


def page_image_from_row(row: dict) -> PageImage:
    return PageImage(_from_dict(PageInfo, row["page"]), _from_dict(ImageRef, row["ref"]),
                     _from_dict(NormalizedImage, row["image"]), row["image_url"], _from_dict(ImageCapture, row["capture"]))


def to_fetch_row(element: tuple[tuple[str, ...], PageRef]) -> dict:
    candidates, page_ref = element
    return {"candidates": list(candidates), "page": asdict(page_ref.page), "ref": asdict(page_ref.ref)}


def to_fetch_from_row(row: dict) -> tuple[tuple[str, ...], PageRef]:
    return tuple(row["candidates"]), PageRef(_from_dict(PageInfo, row["page"]), _from_dict(ImageRef, row["ref"]))


def write_parquet(path: str, rows: list[dict], schema: pa.Schema) -> None:
    with FileSystems.create(path, mime_type="application/octet-stream") as handle:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), handle)


def read_parquet(path: str) -> list[dict]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pq.read_table(io.BytesIO(handle.read())).to_pylist()


def read_json(path: str) -> dict:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return json.loads(handle.read().decode())


def write_json(path: str, data: object) -> None:
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write((json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# Which files, and where their work is


@dataclass(frozen=True)
class WarcFile:
    path: str
    key: str  # names the file's work folder: its path, size and modification time


def settings_key(config: MineConfig) -> str:
    """Hash of the settings that change what a file's work holds."""
    per_file = {
        "read_limits": asdict(config.read_limits), "html_parser": config.html_parser,
        "context_chars": config.context_chars, "image": asdict(config.image),
        "refs": asdict(config.filters.refs), "decoded": asdict(config.filters.decoded),
        "fetch": config.fetch is not None,  # decides between a fetch request and a not_in_input reject
        "page_images": PAGE_IMAGES.to_string(),  # work written with other columns is not reused
        "to_fetch": TO_FETCH.to_string(),
    }
    return stable_hash(json.dumps(per_file, sort_keys=True, default=str))[:16]


def work_root(output: str, config: MineConfig) -> str:
    return FileSystems.join(output, WORK, settings_key(config))


def warc_files(inputs: tuple[str, ...]) -> list[WarcFile]:
    """The files of the inputs (globs matched, http(s) URLs as they are), each once, in path order."""
    found: dict[str, WarcFile] = {}
    patterns = [path for path in inputs if not is_http_url(path)]
    for url in inputs:
        if is_http_url(url):
            found[url] = WarcFile(url, stable_hash(url))
    for result in FileSystems.match(patterns) if patterns else []:
        for meta in result.metadata_list:
            found[meta.path] = WarcFile(meta.path, stable_hash(meta.path, str(meta.size_in_bytes),
                                                               str(meta.last_updated_in_seconds)))
    return sorted(found.values(), key=lambda item: item.path)


def finished_keys(root: str) -> set[str]:
    """The keys of the files whose work under `root` is complete (one listing, not a request per file)."""
    try:
        metas = FileSystems.match([FileSystems.join(root, "*", DONE)])[0].metadata_list
    except Exception:  # no work yet
        return set()
    return {meta.path.rstrip("/").split("/")[-2] for meta in metas}


# ---------------------------------------------------------------------------------------------
# One file's work: the stages' DoFns driven in process, their counters kept per file


class _Tally(StageCounters):
    """A stage's counters added to one file's counts instead of Beam metrics."""

    def __init__(self, stage: str, counts: Counter):  # no super().__init__: no Beam counters
        self.stage = stage
        self.counts = counts

    def received(self, n: int = 1) -> None:
        self.counts[f"{self.stage}.in"] += n

    def kept(self, n: int = 1) -> None:
        self.counts[f"{self.stage}.out"] += n

    def reject(self, element_id: str, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
        self.counts[f"{self.stage}.rejected.{reason}"] += 1
        return beam.pvalue.TaggedOutput(REJECTS_TAG, Reject(element_id, self.stage, reason, detail))


def _tallied(dofn: beam.DoFn, counts: Counter) -> beam.DoFn:
    dofn.setup()
    for name, value in list(vars(dofn).items()):
        if isinstance(value, StageCounters):
            setattr(dofn, name, _Tally(value.stage, counts))
    return dofn


def _route(outputs, rejects: list[Reject], tagged: dict[str, list] | None = None) -> list:
    main = []
    for output in outputs:
        if isinstance(output, beam.pvalue.TaggedOutput):
            (rejects if output.tag == REJECTS_TAG else tagged[output.tag]).append(output.value)
        else:
            main.append(output)
    return main


def mine_file(path: str, config: MineConfig) -> tuple[list[tuple[str, PageImage]], list, list[Reject], Counter]:
    """One WARC file -> its post-decode (page URL, PageImage)s, its fetch requests ((candidates,
    PageRef), when fetching is on), its rejects and its stage counts."""
    counts: Counter = Counter()
    rejects: list[Reject] = []
    read = _tallied(ReadWarcFiles(config.read_limits), counts)
    extract = _tallied(ExtractImageRefs(ExtractConfig(config.html_parser, config.context_chars, config.filters.refs)),
                       counts)
    tagged: dict[str, list] = {PAGES_TAG: [], IMAGES_TAG: []}
    page_refs = []
    for output in read.process(path):
        _route([output], rejects, tagged)
        if tagged[PAGES_TAG]:  # one page at a time: its references are kept, its HTML is not
            page_refs += _route(extract.process(tagged[PAGES_TAG].pop()), rejects)
    probes, records, refs = defaultdict(list), defaultdict(list), defaultdict(list)
    for page_ref in page_refs:
        refs[reference_key(page_ref)].append(page_ref)
        for key, probe in candidate_probes(page_ref):
            probes[key].append(probe)
    for url, record in tagged[IMAGES_TAG]:
        records[canonical_url_key(url)].append(record)
    decode = _tallied(DecodeArchived(config.image), counts)
    archived = defaultdict(list)
    for key, found in records.items():
        for reference, item in _route(decode.process((key, {"probes": probes.get(key, []), "records": found})), rejects):
            archived[reference].append(item)
    choose = _tallied(ChooseCandidate(fetch=config.fetch is not None), counts)
    to_fetch: dict[str, list] = {TO_FETCH_TAG: []}
    images = []
    for key, grouped in refs.items():
        images += _route(choose.process((key, {"refs": grouped, "archived": archived.get(key, [])})), rejects, to_fetch)
    check = _tallied(CheckDecodedImages(config.filters.decoded), counts)
    checked = []
    for element in images:
        checked += _route(check.process(element), rejects)
    return checked, to_fetch[TO_FETCH_TAG], rejects, counts


def save_file_work(folder: str, path: str, images: list[tuple[str, PageImage]], to_fetch: list,
                   rejects: list[Reject], counts: Counter) -> None:
    """Write one file's work, _DONE last."""
    write_parquet(FileSystems.join(folder, "images.parquet"), [page_image_row(item) for _, item in images], PAGE_IMAGES)
    write_parquet(FileSystems.join(folder, "to_fetch.parquet"), [to_fetch_row(item) for item in to_fetch], TO_FETCH)
    write_parquet(FileSystems.join(folder, "rejects.parquet"), [reject.as_row() for reject in rejects], schemas.REJECTS)
    write_json(FileSystems.join(folder, "counts.json"), dict(counts))
    write_json(FileSystems.join(folder, DONE), {"path": path, "images": len(images), "rejects": len(rejects)})


FILES_NAME = "files.json"
# Per-file counts shown in the run's files.json and report: (column, counter).
FILE_FUNNEL = (("records", "records.in"), ("pages", "pages.in"), ("pages kept", "pages.out"),
               ("references kept", "refs.out"), ("images", "images.out"), ("after checks", "decoded.out"))


def file_funnel(files: list[WarcFile], root: str) -> list[dict]:
    """Per WARC file of the run: what each stage made of it, from its work's counts (a file whose
    work is missing, e.g. a run that failed, is listed without counts)."""
    rows = []
    for warc in files:
        folder = FileSystems.join(root, warc.key)
        try:
            counts = read_json(FileSystems.join(folder, "counts.json"))
        except Exception:  # no finished work for this file
            rows.append({"file": warc.path, "finished": False})
            continue
        row = {"file": warc.path, "warc_file": warc_file_name(warc.path), "finished": True}
        row.update({column: counts.get(counter, 0) for column, counter in FILE_FUNNEL})
        rejected = Counter()
        for name, value in counts.items():
            stage, _, rest = name.partition(".")
            if rest.startswith("rejected."):
                rejected[f"{stage}.{rest.removeprefix('rejected.')}"] += value
        row["rejected"] = dict(rejected.most_common())
        rows.append(row)
    return rows


class MineWarcFiles(beam.DoFn):
    """A WarcFile -> its work folder, written with _DONE last (a retry writes the same files again)."""

    def __init__(self, config: MineConfig, root: str):
        self.config = config
        self.root = root

    def process(self, warc: WarcFile):
        folder = FileSystems.join(self.root, warc.key)
        images, to_fetch, rejects, counts = mine_file(warc.path, self.config)
        save_file_work(folder, warc.path, images, to_fetch, rejects, counts)
        yield folder


class ReplayFileWork(beam.DoFn):
    """A finished file's work folder -> its (page URL, PageImage)s, its fetch requests (TO_FETCH_TAG)
    and its rejects (REJECTS_TAG, as rows); its counts are added to the run's counters."""

    def process(self, folder: str):
        for name, value in read_json(FileSystems.join(folder, "counts.json")).items():
            Metrics.counter(NAMESPACE, name).inc(value)
        for row in read_parquet(FileSystems.join(folder, "rejects.parquet")):
            yield beam.pvalue.TaggedOutput(REJECTS_TAG, row)
        for row in read_parquet(FileSystems.join(folder, "to_fetch.parquet")):
            yield beam.pvalue.TaggedOutput(TO_FETCH_TAG, to_fetch_from_row(row))
        for row in read_parquet(FileSystems.join(folder, "images.parquet")):
            item = page_image_from_row(row)
            yield item.page.url, item
