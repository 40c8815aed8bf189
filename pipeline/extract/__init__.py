"""Image references on one HTML page: which images it shows, and what it says about them.

For each `<img>`, in page order, one absolute http(s) URL is chosen:

1. the largest candidate of its srcset-like attributes (`srcset`, `data-srcset`, ...) and of the
   `<source>` elements of an enclosing `<picture>`: the largest `w` descriptor, else the largest
   `x` density;
2. else the first lazy-loading attribute that holds a usable URL (`data-src`, `data-lazy-src`,
   `data-original`, ...: lazy loaders keep the real URL there and a placeholder in `src`);
3. else `src`;

resolved against `<base href>` (itself resolved against the page URL), without its fragment.
All the usable URLs of the element, in that order and each once, are its `candidates`.
With it come `alt`, `title`, a context (the text of the `<figcaption>` of the enclosing
`<figure>`, else the text of the image's parent, else of its grandparent; text nodes joined by a
space, whitespace collapsed, script and style code left out), the declared `width`/`height` and
the position among the page's kept references, and what the page says about where it sits
(regions.py: landmarks such as nav or footer, class and id words, inside the main content or
not, the host of the enclosing link), so that furniture can be told from content unfetched.

The page-level opt-outs come with them: the content of `<meta name="robots">`,
`<meta name="magiclens">` and `<meta name="tdm-reservation">` anywhere on the page (names without
regard to case; several of a name joined with ", "); and the site name (`og:site_name`).

An image without a usable URL, or whose URL was already kept on this page, is listed in
`PageImages.skipped` as (reason, detail), with one of the reasons below. So are two page-level
events: the images beyond `max_refs` (one entry), and markup nested so deep that it was flattened.

Two parsers build the same HTML5 tree: Lexbor through selectolax (the default, fast) and
BeautifulSoup with html5lib (`parser="bs4"`). Each only gathers raw strings per image, and
finds the context of the images that are kept (`RawPage`); choosing, resolving and cleaning is
shared code, so both give the same result.

Modules: decoding (bytes to the UTF-8 document, hostile nesting), lexbor and soup (the parsers),
raw (what they gather), urls (candidates, resolution, `canonical_url_key`), regions (where an
image sits), refs (RawPage to PageImages), stage (the Beam stage of `magiclens mine`, imported
from there: this package itself needs no Beam).
"""

from __future__ import annotations

from magiclens.pipeline.extract.decoding import MAX_NESTING, NESTING_TOO_DEEP, flatten_deep_nesting, utf8_document
from magiclens.pipeline.extract.lexbor import gather_lexbor
from magiclens.pipeline.extract.raw import ATTRIBUTE_CHARS, EMPTY_URL, INVALID_URL, NON_HTTP_URL, ExtractError
from magiclens.pipeline.extract.refs import DUPLICATE_URL, TOO_MANY_IMAGES, page_images
from magiclens.pipeline.extract.soup import gather_soup
from magiclens.pipeline.extract.urls import LAZY_SRC_ATTRIBUTES, SRCSET_ATTRIBUTES
from magiclens.pipeline.records import PageImages

__all__ = [
    "ATTRIBUTE_CHARS", "DEFAULT_CONTEXT_CHARS", "DEFAULT_MAX_REFS", "DUPLICATE_URL", "EMPTY_URL", "INVALID_URL",
    "LAZY_SRC_ATTRIBUTES", "NESTING_TOO_DEEP", "NON_HTTP_URL", "PARSERS", "SRCSET_ATTRIBUTES", "TOO_MANY_IMAGES",
    "ExtractError", "extract_images",
]

PARSERS = ("lexbor", "bs4")
DEFAULT_MAX_REFS = 1000  # <img> elements examined per page; the rest are one `too_many_images` entry
DEFAULT_CONTEXT_CHARS = 300


def extract_images(
    html: bytes | str,
    page_url: str,
    *,
    parser: str = "lexbor",
    charset: str | None = None,
    max_refs: int = DEFAULT_MAX_REFS,
    context_chars: int = DEFAULT_CONTEXT_CHARS,
) -> PageImages:
    """The image references of one page. Bad HTML gives what could be found, never an error.

    `html` is the response body; bytes are decoded with `charset` (from the HTTP header), else a
    byte-order mark or a `<meta charset>` in the first 4 KiB, else as UTF-8 if valid, else as
    windows-1252; undecodable bytes become U+FFFD. `parser` is "lexbor" or "bs4". At most
    `max_refs` <img> elements are examined, in page order (kept, skipped or duplicate alike);
    the rest are counted in one `too_many_images` entry of `skipped`. Contexts are capped at
    `context_chars` characters (0: no context).

    Raises ExtractError only if the parser itself fails (the caller rejects the page), and
    ValueError for an unknown `parser` or a `max_refs` under 1.
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown HTML parser {parser!r}; choose one of: {', '.join(PARSERS)}")
    if max_refs < 1:
        raise ValueError(f"max_refs must be at least 1, not {max_refs}")
    document = utf8_document(html, charset)
    document, flattened = flatten_deep_nesting(document, MAX_NESTING)
    gather = gather_lexbor if parser == "lexbor" else gather_soup
    try:
        found = page_images(gather(document, max_refs, context_chars), page_url)
    except RecursionError as error:  # not expected below MAX_NESTING; a reject, never a crash
        raise ExtractError(f"{parser} recursed too deep on this page") from error
    if flattened:
        found.skipped.append(
            (NESTING_TOO_DEEP, f"{flattened} elements nested deeper than {MAX_NESTING} were flattened")
        )
    return found
