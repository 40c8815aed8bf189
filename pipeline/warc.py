"""Read WARC files: HTML pages and image records, one record at a time.

FastWARC parses the (gzip'd, multi-member) WARC; Beam's FileSystems opens it, so inputs may be
local, gs:// or s3:// paths, and http(s) URLs are streamed with resumption (pipeline/commoncrawl.py). Only content records (response, resource, revisit) enter the stage;
warcinfo, request and metadata records are skipped unread by the parser.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from fastwarc.warc import ArchiveIterator, WarcRecordType

from magiclens.pipeline.commoncrawl import open_warc
from magiclens.pipeline.records import ImageRecord, Page

HTML_TYPES = ("text/html", "application/xhtml+xml")
CONTENT_RECORDS = WarcRecordType.response | WarcRecordType.resource | WarcRecordType.revisit
# Reasons that concern a whole file rather than one record.
FILE_PROBLEMS = ("truncated_file", "unreadable_file")


@dataclass(frozen=True)
class ReadLimits:
    max_html_bytes: int = 5 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024


@dataclass(frozen=True)
class SkippedRecord:
    """A content record that is neither a usable page nor an image, or a file that broke off."""

    element_id: str
    reason: str
    detail: str = ""


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _target_uri(record) -> str:
    uri = record.headers.get("WARC-Target-URI") or ""
    # Some crawlers (wget 1.14) wrote the URI in angle brackets.
    return uri.strip().removeprefix("<").removesuffix(">")


def classify_record(record, crawl: str, limits: ReadLimits) -> Page | ImageRecord | SkippedRecord:
    """Decide what one content record is; reads its payload only when it is kept."""
    record_id = record.record_id or ""
    url = _target_uri(record)
    element_id = f"{record_id} {url}".strip()
    if record.record_type == WarcRecordType.revisit:
        return SkippedRecord(element_id, "revisit", "payload stored in an earlier record")
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
    if record.content_length > cap + 65536:  # the record also holds its HTTP headers
        return SkippedRecord(element_id, "too_large", f"{record.content_length} bytes")
    payload = record.reader.read(cap + 1)
    if len(payload) > cap:
        return SkippedRecord(element_id, "too_large", f"over {cap} bytes")
    if not payload:
        return SkippedRecord(element_id, "empty_payload")
    if kind == "image":
        return ImageRecord(url=url, data=payload, content_type=mime, record_id=record_id)
    charset = record.http_charset if http is not None else None
    robots = http.get("X-Robots-Tag") if http is not None else None
    return Page(url=url, html=payload, charset=charset, crawl=crawl, record_id=record_id, x_robots_tag=robots or "")


def crawl_name(warcinfo_payload: bytes, path: str) -> str:
    """The crawl a WARC belongs to: `isPartOf` in its warcinfo (Common Crawl), else the file name."""
    for line in warcinfo_payload.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "ispartof" and value.strip():
            return value.strip()
    return os.path.basename(path)


def read_warc(path: str, limits: ReadLimits = ReadLimits()) -> Iterator[Page | ImageRecord | SkippedRecord]:
    """Yield every content record of one WARC file, classified.

    A file that breaks off (a truncated gzip tail, a corrupt member) ends with one SkippedRecord whose
    element id is the path and reason `truncated_file`: what was read before the break is kept. A
    file that cannot be opened gives one SkippedRecord with reason `unreadable_file`.
    """
    crawl = os.path.basename(path)
    try:
        stream = open_warc(path)
    except OSError as error:  # a missing file, or an http(s) URL that fails after its retries
        yield SkippedRecord(path, "unreadable_file", str(error)[:200])
        return
    with stream:
        last_offset = 0
        try:
            records = ArchiveIterator(
                stream,
                record_types=CONTENT_RECORDS | WarcRecordType.warcinfo,
                parse_http=True,
                fsspec_args=False,
            )
            for record in records:
                last_offset = record.stream_pos
                if record.record_type == WarcRecordType.warcinfo:
                    crawl = crawl_name(record.reader.read(65536), path)
                    continue
                yield classify_record(record, crawl, limits)
        except (OSError, ValueError) as error:
            yield SkippedRecord(path, "truncated_file", str(error)[:200])
            return
        # FastWARC stops quietly at a gzip member that breaks off; check the tail ourselves.
        stream.seek(last_offset)
        if not gzip_tail_complete(stream):
            yield SkippedRecord(path, "truncated_file", f"gzip member after byte {last_offset} breaks off")


def gzip_tail_complete(stream, chunk_size: int = 1 << 20) -> bool:
    """Whether the gzip members from the stream's position to its end are all complete.

    Plain (uncompressed) WARCs have nothing to check and count as complete. Output is discarded in
    bounded pieces, so a hostile member cannot blow up memory.
    """
    pending = stream.read(2)
    if pending != b"\x1f\x8b":
        return True
    decompressor = zlib.decompressobj(31)
    while True:
        data = pending + stream.read(chunk_size)
        pending = b""
        if not data:
            return decompressor.eof
        while data:
            if decompressor.eof:
                decompressor = zlib.decompressobj(31)
            try:
                decompressor.decompress(data, 1 << 22)
            except zlib.error:
                return False
            data = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
