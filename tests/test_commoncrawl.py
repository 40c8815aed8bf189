"""Common Crawl input: crawl ids, warc.paths.gz, sampling, --dry-run, and the resumable HTTPS reader.

The reader is tested against a real HTTP server on 127.0.0.1 that serves a shared WARC, honours
`Range`, and cuts the connection off in the middle of every response body.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastwarc.warc import ArchiveIterator

from magiclens.pipeline.commoncrawl import (
    HttpRangeError,
    ResumableHttpReader,
    add_crawl_arguments,
    check_crawl_id,
    crawl_warc_urls,
    inputs_from_args,
    open_warc,
    paths_file_location,
    sample_paths,
)

CRAWL = "CC-MAIN-2024-33"


def crawl_paths(count: int, crawl: str = CRAWL) -> list[str]:
    """Relative WARC paths laid out as in a Common Crawl warc.paths.gz."""
    return [
        f"crawl-data/{crawl}/segments/1722640353668.{n % 100}/warc/"
        f"CC-MAIN-20240802234508-20240803024508-{n:05d}.warc.gz"
        for n in range(count)
    ]


def write_paths_file(path: Path, lines: list[str]) -> Path:
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def test_crawl_ids_are_validated_with_a_clear_error():
    assert check_crawl_id("CC-MAIN-2024-33") == "CC-MAIN-2024-33"
    for bad in ["CC-MAIN-2024", "cc-main-2024-33", "CC-MAIN-2024-60", "2024-33", "CC-MAIN-2024-33/../x"]:
        with pytest.raises(ValueError, match="CC-MAIN-YYYY-WW"):
            check_crawl_id(bad)
    assert paths_file_location(CRAWL) == "https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-33/warc.paths.gz"
    assert paths_file_location(CRAWL, "s3://commoncrawl/") == "s3://commoncrawl/crawl-data/CC-MAIN-2024-33/warc.paths.gz"


def test_paths_file_gives_urls_under_the_base_sampled_and_limited(tmp_path):
    lines = crawl_paths(200)
    paths_file = write_paths_file(tmp_path / "warc.paths.gz", lines)
    urls = crawl_warc_urls(CRAWL, paths_file=str(paths_file), limit=None, sample=None, seed=0)
    assert urls == [f"https://data.commoncrawl.org/{line}" for line in lines]

    limited = crawl_warc_urls(CRAWL, paths_file=str(paths_file), limit=3, sample=None, seed=0, base="s3://commoncrawl/")
    assert limited == [f"s3://commoncrawl/{line}" for line in lines[:3]]

    sampled = crawl_warc_urls(CRAWL, paths_file=str(paths_file), limit=None, sample=0.1, seed=7)
    again = crawl_warc_urls(CRAWL, paths_file=str(paths_file), limit=None, sample=0.1, seed=7)
    other_seed = crawl_warc_urls(CRAWL, paths_file=str(paths_file), limit=None, sample=0.1, seed=8)
    assert len(sampled) == 20 and sampled == again and sampled != other_seed
    positions = [urls.index(url) for url in sampled]
    assert positions == sorted(positions)  # kept in the file's order
    assert set(sample_paths(lines, 0.05, 7)) <= set(sample_paths(lines, 0.1, 7))  # a larger fraction is a superset


def test_a_plain_local_crawl_mirror_is_read_through_beam_filesystems(tmp_path):
    lines = crawl_paths(5)
    listing = tmp_path / "crawl-data" / CRAWL
    listing.mkdir(parents=True)
    (listing / "warc.paths.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    urls = crawl_warc_urls(CRAWL, limit=2, sample=None, seed=0, base=str(tmp_path))
    assert urls == [str(tmp_path / line) for line in lines[:2]]


def test_bad_paths_files_and_options_are_refused_clearly(tmp_path):
    other = write_paths_file(tmp_path / "other.paths.gz", crawl_paths(3, "CC-MAIN-2023-50"))
    with pytest.raises(ValueError, match="not a WARC of CC-MAIN-2024-33"):
        crawl_warc_urls(CRAWL, paths_file=str(other), limit=None, sample=None, seed=0)
    empty = write_paths_file(tmp_path / "empty.paths.gz", [])
    with pytest.raises(ValueError, match="lists no WARC files"):
        crawl_warc_urls(CRAWL, paths_file=str(empty), limit=None, sample=None, seed=0)
    good = write_paths_file(tmp_path / "warc.paths.gz", crawl_paths(3))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        crawl_warc_urls(CRAWL, paths_file=str(good), limit=None, sample=1.5, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        crawl_warc_urls(CRAWL, paths_file=str(good), limit=0, sample=None, seed=0)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", action="append")
    add_crawl_arguments(parser)
    return parser.parse_args(argv)


def test_inputs_from_args_joins_globs_and_crawl_urls(tmp_path):
    paths_file = write_paths_file(tmp_path / "warc.paths.gz", crawl_paths(4))
    args = parse(["--input", "a/*.warc.gz", "--crawl", CRAWL, "--crawl-paths", str(paths_file), "--warc-limit", "1"])
    assert inputs_from_args(args) == ["a/*.warc.gz", f"https://data.commoncrawl.org/{crawl_paths(1)[0]}"]
    with pytest.raises(SystemExit, match="--warc-limit need"):
        inputs_from_args(parse(["--input", "a", "--warc-limit", "1"]))
    with pytest.raises(SystemExit, match="no input"):
        inputs_from_args(parse([]))
    with pytest.raises(SystemExit, match="--crawl CC-MAIN-24: .*CC-MAIN-YYYY-WW"):
        inputs_from_args(parse(["--crawl", "CC-MAIN-24"]))


def test_mine_dry_run_prints_the_crawl_warc_urls_and_exits(tmp_path, capsys):
    from magiclens.cli import main

    lines = crawl_paths(30)
    paths_file = write_paths_file(tmp_path / "warc.paths.gz", lines)
    output = tmp_path / "out"
    code = main(["mine", "--crawl", CRAWL, "--crawl-paths", str(paths_file), "--warc-limit", "1", "--dry-run",
                 "--output", str(output)])
    assert code == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed == [f"https://data.commoncrawl.org/{lines[0]}"]
    assert not output.exists()  # nothing ran


# --- the resumable reader against a real server -------------------------------------------------


class FlakyWarcServer(http.server.ThreadingHTTPServer):
    """Serves one file; every response announces the full remaining length but sends at most
    `cut_after` bytes of it and then drops the connection. Honours `Range: bytes=N-` unless
    `honour_range` is off."""

    daemon_threads = True

    def __init__(self, data: bytes, cut_after: int, honour_range: bool = True):
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.data = data
        self.cut_after = cut_after
        self.honour_range = honour_range
        self.requests: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/crawl-data/x.warc.gz"


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyWarcServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        requested = self.headers.get("Range")
        self.server.requests.append(requested)
        if not self.path.endswith(".warc.gz"):
            self.send_error(404)
            return
        data = self.server.data
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        start = int(match.group(1)) if match and self.server.honour_range else 0
        if start >= len(data):
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start : start + self.server.cut_after])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(data: bytes, cut_after: int, honour_range: bool = True) -> FlakyWarcServer:
        server = FlakyWarcServer(data, cut_after, honour_range)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def warc_records(stream) -> list[tuple]:
    """(type, record id, target URI, sha256 of the payload) of every record."""
    return [
        (
            str(record.record_type),
            record.record_id,
            record.headers.get("WARC-Target-URI"),
            hashlib.sha256(record.reader.read()).hexdigest(),
        )
        for record in ArchiveIterator(stream, parse_http=False, fsspec_args=False)
    ]


def test_reader_resumes_dropped_connections_and_fastwarc_reads_every_record(serve, shared_data):
    path = shared_data / "warc/webarchive/ukwa_sopa-wikipedia-homepage.warc.gz"
    data = path.read_bytes()
    server = serve(data, cut_after=50_000)
    with open(path, "rb") as local:
        expected = warc_records(local)
    with ResumableHttpReader(server.url, backoff=0.001) as stream:
        got = warc_records(stream)
        assert stream.tell() == len(data)
        assert stream.resumes >= len(data) // 50_000
    assert got == expected and len(got) == 164
    # every request after the first asked for the byte the previous one had reached
    assert server.requests[0] is None
    assert server.requests[1:] == [f"bytes={n}-" for n in range(50_000, len(data), 50_000)]


def test_reader_seeks_by_reconnecting_at_the_new_position(serve, shared_data):
    data = (shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz").read_bytes()
    server = serve(data, cut_after=30_000)
    with open_warc(server.url) as stream:
        assert isinstance(stream, ResumableHttpReader)
        stream.backoff = 0.001
        assert stream.read(100) == data[:100]
        stream.seek(len(data) - 5000)
        assert stream.read() == data[-5000:]
        stream.seek(-200, 2)
        assert stream.read(10) == data[-200:-190]
        stream.seek(0)
        assert stream.read() == data


def test_reader_refuses_servers_that_cannot_resume_and_gives_up_when_nothing_arrives(serve, shared_data):
    data = (shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz").read_bytes()
    no_range = serve(data, cut_after=40_000, honour_range=False)
    with ResumableHttpReader(no_range.url, backoff=0.001) as stream:
        with pytest.raises(HttpRangeError, match="ignored 'Range: bytes=40000-'"):
            stream.read()
    missing = serve(data, cut_after=len(data))
    with ResumableHttpReader(missing.url.replace(".warc.gz", ".txt"), backoff=0.001) as stream:
        with pytest.raises(HttpRangeError, match="HTTP 404"):
            stream.read(10)
    assert len(missing.requests) == 1  # a 404 is not retried
    stuck = serve(data, cut_after=0)
    with ResumableHttpReader(stuck.url, backoff=0.001, max_retries=3) as stream:
        with pytest.raises(OSError, match="gave up after 3 retries at byte 0"):
            stream.read(10)
    assert len(stuck.requests) == 4


def test_paths_file_is_read_over_http(serve, tmp_path):
    lines = crawl_paths(3)
    server = serve(gzip.compress("\n".join(lines).encode()), cut_after=10_000)
    base = server.url.removesuffix("/crawl-data/x.warc.gz")
    # the flaky server serves the same bytes at any *.warc.gz path; point --crawl-paths at one
    urls = crawl_warc_urls(CRAWL, paths_file=server.url, limit=None, sample=None, seed=0, base=base)
    assert urls == [f"{base}/{line}" for line in lines]
