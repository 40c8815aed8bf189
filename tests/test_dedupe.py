"""Near duplicates across the run: bands, verification, cluster ids, furniture, caps; the page set
of issue 5's "Done when" through the Beam transforms and through `magiclens mine`.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from PIL import Image

from magiclens.pipeline.accounting import REJECTS_TAG
from magiclens.pipeline.hashing import hamming
from magiclens.pipeline.pair_cap import CapPairsPerCluster, ClusteredPair
from magiclens.pipeline.dedupe import (
    ClusterImages,
    DedupeAndPair,
    DedupeConfig,
    ImageCluster,
    ImageKey,
    band_layout,
    band_values,
    component_labels,
    first_shared_band,
    near_pairs_in_bucket,
    select_page_images,
)
from magiclens.pipeline.filters import RefFilterConfig, filter_page_refs
from magiclens.pipeline.images import ImageRejected, normalize_image
from magiclens.pipeline.pairs import PageImage, PageInfo, PairingConfig
from magiclens.pipeline.postdecode import CheckDecodedImages, DecodedImageConfig
from magiclens.pipeline.records import ImageRef, PageImages
from beam_run import run_collect


def assert_balanced(stats: dict) -> None:
    for name, entry in stats.items():
        if "in" in entry:
            assert entry["in"] == entry["out"] + entry["rejected_total"], name


@pytest.fixture(scope="module")
def shared_hashes(shared_data) -> dict[str, str]:
    """pHash of every decodable image of the shared photo and near-duplicate sets."""
    hashes = {}
    for path in sorted((shared_data / "images").rglob("*")):
        if path.suffix.lower() in (".jpg", ".png") and "edgecases" not in path.parts:
            try:
                hashes[str(path.relative_to(shared_data / "images"))] = normalize_image(
                    path.read_bytes(), min_side=1, max_aspect=10).phash
            except ImageRejected:  # the corrupt UKBench copy
                continue
    return hashes


@pytest.mark.parametrize("max_distance", [0, 4, 6, 8, 15, 63])
def test_bands_cover_the_hash_and_any_two_hashes_within_t_share_one(max_distance, shared_hashes):
    layout = band_layout(max_distance)
    assert len(layout) == max_distance + 1
    assert sum(width for _, width in layout) == 64 and layout[0][0] == 0
    values = sorted({int(h, 16) for h in shared_hashes.values()})
    for a, b in itertools.combinations(values, 2):
        if hamming(a, b) <= max_distance:
            assert first_shared_band(a, b, layout) is not None


@pytest.mark.parametrize("max_distance", [4, 6, 8, 20])
def test_bucket_search_finds_exactly_the_brute_force_pairs_each_once(max_distance, shared_hashes):
    layout = band_layout(max_distance)
    nodes = sorted(set(shared_hashes.values()))
    buckets: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        for band, value in enumerate(band_values(int(node, 16), layout)):
            buckets.setdefault((band, value), []).append(node)
    found = [edge for (band, _), members in buckets.items()
             for edge in near_pairs_in_bucket(members, band, layout, max_distance)]
    brute = {(a, b) for a, b in itertools.combinations(nodes, 2) if hamming(int(a, 16), int(b, 16)) <= max_distance}
    assert len(found) == len(set(found))  # each edge from one bucket only
    assert set(found) == brute
    if max_distance >= 4:
        assert brute  # the motorcycle stereo pair and the sharpened bridge are within 4 bits


def chain_of_hashes(start: str, links: int, step_bits: int) -> list[str]:
    """A path of hashes, each `step_bits` from the last, flipping new bits each step: the ends are far apart."""
    value, chain = int(start, 16), [start]
    for link in range(links):
        for bit in range(link * step_bits, (link + 1) * step_bits):
            value ^= 1 << bit
        chain.append(f"{value:016x}")
    return chain


def cluster_ids(keys: list[ImageKey], config: DedupeConfig, folder: Path) -> tuple[dict[str, ImageCluster], dict]:
    collected, stats = run_collect(
        lambda p: {"clusters": p | beam.Create(keys) | ClusterImages(config)}, folder
    )
    return {cluster.sha256: cluster for _, cluster in collected["clusters"]}, stats


def test_beam_cluster_ids_match_union_find_and_unresolved_edges_are_counted(shared_hashes, tmp_path):
    chain = chain_of_hashes(shared_hashes["photos/skimage/astronaut.png"], links=8, step_bits=6)
    assert hamming(int(chain[0], 16), int(chain[-1], 16)) == 48
    real = sorted(set(shared_hashes.values()))
    hashes = real + chain
    keys = [ImageKey(f"https://example.org/page{n % 7}", f"sha-{n}", h) for n, h in enumerate(hashes)]
    config = DedupeConfig(max_distance=6, rounds=4)
    clusters, stats = cluster_ids(keys, config, tmp_path)
    reference = component_labels(
        (a, b) for a, b in itertools.combinations(set(hashes), 2) if hamming(int(a, 16), int(b, 16)) <= 6
    )
    for key in keys:
        assert clusters[key.sha256].cluster_id == reference.get(key.phash, key.phash)
    assert {clusters[f"sha-{len(real) + n}"].cluster_id for n in range(len(chain))} == {min(chain)}
    assert stats["clusters"].get("unresolved_edges", 0) == 0
    assert stats["clusters"]["edges"] >= 8
    # one round cannot label a path of 8 links: the leftover edges are counted, not hidden
    (tmp_path / "one").mkdir()
    _, one_round = cluster_ids(keys, DedupeConfig(max_distance=6, rounds=1), tmp_path / "one")
    assert one_round["clusters"]["unresolved_edges"] > 0


def page_image(path: Path, page_url: str, position: int, alt: str = "", data: bytes | None = None) -> PageImage:
    image = normalize_image(data if data is not None else path.read_bytes())
    ref = ImageRef(url=f"{page_url}/{position}-{path.name}", alt=alt, title="", context="", width=None,
                   height=None, position=position, source="src")
    return PageImage(PageInfo(url=page_url, title="", lang="en", crawl="test"), ref, image)


def test_page_selection_drops_furniture_and_a_second_image_of_one_cluster(shared_data):
    photos = shared_data / "images/photos/skimage"
    left = page_image(photos / "motorcycle_left.png", "https://a.example/p", 0, "left")
    right = page_image(photos / "motorcycle_right.png", "https://a.example/p", 1, "right")
    coffee = page_image(photos / "coffee.png", "https://a.example/p", 2, "coffee")
    chelsea = page_image(photos / "chelsea.png", "https://a.example/p", 3, "cat")
    shared_cluster = min(left.image.phash, right.image.phash)
    clusters = {
        left.image.sha256: ImageCluster(left.image.sha256, shared_cluster, 2),
        right.image.sha256: ImageCluster(right.image.sha256, shared_cluster, 2),
        coffee.image.sha256: ImageCluster(coffee.image.sha256, coffee.image.phash, 11),
        chelsea.image.sha256: ImageCluster(chelsea.image.sha256, chelsea.image.phash, 10),
    }
    # per page only distance <= 2 counts; the stereo pair (4 bits apart) is caught by its cluster
    kept, dropped = select_page_images([chelsea, right, coffee, left], clusters, 2, max_pages_per_image=10)
    assert [item.ref.position for item in kept] == [0, 3]
    reasons = {item.ref.position: reason for item, reason, _ in dropped}
    assert reasons == {1: "near_duplicate_cluster", 2: "site_furniture"}


def test_cap_keeps_at_most_n_pairs_per_cluster_chosen_by_pair_id(tmp_path):
    pairs = [ClusteredPair({"pair_id": f"{n:02d}"}, "hub", f"c{n}") for n in range(6)]
    pairs.append(ClusteredPair({"pair_id": "99"}, "c1", "c2"))
    collected, stats = run_collect(
        lambda p: (lambda capped: {"rows": capped["pairs"], "rejects": capped[REJECTS_TAG]})(
            p | beam.Create(pairs) | CapPairsPerCluster(2)),
        tmp_path,
    )
    kept = sorted(row["pair_id"] for row in collected["rows"])
    assert kept == ["00", "01", "99"]  # the hub keeps its first two; c1 and c2 are in two pairs each
    by_id = {pair.row["pair_id"]: pair for pair in pairs}
    for cluster in {c for pair in pairs for c in (pair.query_cluster, pair.target_cluster)}:
        assert sum(cluster in (by_id[i].query_cluster, by_id[i].target_cluster) for i in kept) <= 2
    assert {reject.reason for reject in collected["rejects"]} == {"cluster_pair_cap"}
    assert stats["pair_cap"] == {"in": 7, "out": 3, "rejected": {"cluster_pair_cap": 4}, "rejected_total": 4,
                                 "balanced": True}


# ---- the "Done when" page set --------------------------------------------------------------------

SITE = "https://site.example"
SIDEBAR_PAGES = 13


def jpeg_bytes(image: Image.Image, quality: int = 85, exif: bytes | None = None) -> bytes:
    out = io.BytesIO()
    if exif is None:
        image.convert("RGB").save(out, "JPEG", quality=quality)
    else:
        image.convert("RGB").save(out, "JPEG", quality=quality, exif=exif)
    return out.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class PageSet:
    """One photo and its resized, recompressed copy, a small logo and a tracking pixel on one page;
    a sidebar image on 13 pages; the last of those pages has one photo besides it."""

    def __init__(self, shared_data: Path):
        images = shared_data / "images"
        bridge = Image.open(images / "neardup/pdq-bridge-mods/aaa-orig.jpg")
        logo = Image.open(images / "photos/skimage/logo.png")
        pixel = io.BytesIO()
        Image.new("RGBA", (1, 1), (0, 0, 0, 0)).save(pixel, "GIF")
        self.files: dict[str, bytes] = {
            f"{SITE}/media/bridge.jpg": (images / "neardup/pdq-bridge-mods/aaa-orig.jpg").read_bytes(),
            f"{SITE}/media/bridge-small.jpg": jpeg_bytes(bridge.resize((640, 402)), quality=60),
            f"{SITE}/static/logo.png": png_bytes(logo.resize((64, 64))),
            f"{SITE}/media/brand-mark.png": png_bytes(logo.resize((96, 96))),
            "https://www.facebook.com/tr?id=518786884949926&ev=PageView&noscript=1": pixel.getvalue(),
            f"{SITE}/media/astronaut.jpg": jpeg_bytes(Image.open(images / "photos/skimage/astronaut.png")),
            f"{SITE}/img/sidebar.jpg": jpeg_bytes(Image.open(images / "photos/skimage/coffee.png")),
        }
        self.pool = [
            images / "photos/skimage/chelsea.png", images / "photos/skimage/hubble_deep_field.jpg",
            images / "photos/matplotlib/grace_hopper.jpg", images / "neardup/pdq-labelme-distractors/q0746.jpg",
            images / "neardup/pdq-labelme-distractors/q1050.jpg", images / "neardup/imagededup-ukbench/base_images/ukbench01380.jpg",
            images / "neardup/imagededup-ukbench/base_images/ukbench09012.jpg", images / "photos/skimage/rocket.jpg",
        ]
        for path in self.pool:
            self.files[f"{SITE}/photos/{path.stem}.jpg"] = jpeg_bytes(Image.open(path))
        self.real_photo_urls = {f"{SITE}/media/bridge.jpg", f"{SITE}/media/astronaut.jpg"} | {
            f"{SITE}/photos/{path.stem}.jpg" for path in self.pool}

    def pages(self) -> dict[str, list[ImageRef]]:
        """Page URL -> its image references, as extraction finds them."""
        def ref(url, position, alt="", width=None, height=None):
            return ImageRef(url=url, alt=alt, title="", context="", width=width, height=height,
                            position=position, source="src")
        sidebar = f"{SITE}/img/sidebar.jpg"
        pages = {
            f"{SITE}/story/0": [
                ref(f"{SITE}/media/bridge.jpg", 0, "The old iron bridge over the river at dusk"),
                ref(f"{SITE}/media/bridge-small.jpg", 1, "bridge"),
                ref(f"{SITE}/static/logo.png", 2),
                ref(f"{SITE}/media/brand-mark.png", 3),
                ref("https://www.facebook.com/tr?id=518786884949926&ev=PageView&noscript=1", 4, width=1, height=1),
                ref(f"{SITE}/media/astronaut.jpg", 5, "An astronaut in a white suit with the flag"),
                ref(sidebar, 6, "Subscribe"),
            ]
        }
        for n in range(1, SIDEBAR_PAGES):
            photos = [self.pool[n % len(self.pool)]]
            if n < SIDEBAR_PAGES - 1:
                photos.append(self.pool[(n + 3) % len(self.pool)])
            refs = [ref(sidebar, 0, "Subscribe")]
            refs += [ref(f"{SITE}/photos/{path.stem}.jpg", k + 1, f"A picture of {path.stem}") for k, path in enumerate(photos)]
            pages[f"{SITE}/story/{n}"] = refs
        return pages

    def html(self, page_url: str, refs: list[ImageRef]) -> bytes:
        tags = []
        for item in refs:
            size = f' width="{item.width}" height="{item.height}"' if item.width else ""
            tags.append(f'<figure><img src="{item.url}" alt="{item.alt}"{size}></figure>')
        return (f'<html lang="en"><head><title>Story {page_url[-1]}</title></head><body>'
                f'<h1>Story</h1>{"".join(tags)}</body></html>').encode()


def test_done_when_page_set_through_the_beam_transforms(shared_data, tmp_path):
    page_set = PageSet(shared_data)
    page_images, refs_dropped, decode_rejects, decoded = [], {}, {}, {}
    for page_url, refs in page_set.pages().items():
        filtered = filter_page_refs(PageImages(title="", lang="en", refs=refs), page_url, RefFilterConfig())
        for item in filtered.dropped:
            refs_dropped[item.ref.url] = item.reason
        info = PageInfo(url=page_url, title="", lang=filtered.page_lang, crawl="test")
        for item in filtered.refs:
            if item.url not in decoded and item.url not in decode_rejects:  # once per URL, as in mine
                try:
                    decoded[item.url] = normalize_image(page_set.files[item.url])
                except ImageRejected as rejected:
                    decode_rejects[item.url] = rejected.reason
            if item.url in decoded:
                page_images.append((page_url, PageImage(info, item, decoded[item.url])))
    assert refs_dropped == {f"{SITE}/static/logo.png": "furniture_url",
                            "https://www.facebook.com/tr?id=518786884949926&ev=PageView&noscript=1": "furniture_url"}
    assert decode_rejects == {f"{SITE}/media/brand-mark.png": "too_small"}

    def build(pipeline):
        checked = (pipeline | beam.Create(page_images)
                   | beam.ParDo(CheckDecodedImages(DecodedImageConfig())).with_outputs(REJECTS_TAG, main="images"))
        # two rounds label these small clusters exactly (checked below); the default four are tested above
        paired = checked.images | DedupeAndPair(PairingConfig(), DedupeConfig(rounds=2))
        return {"pairs": paired["pairs"], "rejects": paired["rejects"]}

    collected, stats = run_collect(build, tmp_path)
    assert_balanced(stats)
    pairs = collected["pairs"]
    assert pairs
    for row in pairs:
        assert {row["query_url"], row["target_url"]} <= page_set.real_photo_urls
        assert row["query_sha256"] != row["target_sha256"]
    assert f"{SITE}/story/{SIDEBAR_PAGES - 1}" not in {row["page_url"] for row in pairs}
    first_page = {frozenset((r["query_url"], r["target_url"])) for r in pairs if r["page_url"] == f"{SITE}/story/0"}
    assert first_page == {frozenset((f"{SITE}/media/bridge.jpg", f"{SITE}/media/astronaut.jpg"))}
    reasons = [(reject.element_id.split(" ")[-1], reject.reason) for reject in collected["rejects"]]
    assert reasons.count((f"{SITE}/img/sidebar.jpg", "site_furniture")) == SIDEBAR_PAGES
    assert (f"{SITE}/media/bridge-small.jpg", "near_duplicate") in reasons
    assert (f"{SITE}/story/{SIDEBAR_PAGES - 1}", "fewer_than_2_images") in reasons
    assert stats["clusters"]["over_page_limit"] == 1
    assert stats["clusters"].get("unresolved_edges", 0) == 0


def test_done_when_page_set_through_magiclens_mine(shared_data, tmp_path):
    """The same page set in a WARC, mined end to end."""
    from magiclens.cli import main
    from warcs import write_warc

    page_set = PageSet(shared_data)
    records = [(url, "image/jpeg", data) for url, data in page_set.files.items()]
    records += [(url, "text/html; charset=utf-8", page_set.html(url, refs)) for url, refs in page_set.pages().items()]
    warc = write_warc(tmp_path / "pages.warc.gz", records)
    output = tmp_path / "out"
    assert main(["mine", "--input", str(warc), "--output", str(output), "--no-fetch"]) == 0
    stats = json.loads((output / "stats.json").read_text())["stages"]
    assert_balanced(stats)
    rows = pq.ParquetDataset([str(f) for f in sorted((output / "pairs").glob("*.parquet"))]).read().to_pylist()
    assert rows
    for row in rows:
        assert {row["query_url"], row["target_url"]} <= page_set.real_photo_urls
        assert f"{SITE}/img/sidebar.jpg" not in (row["query_url"], row["target_url"])
    assert f"{SITE}/story/{SIDEBAR_PAGES - 1}" not in {row["page_url"] for row in rows}
    assert stats["page_images"]["rejected"]["site_furniture"] == SIDEBAR_PAGES
    assert stats["refs"]["rejected"]["furniture_url"] == 2  # the logo, and the tracking pixel by its host


def test_colour_variants_with_one_phash_are_separate_nodes_and_clusters(shared_data, tmp_path):
    """A hue-rotated copy can hash like its original: the node carries the colour too, and the bucket
    verification joins only nodes whose colours agree (a grayscale copy joins both, see below)."""
    from magiclens.pipeline.pixels import measured

    photo = Image.open(shared_data / "images/photos/skimage/chelsea.png").convert("RGB")
    hue, saturation, value = photo.convert("HSV").split()
    variants = {
        "original": jpeg_bytes(photo),
        "blue": jpeg_bytes(Image.merge("HSV", (hue.point(lambda h: (h + 128) % 256), saturation, value))),
        "gray": jpeg_bytes(photo.convert("L")),
        "recompressed": jpeg_bytes(photo, quality=60),
    }
    images = {name: measured(normalize_image(data)) for name, data in variants.items()}
    keys = {name: ImageKey(f"https://shop.example/{name}", f"sha-{name}", image.phash, image.colour)
            for name, image in images.items()}
    assert keys["blue"].node == f"{images['blue'].phash}:{images['blue'].colour}"
    assert hamming(int(images["original"].phash, 16), int(images["blue"].phash, 16)) <= 6
    config = DedupeConfig(max_distance=6, rounds=2)
    layout = band_layout(config.max_distance)
    buckets: dict[tuple[int, int], list[str]] = {}
    for key in keys.values():
        for band, value in enumerate(band_values(int(key.phash, 16), layout)):
            buckets.setdefault((band, value), []).append(key.node)
    edges = {frozenset(edge) for (band, _), members in buckets.items()
             for edge in near_pairs_in_bucket(members, band, layout, config.max_distance)}
    node = {name: key.node for name, key in keys.items()}
    assert frozenset((node["original"], node["recompressed"])) in edges
    assert frozenset((node["original"], node["blue"])) not in edges
    # achromatic: its colour says nothing, so the gray copy is a duplicate of both colourings
    assert {frozenset((node["gray"], node[name])) for name in ("original", "blue", "recompressed")} <= edges
    colour_only = [key for name, key in keys.items() if name != "gray"]
    clusters, stats = cluster_ids(colour_only, config, tmp_path)
    by_name = {name: clusters[f"sha-{name}"].cluster_id for name in keys if name != "gray"}
    assert by_name["original"] == by_name["recompressed"] == min(node["original"], node["recompressed"])
    assert by_name["blue"] == node["blue"]
    assert stats["clusters"]["edges"] == 1
