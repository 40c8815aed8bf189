"""Read WARC files: HTML pages and image records, one record at a time.

FastWARC parses the (gzip'd, multi-member) WARC; Beam's FileSystems opens it, so inputs may be
local, gs:// or s3:// paths, and http(s) URLs are streamed with resumption (pipeline/commoncrawl.py).
Only content records (response, resource, revisit) become pages or images; payloads are read only
for records that are kept, and HTTP transfer and content encodings are undone (pipeline/http_payload.py).

What real archives hold, and how it is read:
- a revisit record stores no payload: it is resolved to the response it refers to in the same file
  (by WARC-Refers-To, WARC-Refers-To-Target-URI + WARC-Refers-To-Date, or WARC-Payload-Digest) and
  used under the revisit's URL, else rejected as `revisit_unresolved`;
- a record whose declared length is wrong, or a corrupt gzip member, does not end the file: reading
  resumes at the next gzip member or WARC header (pipeline/warc_resync.py); a record cut short is
  never used as if whole;
- empty files, files with no WARC record, and WAT/WET files are rejected with a reason.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
from fastwarc.warc import ArchiveIterator, WarcRecordType

from magiclens.pipeline.accounting import StageCounters
from magiclens.pipeline.commoncrawl import open_warc
from magiclens.pipeline.http_payload import PayloadRejected, decode_http_payload
from magiclens.pipeline.records import ImageRecord, Page
from magiclens.pipeline.stage_config import ReadLimits
from magiclens.pipeline.warc_resync import (
    first_broken_gzip_member,
    gzip_member,
    next_gzip_member,
    next_warc_header,
    plain_record_end,
    plain_record_ends_cleanly,
    starts_with_gzip,
)

LOG = logging.getLogger("magiclens.warc")

HTML_TYPES = ("text/html", "application/xhtml+xml")
CONTENT_TYPES = (WarcRecordType.response, WarcRecordType.resource, WarcRecordType.revisit)
# Reasons that concern a whole file rather than one record.
FILE_PROBLEMS = ("unreadable_file", "empty_file", "not_a_warc", "wat_or_wet_file", "truncated_file", "corrupt_file")
PAGES_TAG = "pages"
IMAGES_TAG = "images"


@dataclass(frozen=True)
class SkippedRecord:
    """A content record that is neither a usable page nor an image, or a file that broke off."""

    element_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class _Revisit:
    element_id: str
    url: str
    record_id: str
    refers_to: str  # WARC-Refers-To: the record id of the original, when given
    refers_capture: tuple[str, str]  # (WARC-Refers-To-Target-URI, WARC-Refers-To-Date)
    digest: str  # WARC-Payload-Digest
    date: str  # WARC-Date of the revisit record


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _uri(value: str | None) -> str:
    # Some crawlers (wget 1.14) wrote the URI in angle brackets.
    return (value or "").strip().removeprefix("<").removesuffix(">")


def warc_file_name(path: str) -> str:
    """How a WARC is named in the output: a local file by its name (not where it sits on a disk),
    a gs://, s3:// or http(s) one by its full URI."""
    return path if "://" in path else os.path.basename(path)


def classify_record(record, crawl: str, limits: ReadLimits, url: str | None = None,
                    record_id: str | None = None, warc_file: str = "") -> Page | ImageRecord | SkippedRecord:
    """Decide what one response or resource record is; reads its payload only when it is kept.

    `url` and `record_id` replace the record's own when a revisit record is resolved to it (and the
    caller replaces the capture date). `warc_file` names the file in the Page or ImageRecord.
    """
    record_id = record_id if record_id is not None else record.record_id or ""
    url = url if url is not None else _uri(record.headers.get("WARC-Target-URI"))
    element_id = f"{record_id} {url}".strip()
    if not url.startswith(("http://", "https://")):
        return SkippedRecord(element_id, "not_http", url[:100])
    http = record.http_headers if record.is_http else None
    if record.record_type == WarcRecordType.response and http is None:
        return SkippedRecord(element_id, "no_http_headers")
    if http is not None and not 200 <= (http.status_code or 0) < 300:
        return SkippedRecord(element_id, f"http_{http.status_code}")
    content_type = http.get("Content-Type") if http is not None else record.headers.get("Content-Type")
    mime = _mime(content_type)
    if mime in HTML_TYPES:
        kind, cap = "html", limits.max_html_bytes
    elif mime.startswith("image/"):
        kind, cap = "image", limits.max_image_bytes
    else:
        return SkippedRecord(element_id, "content_type", mime or "none")
    if record.content_length > cap:
        return SkippedRecord(element_id, "too_large", f"{record.content_length} bytes declared")
    try:
        payload = record.reader.read(cap + 1)
    except (OSError, ValueError) as error:
        return SkippedRecord(element_id, "unreadable_record", str(error)[:200])
    if len(payload) < record.content_length:
        return SkippedRecord(element_id, "truncated_record",
                             f"{len(payload)} of {record.content_length} declared payload bytes")
    if http is not None:
        encoding, transfer = http.get("Content-Encoding"), http.get("Transfer-Encoding")
        if encoding or transfer:  # most records carry neither: no work for them
            try:
                payload = decode_http_payload(payload, encoding, transfer, cap)
            except PayloadRejected as rejected:
                return SkippedRecord(element_id, rejected.reason, rejected.detail)
    if not payload:
        return SkippedRecord(element_id, "empty_payload")
    if kind == "image":
        return ImageRecord(url=url, data=payload, content_type=mime, record_id=record_id, warc_file=warc_file,
                           date=record.headers.get("WARC-Date") or "")
    charset = record.http_charset if http is not None else None
    robots = http.get("X-Robots-Tag") if http is not None else None
    return Page(url=url, html=payload, charset=charset, crawl=crawl, record_id=record_id, x_robots_tag=robots or "",
                warc_file=warc_file, date=record.headers.get("WARC-Date") or "")


def crawl_name(warcinfo_payload: bytes, path: str) -> str:
    """The crawl a WARC belongs to: `isPartOf` in its warcinfo (Common Crawl), else the file name."""
    for line in warcinfo_payload.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "ispartof" and value.strip():
            return value.strip()
    return os.path.basename(path)


def _as_revisit(item: Page | ImageRecord | SkippedRecord, revisit: _Revisit):
    if isinstance(item, SkippedRecord):
        return dataclasses.replace(item, element_id=revisit.element_id)
    return dataclasses.replace(item, url=revisit.url, record_id=revisit.record_id, date=revisit.date)


class _WarcFileReader:
    """One pass over a WARC file, resuming after broken records, then its revisits, then its verdict."""

    def __init__(self, path: str, stream, limits: ReadLimits, gzipped: bool):
        self.path = path
        self.stream = stream
        self.limits = limits
        self.gzipped = gzipped
        self.crawl = os.path.basename(path)
        self.warc_file = warc_file_name(path)
        self.problems: list[tuple[str, str]] = []  # (reason, detail) about the whole file
        self.records_parsed = 0
        self.content_records = 0
        self.derived_records = 0  # WAT metadata and WET conversion records
        self.originals: dict[object, tuple[int, str]] = {}  # revisit key -> (offset, record id)
        self.revisits: list[_Revisit] = []

    def read(self) -> Iterator[Page | ImageRecord | SkippedRecord]:
        start: int | None = 0
        while start is not None:
            resume = yield from self._read_from(start)
            start = resume if resume is not None and resume > start else None
        yield from self._resolve_revisits()
        yield from self._verdict()

    def _read_from(self, start: int):
        """Read records from `start`; return where to resume after a broken record, or None at the end."""
        self.stream.seek(start)
        records = iter(ArchiveIterator(self.stream, parse_http=True, fsspec_args=False))
        held = None  # the last record's item: yielded once the next header parses, as proof of its length
        last_offset = last_content = None
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except (OSError, ValueError) as error:
                return (yield from self._after_error(start, last_offset, last_content, held, error))
            if held is not None:
                yield held
                held = None
            last_offset, last_content = record.stream_pos, None
            self.records_parsed += 1
            record_type = record.record_type
            if record_type in CONTENT_TYPES:
                self.content_records += 1
                last_content = record.record_id or ""
                held = self._content(record)
            elif record_type == WarcRecordType.warcinfo:
                self.crawl = crawl_name(record.reader.read(65536), self.path)
            elif record_type in (WarcRecordType.metadata, WarcRecordType.conversion):
                self.derived_records += 1
        resume, last_cut = self._after_end(start, last_offset)
        if last_cut and last_content is not None:
            yield self._reject_last(held, "truncated_record", "the file ends inside this record")
        elif held is not None:
            yield held
        return resume

    def _content(self, record) -> Page | ImageRecord | SkippedRecord | None:
        if record.record_type == WarcRecordType.revisit:
            url = _uri(record.headers.get("WARC-Target-URI"))
            record_id = record.record_id or ""
            headers = record.headers
            self.revisits.append(_Revisit(
                f"{record_id} {url}".strip(), url, record_id, headers.get("WARC-Refers-To") or "",
                (_uri(headers.get("WARC-Refers-To-Target-URI")), headers.get("WARC-Refers-To-Date") or ""),
                headers.get("WARC-Payload-Digest") or "", headers.get("WARC-Date") or "",
            ))
            return None
        headers = record.headers
        original = (record.stream_pos, record.record_id or "")
        for key in (original[1], (_uri(headers.get("WARC-Target-URI")), headers.get("WARC-Date") or ""),
                    headers.get("WARC-Payload-Digest")):
            if key:
                self.originals.setdefault(key, original)
        return classify_record(record, self.crawl, self.limits, warc_file=self.warc_file)

    def _reject_last(self, held, reason: str, detail: str) -> SkippedRecord:
        """A reject in place of the last content record's item (a pending revisit when `held` is None)."""
        if held is None:
            return SkippedRecord(self.revisits.pop().element_id, reason, detail)
        element_id = held.element_id if isinstance(held, SkippedRecord) else f"{held.record_id} {held.url}"
        return SkippedRecord(element_id, reason, detail)

    def _after_error(self, start: int, last_offset: int | None, last_content: str | None, held, error):
        """The next record header did not parse: blame the record before it if its length is wrong, else
        the bytes after it; return where to resume."""
        if last_offset is None:  # nothing readable from `start` on
            resume = (next_gzip_member if self.gzipped else next_warc_header)(self.stream, start)
            self._problem("corrupt_file" if resume is not None or start == 0 else "truncated_file",
                          f"unreadable bytes from offset {start} ({error})")
            return resume
        if self.gzipped:
            member = gzip_member(self.stream, last_offset) if starts_with_gzip(self.stream, last_offset) else None
            length_wrong = member is None or not member.holds_one_whole_record()
            resume = member.end if member is not None and member.end is not None else None
            if resume is None:
                resume = next_gzip_member(self.stream, last_offset)
        else:
            length_wrong = not plain_record_ends_cleanly(self.stream, last_offset)
            resume = next_warc_header(self.stream, last_offset)
            if not length_wrong:
                self._problem("corrupt_file", f"unreadable bytes after the record at offset {last_offset} ({error})")
        if last_content is not None and length_wrong:
            yield self._reject_last(held, "record_length_mismatch",
                                    f"its Content-Length does not end where the next record starts ({error})"[:200])
        elif held is not None:
            yield held
        return resume

    def _after_end(self, start: int, last_offset: int | None) -> tuple[int | None, bool]:
        """The parser stopped quietly: check that the file really ended with the last record.

        Returns where to resume (None: the file is done) and whether the last record was cut off.
        """
        at = start if last_offset is None else last_offset
        if self.gzipped:
            if not starts_with_gzip(self.stream, at):
                # Several records share a gzip member: records have no member of their own to check,
                # so check that every member from here on is whole (one more decompression pass).
                broken = first_broken_gzip_member(self.stream, start)
                if broken is not None:
                    self._problem("truncated_file" if broken.cut else "corrupt_file",
                                  f"gzip member at byte {broken.start} {'breaks off' if broken.cut else 'is corrupt'}")
                return None, broken is not None and broken.cut
            member = gzip_member(self.stream, at)
            if member.cut:
                self._problem("truncated_file", f"gzip member at byte {at} breaks off")
                return None, True
            if member.end is None:
                self._problem("corrupt_file", f"gzip member at byte {at} is corrupt")
                return next_gzip_member(self.stream, at), False
            # More members after the last record's: its length ran past its member and swallowed them.
            return (member.end if member.more_follows else None), False
        if last_offset is None:
            return None, False
        ends = plain_record_end(self.stream, last_offset)
        size = self.stream.seek(0, os.SEEK_END)
        if ends is None or ends[1] <= size:
            return None, False
        # The last record claims bytes past the end: a lie (records follow inside it) or a cut file.
        resume = next_warc_header(self.stream, ends[0])
        if resume is None:
            self._problem("truncated_file", f"the record at byte {last_offset} ends at {ends[1]}, the file at {size}")
        return resume, resume is None

    def _problem(self, reason: str, detail: str) -> None:
        self.problems.append((reason, detail))

    def _resolve_revisits(self) -> Iterator[Page | ImageRecord | SkippedRecord]:
        by_original: dict[tuple[int, str], list[_Revisit]] = {}
        for revisit in self.revisits:
            original = next((self.originals[key] for key in (revisit.refers_to, revisit.refers_capture, revisit.digest)
                             if key and key in self.originals), None)
            if original is None:
                yield SkippedRecord(revisit.element_id, "revisit_unresolved",
                                    f"original not in this file: {revisit.refers_capture[0]} {revisit.refers_capture[1]} "
                                    f"{revisit.digest}".strip())
            else:
                by_original.setdefault(original, []).append(revisit)
        for (offset, record_id), revisits in sorted(by_original.items()):
            item = self._reread(offset, record_id)
            for revisit in revisits:
                if item is None:
                    yield SkippedRecord(revisit.element_id, "revisit_unresolved", f"original {record_id} could not be read again")
                else:
                    yield _as_revisit(item, revisit)

    def _reread(self, offset: int, record_id: str) -> Page | ImageRecord | SkippedRecord | None:
        """The original record classified again; found at its offset, else by a pass from the file's start."""
        for start in (offset, 0):
            try:
                self.stream.seek(start)
                for record in ArchiveIterator(self.stream, record_types=WarcRecordType.response | WarcRecordType.resource,
                                              parse_http=True, fsspec_args=False):
                    if (record.record_id or "") == record_id:
                        return classify_record(record, self.crawl, self.limits, warc_file=self.warc_file)
                    if start == offset:
                        break  # not at its offset (several records share a gzip member): search the file
            except (OSError, ValueError):
                continue
        return None

    def _verdict(self) -> Iterator[SkippedRecord]:
        """At most one SkippedRecord about the file, whose reason is in FILE_PROBLEMS."""
        problems = list(self.problems)
        if self.records_parsed == 0:
            problems.insert(0, ("not_a_warc", "no WARC record could be read"))
        elif self.content_records == 0 and self.derived_records:
            problems.insert(0, ("wat_or_wet_file", "WAT/WET files hold metadata or extracted text, not the WARC "
                                "response records this reads: give the .warc.gz files"))
        if problems:
            reason = problems[0][0]
            yield SkippedRecord(self.path, reason, "; ".join(detail for _, detail in problems)[:500])


def read_warc(path: str, limits: ReadLimits = ReadLimits()) -> Iterator[Page | ImageRecord | SkippedRecord]:
    """Yield every content record of one WARC file, classified, then at most one problem with the file.

    A problem with the whole file is a SkippedRecord whose element id is the path and whose reason is
    in FILE_PROBLEMS (e.g. `truncated_file`): what could be read is still yielded before it.
    """
    try:
        stream = open_warc(path)
    except OSError as error:  # a missing file, or an http(s) URL that fails after its retries
        yield SkippedRecord(path, "unreadable_file", str(error)[:200])
        return
    try:
        with stream:
            head = stream.read(2)
            if not head:
                yield SkippedRecord(path, "empty_file", "the file has 0 bytes")
                return
            yield from _WarcFileReader(path, stream, limits, gzipped=head == b"\x1f\x8b").read()
    except OSError as error:  # the storage failed while reading (a dropped connection past its retries)
        yield SkippedRecord(path, "unreadable_file", str(error)[:200])


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
            if isinstance(item, SkippedRecord) and item.reason in FILE_PROBLEMS and item.element_id == path:
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
