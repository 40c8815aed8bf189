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
  language_excluded     with --languages, the image text (or else the page) is in another language
  language_undetermined with --languages, neither the image text nor the page tells the language
  over_page_cap         after all the above, beyond the first --max-images-per-page, in page order

Text is cleaned with ftfy (mojibake, HTML entities), whitespace collapsed, and boilerplate
("image", "photo 3", file names, URLs, bare credits) removed, so that later stages see only text
an instruction can be written from.

The language of a text is guessed with py3langid, whose model ships inside its 4.6 MB wheel (see
docs/filters.md for why not lingua); a guess under `min_language_confidence` is "und".

`FilterConfig` gathers the settings of every filter stage of `magiclens mine` (this module, the
post-decode checks, corpus dedupe and scores); `add_filter_arguments` declares their flags.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from urllib.parse import unquote, urlsplit

import ftfy

from magiclens.pipeline.dedupe import DedupeConfig
from magiclens.pipeline.postdecode import DecodedImageConfig
from magiclens.pipeline.records import ImageRef

UNDETERMINED = "und"

# Tokens of the URL (host, path and query, split on punctuation and camelCase, digits and a
# plural "s" removed) that mark site furniture rather than content.
FURNITURE_URL_TOKENS = frozenset(
    """
    logo icon favicon sprite avatar gravatar banner button btn badge pixel spacer blank
    ad ads adserver advert advertisement adsystem doubleclick tracking tracker beacon
    emoji emoticon smiley smilie placeholder spinner loader arrow bullet rating
    """.split()
)
# Words in alt or title text that name furniture. Narrower than the URL list: "pixel" or "arrow"
# in a caption usually describe the picture.
FURNITURE_TEXT_TOKENS = frozenset(
    "logo icon favicon avatar banner button badge emoji emoticon spacer advertisement".split()
)
_GIF_HINTS = frozenset(
    "loading loader spinner throbber ajax anim animated blank clear spacer transparent trans dot".split()
)
_VECTOR_SUFFIXES = (".svg", ".svgz")

# Alt text that says nothing about the picture.
_LABEL_WORDS = frozenset(
    """
    image images img photo photos photograph picture pictures pic pics foto fotos bild bilder
    imagen imagem immagine thumbnail thumb untitled placeholder null undefined none alt default
    file attachment graphic jpg jpeg png gif webp
    """.split()
)
_FILE_NAME = re.compile(r"^[^\s/]*\.(?:jpe?g|png|gif|webp|avif|bmp|svgz?|tiff?|ico|heic)$", re.IGNORECASE)
_CAMERA_FILE_STEM = re.compile(r"^(?:img|dsc|dscn|dscf|dcim|pict?|p|photo|image|screenshot)[\s_-]*\d+\w*$", re.IGNORECASE)
_URL = re.compile(r"^(?:(?:https?:)?//|www\.)\S+$", re.IGNORECASE)
_CREDIT = re.compile(r"^(?:©|\(c\)\s|copyright\b|credits?\b|photo credit\b|courtesy\b)", re.IGNORECASE)
_LABEL_PREFIX = re.compile(r"^(?:file\s+)?(?:photo|image|picture|foto|bild|img)\s*[:|–—-]\s+", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d_]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_URL_SEPARATORS = re.compile(r"[^0-9A-Za-z]+")

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


def filter_page_refs(
    refs: list[ImageRef], declared_lang: str, page_title: str, config: RefFilterConfig
) -> FilteredRefs:
    """Apply the cheap filters to one page's references (see the module docstring)."""
    dropped: list[DroppedRef] = []
    candidates: list[ImageRef] = []
    seen_urls: set[str] = set()
    for ref in sorted(refs, key=lambda item: item.position):
        reason, detail = _ref_problem(ref, seen_urls, config)
        seen_urls.add(ref.url)
        if reason:
            dropped.append(DroppedRef(ref, reason, detail))
        else:
            candidates.append(clean_ref(ref))

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
    """Lower-case word tokens of a URL: split on punctuation and camelCase, digits and plural s gone."""
    tokens = []
    for part in _URL_SEPARATORS.split(unquote(url)):
        for word in _CAMEL.sub(" ", part).split():
            word = word.lower()
            stem = word.strip("0123456789")
            # "logo2" and "icon32" are words; "ad51" is more likely a piece of a hex id
            if stem and (stem == word or len(stem) >= 3):
                tokens.append(_singular(stem))
    return tokens


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def clean_text(text: str) -> str:
    """Fix mojibake and entities, collapse whitespace, and return "" for boilerplate."""
    if not text:
        return ""
    text = _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip()
    text = _LABEL_PREFIX.sub("", text)
    return "" if is_boilerplate(text) else text


def is_boilerplate(text: str) -> bool:
    """Text that describes nothing: a label word ("Image 3"), a file name, a URL, a bare credit."""
    if not _WORD.search(text):
        return True
    if _FILE_NAME.match(text) or _URL.match(text) or _CAMERA_FILE_STEM.match(text) or _CREDIT.match(text):
        return True
    words = [word.lower() for word in _WORD.findall(text)]
    return all(word in _LABEL_WORDS for word in words)


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


@dataclass(frozen=True)
class FilterConfig:
    """Settings of every filter stage of `magiclens mine`."""

    refs: RefFilterConfig = field(default_factory=RefFilterConfig)
    decoded: DecodedImageConfig = field(default_factory=DecodedImageConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    clip_model: str | None = None
    min_text_score: float | None = None
    pair_similarity: tuple[float, float] | None = None
    score_batch_size: int = 32
    nsfw_model: str | None = None
    nsfw_threshold: float = 0.5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FilterConfig:
        """Validate the flags of `add_filter_arguments`; a bad value exits with what to change."""
        languages = tuple(sorted({code.strip().lower() for code in (args.languages or "").split(",") if code.strip()}))
        unknown = sorted(set(languages) - set(known_languages()))
        if unknown:
            raise SystemExit(
                f"--languages: unknown code(s) {', '.join(unknown)}; use ISO 639-1 codes such as en,de,fr "
                f"(known: {', '.join(known_languages())})"
            )
        for flag, value, low in (
            ("--max-images-per-page", args.max_images_per_page, 1),
            ("--min-declared-side", args.min_declared_side, 0),
            ("--max-pages-per-image", args.max_pages_per_image, 1),
            ("--max-pairs-per-image", args.max_pairs_per_image, 1),
            ("--cluster-rounds", args.cluster_rounds, 1),
            ("--score-batch-size", args.score_batch_size, 1),
        ):
            if value < low:
                raise SystemExit(f"{flag} must be at least {low}, got {value}")
        if not 0 <= args.corpus_duplicate_distance <= 63:
            raise SystemExit(f"--corpus-duplicate-distance must be between 0 and 63, got {args.corpus_duplicate_distance}")
        if not 0 <= args.min_language_confidence <= 1:
            raise SystemExit(f"--min-language-confidence must be between 0 and 1, got {args.min_language_confidence}")
        if not 0 <= args.nsfw_threshold <= 1:
            raise SystemExit(f"--nsfw-threshold must be between 0 and 1, got {args.nsfw_threshold}")
        band = _parse_band(args.pair_similarity) if args.pair_similarity else None
        if (args.min_text_score is not None or band) and not args.clip_model:
            raise SystemExit("--min-text-score and --pair-similarity need CLIP scores: give --clip-model PATH_OR_ID")
        return cls(
            refs=RefFilterConfig(
                max_images_per_page=args.max_images_per_page,
                min_declared_side=args.min_declared_side,
                languages=languages,
                min_language_confidence=args.min_language_confidence,
            ),
            decoded=DecodedImageConfig(min_pixel_std=args.min_pixel_std),
            dedupe=DedupeConfig(
                max_distance=args.corpus_duplicate_distance,
                max_pages_per_image=args.max_pages_per_image,
                max_pairs_per_image=args.max_pairs_per_image,
                rounds=args.cluster_rounds,
            ),
            clip_model=args.clip_model,
            min_text_score=args.min_text_score,
            pair_similarity=band,
            score_batch_size=args.score_batch_size,
            nsfw_model=args.nsfw_model,
            nsfw_threshold=args.nsfw_threshold,
        )


def _parse_band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"--pair-similarity takes MIN,MAX (two numbers, e.g. 0.5,0.95), got {text!r}") from None
    if not -1 <= low < high <= 1:
        raise SystemExit(f"--pair-similarity needs -1 <= MIN < MAX <= 1, got {text!r}")
    return low, high


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every filter stage, in argument groups of their own."""
    cheap = parser.add_argument_group("filters before fetching (image references)")
    cheap.add_argument("--max-images-per-page", type=int, default=30, metavar="N",
                       help="after the filters below, keep the first N image references of a page, in page "
                            "order; the rest are rejected as over_page_cap (default 30)")
    cheap.add_argument("--min-declared-side", type=int, default=100, metavar="PX",
                       help="reject references whose width or height declared in the HTML is under PX "
                            "(tracking pixels, icons). Lower than --min-side because pages often display "
                            "an image at half its file size (default 100; 0 turns it off)")
    cheap.add_argument("--languages", default="", metavar="CODES",
                       help="keep only images whose text (alt, title, context), or else whose page, is in one "
                            "of these ISO 639-1 languages, e.g. en or en,de (default: all languages)")
    cheap.add_argument("--min-language-confidence", type=float, default=0.5, metavar="P",
                       help="a language guess under this probability counts as undetermined (default 0.5)")
    decoded = parser.add_argument_group("filters after decoding")
    decoded.add_argument("--min-pixel-std", type=float, default=DecodedImageConfig.min_pixel_std, metavar="STD",
                         help="reject near-uniform images: standard deviation of the gray levels (0-255) "
                              f"under this (default {DecodedImageConfig.min_pixel_std:g}; real photos measure 9 and up)")
    decoded.add_argument("--nsfw-model", default=None, metavar="PATH_OR_ID",
                         help="optional: a transformers image classifier (local path or hub id) with an 'nsfw' "
                              "label; pairs with an image it scores at or over --nsfw-threshold are dropped "
                              "(default: off; see docs/filters.md for a model and its licence)")
    decoded.add_argument("--nsfw-threshold", type=float, default=0.5, metavar="P",
                         help="probability of the nsfw label at or over which an image is dropped (default 0.5)")
    corpus = parser.add_argument_group("near duplicates across the whole run")
    corpus.add_argument("--corpus-duplicate-distance", type=int, default=DedupeConfig.max_distance, metavar="BITS",
                        help="two images whose pHashes differ in at most BITS bits are one cluster, whatever "
                             f"pages they are on (default {DedupeConfig.max_distance}; the hash is split into "
                             "BITS+1 bands, so larger values make bigger buckets to compare)")
    corpus.add_argument("--max-pages-per-image", type=int, default=DedupeConfig.max_pages_per_image, metavar="N",
                        help="an image whose cluster appears on more than N distinct pages is site furniture "
                             f"(logo, banner, sidebar) and is dropped everywhere (default {DedupeConfig.max_pages_per_image})")
    corpus.add_argument("--max-pairs-per-image", type=int, default=DedupeConfig.max_pairs_per_image, metavar="N",
                        help="an image cluster takes part in at most N pairs of the whole output; the pairs "
                             f"kept are chosen by pair_id, deterministically (default {DedupeConfig.max_pairs_per_image})")
    corpus.add_argument("--cluster-rounds", type=int, default=DedupeConfig.rounds, metavar="N",
                        help="rounds of label propagation that give each cluster its id; stats.json counts "
                             "the edges left unresolved (clusters.unresolved_edges): raise N if it is not 0 "
                             f"(default {DedupeConfig.rounds})")
    scores = parser.add_argument_group("CLIP scores (optional)")
    scores.add_argument("--clip-model", default=None, metavar="PATH_OR_ID",
                        help="a transformers CLIP model (local path or hub id); when given, each pair gets "
                             "scores.query_text and scores.target_text (image against its alt/context) and "
                             "scores.pair_similarity (query image against target image) (default: no scores)")
    scores.add_argument("--min-text-score", type=float, default=None, metavar="COS",
                        help="drop pairs where a side that has text scores under COS against it (cosine; "
                             "for OpenAI CLIP ViT-B, 0.2-0.3 is a starting point to measure; default: no filter)")
    scores.add_argument("--pair-similarity", default=None, metavar="MIN,MAX",
                        help="keep pairs whose image-image cosine is within [MIN, MAX]: under MIN unrelated, "
                             "over MAX near copies. Measure the band for your CLIP (MegaPairs' (0.8, 0.96) "
                             "was for EVA-CLIP); default: no filter")
    scores.add_argument("--score-batch-size", type=int, default=32, metavar="N",
                        help="pairs per CLIP (and NSFW) batch (default 32)")
