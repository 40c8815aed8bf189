"""Site furniture or content? Decided from what the page says about each image reference, before
anything is fetched: at web scale these decisions decide what we download.

Furniture (logos, icons, avatars and bylines, navigation, share buttons, ads, spacers) must not be
paired: MagicLens learns relations between the pictures a page is about. `furniture_reason` gives
the first rule that applies, as (reason, detail), from the facts extraction recorded on each
reference (pipeline/extract/regions.py) and from the page:

  repeated_on_page   the same image URL at least MIN_REPEATS times on the page (rating stars,
                     bullets, spacers, separators)
  furniture_region   inside the page header, navigation, footer, a search box or a form, and not
                     inside the main content
  embedded_post      inside an embedded social-media post (its avatars and media belong to another site)
  furniture_class    a class or id word of the image or its closest ancestors says what it is: logo,
                     icon, social, share, sponsor, advert, promo, badge, button, ...
  person_tile        a class or id word says avatar, author, byline, profile or headshot, and the
                     image is declared small or is one of several such on the page (bylines, teaser
                     tiles, comment lists); a single large portrait is the subject of a profile page
  site_name_alt      the alt text is the site's own name (a logo), from og:site_name or the title
  background_image   the file name says it is a background or a border (about-us-bg.png)

`content_score` ranks the references that pass: inside the main content, informative alt text and a
large declared size count for content; a complementary region (aside) and a link to another site
count against. Pairing prefers the images that score higher.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from magiclens.pipeline.extract.refs import DUPLICATE_URL
from magiclens.pipeline.records import ImageRef, PageImages
from magiclens.pipeline.text import clean_text, word_tokens

MIN_REPEATS = 3
FURNITURE_REGIONS = frozenset(("nav", "header", "footer", "form", "banner", "navigation", "contentinfo", "search"))
COMPLEMENTARY_REGIONS = frozenset(("aside", "complementary"))
EMBEDDED = "embed"
# Words of class and id attributes (pipeline/extract/regions.py splits them) that name furniture.
FURNITURE_CLASS_WORDS = frozenset(
    """
    logo logos icon icons favicon sprite social share sharing sharer sponsor sponsors sponsored advert
    adverts advertisement ad ads adsbygoogle advertising promo promos badge badges button buttons btn
    emoji emoticon smiley rating ratings stars captcha widget widgets
    """.split()
)
PERSON_CLASS_WORDS = frozenset("avatar avatars gravatar userpic headshot author authors byline profile".split())
# More person-class images than this on one page are bylines, teaser tiles or a comment list.
MAX_PORTRAITS = 2
# Words of a file name that say it is drawn behind or around content.
BACKGROUND_WORDS = frozenset(("bg", "background", "backgrounds", "border", "borders", "shadow", "corner", "corners"))
_TITLE_SEPARATORS = re.compile(r"\s+[|–—:·•»-]\s+")
LARGE_DECLARED_SIDE = 200


@dataclass(frozen=True)
class PageFacts:
    """What the furniture rules need to know about the page itself."""

    host: str
    site_names: frozenset[str]  # folded (lower-case, accents stripped) names of the site
    repeated_urls: frozenset[str]  # image URLs used at least MIN_REPEATS times on the page
    portraits: int = 0  # references whose class or id words name a person (avatar, author, ...)


def _folded(text: str) -> str:
    return " ".join(word_tokens(text))


def site_names(site_name: str, title: str, host: str) -> frozenset[str]:
    """The site's own names: og:site_name, the first and last parts of a "Page - Site" title, and
    the host's registrable-looking name ("www.yahoo.com" -> "yahoo")."""
    names = {_folded(site_name)} if site_name else set()
    parts = [part for part in _TITLE_SEPARATORS.split(title or "") if part.strip()]
    if len(parts) >= 2:
        names.update((_folded(parts[0]), _folded(parts[-1])))
    labels = [label for label in host.split(".") if label not in ("www", "m")]
    if len(labels) >= 2:
        names.add(labels[-2])
    return frozenset(name for name in names if name)


def page_facts(page_url: str, title: str, site_name: str, image_urls: Iterable[str], portraits: int = 0) -> PageFacts:
    """`image_urls`: every image URL the page uses, repeats included."""
    host = (urlsplit(page_url).hostname or "").lower()
    counts = Counter(image_urls)
    repeated = frozenset(url for url, count in counts.items() if count >= MIN_REPEATS)
    return PageFacts(host, site_names(site_name, title, host), repeated, portraits)


def page_facts_of(found: PageImages, page_url: str) -> PageFacts:
    """The page facts of what extraction found on a page (its references and the repeats it skipped)."""
    repeats = [detail for reason, detail in found.skipped if reason == DUPLICATE_URL]
    portraits = sum(bool(PERSON_CLASS_WORDS.intersection(ref.class_tokens)) for ref in found.refs)
    return page_facts(page_url, found.title, found.site_name, [*(ref.url for ref in found.refs), *repeats], portraits)


def furniture_reason(ref: ImageRef, page: PageFacts) -> tuple[str, str] | None:
    """(reason, detail) when the reference is site furniture, else None (see the module docstring)."""
    if ref.url in page.repeated_urls:
        return "repeated_on_page", f"{ref.url} is used {MIN_REPEATS} or more times on the page"
    regions = FURNITURE_REGIONS.intersection(ref.landmarks)
    if regions and not ref.in_main:
        return "furniture_region", f"inside {sorted(regions)[0]}"
    if EMBEDDED in ref.landmarks:
        return "embedded_post", "inside an embedded social-media post"
    words = FURNITURE_CLASS_WORDS.intersection(ref.class_tokens)
    if words:
        return "furniture_class", f"class or id word {sorted(words)[0]!r}"
    person = PERSON_CLASS_WORDS.intersection(ref.class_tokens)
    if person:
        declared = [side for side in (ref.width, ref.height) if side is not None]
        if declared and max(declared) < LARGE_DECLARED_SIDE:
            return "person_tile", f"class or id word {sorted(person)[0]!r}, declared {ref.width}x{ref.height}"
        if page.portraits > MAX_PORTRAITS:
            return "person_tile", f"class or id word {sorted(person)[0]!r}, one of {page.portraits} on the page"
    alt = _folded(clean_text(ref.alt) or ref.alt)
    if alt and alt in page.site_names:
        return "site_name_alt", f"alt {ref.alt[:80]!r} is the site's name"
    file_words = set(word_tokens(urlsplit(ref.url).path.rsplit("/", 1)[-1]))
    background = BACKGROUND_WORDS & file_words
    if background:
        return "background_image", f"{sorted(background)[0]!r} in the file name {ref.url[:200]}"
    return None


def content_score(ref: ImageRef, page: PageFacts) -> float:
    """0..1: how much what the page says about a reference points to content (1) over furniture (0)."""
    score = 0.5
    if ref.in_main:
        score += 0.25
    if clean_text(ref.alt) or clean_text(ref.context):
        score += 0.15
    if any(side is not None and side >= LARGE_DECLARED_SIDE for side in (ref.width, ref.height)):
        score += 0.1
    if COMPLEMENTARY_REGIONS.intersection(ref.landmarks):
        score -= 0.25
    if ref.link_host and ref.link_host != page.host and not ref.link_host.endswith("." + page.host):
        score -= 0.15
    return round(min(1.0, max(0.0, score)), 3)
