"""Decoding: a response body to the UTF-8 document both parsers read, and the flattening of
markup nested so deep that an HTML5 parser would take minutes on it.

Bytes are decoded with the HTTP charset, else a byte-order mark, else a `<meta charset>` in the
first 4 KiB, else UTF-8 if valid, else windows-1252 (labels mapped as browsers map them).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import webencodings

# Elements nested deeper than this are flattened before parsing: both HTML5 parsers take time
# quadratic in the depth (Lexbor takes minutes for 100,000 nested <div>s, html5lib far longer).
MAX_NESTING = 1024
# A page with at most this many "<" is never flattened: however it nests, Lexbor parses it in a
# tenth of a second and html5lib in seconds, and the depth estimate would cost more than it saves.
FEW_TAGS = 4096
NESTING_TOO_DEEP = "nesting_too_deep"  # a reason in PageImages.skipped: markup deeper than MAX_NESTING was flattened

_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
_META_PRESCAN_BYTES = 4096


def utf8_document(html: bytes | str, charset: str | None) -> bytes:
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


def flatten_deep_nesting(document: bytes, max_depth: int) -> tuple[bytes, int]:
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
    an estimate, start tags minus end tags at the peak, that errs high (unclosed <p>s and <li>s
    count as nesting; void elements such as <br> and <img> do not) so that the exact scan runs on
    few real pages."""
    data = np.frombuffer(document, dtype=np.uint8)
    is_lt = data == ord("<")
    if np.count_nonzero(is_lt) <= max(max_depth, FEW_TAGS):
        return False
    after = np.flatnonzero(is_lt[:-1]) + 1  # the byte after each "<"
    after_lt = data[after]
    is_end = after_lt == ord("/")
    steps = (((after_lt | 0x20) - ord("a")) < 26).astype(np.int32)  # "<" + letter: a start tag
    steps -= is_end  # "</": an end tag
    if _peak(steps) <= max_depth:
        return False
    # Only then tell void elements apart: it costs more than the rest of the estimate.
    steps[_names_void(np.concatenate((data, np.zeros(_LONGEST_VOID + 1, np.uint8))), after + is_end)] = 0
    return _peak(steps) > max_depth


def _peak(steps: np.ndarray) -> int:
    depth = np.cumsum(steps)
    depth -= np.minimum.accumulate(np.minimum(depth, 0))  # stray end tags cannot go below zero
    return int(depth.max())


_LONGEST_VOID = max(map(len, _VOID))
_NAME_ENDS = np.zeros(256, dtype=bool)
_NAME_ENDS[list(b" \t\n\f\r/>\0")] = True  # what ends a tag name, or the padding after the document


def _names_void(padded: np.ndarray, name_starts: np.ndarray) -> np.ndarray:
    """Whether the tag name at each of `name_starts` is a void element's (any case); `padded` is
    the document followed by _LONGEST_VOID + 1 zero bytes."""
    lowered = [padded[name_starts + offset] | 0x20 for offset in range(_LONGEST_VOID)]
    void = np.zeros(len(name_starts), dtype=bool)
    for name in _VOID:
        matches = _NAME_ENDS[padded[name_starts + len(name)]]
        for offset, byte in enumerate(name):
            matches &= lowered[offset] == byte
        void |= matches
    return void
