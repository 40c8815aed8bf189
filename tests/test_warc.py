"""WARC reading on genuine crawls, including broken files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from magiclens.pipeline.records import ImageRecord, Page
from magiclens.pipeline.warc import ReadLimits, SkippedRecord, read_warc


def kinds(path: Path | str) -> Counter:
    counts: Counter = Counter()
    for item in read_warc(str(path)):
        counts[item.reason if isinstance(item, SkippedRecord) else type(item).__name__] += 1
    return counts


def test_common_crawl_warc_gives_its_html_pages(shared_data):
    path = shared_data / "warc/commoncrawl/resiliparse_warcfile.warc.gz"
    pages = [item for item in read_warc(str(path)) if isinstance(item, Page)]
    assert len(pages) == 16  # the MANIFEST's count of HTML responses
    assert all(page.url.startswith("http") and page.html for page in pages)
    assert {page.crawl for page in pages} == {"CC-MAIN-2020-34"}  # from warcinfo isPartOf


def test_web_archive_keeps_images_by_url_and_skips_other_records(shared_data):
    counts = kinds(shared_data / "warc/webarchive/aut_example.warc.gz")
    assert counts["ImageRecord"] == 55  # the MANIFEST: 55 image records
    assert counts["Page"] == 94
    assert counts["http_404"] == 40 and counts["content_type"] > 0
    assert "truncated_file" not in counts


def test_angle_bracket_uris_and_revisits(shared_data):
    pages = [i for i in read_warc(str(shared_data / "warc/webarchive/dolma_warc_sample-0001.warc.gz")) if isinstance(i, Page)]
    assert pages and all(not page.url.startswith("<") for page in pages)
    assert kinds(shared_data / "warc/webarchive/pywb_iana.warc.gz")["revisit"] == 123


def test_truncated_gzip_tail_keeps_what_was_read_and_says_so(shared_data, tmp_path):
    data = (shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz").read_bytes()
    full = kinds(shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz")
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    counts = kinds(cut)
    assert counts["truncated_file"] == 1
    assert 0 < counts["ImageRecord"] < full["ImageRecord"]
    cut.write_bytes(data[:-100])
    assert kinds(cut)["truncated_file"] == 1


def test_clipped_record_is_reported(shared_data):
    counts = kinds(shared_data / "warc/research-crawls/resiliparse_clipped.warc.gz")
    assert counts["Page"] == 1 and counts["truncated_file"] == 1


def test_garbage_and_empty_files_never_raise(shared_data, tmp_path):
    data = (shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz").read_bytes()
    garbage = tmp_path / "garbage.warc.gz"
    garbage.write_bytes(data[:1000] + os.urandom(4000) + data[1000:])
    assert kinds(garbage)["truncated_file"] == 1
    noise = tmp_path / "noise.warc.gz"
    noise.write_bytes(os.urandom(3000))
    assert set(kinds(noise)) <= {"truncated_file"}
    empty = tmp_path / "empty.warc.gz"
    empty.write_bytes(b"")
    assert kinds(empty) == Counter()


def test_oversized_payloads_are_rejected_not_read(shared_data):
    limits = ReadLimits(max_html_bytes=10_000, max_image_bytes=20_000)
    items = list(read_warc(str(shared_data / "warc/webarchive/aut_example.warc.gz"), limits))
    too_large = [i for i in items if isinstance(i, SkippedRecord) and i.reason == "too_large"]
    assert too_large
    assert all(len(i.html) <= 10_000 for i in items if isinstance(i, Page))
    assert all(len(i.data) <= 20_000 for i in items if isinstance(i, ImageRecord))
