"""The Lexbor parser (through selectolax): gathers the raw strings of one page's images."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from selectolax.lexbor import LexborDocumentOptions, LexborHTMLParser

from magiclens.pipeline.extract.raw import CONTEXT_LEVELS, NO_SOURCES, ExtractError, RawPage, clean, is_site_name, no_context
from magiclens.pipeline.extract.regions import MAIN_TAGS, Ancestry, RawFacts, densest_block

# Without DOM mutation events, which take 5 to 10% of the parse. All they change for a page that
# is only read is what html5lib does not do either: copying the selected <option> into a
# <selectedcontent>.
_LEXBOR_OPTIONS = LexborDocumentOptions.WO_EVENTS
# Each selector costs a little per element of the page, and each element found costs a Python
# object, so the walk finds only what is read. `~=` with `i` is exactly `is_license_rel`: tokens
# split on ASCII whitespace, compared without regard to ASCII case.
_LEXBOR_QUERY = (
    'img, picture, figure, script, style, template, base, title, meta, article, main,'
    ' a[rel~="license" i], link[rel~="license" i]'
)
_ROLE_MAIN = '[role~="main" i]'  # exactly `has_main_role`
# Lexbor's numeric tag ids, cheaper to compare than names; read once from a tiny page.
_TAG_ID = {
    node.tag: node.tag_id
    for node in LexborHTMLParser(
        "<html><head><base><meta><link><title></title><script></script><style></style><template>"
        "</template></head><body><img><picture></picture><figure></figure><source><article></article><main></main>"
        "<a></a></body></html>"
    ).css("*")
}
_IMG_ID, _META_ID = _TAG_ID["img"], _TAG_ID["meta"]
_NOT_PAGE_TEXT_IDS = frozenset(_TAG_ID[name] for name in ("script", "style", "template"))
_TOP_LEVEL_IDS = frozenset(_TAG_ID[name] for name in ("html", "head", "body"))
_KEY = attrgetter("mem_id")
_READ = attrgetter("tag", "attributes", "parent")
_MAIN_IDS = frozenset(_TAG_ID[name] for name in MAIN_TAGS)
_LINK_IDS = frozenset((_TAG_ID["a"], _TAG_ID["link"]))  # found only with rel=license


def gather_lexbor(document: bytes, max_images: int, context_chars: int) -> RawPage:
    try:
        tree = LexborHTMLParser(document, options=_LEXBOR_OPTIONS)
    except Exception as error:  # selectolax raises several types; any of them rejects the page
        raise ExtractError(f"lexbor could not parse the page: {type(error).__name__}: {error}") from error
    images, pictures, figures, not_page_text = [], [], [], []
    named_metas: list[tuple[str, str]] = []
    base_href = None
    title = None
    site_name = None
    has_main_element = False
    license_links = []
    for node in tree.css(_LEXBOR_QUERY):  # one walk over the tree, in document order
        tag = node.tag_id
        if tag == _IMG_ID:
            images.append(node)
        elif tag in _NOT_PAGE_TEXT_IDS:
            not_page_text.append(node)
        elif tag == _META_ID:
            attrs = node.attributes
            name, content = attrs.get("name"), attrs.get("content")
            if content:
                if name:
                    named_metas.append((name, content))
                if site_name is None and is_site_name(attrs.get("property") or name):
                    site_name = content
        elif tag == _TAG_ID["picture"]:
            pictures.append(node)
        elif tag == _TAG_ID["figure"]:
            figures.append(node)
        elif tag == _TAG_ID["base"]:
            attrs = node.attributes
            if base_href is None and "href" in attrs:
                base_href = attrs["href"] or ""
        elif tag in _MAIN_IDS:
            has_main_element = True
        elif tag in _LINK_IDS:
            href = node.attributes.get("href")
            if href:
                license_links.append(href)
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
        raw_images = [(img.attributes, sources.get(img.mem_id, NO_SOURCES)) for img in examined]
    else:
        raw_images = [(img.attributes, NO_SOURCES) for img in examined]
    root = tree.root
    html_lang = (root.attributes.get("lang") or "") if root is not None else ""
    content_language = ""
    if not html_lang and tree.head is not None:
        for meta in tree.head.css("meta[http-equiv]"):
            attrs = meta.attributes
            if (attrs.get("http-equiv") or "").strip().lower() == "content-language":
                content_language = attrs.get("content") or ""
                break
    return RawPage(
        title=title.text() if title is not None else "",
        html_lang=html_lang,
        content_language=content_language,
        base_href=base_href,
        images=raw_images,
        total_images=len(images),
        context_of=_lexbor_contexts(examined, figures, context_chars),
        named_metas=named_metas,
        facts_of=_lexbor_facts(tree, examined, raw_images, has_main_element),
        site_name=site_name or "",
        license_links=license_links,
    )


def _lexbor_facts(tree, images: list, raw_images: list, has_main_element: bool) -> Callable[[int], RawFacts]:
    """The function that gives the facts (regions.py) of images[index]; the page-level reads (is
    there a role=main, which is the densest text block) are made on the first call."""
    ancestry = None

    def facts_of(index: int) -> RawFacts:
        nonlocal ancestry
        if ancestry is None:
            has_main = has_main_element or tree.css_first(_ROLE_MAIN) is not None
            block = None
            if not has_main:
                block = densest_block((p.parent.mem_id, p.text()) for p in tree.css("p") if p.parent is not None)
            ancestry = Ancestry(_KEY, _READ, has_main, block)
        return ancestry.facts(raw_images[index][0], images[index].parent)

    return facts_of


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
        return no_context
    captions = _figure_captions_lexbor(figures, context_chars)
    texts: dict[int, str] = {}  # per ancestor (by mem_id), as images share ancestors

    def context_of(index: int) -> str:
        img = images[index]
        caption = captions.get(img.mem_id) if captions else None  # mem_id costs a call: skip it if no figures
        return caption or _nearby_text_lexbor(img, texts, context_chars)

    return context_of



def _figure_captions_lexbor(figures: list, context_chars: int) -> dict[int, str]:
    """<img> (by mem_id) -> the cleaned text of the first <figcaption> in its closest <figure>."""
    found = {}
    for figure in figures:  # in document order: an inner figure comes later and wins
        caption = figure.css_first("figcaption")
        text = clean(caption.text(separator=" "), context_chars) if caption is not None else ""
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
            text = texts[key] = clean(node.text(separator=" "), context_chars)
        if text:
            return text
        node = node.parent
    return ""
