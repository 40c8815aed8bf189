"""What may be fetched and what an answer may be: URL and redirect checks, header checks, bodies.

Plain functions; `FetchRefused` carries a reject reason and a detail for people.
"""

from __future__ import annotations

import ipaddress

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from magiclens.pipeline.netguard import IPNetwork, address_refusal
from magiclens.pipeline.robots import tdm_reserved, x_robots_opt_out

STAGE = "fetch"
HTML_CONTENT_TYPES = frozenset({"text/html", "application/xhtml+xml"})


class FetchRefused(Exception):
    """An image (or site file) that will not be fetched: a reject reason and a detail for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransientFailure(FetchRefused):
    """A failure that a retry may cure: a timeout or a broken connection."""


def checked_url(url: str | URL, allowed: tuple[IPNetwork, ...], *, reason: str = "invalid_url") -> URL:
    """`url` as a yarl URL if we may fetch it; else FetchRefused(`reason`, credentials_in_url or
    private_address).

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
    if parsed.user is not None or parsed.password is not None:
        # aiohttp would send them as Basic auth: a page must never make us log in anywhere.
        raise FetchRefused(
            "credentials_in_url",
            f"{str(parsed.with_user(None))[:200]} names a user or password; such URLs are never requested",
        )
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

