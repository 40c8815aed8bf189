"""Progress of long loops: a tqdm bar on a terminal, log lines at intervals everywhere else (a batch
job's log, a pipe, a notebook's captured stderr), so that a long `evaluate` or `index` is never silent."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TypeVar

from tqdm import tqdm

LOG = logging.getLogger("magiclens.progress")
LOG_INTERVAL_S = 30.0
T = TypeVar("T")


class LoggedProgress:
    """tqdm's `update` interface, reported as an INFO log line at most every `interval_s` seconds and at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, interval_s: float = LOG_INTERVAL_S):
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.count = 0
        self.started = self.last_logged = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last_logged >= self.interval_s:
            self.last_logged = now
            self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        of_total = f"/{self.total}" if self.total is not None else ""
        LOG.info("%s: %d%s %s in %.0f s (%.1f %s/s)", self.desc, self.count, of_total, self.unit, elapsed,
                 self.count / elapsed, self.unit)

    def __enter__(self) -> LoggedProgress:
        LOG.info("%s: %s %s to do", self.desc, self.total if self.total is not None else "an unknown number of", self.unit)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self._log(time.monotonic())


def progress(total: int | None, desc: str, unit: str = "img", interval_s: float = LOG_INTERVAL_S) -> tqdm | LoggedProgress:
    """A context manager with `update(n)`: a tqdm bar when stderr is a terminal, else logged progress."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
    return LoggedProgress(total, desc, unit, interval_s)


def counted(items: Iterable[T], total: int | None, desc: str, unit: str, size: Callable[[T], int]) -> Iterator[T]:
    """`items` as they come, with progress shown by `size(item)` each (e.g. the rows of a batch)."""
    with progress(total, desc, unit) as shown:
        for item in items:
            yield item
            shown.update(size(item))
