"""The Beam stage of fetching: `FetchImages`, its DoFn, and `FetchWorker`, the blocking face of the
asynchronous `Fetcher` that the DoFn drives.

`FetchImages` keys the URLs by a hash of their host (a "host shard") and groups them, so that all
URLs of a host reach a single DoFn call, which owns that host's politeness state. The DoFn hands
URLs to a `FetchWorker`: an asyncio loop with one aiohttp session (connections reused) runs the
downloads in a thread while the DoFn's own thread normalises the finished ones (pipeline/images/normalize.py)
and writes them to the image cache. The shards of a bundle are fetched at once; their results are
emitted as they finish, the rest at the end of the bundle. At most `PENDING_PER_SLOT *
--fetch-concurrency` URLs are in progress per DoFn, which bounds its memory.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import apache_beam as beam
from aiohttp.abc import AbstractResolver
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from magiclens.pipeline.accounting import NAMESPACE, REJECTS_TAG, StageCounters
from magiclens.pipeline.fetch.cache import ImageCache
from magiclens.pipeline.fetch.checks import STAGE
from magiclens.pipeline.fetch.client import Downloaded, Fetcher
from magiclens.pipeline.fetch.config import FetchConfig
from magiclens.pipeline.images import ImageRejected, normalize_with
from magiclens.pipeline.records import NormalizedImage, Reject

LOG = logging.getLogger("magiclens.fetch")

FETCHED_TAG = "fetched"
# URLs handed to the event loop and not yet finished, per unit of --fetch-concurrency.
PENDING_PER_SLOT = 4
CACHE_IO_THREADS = 8
MAX_QUEUED_CACHE_WRITES = 64


# What FetchImages and FetchWorker take: one image URL, or the candidate URLs of one image, largest first.
ImageElement = str | tuple[str, ...]


def candidate_urls(element: ImageElement) -> tuple[str, ...]:
    return (element,) if isinstance(element, str) else tuple(element)


def element_id(element: ImageElement) -> str:
    """The id of an element's reject: its URL, or its first (largest) candidate."""
    candidates = candidate_urls(element)
    return candidates[0] if candidates else ""


def host_shard(url: str, shards: int) -> int:
    """The group of a URL's host: all URLs of one host share it, so one worker owns the host."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    return zlib.crc32(host.encode("utf-8", "replace")) % shards


@dataclass(frozen=True)
class Fetched:
    element: ImageElement
    url: str  # the URL whose image this is: the element itself, or the candidate used
    image: NormalizedImage
    from_cache: bool


class FetchWorker:
    """Runs a `Fetcher` on an event loop in a thread; normalises and caches on the caller's thread.

    `fetch(elements, wait_for_all=...)` hands elements (URLs, or tuples of an image's candidate URLs,
    largest first) to the loop and yields each one's outcome (`Fetched` or `Reject`) as it is ready, at
    most `PENDING_PER_SLOT * concurrency` elements ahead.
    """

    def __init__(self, config: FetchConfig, *, inner_resolver: AbstractResolver | None = None) -> None:
        self._config = config
        self._inner_resolver = inner_resolver
        self._cache = ImageCache(config.image_cache, config.normalization_key()) if config.image_cache else None
        self._max_pending = PENDING_PER_SLOT * config.concurrency
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="magiclens-fetch", daemon=True)
        self._thread.start()
        self._fetcher = self._run_on_loop(Fetcher.open(self._config, self._inner_resolver))
        self._io = ThreadPoolExecutor(CACHE_IO_THREADS, thread_name_prefix="magiclens-image-cache")
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._cache_writes: deque[Future] = deque()

    def stop(self) -> None:
        if self._loop is None:
            return
        self._run_on_loop(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = None
        self._io.shutdown(wait=True)

    def fetch(self, elements: Iterable[ImageElement], *, wait_for_all: bool) -> Iterator[Fetched | Reject]:
        for element in elements:
            self._pending += 1
            asyncio.run_coroutine_threadsafe(self._fetch_one(element), self._loop)
            while self._pending >= self._max_pending:
                yield self._complete(*self._done.get())
            yield from self._ready()
        yield from self._ready()
        if wait_for_all:
            while self._pending:
                yield self._complete(*self._done.get())
            while self._cache_writes:
                self._finish_cache_write(self._cache_writes.popleft())

    def _ready(self) -> Iterator[Fetched | Reject]:
        while True:
            try:
                element, outcome = self._done.get_nowait()
            except queue.Empty:
                return
            yield self._complete(element, outcome)

    def _run_on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._fetcher.close()

    async def _fetch_one(self, element: ImageElement) -> None:
        """On the loop: a cached image of the element, else the download; exactly one outcome per element."""
        try:
            candidates = candidate_urls(element)
            outcome = await self._cached(element, candidates)
            if outcome is None:
                outcome = await self._fetcher.fetch_first(candidates)
        except Exception as error:  # without an outcome the caller would wait for this element forever
            LOG.warning("unexpected failure fetching %s", element, exc_info=True)
            outcome = Reject(element_id(element), STAGE, "fetch_error", f"{type(error).__name__}: {error}")
        self._done.put((element, outcome))

    async def _cached(self, element: ImageElement, candidates: tuple[str, ...]) -> Fetched | None:
        """The first candidate in the cache: a rerun asks nothing of the candidates that failed before it."""
        if self._cache is None:
            return None
        for url in candidates:
            try:
                image = await asyncio.get_running_loop().run_in_executor(self._io, self._cache.get, url)
            except Exception as error:  # an unreadable cache costs a request, not the image
                LOG.warning("image cache: cannot read the entry for %s (%s); fetching it", url, error)
                return None
            if image is not None:
                return Fetched(element, url, image, from_cache=True)
        return None

    def _complete(self, element: ImageElement, outcome: Downloaded | Fetched | Reject) -> Fetched | Reject:
        self._pending -= 1
        if not isinstance(outcome, Downloaded):
            return outcome
        config = self._config
        try:
            image = normalize_with(outcome.body, config.image)
        except ImageRejected as rejected:
            detail = rejected.detail if outcome.url == element else f"{outcome.url[:200]}: {rejected.detail}"
            return Reject(element_id(element), STAGE, rejected.reason, detail)
        if self._cache is not None:
            while len(self._cache_writes) >= MAX_QUEUED_CACHE_WRITES:
                self._finish_cache_write(self._cache_writes.popleft())
            self._cache_writes.append(self._io.submit(self._cache.put, outcome.url, image))
        return Fetched(element, outcome.url, image, from_cache=False)

    @staticmethod
    def _finish_cache_write(write: Future) -> None:
        try:
            write.result()
        except Exception as error:  # the image is still output; only a rerun would fetch it again
            LOG.warning("image cache: could not write an entry: %s", error)


# ---------------------------------------------------------------------------------------------
# Beam


class _FetchDoFn(beam.DoFn):
    """(host shard, elements) -> the outputs of FetchImages, or a Reject on the `rejects` output."""

    def __init__(self, config: FetchConfig) -> None:
        self._config = config

    def setup(self) -> None:
        self._worker = FetchWorker(self._config)
        self._worker.start()
        self._counters = StageCounters(STAGE)
        self._cache_hits = Metrics.counter(NAMESPACE, f"{STAGE}.cache_hits")

    def process(self, element):
        _shard, images = element
        yield from map(self._output, self._worker.fetch(self._received(images), wait_for_all=False))

    def finish_bundle(self):
        window = GlobalWindow()
        for outcome in self._worker.fetch((), wait_for_all=True):
            output = self._output(outcome)
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(
                    output.tag, WindowedValue(output.value, window.max_timestamp(), (window,))
                )
            else:
                yield WindowedValue(output, window.max_timestamp(), (window,))

    def teardown(self) -> None:
        self._worker.stop()

    def _received(self, elements: Iterable[ImageElement]) -> Iterator[ImageElement]:
        for element in elements:
            self._counters.received()
            yield element

    def _output(self, outcome: Fetched | Reject):
        if isinstance(outcome, Reject):
            return self._counters.reject(outcome.element_id, outcome.reason, outcome.detail)
        self._counters.kept()
        if outcome.from_cache:
            self._cache_hits.inc()
        if isinstance(outcome.element, str):
            return outcome.element, outcome.image
        return outcome.element, (outcome.url, outcome.image)


class FetchImages(beam.PTransform):
    """Unique image elements -> `fetched` and `rejects`; exactly one of the two per element.

    An element is an image URL, or a tuple of one image's candidate URLs, largest first (srcset,
    <picture> sources, src, lazy attributes), tried in that order (`Fetcher.fetch_first`):
      URL        -> fetched (url, NormalizedImage)
      candidates -> fetched (candidates, (url_used, NormalizedImage))
      either     -> rejects Reject(URL or first candidate, "fetch", reason, detail)
    Returns {FETCHED_TAG: fetched, REJECTS_TAG: rejects}.
    Runs in the global window (batch).
    """

    def __init__(self, config: FetchConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, elements):
        shards = self._config.shards
        results = (
            elements
            | "ByHostShard" >> beam.Map(lambda element: (host_shard(element_id(element), shards), element))
            | "GroupByHostShard" >> beam.GroupByKey()
            | "Fetch" >> beam.ParDo(_FetchDoFn(self._config)).with_outputs(REJECTS_TAG, main=FETCHED_TAG)
        )
        return {FETCHED_TAG: results[FETCHED_TAG], REJECTS_TAG: results[REJECTS_TAG]}
