"""Scaling of `magiclens mine`: peak memory as the input grows 8x, and throughput with 1 vs 2 workers.

Input: every shared WARC (../shared/data/warc/{webarchive,commoncrawl}/*.warc.gz) once (1x), and the
same files linked 8 times under different names (8x). Each run is a fresh `magiclens mine --no-fetch`
process; its peak RSS comes from the kernel (wait4's ru_maxrss of that child).

- memory: peak RSS at 8x against 1x, one in-process worker (goal <= 1.3: nothing holds the corpus);
- throughput: WARC records per second of pipeline time, with `--direct_num_workers=2
  --direct_running_mode=multi_processing` against 1 worker. Each is a marginal rate between the 1x and
  8x runs, (records_8x - records_1x) / (seconds_8x - seconds_1x), so that start-up costs that do not
  grow with the input (importing the stages in each worker) cancel out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARCS = ROOT.parent / "shared" / "data" / "warc"
COPIES = 8
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@dataclass(frozen=True)
class MineRun:
    peak_rss_bytes: int
    records: int
    seconds: float


def shared_warcs() -> list[Path]:
    warcs = sorted((WARCS / "webarchive").glob("*.warc.gz")) + sorted((WARCS / "commoncrawl").glob("*.warc.gz"))
    if not warcs:
        raise SystemExit(f"no WARC files under {WARCS}: clone the project beside ../shared")
    return warcs


def linked_copies(warcs: list[Path], copies: int, folder: Path) -> str:
    """Link every WARC `copies` times under distinct names; return a glob matching all the links."""
    folder.mkdir(parents=True)
    for copy in range(copies):
        for warc in warcs:
            os.symlink(warc, folder / f"copy{copy}-{warc.name}")
    return str(folder / "*.warc.gz")


def mine(pattern: str, output: Path, beam_args: list[str]) -> MineRun:
    command = [sys.executable, "-m", "magiclens", "mine", "--input", pattern, "--output", str(output), "--no-fetch",
               *beam_args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode(errors='replace')[-3000:]}")
    stats = json.loads((output / "stats.json").read_text())
    return MineRun(usage.ru_maxrss * 1024, stats["stages"]["records"]["in"], stats["seconds"])


def marginal_rate(small: MineRun, large: MineRun) -> float:
    return (large.records - small.records) / max(large.seconds - small.seconds, 1e-9)


def run() -> list[dict]:
    warcs = shared_warcs()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        scratch = Path(scratch)
        once = linked_copies(warcs, 1, scratch / "in-1x")
        eight = linked_copies(warcs, COPIES, scratch / f"in-{COPIES}x")
        one_1x = mine(once, scratch / "out-1x", [])
        one_8x = mine(eight, scratch / "out-8x", [])
        two_1x = mine(once, scratch / "out-1x-2w", TWO_WORKERS)
        two_8x = mine(eight, scratch / "out-8x-2w", TWO_WORKERS)
    mib = 1024 * 1024
    rate_one, rate_two = marginal_rate(one_1x, one_8x), marginal_rate(two_1x, two_8x)
    return [
        {
            "name": f"mine peak RSS, {COPIES}x vs 1x input",
            "value": one_8x.peak_rss_bytes / mib,
            "unit": "MiB",
            "baseline": one_1x.peak_rss_bytes / mib,
            "ratio": one_8x.peak_rss_bytes / one_1x.peak_rss_bytes,
            "goal": "<= 1.3",
        },
        {
            "name": "mine records/s, 2 vs 1 workers",
            "value": rate_two,
            "unit": "records/s",
            "baseline": rate_one,
            "ratio": rate_two / rate_one,
            "goal": "> 1 (2 cores)",
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
