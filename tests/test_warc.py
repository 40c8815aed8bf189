"""WARC reading on genuine crawls, including broken and hostile files."""

from __future__ import annotations

import brotli
import gzip
import json
import os
import zlib
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from magiclens.cli import main
from magiclens.pipeline.http_payload import PayloadRejected, decode_http_payload
from magiclens.pipeline.records import ImageRecord, Page
from magiclens.pipeline.warc import ReadLimits, SkippedRecord, read_warc
from warcs import payload_digest, response_record, revisit_record, write_records

PAGE = "http://example.org/gallery"


def kinds(path: Path | str, limits: ReadLimits = ReadLimits()) -> Counter:
    counts: Counter = Counter()
    for item in read_warc(str(path), limits):
        counts[item.reason if isinstance(item, SkippedRecord) else type(item).__name__] += 1
    return counts


def items(path: Path | str, limits: ReadLimits = ReadLimits()) -> list:
    return list(read_warc(str(path), limits))


@pytest.fixture(scope="module")
def real_html(shared_data) -> bytes:
    return gzip.decompress((shared_data / "html/readability/bbc-1.html.gz").read_bytes())


def pages_of(records: list[bytes], tmp_path: Path, gzipped: bool = True) -> list:
    return items(write_records(tmp_path / "test.warc.gz", records, gzipped))


# --- genuine crawls ------------------------------------------------------------------------------


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
    assert not {"truncated_file", "corrupt_file", "record_length_mismatch"} & set(counts)


def test_angle_bracket_uris(shared_data):
    pages = [i for i in read_warc(str(shared_data / "warc/webarchive/dolma_warc_sample-0001.warc.gz")) if isinstance(i, Page)]
    assert pages and all(not page.url.startswith("<") for page in pages)


# --- HTTP encodings ------------------------------------------------------------------------------


def test_gzip_encoded_pages_of_a_real_archive_are_decoded(shared_data):
    pages = [i for i in read_warc(str(shared_data / "warc/webarchive/aut_issue-493.warc")) if isinstance(i, Page)]
    assert len(pages) == 4  # its 4 HTML pages are all stored with Content-Encoding: gzip
    assert all(b"<img" in page.html.lower() and not page.html.startswith(b"\x1f\x8b") for page in pages)


def test_chunked_payloads_kept_and_removed_by_archivers_both_read(shared_data):
    # dolma (wget) keeps the chunk-size lines; pywb removed them but kept the header
    for name in ("dolma_warc_sample-0001.warc.gz", "pywb_iana.warc.gz"):
        pages = [i for i in read_warc(str(shared_data / "warc/webarchive" / name)) if isinstance(i, Page)]
        assert pages and all(page.html.lstrip()[:1] == b"<" for page in pages), name


def test_encoded_and_chunked_payloads_are_decoded_in_pages_and_images(shared_data, real_html, tmp_path):
    jpeg = (shared_data / "images/photos/skimage/rocket.jpg").read_bytes()
    encoders = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    records = [response_record(f"{PAGE}/{name}", "text/html", encode(real_html), headers={"Content-Encoding": name})
               for name, encode in encoders.items()]
    records.append(response_record(f"{PAGE}/raw-deflate", "text/html",
                                   raw_deflate.compress(real_html) + raw_deflate.flush(),
                                   headers={"Content-Encoding": "deflate"}))
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece)
                       for piece in (real_html[i:i + 4000] for i in range(0, len(real_html), 4000))) + b"0\r\n\r\n"
    records.append(response_record(f"{PAGE}/chunked", "text/html", chunked, headers={"Transfer-Encoding": "chunked"}))
    gzipped = gzip.compress(jpeg)
    records.append(response_record("http://example.org/rocket.jpg", "image/jpeg",
                                   b"%x\r\n%s\r\n0\r\n\r\n" % (len(gzipped), gzipped),
                                   headers={"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"}))
    read = pages_of(records, tmp_path)
    assert [type(item).__name__ for item in read] == ["Page"] * 6 + ["ImageRecord"]
    assert all(item.html == real_html for item in read[:6])
    assert read[6].data == jpeg


def test_bad_encodings_are_rejects_with_reasons(real_html, tmp_path):
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MB of zeros in about 64 KB
    records = [
        response_record(f"{PAGE}/bomb", "text/html", bomb, headers={"Content-Encoding": "gzip"}),
        response_record(f"{PAGE}/broken", "text/html", gzip.compress(real_html)[:-200], headers={"Content-Encoding": "gzip"}),
        response_record(f"{PAGE}/not-brotli", "text/html", real_html, headers={"Content-Encoding": "br"}),
        response_record(f"{PAGE}/compress", "text/html", real_html, headers={"Content-Encoding": "compress"}),
        response_record(f"{PAGE}/bad-chunks", "text/html", b"10\r\nshort\r\n", headers={"Transfer-Encoding": "chunked"}),
    ]
    read = pages_of(records, tmp_path)
    assert [item.reason for item in read] == ["decoded_too_large", "content_encoding_error", "content_encoding_error",
                                             "unsupported_content_encoding", "transfer_encoding_error"]
    assert read[1].detail.startswith("gzip:") and read[3].detail == "compress"


def test_decoding_is_capped_for_every_encoding():
    data = b"a" * 100_000
    for name, encoded in (("gzip", gzip.compress(data)), ("deflate", zlib.compress(data)),
                          ("br", brotli.compress(data)), ("zstd", zstandard.ZstdCompressor().compress(data))):
        assert decode_http_payload(encoded, name, None, 100_000) == data
        with pytest.raises(PayloadRejected) as rejected:
            decode_http_payload(encoded, name, None, 99_999)
        assert rejected.value.reason == "decoded_too_large", name
    assert decode_http_payload(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", None, 10) == b"abcd"
    assert decode_http_payload(b"plain", "identity", None, 10) == b"plain"


# --- revisit records ----------------------------------------------------------------------------


def test_revisits_of_a_real_archive_resolve_to_their_originals(shared_data):
    path = shared_data / "warc/webarchive/aut_issue-493.warc"
    images = [i for i in read_warc(str(path)) if isinstance(i, ImageRecord)]
    assert len(images) == 10  # 5 image responses + 5 revisits of them
    by_url: dict[str, set[bytes]] = {}
    for image in images:
        by_url.setdefault(image.url, set()).add(image.data)
    assert all(len(datas) == 1 for datas in by_url.values())  # a revisit carries its original's bytes
    assert len({image.record_id for image in images}) == 10  # each under its own record id

    counts = kinds(shared_data / "warc/webarchive/pywb_iana.warc.gz")
    assert "revisit_unresolved" not in counts and "revisit" not in counts
    assert counts["ImageRecord"] == 4 + 29  # the MANIFEST's 4 images, plus the 29 svg revisits
    assert sum(counts.values()) == 48 + 123  # every response and every revisit accounted for


def test_revisit_resolved_by_digest_under_its_own_url_or_rejected(shared_data, tmp_path):
    jpeg = (shared_data / "images/photos/skimage/rocket.jpg").read_bytes()
    original = "http://example.org/a/rocket.jpg"
    records = [
        # the revisit comes first and names another URL: found by its payload digest
        revisit_record("http://example.org/b/rocket.jpg", "http://elsewhere.org/x.jpg", "2023-01-01T00:00:00Z",
                       payload_digest(jpeg)),
        response_record(original, "image/jpeg", jpeg),
        revisit_record("http://example.org/c/gone.jpg", "http://example.org/c/gone.jpg", "2020-01-01T00:00:00Z",
                       payload_digest(b"not archived")),
    ]
    read = pages_of(records, tmp_path)
    images = [item for item in read if isinstance(item, ImageRecord)]
    assert sorted(image.url for image in images) == [original, "http://example.org/b/rocket.jpg"]
    assert all(image.data == jpeg for image in images)
    unresolved = [item for item in read if isinstance(item, SkippedRecord)]
    assert [item.reason for item in unresolved] == ["revisit_unresolved"]
    assert "gone.jpg" in unresolved[0].element_id


# --- hostile and broken files -------------------------------------------------------------------


def three_pages(real_html: bytes) -> list[bytes]:
    return [response_record(f"{PAGE}/{n}", "text/html", real_html) for n in range(3)]


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_record_claiming_a_gigabyte_does_not_swallow_the_rest(real_html, tmp_path, gzipped):
    first, second, third = three_pages(real_html)
    liar = response_record(f"{PAGE}/liar", "text/html", real_html, content_length=1 << 30)
    read = pages_of([first, liar, second, third], tmp_path, gzipped)
    assert [getattr(item, "reason", type(item).__name__) for item in read] == ["Page", "too_large", "Page", "Page"]


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_too_long_or_too_short_content_length_is_a_named_reject(real_html, tmp_path, gzipped):
    first, second, third = three_pages(real_html)
    block = len(first) - first.index(b"\r\n\r\n") - 8
    for wrong in (12, 40, block - 100, block + 40):
        bad = response_record(f"{PAGE}/bad", "text/html", real_html, content_length=wrong)
        read = pages_of([first, bad, second, third], tmp_path, gzipped)
        reasons = [getattr(item, "reason", type(item).__name__) for item in read]
        assert reasons == ["Page", "record_length_mismatch", "Page", "Page"], (wrong, reasons)


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_file_cut_inside_its_last_page_never_uses_the_fragment(real_html, tmp_path, gzipped):
    path = write_records(tmp_path / "cut.warc", three_pages(real_html), gzipped)
    data = path.read_bytes()
    path.write_bytes(data[:-3000])
    read = items(path)
    assert [getattr(item, "reason", type(item).__name__) for item in read] == \
        ["Page", "Page", "truncated_record", "truncated_file"]
    assert read[2].element_id.endswith(f"{PAGE}/2")


def test_truncated_real_file_keeps_what_was_read_and_says_so(shared_data, tmp_path):
    data = (shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz").read_bytes()
    full = kinds(shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz")
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    counts = kinds(cut)
    assert counts["truncated_file"] == 1
    assert 0 < counts["ImageRecord"] < full["ImageRecord"]
    cut.write_bytes(data[:-100])
    assert kinds(cut)["truncated_file"] == 1


def test_clipped_real_record_is_rejected_not_used(shared_data):
    counts = kinds(shared_data / "warc/research-crawls/resiliparse_clipped.warc.gz")
    assert counts == Counter({"truncated_record": 1, "truncated_file": 1})


def test_corrupt_bytes_are_skipped_and_reading_resumes(shared_data, real_html, tmp_path):
    first, second, third = three_pages(real_html)
    garbage = tmp_path / "garbage.warc.gz"
    garbage.write_bytes(gzip.compress(first) + os.urandom(3000) + gzip.compress(second) + gzip.compress(third))
    assert kinds(garbage) == Counter({"Page": 3, "corrupt_file": 1})
    plain = write_records(tmp_path / "junk.warc", [first, b"junk line\r\n" * 20 + second, third], gzipped=False)
    assert kinds(plain) == Counter({"Page": 3, "corrupt_file": 1})
    # random bytes inside a member of a real crawl: that member is lost, the file is flagged, no crash
    data = (shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz").read_bytes()
    real = tmp_path / "real.warc.gz"
    real.write_bytes(data[:1000] + os.urandom(4000) + data[1000:])
    counts = kinds(real)
    assert counts["corrupt_file"] == 1 and counts["ImageRecord"] >= 39


def test_empty_noise_and_derived_files_are_rejected_with_reasons(shared_data, tmp_path):
    empty = tmp_path / "empty.warc.gz"
    empty.write_bytes(b"")
    assert kinds(empty) == Counter({"empty_file": 1})
    noise = tmp_path / "noise.warc.gz"
    noise.write_bytes(os.urandom(3000))
    assert kinds(noise) == Counter({"not_a_warc": 1})
    for name in ("cc-whirlwind_whirlwind.warc.wat.gz", "cc-whirlwind_whirlwind.warc.wet.gz"):
        read = items(shared_data / "warc/commoncrawl" / name)
        assert [item.reason for item in read] == ["wat_or_wet_file"]
        assert "not the WARC response records" in read[0].detail


def test_oversized_payloads_are_rejected_not_read(shared_data):
    limits = ReadLimits(max_html_bytes=10_000, max_image_bytes=20_000)
    read = items(shared_data / "warc/webarchive/aut_example.warc.gz", limits)
    too_large = [i for i in read if isinstance(i, SkippedRecord) and i.reason == "too_large"]
    assert too_large
    assert all(len(i.html) <= 10_000 for i in read if isinstance(i, Page))
    assert all(len(i.data) <= 20_000 for i in read if isinstance(i, ImageRecord))


# --- end to end ---------------------------------------------------------------------------------


def test_mine_pairs_images_of_an_encoded_page_behind_a_lying_record(shared_data, tmp_path):
    photos = shared_data / "images/photos/skimage"
    names = ["rocket.jpg", "coffee.png", "chelsea.png"]
    imgs = "".join(f'<figure><img src="/img/{name}" alt="a photo of {name}"></figure>' for name in names)
    html = f"<html><head><title>Photos</title></head><body><p>Our photos.</p>{imgs}</body></html>".encode()
    records = [
        response_record(f"{PAGE}/x", "text/html", html, content_length=1 << 30),  # a liar first
        response_record(PAGE, "text/html; charset=utf-8", gzip.compress(html), headers={"Content-Encoding": "gzip"}),
        response_record("http://example.org/img/rocket.jpg", "image/jpeg", (photos / "rocket.jpg").read_bytes()),
        response_record("http://example.org/img/coffee.png", "image/png", (photos / "coffee.png").read_bytes(),
                        date="2024-01-01T00:00:01Z"),
        # chelsea only as a revisit of a capture stored at another URL
        response_record("http://example.org/old/chelsea.png", "image/png", (photos / "chelsea.png").read_bytes()),
        revisit_record("http://example.org/img/chelsea.png", "http://example.org/old/chelsea.png",
                       "2024-01-01T00:00:00Z", payload_digest((photos / "chelsea.png").read_bytes()), "image/png"),
    ]
    warc = write_records(tmp_path / "site.warc.gz", records)
    empty = tmp_path / "empty.warc.gz"
    empty.write_bytes(b"")
    output = tmp_path / "out"
    args = ["mine", "--output", str(output), "--no-fetch", "--runner=FnApiRunner",
            "--input", str(warc), "--input", str(empty)]
    assert main(args) == 0
    stages = json.loads((output / "stats.json").read_text())["stages"]
    for name, entry in stages.items():
        if "in" in entry:
            assert entry["in"] == entry["out"] + sum(entry["rejected"].values()), name
    assert stages["warc_files"]["rejected"] == {"empty_file": 1}
    assert stages["records"]["rejected"] == {"too_large": 1}
    assert stages["records"]["out"] == 5  # the page, 3 images, the revisit
    assert stages["images"]["out"] == 3
    assert stages["outputs"]["pairs"] >= 1
