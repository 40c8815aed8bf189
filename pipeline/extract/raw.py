"""What a parser gathers about one page (RawPage), the reasons an image is skipped, and the text
cleaning both parsers share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from magiclens.pipeline.extract.regions import RawFacts

ATTRIBUTE_CHARS = 1000  # cap on alt, title and the page title: bounded memory on hostile pages
# The context of an image without a figcaption is the text of its parent, else of its
# grandparent (below <body>): further up, the text is mostly not about the image (the start of a
# whole article), and collecting it costs more than parsing the page.
CONTEXT_LEVELS = 2

# Reasons in `PageImages.skipped`.
EMPTY_URL = "empty_url"  # no URL in src, srcset or the lazy-loading attributes
NON_HTTP_URL = "non_http_url"  # data:, javascript:, blob:, mailto:, ... (nothing to fetch over http)
INVALID_URL = "invalid_url"  # not parseable, or without a host after resolving
DETAIL_CHARS = 200


class ExtractError(Exception):
    """The HTML parser itself failed on a page; the caller rejects the page with this message."""


# What a parser found about one <img>: its attributes (None for an attribute without a value) and
# the attributes of the <source>s of an enclosing <picture>.
RawImage = tuple[dict, list[dict]]


@dataclass(slots=True)
class RawPage:
    title: str
    html_lang: str
    content_language: str  # of the first <meta http-equiv="content-language"> in <head>
    base_href: str | None  # of the first <base href>
    images: list[RawImage]  # the first max_refs <img> elements, in page order
    total_images: int
    # The context of images[index], cleaned and capped; asked only for the references kept.
    context_of: Callable[[int], str]
    # (name, content) of each <meta> with both, in page order, as written
    named_metas: list[tuple[str, str]]
    # The facts of images[index] (regions.py), asked only for the references kept.
    facts_of: Callable[[int], RawFacts]
    site_name: str  # the content of the first <meta property="og:site_name"> (or name=), as written
    license_links: list[str]  # href of each <a> and <link> whose rel holds "license", in page order, as written


NO_SOURCES: list[dict] = []  # the <source>s of an <img> outside any <picture>
ASCII_WHITESPACE = " \t\n\r\f"


def is_site_name(meta_name: str | None) -> bool:
    """Whether a <meta> property (or name) is og:site_name, without regard to case or whitespace."""
    return bool(meta_name) and meta_name.strip(ASCII_WHITESPACE).lower() == "og:site_name"


def no_context(index: int) -> str:
    return ""


def clean(text: str | None, limit: int) -> str:
    """Whitespace collapsed to single spaces, stripped, at most `limit` characters. Of a long
    text only a prefix is read (4 * limit characters after leading whitespace): cheap for the
    text of a whole article, and enough for `limit` characters unless it is mostly spaces."""
    if not text or limit <= 0:
        return ""
    if len(text) > 4 * limit:
        text = text.lstrip()[: 4 * limit]
    return " ".join(text.split())[:limit].rstrip()

