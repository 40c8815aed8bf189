"""Per-page duplicate removal and pair choice, on real photos and near-duplicate edits."""

from __future__ import annotations

from magiclens.pipeline.images import normalize_image
from magiclens.pipeline.pairs import (
    PageImage,
    PageInfo,
    PairingConfig,
    choose_pairs,
    drop_duplicates,
    pair_row,
    text_informativeness,
)
from magiclens.pipeline.records import ImageRef

PAGE = PageInfo(url="http://example.org/gallery", title="Gallery", lang="en", crawl="test")


def page_image(path, position: int, alt: str = "") -> PageImage:
    image = normalize_image(path.read_bytes())
    ref = ImageRef(url=f"http://example.org/{path.name}", alt=alt, title="", context="", width=None,
                   height=None, position=position, source="src")
    return PageImage(PAGE, ref, image)


def test_exact_and_near_duplicates_are_dropped_keeping_the_first(shared_data):
    bridge = shared_data / "images/neardup/pdq-bridge-mods"
    photos = shared_data / "images/photos/skimage"
    original = sorted(bridge.glob("*"))[0]
    edits = [p for p in sorted(bridge.glob("*")) if p != original][:3]
    items = [page_image(original, 0, "a bridge")]
    items += [page_image(p, i + 1) for i, p in enumerate(edits)]
    items.append(page_image(original, 9))  # the same file again, later on the page
    items.append(page_image(photos / "astronaut.png", 10, "an astronaut"))
    kept, dropped = drop_duplicates(items, max_distance=8)
    assert [k.ref.position for k in kept] == [0, 10]
    reasons = {d[0].ref.position: d[1] for d in dropped}
    assert reasons[9] == "exact_duplicate"
    assert set(reasons.values()) <= {"exact_duplicate", "near_duplicate"} and len(reasons) == 4


def test_motorcycle_stereo_pair_is_near_duplicate_only_under_a_loose_threshold(shared_data):
    photos = shared_data / "images/photos/skimage"
    left, right = page_image(photos / "motorcycle_left.png", 0), page_image(photos / "motorcycle_right.png", 1)
    assert len(drop_duplicates([left, right], max_distance=8)[0]) == 1  # pHash distance 4 (MANIFEST)
    assert len(drop_duplicates([left, right], max_distance=2)[0]) == 2


def test_pairs_are_deterministic_distinct_and_capped(shared_data):
    photos = shared_data / "images/photos/skimage"
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg"]
    items = [page_image(photos / n, i, alt=n.split(".")[0] if i % 2 == 0 else "") for i, n in enumerate(names)]
    config = PairingConfig(pairs_per_page=4)
    first = [pair_row(q, t) for q, t in choose_pairs(items, config)]
    again = [pair_row(q, t) for q, t in choose_pairs(list(reversed(items)), config)]
    assert [r["pair_id"] for r in first] == [r["pair_id"] for r in again]
    assert len(first) == 4
    assert all(r["query_sha256"] != r["target_sha256"] for r in first)
    assert len({frozenset((r["query_sha256"], r["target_sha256"])) for r in first}) == 4  # no reversed copies
    assert all(r["target_alt"] for r in first[:3])  # targets with text come first
    both = choose_pairs(items, PairingConfig(pairs_per_page=4, both_directions=True))
    assert (both[0][1], both[0][0]) == both[1]


def test_targets_carry_the_more_informative_text_and_pairs_spread_over_the_images(shared_data):
    photos = shared_data / "images/photos/skimage"
    described = page_image(photos / "astronaut.png", 0, alt="An astronaut in a white suit beside the flag")
    named = page_image(photos / "coffee.png", 1, alt="coffee")
    captioned = PageImage(PAGE, ImageRef(url="http://example.org/chelsea.png", alt="", title="",
                                         context="Chelsea the cat sleeps on the sofa", width=None, height=None,
                                         position=2, source="src"),
                          normalize_image((photos / "chelsea.png").read_bytes()))
    bare = page_image(photos / "rocket.jpg", 3)
    items = [bare, named, captioned, described]
    pairs = choose_pairs(items, PairingConfig(pairs_per_page=2))
    assert pairs[0][1] is described and pairs[0][0] is captioned
    assert pairs[1] == (bare, named)  # the two images not used yet, the named one as the target
    for query, target in pairs:
        assert text_informativeness(target.ref) >= text_informativeness(query.ref)
    assert choose_pairs(list(reversed(items)), PairingConfig(pairs_per_page=2)) == pairs


def test_a_colour_variant_is_kept_while_an_edit_is_dropped_and_rows_carry_the_pixel_signals(shared_data, tmp_path):
    import io

    import pyarrow as pa
    from PIL import Image

    from magiclens.pipeline.schemas import PAIRS, PAIRS_SCHEMA_VERSION

    photo = Image.open(shared_data / "images/photos/skimage/coffee.png").convert("RGB")
    hsv = photo.convert("HSV").split()
    recoloured = Image.merge("HSV", (hsv[0].point(lambda h: (h + 85) % 256), hsv[1], hsv[2])).convert("RGB")
    files = {"coffee.jpg": photo, "coffee-blue.jpg": recoloured, "coffee-soft.jpg": photo.resize((300, 200))}
    items = []
    for position, (name, image) in enumerate(files.items()):
        encoded = io.BytesIO()
        image.save(encoded, "JPEG", quality=85)
        (tmp_path / name).write_bytes(encoded.getvalue())
        items.append(page_image(tmp_path / name, position))
    assert (int(items[0].image.phash, 16) ^ int(items[1].image.phash, 16)).bit_count() <= 8
    kept, dropped = drop_duplicates(items, max_distance=8)
    assert [item.ref.position for item in kept] == [0, 1]  # the 120-degree hue rotation is a variant
    assert [(item.ref.position, reason) for item, reason, _ in dropped] == [(2, "near_duplicate")]
    row = pair_row(kept[0], kept[1])
    assert row["query_photo_score"] == 1.0 and row["query_colour"].startswith("h")
    assert row["query_colour"] != row["target_colour"]
    table = pa.Table.from_pylist([row], schema=PAIRS)
    assert table.schema.metadata[b"magiclens.schema_version"] == PAIRS_SCHEMA_VERSION.encode()
    assert table.column("target_photo_score").type == pa.float32()
