"""Configuration of the fetch stage: `FetchConfig` (every limit and manner, checked) and its
command-line options (`add_fetch_arguments`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from magiclens.pipeline.images import DEFAULT_IMAGE, ImageConfig
from magiclens.pipeline.retry import RetryPolicy
from magiclens.pipeline.robots import USER_AGENT_TOKEN
from magiclens.version import __version__

if TYPE_CHECKING:
    from magiclens.pipeline.netguard import IPNetwork

LOG = logging.getLogger("magiclens.fetch")

PROJECT_URL = "https://github.com/magiclens/magiclens"  # where site owners learn what the crawler is
DEFAULT_USER_AGENT = f"magiclens/{__version__} (+{PROJECT_URL}; open MagicLens data engine image fetcher)"


def versions_fully_allowed(networks: tuple[IPNetwork, ...]) -> list[int]:
    """The IP versions (4, 6) whose every address the given ranges cover together (0.0.0.0/0, or
    0.0.0.0/1 with 128.0.0.0/1, ...)."""
    versions = []
    for version in (4, 6):
        ranges = [network for network in networks if network.version == version]
        if any(network.prefixlen == 0 for network in ipaddress.collapse_addresses(ranges)):
            versions.append(version)
    return versions


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
    image: ImageConfig = DEFAULT_IMAGE  # normalisation: `mine`'s --max-side, --min-side, --max-aspect, --jpeg-quality

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
        if not self.allow_private:
            return
        # netguard imports aiohttp: only for ranges to check, not for the defaults `mine --help` shows
        from magiclens.pipeline.netguard import parse_allowed_networks

        versions = versions_fully_allowed(parse_allowed_networks(self.allow_private))
        if versions:
            LOG.warning(
                "--fetch-allow-private %s allows every %s address: the fetcher may then reach loopback, "
                "your private networks and the cloud metadata server (169.254.169.254). Name only the ranges "
                "you need, e.g. 127.0.0.1/32 for a local test server.",
                " ".join(self.allow_private), " and every ".join(f"IPv{version}" for version in versions),
            )

    def retry_policy(self) -> RetryPolicy:
        # The longest wait a server may ask of us is also the longest we impose between retries.
        return RetryPolicy(
            retries=self.retries,
            backoff=self.backoff,
            max_backoff=self.max_retry_after,
            max_retry_after=self.max_retry_after,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, image: ImageConfig = DEFAULT_IMAGE) -> FetchConfig:
        """The config from `add_fetch_arguments`' options, normalising images as `image` says."""
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
                image=image,
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None

    def normalization_key(self) -> str:
        image = self.image
        return (
            f"max_side={image.max_side};min_side={image.min_side};"
            f"max_aspect={image.max_aspect:g};jpeg_quality={image.jpeg_quality}"
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
                       help="retry an image N times after HTTP 408, 409, 425, 429, most 5xx, a timeout or a "
                            "network error; other errors are not retried (default %(default)s)")
    group.add_argument("--fetch-backoff", type=float, default=defaults.backoff, metavar="SECONDS",
                       help="wait about this long before the first retry (a random half of it to all of it), "
                            "doubled for each next one, unless the server sends Retry-After "
                            "(default %(default)s)")
    group.add_argument("--fetch-max-retry-after", type=float, default=defaults.max_retry_after, metavar="SECONDS",
                       help="give up on an image whose server asks (Retry-After) to wait longer than this; "
                            "also the longest wait between our own retries (default %(default)s)")
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


