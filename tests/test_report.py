"""report.html for real `mine` and `instruct` runs, opened in headless Chromium.

Chromium is driven through the DevTools protocol (a websocket, with aiohttp): the test waits for the
page to load, reads every <img>'s naturalWidth and on-screen box, takes a full-page screenshot and
checks that each thumbnail's box holds a real picture (many colours), not a blank or broken icon.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from devtools import open_page
from magiclens.cli import main
from magiclens.pipeline.report import (
    MAX_BARS,
    Histogram,
    escape,
    histogram_svg,
    link,
    pair_card,
    pair_histograms,
    parquet_files,
    sample_rows,
    triplet_card,
    write_report,
)


@pytest.fixture(scope="module")
def mined(shared_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("mined")
    # web archives that hold their images; a low size floor keeps their many small 2008-era photos
    inputs = ["--input", str(shared_data / "warc/webarchive/ukwa_*.warc.gz"),
              "--input", str(shared_data / "warc/webarchive/aut_example.warc.gz")]
    assert main(["mine", *inputs, "--output", str(output), "--no-fetch", "--min-side", "40"]) == 0
    return output


@pytest.fixture(scope="module")
def instructed(mined, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("instructed")
    assert main(["instruct", "--pairs", str(mined / "pairs"), "--writer", "template", "--output", str(output)]) == 0
    return output


# --- the report in headless Chromium --------------------------------------------------------------


async def _render(url: str, profile: Path) -> tuple[list[dict], bytes]:
    async with open_page(url, profile) as page:
        await page.wait_for("location.protocol === 'file:' && document.readyState === 'complete'", tries=300)
        height = await page.evaluate("document.documentElement.scrollHeight")
        await page.call("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1, mobile=False)
        images = await page.evaluate(
            "[...document.images].map(i => ({natural: i.naturalWidth, complete: i.complete,"
            " box: (r => [r.x, r.y + window.scrollY, r.width, r.height])(i.getBoundingClientRect())}))"
        )
        shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    return images, base64.b64decode(shot["data"])


def render(report: Path, tmp_path: Path) -> tuple[list[dict], Image.Image]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    images, png = asyncio.run(asyncio.wait_for(_render(report.as_uri(), profile), timeout=120))
    return images, Image.open(io.BytesIO(png)).convert("RGB")


def colours_in(screenshot: Image.Image, box: list[float]) -> int:
    x, y, width, height = (round(v) for v in box)
    region = screenshot.crop((x, y, x + width, y + height))
    return len(set(region.getdata()))


def assert_thumbnails_render(report: Path, tmp_path: Path, expected: int) -> None:
    images, screenshot = render(report, tmp_path)
    assert len(images) == expected
    for image in images:
        assert image["complete"] and image["natural"] > 0, image
        assert image["box"][2] >= 40 and image["box"][3] >= 10, image
        # a decoded thumbnail shows many colours; a blank box or a broken-image icon a handful
        assert colours_in(screenshot, image["box"]) > 30, image
    assert len(set(screenshot.resize((320, 320)).getdata())) > 1000


def assert_self_contained(text: str) -> None:
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert re.findall(r'<img [^>]*src="([^"]{0,30})', text)
    assert all(src.startswith("data:image/jpeg;base64,") for src in re.findall(r'<img [^>]*src="([^"]{0,30})', text))
    assert not re.search(r'(src|href)="(?!data:|https?://)', text)  # only inline data and plain links
    assert "Content-Security-Policy" in text


# --- tests ----------------------------------------------------------------------------------------


def test_report_of_a_mine_run_shows_funnel_histograms_and_pairs_in_chromium(mined, tmp_path):
    assert main(["report", str(mined)]) == 0
    report = mined / "report.html"
    text = report.read_text()
    assert_self_contained(text)
    stats = json.loads((mined / "stats.json").read_text())
    for stage in ("records", "pages", "refs", "images", "pair_pages"):
        entry = stats["stages"][stage]
        assert f"<code>{stage}</code></td><td class=\"n\">{entry['in']:,}</td><td class=\"n\">{entry['out']:,}</td>" in text
    pairs = stats["stages"]["outputs"]["pairs"]
    assert f"<b>{pairs:,}</b> pairs" in text
    for reason in stats["stages"]["pages"]["rejected"]:
        assert reason in text
    samples = min(pairs, 24)
    assert text.count('class="card"') == samples
    example_thumbnails = text.count("<li><figure>")
    assert example_thumbnails >= 1  # images dropped after decoding show what was dropped
    assert_thumbnails_render(report, tmp_path, expected=2 * samples + example_thumbnails)


def test_report_shows_the_funnel_per_warc_file_and_examples_of_each_reject_reason(mined):
    assert main(["report", str(mined)]) == 0
    text = (mined / "report.html").read_text()
    files = json.loads((mined / "files.json").read_text())
    assert {Path(row["file"]).name for row in files} == {"aut_example.warc.gz", "ukwa_sopa-wikipedia-homepage.warc.gz",
        "ukwa_wikipedia-post-blackout-main-page.warc.gz", "ukwa_wikipedia-post-blackout.warc.gz",
        "ukwa_IAH-20080430204825-00000-blackbook-truncated.warc.gz"}
    stats = json.loads((mined / "stats.json").read_text())["stages"]
    assert sum(row["records"] for row in files) == stats["records"]["in"]
    assert sum(row["pages"] for row in files) == stats["pages"]["in"]
    table = text.split("<h2>Per WARC file</h2>", 1)[1].split("</table>", 1)[0]
    for row in files:
        assert f"<td>{row['file']}</td><td class=\"n\">{row['records']:,}</td>" in table
    pairs = pq.read_table(parquet_files(str(mined / "pairs")), columns=["page_warc_file"]).column(0).to_pylist()
    shown = sum(int(cells.split('<td class="n">')[7].split("<")[0].replace(",", "")) for cells in table.split("<tr>")[2:])
    assert shown == len(pairs)  # the pairs column adds up to the pairs written
    examples = text.split("<h2>Examples of each reject reason</h2>", 1)[1]
    for stage, entry in stats.items():
        for reason in entry.get("rejected", {}):
            heading = f"<h3><code>{stage}</code> {reason}</h3>"
            assert heading in examples, heading
            listed = examples.split(heading, 1)[1].split("</ul>", 1)[0]
            assert 1 <= listed.count("<li>") <= 3


def test_report_of_an_instruct_run_shows_triplets_with_instructions(instructed, tmp_path):
    path = write_report(str(instructed), samples=6)
    assert path == str(instructed / "report.html")
    text = Path(path).read_text()
    assert_self_contained(text)
    triplets = pq.read_table(parquet_files(str(instructed / "triplets")), columns=["instruction"]).column(0).to_pylist()
    assert text.count('class="card"') == min(6, len(triplets))
    assert escape(triplets[0]) in text  # the first triplet's instruction, escaped
    assert "Instruction length" in text
    assert_thumbnails_render(Path(path), tmp_path, expected=2 * min(6, len(triplets)))


def test_histograms_count_every_pair_and_samples_read_only_what_they_show(mined):
    files = parquet_files(str(mined / "pairs"))
    table = pq.read_table(files, columns=["query_width", "target_width", "scores"])
    width, height, *scores = pair_histograms(files)
    assert width.total == height.total == 2 * table.num_rows
    assert width.counts[max(table.column("query_width").to_pylist()) // 32] > 0
    scored = sum(1 for value in table.column("scores").to_pylist() if value is not None)
    for histogram in scores:
        assert histogram.total + histogram.missing == table.num_rows
        assert histogram.total <= scored
    rows = sample_rows(files, ["page_url", "query_alt"], 3)
    assert len(rows) == 3 and all(set(row) == {"page_url", "query_alt"} for row in rows)


def test_web_text_is_escaped_and_only_http_urls_become_links():
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    card = pair_card({
        "page_url": "javascript:alert(1)", "page_title": hostile,
        "query_url": 'https://example.org/a.jpg" onmouseover="alert(1)', "query_alt": hostile, "query_image": None,
        "target_url": "data:text/html,<script>alert(1)</script>", "target_alt": "", "target_image": {"bytes": b"not an image"},
    })
    assert "<script" not in card and "<img src=x" not in card and 'onmouseover="' not in card
    assert "href=\"javascript" not in card and "href=\"data:" not in card
    assert "&lt;script&gt;" in card and "undecodable" in card and "no image" in card
    assert link("https://example.org/?a=1&b=<2>") == (
        '<a href="https://example.org/?a=1&amp;b=&lt;2&gt;" rel="noopener noreferrer nofollow">'
        "https://example.org/?a=1&amp;b=&lt;2&gt;</a>"
    )
    triplet = triplet_card({"instruction": hostile, "page_url": "https://example.org/", "writer": "<b>w</b>"})
    assert "<script" not in triplet and "&lt;b&gt;w&lt;/b&gt;" in triplet


def test_histogram_merges_bins_to_a_readable_number_of_bars():
    histogram = Histogram("widths", "px", 1, Counter())
    histogram.add(list(range(1000)) + [None, None])
    svg = histogram_svg(histogram)
    assert svg.count("<rect") <= MAX_BARS
    assert "1,000 values (2 without a value)" in svg


def test_report_command_explains_a_missing_run(tmp_path):
    with pytest.raises(SystemExit, match="stats.json not found"):
        main(["report", str(tmp_path)])
