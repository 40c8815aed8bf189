"""Write small WARC files for tests: real page and image bytes wrapped in WARC response records."""

from __future__ import annotations

import base64
import gzip
import hashlib
import uuid
from pathlib import Path


def payload_digest(body: bytes) -> str:
    return "sha1:" + base64.b32encode(hashlib.sha1(body).digest()).decode()


def warc_record(warc_type: str, url: str, block: bytes, extra: dict[str, str] | None = None,
                record_id: str | None = None, date: str = "2024-01-01T00:00:00Z",
                content_length: int | None = None) -> bytes:
    """One WARC record; `content_length` overrides the true block length (a hostile or broken record)."""
    record_id = record_id or f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, warc_type + url + str(len(block)))}>"
    lines = [
        "WARC/1.0",
        f"WARC-Type: {warc_type}",
        f"WARC-Record-ID: {record_id}",
        f"WARC-Date: {date}",
        f"WARC-Target-URI: {url}",
        "Content-Type: application/http; msgtype=response",
        *(f"{name}: {value}" for name, value in (extra or {}).items()),
        f"Content-Length: {len(block) if content_length is None else content_length}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + block + b"\r\n\r\n"


def http_response(content_type: str, body: bytes, status: str = "200 OK", headers: dict[str, str] | None = None) -> bytes:
    fields = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return (head + "\r\n").encode() + body


def response_record(url: str, content_type: str, body: bytes, status: str = "200 OK",
                    headers: dict[str, str] | None = None, content_length: int | None = None,
                    date: str = "2024-01-01T00:00:00Z") -> bytes:
    """A response record; `headers` are extra HTTP headers (e.g. Content-Encoding) for `body` as stored."""
    return warc_record("response", url, http_response(content_type, body, status, headers),
                       {"WARC-Payload-Digest": payload_digest(body)}, content_length=content_length, date=date)


def revisit_record(url: str, refers_url: str, refers_date: str, digest: str, content_type: str = "image/jpeg") -> bytes:
    """An identical-payload-digest revisit: HTTP headers only, the payload is the original's."""
    headers = {
        "WARC-Profile": "http://netpreserve.org/warc/1.0/revisit/identical-payload-digest",
        "WARC-Refers-To-Target-URI": refers_url,
        "WARC-Refers-To-Date": refers_date,
        "WARC-Payload-Digest": digest,
    }
    http = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\r\n".encode()
    return warc_record("revisit", url, http, headers, date="2024-02-01T00:00:00Z")


def write_records(path: Path, records: list[bytes], gzipped: bool = True) -> Path:
    """Raw records, each its own gzip member (as in Common Crawl), or one after the other uncompressed."""
    with open(path, "wb") as handle:
        for record in records:
            handle.write(gzip.compress(record) if gzipped else record)
    return path


def write_warc(path: Path, records: list[tuple[str, str, bytes]]) -> Path:
    """records: (url, content type, body); each record is its own gzip member, as in Common Crawl."""
    return write_records(path, [response_record(url, content_type, body) for url, content_type, body in records])
