"""Provenance and rights on every row: WARC file, record id and capture date of the page and of each
image, page language, declared licence and the opt-out checks made; triplets keep the pair's."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType

from magiclens.cli import main
from magiclens.pipeline import schemas
from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.extract.licenses import identify_license, identify_licenses, is_license_rel
from magiclens.pipeline.pairs import FETCHED, ImageCapture, PageImage, PageInfo, pair_row
from magiclens.pipeline.records import ImageRecord, ImageRef, NormalizedImage, Page
from magiclens.pipeline.warc import read_warc

WIKIPEDIA = "warc/webarchive/ukwa_*wikipedia*.warc.gz"


def _table(folder: Path) -> list[dict]:
    return pq.ParquetDataset(sorted(str(f) for f in folder.glob("*.parquet"))).read().to_pylist()


def _captures(paths: list[Path]) -> dict[str, dict]:
    """WARC-Record-ID -> what the WARC says of the record, read with FastWARC directly."""
    found = {}
    for path in paths:
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream, record_types=WarcRecordType.response | WarcRecordType.revisit):
                found[record.record_id] = {
                    "file": path.name,
                    "url": record.headers.get("WARC-Target-URI"),
                    "date": record.headers.get("WARC-Date"),
                }
    return found


@pytest.fixture(scope="module")
def wikipedia_run(shared_data, tmp_path_factory) -> tuple[list[dict], list[dict], dict]:
    """A real `mine` and `instruct --writer template` run on the UKWA Wikipedia WARCs."""
    output = tmp_path_factory.mktemp("provenance")
    assert main(["mine", "--output", str(output / "mined"), "--no-fetch", "--min-side", "64",
                 "--input", str(shared_data / WIKIPEDIA), "--runner=FnApiRunner"]) == 0
    assert main(["instruct", "--pairs", str(output / "mined" / "pairs"), "--output", str(output / "triplets"),
                 "--writer", "template", "--runner=FnApiRunner"]) == 0
    captures = _captures(sorted(shared_data.glob(WIKIPEDIA)))
    return _table(output / "mined" / "pairs"), _table(output / "triplets" / "triplets"), captures


def test_pairs_name_the_real_warc_records_of_the_page_and_of_each_image(wikipedia_run):
    pairs, _, captures = wikipedia_run
    assert pairs
    for row in pairs:
        page = captures[row["page_record_id"]]
        assert (row["page_warc_file"], row["page_date"]) == (page["file"], page["date"])
        assert page["url"] == row["page_url"]
        assert row["page_date"].startswith("2012-01-")
        for side in ("query", "target"):
            image = captures[row[f"{side}_record_id"]]
            assert (row[f"{side}_warc_file"], row[f"{side}_date"]) == (image["file"], image["date"])
            assert image["url"] == row[f"{side}_image_url"]


def test_pairs_carry_the_wikipedia_cc_by_sa_licence_language_and_opt_out_checks(wikipedia_run):
    pairs, _, _ = wikipedia_run
    for row in pairs:
        assert row["page_license"] == "cc-by-sa-3.0"
        assert "rel=license http://creativecommons.org/licenses/by-sa/3.0/" in row["page_license_declared"].split("\n")
        assert row["page_lang"] == "en"
        assert row["opt_out_checks"] == "x-robots-tag,meta-robots,meta-magiclens,tdm-reservation"


def test_triplets_keep_every_column_of_their_pair(wikipedia_run):
    pairs, triplets, _ = wikipedia_run
    by_id = {row["pair_id"]: row for row in pairs}
    assert len(triplets) == len(pairs)
    for triplet in triplets:
        pair = by_id[triplet["pair_id"]]
        for column in schemas.PAIR_COLUMNS_IN_TRIPLETS:
            assert triplet[column] == pair[column], column
        assert triplet["query_image"] == pair["query_image"] and triplet["query_url"] == pair["query_url"]
    assert {"page_record_id", "query_alt", "target_sha256", "crawl", "scores"} <= set(schemas.PAIR_COLUMNS_IN_TRIPLETS)


def test_a_revisit_keeps_its_own_record_id_and_capture_date(shared_data):
    path = shared_data / "warc/webarchive/pywb_iana.warc.gz"
    revisits = _captures([path])
    with open(path, "rb") as stream:
        revisit_ids = {record.record_id for record in ArchiveIterator(stream, record_types=WarcRecordType.revisit)}
    resolved = [item for item in read_warc(str(path)) if isinstance(item, (Page, ImageRecord))
                and item.record_id in revisit_ids]
    assert resolved
    for item in resolved:
        assert item.date == revisits[item.record_id]["date"]
        assert item.warc_file == "pywb_iana.warc.gz"


def test_both_parsers_read_the_same_licences_from_every_real_page(shared_data):
    declared = {}
    for path in sorted(shared_data.glob("warc/*/*.warc*")):
        for item in read_warc(str(path)):
            if isinstance(item, Page):
                lexbor = extract_images(item.html, item.url, charset=item.charset).license_declared
                soup = extract_images(item.html, item.url, charset=item.charset, parser="bs4").license_declared
                assert lexbor == soup, item.url
                if lexbor:
                    declared[item.url] = identify_licenses(lexbor)
    assert declared["https://an.wikipedia.org/wiki/Escopete"] == "cc-by-sa-4.0"  # <link rel="license">
    assert declared["http://www.archive.org/details/JTRNET15"] == "cc-by-nc-nd-3.0"  # <a rel="license">
    assert declared["https://soldaini.net/"] == "cc-by-4.0"  # rel="license noopener noreferrer"
    # <META NAME= "Copyright" content=...>: a rights statement, kept as declared, no licence recognised
    assert declared["http://06.live-radsport.ch/tippspiel/stats_140_petzi.html"] == ""


@pytest.mark.parametrize("text, expected", [
    ("http://creativecommons.org/licenses/by-sa/3.0/", "cc-by-sa-3.0"),
    ("https://creativecommons.org/licenses/by-sa/4.0/deed.an", "cc-by-sa-4.0"),
    ("https://creativecommons.org/licenses/by/2.0/de/", "cc-by-2.0-de"),
    ("http://creativecommons.org/licenses/by/4.0/?ref=chooser-v1", "cc-by-4.0"),
    ("https://creativecommons.org/publicdomain/zero/1.0/", "cc0-1.0"),
    ("https://creativecommons.org/publicdomain/mark/1.0/", "cc-pdm-1.0"),
    ("http://creativecommons.org/licenses/publicdomain/", "cc-publicdomain"),
    ("meta dc.rights: This work is licensed under CC BY-NC-SA 4.0", "cc-by-nc-sa-4.0"),
    ("meta license: CC0", "cc0-1.0"),
    ("https://www.gnu.org/licenses/fdl-1.3.html", "gfdl"),
    ("meta copyright: Movetec GmbH", ""),
])
def test_licences_are_identified(text, expected):
    assert identify_license(text) == expected


def test_license_rel_is_a_token_of_the_rel_attribute():
    assert is_license_rel("license") and is_license_rel("License noopener") and is_license_rel("nofollow\tlicense")
    assert not is_license_rel("licensed") and not is_license_rel("") and not is_license_rel(None)


def test_licence_links_and_metas_are_read_resolved_and_in_page_order():
    html = (b'<html><head><link rel="License" href="/terms"><meta name="DC.Rights" content=" CC BY 4.0 ">'
            b'<meta name="dcterms.license" content="https://creativecommons.org/licenses/by/4.0/"></head>'
            b'<body><a rel="license" href="//creativecommons.org/licenses/by/4.0/">CC</a>'
            b'<a rel="licence" href="/not-a-licence-link">x</a></body></html>')
    for parser in ("lexbor", "bs4"):
        found = extract_images(html, "https://example.org/a/page", parser=parser)
        assert found.license_declared == (
            "rel=license https://example.org/terms",
            "rel=license https://creativecommons.org/licenses/by/4.0/",
            "meta dc.rights: CC BY 4.0",
            "meta dcterms.license: https://creativecommons.org/licenses/by/4.0/",
        ), parser
        assert identify_licenses(found.license_declared) == "cc-by-4.0"


def test_a_pair_with_a_fetched_image_says_so_and_lists_the_fetch_checks():
    page = PageInfo(url="https://example.org/", title="t", lang="en", crawl="c", license="cc-by-4.0",
                    license_declared="rel=license https://creativecommons.org/licenses/by/4.0/",
                    warc_file="a.warc.gz", record_id="<urn:uuid:1>", date="2024-05-01T00:00:00Z")
    image = NormalizedImage(b"\xff\xd8", 8, 8, 8, 8, "JPEG", "a" * 64, "0" * 16, 1.0, "h00")
    other = NormalizedImage(b"\xff\xd9", 8, 8, 8, 8, "JPEG", "b" * 64, "f" * 16, 1.0, "h00")
    ref = ImageRef(url="https://example.org/a.jpg", alt="", title="", context="", width=None, height=None,
                   position=0, source="src")
    archived = PageImage(page, ref, image, capture=ImageCapture("a.warc.gz", "<urn:uuid:2>", "2024-05-01T00:00:01Z"))
    fetched = PageImage(page, ref, other, capture=ImageCapture("", FETCHED, "2026-01-01T00:00:00Z"))
    row = pair_row(archived, fetched)
    assert row["opt_out_checks"] == "x-robots-tag,meta-robots,meta-magiclens,tdm-reservation,robots.txt,tdmrep"
    assert (row["target_warc_file"], row["target_record_id"], row["target_date"]) == ("", "fetched", "2026-01-01T00:00:00Z")
    assert (row["query_record_id"], row["page_record_id"], row["page_license"]) == ("<urn:uuid:2>", "<urn:uuid:1>", "cc-by-4.0")
    assert set(row) == set(schemas.PAIRS.names)
