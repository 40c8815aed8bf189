"""HTML extraction: pages/s of `extract_images` (Lexbor) on the 70 real pages in
../shared/data/html, against a raw Lexbor parse + `css("img")` of the same pages in the same run.

A second row measures the floor under the first: the parse and the walk over the tree that
`extract_images` makes, reading every <img>'s attributes and building one ImageRef per <img>
with a src, and nothing else (no URL resolution, text, context or facts). What extraction costs
above the floor is its per-image Python work.

All are timed page by page, interleaved, on the thread's CPU clock, and each page counts with
its fastest of several rounds: other processes on a shared machine then inflate no side.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.extract.lexbor import _IMG_ID, _LEXBOR_OPTIONS, _LEXBOR_QUERY
from magiclens.pipeline.extract.refs import image_ref

HTML_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "html"
ROUNDS = 20
UNKNOWN_PAGE_URL = "https://example.org/page.html"


def load_pages(html_dir: Path = HTML_DIR) -> list[tuple[bytes, str]]:
    """(page bytes, page URL) of every .html.gz under html_dir; URLs from INDEX.tsv where known."""
    urls = {}
    for line in (html_dir / "INDEX.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        columns = line.split("\t")
        if len(columns) >= 6 and columns[5]:
            urls[columns[4]] = columns[5]
    pages = []
    for path in sorted(html_dir.rglob("*.html.gz")):
        relative = path.relative_to(html_dir).as_posix()
        pages.append((gzip.decompress(path.read_bytes()), urls.get(relative, UNKNOWN_PAGE_URL)))
    return pages


def _raw_lexbor(html: bytes, page_url: str) -> None:
    LexborHTMLParser(html).css("img")


def _extract(html: bytes, page_url: str) -> None:
    extract_images(html, page_url)


def _floor(html: bytes, page_url: str) -> None:
    refs = []
    for node in LexborHTMLParser(html, options=_LEXBOR_OPTIONS).css(_LEXBOR_QUERY):
        if node.tag_id == _IMG_ID:
            attrs = node.attributes
            src = attrs.get("src")
            if src:
                refs.append(image_ref(src, attrs.get("alt") or "", attrs.get("title") or "", "", None, None, len(refs),
                                      "src", (src,), (), (), False, ""))


def run() -> list[dict]:
    if not HTML_DIR.is_dir():
        raise SystemExit(f"real pages not found at {HTML_DIR}: clone the project beside ../shared")
    pages = load_pages()
    work = {"raw": _raw_lexbor, "extract": _extract, "floor": _floor}
    fastest = {name: [float("inf")] * len(pages) for name in work}
    for _ in range(ROUNDS):
        for index, (html, page_url) in enumerate(pages):
            for name, step in work.items():
                started = time.thread_time()
                step(html, page_url)
                elapsed = time.thread_time() - started
                fastest[name][index] = min(fastest[name][index], elapsed)
    raw_rate, extract_rate, floor_rate = (len(pages) / sum(fastest[name]) for name in ("raw", "extract", "floor"))
    return [
        {
            "name": "html_extract_pages_per_s",
            "value": extract_rate,
            "unit": "pages/s",
            "baseline": raw_rate,
            "ratio": extract_rate / raw_rate,
            "goal": ">= 0.7",
        },
        {
            "name": "html_extract_floor_pages_per_s",
            "value": floor_rate,
            "unit": "pages/s",
            "baseline": raw_rate,
            "ratio": floor_rate / raw_rate,
            "goal": "reference: parse + walk + attributes + ImageRef per <img>",
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
