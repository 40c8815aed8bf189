"""Image URLs: the candidates of an <img> (srcset and <picture> candidates, lazy-loading
attributes, src) in order of preference, and their resolution to absolute http(s) URLs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from operator import itemgetter
from urllib.parse import quote, urljoin, urlsplit

from magiclens.pipeline.extract.raw import ASCII_WHITESPACE, DETAIL_CHARS, EMPTY_URL, INVALID_URL, NON_HTTP_URL

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

_SRCSET_AND_LAZY_ATTRIBUTES = frozenset(SRCSET_ATTRIBUTES + LAZY_SRC_ATTRIBUTES)
_NO_URL = (EMPTY_URL, "no URL in src, srcset or lazy-loading attributes")
_Resolve = Callable[[str], "tuple[str | None, tuple[str, str] | None]"]


def choose_urls(
    attrs: dict, sources: list[dict], resolve: _Resolve
) -> tuple[tuple[str, ...], str, tuple[str, str] | None]:
    """Every usable URL of an <img>, each once, in order of preference, and the attribute the
    first came from: (urls, attribute, None), or ((), "", (reason, detail)) when none is usable,
    with the problem of the first candidate that failed."""
    src = attrs.get("src")
    if not sources and _SRCSET_AND_LAZY_ATTRIBUTES.isdisjoint(attrs):  # most images have src only
        if not src:
            return (), "", _NO_URL
        url, failure = resolve(src)
        return ((url,), "src", None) if url is not None else ((), "", failure)
    problem = None
    urls: dict[str, None] = {}
    first_name = ""
    preferred = _preferred_urls(attrs, sources)
    for raw_url, name in [*preferred, (src, "src")] if src else preferred:
        url, failure = resolve(raw_url)
        if url is None:
            problem = problem or failure
        elif url not in urls:
            urls[url] = None
            first_name = first_name or name
    if not urls:
        return (), "", problem or _NO_URL
    return tuple(urls), first_name, None


def _preferred_urls(attrs: dict, sources: list[dict]) -> list[tuple[str, str]]:
    """(raw URL, attribute name) in order of preference, before `src`: srcset candidates, the
    largest first (a width descriptor outranks any density; equal ones keep page order), then
    the lazy-loading attributes."""
    candidates = []
    for source in sources:
        for name in SRCSET_ATTRIBUTES:
            if source.get(name):
                candidates += srcset_candidates(source[name], "source " + name)
    for name in SRCSET_ATTRIBUTES:
        if attrs.get(name):
            candidates += srcset_candidates(attrs[name], name)
    candidates.sort(key=_RANK, reverse=True)
    preferred = [(raw_url, name) for raw_url, _, name in candidates]
    if not _LAZY_SRC_SET.isdisjoint(attrs):
        preferred += [(attrs[name], name) for name in LAZY_SRC_ATTRIBUTES if attrs.get(name)]
    return preferred


_RANK = itemgetter(1)
_LAZY_SRC_SET = frozenset(LAZY_SRC_ATTRIBUTES)


def srcset_candidates(srcset: str, name: str) -> list[tuple[str, tuple[int, float], str]]:
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


class UrlResolver:
    """Resolves the image URLs of one page; keeps the answer per raw URL."""

    def __init__(self, page_url: str, base_href: str | None):
        base = page_url
        if base_href is not None and base_href.strip(ASCII_WHITESPACE):
            resolved, _ = absolute_url(base_href, page_url)
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
            answer = self.answers[raw] = self._resolve_uncached(raw.strip(ASCII_WHITESPACE))
        return answer

    def _resolve_uncached(self, text: str) -> tuple[str | None, tuple[str, str] | None]:
        """By string concatenation where that gives what urljoin would, else `absolute_url`."""
        if self.origin is None or "/." in text or text.startswith("."):
            return absolute_url(text, self.base)
        if text.startswith(("http://", "https://")):
            if _CLEAN_ABSOLUTE.match(text):
                return text.partition("#")[0], None
        elif text.startswith("//"):
            absolute = f"{self.scheme}:{text}"
            if _CLEAN_ABSOLUTE.match(absolute):
                return absolute.partition("#")[0], None
        elif _CLEAN_REFERENCE.match(text):
            return ((self.origin if text.startswith("/") else self.directory) + text).partition("#")[0], None
        return absolute_url(text, self.base)


def absolute_url(raw: str, base: str) -> tuple[str | None, tuple[str, str] | None]:
    """`raw` resolved against `base` by urljoin, checked and percent-escaped where needed:
    (URL, None) or (None, (reason, detail))."""
    text = raw.strip(ASCII_WHITESPACE)
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



_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Decoded where they mean the same encoded or not: in a path, every sub-delimiter and ":" "@";
# in a query, not "&", "=", "+" or ";", which split it into parameters (and "+" is a space).
_SAME_DECODED_IN_PATH = _UNRESERVED | frozenset("!$&'()*+,;=:@")
_SAME_DECODED_IN_QUERY = _UNRESERVED | frozenset("!$'()*,:@/?")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_KEY_SAFE = "!#$%&'()*+,/:;=?@[]~"  # reserved characters and "%": left for the rules above
_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_url_key(url: str) -> str:
    """A key under which the spellings of one http(s) URL meet, to match image references to
    archived image records: "host[:port]/path[?query]", without the scheme (http and https
    alike), user info, default port or fragment; the host lower-case (IDNA for a non-ASCII one);
    an empty path as "/"; percent-encoding normalised: characters that mean the same encoded
    or not are decoded ("%7E" and "~", "%2C" and "," in a path), other escapes upper-case, and
    characters a URL cannot hold literally (spaces, non-ASCII, a lone "%") are escaped as UTF-8.

    Raises ValueError for anything but an absolute http(s) URL with a host.
    """
    try:
        parts = urlsplit(url.strip(ASCII_WHITESPACE))
        host = parts.hostname or ""
        port = parts.port
    except ValueError as error:
        raise ValueError(f"not a usable URL: {url[:DETAIL_CHARS]!r} ({error})") from None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not host:
        raise ValueError(f"not an absolute http(s) URL with a host: {url[:DETAIL_CHARS]!r}")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as error:
            raise ValueError(f"host {host!r} cannot be IDNA-encoded: {error}") from None
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    if port is not None and port != _DEFAULT_PORTS[parts.scheme.lower()]:
        host = f"{host}:{port}"
    key = host + (_normalise_escapes(parts.path, _SAME_DECODED_IN_PATH) or "/")
    if parts.query:
        key += "?" + _normalise_escapes(parts.query, _SAME_DECODED_IN_QUERY)
    return key


def _normalise_escapes(text: str, same_decoded: frozenset[str]) -> str:
    text = _LONE_PERCENT.sub("%25", quote(text, safe=_KEY_SAFE))

    def one_escape(match: re.Match) -> str:
        character = chr(int(match.group(1), 16))
        return character if character in same_decoded else "%" + match.group(1).upper()

    return _PERCENT.sub(one_escape, text)
