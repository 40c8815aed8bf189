"""The BeautifulSoup parser (with html5lib, which builds the same HTML5 tree as Lexbor): gathers
the raw strings of one page's images. Slower than Lexbor; a second opinion that tests hold it to."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from bs4 import BeautifulSoup, NavigableString

from magiclens.pipeline.extract.licenses import is_license_rel
from magiclens.pipeline.extract.raw import CONTEXT_LEVELS, NO_SOURCES, ExtractError, RawPage, clean, is_site_name, no_context
from magiclens.pipeline.extract.regions import MAIN_TAGS, Ancestry, RawFacts, densest_block, has_main_role

_READ = attrgetter("name", "attrs", "parent")


def gather_soup(document: bytes, max_images: int, context_chars: int) -> RawPage:
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
    raw_images = [(dict(img.attrs), sources.get(id(img), NO_SOURCES)) for img in examined]
    metas = soup.find_all("meta")
    named_metas = [(meta["name"], meta["content"]) for meta in metas if meta.get("name") and meta.get("content")]
    site_names = (
        meta["content"] for meta in metas if meta.get("content") and is_site_name(meta.get("property") or meta.get("name"))
    )
    base = soup.find("base", href=True)
    title = soup.find("title")
    html_lang = soup.html.get("lang", "") if soup.html is not None else ""
    content_language = ""
    if not html_lang and soup.head is not None:
        for meta in soup.head.find_all("meta", attrs={"http-equiv": True}):
            if meta["http-equiv"].strip().lower() == "content-language":
                content_language = meta.get("content", "")
                break
    return RawPage(
        title=title.get_text() if title is not None else "",
        html_lang=html_lang,
        content_language=content_language,
        base_href=base["href"] if base is not None else None,
        images=raw_images,
        total_images=len(images),
        context_of=_bs4_contexts(examined, soup.find_all("figure"), context_chars),
        named_metas=named_metas,
        facts_of=_soup_facts(soup, examined, raw_images),
        site_name=next(site_names, ""),
        license_links=[
            node["href"] for node in soup.find_all(("a", "link"), rel=True) if is_license_rel(node["rel"]) and node.get("href")
        ],
    )


def _soup_facts(soup: BeautifulSoup, images: list, raw_images: list) -> Callable[[int], RawFacts]:
    """As `lexbor._lexbor_facts`: the facts of images[index], page-level reads on the first call."""
    ancestry = None

    def facts_of(index: int) -> RawFacts:
        nonlocal ancestry
        if ancestry is None:
            has_main = soup.find(MAIN_TAGS) is not None or any(
                has_main_role(node.attrs) for node in soup.find_all(attrs={"role": True})
            )
            block = None
            if not has_main:
                block = densest_block((id(p.parent), p.get_text()) for p in soup.find_all("p") if p.parent is not None)
            ancestry = Ancestry(id, _READ, has_main, block)
        return ancestry.facts(raw_images[index][0], images[index].parent)

    return facts_of


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
        return no_context
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
        text = clean(caption.get_text(" "), context_chars) if caption is not None else ""
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
            text = texts[key] = clean(node.get_text(" "), context_chars)
        if text:
            return text
        node = node.parent
    return ""
