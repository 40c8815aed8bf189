"""A real HTTP server on a loopback address for the fetch tests: real images plus hostile endpoints.

It runs its own asyncio loop in a thread, records every request (path, User-Agent, Authorization,
and how many were in flight at once) and serves:

  /robots.txt                 Disallow /private/ for magiclens (and everything for otherbot)
  /.well-known/tdmrep.json    reserves /tdm-reserved/*
  /img/PATH                   a file under ../shared/data/images, after `delay` seconds
  /private/PATH               the same, but disallowed by robots.txt
  /noai/PATH                  X-Robots-Tag: noai
  /noimageai-for-us/PATH      X-Robots-Tag: magiclens: noimageai
  /noai-for-otherbot/PATH     X-Robots-Tag: otherbot: noai (not addressed to us)
  /tdm-header/PATH            tdm-reservation: 1
  /tdm-reserved/PATH          reserved by tdmrep.json
  /flaky/PATH                 429 with Retry-After: 1 on the first request, then the image
  /redirect?to=URL            302 to URL
  /redirect-loop/N            302 to /redirect-loop/N+1, forever
  /error-500                  always 500
  /html-as-jpeg               an HTML page sent as image/jpeg
  /slow-drip                  image/jpeg, one byte every 0.2 s for a minute
  /declared-huge              Content-Length of 30 MB
  /endless                    chunked, no Content-Length, never ends
  /gzip-bomb                  64 MiB of zeros, gzip'd to 64 KiB, as Content-Encoding: gzip
  /pixel-bomb.png             a PNG whose header declares 40000 x 40000 pixels
  anything else               404
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import struct
import threading
import zlib
from collections import Counter
from pathlib import Path

from aiohttp import web

ROBOTS_TXT = """\
# test site
User-agent: otherbot
Disallow: /

User-agent: magiclens
Disallow: /private/
"""

TDMREP_JSON = """[
  {"location": "/tdm-reserved/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/tdm-policy.json"},
  {"location": "/*", "tdm-reservation": 0}
]"""

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                 ".webp": "image/webp", ".bmp": "image/bmp"}

HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Not found</title></head><body>Sorry</body></html>\n"


@functools.cache
def gzip_bomb() -> bytes:
    """64 MiB of zeros, gzip'd to about 64 KiB."""
    return gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)


def pixel_bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid PNG header declaring width x height 8-bit gray pixels, with one tiny IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


class SiteServer:
    """One site on `host`, answering in a thread of its own; `base` is its URL once started."""

    def __init__(self, images_dir: Path, host: str = "127.0.0.1", *, delay: float = 0.0,
                 robots_txt: str = ROBOTS_TXT) -> None:
        self.images_dir = images_dir
        self.host = host
        self.delay = delay
        self.robots_txt = robots_txt
        self.paths: list[str] = []
        self.user_agents: set[str] = set()
        self.authorizations: list[str] = []  # every Authorization header received
        self.in_flight = 0
        self.max_in_flight = 0
        self._flaky_seen: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "SiteServer":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"site-{self.host}", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.base = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> "SiteServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def count(self, prefix: str) -> int:
        return sum(1 for path in self.paths if path.startswith(prefix))

    def counts(self) -> Counter:
        return Counter(self.paths)

    # -- endpoints --------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path_qs)
        self.user_agents.add(request.headers.get("User-Agent", ""))
        self.authorizations.extend(request.headers.getall("Authorization", []))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/robots.txt":
            return web.Response(text=self.robots_txt, content_type="text/plain")
        if path == "/.well-known/tdmrep.json":
            return web.Response(text=TDMREP_JSON, content_type="application/json")
        section, _, rest = path.lstrip("/").partition("/")
        if section in ("img", "private", "tdm-reserved"):
            return await self._image(rest)
        if section == "noai":
            return await self._image(rest, {"X-Robots-Tag": "noai"})
        if section == "noimageai-for-us":
            return await self._image(rest, {"X-Robots-Tag": "magiclens: noimageai"})
        if section == "noai-for-otherbot":
            return await self._image(rest, {"X-Robots-Tag": "otherbot: noai, noimageai"})
        if section == "tdm-header":
            return await self._image(rest, {"tdm-reservation": "1"})
        if section == "flaky":
            if rest not in self._flaky_seen:
                self._flaky_seen.add(rest)
                return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
            return await self._image(rest)
        if section == "redirect":
            raise web.HTTPFound(request.query["to"])
        if section == "redirect-loop":
            raise web.HTTPFound(f"/redirect-loop/{int(rest or 0) + 1}")
        if section == "error-500":
            return web.Response(status=500, text="internal error")
        if section == "html-as-jpeg":
            return web.Response(body=HTML_PAGE, headers={"Content-Type": "image/jpeg"})
        if section == "slow-drip":
            return await self._drip(request)
        if section == "declared-huge":
            return await self._stream(request, total=30 * 1024 * 1024, declare_length=True)
        if section == "endless":
            return await self._stream(request, total=None, declare_length=False)
        if section == "gzip-bomb":
            return web.Response(body=gzip_bomb(), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
        if section == "pixel-bomb.png":
            return web.Response(body=pixel_bomb_png(), content_type="image/png")
        return web.Response(status=404, text="not found")

    async def _image(self, relative: str, headers: dict | None = None) -> web.Response:
        file = (self.images_dir / relative).resolve()
        if self.images_dir.resolve() not in file.parents or not file.is_file():
            return web.Response(status=404, text="no such image")
        if self.delay:
            await asyncio.sleep(self.delay)
        content_type = CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
        return web.Response(body=file.read_bytes(), headers={"Content-Type": content_type, **(headers or {})})

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = 100_000
        await response.prepare(request)
        try:
            for _ in range(300):
                await response.write(b"\xff")
                await asyncio.sleep(0.2)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    async def _stream(self, request: web.Request, *, total: int | None, declare_length: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if declare_length:
            response.content_length = total
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"\0" * 65536
        sent = 0
        try:
            while total is None or sent < total:
                await response.write(block)
                sent += len(block)
                if sent > 1024 * 1024 * 1024:  # never more than 1 GiB, whatever the client does
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response
