"""A minimal Chrome DevTools client for the tests that look at pages in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--remote-debugging-port=0",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver (make test does it)")


@dataclass
class Page:
    """The open page: `call` sends a DevTools command, `evaluate` runs JavaScript and returns its value."""

    call: Callable[..., Awaitable[dict]]

    async def evaluate(self, expression: str):
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, (expression, reply)
        return reply["result"].get("value")

    async def wait_for(self, expression: str, tries: int = 600) -> None:
        for _ in range(tries):
            if await self.evaluate(expression):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"never true: {expression}")


@contextlib.asynccontextmanager
async def open_page(url: str, profile: Path, window: str = "1280,900") -> AsyncIterator[Page]:
    """Start headless Chromium on `url` with a fresh profile and connect to that page's DevTools."""
    process = subprocess.Popen(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    scheme = url.split(":")[0]
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    pages = [t for t in await response.json() if t["type"] == "page" and t["url"].split(":")[0] == scheme]
                if pages:
                    break
                await asyncio.sleep(0.1)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                ids = iter(range(1, 1_000_000))

                async def call(method: str, **params) -> dict:
                    message_id = next(ids)
                    await socket.send_json({"id": message_id, "method": method, "params": params})
                    async for message in socket:
                        reply = json.loads(message.data)
                        if reply.get("id") == message_id:
                            assert "error" not in reply, reply
                            return reply["result"]
                    raise RuntimeError("the DevTools connection closed")

                yield Page(call)
    finally:
        process.terminate()
        process.wait(timeout=20)
