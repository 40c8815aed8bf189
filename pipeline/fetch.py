"""The fetch stage of `magiclens mine`: the images that the input WARCs do not hold, from the web.

Safe, polite and robust, in that order:

- addresses: only public ones (pipeline/netguard.py) unless `--fetch-allow-private` names a
  range; the address checked is the address connected to; again on every redirect (at most
  `--fetch-max-redirects`);
- manners: robots.txt read once per origin and obeyed for the `magiclens` token and `*`
  (pipeline/robots.py), its Crawl-delay kept, `X-Robots-Tag: noai|noimageai`, TDMRep (the
  `tdm-reservation: 1` header and `/.well-known/tdmrep.json`), a User-Agent that names the project;
  at most `--fetch-per-host` requests in flight to a host, started at least
  `--fetch-host-interval` seconds (or the Crawl-delay) apart;
- limits: a connect and read timeout, a total deadline per image (a server that drips a byte a
  second is cut off), a byte cap on Content-Length and while reading, an HTML body sent as an image
  refused before decoding; retries with exponential backoff on 408, 429, 5xx and network errors,
  honouring Retry-After up to a cap; no retry on other 4xx.

How it runs: `FetchImages` keys the URLs by a hash of their host (a "host shard") and groups them,
so that all URLs of a host reach a single DoFn call, which owns that host's politeness state. The
DoFn hands URLs to a `FetchWorker`: an asyncio loop with one aiohttp session (connections reused)
runs the downloads in a thread while the DoFn's own thread normalises the finished ones
(pipeline/images.py) and writes them to the image cache. The shards of a bundle are fetched at
once; their results are emitted as they finish, the rest at the end of the bundle. At most
`PENDING_PER_SLOT * --fetch-concurrency` URLs are in progress per DoFn, which bounds its memory.

robots.txt (RFC 9309): a 4xx answer means no restrictions; a 5xx, 429 or network failure (after
the retries) means the whole site is off limits (`robots_unreachable`). A tdmrep.json that is
missing, unreadable or hidden by robots.txt reserves nothing.

Every input URL ends as exactly one output: `(url, NormalizedImage)`, or a `Reject` (stage "fetch",
element id the URL) counted as `magiclens:fetch.rejected.REASON`. Reasons:
  invalid_url, private_address, dns_error, tls_error, connection_error, timeout, too_large,
  too_many_redirects, bad_redirect, robots, robots_unreachable, crawl_delay, noai, tdm,
  http_NNN (http_404, ...; http_429 and http_5xx once the retries are spent), not_image,
  fetch_error (an unexpected failure; the detail names the exception), and normalisation's
  reasons (empty, svg, not_image, decompression_bomb, too_small, aspect_ratio, animated,
  truncated, decode_error).

Image cache (`--image-cache DIR`, local or any Beam filesystem such as gs://): every image that was
fetched and normalised is stored under a hash of its URL and the normalisation settings, so that a
rerun sends no request for it. Rejects are not cached: a rerun retries failures (most are transient
or may have changed, and opt-outs are read afresh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import hashlib
import ipaddress
import json
import logging
import queue
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from urllib.parse import urlsplit

import aiohttp
import apache_beam as beam
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue
from multidict import CIMultiDictProxy
from yarl import URL

from magiclens import __version__
from magiclens.pipeline.accounting import NAMESPACE, REJECTS_TAG, StageCounters
from magiclens.pipeline.images import ImageRejected, normalize_image
from magiclens.pipeline.netguard import (
    ForbiddenAddress,
    GuardedResolver,
    IPNetwork,
    address_refusal,
    parse_allowed_networks,
)
from magiclens.pipeline.records import NormalizedImage, Reject
from magiclens.pipeline.robots import (
    MAX_ROBOTS_BYTES,
    USER_AGENT_TOKEN,
    RobotsPolicy,
    TdmRule,
    parse_robots,
    parse_tdmrep,
    tdm_reserved,
    tdm_rule_for,
    x_robots_opt_out,
)

LOG = logging.getLogger("magiclens.fetch")

STAGE = "fetch"
FETCHED_TAG = "fetched"
PROJECT_URL = "https://github.com/magiclens/magiclens"  # where site owners learn what the crawler is
DEFAULT_USER_AGENT = f"magiclens/{__version__} (+{PROJECT_URL}; open MagicLens data engine image fetcher)"

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
HTML_CONTENT_TYPES = frozenset({"text/html", "application/xhtml+xml"})
IMAGE_REQUEST_HEADERS = {"Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8"}
SITE_FILE_HEADERS = {"Accept": "text/plain,application/json;q=0.9,*/*;q=0.5"}
# A failure to get robots.txt for these reasons would fail the image the same way: report it as is.
SITE_WIDE_REASONS = frozenset({"private_address", "dns_error", "tls_error", "invalid_url"})
# robots.txt and tdmrep.json results kept per DoFn instance (one entry per origin).
SITE_FILES_KEPT = 20_000
# Host states are forgotten once idle when there are more than this many.
HOST_STATES_KEPT = 20_000
# URLs handed to the event loop and not yet finished, per unit of --fetch-concurrency.
PENDING_PER_SLOT = 4
CACHE_IO_THREADS = 8
MAX_QUEUED_CACHE_WRITES = 64


@dataclass(frozen=True)
class FetchConfig:
    """Everything the fetch stage needs; built from the command line with `from_args`."""

    user_agent: str = DEFAULT_USER_AGENT
    per_host: int = 2
    concurrency: int = 128
    host_interval: float = 0.1  # seconds between the starts of two requests to one host
    timeout: float = 10.0  # connect, and each read
    deadline: float = 60.0  # one image's requests (redirects, retries) and retry waits together
    max_bytes: int = 20 * 1024 * 1024
    retries: int = 2
    backoff: float = 1.0  # first retry after this many seconds, then doubling
    max_retry_after: float = 30.0
    max_crawl_delay: float = 10.0
    max_redirects: int = 5
    allow_private: tuple[str, ...] = ()  # CIDRs
    image_cache: str | None = None
    shards: int = 1024
    # normalisation (the `mine` command's --max-side, --min-side, --max-aspect, --jpeg-quality)
    max_side: int = 512
    min_side: int = 150
    max_aspect: float = 3.0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        at_least_one = {
            "--fetch-per-host": self.per_host,
            "--fetch-concurrency": self.concurrency,
            "--fetch-max-bytes": self.max_bytes,
            "--fetch-shards": self.shards,
        }
        for flag, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        positive = {"--fetch-timeout": self.timeout, "--fetch-deadline": self.deadline}
        for flag, value in positive.items():
            if not value > 0:
                raise ValueError(f"{flag} must be more than 0 seconds, got {value}")
        not_negative = {
            "--fetch-retries": self.retries,
            "--fetch-max-redirects": self.max_redirects,
            "--fetch-host-interval": self.host_interval,
            "--fetch-backoff": self.backoff,
            "--fetch-max-retry-after": self.max_retry_after,
            "--fetch-max-crawl-delay": self.max_crawl_delay,
        }
        for flag, value in not_negative.items():
            if value < 0:
                raise ValueError(f"{flag} must not be negative, got {value}")
        if USER_AGENT_TOKEN not in self.user_agent.lower():
            raise ValueError(
                f"--user-agent {self.user_agent!r} must contain {USER_AGENT_TOKEN!r}, the token that "
                f"sites name in robots.txt; add your contact to it, e.g. "
                f"'magiclens/{__version__} (+https://your.site/crawler; you@your.site)'"
            )
        parse_allowed_networks(self.allow_private)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FetchConfig:
        """The config from `add_fetch_arguments`' options (and `mine`'s image options, if present)."""
        image_options = {
            name: getattr(args, name, getattr(cls, name))  # class attributes hold the field defaults
            for name in ("max_side", "min_side", "max_aspect", "jpeg_quality")
        }
        try:
            return cls(
                user_agent=args.user_agent,
                per_host=args.fetch_per_host,
                concurrency=args.fetch_concurrency,
                host_interval=args.fetch_host_interval,
                timeout=args.fetch_timeout,
                deadline=args.fetch_deadline,
                max_bytes=args.fetch_max_bytes,
                retries=args.fetch_retries,
                backoff=args.fetch_backoff,
                max_retry_after=args.fetch_max_retry_after,
                max_crawl_delay=args.fetch_max_crawl_delay,
                max_redirects=args.fetch_max_redirects,
                allow_private=tuple(args.fetch_allow_private or ()),
                image_cache=args.image_cache,
                shards=args.fetch_shards,
                **image_options,
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None

    def normalization_key(self) -> str:
        return (
            f"max_side={self.max_side};min_side={self.min_side};"
            f"max_aspect={self.max_aspect:g};jpeg_quality={self.jpeg_quality}"
        )


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """The fetch stage's options, as one argument group (`--no-fetch` belongs to the pipeline)."""
    defaults = FetchConfig()
    group = parser.add_argument_group(
        "fetching images from the web",
        "Images not found in the input are fetched over HTTP(S): only from public addresses, obeying "
        "robots.txt, X-Robots-Tag noai/noimageai and TDMRep, politely and within time and size caps.",
    )
    group.add_argument("--user-agent", default=defaults.user_agent, metavar="TEXT",
                       help="User-Agent sent with every request; must contain 'magiclens' (the robots.txt "
                            "token); put your contact URL or e-mail in it (default: %(default)r)")
    group.add_argument("--fetch-per-host", type=int, default=defaults.per_host, metavar="N",
                       help="at most N requests in flight to one host (default %(default)s)")
    group.add_argument("--fetch-host-interval", type=float, default=defaults.host_interval, metavar="SECONDS",
                       help="at least this long between the starts of two requests to one host; a longer "
                            "robots.txt Crawl-delay wins (default %(default)s)")
    group.add_argument("--fetch-concurrency", type=int, default=defaults.concurrency, metavar="N",
                       help="at most N requests in flight per worker process, all hosts together "
                            "(default %(default)s)")
    group.add_argument("--fetch-timeout", type=float, default=defaults.timeout, metavar="SECONDS",
                       help="give up connecting, or waiting for the next bytes, after this long "
                            "(default %(default)s)")
    group.add_argument("--fetch-deadline", type=float, default=defaults.deadline, metavar="SECONDS",
                       help="total time for one image: its requests (redirects and retries included) and "
                            "the waits between retries, not the time queued behind other requests to the "
                            "same host; a slow server is cut off when it passes (default %(default)s)")
    group.add_argument("--fetch-max-bytes", type=int, default=defaults.max_bytes, metavar="BYTES",
                       help="refuse an image larger than this, by its Content-Length or while reading it "
                            "(default %(default)s, 20 MiB)")
    group.add_argument("--fetch-retries", type=int, default=defaults.retries, metavar="N",
                       help="retry an image N times after HTTP 408, 429, 5xx or a network error; other "
                            "errors are not retried (default %(default)s)")
    group.add_argument("--fetch-backoff", type=float, default=defaults.backoff, metavar="SECONDS",
                       help="wait before the first retry, doubled for each next one, unless the server "
                            "sends Retry-After (default %(default)s)")
    group.add_argument("--fetch-max-retry-after", type=float, default=defaults.max_retry_after, metavar="SECONDS",
                       help="give up on an image whose server asks (Retry-After) to wait longer than this "
                            "(default %(default)s)")
    group.add_argument("--fetch-max-crawl-delay", type=float, default=defaults.max_crawl_delay, metavar="SECONDS",
                       help="skip the images of a site whose robots.txt Crawl-delay is longer than this "
                            "(reject reason crawl_delay; default %(default)s)")
    group.add_argument("--fetch-max-redirects", type=int, default=defaults.max_redirects, metavar="N",
                       help="follow at most N redirects per image, checking each target (default %(default)s)")
    group.add_argument("--fetch-allow-private", action="append", default=[], metavar="CIDR",
                       help="also allow this non-public address range, e.g. 127.0.0.1/32 for a local test "
                            "server; repeatable; by default only public addresses are fetched")
    group.add_argument("--fetch-shards", type=int, default=defaults.shards, metavar="N",
                       help="hosts are spread over N groups; each group is fetched by one worker "
                            "(default %(default)s)")
    group.add_argument("--image-cache", default=None, metavar="DIR",
                       help="keep fetched, normalised images in DIR (local or gs://...), keyed by URL, so "
                            "that a rerun sends no request for them; failures are not kept")


# ---------------------------------------------------------------------------------------------
# Plain functions: URLs, retries, headers, bodies


class FetchRefused(Exception):
    """An image (or site file) that will not be fetched: a reject reason and a detail for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Transient(FetchRefused):
    """A failure that a retry may cure: a timeout or a broken connection."""


def host_shard(url: str, shards: int) -> int:
    """The group of a URL's host: all URLs of one host share it, so one worker owns the host."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    return zlib.crc32(host.encode("utf-8", "replace")) % shards


def checked_url(url: str | URL, allowed: tuple[IPNetwork, ...], *, reason: str = "invalid_url") -> URL:
    """`url` as a yarl URL if we may fetch it; else FetchRefused(`reason` or private_address).

    A host that is an IP literal is checked here; host names are checked by the resolver.
    """
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        if parsed.scheme not in ("http", "https"):
            raise FetchRefused(reason, f"{str(url)[:200]!r}: only http and https URLs are fetched")
        port = parsed.port
    except (ValueError, TypeError) as error:
        raise FetchRefused(reason, f"unparsable URL {str(url)[:200]!r}: {error}") from None
    if not parsed.host or port is None:
        raise FetchRefused(reason, f"{str(url)[:200]!r} has no host")
    refusal = _literal_address_refusal(parsed.host, allowed)
    if refusal is not None:
        raise FetchRefused("private_address", f"{parsed.host}: {refusal}")
    return parsed.with_fragment(None)


def _literal_address_refusal(host: str, allowed: tuple[IPNetwork, ...]) -> str | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a host name: the resolver checks its addresses
    return address_refusal(address, allowed)


def redirect_target(base: URL, location: str | None, allowed: tuple[IPNetwork, ...]) -> URL:
    """Where a redirect from `base` leads, checked like any URL; FetchRefused if it may not be fetched."""
    if not location:
        raise FetchRefused("bad_redirect", f"redirect from {base} without a Location header")
    try:
        target = base.join(URL(location))
    except (ValueError, TypeError) as error:
        raise FetchRefused("bad_redirect", f"unparsable Location {location[:200]!r}: {error}") from None
    return checked_url(target, allowed, reason="bad_redirect")


def is_retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(
    attempt: int, *, backoff: float, retry_after: float | None, max_retry_after: float
) -> float | None:
    """Seconds to wait after failed attempt number `attempt` (0-based); None: do not retry.

    The server's Retry-After is honoured exactly; one longer than `max_retry_after` means giving up
    rather than coming back sooner than asked. Without it: exponential backoff.
    """
    if retry_after is not None:
        return retry_after if retry_after <= max_retry_after else None
    return backoff * 2**attempt


def image_header_refusal(headers: CIMultiDictProxy, max_bytes: int) -> tuple[str, str] | None:
    """Why an image response is refused from its headers alone (before its body is read), if it is."""
    robots_tags = headers.getall("X-Robots-Tag", [])
    opt_out = x_robots_opt_out(robots_tags)
    if opt_out is not None:
        return "noai", f"X-Robots-Tag: {'; '.join(robots_tags)[:200]} ({opt_out})"
    if tdm_reserved(headers.get("tdm-reservation")):
        policy = headers.get("tdm-policy")
        return "tdm", "tdm-reservation: 1 header" + (f" (tdm-policy {policy[:200]})" if policy else "")
    length = headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > max_bytes:
        return "too_large", f"Content-Length {length} is over the cap of {max_bytes} bytes (--fetch-max-bytes)"
    content_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if content_type in HTML_CONTENT_TYPES:
        return "not_image", f"Content-Type {content_type}"
    return None


def looks_like_html(body: bytes) -> bool:
    """Whether a body is an HTML document (an error or login page served under an image URL)."""
    head = body[:2048].lstrip(b"\xef\xbb\xbf \t\r\n\f").lower()
    return head.startswith(b"<") and any(
        tag in head for tag in (b"<!doctype html", b"<html", b"<head", b"<body")
    )


async def read_capped(stream: aiohttp.StreamReader, limit: int, *, truncate: bool) -> bytes:
    """Read a body of at most `limit` bytes: cut it there (`truncate`) or refuse it as too_large."""
    chunks = []
    size = 0
    async for chunk in stream.iter_any():
        if size + len(chunk) > limit:
            if truncate:
                chunks.append(chunk[: limit - size])
                break
            raise FetchRefused("too_large", f"body over the cap of {limit} bytes (--fetch-max-bytes)")
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# The asynchronous client


@dataclass(frozen=True)
class Downloaded:
    """The bytes of an image, in hand, not yet decoded."""

    url: str
    body: bytes


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: CIMultiDictProxy
    body: bytes
    url: URL


class _Host:
    """Politeness state of one host name: request slots and the earliest start of the next request."""

    def __init__(self, per_host: int, interval: float) -> None:
        self.slots = asyncio.Semaphore(per_host)
        self.interval = interval
        self.next_start = 0.0
        self.users = 0

    @contextlib.asynccontextmanager
    async def turn(self):
        """Wait for a free slot and for the pacing interval; hold the slot until the block ends."""
        self.users += 1
        try:
            async with self.slots:
                now = asyncio.get_running_loop().time()
                start = max(now, self.next_start)
                self.next_start = start + self.interval
                if start > now:
                    await asyncio.sleep(start - now)
                yield
        finally:
            self.users -= 1

    def back_off(self, until: float) -> None:
        """No request to this host starts before `until` (the server sent Retry-After)."""
        self.next_start = max(self.next_start, until)


class _TimeBudget:
    """The --fetch-deadline of one image: spent by its requests and by the waits between retries,
    not by queueing behind other requests to the same host (that is our politeness, not its delay)."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    def spend(self, seconds: float) -> None:
        self.left -= seconds


class _Lru(OrderedDict):
    """A dict that forgets its least recently used entries beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def recall(self, key):
        if key in self:
            self.move_to_end(key)
        return self.get(key)

    def remember(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class Fetcher:
    """HTTP with manners on one asyncio loop: `fetch(url)` -> `Downloaded` or `Reject`, never raises."""

    def __init__(
        self, config: FetchConfig, session: aiohttp.ClientSession, resolver: AbstractResolver
    ) -> None:
        self._config = config
        self._session = session
        self._resolver = resolver
        self._allowed = parse_allowed_networks(config.allow_private)
        self._slots = asyncio.Semaphore(config.concurrency)
        self._hosts: dict[str, _Host] = {}
        self._sweep_hosts_at = HOST_STATES_KEPT
        self._robots: _Lru = _Lru(SITE_FILES_KEPT)  # origin -> Task[RobotsPolicy | FetchRefused]
        self._tdm_rules: _Lru = _Lru(SITE_FILES_KEPT)  # origin -> Task[tuple[TdmRule, ...]]

    @classmethod
    async def open(cls, config: FetchConfig, inner_resolver: AbstractResolver | None = None) -> Fetcher:
        """A fetcher with its session; `inner_resolver` (tests) replaces the system resolver."""
        allowed = parse_allowed_networks(config.allow_private)
        resolver = GuardedResolver(inner_resolver or DefaultResolver(), allowed)
        connector = aiohttp.TCPConnector(
            resolver=resolver,
            limit=config.concurrency,
            limit_per_host=config.per_host,
            ttl_dns_cache=300,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=config.timeout, sock_read=config.timeout),
            headers={"User-Agent": config.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # never route through a proxy from the environment: it would skip the checks
        )
        return cls(config, session, resolver)

    async def close(self) -> None:
        await self._session.close()
        await self._resolver.close()

    async def fetch(self, url: str) -> Downloaded | Reject:
        try:
            target = checked_url(url, self._allowed)
            await self._check_manners(target)
            answer = await self._get(target, for_image=True)
            if not 200 <= answer.status < 300:
                raise FetchRefused(f"http_{answer.status}", f"HTTP {answer.status} from {answer.url}")
            if looks_like_html(answer.body):
                raise FetchRefused("not_image", f"an HTML document; first bytes {answer.body[:40]!r}")
            return Downloaded(url, answer.body)
        except FetchRefused as refused:
            return Reject(url, STAGE, refused.reason, refused.detail)
        except Exception as error:  # a bug or an exotic failure must not stop the run or lose the URL
            LOG.warning("unexpected failure fetching %s", url, exc_info=True)
            return Reject(url, STAGE, "fetch_error", f"{type(error).__name__}: {error}")

    # -- manners ---------------------------------------------------------------------------

    async def _check_manners(self, url: URL) -> None:
        """Refuse (FetchRefused) what robots.txt or tdmrep.json of the URL's origin keep from us."""
        policy = await self._site_file(self._robots, url.origin(), self._load_robots)
        if isinstance(policy, FetchRefused):
            raise FetchRefused(policy.reason, policy.detail)
        path = url.raw_path_qs
        if not policy.allows(path):
            raise FetchRefused(
                "robots", f"{url.origin()}/robots.txt disallows {path[:200]} for {USER_AGENT_TOKEN}"
            )
        rule = tdm_rule_for(await self._site_file(self._tdm_rules, url.origin(), self._load_tdm_rules), path)
        if rule is not None and rule.reserved:
            raise FetchRefused(
                "tdm",
                f"{url.origin()}/.well-known/tdmrep.json reserves {rule.location}"
                + (f" (tdm-policy {rule.policy[:200]})" if rule.policy else ""),
            )

    async def _site_file(self, cache: _Lru, origin: URL, load):
        """One load per origin, shared by all the images that wait for it."""
        key = str(origin)
        task = cache.recall(key)
        if task is None:
            task = asyncio.ensure_future(load(origin))
            cache.remember(key, task)
        return await asyncio.shield(task)

    async def _load_robots(self, origin: URL) -> RobotsPolicy | FetchRefused:
        robots_url = origin.with_path("/robots.txt")
        try:
            answer = await self._get(robots_url, for_image=False)
        except FetchRefused as refused:
            if refused.reason in SITE_WIDE_REASONS:
                return refused
            return FetchRefused(
                "robots_unreachable",
                f"{robots_url}: {refused.reason} ({refused.detail}); an unreachable robots.txt "
                "forbids the whole site (RFC 9309)",
            )
        if 200 <= answer.status < 300:
            policy = parse_robots(answer.body.decode("utf-8", "replace"))
        elif 400 <= answer.status < 500:
            policy = RobotsPolicy()  # no robots.txt: no restrictions (RFC 9309)
        else:
            return FetchRefused("robots_unreachable", f"{robots_url}: HTTP {answer.status}")
        if policy.crawl_delay is not None:
            if policy.crawl_delay > self._config.max_crawl_delay:
                return FetchRefused(
                    "crawl_delay",
                    f"{robots_url} asks for {policy.crawl_delay:g}s between requests, over "
                    f"--fetch-max-crawl-delay {self._config.max_crawl_delay:g}",
                )
            host = self._host(origin.host)
            host.interval = max(host.interval, policy.crawl_delay)
        return policy

    async def _load_tdm_rules(self, origin: URL) -> tuple[TdmRule, ...]:
        """The origin's tdmrep.json rules; none when it has no usable file (or robots.txt hides it)."""
        tdmrep_url = origin.with_path("/.well-known/tdmrep.json")
        policy = await self._site_file(self._robots, origin, self._load_robots)
        if isinstance(policy, FetchRefused) or not policy.allows(tdmrep_url.raw_path_qs):
            return ()
        try:
            answer = await self._get(tdmrep_url, for_image=False)
        except FetchRefused as refused:
            LOG.info("no TDMRep file read from %s: %s", tdmrep_url, refused)
            return ()
        if not 200 <= answer.status < 300:
            return ()
        try:
            return parse_tdmrep(answer.body.decode("utf-8", "replace"))
        except ValueError as error:
            LOG.info("ignoring %s: %s", tdmrep_url, error)
            return ()

    # -- requests ----------------------------------------------------------------------------

    def _host(self, name: str) -> _Host:
        host = self._hosts.get(name)
        if host is None:
            if len(self._hosts) >= self._sweep_hosts_at:
                self._forget_idle_hosts()
            host = self._hosts[name] = _Host(self._config.per_host, self._config.host_interval)
        return host

    def _forget_idle_hosts(self) -> None:
        """Drop hosts with no request waiting, no pacing pending and no Crawl-delay to remember."""
        now = asyncio.get_running_loop().time()
        for name, host in list(self._hosts.items()):
            if host.users == 0 and host.next_start <= now and host.interval <= self._config.host_interval:
                del self._hosts[name]
        self._sweep_hosts_at = max(HOST_STATES_KEPT, 2 * len(self._hosts))

    async def _get(self, url: URL, *, for_image: bool) -> _Answer:
        """GET `url` with retries, following redirects (each target checked anew; for an image, its
        site's manners too). Returns the final answer unless it is a retryable error; raises
        FetchRefused."""
        budget = _TimeBudget(self._config.deadline)
        for _ in range(self._config.max_redirects + 1):
            answer = await self._get_with_retries(url, for_image=for_image, budget=budget)
            if answer.status not in REDIRECT_STATUSES:
                return answer
            url = redirect_target(url, answer.headers.get("Location"), self._allowed)
            if for_image:
                await self._check_manners(url)
        raise FetchRefused(
            "too_many_redirects", f"more than {self._config.max_redirects} redirects; the last to {url}"
        )

    async def _get_with_retries(self, url: URL, *, for_image: bool, budget: _TimeBudget) -> _Answer:
        config = self._config
        loop = asyncio.get_running_loop()
        host = self._host(url.host)
        for attempt in range(config.retries + 1):
            retry_after = None
            async with host.turn(), self._slots:
                started = loop.time()
                try:
                    exchange = self._exchange(url, for_image=for_image)
                    answer = await asyncio.wait_for(exchange, timeout=budget.left)
                except _Transient as transient:
                    failure: FetchRefused = transient
                except asyncio.TimeoutError:
                    raise FetchRefused(
                        "timeout",
                        f"{url} did not answer in full within the {config.deadline:g}s deadline "
                        "(--fetch-deadline)",
                    ) from None
                else:
                    if not is_retryable_status(answer.status):
                        return answer
                    failure = FetchRefused(f"http_{answer.status}", f"HTTP {answer.status} from {url}")
                    retry_after = parse_retry_after(answer.headers.get("Retry-After"))
                finally:
                    budget.spend(loop.time() - started)
            if attempt == config.retries:
                raise FetchRefused(failure.reason, f"{failure.detail}; {attempt + 1} attempt(s)")
            delay = retry_delay(
                attempt, backoff=config.backoff, retry_after=retry_after, max_retry_after=config.max_retry_after
            )
            if delay is None:
                raise FetchRefused(
                    failure.reason,
                    f"{failure.detail}; Retry-After {retry_after:g}s is over --fetch-max-retry-after "
                    f"{config.max_retry_after:g}",
                )
            if delay >= budget.left:
                raise FetchRefused(
                    failure.reason, f"{failure.detail}; a retry in {delay:g}s would pass the deadline"
                )
            if retry_after is not None:
                host.back_off(loop.time() + delay)
            budget.spend(delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _exchange(self, url: URL, *, for_image: bool) -> _Answer:
        """One request and its response; the body is read only for a 2xx answer."""
        limit = self._config.max_bytes if for_image else MAX_ROBOTS_BYTES
        try:
            async with self._session.get(
                url,
                allow_redirects=False,
                headers=IMAGE_REQUEST_HEADERS if for_image else SITE_FILE_HEADERS,
            ) as response:
                if not 200 <= response.status < 300:
                    return _Answer(response.status, response.headers, b"", url)
                if for_image:
                    refusal = image_header_refusal(response.headers, limit)
                    if refusal is not None:
                        raise FetchRefused(*refusal)
                body = await read_capped(response.content, limit, truncate=not for_image)
                return _Answer(response.status, response.headers, body, url)
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.os_error, ForbiddenAddress):
                raise FetchRefused("private_address", str(error.os_error)) from None
            raise FetchRefused("dns_error", f"cannot resolve {url.host}: {error.os_error}") from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as error:
            raise FetchRefused("tls_error", f"{url.host}: {error}") from None
        except aiohttp.InvalidURL as error:
            raise FetchRefused("invalid_url", f"{error}") from None
        except aiohttp.ServerTimeoutError:
            raise _Transient(
                "timeout", f"{url.host} sent nothing for {self._config.timeout:g}s (--fetch-timeout)"
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            raise _Transient("connection_error", f"{url.host}: {type(error).__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------
# The image cache


CACHE_FORMAT = "magiclens-image-cache/1"


def encode_cache_entry(url: str, image: NormalizedImage) -> bytes:
    """One JSON header line (the URL and the image's metadata), then the JPEG bytes."""
    header = {"format": CACHE_FORMAT, "url": url, "jpeg_bytes": len(image.jpeg)}
    header.update({name: value for name, value in asdict(image).items() if name != "jpeg"})
    return json.dumps(header, sort_keys=True).encode() + b"\n" + image.jpeg


def decode_cache_entry(data: bytes, url: str) -> NormalizedImage | None:
    """The image of a cache entry for `url`; None if the entry is cut short or not for this URL."""
    header_line, newline, jpeg = data.partition(b"\n")
    try:
        header = json.loads(header_line)
    except ValueError:
        return None
    if not newline or not isinstance(header, dict):
        return None
    if header.get("format") != CACHE_FORMAT or header.get("url") != url:
        return None
    if header.get("jpeg_bytes") != len(jpeg):
        return None
    try:
        metadata = {field.name: header[field.name] for field in fields(NormalizedImage) if field.name != "jpeg"}
    except KeyError:
        return None
    return NormalizedImage(jpeg=jpeg, **metadata)


class ImageCache:
    """Normalised images under `root` (any Beam filesystem), one file per URL and settings."""

    def __init__(self, root: str, normalization_key: str) -> None:
        self.root = root
        self.normalization_key = normalization_key

    def path(self, url: str) -> str:
        digest = hashlib.sha256(f"{self.normalization_key}\n{url}".encode()).hexdigest()
        return FileSystems.join(self.root, digest[:2], f"{digest}.img")

    def get(self, url: str) -> NormalizedImage | None:
        path = self.path(url)
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            image = decode_cache_entry(handle.read(), url)
        if image is None:
            LOG.warning("image cache: ignoring %s (cut short or not for %s); fetching again", path, url)
        return image

    def put(self, url: str, image: NormalizedImage) -> None:
        path = self.path(url)
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(encode_cache_entry(url, image))


# ---------------------------------------------------------------------------------------------
# The blocking face: fetch, normalise, cache


@dataclass(frozen=True)
class Fetched:
    url: str
    image: NormalizedImage
    from_cache: bool


class FetchWorker:
    """Runs a `Fetcher` on an event loop in a thread; normalises and caches on the caller's thread.

    `fetch(urls, wait_for_all=...)` hands URLs to the loop and yields each one's outcome
    (`Fetched` or `Reject`) as it is ready, at most `PENDING_PER_SLOT * concurrency` URLs ahead.
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

    def fetch(self, urls: Iterable[str], *, wait_for_all: bool) -> Iterator[Fetched | Reject]:
        for url in urls:
            self._pending += 1
            asyncio.run_coroutine_threadsafe(self._fetch_one(url), self._loop)
            while self._pending >= self._max_pending:
                yield self._complete(self._done.get())
            yield from self._ready()
        yield from self._ready()
        if wait_for_all:
            while self._pending:
                yield self._complete(self._done.get())
            while self._cache_writes:
                self._finish_cache_write(self._cache_writes.popleft())

    def _ready(self) -> Iterator[Fetched | Reject]:
        while True:
            try:
                outcome = self._done.get_nowait()
            except queue.Empty:
                return
            yield self._complete(outcome)

    def _run_on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._fetcher.close()

    async def _fetch_one(self, url: str) -> None:
        """On the loop: the cached image, else the download; exactly one outcome per URL."""
        try:
            image = await self._cached(url)
            if image is not None:
                outcome = Fetched(url, image, from_cache=True)
            else:
                outcome = await self._fetcher.fetch(url)
        except Exception as error:  # without an outcome the caller would wait for this URL forever
            LOG.warning("unexpected failure fetching %s", url, exc_info=True)
            outcome = Reject(url, STAGE, "fetch_error", f"{type(error).__name__}: {error}")
        self._done.put(outcome)

    async def _cached(self, url: str) -> NormalizedImage | None:
        if self._cache is None:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._io, self._cache.get, url)
        except Exception as error:  # an unreadable cache costs a request, not the image
            LOG.warning("image cache: cannot read the entry for %s (%s); fetching it", url, error)
            return None

    def _complete(self, outcome: Downloaded | Fetched | Reject) -> Fetched | Reject:
        self._pending -= 1
        if not isinstance(outcome, Downloaded):
            return outcome
        config = self._config
        try:
            image = normalize_image(
                outcome.body,
                max_side=config.max_side,
                min_side=config.min_side,
                max_aspect=config.max_aspect,
                jpeg_quality=config.jpeg_quality,
            )
        except ImageRejected as rejected:
            return Reject(outcome.url, STAGE, rejected.reason, rejected.detail)
        if self._cache is not None:
            while len(self._cache_writes) >= MAX_QUEUED_CACHE_WRITES:
                self._finish_cache_write(self._cache_writes.popleft())
            self._cache_writes.append(self._io.submit(self._cache.put, outcome.url, image))
        return Fetched(outcome.url, image, from_cache=False)

    @staticmethod
    def _finish_cache_write(write: Future) -> None:
        try:
            write.result()
        except Exception as error:  # the image is still output; only a rerun would fetch it again
            LOG.warning("image cache: could not write an entry: %s", error)


# ---------------------------------------------------------------------------------------------
# Beam


class _FetchDoFn(beam.DoFn):
    """(host shard, URLs) -> (url, NormalizedImage), or a Reject on the `rejects` output."""

    def __init__(self, config: FetchConfig) -> None:
        self._config = config

    def setup(self) -> None:
        self._worker = FetchWorker(self._config)
        self._worker.start()
        self._counters = StageCounters(STAGE)
        self._cache_hits = Metrics.counter(NAMESPACE, f"{STAGE}.cache_hits")

    def process(self, element):
        _shard, urls = element
        yield from map(self._output, self._worker.fetch(self._received(urls), wait_for_all=False))

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

    def _received(self, urls: Iterable[str]) -> Iterator[str]:
        for url in urls:
            self._counters.received()
            yield url

    def _output(self, outcome: Fetched | Reject):
        if isinstance(outcome, Reject):
            return self._counters.reject(outcome.element_id, outcome.reason, outcome.detail)
        self._counters.kept()
        if outcome.from_cache:
            self._cache_hits.inc()
        return outcome.url, outcome.image


class FetchImages(beam.PTransform):
    """Unique image URLs -> `fetched`: (url, NormalizedImage), and `rejects`: Reject(url, "fetch", ...).

    Use as `result = urls | FetchImages(config)`, then `result.fetched` and `result[REJECTS_TAG]`.
    Exactly one of the two per input URL. Runs in the global window (batch).
    """

    def __init__(self, config: FetchConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, urls):
        shards = self._config.shards
        return (
            urls
            | "ByHostShard" >> beam.Map(lambda url: (host_shard(url, shards), url))
            | "GroupByHostShard" >> beam.GroupByKey()
            | "Fetch" >> beam.ParDo(_FetchDoFn(self._config)).with_outputs(REJECTS_TAG, main=FETCHED_TAG)
        )
