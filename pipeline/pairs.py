"""Per page: drop duplicate images, then choose ordered (query, target) pairs deterministically."""

from __future__ import annotations

import re
from dataclasses import dataclass

from magiclens.pipeline.hashing import hamming, stable_hash
from magiclens.pipeline.pixels import MAX_COLOUR_DISTANCE, colours_agree, measured
from magiclens.pipeline.records import ImageRef, NormalizedImage


# The opt-outs checked for every page before its images are used (extract/stage.py `page_opt_out`),
# and those checked in addition for an image fetched over HTTP (pipeline/fetch/client.py).
PAGE_OPT_OUT_CHECKS = "x-robots-tag,meta-robots,meta-magiclens,tdm-reservation"
FETCH_OPT_OUT_CHECKS = "robots.txt,tdmrep"
FETCHED = "fetched"  # the record id of an image that was fetched, not read from a WARC


@dataclass(frozen=True)
class PageInfo:
    url: str
    title: str
    lang: str
    crawl: str
    # provenance and rights (see the pairs schema, pipeline/schemas.py)
    license: str = ""  # recognised licences, e.g. "cc-by-sa-3.0"
    license_declared: str = ""  # the page's declarations, one a line
    warc_file: str = ""
    record_id: str = ""
    date: str = ""  # WARC-Date


@dataclass(frozen=True)
class ImageCapture:
    """Where an image's bytes came from: a WARC record, or a fetch (record_id FETCHED, date the fetch time)."""

    warc_file: str = ""
    record_id: str = ""
    date: str = ""


@dataclass(frozen=True)
class PageImage:
    """An image reference of a page together with its normalised image."""

    page: PageInfo
    ref: ImageRef
    image: NormalizedImage
    image_url: str = ""  # the candidate URL whose bytes were used ("" when it is ref.url)
    capture: ImageCapture = ImageCapture()


@dataclass(frozen=True)
class PairingConfig:
    near_duplicate_distance: int = 8  # pHash Hamming distance at or under which two images are one
    pairs_per_page: int = 4
    both_directions: bool = False  # also emit (target, query) for a chosen (query, target)


def drop_duplicates(
    images: list[PageImage], max_distance: int, max_colour_distance: float = MAX_COLOUR_DISTANCE
) -> tuple[list[PageImage], list[tuple[PageImage, str, str]]]:
    """Keep the first of each set of exact (sha256) or near duplicates, in page order.

    Near duplicates have pHashes within `max_distance` bits AND colours that agree (hue histograms
    within `max_colour_distance` degrees, or either image achromatic): the same product in another
    colour is a relation worth pairing, not a duplicate. Images that skipped the post-decode check
    are measured here. Returns the kept images and the dropped ones as (image, reason, detail).
    """
    kept: list[PageImage] = []
    dropped: list[tuple[PageImage, str, str]] = []
    colour = {id(item): measured(item.image).colour for item in images}
    for candidate in sorted(images, key=lambda item: (item.ref.position, item.ref.url)):
        reason = detail = ""
        for earlier in kept:
            if candidate.image.sha256 == earlier.image.sha256:
                reason, detail = "exact_duplicate", earlier.ref.url
                break
            distance = hamming(int(candidate.image.phash, 16), int(earlier.image.phash, 16))
            if distance <= max_distance and colours_agree(colour[id(candidate)], colour[id(earlier)],
                                                          max_colour_distance):
                reason, detail = "near_duplicate", f"distance {distance} to {earlier.ref.url}"
                break
        if reason:
            dropped.append((candidate, reason, detail))
        else:
            kept.append(candidate)
    return kept, dropped


def pair_id(page_url: str, query_sha256: str, target_sha256: str) -> str:
    return stable_hash(page_url, query_sha256, target_sha256)


_WORD = re.compile(r"[^\W\d_]{2,}")
# Distinct words counted per field; beyond this more text adds nothing to the ranking.
_WORDS_CAP = 12


def text_informativeness(ref: ImageRef) -> int:
    """How much an instruction could be written from an image's text: distinct words, alt first.

    Alt and title (written about the image) count twice, nearby text once. The text was already
    cleaned of boilerplate ("image", file names) by pipeline/filters.py.
    """
    described = {word.lower() for word in _WORD.findall(f"{ref.alt} {ref.title}")}
    nearby = {word.lower() for word in _WORD.findall(ref.context)} - described
    return 2 * min(len(described), _WORDS_CAP) + min(len(nearby), _WORDS_CAP)


def _content(item: PageImage) -> float:
    """The image's content score in tenths, so that small differences do not outrank the text."""
    score = item.ref.content_score
    return round(0.5 if score is None else score, 1)


def choose_pairs(images: list[PageImage], config: PairingConfig) -> list[tuple[PageImage, PageImage]]:
    """Ordered (query, target) pairs of distinct images, at most `pairs_per_page`, deterministic.

    Each unordered pair is considered once. The side with the more informative text is the target
    (the instruction is written from it); ties are broken by a hash of the page URL and both image
    hashes. Pairs are ranked by the lower content score of their two images (pipeline/furniture.py:
    images of the page's main content first), then the target's text, then the query's, then that hash; they are
    taken greedily, preferring at each step pairs whose images are in the fewest pairs chosen so
    far, so that a page's pairs spread over its images instead of all sharing the best one. The
    order of `images` does not matter: the same images always give the same pairs.
    """
    informativeness = {id(item): text_informativeness(item.ref) for item in images}
    candidates = []
    for i, first in enumerate(images):
        for second in images[i + 1 :]:
            key = stable_hash(first.page.url, *sorted((first.image.sha256, second.image.sha256)))
            query, target = (first, second) if int(key[-1], 16) % 2 == 0 else (second, first)
            if informativeness[id(query)] > informativeness[id(target)]:
                query, target = target, query
            rank = (-min(_content(query), _content(target)), -informativeness[id(target)], -informativeness[id(query)], key)
            candidates.append((rank, query, target))
    candidates.sort(key=lambda item: item[0])
    uses: dict[str, int] = {}
    chosen: list[tuple[PageImage, PageImage]] = []
    while candidates and len(chosen) < config.pairs_per_page:
        best = min(
            range(len(candidates)),
            key=lambda n: (
                max(uses.get(candidates[n][1].image.sha256, 0), uses.get(candidates[n][2].image.sha256, 0)),
                candidates[n][0],
            ),
        )
        _, query, target = candidates.pop(best)
        for item in (query, target):
            uses[item.image.sha256] = uses.get(item.image.sha256, 0) + 1
        chosen.append((query, target))
        if config.both_directions and len(chosen) < config.pairs_per_page:
            chosen.append((target, query))
    return chosen


def _side(prefix: str, item: PageImage) -> dict:
    image = measured(item.image)
    return {
        f"{prefix}_url": item.ref.url,
        f"{prefix}_image_url": item.image_url or item.ref.url,
        f"{prefix}_content_score": item.ref.content_score,
        f"{prefix}_alt": item.ref.alt,
        f"{prefix}_context": item.ref.context,
        f"{prefix}_image": {"bytes": item.image.jpeg, "path": f"{item.image.sha256}.jpg"},
        f"{prefix}_width": item.image.width,
        f"{prefix}_height": item.image.height,
        f"{prefix}_sha256": item.image.sha256,
        f"{prefix}_phash": item.image.phash,
        f"{prefix}_photo_score": image.photo_score,
        f"{prefix}_colour": image.colour,
        f"{prefix}_warc_file": item.capture.warc_file,
        f"{prefix}_record_id": item.capture.record_id,
        f"{prefix}_date": item.capture.date,
    }


def pair_row(query: PageImage, target: PageImage) -> dict:
    """One row of the pairs schema (pipeline/schemas.py)."""
    page = query.page
    fetched = FETCHED in (query.capture.record_id, target.capture.record_id)
    return {
        "pair_id": pair_id(page.url, query.image.sha256, target.image.sha256),
        "page_url": page.url,
        "page_title": page.title,
        "crawl": page.crawl,
        "page_lang": page.lang,
        "page_license": page.license,
        "page_license_declared": page.license_declared,
        "page_warc_file": page.warc_file,
        "page_record_id": page.record_id,
        "page_date": page.date,
        "opt_out_checks": f"{PAGE_OPT_OUT_CHECKS},{FETCH_OPT_OUT_CHECKS}" if fetched else PAGE_OPT_OUT_CHECKS,
        **_side("query", query),
        **_side("target", target),
        "scores": None,
    }
