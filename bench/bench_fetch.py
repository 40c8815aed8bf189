"""Fetch stage benchmark: a local web of 64 slow hosts, the fetcher's manners on.

A server process listens on 64 loopback addresses (127.0.0.10 ... 127.0.0.73; Linux routes all of
127.0.0.0/8 to loopback) and answers every request after 50 ms with one of the real JPEGs of
../shared/data/images (robots.txt allows everything; tdmrep.json is absent). The fetcher runs with
its defaults (2 requests in flight per host, 0.1 s between request starts to a host, robots.txt and
tdmrep.json read per host, address checks), only 127.0.0.0/24 allowed.

Rows:
- fetch_download: images/s downloaded (bytes in hand) by the polite fetcher; goal >= 400. Baseline:
  a bare aiohttp client fetching the same URLs with the same per-host limit and no manners.
- fetch_stage: images/s through the whole stage (download, then decode/resize/hash/encode) in
  `FetchWorker`, the code the Beam DoFn runs, against normalising the same bytes from memory on the
  same cores; goal >= 0.8, i.e. waiting on the network costs almost nothing.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from magiclens.pipeline.fetch import FetchConfig, Fetcher, FetchWorker
from magiclens.pipeline.images import ImageRejected, normalize_image
from magiclens.pipeline.records import Reject

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT.parent / "shared" / "data" / "images"
HOSTS = [f"127.0.0.{n}" for n in range(10, 74)]
ANSWER_DELAY = 0.05
ROUNDS = 3
DOWNLOADS_PER_HOST = 16
STAGE_IMAGES_PER_HOST = 2

# The "network": a bare asyncio HTTP/1.1 server (keep-alive, no framework) so that on 2 cores most of
# the CPU goes to the client being measured. Every answer is sent 50 ms after its request arrived.
SERVER = r"""
import asyncio, json, sys
from pathlib import Path

hosts, delay, image_paths = json.loads(sys.argv[1])

def response(status, content_type, body):
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n")
    return head.encode() + body

images = [response("200 OK", "image/jpeg", Path(p).read_bytes()) for p in image_paths]
robots = response("200 OK", "text/plain", b"User-agent: *\nAllow: /\n")
missing = response("404 Not Found", "text/plain", b"not found")

def answer_for(path):
    if path == "/robots.txt":
        return robots
    if path.startswith("/img/"):
        return images[int(path.rsplit("/", 1)[1].split(".")[0]) % len(images)]
    return missing

class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        loop = asyncio.get_running_loop()
        while b"\r\n\r\n" in self.buffer:
            request, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = request.split(b" ", 2)[1].decode()
            loop.call_later(delay, self.send, answer_for(path))

    def send(self, data):
        if not self.transport.is_closing():
            self.transport.write(data)

async def main():
    loop = asyncio.get_running_loop()
    ports = {}
    servers = []
    for host in hosts:
        server = await loop.create_server(Http, host, 0, backlog=1024)
        servers.append(server)
        ports[host] = server.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes stdin

asyncio.run(main())
"""


def bench_images() -> list[Path]:
    """The real JPEG photos of the shared data: web-like sizes from 3 KB to 570 KB."""
    paths = sorted(p for p in IMAGES.rglob("*.jpg") if "edgecases" not in p.parts)
    if len(paths) < 20:
        raise SystemExit(f"expected the JPEG photos of {IMAGES}; found {len(paths)}")
    return paths


def start_server(images: list[Path]) -> tuple[subprocess.Popen, dict[str, int]]:
    argument = json.dumps([HOSTS, ANSWER_DELAY, [str(p) for p in images]])
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, argument], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = server.stdout.readline()
    if not line:
        server.kill()
        raise SystemExit("the benchmark's local server did not start (are 127.0.0.10-73 bindable?)")
    return server, json.loads(line)


def urls(ports: dict[str, int], per_host: int, first_index: int) -> list[str]:
    """URLs spread over the hosts, interleaved as a page crawl would meet them."""
    return [
        f"http://{host}:{ports[host]}/img/{first_index + n * len(HOSTS) + h}.jpg"
        for n in range(per_host)
        for h, host in enumerate(HOSTS)
    ]


async def polite_downloads(config: FetchConfig, targets: list[str]) -> tuple[int, int]:
    """(images downloaded, bytes) through the fetcher, with its manners."""
    fetcher = await Fetcher.open(config)

    async def one(url: str) -> int:
        outcome = await fetcher.fetch(url)
        if isinstance(outcome, Reject):
            raise SystemExit(f"benchmark download failed: {outcome}")
        return len(outcome.body)

    try:
        sizes = await asyncio.gather(*(one(url) for url in targets))
    finally:
        await fetcher.close()
    return len(sizes), sum(sizes)


async def bare_downloads(config: FetchConfig, targets: list[str]) -> tuple[int, int]:
    """(images downloaded, bytes) by a plain aiohttp client with the same per-host limit, no manners."""
    connector = aiohttp.TCPConnector(limit=config.concurrency, limit_per_host=config.per_host)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(url: str) -> int:
            async with session.get(url) as response:
                return len(await response.read())

        sizes = await asyncio.gather(*(one(url) for url in targets))
    return len(sizes), sum(sizes)


CPU_SECONDS: dict[str, float] = {}  # this process's CPU time per measurement, for the printed summary


def timed(function, *args) -> tuple[float, object]:
    started, cpu_started = time.perf_counter(), time.process_time()
    result = function(*args)
    name = getattr(function, "__name__", "")
    CPU_SECONDS[name] = CPU_SECONDS.get(name, 0.0) + time.process_time() - cpu_started
    return time.perf_counter() - started, result


def normalize_all(bodies: list[bytes]) -> int:
    kept = 0
    for body in bodies:
        try:
            normalize_image(body)
            kept += 1
        except ImageRejected:
            pass
    return kept


def run_stage(config: FetchConfig, targets: list[str]) -> int:
    worker = FetchWorker(config)
    worker.start()
    try:
        return sum(1 for _ in worker.fetch(targets, wait_for_all=True))
    finally:
        worker.stop()


def run() -> list[dict]:
    images = bench_images()
    server, ports = start_server(images)
    config = FetchConfig(allow_private=("127.0.0.0/24",))
    polite_rates, bare_rates, stage_rates, normalize_rates = [], [], [], []
    downloaded_bytes = 0
    try:
        # Each measurement is taken in several rounds, each right next to its baseline and on fresh URLs;
        # the medians are reported, so that a burst of load from elsewhere on the machine does not decide.
        first_url = 0
        for _ in range(ROUNDS):
            downloads = urls(ports, DOWNLOADS_PER_HOST, first_url)
            stage_urls = urls(ports, STAGE_IMAGES_PER_HOST, first_url + len(downloads))
            first_url += len(downloads) + len(stage_urls)

            seconds, (count, size) = timed(asyncio.run, polite_downloads(config, downloads))
            polite_rates.append(count / seconds)
            downloaded_bytes += size
            seconds, (count, _) = timed(asyncio.run, bare_downloads(config, downloads))
            bare_rates.append(count / seconds)

            bodies = [images[image_index(url) % len(images)].read_bytes() for url in stage_urls]
            seconds, _ = timed(normalize_all, bodies)
            normalize_rates.append(len(bodies) / seconds)
            seconds, outcomes = timed(run_stage, config, stage_urls)
            if outcomes != len(stage_urls):
                raise SystemExit(f"the fetch stage returned {outcomes} outcomes for {len(stage_urls)} URLs")
            stage_rates.append(len(stage_urls) / seconds)
    finally:
        server.stdin.close()
        server.wait(timeout=30)

    def rates(values: list[float]) -> str:
        return "/".join(f"{value:.0f}" for value in values)

    print(
        f"fetch: {ROUNDS} rounds of {DOWNLOADS_PER_HOST * len(HOSTS)} downloads ({downloaded_bytes / 1e6:.0f} MB "
        f"in all) from {len(HOSTS)} hosts answering after {ANSWER_DELAY * 1000:.0f} ms: polite "
        f"{rates(polite_rates)}/s, bare {rates(bare_rates)}/s; {STAGE_IMAGES_PER_HOST * len(HOSTS)} images "
        f"through the stage {rates(stage_rates)}/s, normalise only {rates(normalize_rates)}/s; CPU seconds "
        f"of this process: stage {CPU_SECONDS['run_stage']:.1f}, normalise only {CPU_SECONDS['normalize_all']:.1f}",
        file=sys.stderr,
    )
    stage_ratio = statistics.median(stage / normalize for stage, normalize in zip(stage_rates, normalize_rates))
    return [
        {"name": "fetch_download", "value": statistics.median(polite_rates), "unit": "images/s",
         "baseline": statistics.median(bare_rates),
         "ratio": statistics.median(polite / bare for polite, bare in zip(polite_rates, bare_rates)),
         "goal": "value >= 400 images/s (64 hosts, 50 ms answers, 2 per host)"},
        {"name": "fetch_stage", "value": statistics.median(stage_rates), "unit": "images/s",
         "baseline": statistics.median(normalize_rates), "ratio": stage_ratio,
         "goal": "ratio >= 0.8 (download + normalise vs normalise only)"},
    ]


def image_index(url: str) -> int:
    return int(url.rsplit("/", 1)[1].split(".")[0])


if __name__ == "__main__":
    for row in run():
        print(row)
