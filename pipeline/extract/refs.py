"""From what a parser gathered (RawPage) to PageImages: one URL chosen and resolved per image,
duplicates skipped, texts cleaned; the same code for both parsers, so both give the same result."""

from __future__ import annotations

import re
from dataclasses import fields

from magiclens.pipeline.extract.licenses import license_declarations
from magiclens.pipeline.extract.raw import ASCII_WHITESPACE, ATTRIBUTE_CHARS, DETAIL_CHARS, RawPage, clean
from magiclens.pipeline.extract.urls import UrlResolver, choose_urls
from magiclens.pipeline.records import ImageRef, PageImages

DUPLICATE_URL = "duplicate_url"  # the same image URL was already kept on this page
TOO_MANY_IMAGES = "too_many_images"  # <img> elements beyond max_refs, counted in one entry


def page_images(raw: RawPage, page_url: str) -> PageImages:
    resolve = UrlResolver(page_url, raw.base_href).resolve
    context_of, facts_of = raw.context_of, raw.facts_of
    link_hosts: dict[str | None, str] = {None: ""}
    refs: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    kept_urls: set[str] = set()
    for index, (attrs, sources) in enumerate(raw.images):
        candidates, source, problem = choose_urls(attrs, sources, resolve)
        if not candidates:
            skipped.append(problem)
            continue
        url = candidates[0]
        if url in kept_urls:
            skipped.append((DUPLICATE_URL, url[:DETAIL_CHARS]))
            continue
        kept_urls.add(url)
        alt, title = attrs.get("alt"), attrs.get("title")
        width, height = attrs.get("width"), attrs.get("height")
        landmarks, class_tokens, in_main, link_href = facts_of(index)
        link_host = link_hosts.get(link_href)
        if link_host is None:
            link_host = link_hosts[link_href] = _host(resolve(link_href)[0])
        refs.append(
            image_ref(
                url,
                clean(alt, ATTRIBUTE_CHARS) if alt else "",
                clean(title, ATTRIBUTE_CHARS) if title else "",
                context_of(index),
                dimension(width) if width else None,
                dimension(height) if height else None,
                len(refs),
                source,
                candidates,
                landmarks,
                class_tokens,
                in_main,
                link_host,
            )
        )
    not_examined = raw.total_images - len(raw.images)
    if not_examined:
        detail = f"{not_examined} of {raw.total_images} <img> elements not examined (max_refs={len(raw.images)})"
        skipped.append((TOO_MANY_IMAGES, detail))
    first_content_language = raw.content_language.split(",")[0]
    lang = clean(raw.html_lang, ATTRIBUTE_CHARS) or clean(first_content_language, ATTRIBUTE_CHARS)
    opt_outs = _opt_out_metas(raw.named_metas)
    return PageImages(
        title=clean(raw.title, ATTRIBUTE_CHARS),
        lang=lang,
        refs=refs,
        meta_robots=opt_outs["robots"],
        meta_magiclens=opt_outs["magiclens"],
        meta_tdm_reservation=opt_outs["tdm-reservation"],
        skipped=skipped,
        site_name=clean(raw.site_name, ATTRIBUTE_CHARS),
        license_declared=license_declarations(raw.license_links, raw.named_metas, resolve),
    )


_HOST_OF_URL = re.compile(r"https?://(?:[^@/?]*@)?(?:\[([^\]/?]*)\]|([^:/?]*))")


def _host(url: str | None) -> str:
    """The lower-case host of a resolved http(s) URL, as urlsplit's hostname; "" for None."""
    if url is None:
        return ""
    match = _HOST_OF_URL.match(url)
    return (match.group(1) or match.group(2) or "").lower() if match else ""


def image_ref(
    url: str,
    alt: str,
    title: str,
    context: str,
    width: int | None,
    height: int | None,
    position: int,
    source: str,
    candidates: tuple[str, ...],
    landmarks: tuple[str, ...],
    class_tokens: tuple[str, ...],
    in_main: bool,
    link_host: str,
) -> ImageRef:
    """ImageRef(url, alt, ...) with every field given, without the frozen dataclass's __init__,
    which sets each field through object.__setattr__: five times slower, and called for every
    reference of every page. ImageRef has no __post_init__; the fields set by later stages get
    their defaults. A test checks that this builds what ImageRef(...) builds."""
    ref = object.__new__(ImageRef)
    ref.__dict__.update(
        url=url, alt=alt, title=title, context=context, width=width, height=height, position=position, source=source,
        candidates=candidates, landmarks=landmarks, class_tokens=class_tokens, in_main=in_main, link_host=link_host,
        **_SET_BY_LATER_STAGES,
    )
    return ref


_EXTRACTED_FIELDS = frozenset(
    "url alt title context width height position source candidates landmarks class_tokens in_main link_host".split()
)
# The fields that later stages set (e.g. the filters' content_score), at their defaults.
_SET_BY_LATER_STAGES = {field.name: field.default for field in fields(ImageRef) if field.name not in _EXTRACTED_FIELDS}


_OPT_OUT_META_NAMES = ("robots", "magiclens", "tdm-reservation")


def _opt_out_metas(named_metas: list[tuple[str, str]]) -> dict[str, str]:
    """Each opt-out meta name -> the contents of the <meta>s of that name (matched without regard
    to case or surrounding whitespace), joined with ", "; "" for none."""
    contents: dict[str, list[str]] = {name: [] for name in _OPT_OUT_META_NAMES}
    for name, content in named_metas:
        found = contents.get(name.strip(ASCII_WHITESPACE).lower())
        if found is not None:
            found.append(content)
    return {name: ", ".join(found) for name, found in contents.items()}

_DIMENSION = re.compile(r"\s*(\d{1,9})(?:\.\d*)?\s*(?:px)?\s*", re.IGNORECASE)


def dimension(value: str | None) -> int | None:
    """A declared width or height in pixels ("300", "300px", "300.5"); None for "50%", "auto"."""
    if not value:
        return None
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    match = _DIMENSION.fullmatch(value)
    return int(match.group(1)) if match else None
