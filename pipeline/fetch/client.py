"""The HTTP client of the fetch stage: `Fetcher`, safe and polite downloads on one asyncio loop.

- addresses: only public ones (pipeline/netguard.py) unless `--fetch-allow-private` names a range;
  the address checked is the address connected to; again on every redirect (at most
  `--fetch-max-redirects`); a URL that carries a user or password is never requested;
- manners: robots.txt read once per origin and obeyed for the `magiclens` token and `*`
  (pipeline/robots.py), its Crawl-delay kept, `X-Robots-Tag: noai|noimageai`, TDMRep (the
  `tdm-reservation: 1` header and `/.well-known/tdmrep.json`), a User-Agent that names the project;
  at most `--fetch-per-host` requests in flight to a host, started at least `--fetch-host-interval`
  seconds (or the Crawl-delay) apart;
- limits: a connect and read timeout, a total deadline per image (a server that drips a byte a
  second is cut off), a byte cap on Content-Length and while reading, an HTML body sent as an image
  refused before decoding; retries by the project's one policy (pipeline/retry.py).

robots.txt (RFC 9309): a 4xx answer means no restrictions; a 5xx, 429 or network failure (after
the retries) means the whole site is off limits (`robots_unreachable`). A tdmrep.json that is
missing, unreadable or hidden by robots.txt reserves nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDictProxy
from yarl import URL

from magiclens.pipeline.fetch.checks import (
    STAGE,
    FetchRefused,
    TransientFailure,
    checked_url,
    image_header_refusal,
    looks_like_html,
    read_capped,
    redirect_target,
)
from magiclens.pipeline.fetch.config import FetchConfig
from magiclens.pipeline.fetch.hosts import HostPacing, LruDict, TimeBudget
from magiclens.pipeline.netguard import ForbiddenAddress, GuardedResolver, parse_allowed_networks
from magiclens.pipeline.records import Reject
from magiclens.pipeline.retry import is_retryable_status, parse_retry_after
from magiclens.pipeline.robots import (
    MAX_ROBOTS_BYTES,
    USER_AGENT_TOKEN,
    RobotsPolicy,
    TdmRule,
    parse_robots,
    parse_tdmrep,
    tdm_rule_for,
)

LOG = logging.getLogger("magiclens.fetch")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
IMAGE_REQUEST_HEADERS = {"Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8"}
SITE_FILE_HEADERS = {"Accept": "text/plain,application/json;q=0.9,*/*;q=0.5"}
# A failure to get robots.txt for these reasons would fail the image the same way: report it as is.
SITE_WIDE_REASONS = frozenset({"private_address", "dns_error", "tls_error", "invalid_url", "credentials_in_url"})
# Opt-outs that cover the image whatever its URL: no other candidate of it is tried.
IMAGE_OPT_OUTS = frozenset({"noai", "tdm"})
# robots.txt and tdmrep.json results kept per Fetcher (one entry per origin).
SITE_FILES_KEPT = 20_000
# Host states are forgotten once idle when there are more than this many.
HOST_STATES_KEPT = 20_000


@dataclass(frozen=True)
class Downloaded:
    """The bytes of an image, in hand, not yet decoded."""

    url: str  # the URL that gave them
    body: bytes


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy
    body: bytes
    url: URL


class Fetcher:
    """HTTP with manners on one asyncio loop: `fetch(url)` -> `Downloaded` or `Reject`, never raises."""

    def __init__(
        self, config: FetchConfig, session: aiohttp.ClientSession, resolver: AbstractResolver
    ) -> None:
        self._config = config
        self._session = session
        self._resolver = resolver
        self._allowed = parse_allowed_networks(config.allow_private)
        self._retry_policy = config.retry_policy()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._hosts: dict[str, HostPacing] = {}
        self._sweep_hosts_at = HOST_STATES_KEPT
        self._robots: LruDict = LruDict(SITE_FILES_KEPT)  # origin -> Task[RobotsPolicy | FetchRefused]
        self._tdm_rules: LruDict = LruDict(SITE_FILES_KEPT)  # origin -> Task[tuple[TdmRule, ...]]

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

    async def fetch_first(self, candidates: tuple[str, ...]) -> Downloaded | Reject:
        """The first of an image's candidate URLs (largest first) that downloads, as `Downloaded` whose
        `url` is the candidate used; else the last failure's Reject (element id: the first candidate),
        its detail naming every candidate's reason. An opt-out of the image itself (noai, tdm) ends
        the search: it speaks for the picture, not for one of its URLs."""
        if not candidates:
            return Reject("", STAGE, "invalid_url", "an image element without any candidate URL")
        failures: list[Reject] = []
        for url in candidates:
            outcome = await self.fetch(url)
            if isinstance(outcome, Downloaded):
                return outcome
            failures.append(outcome)
            if outcome.reason in IMAGE_OPT_OUTS:
                break
        if len(candidates) == 1:
            return failures[0]
        tried = "; ".join(
            f"{failure.element_id[:200]}: {failure.reason} ({failure.detail[:200]})" for failure in failures
        )
        skipped = len(candidates) - len(failures)
        if skipped:
            tried += f"; {skipped} more not tried after the opt-out"
        return Reject(candidates[0], STAGE, failures[-1].reason, f"{len(candidates)} candidates: {tried}")

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

    async def _site_file(self, cache: LruDict, origin: URL, load):
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

    def _host(self, name: str) -> HostPacing:
        host = self._hosts.get(name)
        if host is None:
            if len(self._hosts) >= self._sweep_hosts_at:
                self._forget_idle_hosts()
            host = self._hosts[name] = HostPacing(self._config.per_host, self._config.host_interval)
        return host

    def _forget_idle_hosts(self) -> None:
        """Drop hosts with no request waiting, no pacing pending and no Crawl-delay to remember."""
        now = asyncio.get_running_loop().time()
        for name, host in list(self._hosts.items()):
            if host.users == 0 and host.next_start <= now and host.interval <= self._config.host_interval:
                del self._hosts[name]
        self._sweep_hosts_at = max(HOST_STATES_KEPT, 2 * len(self._hosts))

    async def _get(self, url: URL, *, for_image: bool) -> Answer:
        """GET `url` with retries, following redirects (each target checked anew; for an image, its
        site's manners too). Returns the final answer unless it is a retryable error; raises
        FetchRefused."""
        budget = TimeBudget(self._config.deadline)
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

    async def _get_with_retries(self, url: URL, *, for_image: bool, budget: TimeBudget) -> Answer:
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
                except TransientFailure as transient:
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
            delay = self._retry_policy.delay(attempt, retry_after)
            if delay is None:  # the attempts left were checked above: the server asks for too long a wait
                raise FetchRefused(
                    failure.reason,
                    f"{failure.detail}; Retry-After {retry_after:g}s is over --fetch-max-retry-after "
                    f"{config.max_retry_after:g}",
                )
            if delay >= budget.left:
                raise FetchRefused(
                    failure.reason, f"{failure.detail}; a retry in {delay:.3g}s would pass the deadline"
                )
            if retry_after is not None:
                host.back_off(loop.time() + delay)
            budget.spend(delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _exchange(self, url: URL, *, for_image: bool) -> Answer:
        """One request and its response; the body is read only for a 2xx answer."""
        limit = self._config.max_bytes if for_image else MAX_ROBOTS_BYTES
        try:
            async with self._session.get(
                url,
                allow_redirects=False,
                headers=IMAGE_REQUEST_HEADERS if for_image else SITE_FILE_HEADERS,
            ) as response:
                if not 200 <= response.status < 300:
                    return Answer(response.status, response.headers, b"", url)
                if for_image:
                    refusal = image_header_refusal(response.headers, limit)
                    if refusal is not None:
                        raise FetchRefused(*refusal)
                body = await read_capped(response.content, limit, truncate=not for_image)
                return Answer(response.status, response.headers, body, url)
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.os_error, ForbiddenAddress):
                raise FetchRefused("private_address", str(error.os_error)) from None
            raise FetchRefused("dns_error", f"cannot resolve {url.host}: {error.os_error}") from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as error:
            raise FetchRefused("tls_error", f"{url.host}: {error}") from None
        except aiohttp.InvalidURL as error:
            raise FetchRefused("invalid_url", f"{error}") from None
        except aiohttp.ServerTimeoutError:
            raise TransientFailure(
                "timeout", f"{url.host} sent nothing for {self._config.timeout:g}s (--fetch-timeout)"
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            raise TransientFailure("connection_error", f"{url.host}: {type(error).__name__}: {error}") from None


