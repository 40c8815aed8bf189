"""The fetch stage of `magiclens mine`: the images that the input WARCs do not hold, from the web.

Safe, polite and robust, in that order. The package, by role:

  config.py   FetchConfig and the command-line options (add_fetch_arguments)
  checks.py   what may be fetched and what an answer may be: URL, redirect and header checks
  hosts.py    per-host politeness (slots, pacing), the per-image time budget
  client.py   Fetcher: the asynchronous HTTP client with its manners, limits and retries
  cache.py    ImageCache: fetched, normalised images kept by URL (`--image-cache`)
  stage.py    FetchWorker (the client driven from a blocking thread) and the Beam transform FetchImages

Every input element ends as exactly one output: `(element, NormalizedImage)`, or a `Reject` (stage
"fetch", element id the URL) counted as `magiclens:fetch.rejected.REASON`. Reasons:
  invalid_url, credentials_in_url, private_address, dns_error, tls_error, connection_error, timeout,
  too_large, too_many_redirects, bad_redirect, robots, robots_unreachable, crawl_delay, noai, tdm,
  http_NNN (http_404, ...; the retried statuses once the retries are spent), not_image, fetch_error
  (an unexpected failure; the detail names the exception), and normalisation's reasons (empty, svg,
  not_image, decompression_bomb, too_small, aspect_ratio, animated, truncated, decode_error).
"""

import importlib

from magiclens.pipeline.fetch.config import DEFAULT_USER_AGENT, FetchConfig, add_fetch_arguments

# The Beam code and the HTTP client (aiohttp) load on first use, so that reading the options
# (config.py) stays quick: `magiclens mine --help` imports neither.
_LAZY = {
    "STAGE": "checks", "FetchRefused": "checks", "checked_url": "checks", "image_header_refusal": "checks",
    "looks_like_html": "checks", "redirect_target": "checks",
    "ImageCache": "cache", "decode_cache_entry": "cache", "encode_cache_entry": "cache",
    "Downloaded": "client", "Fetcher": "client",
    "FETCHED_TAG": "stage", "Fetched": "stage", "FetchImages": "stage", "FetchWorker": "stage", "host_shard": "stage",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "DEFAULT_USER_AGENT",
    "FETCHED_TAG",
    "STAGE",
    "Downloaded",
    "FetchConfig",
    "FetchImages",
    "FetchRefused",
    "FetchWorker",
    "Fetched",
    "Fetcher",
    "ImageCache",
    "add_fetch_arguments",
    "checked_url",
    "decode_cache_entry",
    "encode_cache_entry",
    "host_shard",
    "image_header_refusal",
    "looks_like_html",
    "redirect_target",
]
