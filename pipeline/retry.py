"""The one retry policy of every HTTP client in the project (the image fetcher, the OpenAI writer).

Which answers are worth another try, how long to wait before it, and when to give up instead:

- retried: 408 Request Timeout, 409 Conflict (OpenAI-compatible servers answer it for a transient
  lock), 425 Too Early, 429 Too Many Requests and the 5xx statuses, except those that say the server
  can never answer this request (501 Not Implemented, 505 HTTP Version Not Supported, 511 Network
  Authentication Required); network errors and timeouts are retried by the callers;
- a server's Retry-After (delta-seconds or an HTTP-date) is obeyed exactly: never sooner than asked;
  one longer than `max_retry_after` means giving up rather than coming back early;
- otherwise exponential backoff, `backoff * 2**attempt` capped at `max_backoff`, with "equal jitter"
  (a uniform draw between half of it and all of it), so that the many requests that failed together
  (one host's images, one batch of prompts) do not come back together.

Standard library only: the `instruct` command imports it without any mining module or library.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from datetime import timezone

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429}) | (frozenset(range(500, 600)) - {501, 505, 511})


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP answer with this status may succeed when asked again."""
    return status in RETRYABLE_STATUSES


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header value; None when absent or unreadable.

    Accepts delta-seconds ("120"; a decimal such as "1.5" too, which some servers send) and the three
    HTTP-date forms of RFC 9110 (IMF-fixdate, RFC 850, asctime; a date without a zone is GMT). A date
    in the past means now: 0. `now` is a Unix time (tests); by default the clock.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value[0].isdigit():
        try:
            seconds = float(value)
        except ValueError:
            return None
        return seconds if seconds == seconds and seconds != float("inf") else None  # not nan, not inf
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """How often to retry and how long to wait; `delay` decides each wait."""

    retries: int = 2  # retries after the first attempt
    backoff: float = 1.0  # seconds before the first retry (before jitter), doubling after each
    max_backoff: float = 60.0  # our own waits never grow past this
    max_retry_after: float = 60.0  # a longer Retry-After: give up

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, got {self.retries}")
        for name in ("backoff", "max_backoff", "max_retry_after"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    def delay(
        self, attempt: int, retry_after: float | None = None, *, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait after failed attempt number `attempt` (0-based); None: do not retry.

        None when the retries are spent, or when the server asks (`retry_after`, from
        `parse_retry_after`) for a longer wait than `max_retry_after`.
        """
        if attempt >= self.retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        ceiling = min(self.backoff * 2 ** min(attempt, 64), self.max_backoff)  # 2**64: far past any cap
        return (rng or random).uniform(ceiling / 2, ceiling)
