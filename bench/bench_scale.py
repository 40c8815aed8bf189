"""Scaling of `magiclens mine`: peak memory as the input grows 8x, and throughput with 1 vs 2 workers.

Input: every shared WARC (../shared/data/warc/{webarchive,commoncrawl}/*.warc.gz) once (1x), and 8
copies of them (8x) whose keys are distinct: in copy c every host of the file becomes `cC-HOST`
(in WARC-Target-URI and WARC-Refers-To-Target-URI, and in the HTML pages, so that absolute image
links still point at the copy's own images) and every record id `<urn:uuid:cC-...>`, so the 8x run
has 8 times the pages, image URLs and records, not 8 times bigger groups of the same keys. The
image bytes are the same in every copy, so near-duplicate clusters do span copies (and the
furniture and per-image caps drop more of them at 8x); a gzip'd or chunked HTML body is undone,
rewritten and encoded again the same way. Broken records and files are copied byte for byte, and so break the
same way. Each run is a fresh `magiclens mine --no-fetch` process; its peak RSS is the kernel's
high-water mark of that process (VmHWM in /proc/PID/status, polled while it runs; the Beam worker
runs in that process with the default in-process runner).

- memory: peak RSS at 8x against 1x, one in-process worker (goal <= 1.3: nothing holds the corpus);
- throughput: WARC records per second of pipeline time, with `--direct_num_workers=2
  --direct_running_mode=multi_processing` against 1 worker. Each is a marginal rate between the 1x and
  THROUGHPUT_COPIES x runs, (records_8x - records_1x) / (seconds_8x - seconds_1x), so that start-up costs that do not
  grow with the input (importing the stages in each worker) cancel out. Each setting runs ROUNDS
  times, interleaved, and its median time (and median peak RSS) is used. When the 8x run does not
  take clearly longer than the 1x run (MIN_EXTRA_SECONDS), the rate is not computed and the row
  reports an error instead of dividing by a near-zero time.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARCS = ROOT.parent / "shared" / "data" / "warc"
COPIES = 8
# Throughput is measured on more copies: with 8 the two-worker runs grew by under a second.
THROUGHPUT_COPIES = 24
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
MIN_EXTRA_SECONDS = 1.0
ROUNDS = 3
_TARGET_URI = re.compile(rb"^WARC-Target-URI:[ \t]*<?([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s>:?#]+)", re.MULTILINE | re.IGNORECASE)


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


def linked_copies(warcs: list[Path], folder: Path) -> str:
    """Link every WARC once; return a glob matching the links."""
    folder.mkdir(parents=True)
    for warc in warcs:
        os.symlink(warc, folder / warc.name)
    return str(folder / "*.warc.gz")


def distinct_copies(warcs: list[Path], copies: int, folder: Path) -> str:
    """Copy 0 links the originals; copies 1.. are rewritten with distinct hosts and record ids."""
    folder.mkdir(parents=True)
    for warc in warcs:
        os.symlink(warc, folder / f"copy0-{warc.name}")
        data = warc.read_bytes()
        hosts = _hosts(data)
        for copy in range(1, copies):
            (folder / f"copy{copy}-{warc.name}").write_bytes(_rewrite_file(data, hosts, f"c{copy}-".encode()))
    return str(folder / "*.warc.gz")


def _members(data: bytes):
    """(compressed bytes, decompressed bytes or None where the member breaks off) of each gzip member."""
    position = 0
    while position < len(data):
        decompressor = zlib.decompressobj(31)
        try:
            plain = decompressor.decompress(data[position:])
        except zlib.error:
            yield data[position:], None
            return
        if not decompressor.eof:
            yield data[position:], None
            return
        end = len(data) - len(decompressor.unused_data)
        yield data[position:end], plain
        position = end


def _hosts(data: bytes) -> set[bytes]:
    hosts = set()
    for _, plain in _members(data):
        if plain is not None:
            hosts.update(match.group(1).split(b"://", 1)[1] for match in _TARGET_URI.finditer(plain))
    return hosts


def _rewrite_file(data: bytes, hosts: set[bytes], prefix: bytes) -> bytes:
    alternatives = b"|".join(re.escape(host) for host in sorted(hosts, key=len, reverse=True))
    host_pattern = re.compile(rb"(?i)//(" + alternatives + rb")(?=[/:?#\"'\s>\\]|$)") if hosts else None
    out = []
    for compressed, plain in _members(data):
        rewritten = _rewrite_records(plain, host_pattern, prefix) if plain is not None else None
        out.append(compressed if rewritten is None else _gzip(rewritten))
    return b"".join(out)


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def _rewrite_records(plain: bytes, host_pattern, prefix: bytes) -> bytes | None:
    """The member's records with new hosts and record ids; None if a record does not parse (kept as it was)."""
    out, position = [], 0
    while position < len(plain):
        header_end = plain.find(b"\r\n\r\n", position)
        if header_end < 0:
            return None
        header = plain[position:header_end + 2]
        length = re.search(rb"(?im)^Content-Length:[ \t]*(\d+)", header)
        if length is None or not header.startswith(b"WARC/"):
            return None
        block_start = header_end + 4
        block_end = block_start + int(length.group(1))
        if block_end + 4 > len(plain) or plain[block_end:block_end + 4] != b"\r\n\r\n":
            return None
        block = _rewrite_block(plain[block_start:block_end], host_pattern, prefix)
        header = re.sub(rb"<urn:uuid:", b"<urn:uuid:" + prefix, header)
        header = re.sub(rb"(?im)^(WARC-(?:Refers-To-)?Target-URI:.*)$",
                        lambda line: _replace_hosts(line.group(1), host_pattern, prefix), header)
        header = re.sub(rb"(?im)^(Content-Length:[ \t]*)\d+", lambda m: m.group(1) + str(len(block)).encode(), header)
        out.append(header + b"\r\n" + block + b"\r\n\r\n")
        position = block_end + 4
        while plain[position:position + 2] == b"\r\n":  # extra blank lines some writers leave
            position += 2
    return b"".join(out)


def _replace_hosts(text: bytes, host_pattern, prefix: bytes) -> bytes:
    if host_pattern is None:
        return text
    return host_pattern.sub(lambda match: b"//" + prefix + match.group(1), text)


def _rewrite_block(block: bytes, host_pattern, prefix: bytes) -> bytes:
    """An HTML response's body with the hosts rewritten (chunked and gzip'd bodies too); any other block as it was."""
    if not block.startswith(b"HTTP/"):
        return block
    split = block.find(b"\r\n\r\n")
    if split < 0:
        return block
    headers, body = block[:split + 4], block[split + 4:]
    fields = {}
    for line in headers.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip()] = value.strip()
    encoding, transfer = fields.get(b"content-encoding", b"identity"), fields.get(b"transfer-encoding", b"identity")
    if b"html" not in fields.get(b"content-type", b"") or encoding not in (b"identity", b"gzip") \
            or transfer not in (b"identity", b"chunked"):
        return block
    chunked = transfer == b"chunked"
    try:
        content = _dechunk(body) if chunked else body
    except ValueError:  # many archivers store the body already de-chunked, keeping the header
        content, chunked = body, False
    try:
        content = zlib.decompress(content, 47) if encoding == b"gzip" else content
    except zlib.error:  # a broken body stays as it was
        return block
    content = _replace_hosts(content, host_pattern, prefix)
    if encoding == b"gzip":
        content = _gzip(content)
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(content), content) if chunked else content
    headers = re.sub(rb"(?im)^(Content-Length:[ \t]*)\d+", lambda m: m.group(1) + str(len(body)).encode(), headers)
    return headers + body


def _dechunk(body: bytes) -> bytes:
    pieces, position = [], 0
    while True:
        line_end = body.index(b"\r\n", position)
        size = int(body[position:line_end].split(b";")[0].strip(), 16)
        position = line_end + 2
        if size == 0:
            return b"".join(pieces)
        if position + size > len(body):
            raise ValueError("a chunk breaks off")
        pieces.append(body[position:position + size])
        position += size + 2


def _high_water_rss(pid: int) -> int:
    """VmHWM of a running process, in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mine(pattern: str, output: Path, beam_args: list[str]) -> MineRun:
    # The copies share their image bytes: without a higher limit every image of 24 copies would be
    # furniture seen on too many pages, and the run would write no pair.
    command = [sys.executable, "-m", "magiclens", "mine", "--input", pattern, "--output", str(output), "--no-fetch",
               "--max-pages-per-image", "1000", *beam_args]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, cwd=ROOT)
        # The child's own high-water mark, polled: wait4's ru_maxrss would also count what the forked
        # bench process held before the exec (hundreds of MiB once earlier benches loaded torch).
        peak = 0
        while process.poll() is None:
            peak = max(peak, _high_water_rss(process.pid))
            time.sleep(0.02)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{errors.read().decode(errors='replace')[-3000:]}")
    stats = json.loads((output / "stats.json").read_text())
    return MineRun(peak, stats["stages"]["records"]["in"], stats["seconds"])


def median_run(runs: list[MineRun]) -> MineRun:
    """The median peak RSS and the median time of several runs of one setting."""
    return MineRun(int(statistics.median(run.peak_rss_bytes for run in runs)), runs[0].records,
                   statistics.median(run.seconds for run in runs))


def marginal_rate(small: MineRun, large: MineRun) -> tuple[float | None, str]:
    """(records/s between the two runs, "") or (None, why it cannot be measured)."""
    extra_seconds = large.seconds - small.seconds
    if large.records <= small.records:
        return None, f"the larger input has no more records ({large.records} vs {small.records})"
    if extra_seconds < MIN_EXTRA_SECONDS:
        return None, (f"the {large.records} records took {extra_seconds:.2f} s more than the {small.records} "
                      f"(under {MIN_EXTRA_SECONDS} s): too little to measure a rate; grow the input")
    return (large.records - small.records) / extra_seconds, ""


def run() -> list[dict]:
    warcs = shared_warcs()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        scratch = Path(scratch)
        once = linked_copies(warcs, scratch / "in-1x")
        inputs = {"1x": once, "8x": distinct_copies(warcs, COPIES, scratch / f"in-{COPIES}x"),
                  "many": distinct_copies(warcs, THROUGHPUT_COPIES, scratch / f"in-{THROUGHPUT_COPIES}x")}
        runs: dict[str, list[MineRun]] = {name: [] for name in ("1x-1w", "8x-1w", "many-1w", "1x-2w", "many-2w")}
        for round_number in range(ROUNDS):  # interleaved, so that every setting sees the same machine load
            for name in runs:
                output = scratch / f"out-{name}-{round_number}"
                runs[name].append(mine(inputs[name.split("-")[0]], output, TWO_WORKERS if name.endswith("2w") else []))
        one_1x, one_8x, one_many, two_1x, two_many = (median_run(runs[name]) for name in runs)
    mib = 1024 * 1024
    (rate_one, error_one), (rate_two, error_two) = marginal_rate(one_1x, one_many), marginal_rate(two_1x, two_many)
    throughput = {
        "name": "mine records/s, 2 vs 1 workers",
        "value": rate_two,
        "unit": "records/s",
        "baseline": rate_one,
        "ratio": rate_two / rate_one if rate_one and rate_two else None,
        "goal": "> 1 (2 cores)",
        "detail": (f"records 1x {one_1x.records}, {THROUGHPUT_COPIES}x {one_many.records}; seconds 1 worker "
                   f"{one_1x.seconds:.1f} / {one_many.seconds:.1f}, 2 workers {two_1x.seconds:.1f} / {two_many.seconds:.1f}"),
    }
    errors = [f"{workers}: {error}" for workers, error in (("1 worker", error_one), ("2 workers", error_two)) if error]
    if errors:
        throughput["error"] = "; ".join(errors)
    return [
        {
            "name": f"mine peak RSS, {COPIES}x vs 1x input",
            "value": one_8x.peak_rss_bytes / mib,
            "unit": "MiB",
            "baseline": one_1x.peak_rss_bytes / mib,
            "ratio": one_8x.peak_rss_bytes / one_1x.peak_rss_bytes,
            "goal": "<= 1.3",
        },
        throughput,
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
