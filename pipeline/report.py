"""`magiclens report DIR`: one self-contained report.html for a `mine` or `instruct` run.

The report shows what a person needs before spending GPU hours on a dataset: the funnel from
stats.json (per stage: in, out, rejected by reason), the funnel per WARC file (`mine`'s files.json:
which file gave what), a few examples of each reject reason (with a thumbnail where the image was
decoded before it was dropped), histograms of image sizes and scores (pairs) or instruction lengths
(triplets), and a grid of sample pairs or triplets with thumbnails.

Everything is inline (CSS, SVG charts, thumbnails as base64 data URLs) and a Content-Security-Policy
forbids loading anything else, so the file can be mailed or opened from a bucket. All web text (page
titles, alt text, instructions, URLs) is untrusted and escaped; only http(s) URLs become links.

Memory stays bounded however large the run: histograms are built batch by batch from the few
numeric columns they need, and only the sample rows' images are read.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from magiclens.pipeline.accounting import read_json
from magiclens.pipeline.output import require_committed_dataset
from magiclens.pipeline.report_arguments import DEFAULT_SAMPLES, add_arguments  # noqa: F401 - re-exported

REPORT_NAME = "report.html"
THUMBNAIL_SIDE = 192
MAX_BARS = 40
TEXT_CAP = 300

PAIR_SAMPLE_COLUMNS = ["page_url", "page_title", "query_url", "query_alt", "query_image",
                       "target_url", "target_alt", "target_image"]
TRIPLET_SAMPLE_COLUMNS = ["page_url", "query_url", "query_image", "instruction", "target_url", "target_image", "writer"]


@dataclass
class Histogram:
    """Counts of values falling into bins of `bin_width`, keyed by bin index (value // bin_width)."""

    title: str
    unit: str
    bin_width: float
    counts: Counter
    missing: int = 0  # rows where the value was null

    def add(self, values: list) -> None:
        for value in values:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                self.missing += 1
            else:
                self.counts[math.floor(value / self.bin_width)] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --- reading a run directory --------------------------------------------------------------------


def parquet_files(folder: str) -> list[str]:
    """The Parquet files of a dataset folder (local, gs://, s3://), sorted by name."""
    pattern = FileSystems.join(folder, "*.parquet")
    return sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list)


def iter_batches(files: list[str], columns: list[str], batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
    for path in files:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            present = [name for name in columns if name in parquet.schema_arrow.names]
            if present:
                yield from parquet.iter_batches(batch_size=batch_size, columns=present)


def sample_rows(files: list[str], columns: list[str], count: int) -> list[dict]:
    """The first `count` rows of the dataset (files in name order), with only `columns` read."""
    rows: list[dict] = []
    for batch in iter_batches(files, columns, batch_size=max(1, count)):
        rows.extend(batch.to_pylist()[: count - len(rows)])
        if len(rows) >= count:
            break
    return rows


def pair_histograms(files: list[str]) -> list[Histogram]:
    width = Histogram("Image width (query and target)", "px", 32, Counter())
    height = Histogram("Image height (query and target)", "px", 32, Counter())
    scores: dict[str, Histogram] = {}
    for batch in iter_batches(files, ["query_width", "query_height", "target_width", "target_height", "scores"]):
        names = batch.schema.names
        for side in ("query", "target"):
            if f"{side}_width" in names:
                width.add(batch.column(f"{side}_width").to_pylist())
                height.add(batch.column(f"{side}_height").to_pylist())
        if "scores" in names:
            column = batch.column("scores")
            # flatten() nulls the fields of a null struct: those pairs count as not scored
            for field, values in zip(column.type, column.flatten()):
                histogram = scores.setdefault(field.name, Histogram(f"Score: {field.name}", "", 0.02, Counter()))
                histogram.add(values.to_pylist())
    return [width, height, *scores.values()]


def triplet_histograms(files: list[str]) -> list[Histogram]:
    words = Histogram("Instruction length", "words", 1, Counter())
    for batch in iter_batches(files, ["instruction"]):
        words.add([None if text is None else len(text.split()) for text in batch.column("instruction").to_pylist()])
    return [words]


# --- rendering ------------------------------------------------------------------------------------


def escape(text: object, cap: int = TEXT_CAP) -> str:
    text = "" if text is None else str(text)
    if len(text) > cap:
        text = text[:cap] + "…"
    return html.escape(text, quote=True)


def link(url: str | None, label: str | None = None) -> str:
    """An <a> for http(s) URLs; anything else (javascript:, data:) is shown as plain text."""
    shown = escape(label if label else url, 120)
    if url and url.lower().startswith(("http://", "https://")):
        return f'<a href="{escape(url, 4000)}" rel="noopener noreferrer nofollow">{shown}</a>'
    return shown


def thumbnail(image: dict | None) -> tuple[str | None, str]:
    """(data URL of a small JPEG, size text), or (None, why) when there is nothing to show."""
    data = (image or {}).get("bytes")
    if not data:
        return None, "no image"
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            size = f"{decoded.width}×{decoded.height}"
            small = decoded.convert("RGB")
            small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=80)
    except Exception as error:  # a broken image in a dataset is shown, never a crash
        return None, f"undecodable: {type(error).__name__}"
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), size


def figure(image: dict | None, caption: str, url: str | None) -> str:
    source, size = thumbnail(image)
    if source is None:
        picture = f'<div class="missing">{escape(size)}</div>'
    else:
        picture = f'<img src="{source}" alt="{escape(caption, 200)}" title="{escape(size)}">'
    return f'<figure>{picture}<figcaption>{escape(caption) or "<i>no alt text</i>"}<br>{link(url, "image")}</figcaption></figure>'


def _merged_bars(histogram: Histogram) -> tuple[list[tuple[float, int]], float]:
    """(left edge, count) bars covering the data, at most MAX_BARS of them, and the bar width."""
    low, high = min(histogram.counts), max(histogram.counts)
    factor = max(1, math.ceil((high - low + 1) / MAX_BARS))
    merged: Counter = Counter()
    for index, count in histogram.counts.items():
        merged[(index - low) // factor] += count
    width = histogram.bin_width * factor
    return [(low * histogram.bin_width + bar * width, merged[bar]) for bar in range(max(merged) + 1)], width


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


def histogram_svg(histogram: Histogram) -> str:
    heading = f"<h3>{escape(histogram.title)}</h3>"
    note = f" ({histogram.missing:,} without a value)" if histogram.missing else ""
    if not histogram.counts:
        return f'<div class="chart">{heading}<p>no values{note}</p></div>'
    bars, bar_width = _merged_bars(histogram)
    tallest = max(count for _, count in bars)
    chart_w, chart_h, gap = 360, 120, 1
    step = chart_w / len(bars)
    shapes = []
    for position, (left, count) in enumerate(bars):
        height = chart_h * count / tallest
        label = f"{_number(left)}–{_number(left + bar_width)} {histogram.unit}: {count:,}"
        shapes.append(
            f'<rect x="{position * step:.1f}" y="{chart_h - height:.1f}" width="{max(step - gap, 1):.1f}" '
            f'height="{height:.1f}"><title>{escape(label)}</title></rect>'
        )
    low, high = bars[0][0], bars[-1][0] + bar_width
    axis = (
        f'<text x="0" y="{chart_h + 14}">{escape(_number(low))}</text>'
        f'<text x="{chart_w}" y="{chart_h + 14}" text-anchor="end">{escape(_number(high))} {escape(histogram.unit)}</text>'
    )
    return (
        f'<div class="chart">{heading}<svg width="{chart_w}" height="{chart_h + 18}" '
        f'viewBox="0 0 {chart_w} {chart_h + 18}" role="img">{"".join(shapes)}{axis}</svg>'
        f"<p>{histogram.total:,} values{note}; tallest bar {tallest:,}</p></div>"
    )


def pair_card(row: dict) -> str:
    title = row.get("page_title") or row.get("page_url")
    return (
        '<div class="card">'
        + figure(row.get("query_image"), row.get("query_alt") or "", row.get("query_url"))
        + '<div class="arrow">→</div>'
        + figure(row.get("target_image"), row.get("target_alt") or "", row.get("target_url"))
        + f'<p class="page">{link(row.get("page_url"), title)}</p></div>'
    )


def triplet_card(row: dict) -> str:
    return (
        '<div class="card">'
        + figure(row.get("query_image"), "query", row.get("query_url"))
        + f'<div class="instruction">“{escape(row.get("instruction"))}”</div>'
        + figure(row.get("target_image"), "target", row.get("target_url"))
        + f'<p class="page">{link(row.get("page_url"))} · {escape(row.get("writer"), 80)}</p></div>'
    )


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:14px;margin:4px 0}
table.funnel{border-collapse:collapse;width:100%;background:#fff}
.funnel td,.funnel th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
.funnel td.n{text-align:right;font-variant-numeric:tabular-nums}
.funnel td.bar{width:22%}.bar div{height:7px;margin:2px 0}.bar .in{background:#c9d6ea}.bar .out{background:#2f6fb3}
.reasons{font-size:12px;color:#555}.bad{color:#b00}.outputs{font-size:16px}
.charts{display:flex;flex-wrap:wrap;gap:16px}.chart{background:#fff;padding:8px;border:1px solid #ddd}
.chart rect{fill:#2f6fb3}.chart text{font-size:10px;fill:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;padding:8px;display:flex;flex-wrap:wrap;align-items:center;gap:8px}
.card figure{margin:0;width:196px}.card img{max-width:192px;max-height:192px;display:block}
.card figcaption{font-size:12px;color:#444;word-break:break-word}
.missing{width:192px;height:96px;background:#eee;color:#900;display:flex;align-items:center;justify-content:center}
.arrow{font-size:24px;color:#888}.instruction{flex:1;min-width:120px;font-style:italic}
.page{width:100%;margin:4px 0 0;font-size:12px;word-break:break-all}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;font-size:12px}
ul.examples{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:12px}
ul.examples li{max-width:300px;font-size:12px;word-break:break-all}
"""


def report_html(run_dir: str, stats: dict, kind: str | None, histograms: list[Histogram], samples: list[dict],
                extra_sections: str = "") -> str:
    from magiclens.pipeline.report_funnel import funnel_html  # it builds on this module's pieces
    command = stats.get("command", "run")
    cards = "".join((triplet_card if kind == "triplets" else pair_card)(row) for row in samples)
    sample_section = (
        f'<div class="grid">{cards}</div>' if cards else f"<p>no {escape(kind or 'pairs or triplets')} in this run</p>"
    )
    settings = {key: value for key, value in stats.items() if key != "stages"}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>magiclens {escape(command)} report</title><style>{STYLE}</style></head>
<body>
<h1>magiclens {escape(command)}: {escape(run_dir, 500)}</h1>
<p>{escape(stats.get("seconds", "?"))} s. Every element that entered a stage left it either as output or as a
reject with a reason (rejects/ holds them all).</p>
<h2>Funnel</h2>
{funnel_html(stats)}
{extra_sections}
<h2>Distributions</h2>
<div class="charts">{"".join(histogram_svg(histogram) for histogram in histograms)}</div>
<h2>Sample {escape(kind or "")} ({len(samples)})</h2>
{sample_section}
<h2>Settings</h2>
<pre>{escape(json.dumps(settings, indent=2, sort_keys=True, default=str), 20000)}</pre>
</body></html>
"""


def dataset_kind(run_dir: str) -> tuple[str | None, list[str]]:
    """Which dataset the run wrote (triplets for `instruct`, pairs for `mine`) and its files."""
    for kind in ("triplets", "pairs"):
        files = parquet_files(FileSystems.join(run_dir, kind))
        if files:
            return kind, files
    return None, []


def write_report(run_dir: str, samples: int = DEFAULT_SAMPLES, shown_as: str | None = None) -> str:
    """Build RUN_DIR/report.html from RUN_DIR/stats.json and its pairs/ or triplets/; returns its path.
    `shown_as` names the run in the page (a run's report is built in its temporary folder)."""
    stats_path = FileSystems.join(run_dir, "stats.json")
    if not FileSystems.exists(stats_path):
        raise FileNotFoundError(f"{stats_path} not found: give the output directory of `magiclens mine` or `instruct`")
    stats = read_json(stats_path)
    kind, files = dataset_kind(run_dir)
    if kind == "pairs":
        histograms, columns = pair_histograms(files), PAIR_SAMPLE_COLUMNS
    elif kind == "triplets":
        histograms, columns = triplet_histograms(files), TRIPLET_SAMPLE_COLUMNS
    else:
        histograms, columns = [], []
    rows = sample_rows(files, columns, samples) if files else []
    from magiclens.pipeline.report_funnel import examples_section, files_section  # it builds on this module's pieces

    extra = files_section(run_dir, files if kind == "pairs" else []) + examples_section(run_dir, shown_as or run_dir, stats)
    path = FileSystems.join(run_dir, REPORT_NAME)
    with FileSystems.create(path, mime_type="text/html") as handle:
        handle.write(report_html(shown_as or run_dir, stats, kind, histograms, rows, extra).encode("utf-8"))
    return path


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit(f"unexpected argument(s): {' '.join(extra)}")
    if args.samples < 0:
        raise SystemExit(f"--samples must be 0 or more, got {args.samples}")
    require_committed_dataset(args.run_dir, "report", "the command that wrote it")
    try:
        path = write_report(args.run_dir, args.samples)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    print(f"report: {path}")
    return 0
