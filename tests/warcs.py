"""Write small WARC files for tests: real page and image bytes wrapped in WARC response records."""

from __future__ import annotations

import gzip
import uuid
from pathlib import Path


def response_record(url: str, content_type: str, body: bytes, status: str = "200 OK") -> bytes:
    http = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    header = (
        "WARC/1.0\r\n"
        "WARC-Type: response\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url + str(len(body)))}>\r\n"
        "WARC-Date: 2024-01-01T00:00:00Z\r\n"
        f"WARC-Target-URI: {url}\r\n"
        "Content-Type: application/http; msgtype=response\r\n"
        f"Content-Length: {len(http)}\r\n\r\n"
    ).encode()
    return header + http + b"\r\n\r\n"


def write_warc(path: Path, records: list[tuple[str, str, bytes]]) -> Path:
    """records: (url, content type, body); each record is its own gzip member, as in Common Crawl."""
    with open(path, "wb") as handle:
        for url, content_type, body in records:
            handle.write(gzip.compress(response_record(url, content_type, body)))
    return path
