"""`mine`, `instruct` and `report` read and write gs:// end to end, on the GCS emulator.

Inside a private network namespace (tests/gcs_emulator.py): the shared WARCs are uploaded to the
emulator, one of them as a Common Crawl mirror (crawl-data/CC-MAIN-2020-34/warc.paths.gz and the
genuine CC-MAIN-2020-34 WARC it lists), and every path the commands see is a gs:// path.
"""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcs_emulator import (
    assert_passed_inside,
    download,
    gcs_emulator,
    listing,
    private_network_outcomes,
    rerun_in_private_network,
    upload,
)
from magiclens.cli import main

CRAWL = "CC-MAIN-2020-34"
# the name the warcinfo record of the shared Common Crawl excerpt gives for its file
CC_WARC_PATH = (f"crawl-data/{CRAWL}/segments/1596439738015.38/warc/"
                "CC-MAIN-20200808165417-20200808195417-00395.warc.gz")


def read_parquet(paths: list[str], columns: list[str] | None = None):
    assert paths
    return pa.concat_tables([pq.read_table(io.BytesIO(download(path)), columns=columns) for path in paths])


def assert_balanced(stats: dict) -> None:
    for name, entry in stats["stages"].items():
        assert entry.get("balanced", True), name


def test_mine_instruct_and_report_on_gcs_paths(shared_data, tmp_path, capsys):
    if rerun_in_private_network(__file__, "test_mine_instruct_and_report_on_gcs_paths"):
        return
    webarchives = sorted((shared_data / "warc/webarchive").glob("ukwa_*.warc.gz"))
    with gcs_emulator(tmp_path) as bucket:
        for warc in webarchives:
            upload(warc, f"{bucket}/warcs/{warc.name}")
        upload(shared_data / "warc/commoncrawl/resiliparse_warcfile.warc.gz", f"{bucket}/cc/{CC_WARC_PATH}")
        paths_file = tmp_path / "warc.paths.gz"
        paths_file.write_bytes(gzip.compress(f"{CC_WARC_PATH}\n".encode()))
        upload(paths_file, f"{bucket}/cc/crawl-data/{CRAWL}/warc.paths.gz")

        assert main(["mine", "--crawl", CRAWL, "--crawl-base", f"{bucket}/cc/", "--dry-run",
                     "--output", f"{bucket}/unused"]) == 0
        assert capsys.readouterr().out.split() == [f"{bucket}/cc/{CC_WARC_PATH}"]
        assert listing(f"{bucket}/unused/*") == []

        mined = f"{bucket}/mined"
        assert main(["mine", "--input", f"{bucket}/warcs/ukwa_*.warc.gz", "--crawl", CRAWL, "--crawl-base", f"{bucket}/cc/",
                     "--output", mined, "--no-fetch", "--min-side", "40"]) == 0
        stats = json.loads(download(f"{mined}/stats.json"))
        assert_balanced(stats)
        assert stats["stages"]["warc_files"]["in"] == len(webarchives) + 1
        # the Common Crawl pages were read (their images are on the web, so not in the input)
        assert stats["stages"]["images"]["rejected"]["not_in_input"] > 0
        pairs = read_parquet(listing(f"{mined}/pairs/*.parquet"))
        assert pairs.num_rows == stats["stages"]["outputs"]["pairs"] > 0
        assert listing(f"{mined}/rejects/*.parquet")

        # the pairs hold the web archives' images, read back from gs://
        for row in pairs.select(["page_url", "query_image", "target_image"]).to_pylist():
            assert row["page_url"].startswith("http") and row["query_image"]["bytes"] != row["target_image"]["bytes"]

        instructed = f"{bucket}/instructed"
        assert main(["instruct", "--pairs", f"{mined}/pairs", "--writer", "template", "--output", instructed]) == 0
        triplets = read_parquet(listing(f"{instructed}/triplets/*.parquet"), ["triplet_id", "instruction", "pair_id"])
        instruct_stats = json.loads(download(f"{instructed}/stats.json"))
        assert_balanced(instruct_stats)
        assert instruct_stats["stages"]["instruct"]["in"] == pairs.num_rows
        assert triplets.num_rows == instruct_stats["stages"]["outputs"]["triplets"] > 0
        assert set(triplets.column("pair_id").to_pylist()) <= set(pairs.column("pair_id").to_pylist())

        # every run leaves its report beside its outputs; `magiclens report` rebuilds it from gs://
        assert "data:image/jpeg;base64," in download(f"{mined}/report.html").decode()
        assert main(["report", instructed]) == 0
        report = download(f"{instructed}/report.html").decode()
        assert report.count('class="card"') == triplets.num_rows
        assert f"<b>{triplets.num_rows:,}</b> triplets" in report


INNER_TESTS = """
import socket

import pytest


def test_passes():
    assert [name for _, name in socket.if_nameindex()] == ["lo"]


def test_skips():
    pytest.skip("a tool is missing in here")


def test_fails():
    assert False, "broken in here"
"""


def test_a_test_that_skips_or_fails_in_the_private_network_fails_outside(tmp_path):
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TESTS)
    outcomes = private_network_outcomes(str(inner))
    assert {name: ending.outcome for name, ending in outcomes.items()} == {
        "test_passes": "passed", "test_skips": "skipped", "test_fails": "failed"}
    assert_passed_inside(outcomes, "test_passes")  # only loopback in there
    with pytest.raises(AssertionError, match="test_skips skipped in the private network namespace"):
        assert_passed_inside(outcomes, "test_skips")
    with pytest.raises(AssertionError, match="broken in here"):
        assert_passed_inside(outcomes, "test_fails")
    with pytest.raises(AssertionError, match="did not run"):
        assert_passed_inside(outcomes, "test_missing")
    # the one-test helper: its pytest exits 0 on a skip, and the skip still fails the outer test
    with pytest.raises(AssertionError, match="test_skips skipped"):
        rerun_in_private_network(str(inner), "test_skips")
    assert rerun_in_private_network(str(inner), "test_passes") is True
