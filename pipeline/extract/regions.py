"""Where on the page an image sits: what its ancestors say about it, for telling page furniture
(logos, avatars, icons, share buttons) from content before anything is fetched.

For each kept <img>, from its ancestors (up to, not including, <html>):

- landmarks: short tokens of the page regions that enclose it, nearest first, each once: the
  elements nav, header, footer, aside and form; the ARIA roles banner, navigation, contentinfo,
  complementary and search; and "embed" for a social-media or oEmbed widget (a class such as
  twitter-tweet, instagram-media, tiktok-embed, fb-post, wp-block-embed).
- class tokens: the lower-case words of the class and id attributes of the <img> and of its
  CLASS_TOKEN_ANCESTORS closest ancestors, nearest first, each once: split on anything not a
  letter or digit and on camelCase ("LOCLogoSmall" -> loc, logo, small); numbers are left out.
- in main: inside an <article>, a <main> or an element with role=main. On a page that has none of
  these, inside the densest text block instead: the element whose <p> children hold the most
  text (characters other than spaces, tabs, line breaks and no-break spaces; at least
  MIN_BLOCK_TEXT), the first such in page order; on a
  page without one, no image is in main.
- link href: the href of the closest enclosing <a>, if any.

Each parser adapts its tree to `Ancestry` (a node's parent, and its key, tag and attributes); the
rules are here once, so that both parsers give the same facts. Each ancestor is read once per
page however many images share it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

CLASS_TOKEN_ANCESTORS = 4
MAX_CLASS_TOKENS = 48  # per image: bounded work and memory on pages with utility-class soup
CLASS_ATTRIBUTE_CHARS = 300  # of each class or id attribute, only this prefix is split
MIN_BLOCK_TEXT = 200

LANDMARK_TAGS = {"nav": "nav", "header": "header", "footer": "footer", "aside": "aside", "form": "form"}
LANDMARK_ROLES = frozenset(("banner", "navigation", "contentinfo", "complementary", "search"))
EMBED = "embed"
EMBED_CLASSES = frozenset((
    "twitter-tweet", "twitter-timeline", "twitter-video", "instagram-media", "tiktok-embed", "reddit-card",
    "reddit-embed-bq", "imgur-embed-pub", "fb-post", "fb-page", "fb-video", "wp-block-embed", "oembed",
))
MAIN_TAGS = frozenset(("article", "main"))

# (landmarks, class tokens, in main, link href) of one image.
RawFacts = tuple[tuple[str, ...], tuple[str, ...], bool, "str | None"]
NO_FACTS: RawFacts = ((), (), False, None)

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_WORD_OR_SEPARATOR = re.compile(r"[^A-Za-z0-9]+")


@lru_cache(maxsize=8192)
def split_class_words(value: str) -> tuple[str, ...]:
    """The lower-case words of a class or id attribute, in order, each once, numbers left out."""
    words: dict[str, None] = {}
    for part in _WORD_OR_SEPARATOR.split(value[:CLASS_ATTRIBUTE_CHARS]):
        for word in _WORD.findall(part):
            if not word.isdigit():
                words[word.lower()] = None
    return tuple(words)


def element_class_words(class_value: str | None, id_value: str | None) -> tuple[str, ...]:
    """The words of an element's class attribute, then of its id."""
    if not id_value:
        return split_class_words(class_value) if class_value else ()
    if not class_value:
        return split_class_words(id_value)
    return split_class_words(class_value) + split_class_words(id_value)


def has_main_role(attrs: dict) -> bool:
    return _is_main_role(attrs.get("role"))


def _role_words(role: str) -> list[str]:
    """The lower-case words of a role attribute, split on ASCII whitespace as CSS `~=` splits
    (empty strings among them where spaces repeat)."""
    return role.lower().translate(_WHITESPACE_TO_SPACE).split(" ")


def _is_main_role(role: str | None) -> bool:
    return bool(role) and "main" in _role_words(role)


_WHITESPACE_TO_SPACE = str.maketrans({char: " " for char in " \t\n\r\f"})


def densest_block(paragraphs: Iterable[tuple[Any, str]]) -> Any:
    """The key of the parent whose <p> children hold the most text, or None under MIN_BLOCK_TEXT.
    `paragraphs` is (key of the paragraph's parent, paragraph text) per <p>, in page order."""
    totals: dict[Any, int] = {}
    for parent_key, text in paragraphs:
        totals[parent_key] = totals.get(parent_key, 0) + len(text) - sum(map(text.count, " \t\n\r\f\xa0"))
    best, best_total = None, MIN_BLOCK_TEXT - 1
    for key, total in totals.items():  # in page order: the first of equal totals wins
        if total > best_total:
            best, best_total = key, total
    return best


# The facts of one element: (its parent's facts, class attribute, id attribute, landmarks of it and its
# ancestors nearest first, in main, href of the closest enclosing <a>). A tuple: cheapest to build.
_Ancestor = tuple


class Ancestry:
    """The facts of a page's images, from a parser's tree.

    `key_of(node)` identifies a node while the tree lives; `read(node)` is its (tag, attributes,
    parent element or None): C-level getters (operator.attrgetter) where the parser allows, as
    this runs for every ancestor of every image kept. `main_block` is None when the page has an
    <article>, <main> or role=main (those decide what is main), else the key of the densest text
    block (None when it has none: nothing is main).
    """

    def __init__(self, key_of: Callable[[Any], Any], read: Callable[[Any], tuple[str, dict, Any]], has_main: bool,
                 main_block: Any = None):
        self.key_of = key_of
        self.read = read
        self.has_main = has_main
        self.main_block = main_block
        self.known: dict[Any, _Ancestor | None] = {}  # None for <html>, where the walk stops
        self.nearby_words: dict[Any, tuple[str, ...]] = {}  # of an image's parent: see _nearby_words

    def facts(self, attrs: dict, parent: Any) -> RawFacts:
        """The facts of an <img> whose attributes are `attrs` and whose parent is `parent`."""
        key, above = self._ancestor(parent)
        if above is None:
            return (), element_class_words(attrs.get("class"), attrs.get("id"))[:MAX_CLASS_TOKENS], False, None
        nearby = self.nearby_words.get(key)
        if nearby is None:
            nearby = self.nearby_words[key] = _nearby_words(above)
        class_value, id_value = attrs.get("class"), attrs.get("id")
        if class_value or id_value:
            nearby = tuple(dict.fromkeys(element_class_words(class_value, id_value) + nearby))[:MAX_CLASS_TOKENS]
        return above[3], nearby, above[4], above[5]

    def _ancestor(self, node: Any) -> tuple[Any, _Ancestor | None]:
        """(key, facts) of element `node` (and so of its ancestors), reading only those not read
        before; (None, None) for no element or <html>."""
        known, key_of, read = self.known, self.key_of, self.read
        unread = []
        found = first_key = None
        while node is not None:
            key = key_of(node)
            if first_key is None:
                first_key = key
            if key in known:
                found = known[key]
                break
            tag, attrs, node = read(node)
            if tag == "html":
                known[key] = None
                break
            unread.append((key, tag, attrs))
        has_main, main_block = self.has_main, self.main_block
        for key, tag, attrs in reversed(unread):
            if found is None:
                landmarks, in_main, link_href = (), False, None
            else:
                landmarks, in_main, link_href = found[3], found[4], found[5]
            get = attrs.get
            role, class_value = get("role"), get("class")
            if role or tag in LANDMARK_TAGS or (class_value and _is_embed(class_value)):
                landmarks = _with_own_landmarks(tag, role, class_value, landmarks)
            if not in_main:
                if has_main:
                    in_main = tag in MAIN_TAGS or _is_main_role(role)
                else:
                    in_main = main_block is not None and key == main_block
            if tag == "a" and "href" in attrs:
                link_href = attrs["href"] or ""  # None for a valueless href in Lexbor's attributes, "" in bs4's
            found = known[key] = (found, class_value, get("id"), landmarks, in_main, link_href)
        return (first_key, found) if found is not None else (None, None)


def _nearby_words(ancestor: _Ancestor) -> tuple[str, ...]:
    """The class and id words of an element and its ancestors, CLASS_TOKEN_ANCESTORS in all."""
    words: tuple[str, ...] = ()
    for _ in range(CLASS_TOKEN_ANCESTORS):
        if ancestor is None:
            break
        ancestor, class_value, id_value = ancestor[:3]
        if class_value or id_value:
            words += element_class_words(class_value, id_value)
    return tuple(dict.fromkeys(words))[:MAX_CLASS_TOKENS]


@lru_cache(maxsize=4096)
def _is_embed(class_value: str) -> bool:
    return not EMBED_CLASSES.isdisjoint(class_value.lower().split())


def _with_own_landmarks(tag: str, role: str | None, class_value: str | None,
                        above: tuple[str, ...]) -> tuple[str, ...]:
    own = [LANDMARK_TAGS[tag]] if tag in LANDMARK_TAGS else []
    if role:
        own += [word for word in _role_words(role) if word in LANDMARK_ROLES]
    if class_value and _is_embed(class_value):
        own.append(EMBED)
    if not own:
        return above
    return tuple(dict.fromkeys(own + list(above)))
