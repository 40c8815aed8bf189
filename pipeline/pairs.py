"""Per page: drop duplicate images, then choose ordered (query, target) pairs deterministically."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.records import ImageRef, NormalizedImage


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


def _has_text(item: PageImage) -> bool:
    return bool(item.ref.alt.strip() or item.ref.title.strip() or item.ref.context.strip())


def choose_pairs(images: list[PageImage], config: PairingConfig) -> list[tuple[PageImage, PageImage]]:
    """Ordered (query, target) pairs of distinct images, at most `pairs_per_page`.

    Each unordered pair is considered once; its direction and its rank come from a hash of the page
    URL and both image hashes, so the same input always gives the same pairs. Pairs whose target
    carries text (alt, title or context: what an instruction is written from) come first.
    """
    candidates = []
    for i, first in enumerate(images):
        for second in images[i + 1 :]:
            page_url = first.page.url
            key = stable_hash(page_url, *sorted((first.image.sha256, second.image.sha256)))
            query, target = (first, second) if int(key[-1], 16) % 2 == 0 else (second, first)
            if not _has_text(target) and _has_text(query):
                query, target = target, query
            rank = (not _has_text(target), not _has_text(query), key)
            candidates.append((rank, query, target))
    candidates.sort(key=lambda item: item[0])
    chosen: list[tuple[PageImage, PageImage]] = []
    for _, query, target in candidates:
        if len(chosen) >= config.pairs_per_page:
            break
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
