"""Per page: drop duplicate images, then choose ordered (query, target) pairs deterministically."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from magiclens.pipeline.records import ImageRef, NormalizedImage


@dataclass(frozen=True)
class PageInfo:
    url: str
    title: str
    lang: str
    crawl: str


@dataclass(frozen=True)
class PageImage:
    """An image reference of a page together with its normalised image."""

    page: PageInfo
    ref: ImageRef
    image: NormalizedImage


@dataclass(frozen=True)
class PairingConfig:
    near_duplicate_distance: int = 8  # pHash Hamming distance at or under which two images are one
    pairs_per_page: int = 4
    both_directions: bool = False  # also emit (target, query) for a chosen (query, target)


def hamming(phash_a: str, phash_b: str) -> int:
    return (int(phash_a, 16) ^ int(phash_b, 16)).bit_count()


def drop_duplicates(images: list[PageImage], max_distance: int) -> tuple[list[PageImage], list[tuple[PageImage, str, str]]]:
    """Keep the first of each set of exact (sha256) or near (pHash) duplicates, in page order.

    Returns the kept images and the dropped ones as (image, reason, detail).
    """
    kept: list[PageImage] = []
    dropped: list[tuple[PageImage, str, str]] = []
    for candidate in sorted(images, key=lambda item: (item.ref.position, item.ref.url)):
        reason = detail = ""
        for earlier in kept:
            if candidate.image.sha256 == earlier.image.sha256:
                reason, detail = "exact_duplicate", earlier.ref.url
                break
            distance = hamming(candidate.image.phash, earlier.image.phash)
            if distance <= max_distance:
                reason, detail = "near_duplicate", f"distance {distance} to {earlier.ref.url}"
                break
        if reason:
            dropped.append((candidate, reason, detail))
        else:
            kept.append(candidate)
    return kept, dropped


def stable_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


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


def choose_pairs(images: list[PageImage], config: PairingConfig) -> list[tuple[PageImage, PageImage]]:
    """Ordered (query, target) pairs of distinct images, at most `pairs_per_page`, deterministic.

    Each unordered pair is considered once. The side with the more informative text is the target
    (the instruction is written from it); ties are broken by a hash of the page URL and both image
    hashes. Pairs are ranked by the target's text, then the query's, then that hash; they are
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
            rank = (-informativeness[id(target)], -informativeness[id(query)], key)
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
    return {
        f"{prefix}_url": item.ref.url,
        f"{prefix}_alt": item.ref.alt,
        f"{prefix}_context": item.ref.context,
        f"{prefix}_image": {"bytes": item.image.jpeg, "path": f"{item.image.sha256}.jpg"},
        f"{prefix}_width": item.image.width,
        f"{prefix}_height": item.image.height,
        f"{prefix}_sha256": item.image.sha256,
        f"{prefix}_phash": item.image.phash,
    }


def pair_row(query: PageImage, target: PageImage) -> dict:
    """One row of the pairs schema (pipeline/schemas.py)."""
    page = query.page
    return {
        "pair_id": pair_id(page.url, query.image.sha256, target.image.sha256),
        "page_url": page.url,
        "page_title": page.title,
        "crawl": page.crawl,
        **_side("query", query),
        **_side("target", target),
        "scores": None,
    }
