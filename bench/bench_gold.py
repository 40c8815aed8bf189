"""Content versus furniture on real pages: what `magiclens mine` keeps, against the gold labels.

data/gold/labels-*.jsonl label every <img> of 48 real pages from ../shared/data/warc as content,
furniture or unclear (data/gold/RUBRIC.md). A third of the pages are held out by the rubric's
split and never used to tune: every figure is reported on the tuning part and on the held-out part.

  references   the decision taken before anything is fetched (extraction + reference filters):
               content precision and recall, furniture recall (unclear lines are left out). The
               furniture judgement is measured on the references not dropped for their declared
               size (a size floor is a setting, not a judgement: --min-declared-side); content
               recall is also given with them (`_all`)
  pairs        `magiclens mine --no-fetch` over the gold WARCs: the share of pairs on gold pages
               whose two images are both labelled content
  pages        of the gold pages with two or more content images whose bytes are in the archive,
               the share that give at least one content pair

Quality figures, not speeds: `baseline` is empty and `ratio` is the figure itself, so the table
shows it beside its goal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.filters import RefFilterConfig, filter_page_refs
from magiclens.pipeline.records import Page
from magiclens.pipeline.warc import read_warc

ROOT = Path(__file__).resolve().parent.parent
GOLD_DIR = ROOT / "data" / "gold"
WARC_DIR = ROOT.parent / "shared" / "data" / "warc"
PARTS = ("tuning", "held_out")
GOALS = {"pair_precision": ">= 0.85", "page_coverage": ">= 0.80", "furniture_recall": ">= 0.90",
         "content_recall": ">= 0.85", "content_precision": "", "content_recall_all": ""}


@dataclass(frozen=True)
class GoldLine:
    warc: str
    page_url: str
    img_index: int
    urls: tuple[str, ...]
    label: str
    evidence: str

    @property
    def part(self) -> str:
        return part_of(self.page_url)


def part_of(page_url: str) -> str:
    """The rubric's split, fixed before labelling: a third of the pages are held out."""
    return "held_out" if int(hashlib.sha256(page_url.encode()).hexdigest(), 16) % 3 == 0 else "tuning"


def load_gold(gold_dir: Path = GOLD_DIR) -> list[GoldLine]:
    lines = []
    for path in sorted(gold_dir.glob("labels-*.jsonl")):
        for text in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(text)
            lines.append(GoldLine(row["warc"], row["page_url"], row["img_index"], tuple(row["urls"]),
                                  row["label"], row["evidence"]))
    return lines


def gold_pages(gold: list[GoldLine]) -> dict[tuple[str, str], list[GoldLine]]:
    pages: dict[tuple[str, str], list[GoldLine]] = defaultdict(list)
    for line in gold:
        pages[(line.warc, line.page_url)].append(line)
    return pages


def _label_of_url(lines: list[GoldLine]) -> dict[str, GoldLine]:
    by_url: dict[str, GoldLine] = {}
    for line in lines:
        for url in line.urls:
            by_url.setdefault(url, line)
    return by_url


def html_pages(warc: str, urls: set[str]) -> dict[str, Page]:
    """The HTML pages of one WARC whose URL is in `urls` (the first capture of each)."""
    found: dict[str, Page] = {}
    for item in read_warc(str(WARC_DIR / warc)):
        if isinstance(item, Page) and item.url in urls and item.url not in found:
            found[item.url] = item
    return found


SIZE_REASON = "declared_too_small"


def reference_decisions(pages: dict[tuple[str, str], list[GoldLine]]) -> dict[GoldLine, str]:
    """Each gold line -> "" when extraction and the reference filters keep its element, else the reason."""
    kept: dict[GoldLine, str] = {}
    by_warc: dict[str, set[str]] = defaultdict(set)
    for warc, page_url in pages:
        by_warc[warc].add(page_url)
    for warc, urls in sorted(by_warc.items()):
        for page_url, page in html_pages(warc, urls).items():
            found = extract_images(page.html, page.url, charset=page.charset)
            filtered = filter_page_refs(found, page.url, RefFilterConfig())
            kept_urls = {ref.url for ref in filtered.refs}
            reasons = {dropped.ref.url: dropped.reason for dropped in filtered.dropped}
            reasons.update((url, reason) for reason, url in found.skipped)
            for line in pages[(warc, page_url)]:
                if kept_urls.intersection(line.urls):
                    kept[line] = ""
                else:
                    kept[line] = next((reasons[url] for url in line.urls if url in reasons), "not_extracted")
    return kept


def mined_pairs(warcs: list[str], extra: list[str]) -> list[dict]:
    from magiclens.cli import main

    with tempfile.TemporaryDirectory() as output:
        arguments = ["mine", "--no-fetch", "--output", output, "--runner=FnApiRunner", *extra]
        for warc in warcs:
            arguments += ["--input", str(WARC_DIR / warc)]
        with contextlib.redirect_stdout(io.StringIO()):
            main(arguments)
        files = sorted(Path(output, "pairs").glob("*.parquet"))
        columns = ["page_url", "crawl", "query_url", "target_url"]
        return [row for path in files for row in pq.read_table(path, columns=columns).to_pylist()]


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def reference_figures(decisions: dict[GoldLine, str], part: str) -> dict[str, float | None]:
    labelled = [line for line in decisions if line.part == part and line.label != "unclear"]
    judged = [line for line in labelled if decisions[line] != SIZE_REASON]
    content = [line for line in judged if line.label == "content"]
    furniture = [line for line in judged if line.label == "furniture"]
    kept = [line for line in judged if decisions[line] == ""]
    all_content = [line for line in labelled if line.label == "content"]
    return {
        "content_precision": _ratio(sum(line.label == "content" for line in kept), len(kept)),
        "content_recall": _ratio(sum(decisions[line] == "" for line in content), len(content)),
        "furniture_recall": _ratio(sum(decisions[line] != "" for line in furniture), len(furniture)),
        "content_recall_all": _ratio(sum(decisions[line] == "" for line in all_content), len(all_content)),
    }


def pair_figures(pages: dict[tuple[str, str], list[GoldLine]], pairs: list[dict], part: str) -> dict:
    """Pairs on gold pages of `part` (matched by page URL: a page URL is gold in one WARC only, or
    its captures carry the same images) -> pair precision and page coverage."""
    by_page: dict[str, list[GoldLine]] = defaultdict(list)
    for (_, page_url), lines in pages.items():
        if part_of(page_url) == part:
            by_page[page_url].extend(lines)
    pairs_on_gold = [pair for pair in pairs if pair["page_url"] in by_page]
    both_content = 0
    content_pair_pages = set()
    for pair in pairs_on_gold:
        labels = _label_of_url(by_page[pair["page_url"]])
        sides = [labels.get(pair["query_url"]), labels.get(pair["target_url"])]
        if all(line is not None and line.label == "content" for line in sides):
            both_content += 1
            content_pair_pages.add(pair["page_url"])
    eligible = {page_url for page_url, lines in by_page.items()
                if sum(line.label == "content" and line.evidence == "image" for line in lines) >= 2}
    return {
        "pairs": len(pairs_on_gold),
        "pair_precision": _ratio(both_content, len(pairs_on_gold)),
        "eligible_pages": len(eligible),
        "page_coverage": _ratio(len(eligible & content_pair_pages), len(eligible)),
    }


def run() -> list[dict]:
    if not WARC_DIR.is_dir():
        raise SystemExit(f"real WARCs not found at {WARC_DIR}: clone the project beside ../shared")
    gold = load_gold()
    pages = gold_pages(gold)
    decisions = reference_decisions(pages)
    warcs = sorted({warc for warc, _ in pages})
    rows = []
    for setting, extra in (("defaults", []), ("min-side 64", ["--min-side", "64"])):
        pairs = mined_pairs(warcs, extra)
        for part in PARTS:
            figures = pair_figures(pages, pairs, part)
            rows.append({"name": f"gold_pair_precision_{part} ({setting})", "value": figures["pairs"], "unit": "pairs",
                         "ratio": figures["pair_precision"], "goal": GOALS["pair_precision"]})
            rows.append({"name": f"gold_page_coverage_{part} ({setting})", "value": figures["eligible_pages"],
                         "unit": "pages", "ratio": figures["page_coverage"], "goal": GOALS["page_coverage"]})
    for part in PARTS:
        lines = sum(line.part == part for line in gold)
        for name, value in reference_figures(decisions, part).items():
            rows.append({"name": f"gold_refs_{name}_{part}", "value": lines, "unit": "labelled refs",
                         "ratio": value, "goal": GOALS[name]})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
