"""Plain data passed between the mining stages.

Stages are plain functions over these types, tested without Beam; the Beam wrapper of each stage
only moves them around. Everything here pickles cheaply.
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
    warc_file: str = ""  # the WARC it was read from: a local file's name, else its full URI
    date: str = ""  # WARC-Date of its record (of the revisit record, for a revisit): when it was captured


@dataclass(frozen=True)
class ImageRecord:
    """An image response record from a WARC, kept by its URL."""

    url: str
    data: bytes
    content_type: str
    record_id: str
    warc_file: str = ""  # as Page.warc_file
    date: str = ""  # WARC-Date of its record


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
    # What the page says about the element, for telling furniture (logos, avatars, icons) from
    # content before anything is fetched; see pipeline/extract/regions.py.
    candidates: tuple[str, ...] = ()  # every usable absolute URL of the element, `url` first
    landmarks: tuple[str, ...] = ()  # enclosing page regions, nearest first: nav, footer, banner, embed, ...
    class_tokens: tuple[str, ...] = ()  # lower-case words of the class and id of the element and its closest ancestors
    in_main: bool = False  # inside the page's main content
    link_host: str = ""  # host of the enclosing <a href>, "" when none
    content_score: float | None = None  # 0 furniture .. 1 content, set by the reference filters


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
    site_name: str = ""  # <meta property="og:site_name">, "" when absent
    # the licence the page declares, one line per declaration (pipeline/extract/licenses.py)
    license_declared: tuple[str, ...] = ()


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
    # Filled by the post-decode check from a ~64 px copy (pipeline/pixels.py); None until then.
    photo_score: float | None = None  # 0 = graphic .. 1 = photo
    colour: str | None = None  # colour signature: near duplicates must agree on it too
