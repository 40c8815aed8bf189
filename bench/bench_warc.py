"""WARC reading: records/s of `pipeline.warc.read_warc` against raw FastWARC iteration doing the same work.

Both sides iterate every record of the shared WARC files with their HTTP headers parsed (as
`read_warc` does, to find revisits' originals and WAT/WET files) and read the same payloads:
warcinfo, and the records that ours keeps as a page or an image (found once, before timing).
What ours adds is its own work: classifying each record (HTTP status, content type, size caps),
undoing HTTP transfer and content encodings, building the page and image objects, resolving
revisits (reading their originals again) and checking each file's end. records/s counts the
records both sides iterate.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from fastwarc.warc import ArchiveIterator, WarcRecordType

from magiclens.pipeline.records import ImageRecord, Page
from magiclens.pipeline.warc import read_warc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "warc"
ROUNDS = 7


def _files() -> list[Path]:
    return sorted(SHARED.glob("webarchive/*.warc.gz")) + sorted(SHARED.glob("commoncrawl/*.warc.gz"))


def _kept_records(files: list[Path]) -> set[tuple[str, str]]:
    """(path, record id) of every record whose payload ours reads and keeps."""
    return {
        (str(path), item.record_id)
        for path in files
        for item in read_warc(str(path))
        if isinstance(item, (Page, ImageRecord))
    }


def _raw(files: list[Path], payloads: set[tuple[str, str]]) -> int:
    count = 0
    for path in files:
        with open(path, "rb") as handle:
            for record in ArchiveIterator(handle, parse_http=True, fsspec_args=False):
                if record.record_type == WarcRecordType.warcinfo or (str(path), record.record_id) in payloads:
                    record.reader.read()
                count += 1
    return count


def _ours(files: list[Path]) -> None:
    for path in files:
        for _ in read_warc(str(path)):
            pass


def run() -> list[dict]:
    files = _files()
    payloads = _kept_records(files)
    records = _raw(files, payloads)  # also warms the page cache
    raw_times, our_times = [], []
    for _ in range(ROUNDS):  # interleaved, so both see the same machine load
        started = time.perf_counter()
        _raw(files, payloads)
        raw_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        _ours(files)
        our_times.append(time.perf_counter() - started)
    baseline = records / statistics.median(raw_times)
    value = records / statistics.median(our_times)
    return [
        {
            "name": "warc_read_records_per_s",
            "value": value,
            "unit": "records/s",
            "baseline": baseline,
            "ratio": value / baseline,
            "goal": ">= 0.9 (raw FastWARC, same records and payload reads)",
            "detail": f"{records} records, {len(payloads)} payloads kept, in {len(files)} shared WARC files",
        }
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
