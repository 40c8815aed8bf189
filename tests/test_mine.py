"""`magiclens mine` and `magiclens instruct` end to end on Beam's in-process runner."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from magiclens.cli import main
from magiclens.pipeline import schemas
from warcs import write_warc


def read_dataset(folder: Path):
    files = sorted(folder.glob("*.parquet"))
    assert files, f"no parquet files in {folder}"
    return pq.ParquetDataset([str(f) for f in files]).read()


def mine(inputs: list[str], output: Path, *extra: str) -> dict:
    args = ["mine", "--output", str(output), "--no-fetch", *extra]
    for pattern in inputs:
        args += ["--input", pattern]
    assert main(args) == 0
    return json.loads((output / "stats.json").read_text())


def assert_balanced(stats: dict) -> None:
    for name, entry in stats["stages"].items():
        if "in" in entry:
            assert entry["in"] == entry["out"] + sum(entry["rejected"].values()), name


@pytest.fixture(scope="module")
def mined(shared_data, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("mined")
    # These crawls (2008-2018) hold mostly small images: a 64 px floor instead of 150 keeps enough
    # of them to check pairs in numbers.
    stats = mine(
        [str(shared_data / "warc/webarchive/*.warc.gz"), str(shared_data / "warc/commoncrawl/*.warc.gz")],
        output,
        "--min-side",
        "64",
    )
    return output, stats


def test_mining_the_shared_warcs_balances_every_stage(mined):
    output, stats = mined
    assert_balanced(stats)
    stages = stats["stages"]
    assert stages["warc_files"]["in"] == 13  # 11 web archives + 2 Common Crawl WARCs (*.warc.gz)
    # Common Crawl pages point at images on the web: without fetching they are not in the input
    assert stages["images"]["rejected"]["not_in_input"] > 0
    assert stages["outputs"]["pairs"] >= 5


def test_pairs_follow_the_schema_and_hold_two_distinct_decodable_images(mined):
    output, _ = mined
    table = read_dataset(output / "pairs")
    assert table.schema.names == schemas.PAIRS.names
    assert table.schema.field("query_image").type == schemas.IMAGE
    rows = table.to_pylist()
    assert len({r["pair_id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["query_sha256"] != row["target_sha256"]
        assert row["query_image"]["bytes"] != row["target_image"]["bytes"]
        for side in ("query", "target"):
            image = Image.open(io.BytesIO(row[f"{side}_image"]["bytes"]))
            image.load()
            assert image.mode == "RGB" and max(image.size) <= 512
            assert (image.width, image.height) == (row[f"{side}_width"], row[f"{side}_height"])


def test_rejects_are_written_with_reasons_and_no_image_bytes(mined):
    output, stats = mined
    rejects = read_dataset(output / "rejects")
    assert rejects.schema.names == ["element_id", "stage", "reason", "detail"]
    total = sum(sum(e["rejected"].values()) for e in stats["stages"].values() if "rejected" in e)
    assert rejects.num_rows == total


def pair_ids(folder: Path) -> list[str]:
    return sorted(read_dataset(folder / "pairs").column("pair_id").to_pylist())


def test_lexbor_and_bs4_parsers_give_the_same_pairs(shared_data, tmp_path):
    pattern = str(shared_data / "warc/webarchive/ukwa_*.warc.gz")
    mine([pattern], tmp_path / "a")
    mine([pattern], tmp_path / "b", "--html-parser", "bs4")
    assert pair_ids(tmp_path / "a") and pair_ids(tmp_path / "a") == pair_ids(tmp_path / "b")


def test_the_same_run_twice_on_two_worker_processes_gives_the_same_pairs_and_stats(shared_data, tmp_path):
    """Two worker processes split the work differently from run to run; the output must not follow."""
    inputs = [str(shared_data / "warc/webarchive/aut_example.warc.gz"), str(shared_data / "warc/webarchive/ukwa_*.warc.gz")]
    two_processes = ["--min-side", "40", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    runs = [mine(inputs, tmp_path / name, *two_processes) for name in ("first", "second")]
    for stats in runs:
        assert_balanced(stats)
        del stats["seconds"], stats["config"]["output"]
    assert runs[0] == runs[1]
    assert runs[0]["stages"]["outputs"]["pairs"] >= 5
    assert len(pair_ids(tmp_path / "first")) == runs[0]["stages"]["outputs"]["pairs"]
    assert pair_ids(tmp_path / "first") == pair_ids(tmp_path / "second")


def test_instruct_with_the_template_writer_writes_triplets(mined, tmp_path):
    output, stats = mined
    assert main(["instruct", "--pairs", str(output / "pairs"), "--writer", "template", "--output", str(tmp_path)]) == 0
    triplets = read_dataset(tmp_path / "triplets")
    assert triplets.schema.names == schemas.TRIPLETS.names
    rows = triplets.to_pylist()
    assert rows
    for row in rows:
        assert row["triplet_id"] and row["instruction"].strip()
        assert row["query_image"]["bytes"] and row["target_image"]["bytes"]
        assert row["prompt_id"] == "template@1" and row["writer"] == "template"
    instruct_stats = json.loads((tmp_path / "stats.json").read_text())
    assert_balanced(instruct_stats)
    entry = instruct_stats["stages"]["instruct"]
    assert entry["in"] == stats["stages"]["outputs"]["pairs"]
    assert entry["out"] == len(rows)


def test_bad_input_is_counted_and_the_rest_still_mined(shared_data, tmp_path):
    photos = shared_data / "images/photos/skimage"
    edge = shared_data / "images/edgecases"
    base = "http://bad.example/"
    good = {name: (photos / f"{name}.png").read_bytes() for name in ("astronaut", "coffee", "chelsea")}
    rocket = (photos / "rocket.jpg").read_bytes()
    # each planted bad image, and the (stage, reason) that must reject it
    planted = {
        "empty": (b"", "image/png"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="900"/>', "image/svg+xml"),
        "cut-in-half": (rocket[: len(rocket) // 2], "image/jpeg"),  # 427 x 640 declared, half the data
        "animated": ((edge / "pillow_iss634.gif").read_bytes(), "image/gif"),
        "corrupt": ((edge / "imagededup_ukbench09268_corrupt.jpg").read_bytes(), "image/jpeg"),
        "tiny": ((edge / "pillow_hopper.png").read_bytes(), "image/png"),  # 128 x 128, under the 150 px floor
    }
    expected = {
        "empty": {("records", "empty_payload"), ("images", "not_in_input")},  # the record is empty: no image in the input
        "svg": {("images", "svg")},
        "cut-in-half": {("images", "truncated")},
        "animated": {("images", "animated")},
        "corrupt": {("images", "not_image")},
        "tiny": {("images", "too_small")},
    }
    records = [(f"{base}img/{name}", "image/png", data) for name, data in good.items()]
    records += [(f"{base}img/{name}", content_type, data) for name, (data, content_type) in planted.items()]
    imgs = "".join(f'<img src="/img/{name}" alt="picture of {name}">' for name in [*good, *planted])
    imgs += '<img src="data:image/png;base64,AAAA">'
    records.append((f"{base}gallery", "text/html; charset=utf-8", f"<html><body>{imgs}</body></html>".encode()))
    records.append((f"{base}deep", "text/html", b"<div>" * 100_000 + b'<img src="/img/astronaut"><img src="/img/coffee">'))
    records.append((f"{base}many", "text/html", b"<p>" + b'<img src="/img/coffee">' * 20_000))
    records.append((f"{base}latin1", "text/html; charset=iso-8859-1",
                    '<p>Caf\xe9 <img src="/img/astronaut" alt="caf\xe9"><img src="/img/chelsea" alt="cr\xe8me">'.encode("latin-1")))
    records.append((f"{base}garbage", "text/html", bytes(range(256)) * 50))
    warc = write_warc(tmp_path / "bad.warc.gz", records)
    truncated = tmp_path / "truncated.warc.gz"
    data = (shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    stats = mine([str(warc), str(truncated)], tmp_path / "out")
    assert_balanced(stats)
    stages = stats["stages"]
    assert stages["warc_files"]["rejected"] == {"truncated_file": 1}
    rejected_as: dict[str, set[tuple[str, str]]] = {}
    for reject in read_dataset(tmp_path / "out" / "rejects").to_pylist():
        url = reject["element_id"].rsplit(" ", 1)[-1]
        if url.startswith(f"{base}img/"):
            rejected_as.setdefault(url.removeprefix(f"{base}img/"), set()).add((reject["stage"], reject["reason"]))
    for name, reasons in expected.items():
        assert rejected_as.get(name) == reasons, name
    assert set(rejected_as) == set(planted)  # the good photos were not rejected
    assert stages["refs"]["rejected"].get("non_http_url", 0) >= 1
    pairs = read_dataset(tmp_path / "out" / "pairs").to_pylist()
    pages = {row["page_url"] for row in pairs}
    assert f"{base}gallery" in pages and f"{base}latin1" in pages
    paired = {row[f"{side}_url"] for row in pairs for side in ("query", "target")}
    assert not paired & {f"{base}img/{name}" for name in planted}


def test_srcset_lazy_base_href_and_exif_rotated_images_are_paired_upright(shared_data, tmp_path):
    photos = shared_data / "images/photos/skimage"
    upright = Image.open(photos / "coffee.png").convert("RGB")  # 600 x 400
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: viewers rotate it 90 degrees clockwise to show it
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", quality=95, exif=exif)
    site = "http://site.test/media/"
    images = {
        f"{site}big/astronaut.jpg": (photos / "astronaut.png").read_bytes(),
        f"{site}lazy/chelsea.jpg": (photos / "chelsea.png").read_bytes(),
        f"{site}coffee-rotated.jpg": rotated.getvalue(),
        f"{site}rocket.jpg": (photos / "rocket.jpg").read_bytes(),
    }
    page = (
        '<html><head><base href="/media/"></head><body>'
        '<img srcset="small/astronaut.jpg 200w, big/astronaut.jpg 800w" alt="an astronaut in a white suit">'
        '<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="lazy/chelsea.jpg" alt="a tabby cat">'
        '<img src="coffee-rotated.jpg" alt="a cup of coffee on a saucer">'
        '<img src="rocket.jpg" alt="a rocket on its launch pad">'
        "</body></html>"
    )
    records = [(url, "image/jpeg", data) for url, data in images.items()]
    records.append(("http://site.test/articles/space", "text/html; charset=utf-8", page.encode()))
    warc = write_warc(tmp_path / "page.warc.gz", records)
    stats = mine([str(warc)], tmp_path / "out", "--pairs-per-page", "6")
    assert_balanced(stats)
    rows = read_dataset(tmp_path / "out" / "pairs").to_pylist()
    paired = {row[f"{side}_url"] for row in rows for side in ("query", "target")}
    assert paired == set(images)  # srcset-only, lazy data-src and <base href> images, all paired
    coffee = next(row[f"{side}_image"] for row in rows for side in ("query", "target")
                  if row[f"{side}_url"] == f"{site}coffee-rotated.jpg")
    stored = Image.open(io.BytesIO(coffee["bytes"])).convert("RGB")
    assert stored.size == (512, 341)  # upright: landscape, as the photo was taken
    expected = upright.resize(stored.size)
    difference = sum(abs(a - b) for a, b in zip(stored.tobytes(), expected.tobytes())) / len(expected.tobytes())
    assert difference < 12, difference  # the same picture, not a rotated one


def test_one_image_several_names_is_found_in_the_archive(shared_data, tmp_path):
    # As real archives showed: the page says https:// where the crawler stored http://, writes %2C
    # where the archive has ",", and offers a srcset whose largest candidate was never archived
    # while its src was. Each reference still finds its image, and records the candidate it used.
    photos = shared_data / "images/photos/skimage"
    images = {
        "http://site.test/img/astronaut.jpg": (photos / "astronaut.png").read_bytes(),
        "http://site.test/img/chelsea,w_600.jpg": (photos / "chelsea.png").read_bytes(),
        "http://site.test/img/coffee-600.jpg": (photos / "coffee.png").read_bytes(),
    }
    page = (
        '<html><body><article>'
        '<img src="https://site.test/img/astronaut.jpg" alt="an astronaut in a white suit">'
        '<img src="https://SITE.test:443/img/chelsea%2Cw_600.jpg#top" alt="a tabby cat on a rug">'
        '<img srcset="/img/coffee-1200.jpg 1200w, /img/coffee-600.jpg 600w" src="/img/coffee-600.jpg"'
        ' alt="a cup of coffee on a saucer">'
        "</article></body></html>"
    )
    records = [(url, "image/jpeg", data) for url, data in images.items()]
    records.append(("https://site.test/story", "text/html; charset=utf-8", page.encode()))
    warc = write_warc(tmp_path / "page.warc.gz", records)
    stats = mine([str(warc)], tmp_path / "out", "--pairs-per-page", "6")
    assert_balanced(stats)
    stages = stats["stages"]
    assert stages["images"]["rejected"] == {} and stages["image_records"]["rejected"] == {}
    rows = read_dataset(tmp_path / "out" / "pairs").to_pylist()
    used = {row[f"{side}_url"]: row[f"{side}_image_url"] for row in rows for side in ("query", "target")}
    assert used == {  # the URL as the page wrote it (resolved), and the candidate whose bytes were used
        "https://site.test/img/astronaut.jpg": "https://site.test/img/astronaut.jpg",
        "https://SITE.test:443/img/chelsea%2Cw_600.jpg": "https://SITE.test:443/img/chelsea%2Cw_600.jpg",
        "https://site.test/img/coffee-1200.jpg": "https://site.test/img/coffee-600.jpg",
    }
