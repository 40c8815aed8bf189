"""The licence a page declares: `<a rel="license" href>` and `<link rel="license" href>` links, and
licence metas (`<meta name="license">`, `dc.rights`, `dcterms.license`, ...).

Both parsers gather the hrefs of rel=license links (Lexbor in its one walk over the tree, with a
selector). `license_declarations` turns what they gathered into lines as the page
made them; `identify_licenses` names the licences it recognises (Creative Commons, GFDL) with Hugging
Face-style ids such as "cc-by-sa-3.0".
"""

from __future__ import annotations

import re
from collections.abc import Callable

from magiclens.pipeline.extract.raw import ASCII_WHITESPACE, ATTRIBUTE_CHARS, clean

# <meta name> (without regard to case) whose content states the licence or the rights of the page.
LICENSE_META_NAMES = frozenset(
    {"license", "licence", "dc.rights", "dc.license", "dcterms.rights", "dcterms.license", "rights", "copyright"}
)
MAX_DECLARATIONS = 10


def is_license_rel(rel: str | None) -> bool:
    """Whether a rel attribute holds the token "license" (tokens split on ASCII whitespace, any case)."""
    return bool(rel) and "license" in rel.lower().translate(_WHITESPACE_TO_SPACE).split(" ")


_WHITESPACE_TO_SPACE = str.maketrans({char: " " for char in ASCII_WHITESPACE})


def license_declarations(
    links: list[str], named_metas: list[tuple[str, str]], resolve: Callable[[str], tuple[str | None, object]]
) -> tuple[str, ...]:
    """Each declaration once, in page order, links first: "rel=license URL" (resolved against the
    page, as written when it does not resolve) and "meta NAME: CONTENT"; at most MAX_DECLARATIONS."""
    found: dict[str, None] = {}
    for href in links:
        text = clean(href, ATTRIBUTE_CHARS)
        if text:
            found[f"rel=license {resolve(text)[0] or text}"] = None
    for name, content in named_metas:
        key = name.strip(ASCII_WHITESPACE).lower()
        text = clean(content, ATTRIBUTE_CHARS)
        if key in LICENSE_META_NAMES and text:
            found[f"meta {key}: {text}"] = None
    return tuple(found)[:MAX_DECLARATIONS]


_CC_URL = re.compile(
    r"creativecommons\.org/(?:licenses/(?P<code>[a-z+-]+)/(?P<version>\d+(?:\.\d+)?)(?:/(?P<port>[a-z]{2}(?:-[a-z]{2})?)(?=/|$|[?#]))?"
    r"|licenses/(?P<old>publicdomain)\b"
    r"|publicdomain/(?P<pd>zero|mark)/(?P<pd_version>\d+(?:\.\d+)?))",
    re.IGNORECASE,
)
_CC_TEXT = re.compile(r"\bCC[\s-]*(?P<code>BY(?:[\s-]*(?:NC|ND|SA)){0,2})[\s-]*(?P<version>\d\.\d)\b", re.IGNORECASE)
_CC0_TEXT = re.compile(r"\bCC0\b|\bCC[\s-]zero\b", re.IGNORECASE)
_GFDL = re.compile(r"gnu\.org/(?:licenses/fdl|copyleft/fdl)|\bGNU Free Documentation License\b", re.IGNORECASE)


def identify_license(text: str) -> str:
    """The id of the licence a URL or a statement names ("cc-by-sa-3.0", "cc-by-2.0-de", "cc0-1.0",
    "cc-pdm-1.0", "cc-publicdomain", "gfdl"), or "" when none is recognised."""
    match = _CC_URL.search(text)
    if match:
        if match["old"]:
            return "cc-publicdomain"
        if match["pd"]:
            return f"{'cc0' if match['pd'].lower() == 'zero' else 'cc-pdm'}-{match['pd_version']}"
        port = f"-{match['port'].lower()}" if match["port"] else ""
        return f"cc-{match['code'].lower()}-{match['version']}{port}"
    match = _CC_TEXT.search(text)
    if match:
        code = "-".join(re.findall(r"by|nc|nd|sa", match["code"].lower()))
        return f"cc-{code}-{match['version']}"
    if _CC0_TEXT.search(text):
        return "cc0-1.0"
    return "gfdl" if _GFDL.search(text) else ""


def identify_licenses(declarations: tuple[str, ...]) -> str:
    """The recognised licences of a page's declarations, each once, comma-separated; "" for none."""
    ids = dict.fromkeys(identify_license(declaration) for declaration in declarations)
    return ",".join(name for name in ids if name)
