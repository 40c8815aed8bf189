"""Cheap reference filters, text cleaning, language guesses, post-decode checks and the flags.

References are built from image tags copied from the real pages in ../shared/data/html; images
are the real photos and edge cases of ../shared/data/images.
"""

from __future__ import annotations

import argparse
import gzip
import io

import pytest
from PIL import Image

from magiclens.pipeline.mine.config import FilterConfig, add_filter_arguments
from magiclens.pipeline.text import clean_text
from magiclens.pipeline.filters import (
    RefFilterConfig,
    filter_page_refs,
    guess_language,
    page_language,
)
from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.images import normalize_image
from magiclens.pipeline.postdecode import DecodedImageConfig, decoded_image_problem, pixel_std
from magiclens.pipeline.records import ImageRef, PageImages


def filter_refs(refs: list[ImageRef], lang: str, title: str, config: RefFilterConfig):
    return filter_page_refs(PageImages(title=title, lang=lang, refs=refs), "https://example.org/page", config)


def ref(url: str, alt: str = "", position: int = 0, width: int | None = None, height: int | None = None,
        title: str = "", context: str = "") -> ImageRef:
    return ImageRef(url=url, alt=alt, title=title, context=context, width=width, height=height,
                    position=position, source="src")


# <img> tags found on the shared pages (URL, alt, declared width, height) and why each is furniture.
FURNITURE = [
    (ref("https://www.facebook.com/tr?id=518786884949926&ev=PageView&noscript=1", width=1, height=1),
     "furniture_url"),  # a social network's host: its tracking pixel
    (ref("http://www.remember8090.it/wp-content/themes/tortuga-child/images/logo.png", "Remember8090 logo"),
     "furniture_url"),
    (ref("http://www.remember8090.it/wp-content/themes/tortuga-child/images/youtube.png", "Youtube icon"),
     "furniture_url"),
    (ref("http://www.remember8090.it/wp-content/themes/tortuga-child/images/channel.png", "Youtube icon"),
     "furniture_text"),
    (ref("https://1.gravatar.com/avatar/ad516503a11cd5ca435acc9bb6523536?s=25&d=identicon", "Gravatar", width=25),
     "furniture_url"),
    (ref("http://www.example.com/wp-content/themes/sportsnet-nhl/images/sn_default_logo.svg"), "svg"),
    (ref("http://www.remember8090.it/wp-content/uploads/2016/12/banner-remember8090-yt-0-300x250.gif"),
     "furniture_url"),
    (ref("https://kabarislam.files.wordpress.com/2014/09/doa.jpg?resize=40%2C40", "Hati-hati Terhadap Doa",
         width=40, height=40), "declared_too_small"),
    (ref("https://static.example.net/img/clear.gif"), "gif_hint"),
]
CONTENT = [
    ref("https://www.basicthinking.de/blog/wp-content/uploads/2018/11/hashtag-foto-pixabay-com-irfanahmad.png",
        "Hashtag, Hashtags, Raute, Twitter, erfolgreiche Tweets", width=800, height=450),
    ref("https://s.hdnux.com/photos/01/07/06/04/18637072/5/square_gallery_thumb.jpg", "photo"),
    ref("https://agusnizami.files.wordpress.com/2009/12/mediaislamgif.gif"),
]


def test_each_kind_of_furniture_is_dropped_with_its_reason_and_content_is_kept():
    refs = [replace_position(item, n) for n, (item, _) in enumerate(FURNITURE)]
    refs += [replace_position(item, len(refs) + n) for n, item in enumerate(CONTENT)]
    result = filter_refs(refs, "de", "", RefFilterConfig())
    reasons = {dropped.ref.url: dropped.reason for dropped in result.dropped}
    assert reasons == {item.url: reason for item, reason in FURNITURE}
    assert [kept.url for kept in result.refs] == [item.url for item in CONTENT]


def replace_position(item: ImageRef, position: int) -> ImageRef:
    return ImageRef(**{**item.__dict__, "position": position})


def test_duplicate_urls_go_first_then_the_page_cap_keeps_the_first_n_survivors_in_page_order():
    photos = [ref(f"https://example.org/photos/{n}.jpg", position=n) for n in range(6)]
    logo = ref("https://example.org/static/logo.png", position=1)
    again = ref("https://example.org/photos/0.jpg", position=7)
    shuffled = [photos[3], again, photos[0], logo, *photos[4:], photos[1], photos[2]]
    result = filter_refs(shuffled, "", "", RefFilterConfig(max_images_per_page=4))
    # the cap counts only survivors: the logo does not take one of the four places
    assert [item.position for item in result.refs] == [0, 1, 2, 3]
    reasons = sorted((item.ref.position, item.reason) for item in result.dropped)
    assert reasons == [(1, "furniture_url"), (4, "over_page_cap"), (5, "over_page_cap"), (7, "duplicate_url")]


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Ã©tÃ© Ã\xa0 Paris  \n\t avec des amis", "été à Paris avec des amis"),  # mojibake, whitespace
        ("Caf&eacute; au lait", "Café au lait"),
        ("FILE PHOTO: A locomotive engine of German railway Deutsche Bahn",
         "A locomotive engine of German railway Deutsche Bahn"),
        ("photo", ""),
        ("Image 3", ""),
        ("IMG_1234.JPG", ""),
        ("DSC01234", ""),
        ("square_gallery_thumb.jpg", ""),
        ("https://example.org/a.jpg", ""),
        ("© Getty Images", ""),
        ("12345", ""),
        ("Hashtag, Hashtags, Raute, Twitter", "Hashtag, Hashtags, Raute, Twitter"),
        ("Chelsea the cat", "Chelsea the cat"),
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_kept_references_carry_cleaned_text():
    item = ref("https://example.org/a.jpg", alt="  Foto:  Der   Bahnhof  ", title="IMG_0001.jpg", context="Ã¼ber")
    kept = filter_refs([item], "", "", RefFilterConfig()).refs[0]
    assert (kept.alt, kept.title, kept.context) == ("Der Bahnhof", "", "über")


def real_alts(shared_data, name: str) -> list[str]:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(gzip.decompress((shared_data / "html" / name).read_bytes()))
    return [node.attributes.get("alt") or "" for node in tree.css("img")]


def test_language_of_real_alt_texts_and_undetermined_when_short(shared_data):
    for page, lang in (("trafilatura/brigitte.de.ikigai.html.gz", "de"), ("trafilatura/knowtechie.com.rally.html.gz", "en")):
        alts = [alt for alt in real_alts(shared_data, page) if len(alt) > 40]
        guesses = [guess_language(alt, 0.5) for alt in alts]
        assert len(guesses) >= 10 and set(guesses) <= {lang, "und"}, page
        assert guesses.count(lang) >= 0.8 * len(guesses), page
    assert guess_language("Foto: dpa", 0.5) == "und"  # too few letters to tell


def test_page_language_prefers_the_text_and_falls_back_to_the_declared_lang():
    text = ["Der Bahnhof in Berlin bei Nacht, mit den Lichtern der Stadt und vielen Menschen"]
    assert page_language(text, "en-US", 0.5) == "de"
    assert page_language(["Foto"], "fr-FR", 0.5) == "fr"
    assert page_language(["Foto"], "", 0.5) == "und"


def test_languages_keep_only_the_wanted_ones_and_fall_back_to_the_page():
    refs = [
        ref("https://example.org/1.jpg", "Ein Zug der Deutschen Bahn fährt in den Hauptbahnhof ein", position=0),
        ref("https://example.org/2.jpg", "A train of the German railway pulls into the main station", position=1),
        ref("https://example.org/3.jpg", "", position=2),  # no text: the page decides
    ]
    german_page = filter_refs(refs, "de", "Nachrichten aus Berlin und Brandenburg", RefFilterConfig(languages=("de",)))
    assert [item.position for item in german_page.refs] == [0, 2]
    assert [(item.ref.position, item.reason, item.detail) for item in german_page.dropped] == [(1, "language_excluded", "en")]
    unknown_page = filter_refs(refs, "", "", RefFilterConfig(languages=("en",)))
    reasons = {item.ref.position: item.reason for item in unknown_page.dropped}
    assert [item.position for item in unknown_page.refs] == [1]
    assert reasons[0] == "language_excluded"
    # the page's text is mixed German and English, so neither is sure: the textless image is undetermined
    assert reasons.get(2) in {"language_undetermined", "language_excluded"}
    everything = filter_refs(refs, "", "", RefFilterConfig())
    assert len(everything.refs) == 3


def test_real_photos_pass_the_post_decode_check(shared_data):
    config = DecodedImageConfig()
    for path in sorted((shared_data / "images/photos").rglob("*.*")):
        image = normalize_image(path.read_bytes(), min_side=1, max_aspect=10)
        assert decoded_image_problem(image, config) is None, path.name


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_blank_and_fully_transparent_images_are_near_uniform(shared_data):
    rgba = Image.open(shared_data / "images/edgecases/imagededup_alpha_channel_image.png").convert("RGBA")
    invisible = rgba.copy()
    invisible.putalpha(0)
    one_colour = Image.new("RGB", rgba.size, (200, 30, 30))
    config = DecodedImageConfig()
    for picture in (invisible, one_colour):
        image = normalize_image(png_bytes(picture))
        reason, detail = decoded_image_problem(image, config)
        assert reason == "near_uniform" and "std" in detail
    assert decoded_image_problem(normalize_image(png_bytes(rgba)), config) is None


def test_transparent_icons_are_composited_before_hashing_so_they_do_not_hash_alike(shared_data):
    # Two real transparent images: composited on white they keep their shapes, so their hashes
    # are far apart (on black, or with alpha dropped, transparent areas would look alike).
    logo = normalize_image((shared_data / "images/photos/skimage/logo.png").read_bytes())
    horse = normalize_image((shared_data / "images/photos/skimage/horse.png").read_bytes())
    assert (int(logo.phash, 16) ^ int(horse.phash, 16)).bit_count() > 16
    assert pixel_std(logo) > DecodedImageConfig().min_pixel_std


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_filter_arguments(parser)
    return parser.parse_args(argv)


def test_flags_build_the_config():
    config = FilterConfig.from_args(parse([
        "--languages", "en, DE", "--max-images-per-page", "12", "--max-pages-per-image", "3",
        "--clip-model", "/models/clip", "--pair-similarity", "0.5,0.9", "--min-text-score", "0.2",
    ]))
    assert config.refs.languages == ("de", "en") and config.refs.max_images_per_page == 12
    assert config.dedupe.max_pages_per_image == 3
    assert config.pair_similarity == (0.5, 0.9) and config.min_text_score == 0.2
    defaults = FilterConfig.from_args(parse([]))
    assert defaults == FilterConfig()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--languages", "english"], "unknown code(s) english"),
        (["--pair-similarity", "0.9", "--clip-model", "m"], "MIN,MAX"),
        (["--pair-similarity", "0.9,0.5", "--clip-model", "m"], "MIN < MAX"),
        (["--min-text-score", "0.2"], "give --clip-model"),
        (["--max-pages-per-image", "0"], "--max-pages-per-image must be at least 1"),
        (["--corpus-duplicate-distance", "64"], "between 0 and 63"),
    ],
)
def test_bad_flags_exit_with_what_to_change(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        FilterConfig.from_args(parse(argv))
    assert message in str(exit_info.value)


def test_every_shared_page_is_accounted_for(shared_data):
    """On the 70 real pages: every reference is kept or dropped with a reason; no kept one is furniture."""
    known = {"duplicate_url", "svg", "furniture_url", "declared_too_small", "gif_hint", "furniture_text",
             "over_page_cap", "repeated_on_page", "furniture_region", "embedded_post", "furniture_class", "person_tile",
             "site_name_alt", "background_image"}
    dropped_total = 0
    for path in sorted((shared_data / "html").rglob("*.html.gz")):
        found = extract_images(gzip.decompress(path.read_bytes()), f"https://example.org/{path.stem}")
        result = filter_page_refs(found, f"https://example.org/{path.stem}", RefFilterConfig())
        assert len(result.refs) + len(result.dropped) == len(found.refs), path.name
        assert {item.reason for item in result.dropped} <= known
        assert len(result.refs) <= 30
        dropped_total += len(result.dropped)
        for kept in result.refs:
            assert not kept.url.lower().endswith(".svg")
            assert kept.width is None or kept.width >= 100
    assert dropped_total > 100
