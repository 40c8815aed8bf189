"""HTML extraction: pages/s of `extract_images` (Lexbor) on the 70 real pages in
../shared/data/html, against a raw Lexbor parse + `css("img")` of the same pages in the same run.

Both are timed page by page, interleaved, on the thread's CPU clock, and each page counts with
its fastest of several rounds: other processes on a shared machine then inflate neither side.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

from magiclens.pipeline.extract import extract_images

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


def run() -> list[dict]:
    if not HTML_DIR.is_dir():
        raise SystemExit(f"real pages not found at {HTML_DIR}: clone the project beside ../shared")
    pages = load_pages()
    fastest = {name: [float("inf")] * len(pages) for name in ("raw", "extract")}
    for _ in range(ROUNDS):
        for index, (html, page_url) in enumerate(pages):
            for name, work in (("raw", _raw_lexbor), ("extract", _extract)):
                started = time.thread_time()
                work(html, page_url)
                elapsed = time.thread_time() - started
                fastest[name][index] = min(fastest[name][index], elapsed)
    raw_rate = len(pages) / sum(fastest["raw"])
    extract_rate = len(pages) / sum(fastest["extract"])
    return [
        {
            "name": "html_extract_pages_per_s",
            "value": extract_rate,
            "unit": "pages/s",
            "baseline": raw_rate,
            "ratio": extract_rate / raw_rate,
            "goal": ">= 0.8",
        }
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
