"""Cheap filters on a page's image references, run before any image is fetched or decoded.

`filter_page_refs` takes the references that extraction found on one page and returns the ones
worth fetching, with their alt, title and context text cleaned, and every other reference with the
reason it was dropped. Checks, in this order (the first that applies gives the reason):

  duplicate_url         the same image URL earlier on the page
  svg                   a vector image (.svg / .svgz), never a photo
  furniture_url         a token of site furniture in the URL: logo, icon, sprite, avatar, banner,
                        button, badge, pixel, spacer, ads, tracking, emoji, ...
  declared_too_small    a declared width or height under --min-declared-side (tracking pixels,
                        icons, hidden images)
  gif_hint              a GIF whose name says spinner/loader/animation or blank/spacer
  furniture_text        alt or title that names furniture ("Company logo", "Twitter icon")
  repeated_on_page, furniture_region, embedded_post, furniture_class, person_tile,
  site_name_alt, background_image
                        what the page says about the image marks it as site furniture
                        (pipeline/furniture.py); the references kept get a `content_score`
  language_excluded     with --languages, the image text (or else the page) is in another language
  language_undetermined with --languages, neither the image text nor the page tells the language
  over_page_cap         after all the above, beyond the first --max-images-per-page, in page order

Text is cleaned by pipeline/text.py (the rules `instruct` uses too): mojibake and entities fixed,
whitespace collapsed, and boilerplate ("image", "photo 3", file names, URLs, bare credits, "read
more") removed, so that later stages see only text an instruction can be written from.

The language of a text is guessed with py3langid, whose model ships inside its 4.6 MB wheel (see
docs/filters.md for why not lingua); a guess under `min_language_confidence` is "und".

"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from magiclens.pipeline.furniture import content_score, furniture_reason, page_facts_of
from magiclens.pipeline.records import ImageRef, PageImages
from magiclens.pipeline.text import clean_text, word_tokens

UNDETERMINED = "und"

# Tokens of the URL (host, path and query, split on punctuation and camelCase, digits and a
# plural "s" removed) that mark site furniture rather than content.
FURNITURE_URL_TOKENS = frozenset(
    """
    logo icon favicon sprite avatar gravatar banner button btn badge pixel spacer blank
    ad ads adserver advert advertisement adsystem doubleclick tracking tracker beacon
    emoji emoticon smiley smilie placeholder spinner loader arrow bullet rating
    facebook twitter pinterest linkedin instagram whatsapp weixin wechat youtube tiktok
    """.split()
)
# Tokens that mark furniture in the file name only: as folder names they say little ("/mail/2019/").
FURNITURE_FILE_TOKENS = frozenset("star rss feed mail email print header tagline download".split())
# Words in alt or title text that name furniture. Narrower than the URL list: "pixel" or "arrow"
# in a caption usually describe the picture.
FURNITURE_TEXT_TOKENS = frozenset(
    "logo icon favicon avatar banner button badge emoji emoticon spacer advertisement".split()
)
_GIF_HINTS = frozenset(
    "loading loader spinner throbber ajax anim animated blank clear spacer transparent trans dot".split()
)
_VECTOR_SUFFIXES = (".svg", ".svgz")

_WORD = re.compile(r"[^\W\d_]+")

# Fewer letters than this and a language guess is noise ("Foto: dpa").
MIN_LETTERS_FOR_LANGUAGE = 10
# The page's text fed to the detector is capped; the start of it decides as well as all of it.
_PAGE_TEXT_CHARS = 2000


@dataclass(frozen=True)
class RefFilterConfig:
    max_images_per_page: int = 30
    min_declared_side: int = 100
    languages: tuple[str, ...] = ()  # ISO 639-1 codes to keep; empty keeps every language
    min_language_confidence: float = 0.5


@dataclass(frozen=True)
class DroppedRef:
    ref: ImageRef
    reason: str
    detail: str


@dataclass
class FilteredRefs:
    """What survives the cheap filters on one page, in page order, text cleaned."""

    refs: list[ImageRef]
    dropped: list[DroppedRef]
    page_lang: str  # guessed from the page's text, else its declared lang, else "und"


def filter_page_refs(found: PageImages, page_url: str, config: RefFilterConfig) -> FilteredRefs:
    """Apply the cheap filters to the references extraction found on one page (see the module docstring)."""
    refs, declared_lang, page_title = found.refs, found.lang, found.title
    page = page_facts_of(found, page_url)
    dropped: list[DroppedRef] = []
    candidates: list[ImageRef] = []
    seen_urls: set[str] = set()
    for ref in sorted(refs, key=lambda item: item.position):
        reason, detail = _ref_problem(ref, seen_urls, config)
        if not reason:
            reason, detail = furniture_reason(ref, page) or ("", "")
        seen_urls.add(ref.url)
        if reason:
            dropped.append(DroppedRef(ref, reason, detail))
        else:
            candidates.append(replace(clean_ref(ref), content_score=content_score(ref, page)))

    page_lang = page_language([page_title, *(text_of(ref) for ref in candidates)], declared_lang,
                              config.min_language_confidence)
    kept: list[ImageRef] = []
    for ref in candidates:
        if config.languages:
            lang = guess_language(text_of(ref), config.min_language_confidence)
            if lang == UNDETERMINED:
                lang = page_lang
            if lang == UNDETERMINED:
                dropped.append(DroppedRef(ref, "language_undetermined", "neither the image text nor the page tells"))
                continue
            if lang not in config.languages:
                dropped.append(DroppedRef(ref, "language_excluded", lang))
                continue
        if len(kept) >= config.max_images_per_page:
            dropped.append(DroppedRef(ref, "over_page_cap", f"position {ref.position}"))
            continue
        kept.append(ref)
    return FilteredRefs(kept, dropped, page_lang)


def _ref_problem(ref: ImageRef, seen_urls: set[str], config: RefFilterConfig) -> tuple[str, str]:
    if ref.url in seen_urls:
        return "duplicate_url", ref.url
    path = unquote(urlsplit(ref.url).path).lower()
    if path.endswith(_VECTOR_SUFFIXES):
        return "svg", ref.url
    furniture = FURNITURE_URL_TOKENS.intersection(url_tokens(ref.url))
    furniture |= FURNITURE_FILE_TOKENS.intersection(url_tokens(path.rsplit("/", 1)[-1]))
    if furniture:
        return "furniture_url", f"{sorted(furniture)[0]} in {ref.url}"
    small = [side for side in (ref.width, ref.height) if side is not None and side < config.min_declared_side]
    if small:
        return "declared_too_small", f"declared {ref.width}x{ref.height}, floor {config.min_declared_side}"
    if path.endswith(".gif"):
        stem_tokens = set(url_tokens(path.rsplit("/", 1)[-1]))
        hints = _GIF_HINTS & stem_tokens or ({"1x1"} if "1x1" in path else set())
        if hints:
            return "gif_hint", f"{sorted(hints)[0]} in {ref.url}"
    for text in (ref.alt, ref.title):
        furniture = FURNITURE_TEXT_TOKENS.intersection(_singular(word.lower()) for word in _WORD.findall(text))
        if furniture:
            return "furniture_text", f"{sorted(furniture)[0]} in {text[:80]!r}"
    return "", ""


def url_tokens(url: str) -> list[str]:
    """Word tokens of a URL (pipeline/text.py `word_tokens`), digits and a plural s removed."""
    tokens = []
    for word in word_tokens(url):
        stem = word.strip("0123456789")
        # "logo2" and "icon32" are words; "ad51" is more likely a piece of a hex id
        if stem and (stem == word or len(stem) >= 3):
            tokens.append(_singular(stem))
    return tokens


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def clean_ref(ref: ImageRef) -> ImageRef:
    return replace(ref, alt=clean_text(ref.alt), title=clean_text(ref.title), context=clean_text(ref.context))


def text_of(ref: ImageRef) -> str:
    return " ".join(part for part in (ref.alt, ref.title, ref.context) if part)


@lru_cache(maxsize=1)
def _language_identifier():
    # Loaded once per process (about 10 MB); norm_probs gives a confidence in [0, 1].
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    return sorted(_language_identifier().labels)


def guess_language(text: str, min_confidence: float) -> str:
    """ISO 639-1 code of `text`, or "und" when it is too short or the guess is not confident."""
    if sum(len(word) for word in _WORD.findall(text)) < MIN_LETTERS_FOR_LANGUAGE:
        return UNDETERMINED
    lang, confidence = _language_identifier().classify(text)
    return lang if confidence >= min_confidence else UNDETERMINED


def page_language(texts: list[str], declared_lang: str, min_confidence: float) -> str:
    """The language of the page's text when it is clear, else its declared `lang`, else "und".

    Text wins over the declaration: templates often declare "en" around pages in other languages.
    """
    guessed = guess_language(" ".join(texts)[:_PAGE_TEXT_CHARS], min_confidence)
    if guessed != UNDETERMINED:
        return guessed
    primary = (declared_lang or "").strip().lower().replace("_", "-").split("-")[0]
    return primary if primary.isalpha() and 2 <= len(primary) <= 3 else UNDETERMINED
