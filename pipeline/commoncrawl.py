"""Common Crawl as input: a crawl id -> the URLs of its WARC files, and a WARC reader for HTTPS.

A crawl (`CC-MAIN-2024-33`) lists its WARC files, one relative path a line, in
`crawl-data/CC-MAIN-2024-33/warc.paths.gz`. Both that list and the WARCs are read relative to a base:
https://data.commoncrawl.org/ by default, or s3://commoncrawl/ or a mirror (gs://, a local folder)
through Beam FileSystems.

Over HTTPS a WARC (about 1 GB) is streamed, never held in memory. Long downloads get cut off now and
then; `ResumableHttpReader` then asks again with a `Range` header from the byte it had reached, so
the WARC parser above it never sees the break.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import io
import logging
import re
import time
from typing import BinaryIO

import requests
import urllib3

LOG = logging.getLogger("magiclens.commoncrawl")

DEFAULT_BASE = "https://data.commoncrawl.org/"
CRAWL_ID = re.compile(r"CC-MAIN-(\d{4})-(\d{2})")
USER_AGENT = "magiclens/0.1 (open MagicLens data engine; reads Common Crawl WARC files)"


def is_http_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def check_crawl_id(crawl: str) -> str:
    """Return the crawl id if it has Common Crawl's form CC-MAIN-YYYY-WW, else raise ValueError."""
    match = CRAWL_ID.fullmatch(crawl.strip())
    if not match or not 1 <= int(match.group(2)) <= 53:
        raise ValueError(
            f"{crawl!r} is not a Common Crawl crawl id: expected CC-MAIN-YYYY-WW with a week 01-53, "
            "e.g. CC-MAIN-2024-33 (the list is at https://commoncrawl.org/overview)"
        )
    return match.group(0)


def paths_file_location(crawl: str, base: str = DEFAULT_BASE) -> str:
    return _join(base, f"crawl-data/{check_crawl_id(crawl)}/warc.paths.gz")


def _join(base: str, relative: str) -> str:
    if is_http_url(base):
        return base.rstrip("/") + "/" + relative
    from apache_beam.io.filesystems import FileSystems  # Beam only when a run reads files: `mine --help` stays quick

    return FileSystems.join(base, relative)


def read_paths_file(location: str) -> list[str]:
    """The non-empty lines of a (gzip'd or plain) paths file: an https URL, or a path Beam can open.

    A crawl's list is small (about 2 MB gzip'd for 90,000 WARCs), so it is read whole.
    """
    with open_warc(location) as stream:
        data = stream.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = (line.strip() for line in data.decode("utf-8").splitlines())
    return [line for line in lines if line]


def sample_paths(paths: list[str], fraction: float, seed: int) -> list[str]:
    """A deterministic sample of round(fraction * n) paths (at least one), kept in their file order.

    Each path is ranked by a hash of (seed, path), so the same seed picks the same files, and a larger
    fraction picks a superset of a smaller one.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the sample fraction must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * len(paths)))

    def rank(path: str) -> bytes:
        return hashlib.sha256(f"{seed}\n{path}".encode()).digest()

    chosen = set(sorted(paths, key=rank)[:count])
    return [path for path in paths if path in chosen]


def crawl_warc_urls(
    crawl: str,
    *,
    paths_file: str | None = None,
    limit: int | None = None,
    sample: float | None = None,
    seed: int = 0,
    base: str = DEFAULT_BASE,
) -> list[str]:
    """The WARC files of a crawl, as URLs or paths under `base`, sampled and then limited.

    `paths_file` replaces the crawl's own warc.paths.gz (a local copy, say); its lines must be paths of
    this crawl.
    """
    crawl = check_crawl_id(crawl)
    location = paths_file or paths_file_location(crawl, base)
    paths = read_paths_file(location)
    if not paths:
        raise ValueError(f"{location} lists no WARC files")
    marker = f"/{crawl}/"
    for number, path in enumerate(paths, 1):
        if marker not in f"/{path}":
            raise ValueError(
                f"line {number} of {location} is {path[:200]!r}, which is not a WARC of {crawl}: "
                f"give the warc.paths.gz of {crawl}"
            )
    if sample is not None:
        paths = sample_paths(paths, sample, seed)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"the WARC limit must be at least 1, got {limit}")
        paths = paths[:limit]
    return [path if "://" in path else _join(base, path) for path in paths]


class HttpRangeError(OSError):
    """The server answered in a way that cannot be read or resumed (404, no Range support...)."""


# What a connection that breaks mid-body raises through requests / urllib3.
DROPPED = (
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError, IncompleteRead from response.raw
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


class ResumableHttpReader(io.RawIOBase):
    """A read-only, seekable file over an HTTP(S) URL that survives dropped connections.

    It streams the body; when the connection drops (an error, or the body ends before the length the
    server announced), it sends a new GET with `Range: bytes=POS-` from the byte reached, waiting
    `backoff * 2**attempt` seconds (capped at 60) between tries. `max_retries` tries in a row that
    gain no byte end in an OSError. Seeking closes the connection; the next read resumes there.
    """

    def __init__(
        self,
        url: str,
        *,
        max_retries: int = 8,
        backoff: float = 1.0,
        timeout: float = 60.0,
        session: requests.Session | None = None,
    ):
        super().__init__()
        self.url = url
        self.max_retries = max_retries
        self.backoff = backoff
        self.timeout = timeout
        self.session = session or requests.Session()
        self.position = 0
        self.size: int | None = None
        self.resumes = 0  # how many times a dropped connection was resumed (for logs and tests)
        self._response: requests.Response | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self.position + offset
        elif whence == io.SEEK_END:
            if self.size is None:
                self._connect()
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target != self.position:
            self._disconnect()
            self.position = target
        return self.position

    def readinto(self, buffer) -> int:
        if self.size is not None and self.position >= self.size:
            return 0
        failures = 0
        while True:
            try:
                if self._response is None:
                    self._connect()
                data = self._response.raw.read(len(buffer), decode_content=False)
            except DROPPED as error:
                data, reason = b"", f"{type(error).__name__}: {error}"
            else:
                if data or self.size is None or self.position >= self.size:
                    # Without an announced length, a clean end of the body is the end of the file.
                    buffer[: len(data)] = data
                    self.position += len(data)
                    return len(data)
                reason = f"the body ended at byte {self.position} of {self.size}"
            self._disconnect()
            failures += 1
            if failures > self.max_retries:
                raise OSError(f"{self.url}: gave up after {self.max_retries} retries at byte {self.position}: {reason}")
            delay = min(60.0, self.backoff * 2 ** (failures - 1))
            LOG.warning("%s: connection dropped at byte %d (%s); resuming in %.1fs", self.url, self.position, reason, delay)
            time.sleep(delay)
            self.resumes += 1

    def _connect(self) -> None:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if self.position:
            headers["Range"] = f"bytes={self.position}-"
        response = self.session.get(self.url, headers=headers, stream=True, timeout=self.timeout)
        if response.status_code >= 500 or response.status_code == 429:
            response.close()
            raise requests.exceptions.ConnectionError(f"HTTP {response.status_code}")
        if response.status_code not in (200, 206):
            response.close()
            raise HttpRangeError(f"{self.url}: HTTP {response.status_code} {response.reason}")
        if self.position and response.status_code != 206:
            response.close()
            raise HttpRangeError(
                f"{self.url}: the server ignored 'Range: bytes={self.position}-' (HTTP {response.status_code}), "
                "so the download cannot resume; read this WARC from a copy on gs:// or s3:// instead"
            )
        self.size = _total_size(response, self.position)
        self._response = response

    def _disconnect(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def close(self) -> None:
        self._disconnect()
        super().close()


def _total_size(response: requests.Response, position: int) -> int | None:
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
        if not match or int(match.group(1)) != position:
            response.close()
            raise HttpRangeError(f"{response.url}: asked for bytes from {position}, got Content-Range {content_range!r}")
        return None if match.group(2) == "*" else int(match.group(2))
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def open_warc(path_or_url: str) -> BinaryIO:
    """Open a WARC (or any file) for reading: resumable streaming for http(s), Beam FileSystems else."""
    if is_http_url(path_or_url):
        return ResumableHttpReader(path_or_url)
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path_or_url, compression_type=CompressionTypes.UNCOMPRESSED)


def add_crawl_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Common Crawl input (instead of, or beside, --input)")
    group.add_argument("--crawl", metavar="CC-MAIN-YYYY-WW",
                       help="mine the WARC files of this Common Crawl crawl, listed in its warc.paths.gz")
    group.add_argument("--crawl-base", default=DEFAULT_BASE, metavar="URL",
                       help="where the crawl's files are read from: https://data.commoncrawl.org/ (default, "
                            "streamed with resume on dropped connections), s3://commoncrawl/, or a mirror "
                            "on gs:// or a local folder with the same layout")
    group.add_argument("--crawl-paths", metavar="FILE",
                       help="read the list of WARC paths from this warc.paths(.gz) file (local, gs://, s3://) "
                            "instead of the crawl's own; its paths are still read under --crawl-base")
    group.add_argument("--warc-limit", type=int, metavar="N",
                       help="mine at most N WARC files of the crawl (after --warc-sample)")
    group.add_argument("--warc-sample", type=float, metavar="FRACTION",
                       help="mine a deterministic sample of this fraction (0-1] of the crawl's WARC files")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of --warc-sample: the same seed picks the same files (default 0)")
    group.add_argument("--dry-run", action="store_true",
                       help="print the WARC files or URLs that would be read, one a line, and exit")


def inputs_from_args(args: argparse.Namespace) -> list[str]:
    """The WARC inputs of a run: the --input globs, then the crawl's WARC URLs; SystemExit if none."""
    inputs = list(getattr(args, "input", None) or [])
    crawl_only = {"--crawl-paths": args.crawl_paths, "--warc-limit": args.warc_limit, "--warc-sample": args.warc_sample}
    if args.crawl:
        try:
            inputs += crawl_warc_urls(
                args.crawl,
                paths_file=args.crawl_paths,
                limit=args.warc_limit,
                sample=args.warc_sample,
                seed=args.seed,
                base=args.crawl_base,
            )
        except (ValueError, OSError) as error:
            raise SystemExit(f"--crawl {args.crawl}: {error}") from None
    else:
        given = [flag for flag, value in crawl_only.items() if value is not None]
        if given:
            raise SystemExit(f"{', '.join(given)} need(s) --crawl CC-MAIN-YYYY-WW")
    if not inputs:
        raise SystemExit("no input: give --input GLOB (repeatable) or --crawl CC-MAIN-YYYY-WW")
    return inputs
