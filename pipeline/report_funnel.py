"""The accounting views of report.html: the funnel of stats.json (per stage: in, out, rejected by
reason), the funnel per WARC file (`mine`'s files.json: which file gave what), and a few examples
of each reject reason, with a thumbnail where the image was decoded before it was dropped (found in
the run's per-file work, pipeline/mine/work.py)."""

from __future__ import annotations

import io
from collections import Counter

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from magiclens.pipeline.accounting import read_json
from magiclens.pipeline.report import escape, figure, iter_batches, link, parquet_files

EXAMPLES_PER_REASON = 3
MAX_FILES_SHOWN = 200
# Work files (pipeline/mine/work.py) searched for the thumbnails of rejected images: bounded work.
MAX_WORK_FILES_SEARCHED = 50
ACCOUNTING_FIELDS = ("in", "out", "rejected", "rejected_total", "balanced")

# Display order of the stages of `mine` and `instruct`; stages not listed follow in name order.
STAGE_ORDER = [
    "warc_files", "records", "pages", "refs", "filters", "image_records", "images", "fetch", "decoded",
    "page_images", "corpus_dedupe", "scores", "pair_pages", "captions", "instruct",
]
STAGE_LABELS = {
    "warc_files": "WARC files",
    "records": "WARC records",
    "pages": "HTML pages",
    "refs": "image references",
    "image_records": "image records in the WARCs",
    "images": "images (from the WARCs or fetched)",
    "fetch": "fetched over HTTP",
    "decoded": "after post-decode checks",
    "page_images": "after per-page dedupe",
    "pair_pages": "pages with pairs",
    "instruct": "pairs given instructions",
    "captions": "captions",
}

def ordered_stages(stages: dict) -> list[str]:
    known = [name for name in STAGE_ORDER if name in stages]
    others = sorted(name for name in stages if name not in STAGE_ORDER and name != "outputs" and "in" in stages[name])
    return known + others


def funnel_html(stats: dict) -> str:
    stages = stats.get("stages", {})
    names = ordered_stages(stages)
    largest = max([stages[name].get("in", 0) for name in names] + [1])
    rows = []
    for name in names:
        entry = stages[name]
        if "in" not in entry:
            continue
        reasons = sorted(entry.get("rejected", {}).items(), key=lambda item: (-item[1], item[0]))
        reason_text = ", ".join(f"{escape(reason)} {count:,}" for reason, count in reasons)
        width_in = 100 * entry["in"] / largest
        width_out = 100 * entry["out"] / largest
        balanced = entry.get("balanced", True)
        rows.append(
            f'<tr><td>{escape(STAGE_LABELS.get(name, name))}<br><code>{escape(name)}</code></td>'
            f'<td class="n">{entry["in"]:,}</td><td class="n">{entry["out"]:,}</td>'
            f'<td class="n">{entry.get("rejected_total", 0):,}</td>'
            f'<td class="bar"><div class="in" style="width:{width_in:.1f}%"></div>'
            f'<div class="out" style="width:{width_out:.1f}%"></div></td>'
            f'<td class="reasons">{reason_text}{"" if balanced else " <b class=bad>unbalanced</b>"}</td></tr>'
        )
    # "outputs" holds plain counts (pairs, triplets) beside the in/out fields every stage gets
    outputs = {name: count for name, count in stages.get("outputs", {}).items() if name not in ACCOUNTING_FIELDS}
    output_text = ", ".join(f"<b>{count:,}</b> {escape(name)}" for name, count in sorted(outputs.items()))
    return (
        f'<p class="outputs">Written: {output_text or "nothing"}</p>'
        '<table class="funnel"><tr><th>stage</th><th>in</th><th>out</th><th>rejected</th>'
        '<th>kept of the largest stage</th><th>rejected by reason</th></tr>' + "".join(rows) + "</table>"
    )


def files_html(files: list[dict], pairs_by_file: Counter) -> str:
    """The funnel per WARC file: which file gave what (the first MAX_FILES_SHOWN files)."""
    if not files:
        return ""
    columns = ["records", "pages", "pages kept", "references kept", "images", "after checks"]
    rows = []
    for row in files[:MAX_FILES_SHOWN]:
        if not row.get("finished"):
            rows.append(f'<tr><td>{escape(row["file"])}</td><td colspan="{len(columns) + 2}">not finished</td></tr>')
            continue
        top = ", ".join(f"{escape(reason)} {count:,}" for reason, count in list(row.get("rejected", {}).items())[:4])
        cells = "".join(f'<td class="n">{row.get(column, 0):,}</td>' for column in columns)
        pairs = pairs_by_file.get(row.get("warc_file", ""), 0)
        rows.append(f'<tr><td>{escape(row["file"])}</td>{cells}<td class="n">{pairs:,}</td><td class="reasons">{top}</td></tr>')
    more = f"<p>and {len(files) - MAX_FILES_SHOWN:,} more files (files.json lists them all)</p>" if len(files) > MAX_FILES_SHOWN else ""
    header = "".join(f"<th>{escape(column)}</th>" for column in ["WARC file", *columns, "pairs", "most rejected"])
    return f'<h2>Per WARC file</h2><table class="funnel"><tr>{header}</tr>{"".join(rows)}</table>{more}'


def reject_examples(files: list[str], stages: dict, per_reason: int = EXAMPLES_PER_REASON) -> dict[tuple[str, str], list[dict]]:
    """Up to `per_reason` rejects of each (stage, reason) of stats.json, read in file order; stops
    reading as soon as every reason has its examples."""
    wanted = {(stage, reason) for stage, entry in stages.items() for reason in entry.get("rejected", {})}
    examples: dict[tuple[str, str], list[dict]] = {key: [] for key in wanted}
    missing = set(wanted)
    for batch in iter_batches(files, ["element_id", "stage", "reason", "detail"]):
        for row in batch.to_pylist():
            key = (row["stage"], row["reason"])
            if key in missing:
                examples[key].append(row)
                if len(examples[key]) >= per_reason:
                    missing.discard(key)
        if not missing:
            break
    return {key: rows for key, rows in examples.items() if rows}


def work_images(output_dir: str, urls: set[str]) -> dict[str, bytes]:
    """The stored JPEG of each of `urls` found among the decoded images of the run's per-file work
    (images rejected after decoding: duplicates, furniture seen on many pages, caps)."""
    found: dict[str, bytes] = {}
    if not urls:
        return found
    try:
        matched = FileSystems.match([FileSystems.join(output_dir, "_work", "*", "*", "images.parquet")])[0].metadata_list
    except Exception:  # no work folder: not a mine run, or one without per-file work
        return found
    for metadata in sorted(matched, key=lambda item: item.path)[:MAX_WORK_FILES_SEARCHED]:
        with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            table = pq.read_table(io.BytesIO(handle.read()), columns=["ref", "image"])
        for ref, image in zip(table.column("ref").to_pylist(), table.column("image").to_pylist()):
            if ref["url"] in urls and ref["url"] not in found:
                found[ref["url"]] = image["jpeg"]
        if len(found) == len(urls):
            break
    return found


def examples_html(examples: dict[tuple[str, str], list[dict]], images: dict[str, bytes]) -> str:
    if not examples:
        return ""
    sections = []
    for (stage, reason), rows in sorted(examples.items()):
        items = []
        for row in rows:
            image_url = row["element_id"].rsplit(" ", 1)[-1]
            jpeg = images.get(image_url)
            if jpeg:
                items.append(f"<li>{figure({'bytes': jpeg}, row['detail'], image_url)}</li>")
            else:
                shown = link(image_url) if image_url.startswith("http") else escape(image_url)
                items.append(f'<li>{shown}<br><small>{escape(row["detail"])}</small></li>')
        sections.append(f"<h3><code>{escape(stage)}</code> {escape(reason)}</h3><ul class=\"examples\">{''.join(items)}</ul>")
    return "<h2>Examples of each reject reason</h2>" + "".join(sections)


def files_section(run_dir: str, pair_files: list[str]) -> str:
    files_path = FileSystems.join(run_dir, "files.json")
    if not FileSystems.exists(files_path):
        return ""
    pairs_by_file: Counter = Counter()
    for batch in iter_batches(pair_files, ["page_warc_file"]):
        pairs_by_file.update(batch.column(0).to_pylist())
    return files_html(read_json(files_path), pairs_by_file)


def examples_section(run_dir: str, output_dir: str, stats: dict) -> str:
    examples = reject_examples(parquet_files(FileSystems.join(run_dir, "rejects")), stats.get("stages", {}))
    urls = {row["element_id"].rsplit(" ", 1)[-1] for rows in examples.values() for row in rows if " " in row["element_id"]}
    return examples_html(examples, work_images(output_dir, urls))


