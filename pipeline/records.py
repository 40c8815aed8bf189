"""Plain data passed between the mining stages.

Stages are plain functions over these types, tested without Beam; the Beam transforms in
`pipeline/mine.py` only move them around. Everything here pickles cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reject:
    """Why one element left a stage. Written to `rejects/` (never with image bytes)."""

    element_id: str  # record id, page URL, or "page_url image_url"
    stage: str
    reason: str  # short snake_case token; also the name of the Beam counter
    detail: str = ""

    def as_row(self) -> dict:
        return {
            "element_id": self.element_id,
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail[:500],
        }


@dataclass(frozen=True)
class Page:
    """An HTML response record from a WARC."""

    url: str
    html: bytes
    charset: str | None  # from the HTTP Content-Type header, if any
    crawl: str  # the crawl or WARC file the page came from
    record_id: str
    x_robots_tag: str = ""  # the X-Robots-Tag header of the page, if any


@dataclass(frozen=True)
class ImageRecord:
    """An image response record from a WARC, kept by its URL."""

    url: str
    data: bytes
    content_type: str
    record_id: str


@dataclass(frozen=True)
class ImageRef:
    """One image reference found on a page."""

    url: str  # absolute http(s) URL
    alt: str
    title: str
    context: str  # figcaption of the enclosing <figure>, else nearby text; capped
    width: int | None  # declared in the HTML, if any
    height: int | None
    position: int  # 0-based order among the page's kept references
    source: str  # the attribute the URL came from: src, srcset, data-src, ...


@dataclass
class PageImages:
    """What extraction found on one page."""

    title: str
    lang: str
    refs: list[ImageRef] = field(default_factory=list)
    # page-level opt-outs, the raw content of each such <meta> tag ("" when absent):
    # <meta name="robots">, <meta name="magiclens"> and <meta name="tdm-reservation">
    meta_robots: str = ""
    meta_magiclens: str = ""
    meta_tdm_reservation: str = ""
    # references that were skipped, as (reason, detail): e.g. ("non_http_url", "data:image/png...")
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class NormalizedImage:
    """An image decoded, oriented upright, converted to RGB, resized and re-encoded as JPEG.

    A baseline RGB JPEG already within the size limit and without camera metadata is kept byte for
    byte (no second lossy encoding).
    """

    jpeg: bytes
    width: int  # of the stored (resized) image
    height: int
    original_width: int
    original_height: int
    original_format: str  # JPEG, PNG, ... as Pillow names it
    sha256: str  # hex digest of the original bytes
    phash: str  # 64-bit perceptual hash (imagehash pHash) as 16 hex digits
