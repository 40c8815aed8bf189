"""The whole mine per core: `magiclens mine --no-fetch` (Beam's FnApiRunner, one worker) on every
shared WARC (../shared/data/warc/**/*.warc.gz), against the sum of its stages' raw baselines on the
same input, timed in the same run:

- raw FastWARC: every record of the same files iterated with its HTTP headers parsed, and its
  payload read;
- raw Lexbor: a parse plus `css("img")` of every HTML page that `mine` reads from them;
- plain Pillow: open, EXIF transpose, RGB, resize to the same max side (bicubic), JPEG encode at
  the same quality, of every archived image that `mine` decodes (found once, before timing, by
  running the per-file work in this process and noting what it hands to the decoder).

`mine` runs as a fresh process, and its CPU time (user + system, from the kernel: wait4) is what
it costs in core-seconds, start-up (imports, Beam) included. On the small shared corpus start-up
dominates, so the rows are marginal figures between the corpus once (1x) and COPIES distinct copies
of it (bench_scale.distinct_copies: other hosts and record ids, the same bytes), where start-up
cancels out: records per CPU-second, and CPU-seconds per pair written. The whole-process figures
of the 1x run are in `detail`. Each setting runs ROUNDS times, interleaved; the least CPU time counts.

`detail` also splits the marginal cost of one copy of the corpus: our own stage functions on the
same input (read_warc, extract_images, the decoder `mine` calls), timed in this process, and the
rest (filters, dedupe, pairing, Parquet writes, Beam), which is the mine's time less theirs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from fastwarc.warc import ArchiveIterator
from PIL import Image, ImageOps
from selectolax.lexbor import LexborHTMLParser

from bench.bench_scale import distinct_copies, linked_copies
from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.images import stage as image_stage
from magiclens.pipeline.images.normalize import ImageRejected
from magiclens.pipeline.mine import add_arguments, config_from_args
from magiclens.pipeline.mine.config import MineConfig
from magiclens.pipeline.mine.work import mine_file
from magiclens.pipeline.records import Page
from magiclens.pipeline.warc import read_warc

ROOT = Path(__file__).resolve().parent.parent
WARCS = ROOT.parent / "shared" / "data" / "warc"
COPIES = 4
ROUNDS = 2
BASELINE_ROUNDS = 3


def shared_warcs() -> list[Path]:
    warcs = sorted(WARCS.glob("**/*.warc.gz"))
    if not warcs:
        raise SystemExit(f"no WARC files under {WARCS}: clone the project beside ../shared")
    return warcs


def mine_cpu(pattern: str, output: Path) -> tuple[float, dict]:
    """(CPU seconds of one `magiclens mine --no-fetch` process, its stats.json)."""
    command = [sys.executable, "-m", "magiclens", "mine", "--input", pattern, "--output", str(output), "--no-fetch",
               "--direct_num_workers=1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode(errors='replace')[-3000:]}")
    return usage.ru_utime + usage.ru_stime, json.loads((output / "stats.json").read_text())


def mine_config(warcs: list[Path], output: Path) -> MineConfig:
    """The settings `magiclens mine --no-fetch` runs with by default."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--output", str(output), "--no-fetch"])
    return config_from_args(args, [str(path) for path in warcs])


def decoded_images(warcs: list[Path], config: MineConfig) -> list[bytes]:
    """The payloads of the archived images that `mine` decodes, from its per-file work."""
    handed = []
    decode = image_stage.normalize_with

    def noting(data: bytes, image_config):
        handed.append(data)
        return decode(data, image_config)

    with mock.patch.object(image_stage, "normalize_with", noting):
        for path in warcs:
            mine_file(str(path), config)
    return handed


def raw_fastwarc(warcs: list[Path]) -> int:
    count = 0
    for path in warcs:
        with open(path, "rb") as handle:
            for record in ArchiveIterator(handle, parse_http=True, fsspec_args=False):
                record.reader.read()
                count += 1
    return count


def raw_lexbor(pages: list[bytes]) -> None:
    for html in pages:
        LexborHTMLParser(html).css("img")


def plain_pillow(images: list[bytes], max_side: int, quality: int) -> int:
    """Decodes, resizes and encodes each image; the number that Pillow could not open."""
    failed = 0
    for data in images:
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        except Exception:  # what mine rejects as undecodable
            failed += 1
            continue
        if max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), "JPEG", quality=quality)
    return failed


def our_read(warcs: list[Path]) -> None:
    for path in warcs:
        for _ in read_warc(str(path)):
            pass


def our_extract(pages: list[Page]) -> None:
    for page in pages:
        extract_images(page.html, page.url, charset=page.charset)


def our_decode(images: list[bytes], config: MineConfig) -> None:
    for data in images:
        try:
            image_stage.normalize_with(data, config.image)
        except ImageRejected:
            pass


def least_cpu(work, *args) -> float:
    best = float("inf")
    for _ in range(BASELINE_ROUNDS):
        started = time.process_time()
        work(*args)
        best = min(best, time.process_time() - started)
    return best


def run() -> list[dict]:
    warcs = shared_warcs()
    with tempfile.TemporaryDirectory(prefix="bench-mine-") as scratch:
        scratch = Path(scratch)
        config = mine_config(warcs, scratch / "unused")
        pages = [item for path in warcs for item in read_warc(str(path)) if isinstance(item, Page)]
        images = decoded_images(warcs, config)
        records = raw_fastwarc(warcs)  # also warms the page cache
        undecodable = plain_pillow(images, config.image.max_side, config.image.jpeg_quality)
        baseline_seconds = {
            "fastwarc": least_cpu(raw_fastwarc, warcs),
            "lexbor": least_cpu(raw_lexbor, [page.html for page in pages]),
            "pillow": least_cpu(plain_pillow, images, config.image.max_side, config.image.jpeg_quality),
        }
        our_seconds = {
            "read_warc": least_cpu(our_read, warcs),
            "extract_images": least_cpu(our_extract, pages),
            "decode": least_cpu(our_decode, images, config),
        }
        inputs = {"1x": linked_copies(warcs, scratch / "in-1x"),
                  f"{COPIES}x": distinct_copies(warcs, COPIES, scratch / f"in-{COPIES}x")}
        cpu: dict[str, float] = {}
        stats: dict[str, dict] = {}
        for round_number in range(ROUNDS):
            for name, pattern in inputs.items():
                seconds, stats[name] = mine_cpu(pattern, scratch / f"out-{name}-{round_number}")
                cpu[name] = min(cpu.get(name, float("inf")), seconds)
    one, many = stats["1x"], stats[f"{COPIES}x"]
    mined_records = one["stages"]["records"]["in"]
    extra_records = many["stages"]["records"]["in"] - mined_records
    extra_pairs = many["stages"]["outputs"]["pairs"] - one["stages"]["outputs"]["pairs"]
    extra_cpu = cpu[f"{COPIES}x"] - cpu["1x"]
    baseline_rate = records / sum(baseline_seconds.values())
    detail = (
        f"{len(warcs)} WARC files: {mined_records} records, {len(pages)} pages, {len(images)} images decoded "
        f"({undecodable} not by Pillow), {one['stages']['outputs']['pairs']} pairs at 1x; {COPIES}x: "
        f"{many['stages']['records']['in']} records, {many['stages']['outputs']['pairs']} pairs; "
        f"mine CPU s 1x {cpu['1x']:.2f}, {COPIES}x {cpu[f'{COPIES}x']:.2f} (1x whole process: "
        f"{mined_records / cpu['1x']:.0f} records/s, {cpu['1x'] / max(1, one['stages']['outputs']['pairs']):.2f} "
        f"CPU s/pair); per copy, CPU s: mine {extra_cpu / (COPIES - 1):.3f} = our stages "
        + ", ".join(f"{name} {seconds:.3f}" for name, seconds in our_seconds.items())
        + f" + the rest {extra_cpu / (COPIES - 1) - sum(our_seconds.values()):.3f}; raw baselines "
        + ", ".join(f"{name} {seconds:.3f}" for name, seconds in baseline_seconds.items())
    )
    rate_row = {"name": "mine_records_per_cpu_s", "unit": "records/s/core", "baseline": baseline_rate,
                "goal": "higher is better (raw stages summed)", "detail": detail}
    pair_row = {"name": "mine_cpu_s_per_pair", "unit": "core-s/pair", "goal": "lower is better", "detail": detail}
    if extra_records <= 0 or extra_cpu <= 0:
        why = f"{COPIES}x added {extra_records} records and {extra_cpu:.2f} CPU s: no marginal rate"
        return [{**rate_row, "error": why}, {**pair_row, "error": why}]
    rate = extra_records / extra_cpu
    pair_row["value"] = extra_cpu / extra_pairs if extra_pairs > 0 else None
    if extra_pairs <= 0:
        pair_row["error"] = f"{COPIES}x wrote no more pairs than 1x"
    return [{**rate_row, "value": rate, "ratio": rate / baseline_rate}, pair_row]


if __name__ == "__main__":
    for row in run():
        print(row)
