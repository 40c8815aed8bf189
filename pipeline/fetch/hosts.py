"""Per-host politeness and per-image time for the HTTP client: request slots and pacing of one host,
the deadline budget of one image, and a bounded memory of per-origin site files."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict


class HostPacing:
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


class TimeBudget:
    """The --fetch-deadline of one image: spent by its requests and by the waits between retries,
    not by queueing behind other requests to the same host (that is our politeness, not its delay)."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    def spend(self, seconds: float) -> None:
        self.left -= seconds


class LruDict(OrderedDict):
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

