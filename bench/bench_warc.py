"""WARC reading: records/s of `pipeline.warc.read_warc` against raw FastWARC iteration of the same files.

The raw baseline iterates every record with FastWARC and reads its payload; ours classifies the
content records and reads the payloads it keeps. Both count all records in the files.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from fastwarc.warc import ArchiveIterator

from magiclens.pipeline.warc import read_warc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "warc"
ROUNDS = 7


def _files() -> list[Path]:
    return sorted(SHARED.glob("webarchive/*.warc.gz")) + sorted(SHARED.glob("commoncrawl/*.warc.gz"))


def _raw(files: list[Path]) -> int:
    count = 0
    for path in files:
        with open(path, "rb") as handle:
            for record in ArchiveIterator(handle, parse_http=True, fsspec_args=False):
                record.reader.read()
                count += 1
    return count


def _ours(files: list[Path]) -> None:
    for path in files:
        for _ in read_warc(str(path)):
            pass


def run() -> list[dict]:
    files = _files()
    records = _raw(files)  # warm the page cache, and count every record once
    raw_times, our_times = [], []
    for _ in range(ROUNDS):  # interleaved, so both see the same machine load
        started = time.perf_counter()
        _raw(files)
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
            "goal": ">= 0.9 (raw FastWARC iteration)",
            "detail": f"{records} records in {len(files)} shared WARC files",
        }
    ]
