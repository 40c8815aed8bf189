"""Image references on one HTML page: which images it shows, and what it says about them.

For each `<img>`, in page order, one absolute http(s) URL is chosen:

1. the largest candidate of its srcset-like attributes (`srcset`, `data-srcset`, ...) and of the
   `<source>` elements of an enclosing `<picture>`: the largest `w` descriptor, else the largest
   `x` density;
2. else the first lazy-loading attribute that holds a usable URL (`data-src`, `data-lazy-src`,
   `data-original`, ...: lazy loaders keep the real URL there and a placeholder in `src`);
3. else `src`;

resolved against `<base href>` (itself resolved against the page URL), without its fragment.
With it come `alt`, `title`, a context (the text of the `<figcaption>` of the enclosing
`<figure>`, else the text of the image's parent, else of its grandparent; text nodes joined by a
space, whitespace collapsed, script and style code left out), the declared `width`/`height` and
the position among the page's kept references.

The page-level opt-outs come with them: the content of `<meta name="robots">`,
`<meta name="magiclens">` and `<meta name="tdm-reservation">` anywhere on the page (names without
regard to case; several of a name joined with ", ").

An image without a usable URL, or whose URL was already kept on this page, is listed in
`PageImages.skipped` as (reason, detail), with one of the reasons below. So are two page-level
events: the images beyond `max_refs` (one entry), and markup nested so deep that it was flattened.

Two parsers build the same HTML5 tree: Lexbor through selectolax (the default, fast) and
BeautifulSoup with html5lib (`parser="bs4"`). Each only gathers raw strings per image, and
finds the context of the images that are kept (`_RawPage`); choosing, resolving and cleaning is
shared code, so both give the same result.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from urllib.parse import quote, urljoin, urlsplit

import numpy as np
import webencodings
from bs4 import BeautifulSoup, NavigableString
from selectolax.lexbor import LexborDocumentOptions, LexborHTMLParser

from magiclens.pipeline.records import ImageRef, PageImages

PARSERS = ("lexbor", "bs4")
DEFAULT_MAX_REFS = 1000  # <img> elements examined per page; the rest are one `too_many_images` entry
DEFAULT_CONTEXT_CHARS = 300
ATTRIBUTE_CHARS = 1000  # cap on alt, title and the page title: bounded memory on hostile pages
# The context of an image without a figcaption is the text of its parent, else of its
# grandparent (below <body>): further up, the text is mostly not about the image (the start of a
# whole article), and collecting it costs more than parsing the page.
CONTEXT_LEVELS = 2
# Elements nested deeper than this are flattened before parsing: both HTML5 parsers take time
# quadratic in the depth (Lexbor takes minutes for 100,000 nested <div>s, html5lib far longer).
MAX_NESTING = 1024
# A page with at most this many "<" is never flattened: however it nests, Lexbor parses it in a
# tenth of a second and html5lib in seconds, and the depth estimate would cost more than it saves.
FEW_TAGS = 4096

# Reasons in `PageImages.skipped`.
EMPTY_URL = "empty_url"  # no URL in src, srcset or the lazy-loading attributes
NON_HTTP_URL = "non_http_url"  # data:, javascript:, blob:, mailto:, ... (nothing to fetch over http)
INVALID_URL = "invalid_url"  # not parseable, or without a host after resolving
DUPLICATE_URL = "duplicate_url"  # the same image URL was already kept on this page
TOO_MANY_IMAGES = "too_many_images"  # <img> elements beyond max_refs, counted in one entry
NESTING_TOO_DEEP = "nesting_too_deep"  # markup nested deeper than MAX_NESTING was flattened

SRCSET_ATTRIBUTES = ("srcset", "data-srcset", "data-lazy-srcset")
# In order of preference; all seen on real pages (WordPress, Squarespace, BBC, pixnet, ...).
LAZY_SRC_ATTRIBUTES = (
    "data-src",
    "data-lazy-src",
    "data-original",
    "data-lazy",
    "data-hi-res-src",
    "data-full-src",
    "data-image",
    "datasrc",
    "original",
)
DETAIL_CHARS = 200


class ExtractError(Exception):
    """The HTML parser itself failed on a page; the caller rejects the page with this message."""


# What a parser found about one <img>: its attributes (None for an attribute without a value) and
# the attributes of the <source>s of an enclosing <picture>.
_RawImage = tuple[dict, list[dict]]


@dataclass(slots=True)
class _RawPage:
    title: str
    html_lang: str
    content_language: str  # of the first <meta http-equiv="content-language"> in <head>
    base_href: str | None  # of the first <base href>
    images: list[_RawImage]  # the first max_refs <img> elements, in page order
    total_images: int
    # The context of images[index], cleaned and capped; asked only for the references kept.
    context_of: Callable[[int], str]
    # (name, content) of each <meta> with both, in page order, as written
    named_metas: list[tuple[str, str]]


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
    document = _utf8_document(html, charset)
    document, flattened = _flatten_deep_nesting(document, MAX_NESTING)
    gather = _gather_lexbor if parser == "lexbor" else _gather_bs4
    try:
        found = _page_images(gather(document, max_refs, context_chars), page_url)
    except RecursionError as error:  # not expected below MAX_NESTING; a reject, never a crash
        raise ExtractError(f"{parser} recursed too deep on this page") from error
    if flattened:
        found.skipped.append(
            (NESTING_TOO_DEEP, f"{flattened} elements nested deeper than {MAX_NESTING} were flattened")
        )
    return found


# ---- decoding --------------------------------------------------------------------------------

_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
_META_PRESCAN_BYTES = 4096


def _utf8_document(html: bytes | str, charset: str | None) -> bytes:
    """The page as UTF-8 bytes, which both parsers read (Lexbor natively)."""
    if isinstance(html, str):
        return html.encode("utf-8", "replace")  # "replace": lone surrogates cannot be encoded
    for bom, name in _BOMS:
        if html.startswith(bom):
            return _reencode(html[len(bom) :], name)
    encoding = _codec(charset)
    if encoding is None:
        declared = _META_CHARSET.search(html, 0, _META_PRESCAN_BYTES)
        encoding = _codec(declared.group(1).decode("ascii")) if declared else None
        if encoding is not None and encoding.startswith("utf-16"):
            encoding = "utf-8"  # a <meta> readable as ASCII cannot be in UTF-16 (HTML Standard)
    if encoding is None:
        try:
            html.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            encoding = "windows-1252"
    return _reencode(html, encoding)


def _codec(label: str | None) -> str | None:
    """The Python codec for an encoding label, mapped as browsers do (latin1 is windows-1252,
    gb2312 is gbk); None for an unknown label."""
    if not label:
        return None
    found = webencodings.lookup(label)
    return None if found is None else found.codec_info.name


def _reencode(data: bytes, encoding: str) -> bytes:
    if encoding == "utf-8":
        return data  # invalid sequences are read as U+FFFD, as decode("utf-8", "replace") does
    return data.decode(encoding, "replace").encode("utf-8")


# ---- hostile nesting -------------------------------------------------------------------------

_TAG = re.compile(rb"<(/?)([a-zA-Z][^\s/>]*)[^>]*>")
_VOID = frozenset(b"area base br col embed hr img input keygen link meta param source track wbr".split())
# A start tag of one of these closes an open element of the same name (<p>a<p>b, <li>a<li>b).
_SELF_CLOSING_SIBLINGS = frozenset(b"p li dt dd option tr td th".split())


def _flatten_deep_nesting(document: bytes, max_depth: int) -> tuple[bytes, int]:
    """The document without the start tags nested deeper than max_depth (nor their end tags),
    and how many were removed. Tags are matched by name, as a parser would, roughly."""
    if not _may_nest_deeper(document, max_depth):
        return document, 0
    open_names: list[bytes] = []
    open_count: Counter[bytes] = Counter()
    removed_open: Counter[bytes] = Counter()
    pieces: list[bytes] = []
    kept_from = 0
    removed = 0

    def close_through(name: bytes) -> None:
        while open_names:
            top = open_names.pop()
            open_count[top] -= 1
            if top == name:
                return

    for tag in _TAG.finditer(document):
        is_end, name = tag.group(1), tag.group(2).lower()
        if is_end:
            if removed_open[name]:
                removed_open[name] -= 1
                pieces.append(document[kept_from : tag.start()])
                kept_from = tag.end()
            elif open_count[name]:
                close_through(name)
            continue
        if name in _VOID:
            continue
        if name in _SELF_CLOSING_SIBLINGS and open_count[name]:
            close_through(name)
        if len(open_names) >= max_depth:
            removed_open[name] += 1
            removed += 1
            pieces.append(document[kept_from : tag.start()])
            kept_from = tag.end()
            continue
        open_names.append(name)
        open_count[name] += 1
    pieces.append(document[kept_from:])
    return b"".join(pieces), removed


def _may_nest_deeper(document: bytes, max_depth: int) -> bool:
    """Whether the document may nest deeper than max_depth: false for pages with few tags, else
    an estimate, start tags minus end tags at the peak, that errs high (void elements and
    unclosed <p>s count as nesting) so that the exact scan runs on few real pages."""
    data = np.frombuffer(document, dtype=np.uint8)
    is_lt = data == ord("<")
    if np.count_nonzero(is_lt) <= max(max_depth, FEW_TAGS):
        return False
    after_lt = np.compress(is_lt[:-1], data[1:])  # the byte after each "<"
    steps = (((after_lt | 0x20) - ord("a")) < 26).astype(np.int32)  # "<" + letter: a start tag
    steps -= after_lt == ord("/")  # "</": an end tag
    depth = np.cumsum(steps)
    depth -= np.minimum.accumulate(np.minimum(depth, 0))  # stray end tags cannot go below zero
    return int(depth.max()) > max_depth


# ---- Lexbor ----------------------------------------------------------------------------------

# Without DOM mutation events, which take 5 to 10% of the parse. All they change for a page that
# is only read is what html5lib does not do either: copying the selected <option> into a
# <selectedcontent>.
_LEXBOR_OPTIONS = LexborDocumentOptions.WO_EVENTS
# No attribute selectors: they make the one walk over the tree markedly slower.
_LEXBOR_QUERY = "img, picture, figure, script, style, template, base, title, meta"
# Lexbor's numeric tag ids, cheaper to compare than names; read once from a tiny page.
_TAG_ID = {
    node.tag: node.tag_id
    for node in LexborHTMLParser(
        "<html><head><base><meta><title></title><script></script><style></style><template>"
        "</template></head><body><img><picture></picture><figure></figure><source></body></html>"
    ).css("*")
}
_IMG_ID, _META_ID = _TAG_ID["img"], _TAG_ID["meta"]
_NOT_PAGE_TEXT_IDS = frozenset(_TAG_ID[name] for name in ("script", "style", "template"))
_TOP_LEVEL_IDS = frozenset(_TAG_ID[name] for name in ("html", "head", "body"))
_NO_SOURCES: list[dict] = []


def _gather_lexbor(document: bytes, max_images: int, context_chars: int) -> _RawPage:
    try:
        tree = LexborHTMLParser(document, options=_LEXBOR_OPTIONS)
    except Exception as error:  # selectolax raises several types; any of them rejects the page
        raise ExtractError(f"lexbor could not parse the page: {type(error).__name__}: {error}") from error
    images, pictures, figures, not_page_text = [], [], [], []
    named_metas: list[tuple[str, str]] = []
    base_href = None
    title = None
    for node in tree.css(_LEXBOR_QUERY):  # one walk over the tree, in document order
        tag = node.tag_id
        if tag == _IMG_ID:
            images.append(node)
        elif tag in _NOT_PAGE_TEXT_IDS:
            not_page_text.append(node)
        elif tag == _META_ID:
            attrs = node.attributes
            name, content = attrs.get("name"), attrs.get("content")
            if name and content:
                named_metas.append((name, content))
        elif tag == _TAG_ID["picture"]:
            pictures.append(node)
        elif tag == _TAG_ID["figure"]:
            figures.append(node)
        elif tag == _TAG_ID["base"]:
            attrs = node.attributes
            if base_href is None and "href" in attrs:
                base_href = attrs["href"] or ""
        elif title is None:  # the only tag left: <title>
            title = node
    # Script and style code is not page text. Only elements holding nothing but text are removed:
    # in SVG a <script> can hold elements, which the lists above may hold too.
    for node in not_page_text:
        child = node.first_child
        if child is None or (child.is_text_node and child.next is None):
            node.decompose()

    examined = images[:max_images]
    if pictures:
        sources = _picture_sources_lexbor(pictures)
        raw_images = [(img.attributes, sources.get(img.mem_id, _NO_SOURCES)) for img in examined]
    else:
        raw_images = [(img.attributes, _NO_SOURCES) for img in examined]
    root = tree.root
    html_lang = (root.attributes.get("lang") or "") if root is not None else ""
    content_language = ""
    if not html_lang and tree.head is not None:
        for meta in tree.head.css("meta[http-equiv]"):
            attrs = meta.attributes
            if (attrs.get("http-equiv") or "").strip().lower() == "content-language":
                content_language = attrs.get("content") or ""
                break
    return _RawPage(
        title=title.text() if title is not None else "",
        html_lang=html_lang,
        content_language=content_language,
        base_href=base_href,
        images=raw_images,
        total_images=len(images),
        context_of=_lexbor_contexts(examined, figures, context_chars),
        named_metas=named_metas,
    )


def _picture_sources_lexbor(pictures: list) -> dict[int, list[dict]]:
    """<img> (by mem_id) -> the attributes of the <source> children of its <picture>."""
    found = {}
    for picture in pictures:
        children = list(picture.iter())
        sources = [child.attributes for child in children if child.tag_id == _TAG_ID["source"]]
        for child in children:
            if child.tag_id == _IMG_ID:
                found[child.mem_id] = sources
    return found


def _lexbor_contexts(images: list, figures: list, context_chars: int) -> Callable[[int], str]:
    """The function that gives the context of images[index]: the caption of its closest
    <figure>, else its nearby text."""
    if context_chars <= 0:
        return _no_context
    captions = _figure_captions_lexbor(figures, context_chars)
    texts: dict[int, str] = {}  # per ancestor (by mem_id), as images share ancestors

    def context_of(index: int) -> str:
        img = images[index]
        caption = captions.get(img.mem_id) if captions else None  # mem_id costs a call: skip it if no figures
        return caption or _nearby_text_lexbor(img, texts, context_chars)

    return context_of


def _no_context(index: int) -> str:
    return ""


def _figure_captions_lexbor(figures: list, context_chars: int) -> dict[int, str]:
    """<img> (by mem_id) -> the cleaned text of the first <figcaption> in its closest <figure>."""
    found = {}
    for figure in figures:  # in document order: an inner figure comes later and wins
        caption = figure.css_first("figcaption")
        text = _clean(caption.text(separator=" "), context_chars) if caption is not None else ""
        for img in figure.css("img"):
            found[img.mem_id] = text
    return found


def _nearby_text_lexbor(img, texts: dict[int, str], context_chars: int) -> str:
    """The cleaned, capped text of the closest ancestor (CONTEXT_LEVELS up at most, below
    <body>) that has any."""
    node = img.parent
    for _ in range(CONTEXT_LEVELS):
        if node is None or node.tag_id in _TOP_LEVEL_IDS:
            return ""
        key = node.mem_id
        text = texts.get(key)
        if text is None:
            text = texts[key] = _clean(node.text(separator=" "), context_chars)
        if text:
            return text
        node = node.parent
    return ""


# ---- BeautifulSoup ---------------------------------------------------------------------------


def _gather_bs4(document: bytes, max_images: int, context_chars: int) -> _RawPage:
    try:
        # html5lib builds the HTML5 tree, as Lexbor does; every attribute stays one string
        soup = BeautifulSoup(document.decode("utf-8", "replace"), "html5lib", multi_valued_attributes=None)
    except RecursionError:
        raise
    except Exception as error:  # bs4's html5lib tree builder has known crashes on odd markup
        raise ExtractError(f"bs4 could not parse the page: {type(error).__name__}: {error}") from error
    # As for Lexbor, where the content of a <template> is not in the tree at all.
    for node in soup.find_all(("script", "style", "template")):
        children = node.contents
        holds_only_text = not children or (len(children) == 1 and type(children[0]) is NavigableString)
        if not node.decomposed and (node.name == "template" or holds_only_text):
            node.decompose()

    images = soup.find_all("img")
    examined = images[:max_images]
    sources = _picture_sources_bs4(soup.find_all("picture"))
    raw_images = [(dict(img.attrs), sources.get(id(img), _NO_SOURCES)) for img in examined]
    named_metas = [
        (meta["name"], meta["content"]) for meta in soup.find_all("meta") if meta.get("name") and meta.get("content")
    ]
    base = soup.find("base", href=True)
    title = soup.find("title")
    html_lang = soup.html.get("lang", "") if soup.html is not None else ""
    content_language = ""
    if not html_lang and soup.head is not None:
        for meta in soup.head.find_all("meta", attrs={"http-equiv": True}):
            if meta["http-equiv"].strip().lower() == "content-language":
                content_language = meta.get("content", "")
                break
    return _RawPage(
        title=title.get_text() if title is not None else "",
        html_lang=html_lang,
        content_language=content_language,
        base_href=base["href"] if base is not None else None,
        images=raw_images,
        total_images=len(images),
        context_of=_bs4_contexts(examined, soup.find_all("figure"), context_chars),
        named_metas=named_metas,
    )


def _picture_sources_bs4(pictures: list) -> dict[int, list[dict]]:
    found = {}
    for picture in pictures:
        children = picture.find_all(True, recursive=False)
        sources = [dict(child.attrs) for child in children if child.name == "source"]
        for child in children:
            if child.name == "img":
                found[id(child)] = sources
    return found


def _bs4_contexts(images: list, figures: list, context_chars: int) -> Callable[[int], str]:
    if context_chars <= 0:
        return _no_context
    captions = _figure_captions_bs4(figures, context_chars)
    texts: dict[int, str] = {}

    def context_of(index: int) -> str:
        img = images[index]
        return captions.get(id(img)) or _nearby_text_bs4(img, texts, context_chars)

    return context_of


def _figure_captions_bs4(figures: list, context_chars: int) -> dict[int, str]:
    found = {}
    for figure in figures:
        caption = figure.find("figcaption")
        text = _clean(caption.get_text(" "), context_chars) if caption is not None else ""
        for img in figure.find_all("img"):
            found[id(img)] = text
    return found


def _nearby_text_bs4(img, texts: dict[int, str], context_chars: int) -> str:
    node = img.parent
    for _ in range(CONTEXT_LEVELS):
        if node is None or node.name in ("html", "head", "body"):
            return ""
        key = id(node)
        text = texts.get(key)
        if text is None:
            text = texts[key] = _clean(node.get_text(" "), context_chars)
        if text:
            return text
        node = node.parent
    return ""


# ---- shared: choosing, resolving and cleaning ------------------------------------------------


def _page_images(raw: _RawPage, page_url: str) -> PageImages:
    resolve = _UrlResolver(page_url, raw.base_href).resolve
    context_of = raw.context_of
    refs: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    kept_urls: set[str] = set()
    for index, (attrs, sources) in enumerate(raw.images):
        url, source, problem = _choose_url(attrs, sources, resolve)
        if url is None:
            skipped.append(problem)
            continue
        if url in kept_urls:
            skipped.append((DUPLICATE_URL, url[:DETAIL_CHARS]))
            continue
        kept_urls.add(url)
        alt, title = attrs.get("alt"), attrs.get("title")
        width, height = attrs.get("width"), attrs.get("height")
        refs.append(
            _image_ref(
                url,
                _clean(alt, ATTRIBUTE_CHARS) if alt else "",
                _clean(title, ATTRIBUTE_CHARS) if title else "",
                context_of(index),
                _dimension(width) if width else None,
                _dimension(height) if height else None,
                len(refs),
                source,
            )
        )
    not_examined = raw.total_images - len(raw.images)
    if not_examined:
        detail = f"{not_examined} of {raw.total_images} <img> elements not examined (max_refs={len(raw.images)})"
        skipped.append((TOO_MANY_IMAGES, detail))
    first_content_language = raw.content_language.split(",")[0]
    lang = _clean(raw.html_lang, ATTRIBUTE_CHARS) or _clean(first_content_language, ATTRIBUTE_CHARS)
    opt_outs = _opt_out_metas(raw.named_metas)
    return PageImages(
        title=_clean(raw.title, ATTRIBUTE_CHARS),
        lang=lang,
        refs=refs,
        meta_robots=opt_outs["robots"],
        meta_magiclens=opt_outs["magiclens"],
        meta_tdm_reservation=opt_outs["tdm-reservation"],
        skipped=skipped,
    )


def _image_ref(
    url: str, alt: str, title: str, context: str, width: int | None, height: int | None, position: int, source: str
) -> ImageRef:
    """ImageRef(url, alt, ...) without the frozen dataclass's __init__, which sets each field
    through object.__setattr__: five times slower, and called for every reference of every page.
    ImageRef has no __post_init__ or defaults to run; a test checks that this builds what
    ImageRef(...) builds."""
    ref = object.__new__(ImageRef)
    ref.__dict__.update(
        url=url, alt=alt, title=title, context=context, width=width, height=height, position=position, source=source
    )
    return ref


_OPT_OUT_META_NAMES = ("robots", "magiclens", "tdm-reservation")


def _opt_out_metas(named_metas: list[tuple[str, str]]) -> dict[str, str]:
    """Each opt-out meta name -> the contents of the <meta>s of that name (matched without regard
    to case or surrounding whitespace), joined with ", "; "" for none."""
    contents: dict[str, list[str]] = {name: [] for name in _OPT_OUT_META_NAMES}
    for name, content in named_metas:
        found = contents.get(name.strip(_ASCII_WHITESPACE).lower())
        if found is not None:
            found.append(content)
    return {name: ", ".join(found) for name, found in contents.items()}


_SRCSET_AND_LAZY_ATTRIBUTES = frozenset(SRCSET_ATTRIBUTES + LAZY_SRC_ATTRIBUTES)
_NO_URL = (EMPTY_URL, "no URL in src, srcset or lazy-loading attributes")
_Resolve = Callable[[str], "tuple[str | None, tuple[str, str] | None]"]


def _choose_url(
    attrs: dict, sources: list[dict], resolve: _Resolve
) -> tuple[str | None, str, tuple[str, str] | None]:
    """(url, the attribute it came from, None) or (None, "", (reason, detail))."""
    problem = None
    if sources or not _SRCSET_AND_LAZY_ATTRIBUTES.isdisjoint(attrs):  # most images have src only
        for raw_url, name in _preferred_urls(attrs, sources):
            url, failure = resolve(raw_url)
            if url is not None:
                return url, name, None
            problem = problem or failure
    src = attrs.get("src")
    if src:
        url, failure = resolve(src)
        if url is not None:
            return url, "src", None
        problem = problem or failure
    return None, "", problem or _NO_URL


def _preferred_urls(attrs: dict, sources: list[dict]) -> Iterator[tuple[str, str]]:
    """(raw URL, attribute name) in order of preference, before `src`: srcset candidates, the
    largest first (a width descriptor outranks any density; equal ones keep page order), then
    the lazy-loading attributes. A generator: the first one usually resolves."""
    candidates = []
    for source in sources:
        for name in SRCSET_ATTRIBUTES:
            if source.get(name):
                candidates += _srcset_candidates(source[name], "source " + name)
    for name in SRCSET_ATTRIBUTES:
        if attrs.get(name):
            candidates += _srcset_candidates(attrs[name], name)
    candidates.sort(key=_RANK, reverse=True)
    for raw_url, _, name in candidates:
        yield raw_url, name
    if not _LAZY_SRC_SET.isdisjoint(attrs):
        for name in LAZY_SRC_ATTRIBUTES:
            if attrs.get(name):
                yield attrs[name], name


_RANK = itemgetter(1)
_LAZY_SRC_SET = frozenset(LAZY_SRC_ATTRIBUTES)


def _srcset_candidates(srcset: str, name: str) -> list[tuple[str, tuple[int, float], str]]:
    """(url, rank, attribute name) per candidate; rank is (1, width) for a `w` descriptor, else
    (0, density). Split as the HTML Standard says: a URL is a run of non-spaces that may hold
    commas (trailing ones end the candidate); its descriptors run to the next comma."""
    candidates = []
    url = None
    descriptors: list[str] = []
    for token in srcset.split():
        while token:
            if url is None:
                token = token.lstrip(",")
                if token.endswith(","):
                    candidates.append((token.rstrip(","), (0, 1.0), name))
                elif token:
                    url = token
                break
            descriptor, comma, token = token.partition(",")
            if descriptor:
                descriptors.append(descriptor)
            if comma:
                candidates.append((url, _srcset_rank(descriptors), name))
                url, descriptors = None, []
    if url is not None:
        candidates.append((url, _srcset_rank(descriptors), name))
    return candidates


def _srcset_rank(descriptors: list[str]) -> tuple[int, float]:
    """(1, width) for a `w` descriptor, else (0, density); the density is 1 if none is valid."""
    density = 1.0
    for descriptor in descriptors:
        value, unit = descriptor[:-1], descriptor[-1:]
        if unit in ("w", "W") and value.isascii() and value.isdigit():
            return 1, float(value)
        if unit in ("x", "X"):
            try:
                density = float(value)
            except ValueError:
                continue
            if not math.isfinite(density) or density <= 0:
                density = 1.0
    return 0, density


_ASCII_WHITESPACE = " \t\n\r\f"
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*):")
_URL_CHARS = r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]"
# References that need neither escaping nor urljoin (slow): absolute http(s) URLs (and //host
# ones once given a scheme), and /path and path references without a ":" in their first segment
# (that would be a scheme).
_CLEAN_ABSOLUTE = re.compile(rf"https?://[A-Za-z0-9.\-]+(?:[/?#]{_URL_CHARS}*)?\Z")
_FIRST_SEGMENT = r"[A-Za-z0-9\-_~!$&'()*+,;=@%][A-Za-z0-9\-._~!$&'()*+,;=@%]*(?:[/?#]|\Z)"
_CLEAN_REFERENCE = re.compile(rf"(?:/|{_FIRST_SEGMENT}){_URL_CHARS}*\Z")
_HOST = re.compile(r"[A-Za-z0-9.\-_]+|[0-9A-Fa-f:.]+")  # a name, or an IP address (IPv6 without [])
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # kept as they are by quote(); the rest is percent-encoded


class _UrlResolver:
    """Resolves the image URLs of one page; keeps the answer per raw URL."""

    def __init__(self, page_url: str, base_href: str | None):
        base = page_url
        if base_href is not None and base_href.strip(_ASCII_WHITESPACE):
            resolved, _ = _absolute_url(base_href, page_url)
            base = resolved or page_url  # an unusable <base href> falls back to the page URL
        self.base = base
        self.answers: dict[str, tuple[str | None, tuple[str, str] | None]] = {}
        self.scheme = self.origin = self.directory = None
        if _CLEAN_ABSOLUTE.match(base):
            parts = urlsplit(base)
            self.scheme = parts.scheme
            self.origin = f"{parts.scheme}://{parts.netloc}"
            self.directory = self.origin + (parts.path[: parts.path.rfind("/") + 1] or "/")

    def resolve(self, raw: str) -> tuple[str | None, tuple[str, str] | None]:
        """(absolute http(s) URL without fragment, None) or (None, (reason, detail))."""
        answer = self.answers.get(raw)
        if answer is None:
            answer = self.answers[raw] = self._resolve_uncached(raw.strip(_ASCII_WHITESPACE))
        return answer

    def _resolve_uncached(self, text: str) -> tuple[str | None, tuple[str, str] | None]:
        """By string concatenation where that gives what urljoin would, else `_absolute_url`."""
        if self.origin is None or "/." in text or text.startswith("."):
            return _absolute_url(text, self.base)
        if text.startswith(("http://", "https://")):
            if _CLEAN_ABSOLUTE.match(text):
                return text.partition("#")[0], None
        elif text.startswith("//"):
            absolute = f"{self.scheme}:{text}"
            if _CLEAN_ABSOLUTE.match(absolute):
                return absolute.partition("#")[0], None
        elif _CLEAN_REFERENCE.match(text):
            return ((self.origin if text.startswith("/") else self.directory) + text).partition("#")[0], None
        return _absolute_url(text, self.base)


def _absolute_url(raw: str, base: str) -> tuple[str | None, tuple[str, str] | None]:
    """`raw` resolved against `base` by urljoin, checked and percent-escaped where needed:
    (URL, None) or (None, (reason, detail))."""
    text = raw.strip(_ASCII_WHITESPACE)
    if not text:
        return None, (EMPTY_URL, "")
    if _CLEAN_ABSOLUTE.match(text):
        return text.partition("#")[0], None
    scheme = _SCHEME.match(text)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        return None, (NON_HTTP_URL, text[:DETAIL_CHARS])
    try:
        parts = urlsplit(urljoin(base, text))
        host = parts.hostname or ""
        parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        return None, (INVALID_URL, text[:DETAIL_CHARS])
    if parts.scheme not in ("http", "https") or not host:
        return None, (INVALID_URL, text[:DETAIL_CHARS])
    netloc = parts.netloc
    if not host.isascii():
        try:
            netloc = netloc.lower().replace(host, host.encode("idna").decode("ascii"))
        except UnicodeError:
            return None, (INVALID_URL, text[:DETAIL_CHARS])
    elif not _HOST.fullmatch(host):
        return None, (INVALID_URL, text[:DETAIL_CHARS])
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme}://{netloc}{quote(rest, safe=_URL_SAFE)}", None


def _clean(text: str | None, limit: int) -> str:
    """Whitespace collapsed to single spaces, stripped, at most `limit` characters. Of a long
    text only a prefix is read (4 * limit characters after leading whitespace): cheap for the
    text of a whole article, and enough for `limit` characters unless it is mostly spaces."""
    if not text or limit <= 0:
        return ""
    if len(text) > 4 * limit:
        text = text.lstrip()[: 4 * limit]
    return " ".join(text.split())[:limit].rstrip()


_DIMENSION = re.compile(r"\s*(\d{1,9})(?:\.\d*)?\s*(?:px)?\s*", re.IGNORECASE)


def _dimension(value: str | None) -> int | None:
    """A declared width or height in pixels ("300", "300px", "300.5"); None for "50%", "auto"."""
    if not value:
        return None
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    match = _DIMENSION.fullmatch(value)
    return int(match.group(1)) if match else None
